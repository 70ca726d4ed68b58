"""Merge a LoRA adapter into a checkpoint, tensor by tensor, with the streaming writer `apply` uses.

Any peft LoRA adapter (any rank, rank/alpha patterns, rsLoRA, lora_bias, saved biases) is merged the way peft
computes it: W + scaling B A for a layer's weight [out, in], its transpose for ``fan_in_fan_out`` (Conv1D) and
embeddings, per expert for ``target_parameters`` on fused experts, which are mapped back to the on-disk tensors
they are loaded from (one tensor per expert and projection for Mixtral or Qwen MoE). Deltas are computed in
float32 in cache-sized blocks and rounded once into the stored dtype; everything else is copied byte for byte.
A rank-1 abliterate adapter gives exactly the bytes `apply` writes with the same --max-memory.

Refused, with the reason: other peft types, LoRA variants (DoRA, aLoRA, ...), modules_to_save, layer
replication, entries that name no tensor of the checkpoint, and shapes that do not fit.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from abliterate.arch.table import arch_for_config
from abliterate.edit.plan import TIE_KEY, EditOptions, EditPlan, TensorEdit, plan_tied_embeddings
from abliterate.edit.projection import (
    BLOCK_ELEMENTS,
    STORAGE,
    compute_dtype,
    narrow_into,
    plan_chunks,
    read_stored,
    widen,
)
from abliterate.edit.shard_writer import Target as StreamTarget
from abliterate.edit.shard_writer import copy_other_files, output_size, write_config, write_index, write_shards
from abliterate.edit.weights import DEFAULT_MAX_MEMORY, DIRECTION_NAME, MANIFEST_NAME
from abliterate.errors import AbliterateError
from abliterate.io.checkpoint import PICKLE_SUFFIXES, Checkpoint
from abliterate.io.safetensors_format import (
    FLOAT_DTYPES,
    ShardHeader,
    TensorInfo,
    atomic_folder,
    pread_into,
    read_header,
)
from abliterate.lora.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPERT_LAYOUTS, PEFT_PREFIX, ExpertParam

# LoraConfig fields that make the adapter something other than W + scaling B A (peft 0.21's LoRA variants).
VARIANT_FIELDS = ("use_dora", "velora_config", "alora_invocation_tokens", "monteclora_config", "use_bdlora",
                  "arrow_config", "kasa_config", "use_qalora", "layer_replication", "trainable_token_indices")
_LORA_KEY = re.compile(r"(?P<module>.+?)(?P<nest>(?:\.base_layer)*)\.(?P<what>lora_A\.weight|lora_B\.weight|"
                       r"lora_B\.bias|lora_embedding_A|lora_embedding_B)")
_SAVED_KEY = re.compile(r"(?P<module>.+?)(?:\.base_layer)*\.(?P<param>weight|bias)")
_MODULE_RENAMES = {"mixtral": ((".mlp.", ".block_sparse_moe."),), "phimoe": ((".mlp.", ".block_sparse_moe."),),
                   "minimax": ((".mlp.", ".block_sparse_moe."),)}


@dataclass(frozen=True)
class MergeResult:
    out: Path
    merged: int  # checkpoint tensors written from the adapter
    adapter_entries: int
    notes: tuple[str, ...]


@dataclass(frozen=True)
class _LoraSettings:
    """What merging needs from adapter_config.json."""

    r: int
    alpha: float
    rslora: bool
    fan_in_fan_out: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_parameters: tuple[str, ...]

    def scaling(self, key: str) -> tuple[int, float]:
        """(rank, scaling) of a module or parameter, with peft's pattern matching (first pattern that matches)."""
        r = next((v for k, v in self.rank_pattern.items() if re.match(rf"(.*\.)?({k})$", key)), self.r)
        alpha = next((v for k, v in self.alpha_pattern.items() if re.match(rf"(.*\.)?({k})$", key)), self.alpha)
        return r, alpha / (math.sqrt(r) if self.rslora else r)


@dataclass(frozen=True)
class _Piece:
    """Rows [start, stop) of a checkpoint tensor viewed as [rows, last dim] gain U @ V (U: [rows, k], V: [k, cols]).

    `factors` loads (U, V) on demand, so only the tensor being merged has its factors in memory.
    """

    start: int
    stop: int
    factors: Callable[[], tuple[np.ndarray, np.ndarray]]


@dataclass
class _Target:
    """What becomes of one checkpoint tensor: an optional replacement from the adapter, plus deltas."""

    name: str
    replacement: TensorInfo | None = None
    pieces: list[_Piece] = field(default_factory=list)
    embedding: bool = False


class AdapterFile:
    """adapter_model.safetensors, read tensor by tensor (bfloat16 included) into float32 or float64."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header: ShardHeader = read_header(path)
        self.infos = self.header.by_name()
        self.fd = os.open(path, os.O_RDONLY)
        # the factors of a fused parameter serve every expert's tensor: keep the last few
        self.load = functools.lru_cache(maxsize=4)(self._load)

    def close(self) -> None:
        os.close(self.fd)

    def _load(self, key: str) -> np.ndarray:
        info = self.infos[key]
        raw = np.empty(info.nbytes, np.uint8)
        pread_into(self.fd, memoryview(raw), info.start)
        values = widen(raw.view(STORAGE[info.dtype]).reshape(info.shape), info.dtype)
        return values.astype(compute_dtype(info.dtype), copy=False)


def merge_adapter(ckpt: Checkpoint, adapter_dir: Path, out: Path, *, overwrite: bool = False,
                  max_memory: int = DEFAULT_MAX_MEMORY, quiet: bool = False) -> MergeResult:
    """Write `ckpt` with `adapter_dir` merged into `out`, atomically; the inputs are only ever read."""
    if Path(out).absolute() in (ckpt.root.absolute(), Path(adapter_dir).absolute()):
        raise AbliterateError("--out is an input folder; abliterate never modifies its inputs: choose another --out")
    settings = read_lora_config(Path(adapter_dir))
    weights = AdapterFile(_weights_path(Path(adapter_dir)))
    try:
        targets = place_entries(ckpt, settings, weights)
        plan = _merge_plan(ckpt, targets)
        with atomic_folder(Path(out), overwrite=overwrite) as tmp:
            _write_checkpoint(ckpt, plan, targets, weights, tmp, max_memory, quiet)
            notes = _pass_on_manifest(ckpt, Path(adapter_dir), tmp)
    finally:
        weights.close()
    return MergeResult(Path(out), len(targets), len(weights.infos), (*plan.notes, *notes))


# ---------------------------------------------------------------- reading the adapter


def read_lora_config(adapter_dir: Path) -> _LoraSettings:
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise AbliterateError(f"{adapter_dir} has no {ADAPTER_CONFIG}; pass a peft adapter folder")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AbliterateError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AbliterateError(f"{path} is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise AbliterateError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA; only LoRA adapters merge "
                              "into weights this way (use peft's merge_and_unload for other methods)")
    variants = [k for k in VARIANT_FIELDS if config.get(k)]
    if config.get("init_lora_weights") == "mica":
        variants.append("init_lora_weights=mica")
    if variants:
        raise AbliterateError(f"{path}: {', '.join(variants)} set: this LoRA variant is not W + scaling B A, which is "
                              "all `abliterate merge` computes; merge it with peft (merge_and_unload)")
    if config.get("modules_to_save"):
        raise AbliterateError(f"{path}: modules_to_save {config['modules_to_save']} replaces whole modules; "
                              "`abliterate merge` does not merge those: use peft's merge_and_unload")
    try:
        return _LoraSettings(int(config["r"]), float(config.get("lora_alpha", 8)),  # peft's default alpha
                             bool(config.get("use_rslora")), bool(config.get("fan_in_fan_out")),
                             dict(config.get("rank_pattern") or {}), dict(config.get("alpha_pattern") or {}),
                             tuple(config.get("target_parameters") or ()))
    except (KeyError, TypeError, ValueError) as e:
        raise AbliterateError(f"{path}: invalid LoRA settings ({e}); re-save the adapter with peft") from None


def _weights_path(adapter_dir: Path) -> Path:
    path = adapter_dir / ADAPTER_WEIGHTS
    if path.is_file():
        return path
    pickles = sorted(p.name for p in adapter_dir.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise AbliterateError(f"{adapter_dir} holds only pickle weights ({', '.join(pickles)}); abliterate never "
                              "loads pickles: re-save the adapter with safe_serialization (safetensors)")
    raise AbliterateError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}; pass a peft adapter folder")


# ---------------------------------------------------------------- placing each entry on a checkpoint tensor


def place_entries(ckpt: Checkpoint, settings: _LoraSettings, weights: AdapterFile) -> dict[str, _Target]:
    """Checkpoint tensor -> what to do with it, for every entry of the adapter; refuses any entry it cannot place."""
    model_type = ckpt.text_config.get("model_type") or ckpt.config.get("model_type")
    targets: dict[str, _Target] = {}
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


def _target(targets: dict[str, _Target], name: str) -> _Target:
    return targets.setdefault(name, _Target(name))


def _disk_name(ckpt: Checkpoint, model_type: str | None, module: str, param: str) -> str | None:
    """The checkpoint tensor of an in-memory module's parameter (transformers renames a few on loading)."""
    candidates = [f"{module}.{param}"]
    for memory, disk in _MODULE_RENAMES.get(model_type or "", ()):
        candidates.append(f"{module}.{param}".replace(memory, disk))
    try:
        output = arch_for_config(ckpt.config).output_embedding
    except AbliterateError:
        output = None
    if module == "lm_head" and output:
        candidates.append(output.removesuffix(".weight") + f".{param}")
    return next((c for c in candidates if c in ckpt.tensors), None)


def _place_saved(ckpt: Checkpoint, model_type: str | None, module: str, param: str, key: str,
                 weights: AdapterFile, targets: dict[str, _Target]) -> None:
    """A saved bias or weight (peft's bias="lora_only"/"all", save_embedding_layers) replaces the stored one."""
    name = _disk_name(ckpt, model_type, module, param)
    info = weights.infos[key]
    if name is None:
        raise _not_found(ckpt, module, f"{weights.path}: saved {key} cannot be placed:", f"{module}.{param}")
    if ckpt.tensors[name][1].shape != info.shape:
        raise AbliterateError(f"{weights.path}: saved {key} {list(info.shape)} cannot be placed: {name} has shape "
                              f"{list(ckpt.tensors[name][1].shape)} in {ckpt.root}; is the adapter for another model?")
    _target(targets, name).replacement = info


def _place_pair(ckpt: Checkpoint, model_type: str | None, settings: _LoraSettings, module: str, depth: int,
                keys: dict[str, str], weights: AdapterFile, targets: dict[str, _Target]) -> None:
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
        scaling = settings.scaling(module)[1]
        load = lambda k=keys["lora_B.bias"], s=scaling: (np.ones((1, 1)), weights.load(k)[None, :] * s)  # noqa: E731
        _target(targets, bias).pieces.append(_Piece(0, 1, load))


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


def _place_layer(ckpt: Checkpoint, settings: _LoraSettings, name: str, a_key: str, b_key: str, scaling: float,
                 embedding: bool, where: str, weights: AdapterFile, targets: dict[str, _Target]) -> None:
    """A layer's weight: [out, in] gains s B A; Conv1D ([in, out], fan_in_fan_out) and embeddings its transpose."""
    shape = ckpt.tensors[name][1].shape
    n_in, n_out = weights.infos[a_key].shape[1], weights.infos[b_key].shape[0]
    straight, turned = (n_out, n_in), (n_in, n_out)
    if len(shape) != 2 or shape not in (straight, turned):
        raise AbliterateError(f"{where}: LoRA of shape [{n_out}, {n_in}] does not fit {name} {list(shape)}; is the "
                              "adapter for another model?")
    transpose = embedding or (shape == turned and (shape != straight or settings.fan_in_fan_out))
    if transpose:
        load = lambda: (weights.load(a_key).T, weights.load(b_key).T * scaling)  # noqa: E731
    else:
        load = lambda: (weights.load(b_key) * scaling, weights.load(a_key))  # noqa: E731
    target = _target(targets, name)
    target.pieces.append(_Piece(0, shape[0], load))
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


def _place_parameter(ckpt: Checkpoint, model_type: str | None, settings: _LoraSettings, module: str, depth: int,
                     a_key: str, b_key: str, where: str, weights: AdapterFile, targets: dict[str, _Target]) -> None:
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
            _target(targets, name).pieces.append(_Piece(start, start + rows, load))
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


def _targeted_params(ckpt: Checkpoint, model_type: str | None, settings: _LoraSettings,
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
    layouts = EXPERT_LAYOUTS.get(model_type or "", ())
    for order, layout in enumerate(layouts):
        m = layout.memory_regex().fullmatch(key)
        if m is None:
            continue
        per_expert = "{e}" in layout.disk[0]
        names = [[d.format(p=m["p"], e=e) for d in layout.disk] for e in range(_count_experts(ckpt, layout, m["p"]))] \
            if per_expert else [[d.format(p=m["p"]) for d in layout.disk]]
        if not names or not all(n in ckpt.tensors for group in names for n in group):
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


def _count_experts(ckpt: Checkpoint, layout: ExpertParam, prefix: str) -> int:
    e = 0
    while layout.disk[0].format(p=prefix, e=e) in ckpt.tensors:
        e += 1
    return e


# ---------------------------------------------------------------- writing


def _merge_plan(ckpt: Checkpoint, targets: dict[str, _Target]) -> EditPlan:
    """The layout `apply` would write for these tensors, untying embeddings exactly as `apply` does."""
    try:
        arch = arch_for_config(ckpt.config)
    except AbliterateError:
        arch = None
    edits = {}
    for name, target in targets.items():
        shard, info = ckpt.tensors[name]
        component = "embed" if target.embedding else "merge"
        edits[name] = TensorEdit(name, shard, info, component, None, -1, 1.0)
    if arch is None:
        tied = ckpt.text_config.get(TIE_KEY, ckpt.config.get(TIE_KEY))
        if tied and any(t.embedding for t in targets.values()):
            raise AbliterateError(f"{ckpt.root} ties its input and output embeddings and abliterate does not know this "
                                  "family's output layer, so it cannot keep the output layer as peft does; add the "
                                  "family to abliterate/archs.py")
        return EditPlan(None, edits, None, {}, ())
    untie, config_updates, notes = plan_tied_embeddings(ckpt, arch, edits, EditOptions())
    return EditPlan(arch, edits, untie, config_updates, tuple(notes))


def _write_checkpoint(ckpt: Checkpoint, plan: EditPlan, targets: dict[str, _Target], weights: AdapterFile,
                      tmp: Path, max_memory: int, quiet: bool) -> None:
    """Shards as `apply` writes them (same layout, same streaming), then index, config, other files."""
    with tqdm(total=output_size(ckpt, plan), unit="B", unit_scale=True, desc="merging", disable=quiet,
              file=sys.stderr) as bar:
        write_shards(ckpt, plan, tmp, lambda out: _merge_tensor(out, targets[out.edit.name], weights),
                     max_memory=max_memory, progress=bar.update)
    write_index(ckpt, plan, tmp)
    write_config(ckpt, plan, tmp)
    copy_other_files(ckpt, tmp)


def _merge_tensor(out: StreamTarget, target: _Target, weights: AdapterFile) -> None:
    """Stream one tensor: rows of [rows, last dim] within the budget, each block widened, added to, rounded back.

    A saved replacement (a bias carried by the adapter) is read from the adapter file instead of the base."""
    src_fd, src_info = (weights.fd, target.replacement) if target.replacement else (out.src_fd, out.edit.info)
    out_info = out.edit.info
    pieces = [(p.start, p.stop, *p.factors()) for p in target.pieces]
    if not all(np.isfinite(u).all() and np.isfinite(v).all() for _, _, u, v in pieces):
        raise AbliterateError(f"the adapter's factors for {out.edit.name} hold NaN or inf; the adapter is broken")
    cols = out_info.shape[-1] if out_info.shape else 1
    dtype = np.float64 if "F64" in (src_info.dtype, out_info.dtype) else np.float32
    for chunk in plan_chunks(out_info, -1, cols, out.budget):
        scratch = out.buffers.take()
        stored = read_stored(src_fd, src_info, chunk, scratch)
        if src_info.dtype == out_info.dtype and out_info.dtype in ("F32", "F64"):
            result = stored  # edited in place, as `apply` does
        else:
            result = scratch.take(1, chunk.count * out_info.itemsize).view(STORAGE[out_info.dtype]).reshape(
                chunk.shape)
        first = chunk.first // cols
        step = max(1, BLOCK_ELEMENTS // cols)
        for i in range(0, chunk.shape[0], step):
            rows = (first + i, first + min(i + step, chunk.shape[0]))
            w = widen(stored[i : i + step], src_info.dtype).astype(dtype, copy=False)
            _add_delta(w, rows, pieces)
            narrow_into(result[i : i + step], w, out_info.dtype)
        out.write(memoryview(result.reshape(-1).view(np.uint8)), chunk.first * out_info.itemsize, scratch)


def _add_delta(w: np.ndarray, rows: tuple[int, int], pieces: list) -> None:
    """w (rows [r0, r1) of the tensor) += U[rows] @ V for each piece overlapping them; rank 1 as exact products."""
    r0, r1 = rows
    for start, stop, u, v in pieces:
        lo, hi = max(r0, start), min(r1, stop)
        if lo >= hi:
            continue
        uu = u[lo - start : hi - start].astype(w.dtype, copy=False)
        vv = v.astype(w.dtype, copy=False)
        delta = np.multiply.outer(uu[:, 0], vv[0]) if uu.shape[1] == 1 else uu @ vv
        w[lo - r0 : hi - r0] += delta.reshape(hi - lo, -1)


def _pass_on_manifest(ckpt: Checkpoint, adapter_dir: Path, tmp: Path) -> list[str]:
    """An abliterate adapter's manifest (and direction) go with the merged model, so `verify` checks it."""
    manifest_path = adapter_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        return []
    manifest = json.loads(manifest_path.read_text())
    notes = ["abliterate adapter: its manifest was passed on; `abliterate verify` checks the merged model"]
    if Path(manifest.get("source", "")).absolute() != ckpt.root.absolute():
        notes.append(f"the adapter was made from {manifest.get('source')}, not {ckpt.root}: `verify` will report "
                     "the difference")
    manifest.update(source=str(ckpt.root), merged_adapter=str(adapter_dir.absolute()))
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    if (adapter_dir / DIRECTION_NAME).is_file():
        shutil.copyfile(adapter_dir / DIRECTION_NAME, tmp / DIRECTION_NAME)
    return notes
