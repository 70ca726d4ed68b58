"""Export an edit as a peft LoRA adapter that computes exactly what `apply` writes.

Every edit in an `EditPlan` is a rank-1 update, so it is a LoRA with r = lora_alpha = 1 (scaling 1) and
no dropout. With r the unit direction of the tensor's layer and s its scale, `coeff` = r^T W for
``[d, in]`` weights and W r for ``[.., d]`` ones (the same numbers `apply` subtracts):

* ``nn.Linear`` W [d, in]:       W + B A,     B = -r [d, 1],  A = s coeff [1, in]
* GPT-2 ``Conv1D`` W [in, d]:    W + (B A)^T, same factors; peft's ``fan_in_fan_out``
* embedding E [vocab, d]:        E + (B A)^T, same factors as ``lora_embedding_B`` / ``lora_embedding_A``
* experts (transformers 5 holds every MoE's experts as one [E, d, in] or [E, in, d] parameter, whatever the
  disk layout): peft's ``target_parameters`` (``ParamWrapper``), one rank-1 pair per expert: A [E, in], B [d, E]
* gpt-oss's expert biases [E, d]: a 2-D parameter of its own, B = -s coeff [E, 1], A = r [1, d]
* biases of Linear / Conv1D layers: no LoRA factor changes a bias, but peft's ``bias="lora_only"`` stores the
  bias of each adapted layer in the adapter and loads it into that layer: the adapter carries the edited bias.

Several directions (a rank-k direction file): the same with Q [k, d] (orthonormal rows) for r, so r = lora_alpha = k
(scaling 1), B = -Q^T [d, k] and A = s Q W [k, in] (for [.., d] tensors A = s (W Q^T)^T); experts get k rows each
(peft: A rows expert-major, B columns rank-major); gpt-oss's expert biases A = Q, B = -s (b Q^T) [E, k].

Coefficients are computed with the chunks and blocks `apply` uses, so merging the adapter with the same
--max-memory reproduces `apply`'s tensors byte for byte. Each target tensor is read once, chunk by chunk; only
the factors are kept (a few MB for a 7B model). No torch: peft is needed only to load the result.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from abliterate.edit.plan import EditPlan, TensorEdit
from abliterate.edit.projection import (
    BLOCK_ELEMENTS,
    NonFiniteError,
    Scratch,
    coefficients,
    compute_dtype,
    iter_edited_chunks,
    row_coefficients,
    widen,
)
from abliterate.edit.requantise import chunk_reader
from abliterate.edit.weights import DEFAULT_MAX_MEMORY, DIRECTION_NAME, keep_direction, write_manifest
from abliterate.errors import AbliterateError
from abliterate.io.checkpoint import Checkpoint
from abliterate.io.direction_file import Direction
from abliterate.io.safetensors_format import atomic_folder
from abliterate.lora.experts import (
    PEFT_RENAMED_LEAVES,
    check_peft_accepts,
    expert_layout,
    expert_param_for_disk,
    experts_model_type,
    looks_like_expert,
)
from abliterate.lora.peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    Bias,
    Factors,
    adapter_config,
    write_weights,
)
from abliterate.lora.preserve import WriterStats, add_scalers, input_factors, plan_scalers, writer_stats

# names other modules and tests import from here (their homes are experts.py and peft_format.py)
__all__ = ["AdapterOptions", "AdapterResult", "export_adapter", "stream_coefficients"]


@dataclass(frozen=True)
class AdapterResult:
    out: Path
    modules: int
    biases: int
    nbytes: int
    notes: tuple[str, ...]


@dataclass(frozen=True)
class AdapterOptions:
    """ignore_biases: leave biases unedited (a pure LoRA adapter); base_model: the Hub id written as the base."""

    ignore_biases: bool = False
    base_model: str | None = None
    max_memory: int = DEFAULT_MAX_MEMORY
    overwrite: bool = False
    quiet: bool = False


@dataclass
class _Export:
    factors: dict[str, Factors] = field(default_factory=dict)  # by target
    biases: dict[str, Bias] = field(default_factory=dict)  # by module
    edits: dict[str, TensorEdit] = field(default_factory=dict)  # what the adapter carries, for the manifest
    magnitudes: dict[str, np.ndarray] = field(default_factory=dict)  # norm-preserving: DoRA magnitude by module
    factors_d: dict[str, np.ndarray] = field(default_factory=dict)  # norm-preserving: D by writer weight
    unscaled: list[str] = field(default_factory=list)  # norm-preserving, --ignore-biases: modules whose bias kept D out


def export_adapter(ckpt: Checkpoint, plan: EditPlan, direction: Direction, out: Path,
                   options: AdapterOptions = AdapterOptions()) -> AdapterResult:
    """Write ADAPTER_CONFIG and ADAPTER_WEIGHTS (plus manifest and direction) to `out`, atomically."""
    if Path(out).absolute() == ckpt.root.absolute():
        raise AbliterateError("--out is the input folder; abliterate never modifies its input: choose another --out")
    _check_output_embedding_kept(ckpt, plan)
    model_type = experts_model_type(ckpt)
    edits = [e for e in plan.edits.values() if not (options.ignore_biases and _is_bias(e))]
    quantised = sorted({e.quant.format.method for e in edits if e.quant is not None})
    if quantised and plan.norm_preserve:
        raise AbliterateError(f"--norm-preserve --adapter is not supported on {'/'.join(quantised)} weights (the "
                              "magnitudes would come from quantised neighbours): drop --adapter to edit the weights, "
                              "or drop --norm-preserve")
    scalers = plan_scalers(ckpt, plan, edits) if plan.norm_preserve else {}
    memory = plan.arch.memory_name if plan.arch is not None else str
    experts = _expert_counts(ckpt, model_type, memory)
    targets = {e.name: _target_for(model_type, e, experts, memory) for e in edits}
    if plan.arch is not None and plan.arch.module_renames:  # peft adapts the names transformers gives on loading
        targets = {n: replace(t, target=plan.arch.renamed_in_memory(t.target)) for n, t in targets.items()}
    for e in edits:
        check_peft_accepts(model_type, e.name, targets[e.name].target.removesuffix(".weight"), e.component)
    _check_biases_have_their_layer(edits, targets)
    export = _Export()
    total = sum(e.info.nbytes for e in edits)
    with ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=total, unit="B", unit_scale=True, desc="adapter", disable=options.quiet,
                                       file=sys.stderr))
        fds = {}
        for shard in ckpt.shards:
            fds[shard] = os.open(ckpt.root / shard, os.O_RDONLY)
            stack.callback(os.close, fds[shard])
        ordered = sorted(edits, key=lambda e: (ckpt.shards.index(e.shard), e.info.start))
        budget = options.max_memory // 2  # `apply`'s chunk budget: the same chunks give the same sums
        # two tensors at a time (pread and numpy release the GIL); each is read once, in chunks of at most a
        # quarter of --max-memory (no edited copy is made), so two stay within half of it
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)))
        results = pool.map(lambda e: _read(fds[e.shard], e, targets[e.name], direction, budget,
                                           plan.norm_preserve), ordered)
        for edit, result in zip(ordered, results, strict=True):
            _record(export, edit, targets[edit.name], direction, result)
            bar.update(edit.info.nbytes)
        if scalers:
            export.unscaled = add_scalers(export.factors, export.magnitudes, export.biases, export.factors_d, ckpt,
                                          scalers, fds, budget, options.ignore_biases, direction.rank)
    _check_complete(export)
    notes = _notes(plan, export, options, any(_is_bias(e) for e in plan.edits.values()))
    if quantised:
        notes.append(f"the base model's {'/'.join(quantised)} weights were dequantised (value x block scale, as "
                     "transformers loads them) to compute the adapter: it is exact on the dequantised model")
    with atomic_folder(Path(out), overwrite=options.overwrite) as tmp:
        nbytes = write_weights(export.factors, export.biases, tmp / ADAPTER_WEIGHTS, export.magnitudes)
        config = adapter_config(ckpt, export.factors, export.biases, options.base_model, direction.rank,
                                dora=bool(export.magnitudes))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        keep_direction(direction, tmp / DIRECTION_NAME)
        write_manifest(ckpt, plan, direction, tmp, {"adapter": {"ignore_biases": options.ignore_biases,
                                                              "max_memory": options.max_memory}},
                       edits=export.edits, notes=notes)
    return AdapterResult(Path(out), len(export.factors), len(export.biases), nbytes, tuple(notes))


@dataclass(frozen=True)
class _Target:
    """Where one edited tensor lands in the adapter."""

    kind: str  # "linear", "conv1d", "embedding", "param", "expert_param", "bias_param", "bias"
    target: str  # peft module or parameter path; for "bias" the module whose bias is replaced
    expert: int | None = None  # per-expert tensor of a fused parameter
    experts: int = 1  # number of experts of the fused parameter
    order: int = 0


def _is_bias(edit: TensorEdit) -> bool:
    return edit.name.endswith((".bias", "_bias"))


def _expert_counts(ckpt: Checkpoint, model_type: str | None, memory: Callable[[str], str]) -> dict[str, int]:
    """In-memory fused parameter -> number of experts, for experts stored one tensor each on disk."""
    counts: dict[str, int] = {}
    for name in ckpt.tensors:
        found = expert_param_for_disk(model_type, memory(name))
        if found is not None and found[2] is not None:
            counts[found[1]] = max(counts.get(found[1], 0), found[2] + 1)
    return counts


def _target_for(model_type: str | None, edit: TensorEdit, experts: dict[str, int],
                memory: Callable[[str], str] = str) -> _Target:
    """Map an on-disk tensor to the peft module or parameter of the transformers 5 model that holds it (`memory`:
    the family's on-disk -> in-memory name, a vision-language checkpoint's language-model prefix; an FP8 / MXFP4
    tensor by its logical name)."""
    name, shape = memory(edit.quant.logical_name if edit.quant else edit.name), edit.info.shape
    found = expert_param_for_disk(model_type, name)
    if found is not None:
        param, memory, expert, _ = found
        order = expert_layout(model_type).index(param)
        if expert is not None:
            return _Target("expert_param", memory, expert=expert, experts=experts[memory], order=order)
        if len(shape) == 2:  # [E, d]: gpt-oss's expert biases, a 2-D parameter for peft
            return _Target("bias_param", memory, order=order)
        return _Target("expert_param", memory, experts=shape[0], order=order)
    if looks_like_expert(name) or len(shape) > 2:
        raise AbliterateError(
            f"cannot write {name} into an adapter: the family file of model_type {model_type!r} gives no in-memory "
            "layout of its experts that peft can adapt (peft targets in-memory names); write a checkpoint without "
            "--adapter, or leave the experts out with --components embed,attn"
        )
    if len(shape) == 1 and name.endswith(".bias"):
        return _Target("bias", name.removesuffix(".bias"))
    if len(shape) == 2 and name.endswith(".weight"):
        module = name.removesuffix(".weight")
        if edit.hidden_axis == -1:
            return _Target("embedding" if edit.component == "embed" else "conv1d", module)
        if expert_layout(model_type) and module.rsplit(".", 1)[-1] in PEFT_RENAMED_LEAVES:
            return _Target("param", name)
        return _Target("linear", module)
    raise AbliterateError(
        f"cannot write the edit of {name} (shape {list(shape)}) as a LoRA adapter: it is neither a layer's "
        "weight, an embedding, a bias nor a known expert tensor; write a checkpoint without --adapter"
    )


def _check_output_embedding_kept(ckpt: Checkpoint, plan: EditPlan) -> None:
    """peft's embedding LoRA leaves a tied lm_head as it was: the edit must do the same (untie, the default)."""
    embed = [e for e in plan.edits.values() if e.component == "embed" and "wpe" not in e.name]
    if not embed or plan.untie is not None:
        return
    flag = ckpt.tied_flag
    output = plan.arch.output_embedding if plan.arch is not None else None
    tied = bool(flag) if flag is not None else output is not None and output not in ckpt.tensors
    if tied:
        raise AbliterateError(
            f"{embed[0].name} is tied to the output layer and this edit changes both (--keep-tied or --targets), "
            "which an embedding LoRA cannot express (peft leaves lm_head alone): drop --keep-tied, or write a "
            "checkpoint without --adapter"
        )


def _check_biases_have_their_layer(edits: list[TensorEdit], targets: dict[str, _Target]) -> None:
    """peft stores a bias only for a layer it adapts (bias="lora_only"): the layer's weight must be edited too."""
    adapted = {t.target.removesuffix(".weight") for t in targets.values() if t.kind != "bias"}
    for edit in edits:
        target = targets[edit.name]
        if target.kind == "bias" and target.target not in adapted:
            raise AbliterateError(
                f"{edit.name} is edited but {target.target}.weight is not: peft carries a bias only for a layer it "
                "adapts; edit both (check --targets) or pass --ignore-biases"
            )


def _read(fd: int, edit: TensorEdit, target: _Target, direction: Direction, budget: int,
          preserve: bool = False) -> np.ndarray | bytes | WriterStats:
    """Read one target tensor once: s coeff, or for a bias its edited values as `apply` writes them; for a
    norm-preserving edit's writer also its column and edited row norms (`preserve.WriterStats`)."""
    try:
        if target.kind == "bias":
            return _edited_bytes(fd, edit, direction, budget, preserve)
        r = np.asarray(direction.for_layer(edit.layer), dtype=compute_dtype(edit.info.dtype))
        if preserve:
            return writer_stats(fd, edit, r, budget)
        return stream_coefficients(fd, edit, r, budget) * np.asarray(edit.scale, dtype=r.dtype)
    except NonFiniteError:
        raise AbliterateError(
            f"{edit.name} holds NaN or inf values; the checkpoint is corrupt: re-download it"
        ) from None


def _record(export: _Export, edit: TensorEdit, target: _Target, direction: Direction,
            result: np.ndarray | bytes | WriterStats) -> None:
    if isinstance(result, bytes):
        export.biases[target.target] = (edit.info.dtype, edit.info.shape, result)
    elif isinstance(result, WriterStats):
        r = np.asarray(direction.for_layer(edit.layer), dtype=result.coeff.dtype)
        _add_factors(export, edit, target, r, (result.coeff * np.asarray(edit.scale, result.coeff.dtype))[None])
        export.magnitudes[target.target] = result.row_norms
        export.factors_d[edit.name] = input_factors(result, edit.scale)
    else:
        r = np.asarray(direction.for_layer(edit.layer), dtype=result.dtype)
        _add_factors(export, edit, target, r, result)
    export.edits[edit.name] = edit


def _edited_bytes(fd: int, edit: TensorEdit, direction: Direction, budget: int, preserve: bool = False) -> bytes:
    """A bias as `apply` writes it, in its stored dtype."""
    r = direction.for_layer(edit.layer)
    chunks = iter_edited_chunks(fd, edit.info, r, edit.hidden_axis, edit.scale, budget, preserve=preserve)
    return b"".join(values.tobytes() for _, values, _ in chunks)


def stream_coefficients(fd: int, edit: TensorEdit, r: np.ndarray, budget: int) -> np.ndarray:
    """The coefficients `apply` subtracts, computed with its chunks and blocks: [matrices, in] of r^T W for
    hidden axis -2, [rows] of W r for hidden axis -1 (rank k, Q [k, d]: [matrices, k, in] and [rows, k]).
    Reads the tensor once."""
    info = edit.info
    scratch = Scratch()
    parts: list[np.ndarray] = []
    coeff = np.zeros(0, dtype=r.dtype)
    with ExitStack() as stack:
        read, chunks = chunk_reader(fd, edit, r.shape[-1], budget, stack)
        for chunk in chunks:
            stored = read(chunk, scratch)
            if edit.hidden_axis == -1:
                parts.append(_row_coefficients(stored, info.dtype, r))
            elif chunk.rows is None:
                parts.extend(coefficients(m, info.dtype, r) for m in stored)
            else:  # row blocks of a matrix larger than the budget, summed in order as `apply` does
                part = coefficients(stored[0], info.dtype, r[..., chunk.rows])
                coeff = part if chunk.rows.start == 0 else coeff + part
                if chunk.last:
                    parts.append(coeff)
    if not parts:
        return np.zeros((0, *r.shape[:-1]), dtype=r.dtype)
    return np.concatenate(parts) if edit.hidden_axis == -1 else np.stack(parts)


def _row_coefficients(m: np.ndarray, dtype: str, r: np.ndarray) -> np.ndarray:
    """W r (W Q^T) of a stored [rows, d] chunk, in the blocks `projection.edit_cols` uses (same sums, rounding)."""
    step = max(1, BLOCK_ELEMENTS // max(m.shape[1], 1))
    out = np.empty((m.shape[0], *r.shape[:-1]), dtype=r.dtype)
    for i in range(0, m.shape[0], step):
        out[i : i + step] = row_coefficients(widen(m[i : i + step], dtype), r)
    if not np.isfinite(out).all():
        raise NonFiniteError
    return out


def _add_factors(export: _Export, edit: TensorEdit, target: _Target, r: np.ndarray, coeff: np.ndarray) -> None:
    """A = s coeff (the input side), B = -r (the output side); a bias parameter [E, d] is the other way round.
    Rank k: k rows of A and columns of B per expert, A's rows expert-major and B's columns rank-major (peft's
    ParamWrapper layout; for one expert both are just the k directions in order)."""
    q = r.reshape(-1, r.shape[-1])  # [k, d]
    k = q.shape[0]
    if target.kind == "bias_param":  # row e of [E, d] gets -sum_i (s b_e . q_i) q_i
        f = _factors(export, target, "param", q.shape[1], coeff.shape[0], 1, k, r.dtype)
        f.a[:], f.b[:], f.filled[:] = q, -coeff.reshape(coeff.shape[0], k), True
        return
    rows = _input_rows(edit, coeff, k)  # [experts here, k, in]
    kind = "param" if target.kind in ("param", "expert_param") else target.kind
    f = _factors(export, target, kind, rows.shape[2], q.shape[1], target.experts, k, r.dtype)
    first, n = target.expert or 0, rows.shape[0]
    f.a[first * k : (first + n) * k] = rows.reshape(n * k, -1)
    b = f.b.reshape(q.shape[1], k, target.experts)  # a view: column j * E + e
    b[:, :, first : first + n] = -q.T[:, :, None]
    f.filled[first : first + n] = True


def _input_rows(edit: TensorEdit, coeff: np.ndarray, k: int) -> np.ndarray:
    """The coefficients as k rows per expert (one expert for a 2-D tensor): [experts, k, in]."""
    if edit.hidden_axis == -2:
        return coeff.reshape(-1, k, edit.info.shape[-1])
    experts = edit.info.shape[0] if len(edit.info.shape) == 3 else 1
    return np.swapaxes(coeff.reshape(experts, -1, k), 1, 2)


def _factors(export: _Export, target: _Target, kind: str, n_in: int, n_out: int, experts: int, k: int,
             dtype: np.dtype) -> Factors:
    if target.target not in export.factors:
        export.factors[target.target] = Factors(
            kind, target.target, np.zeros((experts * k, n_in), dtype), np.zeros((n_out, experts * k), dtype),
            np.zeros(experts, bool), target.order)
    return export.factors[target.target]


def _check_complete(export: _Export) -> None:
    for f in export.factors.values():
        if not f.filled.all():
            missing = np.flatnonzero(~f.filled).tolist()
            raise AbliterateError(
                f"{f.target}: expert(s) {missing[:5]} of this fused parameter are not edited (--layers/--targets), "
                "but peft adapts the whole parameter; edit every expert of a layer or none"
            )


def _notes(plan: EditPlan, export: _Export, options: AdapterOptions, has_bias_edits: bool) -> list[str]:
    notes = list(plan.notes)
    if plan.untie:
        notes.append("embeddings are tied: the adapter adapts the input embedding only, so lm_head keeps the "
                     "original matrix (as `apply` does by untying it)")
    if export.biases:
        notes.append(f"{len(export.biases)} edited bias(es) are carried with peft's bias='lora_only': peft loads them "
                     "into the base layers (disabling the adapter does not restore them; pass --ignore-biases for "
                     "a pure LoRA adapter)")
    if export.unscaled:
        notes.append(f"--ignore-biases: the biases of {', '.join(export.unscaled[:3])}"
                     f"{'...' if len(export.unscaled) > 3 else ''} were not scaled by D, so the adapter differs from "
                     "`apply --norm-preserve` there")
    if options.ignore_biases and has_bias_edits:
        notes.append("--ignore-biases: biases were left unedited, so the adapter differs from `apply` by the bias "
                     "terms along the direction")
    return notes
