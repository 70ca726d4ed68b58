"""Hooks that compute in memory what a norm-preserving edit (`apply --norm-preserve`) writes.

A norm-preserving edit writes W' = (I - s r r^T) W D, D diagonal with D_j = |w_j| / |w_j - s (r.w_j) r| for
each vector w_j the tensor writes into the residual stream (a column of an nn.Linear weight, a row of an
embedding or Conv1D weight, a bias). As a computation: scale the writer's input feature j by D_j (a bias by
its own D), then remove s r from the output, which `hooks.ablate` does. So here: a pre-hook on each writer
module scales its input (a bias: a hook adds (D_b - 1) b), and for an embedding, whose output row is the
vector itself, the hook rescales each output vector. These hooks run before `ablate`'s on the same module.

Writers are found by matching the model's in-memory parameter names against the architecture table,
which holds for every family whose writers are 2-D weights and biases of layers; fused MoE experts (3-D, or
DBRX's 2-D parameters read outside their module's forward) are refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from abliterate.arch.writers import Arch
from abliterate.errors import AbliterateError
from abliterate.io.direction_file import Direction
from abliterate.measure.hooks import Strength, ablate, rows_for


def preserve_factors(vectors: torch.Tensor, r: torch.Tensor, s: float) -> torch.Tensor:
    """D per vector (rows of `vectors`): |w| / |w - s c r|, c = r.w, computed as `apply` does:
    |w - s c r|^2 = |w|^2 - (2s - s^2) c^2 in float64; 1 where that is not positive. For orthonormal rows
    r [k, d] (several directions) c^2 is |Q w|^2, the sum over the k coefficients."""
    w = vectors.to(torch.float64)
    c = (vectors.to(torch.float32) @ r.to(torch.float32).T).to(torch.float64)
    before = (w * w).sum(-1)
    after = before - (2 * s - s * s) * (c * c if c.ndim == before.ndim else (c * c).sum(-1))
    return torch.where(after > 0, torch.sqrt(before / after.clamp(min=torch.finfo(torch.float64).tiny)),
                       torch.ones_like(before))


def _writers(model: torch.nn.Module, arch: Arch) -> Iterator[tuple[str, str, int | None, int, torch.Tensor]]:
    """(module path, component, layer, hidden axis, parameter) for every writer parameter of the model."""
    if any(p.device.type == "meta" for p in model.parameters()):
        raise AbliterateError("norm-preserving hooks read the writers' weights, which --device-map offloaded; run "
                              "without offloading, or edit with `apply --norm-preserve`")
    quantised = next((n for n, m in model.named_modules() if type(m).__name__.startswith(("FP8", "Mxfp4"))), None)
    if quantised is not None:
        raise AbliterateError(f"{quantised} runs FP8/MXFP4 on this device: norm-preserving hooks need its weights in "
                              "float (on a CPU they are dequantised); edit with `apply --norm-preserve`")
    fused = next((n for n, p in model.named_parameters() if p.ndim > 2 and "experts" in n), None)
    if fused is not None:
        raise AbliterateError(
            f"{fused}: norm-preserving hooks handle 2-D writers and biases only (not fused MoE experts); search "
            "this family without the norm-preserving dimension, or edit with `apply --norm-preserve`")
    for name, param in model.named_parameters():
        for writer in arch.writers:
            m = writer.match(arch.renamed_on_disk(name))
            if m is None:
                continue
            if param.ndim > 2 or writer.hidden_axis is None or not name.endswith((".weight", ".bias")):
                raise AbliterateError(
                    f"{name}: norm-preserving hooks handle 2-D writers and biases only (not fused MoE experts); "
                    "search this family without the norm-preserving dimension, or edit with `apply --norm-preserve`")
            layer = m.groupdict().get("layer")
            yield name.rsplit(".", 1)[0], writer.component, None if layer is None else int(layer), \
                writer.hidden_axis, param
            break


def supports_preserving(model: torch.nn.Module, arch: Arch) -> bool:
    """Whether these hooks can run on this model (no fused expert writers, no offloaded weights)."""
    return why_not_preserving(model, arch) is None


def why_not_preserving(model: torch.nn.Module, arch: Arch) -> str | None:
    """Why these hooks cannot run on this model (None: they can)."""
    try:
        list(_writers(model, arch))
    except AbliterateError as e:
        return str(e)
    return None


@contextlib.contextmanager
def ablate_preserving(model: torch.nn.Module, arch: Arch, direction: torch.Tensor | Direction,
                      strength: Strength | float = 1.0, num_layers: int | None = None) -> Iterator[None]:
    """`hooks.ablate` with every written vector restored to its original norm (direction: [d] or [L + 1, d], or a
    `Direction` of any rank, whose span is removed)."""
    rows = rows_for(direction)
    scale_of = strength if callable(strength) else (lambda _c, _l: float(strength))
    handles = []
    try:
        for path, component, layer, axis, param in list(_writers(model, arch)):
            s = scale_of(component, layer)
            if s == 0.0:
                continue
            r = rows(layer).to(param.device)
            target = model.get_submodule(path)
            with torch.no_grad():
                if param.ndim == 1:  # a bias: one vector of its own
                    factor = preserve_factors(param[None], r, s)[0].item()
                    handles.append(target.register_forward_hook(_add_bias(param, factor - 1.0), prepend=True))
                elif component == "embed" and axis == -1:  # the output rows are the vectors themselves
                    handles.append(target.register_forward_hook(_rescale_rows(r, s), prepend=True))
                else:  # columns of [d, in] (axis -2) or rows of Conv1D [in, d] (axis -1): one per input feature
                    factors = preserve_factors(param.T if axis == -2 else param, r, s)
                    handles.append(target.register_forward_pre_hook(_scale_input(factors)))
        with ablate(model, arch, direction, strength=strength, num_layers=num_layers):
            yield
    finally:
        for h in handles:
            h.remove()


def _scale_input(factors: torch.Tensor):
    cache: dict = {}

    def hook(_module, args):
        x = args[0]
        key = (x.dtype, x.device)
        if key not in cache:
            cache[key] = factors.to(dtype=x.dtype, device=x.device)
        return (x * cache[key], *args[1:])

    return hook


def _add_bias(bias: torch.Tensor, extra: float):
    def hook(_module, _inputs, output):
        return output + extra * bias.to(output.dtype)

    return hook


def _rescale_rows(r: torch.Tensor, s: float):
    def hook(_module, _inputs, output):
        flat = output.reshape(-1, output.shape[-1])
        factors = preserve_factors(flat, r.to(output.device), s).to(output.dtype)
        return (flat * factors[:, None]).reshape(output.shape)

    return hook
