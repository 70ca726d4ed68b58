"""Day-one support: the residual writers of a model_type that no family file lists, found from the model itself.

On a tiny random instance built from the checkpoint's own config (tiny.py), in float64:

1. candidates: every parameter under the language model that can write a hidden-size vector (an embedding's
   rows, a Linear's output rows and bias, a Conv1D's output columns, a fused expert tensor's hidden axis, a
   hidden-size vector; not norms), grouped per layer pattern;
2. completeness: with r removed from every candidate along its hidden axis, every decoder layer's output is free
   of r (a block that normalises or mixes its outputs before the residual add fails here and is refused);
3. necessity: a group is dropped when the stream stays free of r without it (it reads the stream, or feeds a
   writer, but adds nothing to the stream itself); what is kept is exactly what writes into the stream;
4. hooks: removing r from the outputs of the modules holding the kept groups computes every layer's output as the
   edited weights do, so extraction, evaluation and search measure the edit `apply` writes.

Only when all hold (to 1e-9 of the stream's size) is the family used: the kept tensors are named as the tiny model
saves them (matched by content), and the run says which and why. Otherwise one line refuses with the --arch route.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from abliterate.arch.discovered_names import disk_writers
from abliterate.arch.tiny import WIDTH, tiny_model
from abliterate.arch.writers import Arch
from abliterate.errors import AbliterateError

TOLERANCE = 1e-9
MLP_WORDS = ("mlp", "ffn", "feed_forward", "moe", "expert")
_CACHE: dict[str, Arch | AbliterateError] = {}


@dataclass(frozen=True)
class Group:
    """One writer pattern: in-memory parameter names with the layer as {layer}, its hidden axis and component."""

    pattern: str
    axis: int
    component: str
    params: tuple[str, ...]


def discovered_arch(config: dict, report: bool = True) -> Arch:
    """The family found on a tiny instance of `config`'s model, or an AbliterateError with the --arch route
    (cached per config, and the last success per model_type for `earlier_discovery`)."""
    model_type = config.get("model_type")
    key = json.dumps(config, sort_keys=True, default=str)
    if key not in _CACHE:
        try:
            try:
                arch = _discover(config)
            except AbliterateError:
                raise
            except Exception as e:  # the tiny model failed to run, save or be hooked: no exact check, no edit
                raise AbliterateError(f"the tiny instance failed ({type(e).__name__}: {_line(e)})") from None
            if report:
                print(f"note: {arch.notes}", file=sys.stderr)
            _CACHE[key] = _CACHE[str(model_type)] = arch
        except AbliterateError as e:
            _CACHE[key] = AbliterateError(
                f"model_type {model_type!r} is in no family file and its residual writers could not be found from "
                f"the model itself: {e}; describe the family in a YAML file and pass --arch FILE (see "
                "docs/architecture.md, 'Adding a model family')")
    found = _CACHE[key]
    if isinstance(found, AbliterateError):
        raise found
    return found


def earlier_discovery(model_type: str) -> Arch | None:
    """The family discovered earlier in this process for `model_type`, if any (never discovers)."""
    found = _CACHE.get(str(model_type))
    return found if isinstance(found, Arch) else None


def _line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else ""


def _discover(config: dict) -> Arch:
    import torch

    model = tiny_model(config)
    d = model.config.get_text_config().hidden_size
    embed_path, layers_path = _stream_modules(model)
    groups = _candidates(model, embed_path, layers_path, d)
    r = torch.nn.functional.normalize(torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
                                      dim=0)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, min(vocab, 100), (2, 10), generator=torch.Generator().manual_seed(2))
    layers = model.get_submodule(layers_path)
    if not _free_of(_edited_outputs(model, layers, groups, r, ids), r):
        raise AbliterateError("removing the direction from every module that writes a hidden-size output (tiny "
                              "instance) leaves it in the residual stream: its blocks normalise or mix their outputs "
                              "before adding them")
    kept = list(groups)
    for group in groups:  # drop what the stream does not need
        trial = [g for g in kept if g is not group]
        if _free_of(_edited_outputs(model, layers, trial, r, ids), r):
            kept = trial
    edited = _edited_outputs(model, layers, kept, r, ids)
    hooks = _hook_modules(model, kept, layers_path)
    if not _close(_hooked_outputs(model, layers, hooks, r, ids), edited):
        raise AbliterateError(f"hooks on {', '.join(sorted(hooks))} do not compute what the edited weights compute")
    writers, names, prefixes, output = disk_writers(model, kept)
    hook_modules: dict[str, tuple[str, ...]] = {}
    for path, component in sorted(hooks.items()):
        hook_modules[component] = (*hook_modules.get(component, ()), path)
    model_type = config.get("model_type")
    notes = (f"model_type {model_type!r} is in no family file: on a tiny random instance of its config "
             f"({len(layers)} layers, width {WIDTH}) removing r from these tensors, each of them needed, leaves every "
             f"layer's output free of r (to {TOLERANCE:g}), and hooks on their modules compute the same: editing "
             f"{', '.join(names)}")
    return Arch(name=f"{model_type} (discovered)", model_types=(str(model_type),), writers=writers,
                hook_modules=hook_modules, decoder_layers=layers_path, output_embedding=output, notes=notes,
                checkpoint_prefixes=prefixes)


def _stream_modules(model) -> tuple[str, str]:
    """(input embedding path, decoder layer list path): the ModuleList beside the embedding with one entry per layer."""
    import torch

    modules = dict(model.named_modules())
    embed = model.get_input_embeddings()
    embed_path = next((n for n, m in modules.items() if m is embed), None)
    if embed_path is None:
        raise AbliterateError("the model has no input embedding module")
    parent = embed_path.rpartition(".")[0]
    n = model.config.get_text_config().num_hidden_layers
    lists = [p for p, m in modules.items() if isinstance(m, torch.nn.ModuleList) and len(m) == n
             and p.rpartition(".")[0] == parent]
    if len(lists) != 1:
        raise AbliterateError(f"found {len(lists)} lists of {n} decoder layers beside the input embedding, not one")
    return embed_path, lists[0]


def _candidates(model, embed_path: str, layers_path: str, d: int) -> list[Group]:
    import torch

    scope = embed_path.rpartition(".")[0]
    layer_re = re.compile(re.escape(layers_path) + r"\.(\d+)\.")
    found: dict[tuple[str, int], list[str]] = {}
    for path, module in model.named_modules():
        if (scope and not (path == scope or path.startswith(scope + "."))) or "norm" in type(module).__name__.lower():
            continue
        for name, p in module.named_parameters(recurse=False):
            full = f"{path}.{name}" if path else name
            for axis in _axes(module, name, p, d, torch):
                found.setdefault((layer_re.sub(f"{layers_path}.{{layer}}.", full, count=1), axis), []).append(full)
    groups = []
    for (pattern, axis), params in found.items():
        in_layer = "{layer}" in pattern
        component = "embed" if not in_layer else "mlp" if any(w in pattern.lower() for w in MLP_WORDS) else "attn"
        groups.append(Group(pattern, axis, component, tuple(params)))
    return groups


def _axes(module, name: str, p, d: int, torch) -> list[int]:
    """The axes along which parameter `name` of `module` writes hidden-size vectors."""
    if isinstance(module, torch.nn.Embedding):
        return [-1] if name == "weight" and p.shape[-1] == d else []
    if isinstance(module, torch.nn.Linear):
        return ([-2] if name == "weight" else [-1]) if module.out_features == d else []
    if type(module).__name__ == "Conv1D":  # GPT-2's: weight [in, d]
        return [-1] if p.shape[-1] == d else []
    return [a for a in (-2, -1) if p.ndim >= -a and p.shape[a] == d and not (p.ndim == 1 and a == -2)]


def _remove(p, r, axis: int) -> None:
    if axis == -1:
        p.sub_((p @ r).unsqueeze(-1) * r)
    else:
        p.sub_(r.unsqueeze(-1) * (r @ p).unsqueeze(-2))


@contextlib.contextmanager
def _edited(model, groups: list[Group], r) -> Iterator[None]:
    params = dict(model.named_parameters(remove_duplicate=False))
    saved = {n: params[n].detach().clone() for g in groups for n in g.params}
    try:
        for g in groups:
            for n in g.params:
                _remove(params[n].data, r, g.axis)
        yield
    finally:
        for n, value in saved.items():
            params[n].data.copy_(value)


def _layer_outputs(model, layers, ids, extra: Iterator | None = None) -> list:
    import torch

    outputs: list = []
    hooks = [layer.register_forward_hook(lambda _m, _i, o: outputs.append(_first(o).detach().clone()))
             for layer in layers]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return outputs


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _edited_outputs(model, layers, groups: list[Group], r, ids) -> list:
    with _edited(model, groups, r):
        return _layer_outputs(model, layers, ids)


def _project(r):
    return lambda x: x - (x @ r).unsqueeze(-1) * r


def _replace(output, fn):
    return (fn(output[0]), *output[1:]) if isinstance(output, tuple) else fn(output)


def _hook_modules(model, groups: list[Group], layers_path: str) -> dict[str, str]:
    """Module path pattern ({layer}) -> component: the modules whose outputs carry the kept writers' (a module below
    a list other than the layers', such as one expert of many, is represented by the module holding that list)."""
    import torch

    out: dict[str, str] = {}
    for g in groups:
        path = g.pattern.rpartition(".")[0]
        if "{layer}" not in path:
            out[path] = g.component
            continue
        head, _, tail = path.partition("{layer}")
        index = g.params[0][len(head):].partition(".")[0]  # a layer that has this writer
        parts = tail.split(".")
        while any(t.isdigit() for t in parts):
            parts = parts[: next(i for i, t in enumerate(parts) if t.isdigit())]
        while parts and isinstance(model.get_submodule((head + index + ".".join(parts)).rstrip(".")),
                                   torch.nn.ModuleList):
            parts = parts[:-1]
        out[(head + "{layer}" + ".".join(parts)).rstrip(".")] = g.component
    return {p: c for p, c in out.items() if not any(p.startswith(q + ".") for q in out)}


def _hooked_outputs(model, layers, hooks: dict[str, str], r, ids) -> list:
    proj = _project(r)
    handles = []
    try:
        for path in hooks:
            for i in (range(len(layers)) if "{layer}" in path else [None]):
                try:  # hybrid stacks: not every layer has every writer
                    target = model.get_submodule(path.replace("{layer}", str(i)))
                except AttributeError:
                    continue
                handles.append(target.register_forward_hook(lambda _m, _i, o: _replace(o, proj)))
        return _layer_outputs(model, layers, ids)
    finally:
        for h in handles:
            h.remove()


def _free_of(outputs: list, r) -> bool:
    return all((h @ r).abs().max() <= TOLERANCE * h.abs().max() for h in outputs)


def _close(a: list, b: list) -> bool:
    return len(a) == len(b) and all((x - y).abs().max() <= TOLERANCE * y.abs().max() for x, y in zip(a, b, strict=True))
