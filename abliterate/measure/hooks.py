"""Forward hooks that do in memory what an edit does to the weights, and what steering adds.

`ablate` removes s r (r . out) (for several directions s Q^T (Q out), their span) from the output of exactly
the modules whose weights `apply` edits (the architecture table's hook_modules), so an ablated forward computes
what the edited checkpoint computes: selection, evaluation and search score the edit itself, not an approximation of it.
`ablate_rows` does it with one direction per batch row (several candidates scored in one batch). `add` adds a
vector to the residual stream entering a decoder layer (activation addition), `add_after` to the stream leaving
one (steering).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from abliterate.arch.writers import Arch
from abliterate.io.direction_file import Direction

Strength = Callable[[str, "int | None"], float]


def module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise LookupError(
            f"{type(model).__name__} has no module {path!r}; the architecture table does not fit"
        ) from None


def in_layer(model: torch.nn.Module, path: str, layer: int | None) -> torch.nn.Module | None:
    """The module a hook path names in `layer` (None: the embeddings), or None where this layer has none: hybrid
    stacks hold attention in some layers and another mixer (or a dense MLP instead of experts) in others; loading
    checks that each path exists in some layer."""
    if layer is None:
        return module(model, path)
    try:
        return model.get_submodule(path.format(layer=layer))
    except AttributeError:
        return None


def decoder_layers(model: torch.nn.Module, arch: Arch) -> torch.nn.ModuleList:
    return module(model, arch.decoder_layers)  # type: ignore[return-value]


def _apply_to_output(output, fn):
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    return fn(output)


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    v = vectors.to(torch.float32)
    return v / v.norm(dim=-1, keepdim=True)


def rows_for(direction: torch.Tensor | Direction) -> Callable[[int | None], torch.Tensor]:
    """layer (None: embeddings) -> what its writers have removed: a unit [d], or orthonormal rows [k, d].

    A tensor is [d] for all layers or [num_layers + 1, d] (row 0: embeddings, row L + 1: layer L), normalised
    here; a `Direction` (any rank, its rows already orthonormal) is used as it is."""
    if isinstance(direction, Direction):
        cache = {}

        def of(layer: int | None) -> torch.Tensor:
            key = None if not direction.per_layer else layer
            if key not in cache:
                cache[key] = torch.from_numpy(direction.for_layer(layer).astype("float32"))
            return cache[key]
        return of
    units = _unit(direction)
    return lambda layer: units if units.ndim == 1 else units[0 if layer is None else layer + 1]


@contextlib.contextmanager
def ablate(model: torch.nn.Module, arch: Arch, direction: torch.Tensor | Direction, strength: Strength | float = 1.0,
           num_layers: int | None = None) -> Iterator[None]:
    """Remove the direction (a `Direction`'s span for rank k) from every residual writer's output while the
    block runs. direction: see `rows_for`. strength: a scale, or a function of (component, layer) giving one
    per module.
    """
    rows = rows_for(direction)
    num_layers = num_layers if num_layers is not None else len(decoder_layers(model, arch))
    scale_of = strength if callable(strength) else (lambda _c, _l: float(strength))
    handles = []
    try:
        for component, paths in arch.hook_modules.items():
            for layer in ([None] if component == "embed" else range(num_layers)):
                s = scale_of(component, layer)
                if s == 0.0:
                    continue
                r = rows(layer)
                for path in paths:
                    target = in_layer(model, path, layer)
                    if target is not None:
                        handles.append(target.register_forward_hook(_remover(r, s)))
        yield
    finally:
        for h in handles:
            h.remove()


def _remover(r: torch.Tensor, s: float):
    cache: dict = {}

    def hook(_module, _inputs, output):
        def remove(out: torch.Tensor) -> torch.Tensor:
            key = (out.dtype, out.device)
            if key not in cache:
                cache[key] = r.to(dtype=out.dtype, device=out.device)
            rr = cache[key]
            if rr.ndim == 2:  # orthonormal rows: remove their span
                return out - s * ((out @ rr.T) @ rr)
            return out - s * (out @ rr).unsqueeze(-1) * rr
        return _apply_to_output(output, remove)

    return hook


@contextlib.contextmanager
def ablate_rows(model: torch.nn.Module, arch: Arch, rows: Callable[[], torch.Tensor]) -> Iterator[None]:
    """`ablate` with a direction per batch row: rows() gives the running batch's unit vectors [B, d] (the caller
    sets them before each forward), so several candidates are scored in one batch, each on its own rows."""
    num_layers = len(decoder_layers(model, arch))
    handles = []

    def hook(_module, _inputs, output):
        def remove(out: torch.Tensor) -> torch.Tensor:
            r = rows().to(dtype=out.dtype, device=out.device)  # [B, d]
            flat = out.reshape(r.shape[0], -1, out.shape[-1])  # [B, T, d] also from [B * T, d]
            return (flat - torch.bmm(flat, r[:, :, None]) * r[:, None, :]).reshape(out.shape)
        return _apply_to_output(output, remove)

    try:
        for component, paths in arch.hook_modules.items():
            for layer in ([None] if component == "embed" else range(num_layers)):
                for path in paths:
                    target = in_layer(model, path, layer)
                    if target is not None:
                        handles.append(target.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def add(model: torch.nn.Module, arch: Arch, layer: int, vector: torch.Tensor, coeff: float = 1.0,
        positions: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[None]:
    """Add coeff * vector to the residual stream entering decoder layer `layer`.

    positions: optional function of the hidden states [B, T, d] returning a [B, T, 1] mask of the
    positions to steer (default: every position).
    """
    target = decoder_layers(model, arch)[layer]
    cache: dict = {}

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        key = (hidden.dtype, hidden.device)
        if key not in cache:
            cache[key] = (coeff * vector.to(torch.float32)).to(dtype=hidden.dtype, device=hidden.device)
        delta = cache[key] if positions is None else cache[key] * positions(hidden).to(hidden.dtype)
        if args:
            return (hidden + delta, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden + delta}

    handle = target.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def add_after(model: torch.nn.Module, arch: Arch, layer: int, vector: torch.Tensor, coeff: float = 1.0,
              positions: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[None]:
    """Add coeff * vector to the residual stream leaving decoder layer `layer`: entering layer + 1 (`add`), or
    for the last layer, which no layer follows, to its output before the final norm."""
    layers = decoder_layers(model, arch)
    if layer + 1 < len(layers):
        with add(model, arch, layer + 1, vector, coeff, positions):
            yield
        return
    cache: dict = {}

    def shift(hidden: torch.Tensor) -> torch.Tensor:
        key = (hidden.dtype, hidden.device)
        if key not in cache:
            cache[key] = (coeff * vector.to(torch.float32)).to(dtype=hidden.dtype, device=hidden.device)
        return hidden + (cache[key] if positions is None else cache[key] * positions(hidden).to(hidden.dtype))

    handle = layers[layer].register_forward_hook(lambda _module, _inputs, output: _apply_to_output(output, shift))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def capture_residuals(model: torch.nn.Module, arch: Arch,
                      sink: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """Call sink(i, hidden) with the residual stream i: 0 entering layer 0, L + 1 leaving layer L."""
    layers = decoder_layers(model, arch)
    handles = [layers[0].register_forward_pre_hook(
        lambda _m, args, kwargs: sink(0, args[0] if args else kwargs["hidden_states"]), with_kwargs=True)]
    for i, block in enumerate(layers):
        handles.append(block.register_forward_hook(
            lambda _m, _a, output, i=i: sink(i + 1, output[0] if isinstance(output, tuple) else output)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
