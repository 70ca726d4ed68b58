"""Re-check an edited checkpoint against its original, streaming, without trusting the editor.

For every tensor: an edited one must equal the projection recomputed from the original (within
the stored dtype's relative epsilon) and, where the direction was removed fully, keep no more
than eps(dtype) |W| along it (1e-6 |W| for float32); every other tensor must be byte-identical.
Shard names, tensor order, dtypes, shapes, the index, config and the other files are compared too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from abliterate.edit.plan import EditOptions, plan_edit
from abliterate.edit.projection import EPS, TINY, iter_edited_chunks, plan_chunks, read_chunk, residual_along, widen
from abliterate.edit.shard_writer import chunk_budget
from abliterate.edit.weights import DEFAULT_MAX_MEMORY, MANIFEST_NAME
from abliterate.io.checkpoint import INDEX_NAME, Checkpoint
from abliterate.io.direction_file import Direction
from abliterate.io.safetensors_format import TensorInfo, pread_into

FLOAT32_RESIDUAL_TOLERANCE = 1e-6
BLOCK = 16 << 20


@dataclass(frozen=True)
class TargetSpec:
    scale: float
    layer: int | None
    hidden_axis: int
    preserve: bool = False  # a norm-preserving edit (`apply --norm-preserve`)


@dataclass
class VerifyReport:
    tensors_checked: int = 0
    edited_checked: int = 0
    max_relative_residual: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def expected_edit(
    original: Checkpoint, edited: Path, options: EditOptions | None
) -> tuple[dict[str, TargetSpec], tuple[str, str] | None]:
    """The edit to check against (targets, untie): the edited folder's manifest, or a plan from options."""
    manifest = _manifest(edited)
    if options is None and manifest:
        preserve = bool(manifest.get("norm_preserve", False))
        targets = {name: TargetSpec(e["scale"], e["layer"], e["hidden_axis"], preserve)
                   for name, e in manifest["edits"].items()}
        untie = manifest.get("untie")
        return targets, (untie["output"], untie["copied_from"]) if untie else None
    plan = plan_edit(original, options or EditOptions())
    return {e.name: TargetSpec(e.scale, e.layer, e.hidden_axis, plan.norm_preserve)
            for e in plan.edits.values()}, plan.untie


def verify(original_dir: Path, edited_dir: Path, direction: Direction, options: EditOptions | None = None,
           *, max_memory: int | None = None) -> VerifyReport:
    """max_memory: default the budget the edit used (from its manifest), so chunks, and with them
    the float32 summation order, are the same and matching tensors are usually byte-identical."""
    original, edited = Checkpoint.open(original_dir), Checkpoint.open(edited_dir)
    if max_memory is None:
        max_memory = _manifest(Path(edited_dir)).get("max_memory", DEFAULT_MAX_MEMORY)
    targets, untie = expected_edit(original, Path(edited_dir), options)
    untied = untie[0] if untie else None
    report = VerifyReport()
    _check_layout(original, edited, untied, report)
    with ExitStack() as stack:
        fds = {}
        for ckpt in (original, edited):
            for shard in ckpt.shards:
                fds[ckpt.root, shard] = os.open(ckpt.root / shard, os.O_RDONLY)
                stack.callback(os.close, fds[ckpt.root, shard])
        for name, (shard, info) in original.tensors.items():
            if name not in edited.tensors:
                continue  # reported by _check_layout
            e_shard, e_info = edited.tensors[name]
            if (e_info.dtype, e_info.shape) != (info.dtype, info.shape):
                continue
            src_fd, dst_fd = fds[original.root, shard], fds[edited.root, e_shard]
            report.tensors_checked += 1
            if name in targets:
                _check_edited(src_fd, info, dst_fd, e_info, direction, targets[name], max_memory, report)
            elif untie and name == untie[0]:
                emb_shard, emb = original.tensors[untie[1]]
                _check_identical(fds[original.root, emb_shard], emb, dst_fd, e_info, report)
            else:
                _check_identical(src_fd, info, dst_fd, e_info, report)
        if untie and untie[0] not in original.tensors and untie[0] in edited.tensors:
            emb_shard, emb = original.tensors[untie[1]]
            e_shard, e_info = edited.tensors[untied]
            report.tensors_checked += 1
            _check_identical(fds[original.root, emb_shard], emb, fds[edited.root, e_shard], e_info, report)
    return report


def _check_layout(original: Checkpoint, edited: Checkpoint, untied: str | None, report: VerifyReport) -> None:
    problems = report.problems
    if original.shards != edited.shards:
        problems.append(f"shard files differ: {list(original.shards)} vs {list(edited.shards)}")
    for shard in original.shards:
        if shard not in edited.headers:
            continue
        names = [t.name for t in original.headers[shard].tensors]
        got = [t.name for t in edited.headers[shard].tensors if t.name != untied or untied in original.tensors]
        if names != got:
            problems.append(f"{shard}: tensor names or order differ from the original")
    for name, (_, info) in original.tensors.items():
        if name not in edited.tensors:
            problems.append(f"{name} is missing from the edited checkpoint")
        elif (edited.tensors[name][1].dtype, edited.tensors[name][1].shape) != (info.dtype, info.shape):
            e = edited.tensors[name][1]
            problems.append(
                f"{name}: {e.dtype}{list(e.shape)} differs from the original {info.dtype}{list(info.shape)}"
            )
    extra = set(edited.tensors) - set(original.tensors) - {untied}
    if extra:
        problems.append(f"unexpected tensors in the edited checkpoint: {sorted(extra)[:5]}")
    if original.index_bytes is not None:
        o_map = json.loads(original.index_bytes)["weight_map"]
        e_map = json.loads(edited.index_bytes or b'{"weight_map": {}}')["weight_map"]
        if untied not in o_map:
            e_map.pop(untied, None)
        if o_map != e_map:
            problems.append(f"{INDEX_NAME} weight_map differs from the original")
    if _without_tie(original.config, untied) != _without_tie(edited.config, untied):
        problems.append("config.json differs from the original beyond tie_word_embeddings")
    copied, _ = original.other_files()
    for rel in copied:
        if rel == Path("config.json"):
            continue
        target = edited.root / rel
        if not target.is_file() or target.read_bytes() != (original.root / rel).read_bytes():
            problems.append(f"{rel} was not copied unchanged")


def _manifest(edited: Path) -> dict:
    path = edited / MANIFEST_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def _without_tie(config: dict, untied: str | None) -> dict:
    """config.json as compared: the tie flag may legitimately change when embeddings were untied."""
    if not untied:
        return config
    strip = {k: v for k, v in config.items() if k != "tie_word_embeddings"}
    if isinstance(strip.get("text_config"), dict):
        strip["text_config"] = {k: v for k, v in strip["text_config"].items() if k != "tie_word_embeddings"}
    return strip


def _check_identical(src_fd: int, info: TensorInfo, dst_fd: int, e_info: TensorInfo, report: VerifyReport) -> None:
    for (a, b) in _blocks(src_fd, info.start, dst_fd, e_info.start, info.nbytes):
        if a != b:
            report.problems.append(f"{e_info.name} should be byte-identical to the original but differs")
            return


def _blocks(fd_a: int, start_a: int, fd_b: int, start_b: int, n: int) -> Iterator[tuple[bytes, bytes]]:
    for off in range(0, n, BLOCK):
        m = min(BLOCK, n - off)
        a, b = bytearray(m), bytearray(m)
        pread_into(fd_a, memoryview(a), start_a + off)
        pread_into(fd_b, memoryview(b), start_b + off)
        yield a, b


def _check_edited(src_fd: int, info: TensorInfo, dst_fd: int, e_info: TensorInfo, direction: Direction,
                  spec: TargetSpec, max_memory: int, report: VerifyReport) -> None:
    report.edited_checked += 1
    r = direction.for_layer(spec.layer)
    eps = EPS[info.dtype]
    edited_view = TensorInfo(e_info.name, e_info.dtype, e_info.shape, e_info.start, e_info.end)
    budget = chunk_budget(max_memory)
    if spec.preserve:
        _check_norm_preserved(src_fd, info, dst_fd, edited_view, r, spec, budget, report)
        return
    order_slack = _summation_slack(src_fd, info, r, spec, budget)
    for (chunk, expected, _), slack in zip(iter_edited_chunks(src_fd, info, r, spec.hidden_axis, spec.scale, budget),
                                           order_slack, strict=True):
        got = read_chunk(dst_fd, edited_view, chunk).astype(np.float64)
        want = widen(expected, info.dtype).astype(np.float64)
        removed = np.abs(read_chunk(src_fd, info, chunk).astype(np.float64) - want)
        diff = np.abs(got - want)
        # W' = W - s r (r^T W) rounds once to the stored dtype, so another run may differ by one step of
        # the larger of |W'| and the removed part, plus what another order of summing r^T W changes
        allowed = 2 * eps * (np.abs(want) + removed) + slack + TINY[info.dtype]
        if not (diff <= allowed).all() or not np.isfinite(got).all():
            worst = float(np.nan_to_num(diff, nan=np.inf).max())
            report.problems.append(
                f"{e_info.name} differs from the recomputed projection (max abs diff {worst:.3g}, "
                f"more than rounding allows)"
            )
            return
    if spec.scale == 1.0:
        along, _ = residual_along(dst_fd, edited_view, r, spec.hidden_axis, budget)
        _, norm = residual_along(src_fd, info, r, spec.hidden_axis, budget)
        tolerance = max(FLOAT32_RESIDUAL_TOLERANCE, eps) if info.dtype != "F32" else FLOAT32_RESIDUAL_TOLERANCE
        relative = along / norm if norm else 0.0
        report.max_relative_residual = max(report.max_relative_residual, relative)
        if relative > tolerance:
            report.problems.append(
                f"{e_info.name} keeps {relative:.3g} |W| along the direction (allowed {tolerance:.3g})"
            )


def _summation_slack(fd: int, info: TensorInfo, r: np.ndarray, spec: TargetSpec, budget: int) -> Iterator[np.ndarray]:
    """Per chunk, the most that summing c = r^T W in another order (another chunking, BLAS or
    machine) can move s r c: |s| |r_i| d u sum_k |r_k W_k| (the classic dot-product bound)."""
    d = r.size
    unit = 2.0**-53 if info.dtype == "F64" else 2.0**-24
    abs_r = np.abs(r).astype(np.float64)
    factor = abs(spec.scale) * d * unit
    chunks = plan_chunks(info, spec.hidden_axis, d, budget)
    column_sums = np.zeros(0)
    for i, chunk in enumerate(chunks):
        w = np.abs(read_chunk(fd, info, chunk).astype(np.float64))
        if spec.hidden_axis == -1:
            yield factor * np.multiply.outer(w @ abs_r, abs_r)
        elif chunk.rows is None:
            sums = np.einsum("d,kdn->kn", abs_r, w)
            yield factor * abs_r[None, :, None] * sums[:, None, :]
        else:
            if chunk.rows.start == 0:  # the whole matrix's column sums, before its first row block
                column_sums = np.zeros(info.shape[-1])
                for block in chunks[i:]:
                    column_sums += abs_r[block.rows] @ np.abs(read_chunk(fd, info, block)[0].astype(np.float64))
                    if block.last:
                        break
            yield factor * np.multiply.outer(abs_r[chunk.rows], column_sums)[None]


def _check_norm_preserved(src_fd: int, info: TensorInfo, dst_fd: int, e_info: TensorInfo, r: np.ndarray,
                          spec: TargetSpec, budget: int, report: VerifyReport) -> None:
    """A norm-preserving edit, recomputed in float64 from the original, independently of the editor: each
    written vector w (column of [.., d, in], row of [.., d]) must become (w - s c r) |w| / |w - s c r|,
    c = r^T w, within one rounding step of the dtype plus the float32 bound on c (d u |w|), both scaled by
    the factor |w| / |w - s c r|; and with s = 1 keep nothing along r beyond that."""
    r64 = r.astype(np.float64)
    d, s = r.size, spec.scale
    slack = 2 * EPS[info.dtype] + d * 2.0**-24
    chunks = plan_chunks(info, spec.hidden_axis, d, budget)
    c = sumsq = np.zeros(0)
    for i, chunk in enumerate(chunks):
        w = read_chunk(src_fd, info, chunk).astype(np.float64)
        got = read_chunk(dst_fd, e_info, chunk).astype(np.float64)
        if spec.hidden_axis == -1:  # rows are the vectors
            c, sumsq, rr = w @ r64, np.square(w).sum(-1), r64
            vec = lambda a: a  # noqa: E731
        else:  # columns [.., d, n] are the vectors (a row block covers chunk.rows of them)
            rr = r64 if chunk.rows is None else r64[chunk.rows]
            if chunk.rows is None:
                c, sumsq = np.einsum("d,kdn->kn", r64, w), np.square(w).sum(1)
            elif chunk.rows.start == 0:
                c, sumsq = np.zeros(info.shape[-1]), np.zeros(info.shape[-1])
                for block in chunks[i:]:
                    part = read_chunk(src_fd, info, block)[0].astype(np.float64)
                    c, sumsq = c + r64[block.rows] @ part, sumsq + np.square(part).sum(0)
                    if block.last:
                        break
            vec = lambda a: np.expand_dims(a, -2)  # noqa: E731
        after = sumsq - (2 * s - s * s) * c * c
        factor = np.where(after > 0, np.sqrt(sumsq / np.where(after > 0, after, 1.0)), 1.0)
        want = (w - s * (np.multiply.outer(c, rr) if spec.hidden_axis == -1 else
                         np.expand_dims(rr, -1) * vec(c))) * (factor[..., None] if spec.hidden_axis == -1
                                                               else vec(factor))
        norms = np.sqrt(sumsq) * factor
        allowed = slack * (norms[..., None] if spec.hidden_axis == -1 else vec(norms)) + TINY[info.dtype]
        diff = np.abs(got - want)
        if not (diff <= allowed).all() or not np.isfinite(got).all():
            report.problems.append(f"{e_info.name} differs from the norm-preserving projection recomputed from the "
                                   f"original (max abs diff {float(np.nan_to_num(diff, nan=np.inf).max()):.3g})")
            return
    if s == 1.0:
        along, norm = residual_along(dst_fd, e_info, r, spec.hidden_axis, budget)
        relative = along / norm if norm else 0.0
        report.max_relative_residual = max(report.max_relative_residual, relative)
