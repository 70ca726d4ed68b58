"""`apply` on a GGUF file: the projection streamed tensor by tensor into a new GGUF.

Float tensors (F32, F16, BF16) go through exactly the code `apply` uses on safetensors (one direction, or
the span of k: a rank-k file). Quantised tensors are dequantised a chunk of whole rows at a time (the gguf
library), edited in float32 with the same code, and quantised again: in their own type where the gguf
library can write it, else in the --requant type. Every other tensor, the gaps between them and the
metadata are copied byte for byte (kernel-side). The output is written under a hidden temporary name
next to --out and renamed into place only when complete, with a manifest beside it that `verify` reads.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from abliterate.edit.manifest import EditManifest, ManifestEdit
from abliterate.edit.projection import Chunk, NonFiniteError, Scratch, iter_edited_chunks
from abliterate.edit.shard_writer import chunk_budget
from abliterate.errors import AbliterateError
from abliterate.gguf.archs import OUTPUT_NAME, TOKEN_EMBEDDING
from abliterate.gguf.format import FLOAT_TYPES, block_layout, dequantize, encode_header, quantize
from abliterate.gguf.plan import GgufEdit, GgufPlan
from abliterate.io.direction_file import Direction
from abliterate.io.safetensors_format import TensorInfo, copy_range, pread_into, pwrite_all
from abliterate.options.command import recorded_command

MANIFEST_SUFFIX = ".abliterate.json"
# gguf's quantisers hold a few float32 temporaries of a chunk: quantised tensors get a smaller chunk
QUANT_BUDGET_DIVISOR = 4
ERROR_SLICE = 1 << 16  # values per pass of the error statistics


@dataclass(frozen=True)
class QuantError:
    """How far the written (re-quantised) tensor is from its float32 edit: RMS and max, relative to |W'|."""

    name: str
    type_name: str
    relative_rms: float
    max_abs: float


@dataclass(frozen=True)
class GgufResult:
    out: Path
    edited: int
    size: int
    quant_errors: tuple[QuantError, ...]
    notes: tuple[str, ...]


def manifest_path(out: Path) -> Path:
    return out.with_name(out.name + MANIFEST_SUFFIX)


@contextlib.contextmanager
def atomic_file(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """A hidden temporary sibling that becomes `out` only if the block finishes (a killed run leaves
    a `.NAME.abliterate-tmp-*` file that never looks like a model)."""
    out = out.absolute()
    if out.exists() and not overwrite:
        raise AbliterateError(f"output file {out} already exists; pass --overwrite or choose another --out")
    if out.is_dir():
        raise AbliterateError(f"--out {out} is a folder; give the output file's name, e.g. {out / 'model.gguf'}")
    if not out.parent.is_dir():
        raise AbliterateError(f"the parent folder of {out} does not exist; create it first")
    tmp = out.with_name(f".{out.name}.abliterate-tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def apply_gguf(plan: GgufPlan, direction: Direction, out: Path, *, overwrite: bool = False,
               max_memory: int = 256 << 20, quiet: bool = False) -> GgufResult:
    """Write the edited GGUF to `out` atomically; the input is only ever read."""
    src = plan.src
    if Path(out).absolute() == src.path.absolute():
        raise AbliterateError("--out is the input file; abliterate never modifies its input: choose another --out")
    header = encode_header(src, [(p.tensor, p.offset) for p in plan.placed])
    tail = src.file_size - max(t.end for t in src.tensors)  # the input's padding after its last tensor
    size = len(header) + plan.data_size + (0 if plan.untie else tail)
    errors: list[QuantError] = []
    with atomic_file(Path(out), overwrite=overwrite) as tmp, tqdm(
        total=size, unit="B", unit_scale=True, desc="editing", disable=quiet, file=sys.stderr
    ) as bar:
        src_fd = os.open(src.path, os.O_RDONLY)
        dst_fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(dst_fd, size)  # gaps (alignment padding) read as zeros
            pwrite_all(dst_fd, memoryview(header), 0)
            bar.update(len(header))
            base = len(header)
            for p in sorted(plan.placed, key=lambda p: p.offset):
                edit = plan.edits.get(p.source.name) if p.tensor.name == p.source.name else None
                dst = base + p.offset
                if edit is None:
                    copy_range(src_fd, dst_fd, p.source.start, dst, p.source.nbytes)
                else:
                    error = write_edited(src_fd, dst_fd, edit, direction, dst, chunk_budget(max_memory))
                    errors += [error] if error else []
                bar.update(p.tensor.nbytes)
            if not plan.untie and tail:
                copy_range(src_fd, dst_fd, src.file_size - tail, size - tail, tail)
            os.fsync(dst_fd)
        finally:
            os.close(src_fd)
            os.close(dst_fd)
        write_manifest(plan, direction, manifest_path(Path(out)), max_memory)
    return GgufResult(Path(out), len(plan.edits), size, tuple(errors), plan.notes)


def write_edited(src_fd: int, dst_fd: int, edit: GgufEdit, direction: Direction, dst: int,
                 budget: int) -> QuantError | None:
    """Stream one edited tensor into the output at `dst`; for quantised ones, what requantising cost."""
    t = edit.tensor
    r = direction.for_layer(edit.layer)
    try:
        if t.is_float:
            info = TensorInfo(t.name, FLOAT_TYPES[t.type_name], t.shape, t.start, t.end)
            for chunk, values, _ in iter_edited_chunks(src_fd, info, r, edit.hidden_axis, edit.scale, budget):
                pwrite_all(dst_fd, memoryview(values.reshape(-1).view(np.uint8)), dst + chunk.first * info.itemsize)
            return None
        return _write_quantised(src_fd, dst_fd, edit, r, dst, budget // QUANT_BUDGET_DIVISOR)
    except NonFiniteError:
        raise AbliterateError(f"{t.name} holds NaN or inf values; the GGUF is corrupt: download it again") from None


def quantised_chunks(src_fd: int, edit: GgufEdit, r: np.ndarray, budget: int) -> Iterator[tuple[Chunk, np.ndarray]]:
    """(chunk, edited float32 values) of a quantised tensor, in file order: whole rows dequantised."""
    t = edit.tensor
    info = TensorInfo(t.name, "F32", t.shape, 0, 4 * math.prod(t.shape))  # the dequantised values
    block, block_bytes = block_layout(t.type_name)

    def read(chunk: Chunk, scratch: Scratch) -> np.ndarray:
        raw = scratch.take(0, chunk.count // block * block_bytes)
        pread_into(src_fd, memoryview(raw), t.start + chunk.first // block * block_bytes)
        return dequantize(raw, t.type_name, chunk.shape)

    for chunk, values, _ in iter_edited_chunks(src_fd, info, r, edit.hidden_axis, edit.scale, budget, read=read):
        yield chunk, values


def _write_quantised(src_fd: int, dst_fd: int, edit: GgufEdit, r: np.ndarray, dst: int, budget: int) -> QuantError:
    block, block_bytes = block_layout(edit.out_type)
    err_sq = norm_sq = worst = 0.0
    for chunk, values in quantised_chunks(src_fd, edit, r, budget):
        raw = quantize(values, edit.out_type)
        pwrite_all(dst_fd, memoryview(raw), dst + chunk.first // block * block_bytes)
        flat = values.reshape(-1)
        step = ERROR_SLICE // block * block  # cache-sized slices, whole blocks
        for first in range(0, flat.size, step):
            part = flat[first : first + step]
            stored = raw[first // block * block_bytes : (first + part.size) // block * block_bytes]
            error = dequantize(stored, edit.out_type, part.shape) - part
            err_sq += float(np.dot(error, error))  # float32 dot products (BLAS): a printed statistic
            norm_sq += float(np.dot(part, part))
            worst = max(worst, float(error.max(initial=0.0)), -float(error.min(initial=0.0)))
    return QuantError(edit.tensor.name, edit.out_type, math.sqrt(err_sq / norm_sq) if norm_sq else 0.0, worst)


def write_manifest(plan: GgufPlan, direction: Direction, path: Path, max_memory: int) -> None:
    """What was done, for `abliterate verify`: beside the GGUF, whose metadata stays the input's."""
    EditManifest(
        source=str(plan.src.path), command=recorded_command(),
        direction={"file": str(direction.path.absolute()) if direction.path else None,
                   "metadata": direction.metadata, "per_layer": direction.per_layer, "rank": direction.rank},
        untie=(OUTPUT_NAME, TOKEN_EMBEDDING) if plan.untie else None,
        edits={e.tensor.name: ManifestEdit(e.scale, e.layer, e.hidden_axis, e.component, e.tensor.type_name,
                                           e.out_type) for e in plan.edits.values()},
        notes=tuple(plan.notes), max_memory=max_memory).write_file(path)


def summarise(result: GgufResult, echo: Callable[[str], object]) -> None:
    """The per-tensor quantisation error of re-quantised tensors, largest first (ten of them)."""
    worst = sorted(result.quant_errors, key=lambda e: -e.relative_rms)
    if worst:
        echo(f"re-quantised {len(worst)} tensors; quantisation error (RMS relative to |W'|, max abs):")
    for e in worst[:10]:
        echo(f"  {e.name} ({e.type_name}): {e.relative_rms:.2e}, {e.max_abs:.2e}")
