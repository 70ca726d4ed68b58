"""Re-check an edited checkpoint against its original, streaming within a memory budget.

For every tensor: an edited one must be the projection recomputed in float64 from the original, within
the bound verify_tensor.py states (one rounding of its dtype per element, the float32 summation bound
per row or column) and, where the direction was removed fully, keep no more than 1e-6 |W| along it
(float32; eps(dtype) |W| for 16-bit); every other tensor must be byte-identical. Shard names, tensor
order, dtypes, shapes, the index, config and the other files are compared too. The report says how
many tensors were edited at which scale and how many are identical, so an edit that touched nothing
cannot pass unnoticed; the direction is the edited folder's copy unless the caller passes another.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from abliterate.edit.manifest import read_manifest
from abliterate.edit.plan import EditOptions, plan_edit
from abliterate.edit.projection import EPS
from abliterate.edit.shard_writer import chunk_budget
from abliterate.edit.verify_preserve import check_preserved_tensor
from abliterate.edit.verify_quant import check_quantised
from abliterate.edit.verify_span import check_span_edited
from abliterate.edit.verify_tensor import check_edited_tensor
from abliterate.edit.weights import DEFAULT_MAX_MEMORY
from abliterate.io.checkpoint import INDEX_NAME, Checkpoint
from abliterate.io.direction_file import Direction
from abliterate.io.quantised import QuantTensor, quantised_tensors, scale_names
from abliterate.io.safetensors_format import TensorInfo, pread_into

FLOAT32_RESIDUAL_TOLERANCE = 1e-6
BLOCK = 16 << 20  # bytes compared at a time for identical tensors (less when the budget is smaller)


@dataclass(frozen=True)
class TargetSpec:
    scale: float
    layer: int | None
    hidden_axis: int
    preserve: bool = False  # a norm-preserving edit (`apply --norm-preserve`)


@dataclass
class VerifyReport:
    tensors_checked: int = 0
    identical: int = 0  # tensors checked byte-identical to the original (the untied output copy included)
    edited_by_scale: dict[float, int] = field(default_factory=dict)
    max_relative_residual: float = 0.0  # largest |r^T W'| / |W| over tensors edited at scale 1
    element_ratio: float = 0.0  # largest element error as a fraction of its rounding bound
    coefficient_ratio: float = 0.0  # largest coefficient error as a fraction of the float32 summation bound
    bounds_checked: bool = False  # the two ratios above were measured (not by the GGUF checker, which has its own)
    problems: list[str] = field(default_factory=list)

    @property
    def edited_checked(self) -> int:
        return sum(self.edited_by_scale.values())

    def count_edit(self, scale: float) -> None:
        self.edited_by_scale[scale] = self.edited_by_scale.get(scale, 0) + 1

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """What was checked, in one line: an edit that touched nothing shows as 0 edited."""
        scales = ", ".join(f"{n} at scale {s:g}" for s, n in sorted(self.edited_by_scale.items())) or "none"
        bounds = (f"worst element error {self.element_ratio:.2f} of its rounding bound, worst coefficient error "
                  f"{self.coefficient_ratio:.2f} of the float32 summation bound; " if self.bounds_checked else "")
        return (f"checked {self.tensors_checked} tensors: {self.edited_checked} edited ({scales}), {self.identical} "
                f"byte-identical; {bounds}largest residual along the direction {self.max_relative_residual:.2e} |W|")


def expected_edit(
    original: Checkpoint, edited: Path, options: EditOptions | None
) -> tuple[dict[str, TargetSpec], tuple[str, str] | None]:
    """The edit to check against (targets, untie): the edited folder's manifest, or a plan from options."""
    manifest = read_manifest(edited)
    if options is None and manifest:
        targets = {name: TargetSpec(e.scale, e.layer, e.hidden_axis, manifest.norm_preserve)
                   for name, e in manifest.edits.items()}
        return targets, manifest.untie
    plan = plan_edit(original, options or EditOptions())
    return {e.name: TargetSpec(e.scale, e.layer, e.hidden_axis, plan.norm_preserve)
            for e in plan.edits.values()}, plan.untie


def verify(original_dir: Path, edited_dir: Path, direction: Direction, options: EditOptions | None = None,
           *, max_memory: int | None = None) -> VerifyReport:
    """max_memory: default the budget the edit used (from its manifest), so chunks, and with them
    the float32 summation order, are the same and matching tensors are usually byte-identical."""
    original, edited = Checkpoint.open(original_dir), Checkpoint.open(edited_dir)
    if max_memory is None:
        manifest = read_manifest(Path(edited_dir))
        max_memory = manifest.max_memory if manifest and manifest.max_memory else DEFAULT_MAX_MEMORY
    targets, untie = expected_edit(original, Path(edited_dir), options)
    untied = untie[0] if untie else None
    report = VerifyReport()
    if not targets:
        report.problems.append("the edit lists no edited tensor: nothing was removed")
    budget = chunk_budget(max_memory)
    _check_layout(original, edited, untied, report)
    quantised, edited_quantised = quantised_tensors(original), quantised_tensors(edited)
    scales = {s: name for s, name in scale_names(quantised).items() if name in targets}
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
            if name in scales:
                continue  # checked with the tensor it scales
            report.tensors_checked += 1
            if name in targets and name in quantised:
                _check_quantised(quantised[name], edited_quantised.get(name), direction, targets[name], budget, report)
            elif name in targets:
                _check_edited(src_fd, info, dst_fd, e_info, direction, targets[name], budget, report)
            elif untie and name == untie[0]:
                emb_shard, emb = original.tensors[untie[1]]
                _check_identical(fds[original.root, emb_shard], emb, dst_fd, e_info, budget, report)
            else:
                _check_identical(src_fd, info, dst_fd, e_info, budget, report)
        if untie and untie[0] not in original.tensors and untie[0] in edited.tensors:
            emb_shard, emb = original.tensors[untie[1]]
            e_shard, e_info = edited.tensors[untied]
            report.tensors_checked += 1
            _check_identical(fds[original.root, emb_shard], emb, fds[edited.root, e_shard], e_info, budget, report)
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


def _without_tie(config: dict, untied: str | None) -> dict:
    """config.json as compared: the tie flag may legitimately change when embeddings were untied."""
    if not untied:
        return config
    strip = {k: v for k, v in config.items() if k != "tie_word_embeddings"}
    if isinstance(strip.get("text_config"), dict):
        strip["text_config"] = {k: v for k, v in strip["text_config"].items() if k != "tie_word_embeddings"}
    return strip


def _check_identical(src_fd: int, info: TensorInfo, dst_fd: int, e_info: TensorInfo, budget: int,
                     report: VerifyReport) -> None:
    for (a, b) in _blocks(src_fd, info.start, dst_fd, e_info.start, info.nbytes, max(min(BLOCK, budget // 2), 1)):
        if a != b:
            report.problems.append(f"{e_info.name} should be byte-identical to the original but differs")
            return
    report.identical += 1


def _blocks(fd_a: int, start_a: int, fd_b: int, start_b: int, n: int,
            size: int) -> Iterator[tuple[memoryview, memoryview]]:
    a, b = bytearray(min(size, n)), bytearray(min(size, n))
    for off in range(0, n, size):
        m = min(size, n - off)
        pread_into(fd_a, memoryview(a)[:m], start_a + off)
        pread_into(fd_b, memoryview(b)[:m], start_b + off)
        yield memoryview(a)[:m], memoryview(b)[:m]


def _check_quantised(original: QuantTensor, edited: QuantTensor | None, direction: Direction, spec: TargetSpec,
                     budget: int, report: VerifyReport) -> None:
    """An FP8 / MXFP4 tensor: within one quantisation step per element (verify_quant.py)."""
    report.count_edit(spec.scale)
    if edited is None or edited.scales.shape != original.scales.shape:
        report.problems.append(f"{original.data.name}: its scales are missing or reshaped in the edited checkpoint")
        return
    check = check_quantised(original, edited, direction.for_layer(spec.layer), spec.scale, spec.hidden_axis, budget,
                            spec.preserve)
    report.element_ratio = max(report.element_ratio, check.element_ratio)
    report.bounds_checked = True
    if not check.finite:
        report.problems.append(f"{original.data.name} holds NaN or inf where the recomputed edit is finite")
    elif check.element_ratio > 1:
        report.problems.append(f"{original.data.name} is {check.element_ratio:.3g} {original.format.method} "
                               "quantisation steps from the edit of the original's dequantised values (allowed: 1)")
    elif not check.scales_ok:
        report.problems.append(f"{original.scales.name}: block scales differ from those the edited values call for")


def _check_edited(src_fd: int, info: TensorInfo, dst_fd: int, e_info: TensorInfo, direction: Direction,
                  spec: TargetSpec, budget: int, report: VerifyReport) -> None:
    report.count_edit(spec.scale)
    report.bounds_checked = True
    r = direction.for_layer(spec.layer)
    if r.ndim == 2:  # several directions: their span, norm-preserving or not
        check = check_span_edited(src_fd, info, dst_fd, e_info, r, spec.scale, spec.hidden_axis, budget, spec.preserve)
    else:
        checker = check_preserved_tensor if spec.preserve else check_edited_tensor
        check = checker(src_fd, info, dst_fd, e_info, r, spec.scale, spec.hidden_axis, budget)
    report.element_ratio = max(report.element_ratio, check.element_ratio)
    report.coefficient_ratio = max(report.coefficient_ratio, check.coefficient_ratio)
    what = "norm-preserving projection" if spec.preserve else "projection"
    if not check.finite:
        report.problems.append(f"{e_info.name} holds NaN or inf where the recomputed {what} is finite")
    elif check.element_ratio > 1:
        report.problems.append(f"{e_info.name} differs from the recomputed {what} by {check.element_ratio:.3g} "
                               "times the rounding bound (see `abliterate verify --help`)")
    elif check.coefficient_ratio > 1:
        report.problems.append(f"{e_info.name} differs from the recomputed {what}: what it removes along the "
                               f"direction{' or its rescaling' if spec.preserve else ''} is off by "
                               f"{check.coefficient_ratio:.3g} times the float32 summation bound")
    if spec.scale == 1.0:
        tolerance = FLOAT32_RESIDUAL_TOLERANCE if info.dtype in ("F32", "F64") else max(FLOAT32_RESIDUAL_TOLERANCE,
                                                                                         EPS[info.dtype])
        relative = check.along / check.norm if check.norm else 0.0
        report.max_relative_residual = max(report.max_relative_residual, relative)
        if relative > tolerance:
            report.problems.append(f"{e_info.name} keeps {relative:.3g} |W| along the direction "
                                   f"(allowed {tolerance:.3g})")
