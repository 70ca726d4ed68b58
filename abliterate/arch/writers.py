"""What the architecture table holds per family: residual writers on disk, hook modules in memory.

Every tensor that adds something to the residual stream (token and position embeddings, the
attention output projection, the MLP output projection, each MoE expert's and shared expert's
output projection, and their biases) is a `Writer`: a full-match regex on its on-disk name, its
component, and the axis that holds the hidden dimension d:

* ``hidden_axis=-2``: ``nn.Linear`` layout ``[..., d, in]`` (a row per residual coordinate),
  also fused experts stored ``[experts, d, in]``.
* ``hidden_axis=-1``: ``[..., d]``: embeddings ``[vocab, d]``, GPT-2 ``Conv1D`` ``[in, d]``,
  fused experts stored ``[experts, in, d]``, and every bias.

The families themselves are data (abliterate/arch/families/*.yaml, read by family_file.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

COMPONENTS = ("embed", "attn", "mlp")


@dataclass(frozen=True)
class Writer:
    """A family of tensors writing into the residual stream, matched by a full regex on its name."""

    pattern: str
    component: str  # one of COMPONENTS
    hidden_axis: int | None  # -2 or -1, see the module docstring; None: read it from the shape

    def match(self, name: str) -> re.Match[str] | None:
        return re.fullmatch(self.pattern, name)


@dataclass(frozen=True)
class Arch:
    """How one model family lays out its residual writers on disk and in memory."""

    name: str
    model_types: tuple[str, ...]
    writers: tuple[Writer, ...]
    hook_modules: dict[str, tuple[str, ...]]  # component -> module paths, "{layer}" filled in
    decoder_layers: str = "model.layers"  # the ModuleList of decoder blocks (activations, steering)
    output_embedding: str = "lm_head.weight"  # written when tied embeddings are untied
    # Families that normalise a block's output before adding it to the residual (Gemma 2/3, OLMo 2/3, GLM-4,
    # EXAONE 4): the edit removes r from the block output *before* that norm, not from the residual stream.
    normalised_block_outputs: bool = False
    # The config key of a scalar multiplying every block output before the residual add (Granite): an edit is
    # unaffected (the product is linear), but a bias written to steer must be divided by it.
    residual_multiplier: str | None = None
    notes: str = ""
