"""`verify` on a GGUF pair: re-check an edited GGUF against its original, streaming within --max-memory.

Edited float tensors must equal the projection recomputed from the original within one rounding
step of their type plus what another order of summing r^T W can change, and (for a full removal)
keep at most 1e-6 |W| along r in F32, eps(type) |W| in F16/BF16: the checks `verify` makes on
safetensors (for k directions the span's bound of edit/verify_span.py, and along the span). Re-quantised
tensors must be within one quantisation step of the projection (of r or the span) of the original's
dequantised values (per block of their written type; for K-quants the block's largest sub-block
step). Every other tensor must be
byte-identical, the metadata too; an untied output.weight must hold the original token embedding.
Memory: the edit's chunks (a quarter of the budget each) and cache-sized float64 blocks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from abliterate.edit.manifest import EditManifest, read_manifest_file
from abliterate.edit.plan import EditOptions
from abliterate.edit.projection import EPS, TINY, Chunk, Scratch, iter_edited_chunks, plan_chunks, read_stored, widen
from abliterate.edit.shard_writer import chunk_budget
from abliterate.edit.verify import FLOAT32_RESIDUAL_TOLERANCE, VerifyReport
from abliterate.edit.verify_span import check_span_edited
from abliterate.errors import AbliterateError
from abliterate.gguf.archs import OUTPUT_NAME, TOKEN_EMBEDDING
from abliterate.gguf.edit import QUANT_BUDGET_DIVISOR, manifest_path, quantised_chunks
from abliterate.gguf.format import FLOAT_TYPES, GgufFile, GgufTensor, block_layout, dequantize, read_gguf
from abliterate.gguf.kquants import KQUANT_TYPES, kquant_steps
from abliterate.gguf.plan import GgufEdit, GgufPlan, _place, plan_gguf
from abliterate.io.direction_file import Direction
from abliterate.io.safetensors_format import TensorInfo, pread_into

# One quantisation step of a block, as a multiple of a block statistic of the values quantised: absmax
# for the symmetric types, max - min for those with an offset (llama.cpp's reference quantisers).
QUANT_STEPS = {"Q8_0": ("absmax", 127), "Q4_0": ("absmax", 8), "Q5_0": ("absmax", 16),
               "Q4_1": ("range", 15), "Q5_1": ("range", 31)}
COMPARE_ELEMENTS = 1 << 16  # float64 temporaries per comparison block: 512 KB each
DEFAULT_MAX_MEMORY = 256 << 20


def verify_gguf(original_path: Path, edited_path: Path, direction: Direction, options: EditOptions | None = None,
                *, max_memory: int | None = None) -> VerifyReport:
    """Check EDITED against ORIGINAL; the expected edit is the manifest's unless `options` are given."""
    original, edited = read_gguf(original_path), read_gguf(edited_path)
    manifest = _manifest(Path(edited_path))
    if max_memory is None:
        max_memory = (manifest and manifest.max_memory) or DEFAULT_MAX_MEMORY
    plan = _expected_plan(original, manifest, options)
    report = VerifyReport()
    _check_layout(plan, edited, report)
    budget = chunk_budget(max_memory) // 2  # the expected chunk and the edited one are both in memory
    out = edited.by_name()
    with open(original.path, "rb") as a, open(edited.path, "rb") as b:
        fds = (a.fileno(), b.fileno())
        for p in plan.placed:
            got = out.get(p.tensor.name)
            if got is None or (got.shape, got.type_name) != (p.tensor.shape, p.tensor.type_name):
                continue  # reported by _check_layout
            report.tensors_checked += 1
            edit = plan.edits.get(p.source.name) if p.tensor.name == p.source.name else None
            if edit is None:
                _check_identical(fds, p.source, got, budget, report)
            elif edit.tensor.is_float and edit.out_type == edit.tensor.type_name:
                check = _check_span if direction.rank > 1 else _check_float
                check(fds, edit, got, direction, budget, report)
            else:
                _check_quantised(fds, edit, got, direction, budget // QUANT_BUDGET_DIVISOR, report)
    return report


def recorded_direction(edited: Path) -> Path | None:
    """The direction file the edit used, as its manifest records it (when still there)."""
    manifest = _manifest(edited)
    recorded = manifest.direction.get("file") if manifest else None
    return Path(recorded) if recorded and Path(recorded).is_file() else None


def _manifest(edited: Path) -> EditManifest | None:
    """The manifest beside EDITED (edit/manifest.EditManifest), each edit with its input and written types."""
    path = manifest_path(edited)
    manifest = read_manifest_file(path, upgrade=_untie_as_names)
    for name, e in (manifest.edits if manifest else {}).items():
        if e.type is None or e.written_type is None:
            raise AbliterateError(f"{path} is not a GGUF edit's manifest: edits.{name} needs type and written_type; "
                                  "verify with the edit's options (--from-options) instead")
    return manifest


def _untie_as_names(data: Any) -> Any:
    """Manifests written before the typed record said `untie: true/false`; the record names the tensors."""
    if isinstance(data, dict) and isinstance(data.get("untie"), bool):
        return {**data, "untie": {"output": OUTPUT_NAME, "copied_from": TOKEN_EMBEDDING} if data["untie"] else None}
    return data


def _expected_plan(original: GgufFile, manifest: EditManifest | None, options: EditOptions | None) -> GgufPlan:
    """The plan `apply` made: from the manifest's per-tensor scales (any options reproduce), or options."""
    if options is not None or manifest is None:
        return plan_gguf(original, options or EditOptions())
    requants = {e.written_type for e in manifest.edits.values() if e.written_type != e.type}
    untie = manifest.untie is not None
    plan = plan_gguf(original, EditOptions(keep_tied=not untie), next(iter(requants), "auto"))
    by_name = original.by_name()
    edits = {}
    for name, e in manifest.edits.items():
        if name not in by_name:
            raise AbliterateError(f"the manifest beside the edited file names {name}, which the original lacks: "
                                  "pass the original the edit was made from")
        edits[name] = GgufEdit(by_name[name], e.component, e.layer, e.hidden_axis, e.scale, e.written_type)
    return GgufPlan(original, plan.family, plan.arch, plan.hidden_size, plan.num_layers, edits, untie,
                    _place(original, edits, untie), plan.notes)


def _check_layout(plan: GgufPlan, edited: GgufFile, report: VerifyReport) -> None:
    original, problems = plan.src, report.problems
    if edited.metadata_bytes != original.metadata_bytes or edited.kv_count != original.kv_count:
        problems.append("the metadata differs from the original's")
    want = [(p.tensor.name, p.tensor.type_name, p.tensor.shape) for p in plan.placed]
    got = [(t.name, t.type_name, t.shape) for t in edited.tensors]
    if want != got:
        diff = sorted(set(want) ^ set(got))[:3] or ["their order"]
        problems.append(f"tensor names, types or shapes differ from the expected edit ({diff})")


def _read(fd: int, start: int, nbytes: int, scratch: Scratch, slot: int) -> np.ndarray:
    raw = scratch.take(slot, nbytes)
    pread_into(fd, memoryview(raw), start)
    return raw


def _check_identical(fds: tuple[int, int], src: GgufTensor, got: GgufTensor, budget: int, report: VerifyReport) -> None:
    scratch = Scratch()
    step = max(budget // 2, 1 << 16)
    for off in range(0, src.nbytes, step):
        n = min(step, src.nbytes - off)
        a, b = _read(fds[0], src.start + off, n, scratch, 0), _read(fds[1], got.start + off, n, scratch, 1)
        if not np.array_equal(a, b):
            untied = got.name == OUTPUT_NAME and src.name == TOKEN_EMBEDDING
            what = "the original token_embd" if untied else "the original"
            report.problems.append(f"{got.name} should be byte-identical to {what} but differs")
            return
    report.identical += 1


def _row_steps(rows: int, n: int) -> range:
    return range(0, rows, max(1, COMPARE_ELEMENTS // max(n, 1)))


def _abs_column_sums(m: np.ndarray, abs_r: np.ndarray, dtype: str) -> np.ndarray:
    """sum_k |r_k| |W_k| of a stored [rows, n] matrix (rows along r), block by block."""
    steps = _row_steps(*m.shape)
    sums = np.zeros(m.shape[1])
    for j in steps:
        sums += abs_r[j : j + steps.step] @ np.abs(widen(m[j : j + steps.step], dtype))
    return sums


def _matrix_column_sums(fd: int, info: TensorInfo, chunks: list[Chunk], i: int, abs_r: np.ndarray) -> np.ndarray:
    """The same over a matrix too big for one chunk, whose row blocks start at chunks[i] (a pass of its own)."""
    sums = np.zeros(info.shape[-1])
    scratch = Scratch()
    for block in chunks[i:]:
        sums += _abs_column_sums(read_stored(fd, info, block, scratch)[0], abs_r[block.rows], info.dtype)
        if block.last:
            break
    return sums


def _check_float(fds: tuple[int, int], edit: GgufEdit, got: GgufTensor, direction: Direction, budget: int,
                 report: VerifyReport) -> None:
    """Per chunk of the edit: expected, original and edited values compared in cache-sized float64 blocks."""
    report.count_edit(edit.scale)
    t, dtype = edit.tensor, FLOAT_TYPES[edit.tensor.type_name]
    src = TensorInfo(t.name, dtype, t.shape, t.start, t.end)
    dst = TensorInfo(t.name, dtype, t.shape, got.start, got.end)
    r = direction.for_layer(edit.layer).astype(np.float64)
    abs_r = np.abs(r)
    factor = abs(edit.scale) * r.size * 2.0**-24  # the dot-product rounding bound of another summation order
    chunks = plan_chunks(src, edit.hidden_axis, r.size, budget)
    along = total = 0.0
    orig_scratch, edited_scratch = Scratch(), Scratch()
    coeff = full_sums = np.zeros(0)
    expected_chunks = iter_edited_chunks(fds[0], src, r.astype(np.float32), edit.hidden_axis, edit.scale, budget)
    for i, (chunk, expected, _) in enumerate(expected_chunks):
        orig = read_stored(fds[0], src, chunk, orig_scratch)
        have = read_stored(fds[1], dst, chunk, edited_scratch)
        if edit.hidden_axis == -1:
            mats = [(orig.reshape(-1, r.size), expected.reshape(-1, r.size), have.reshape(-1, r.size), None, None)]
        else:
            rows = r[chunk.rows] if chunk.rows is not None else r
            if chunk.rows is not None and chunk.rows.start == 0:
                full_sums = _matrix_column_sums(fds[0], src, chunks, i, abs_r)
            mats = [(o, e, h, rows, full_sums if chunk.rows is not None else None)
                    for o, e, h in zip(orig, expected, have, strict=True)]
        for o, e, h, rows, sums in mats:
            if rows is not None and sums is None:  # a whole matrix in this chunk
                sums = _abs_column_sums(o, abs_r, dtype)
            part_total, part_along, ok = _compare(o, e, h, dtype, r if rows is None else rows, abs_r, sums, factor)
            if not ok:
                report.problems.append(f"{got.name} differs from the recomputed projection by more than rounding "
                                       "allows")
                return
            total += part_total
            if rows is None:
                along += part_along
            else:
                coeff = part_along if chunk.rows is None or chunk.rows.start == 0 else coeff + part_along
                along += float(np.square(coeff).sum()) if chunk.rows is None or chunk.last else 0.0
    _check_residual(got.name, dtype, edit.scale, math.sqrt(along / total) if total else 0.0, report)


def _check_residual(name: str, dtype: str, scale: float, relative: float, report: VerifyReport) -> None:
    """A full removal keeps at most 1e-6 |W| along the direction (its span) in F32, eps(type) |W| in F16/BF16."""
    if scale != 1.0:
        return
    tolerance = FLOAT32_RESIDUAL_TOLERANCE if dtype == "F32" else max(FLOAT32_RESIDUAL_TOLERANCE, EPS[dtype])
    report.max_relative_residual = max(report.max_relative_residual, relative)
    if relative > tolerance:
        report.problems.append(f"{name} keeps {relative:.3g} |W| along the direction (allowed {tolerance:.3g})")


def _check_span(fds: tuple[int, int], edit: GgufEdit, got: GgufTensor, direction: Direction, budget: int,
                report: VerifyReport) -> None:
    """A float tensor edited with k directions: the per-element bound `verify` enforces on safetensors
    (edit/verify_span.py), then what it keeps along the span."""
    report.count_edit(edit.scale)
    t, dtype = edit.tensor, FLOAT_TYPES[edit.tensor.type_name]
    check = check_span_edited(fds[0], TensorInfo(t.name, dtype, t.shape, t.start, t.end), fds[1],
                              TensorInfo(t.name, dtype, t.shape, got.start, got.end),
                              direction.for_layer(edit.layer), edit.scale, edit.hidden_axis, budget)
    report.element_ratio = max(report.element_ratio, check.element_ratio)
    if not check.ok:
        report.problems.append(f"{got.name} differs from the recomputed projection of the span by more than "
                               "rounding allows")
        return
    _check_residual(got.name, dtype, edit.scale, check.along / check.norm if check.norm else 0.0, report)


def _compare(orig: np.ndarray, expected: np.ndarray, have: np.ndarray, dtype: str, r: np.ndarray, abs_r: np.ndarray,
             column_sums: np.ndarray | None, factor: float) -> tuple[float, object, bool]:
    """One [rows, n] stored matrix: (|W|^2, along-r part, within tolerance). For rows of d (column_sums None)
    the along part is sum (W' r)^2; for a [rows of d, n] block of a matrix it is r_rows^T W' (a vector)."""
    total, ok = 0.0, True
    along: object = 0.0 if column_sums is None else np.zeros(orig.shape[1])
    eps = EPS[dtype]
    steps = _row_steps(*orig.shape)
    k = steps.step
    for j in steps:
        o, w, h = (widen(x[j : j + k], dtype).astype(np.float64) for x in (orig, expected, have))
        if column_sums is None:
            slack = factor * np.multiply.outer(np.abs(o) @ abs_r, abs_r)
            along += float(np.square(h @ r).sum())  # type: ignore[operator]
        else:
            slack = factor * np.multiply.outer(np.abs(r[j : j + k]), column_sums)
            along += r[j : j + k] @ h  # type: ignore[operator]
        allowed = 2 * eps * (np.abs(w) + np.abs(o - w)) + slack + TINY[dtype]
        ok = ok and bool((np.abs(h - w) <= allowed).all() and np.isfinite(h).all())
        total += float(np.square(o).sum())
    return total, along, ok


def _quant_step(values: np.ndarray, type_name: str) -> np.ndarray:
    """One quantisation step per block of `values` ([blocks, block]) for the written type."""
    if type_name in FLOAT_TYPES:
        return EPS[FLOAT_TYPES[type_name]] * np.abs(values) + TINY[FLOAT_TYPES[type_name]]
    if type_name not in QUANT_STEPS:
        raise AbliterateError(f"verify cannot bound the quantisation step of {type_name}; re-edit with --requant Q8_0")
    stat, levels = QUANT_STEPS[type_name]
    if stat == "absmax":
        spread = np.abs(values).max(axis=1, keepdims=True)
    else:
        spread = values.max(axis=1, keepdims=True) - values.min(axis=1, keepdims=True)
    # the block scale is stored as float16: a value at level q moves by up to q x 2^-11 of a step more
    return spread / levels * (1 + levels * 2.0**-11) + TINY["F32"]


def _kquant_step(raw: np.ndarray, values: np.ndarray, type_name: str) -> np.ndarray:
    """One step of a written K-quant block: its largest sub-block step (d x the sub-block's scale), or
    its values' range over the levels where that is larger (a block whose scales round to 0). The
    reference quantiser keeps weights-like blocks within it (up to 0.9 of it on Gaussian blocks); blocks
    spanning many orders of magnitude, whose float16 scales underflow, can exceed it."""
    steps, top = kquant_steps(raw.reshape(values.shape[0], -1), type_name)
    spread = (values.max(axis=1) - values.min(axis=1)) / top
    return (np.maximum(steps.max(axis=1), spread) * (1 + 2.0**-9) + TINY["F32"])[:, None]


def _check_quantised(fds: tuple[int, int], edit: GgufEdit, got: GgufTensor, direction: Direction, budget: int,
                     report: VerifyReport) -> None:
    """Within one quantisation step (per block of the written type) of the projected dequantised values."""
    report.count_edit(edit.scale)
    block, block_bytes = block_layout(edit.out_type)
    scratch = Scratch()
    r = direction.for_layer(edit.layer)
    for chunk, want in quantised_chunks(fds[0], edit, r, budget):
        raw = _read(fds[1], got.start + chunk.first // block * block_bytes, chunk.count // block * block_bytes,
                    scratch, 0)
        have = dequantize(raw, edit.out_type, chunk.shape).reshape(-1, block)
        want = want.reshape(-1, block)
        step = _kquant_step(raw, want, edit.out_type) if edit.out_type in KQUANT_TYPES else \
            _quant_step(want, edit.out_type)
        if not (np.abs(have - want) <= step).all():
            worst = float(np.abs(have - want).max())
            report.problems.append(f"{got.name} is more than one {edit.out_type} quantisation step from the projection "
                                   f"of the original's dequantised values (max abs diff {worst:.3g})")
            return
