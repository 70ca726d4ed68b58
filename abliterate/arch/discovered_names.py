"""On-disk names of the residual writers discovery found in memory: the tiny model is saved as transformers writes a
checkpoint of its type (its conversion mapping reversed), and each writer parameter (or each expert's slice of a
fused one) is found there by its values, which are random and so unique. The names of layers and experts become
`{layer}` and `{n}` by where the layer and expert indices stand in them.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from pathlib import Path
from typing import Any

from abliterate.arch.writers import Writer
from abliterate.errors import AbliterateError

_LAYER = r"(?P<layer>\d+)"


def disk_writers(model: Any, groups: list) -> tuple[tuple[Writer, ...], list[str], tuple, str]:
    """(writers matching the disk and in-memory names, the disk names for the report with {layer}/{n}, the
    checkpoint prefixes where disk and memory names differ, the output embedding's disk name)."""
    saved = _saved_tensors(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    writers: list[Writer] = []
    names: list[str] = []
    prefixes: dict[str, str] = {}
    for g in groups:
        layer_re = re.compile(re.escape(g.pattern).replace(r"\{layer\}", _LAYER))
        found = []
        for param in g.params:
            m = layer_re.fullmatch(param)
            layer = m.groupdict().get("layer") if m else None
            for disk, expert in _disk_names(saved, params[param], param):
                found.append((disk, layer, expert))
                if expert is None and disk != param:
                    _add_prefix(prefixes, param, disk)
        pattern, shown = _pattern(found, g.pattern)
        writers.append(Writer(pattern, g.component, g.axis))
        memory = re.escape(g.pattern).replace(r"\{layer\}", _LAYER)
        if memory != pattern and all(n.endswith(("weight", "bias")) for n in g.params):
            writers.append(Writer(memory, g.component, g.axis))
        names.append(shown)
    return tuple(writers), names, tuple((m, (d,)) for m, d in prefixes.items()), _output_embedding(model, saved)


def _saved_tensors(model: Any) -> dict[tuple, list[str]]:
    """(shape, digest of the values) -> names, as save_pretrained writes the model."""
    from safetensors import safe_open

    out: dict[tuple, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        for shard in sorted(Path(tmp).glob("*.safetensors")):
            with safe_open(str(shard), "pt") as f:
                for name in f.keys():
                    out.setdefault(_key(f.get_tensor(name)), []).append(name)
    return out


def _key(tensor: Any) -> tuple:
    values = tensor.detach().contiguous().cpu()
    return tuple(values.shape), hashlib.sha256(values.numpy().tobytes()).hexdigest()


def _disk_names(saved: dict, tensor: Any, name: str) -> list[tuple[str, int | None]]:
    """[(disk name, expert index or None)] holding `tensor`: itself, or one tensor per expert of a fused one."""
    whole = saved.get(_key(tensor))
    if whole:
        return [(whole[0], None)]
    if tensor.ndim == 3:
        parts = [saved.get(_key(tensor[e])) for e in range(tensor.shape[0])]
        if all(parts):
            return [(p[0], e) for e, p in enumerate(parts)]  # type: ignore[index]
    raise AbliterateError(f"{name} is stored under no name found in the saved tiny checkpoint (its disk layout is "
                          "converted, not renamed)")


def _pattern(found: list[tuple[str, str | None, int | None]], memory: str) -> tuple[str, str]:
    """(full-match regex, readable name) of one writer's disk names: the layer's and expert's positions as groups."""
    tokens = [name.split(".") for name, _, _ in found]
    if len({len(t) for t in tokens}) != 1:
        raise AbliterateError(f"{memory}: its tensors are named with differing depths on disk")
    width = len(tokens[0])
    layer_at = _position(tokens, [layer for _, layer, _ in found], ())
    expert_at = _position(tokens, [None if e is None else str(e) for _, _, e in found], (layer_at,))
    regex, shown = [], []
    for i in range(width):
        if i == layer_at:
            regex.append(_LAYER)
            shown.append("{layer}")
        elif i == expert_at:
            regex.append(r"\d+")
            shown.append("{n}")
        elif len({t[i] for t in tokens}) == 1:
            regex.append(re.escape(tokens[0][i]))
            shown.append(tokens[0][i])
        else:
            raise AbliterateError(f"{memory}: its disk names vary in a part that is neither the layer nor the expert")
    return r"\.".join(regex), ".".join(shown)


def _position(tokens: list[list[str]], values: list[str | None], taken: tuple) -> int | None:
    """The first position holding `values` (one per name) in every name, None when there are none to place."""
    if any(v is None for v in values):
        return None
    for i in range(len(tokens[0])):
        if i not in taken and all(t[i] == v for t, v in zip(tokens, values, strict=True)):
            return i
    raise AbliterateError("the layer or expert index does not appear in the disk names of a writer")


def _add_prefix(prefixes: dict[str, str], memory: str, disk: str) -> None:
    """Record (memory prefix -> disk prefix) from one pair of names sharing everything after their prefixes."""
    m, d = memory.split("."), disk.split(".")
    common = 0
    while common < min(len(m), len(d)) and m[-1 - common] == d[-1 - common]:
        common += 1
    mp, dp = ".".join(m[: len(m) - common]), ".".join(d[: len(d) - common])
    if mp and dp and common >= 2 and not any(t.isdigit() for t in (*m[: len(m) - common], *d[: len(d) - common])):
        prefixes.setdefault(mp + ".", dp + ".")


def _output_embedding(model: Any, saved: dict) -> str:
    """The disk name of an untied output embedding; for a tied one its in-memory name (written when untying)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(out, "weight", None)
    if weight is None:
        return "lm_head.weight"
    if weight is model.get_input_embeddings().weight:
        return next(f"{n}.weight" for n, m in model.named_modules() if m is out)
    names = saved.get(_key(weight))
    return names[0] if names else "lm_head.weight"
