"""Placing each entry of a LoRA adapter on the checkpoint tensor it changes, or refusing it with the reason.

peft names in-memory modules and parameters; the checkpoint stores on-disk tensors. Layers map one to one
(a few renamed by transformers on loading), fused expert parameters (target_parameters) map back to the
tensors they are loaded from via the expert table, saved biases and weights replace the stored ones.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from abliterate.arch.table import arch_for_config
from abliterate.arch.writers import ExpertParam
from abliterate.errors import AbliterateError
from abliterate.io.checkpoint import Checkpoint
from abliterate.io.safetensors_format import FLOAT_DTYPES, TensorInfo
from abliterate.lora.adapter_file import AdapterFile, LoraSettings
from abliterate.lora.experts import expert_layout, experts_model_type
from abliterate.lora.peft_format import ADAPTER_CONFIG, PEFT_PREFIX

_LORA_KEY = re.compile(r"(?P<module>.+?)(?P<nest>(?:\.base_layer)*)\.(?P<what>lora_A\.weight|lora_B\.weight|"
                       r"lora_B\.bias|lora_embedding_A|lora_embedding_B)")
_SAVED_KEY = re.compile(r"(?P<module>.+?)(?:\.base_layer)*\.(?P<param>weight|bias)")


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of a checkpoint tensor viewed as [rows, last dim] gain U @ V (U: [rows, k], V: [k, cols]).

    `factors` loads (U, V) on demand, so only the tensor being merged has its factors in memory.
    """

    start: int
    stop: int
    factors: Callable[[], tuple[np.ndarray, np.ndarray]]


@dataclass
class MergeTarget:
    """What becomes of one checkpoint tensor: an optional replacement from the adapter, plus deltas."""

    name: str
    replacement: TensorInfo | None = None
    pieces: list[Piece] = field(default_factory=list)
    embedding: bool = False


def place_entries(ckpt: Checkpoint, settings: LoraSettings, weights: AdapterFile) -> dict[str, MergeTarget]:
    """Checkpoint tensor -> what to do with it, for every entry of the adapter; refuses any entry it cannot place."""
    model_type = experts_model_type(ckpt)
    targets: dict[str, MergeTarget] = {}
    pairs: dict[tuple[str, str], dict[str, str]] = {}
    for key in weights.infos:
        name = key.removeprefix(PEFT_PREFIX)
        if weights.infos[key].dtype not in FLOAT_DTYPES:
            raise AbliterateError(f"{weights.path}: {key} has dtype {weights.infos[key].dtype}; only float32, "
                                  "float16, bfloat16 and float64 adapters merge")
        if "lora_magnitude_vector" in name:
            raise AbliterateError(f"{weights.path}: {key} is a DoRA magnitude; DoRA adapters are not W + scaling B A: "
                                  "merge them with peft")
        m = _LORA_KEY.fullmatch(name)
        if m:
            pairs.setdefault((m["module"], m["nest"]), {})[m["what"]] = key
            continue
        saved = _SAVED_KEY.fullmatch(name)
        if saved is None:
            raise AbliterateError(f"{weights.path}: entry {key} is neither a LoRA factor nor a saved weight or bias; "
                                  "`abliterate merge` cannot place it")
        _place_saved(ckpt, model_type, saved["module"], saved["param"], key, weights, targets)
    for (module, nest), keys in pairs.items():
        _place_pair(ckpt, model_type, settings, module, nest.count(".base_layer"), keys, weights, targets)
    return targets


def _target(targets: dict[str, MergeTarget], name: str) -> MergeTarget:
    return targets.setdefault(name, MergeTarget(name))


def _disk_name(ckpt: Checkpoint, model_type: str | None, module: str, param: str) -> str | None:
    """The checkpoint tensor of an in-memory module's parameter (transformers renames a few on loading)."""
    candidates = [f"{module}.{param}"]
    try:
        arch = arch_for_config(ckpt.config)
    except AbliterateError:
        arch = None
    for memory, disk in arch.module_renames if arch else ():
        candidates.append(f"{module}.{param}".replace(memory, disk))
    candidates += arch.disk_names(f"{module}.{param}")[1:] if arch else []
    if arch is not None:
        candidates.append(arch.renamed_on_disk(f"{module}.{param}"))
    output = arch.output_embedding if arch else None
    if module == "lm_head" and output:
        candidates.append(output.removesuffix(".weight") + f".{param}")
    return next((c for c in candidates if c in ckpt.tensors), None)


def _place_saved(ckpt: Checkpoint, model_type: str | None, module: str, param: str, key: str,
                 weights: AdapterFile, targets: dict[str, MergeTarget]) -> None:
    """A saved bias or weight (peft's bias="lora_only"/"all", save_embedding_layers) replaces the stored one."""
    name = _disk_name(ckpt, model_type, module, param)
    info = weights.infos[key]
    if name is None:
        raise _not_found(ckpt, module, f"{weights.path}: saved {key} cannot be placed:", f"{module}.{param}")
    if ckpt.tensors[name][1].shape != info.shape:
        raise AbliterateError(f"{weights.path}: saved {key} {list(info.shape)} cannot be placed: {name} has shape "
                              f"{list(ckpt.tensors[name][1].shape)} in {ckpt.root}; is the adapter for another model?")
    _target(targets, name).replacement = info


def _place_pair(ckpt: Checkpoint, model_type: str | None, settings: LoraSettings, module: str, depth: int,
                keys: dict[str, str], weights: AdapterFile, targets: dict[str, MergeTarget]) -> None:
    where = f"{weights.path}: {module}"
    embedding = "lora_embedding_A" in keys
    a_key = keys.get("lora_embedding_A" if embedding else "lora_A.weight")
    b_key = keys.get("lora_embedding_B" if embedding else "lora_B.weight")
    if a_key is None or b_key is None:
        raise AbliterateError(f"{where} has only {', '.join(sorted(keys))} of its LoRA factors; the adapter is "
                              "incomplete")
    a_shape, b_shape = weights.infos[a_key].shape, weights.infos[b_key].shape
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
        raise AbliterateError(f"{where}: LoRA factors A {list(a_shape)} and B {list(b_shape)} do not fit together")
    name = _disk_name(ckpt, model_type, module, "weight") if depth == 0 else None
    if name is not None:
        weight = f"{module}.weight"
        as_param = any(weight == t or weight.endswith("." + t) for t in settings.target_parameters)
        rank, scaling = settings.scaling(weight if as_param else module)  # the key peft matches patterns on
        _check_rank(where, rank, a_shape[0])
        _place_layer(ckpt, settings, name, a_key, b_key, scaling, embedding, where, weights, targets)
    elif not embedding:
        _place_parameter(ckpt, model_type, settings, module, depth, a_key, b_key, where, weights, targets)
    else:
        raise _not_found(ckpt, module, where, f"{module}.weight")
    if "lora_B.bias" in keys:  # lora_bias=True: scaling * lora_B.bias is added to the layer's bias
        bias = _disk_name(ckpt, model_type, module, "bias")
        if bias is None:
            raise AbliterateError(f"{where} has lora_bias but the checkpoint has no {module}.bias to merge it into")
        load = functools.partial(_bias_factors, weights, keys["lora_B.bias"], settings.scaling(module)[1])
        _target(targets, bias).pieces.append(Piece(0, 1, load))


def _bias_factors(weights: AdapterFile, key: str, scaling: float) -> tuple[np.ndarray, np.ndarray]:
    """lora_B.bias as a rank-1 update of the layer's bias: ones [1, 1] times scaling * bias [1, out]."""
    return np.ones((1, 1)), weights.load(key)[None, :] * scaling


def _factors(weights: AdapterFile, a_key: str, b_key: str, scaling: float, transpose: bool
             ) -> tuple[np.ndarray, np.ndarray]:
    """The two factors whose product is the update in the tensor's own layout: (s B, A), or (A^T, s B^T) for
    Conv1D and embeddings."""
    if transpose:
        return weights.load(a_key).T, weights.load(b_key).T * scaling
    return weights.load(b_key) * scaling, weights.load(a_key)


def _not_found(ckpt: Checkpoint, module: str, where: str, what: str) -> AbliterateError:
    try:
        output = arch_for_config(ckpt.config).output_embedding
    except AbliterateError:
        output = "lm_head.weight"
    if module in ("lm_head", output.removesuffix(".weight")):
        return AbliterateError(f"{where}: the adapter changes the output layer, which {ckpt.root} ties to the input "
                               "embedding (it stores no separate tensor); merging it would change both: not supported")
    return AbliterateError(f"{where} {ckpt.root} has no {what}; is the adapter for another model?")


def _check_rank(where: str, rank: int, got: int) -> None:
    if rank != got:
        raise AbliterateError(f"{where}: LoRA rank {got} in the weights but {rank} in {ADAPTER_CONFIG}; the adapter "
                              "is inconsistent")


def _place_layer(ckpt: Checkpoint, settings: LoraSettings, name: str, a_key: str, b_key: str, scaling: float,
                 embedding: bool, where: str, weights: AdapterFile, targets: dict[str, MergeTarget]) -> None:
    """A layer's weight: [out, in] gains s B A; Conv1D ([in, out], fan_in_fan_out) and embeddings its transpose."""
    shape = ckpt.tensors[name][1].shape
    n_in, n_out = weights.infos[a_key].shape[1], weights.infos[b_key].shape[0]
    straight, turned = (n_out, n_in), (n_in, n_out)
    if len(shape) != 2 or shape not in (straight, turned):
        raise AbliterateError(f"{where}: LoRA of shape [{n_out}, {n_in}] does not fit {name} {list(shape)}; is the "
                              "adapter for another model?")
    transpose = embedding or (shape == turned and (shape != straight or settings.fan_in_fan_out))
    load = functools.partial(_factors, weights, a_key, b_key, scaling, transpose)
    target = _target(targets, name)
    target.pieces.append(Piece(0, shape[0], load))
    target.embedding = target.embedding or embedding


@dataclass(frozen=True)
class _Param:
    """An in-memory parameter that peft's target_parameters adapts, and the checkpoint tensors holding it."""

    memory: str
    layout: ExpertParam | None
    order: int
    experts: int
    n_in: int
    n_out: int
    disk: tuple[tuple[str, ...], ...]  # per expert: the tensors concatenated along the output axis


def _place_parameter(ckpt: Checkpoint, model_type: str | None, settings: LoraSettings, module: str, depth: int,
                     a_key: str, b_key: str, where: str, weights: AdapterFile, targets: dict[str, MergeTarget]) -> None:
    """target_parameters: [E, out, in] (or [E, in, out] when transposed) gains s B_e A_e per expert; [out, in] s B A."""
    params = _targeted_params(ckpt, model_type, settings, module)
    if not params:
        raise _not_found(ckpt, module, where, f"{module}.weight nor a targeted parameter of {module}")
    if len(params) > 1 and any(p.layout is None for p in params):
        raise AbliterateError(f"{where}: several parameters of this module are adapted and abliterate does not know "
                              "the order in which peft nests them; merge with peft")
    param = sorted(params, key=lambda p: p.order)[len(params) - 1 - depth] if depth < len(params) else None
    a_rows, n_in = weights.infos[a_key].shape
    n_out = weights.infos[b_key].shape[0]
    if param is None or (n_in, n_out) != (param.n_in, param.n_out) or a_rows % param.experts:
        raise AbliterateError(f"{where}: LoRA factors A {list(weights.infos[a_key].shape)}, B "
                              f"{list(weights.infos[b_key].shape)} do not fit the adapted parameter(s) "
                              f"{[p.memory for p in params]}; is the adapter for another model?")
    rank, scaling = settings.scaling(param.memory)
    _check_rank(where, rank, a_rows // param.experts)
    transposed = param.layout is not None and param.layout.transposed
    for e, names in enumerate(param.disk):
        offset = 0
        for name in names:
            info = ckpt.tensors[name][1]
            fused = param.experts > 1 and len(info.shape) == 3  # every expert in one tensor
            rows = (param.n_in if transposed else param.n_out) if fused else _rows(info)
            start = e * rows if fused else 0
            load = functools.partial(_expert_factors, weights, a_key, b_key, param.experts, e, scaling, transposed,
                                     offset, offset + (rows if not transposed else param.n_out))
            _target(targets, name).pieces.append(Piece(start, start + rows, load))
            offset += rows


def _rows(info: TensorInfo) -> int:
    return math.prod(info.shape[:-1]) if info.shape else 1


def _expert_factors(weights: AdapterFile, a_key: str, b_key: str, experts: int, e: int, scaling: float,
                    transposed: bool, out_start: int, out_stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(U, V) of expert e's delta as stored: s B_e[out rows] A_e, or (s B_e A_e)^T for [E, in, out] storage."""
    a = weights.load(a_key)
    b = weights.load(b_key)
    a_e = a.reshape(experts, -1, a.shape[-1])[e]  # peft: A rows are expert-major (expert, rank)
    b_e = b.reshape(b.shape[0], -1, experts)[:, :, e]  # peft: B columns are rank-major (rank, expert)
    if transposed:
        return a_e.T, (b_e * scaling).T
    return b_e[out_start:out_stop] * scaling, a_e


def _targeted_params(ckpt: Checkpoint, model_type: str | None, settings: LoraSettings,
                     module: str) -> list[_Param]:
    """The parameters of `module` matched by target_parameters (exact name or dotted suffix, as peft matches)."""
    leaves = {t.rsplit(".", 1)[-1] for t in settings.target_parameters}
    found = []
    for leaf in sorted(leaves):
        key = f"{module}.{leaf}"
        if not any(key == t or key.endswith("." + t) for t in settings.target_parameters):
            continue
        param = _resolve_param(ckpt, model_type, key)
        if param is not None:
            found.append(param)
    return found


def _resolve_param(ckpt: Checkpoint, model_type: str | None, key: str) -> _Param | None:
    layouts = expert_layout(model_type)
    for order, layout in enumerate(layouts):
        m = layout.memory_regex().fullmatch(key)
        if m is None:
            continue
        per_expert = "{e}" in layout.disk[0]
        for p in _disk_forms(ckpt, m["p"]):  # the layer's prefix as the checkpoint names it
            names = [[d.format(p=p, e=e) for d in layout.disk] for e in range(_count_experts(ckpt, layout, p))] \
                if per_expert else [[d.format(p=p) for d in layout.disk]]
            if names and all(n in ckpt.tensors for group in names for n in group):
                break
        else:
            return None
        first = ckpt.tensors[names[0][0]][1].shape
        if per_expert:  # [out_part, in] per expert and part
            n_out = sum(ckpt.tensors[n][1].shape[0] for n in names[0])
            return _Param(key, layout, order, len(names), first[1], n_out, tuple(map(tuple, names)))
        if len(first) == 3:  # [E, out, in] or, transposed, [E, in, out]
            n_in, n_out = (first[1], first[2]) if layout.transposed else (first[2], first[1])
            return _Param(key, layout, order, first[0], n_in, n_out, tuple((n,) for n in names[0]) * first[0])
        return _Param(key, layout, order, 1, first[1], first[0], (tuple(names[0]),))
    info = ckpt.tensors.get(key, (None, None))[1]
    if info is None or len(info.shape) != 2:  # a 3-D parameter needs its layout (is_transposed) from the table
        return None
    return _Param(key, None, 0, 1, info.shape[1], info.shape[0], ((key,),))


def _disk_forms(ckpt: Checkpoint, memory: str) -> list[str]:
    """Every on-disk form of an in-memory name (a vision-language checkpoint's older language-model prefixes; a layer
    prefix the family renames, Nemotron-H's model. stored as backbone.)."""
    try:
        arch = arch_for_config(ckpt.config)
    except AbliterateError:
        return [memory]
    return list(dict.fromkeys([*arch.disk_names(memory), arch.renamed_on_disk(memory + ".")[:-1]]))


def _count_experts(ckpt: Checkpoint, layout: ExpertParam, prefix: str) -> int:
    e = 0
    while layout.disk[0].format(p=prefix, e=e) in ckpt.tensors:
        e += 1
    return e
