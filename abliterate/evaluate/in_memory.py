"""The edit `apply` writes, computed by hooks on a model already loaded: the whole job measures its output on
the model it extracted with, so a command loads the weights once instead of loading the written checkpoint
(and a second copy of the original as the baseline) again.

The hooks are those selection and search score edits with (`measure.hooks.ablate`, and
`measure.preserving_hooks` for norm-preserving edits), fed by the same `EditOptions.strength`, so they compute
what the written weights compute, to the rounding of the model's dtype (the weights are rounded once as
written, the hooks round the activations). Where hooks cannot compute an edit, `edited_view` says so and the
caller loads the written checkpoint instead.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from abliterate.edit.plan import EditOptions
from abliterate.io.direction_file import Direction
from abliterate.measure.hooks import ablate
from abliterate.measure.loading import LoadedModel


def edited_view(lm: LoadedModel, direction: Direction, options: EditOptions, name: str) -> LoadedModel | None:
    """`lm` running under hooks that compute the edit (the model is shared, not copied), or None where hooks
    cannot: tensors chosen by --targets regexes (hooks follow the family table's modules), a shared input and
    output embedding edited in place (--keep-tied: the output layer's reading changes too), norm-preserving
    edits of fused MoE experts."""
    from abliterate.measure.preserving_hooks import ablate_preserving

    if why_not_in_memory(lm, options) is not None:
        return None
    if options.norm_preserve:
        return replace(lm, name=name, hooks=lambda: ablate_preserving(
            lm.model, lm.arch, direction, strength=options.strength, num_layers=lm.num_layers))
    return replace(lm, name=name, hooks=lambda: ablate(lm.model, lm.arch, direction, strength=options.strength,
                                                        num_layers=lm.num_layers))


def why_not_in_memory(lm: LoadedModel, options: EditOptions) -> str | None:
    """Why hooks cannot compute this edit on this model (None: they can)."""
    from abliterate.measure.preserving_hooks import supports_preserving

    if options.targets:
        return "--targets chooses tensors by name, hooks follow the family table's modules"
    if options.keep_tied and options.strength("embed", None) != 0.0 and _tied(lm.model):
        return "--keep-tied edits the shared embedding, which the output layer reads too"
    if options.norm_preserve and not supports_preserving(lm.model, lm.arch):
        return "norm-preserving hooks do not handle fused MoE experts"
    quantised = getattr(lm.model.config, "quantization_config", None)
    method = quantised.get("quant_method") if isinstance(quantised, dict) else getattr(quantised, "quant_method", None)
    if str(getattr(method, "value", method)) in ("fp8", "mxfp4"):
        return f"the {method} weights are quantised again after the edit, which hooks on the dequantised model omit"
    return None


def _tied(model: torch.nn.Module) -> bool:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return out is not None and inp is not None and out.weight is inp.weight
