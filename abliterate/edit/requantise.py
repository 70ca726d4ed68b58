"""An FP8 block-scaled or MXFP4 tensor edited in its own format, streamed like a float one.

Each chunk of whole scale blocks is read (values and their scales), dequantised to float32 exactly as
transformers dequantises it (table value x scale), edited by the same `iter_edited_chunks` as a float32
tensor (its `read` hook), and quantised again with new block scales: the values land in the tensor's place
and the scales in its scale tensor's (the shard writer leaves that range to this module). What requantising
cost is measured per tensor against the float32 edit, as the GGUF path reports it.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np

from abliterate.edit import quant_codec as codec
from abliterate.edit.projection import Chunk, Scratch, iter_edited_chunks, plan_chunks, read_stored
from abliterate.io.quantised import QuantTensor
from abliterate.io.safetensors_format import pread_into

# float32 arrays of a chunk at once: dequantised values, scales spread per element, the encoder's temporaries,
# the requantised copy dequantised again and its error (about a dozen)
BUDGET_DIVISOR = 16


@dataclass(frozen=True)
class QuantError:
    """How far the written (re-quantised) tensor is from its float32 edit: RMS relative to |W'|, max abs."""

    name: str
    type_name: str
    relative_rms: float
    max_abs: float


@dataclass(frozen=True)
class Quantised:
    """A chunk in its stored form: packed values, their scales and the first scale row they start at."""

    data: np.ndarray
    scales: np.ndarray
    scale_row: int


def row_align(q: QuantTensor, hidden_axis: int) -> int:
    """Rows per chunk step, so that no scale block is split between chunks (whole matrices when a stack's
    matrices do not divide into whole blocks of rows and chunks run across them)."""
    rows = q.shape[-2]
    if hidden_axis == -1 and len(q.shape) > 2 and rows % q.block[0]:
        return rows
    return q.block[0]


class QuantFile:
    """Reads a quantised tensor's chunks from its own descriptors (its scales may sit in another shard)."""

    def __init__(self, q: QuantTensor, stack: ExitStack) -> None:
        self.q = q
        self.data_fd = os.open(q.data_path, os.O_RDONLY)
        stack.callback(os.close, self.data_fd)
        self.scales_fd = os.open(q.scales_path, os.O_RDONLY)
        stack.callback(os.close, self.scales_fd)

    @property
    def cols(self) -> int:
        return self.q.shape[-1]

    def scale_rows(self, chunk: Chunk) -> np.ndarray:
        """The scale row (of the flattened scale tensor) of each of the chunk's rows."""
        rows = np.arange(chunk.first // self.cols, (chunk.first + chunk.count) // self.cols)
        if self.q.format.method == "mxfp4":
            return rows
        per_matrix = self.q.scale_grid[0]
        return rows // self.q.shape[-2] * per_matrix + rows % self.q.shape[-2] // self.q.block[0]

    def read_scales(self, first: int, count: int) -> np.ndarray:
        q = self.q
        width = q.scale_grid[1] if q.format.method == "fp8" else self.cols // q.block[1]
        itemsize = 4 if q.format.scale_dtype == "F32" else 1
        raw = np.empty(count * width * itemsize, np.uint8)
        pread_into(self.scales_fd, memoryview(raw), q.scales.start + first * width * itemsize)
        return raw.view(np.float32 if itemsize == 4 else np.uint8).reshape(count, width)

    def read(self, chunk: Chunk, scratch: Scratch) -> np.ndarray:
        """A chunk's dequantised float32 values, shaped as the chunk."""
        q, rows = self.q, self.scale_rows(chunk)
        per_byte = q.format.values_per_byte
        raw = scratch.take(0, chunk.count // per_byte)
        pread_into(self.data_fd, memoryview(raw), q.data.start + chunk.first // per_byte)
        scales = self.read_scales(int(rows[0]), int(rows[-1]) - int(rows[0]) + 1)
        if q.format.method == "mxfp4":
            values = codec.dequantise_mxfp4(raw.reshape(len(rows), -1, 16), scales)
        else:
            values = codec.dequantise_fp8(raw.reshape(len(rows), self.cols), self.spread(scales, rows))
        return values.reshape(chunk.shape)

    def spread(self, scales: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """FP8 block scales [scale rows, column blocks] as one value per element of the chunk's rows."""
        per_row = scales[rows - rows[0]]
        return np.repeat(per_row, self.q.block[1], axis=1)[:, : self.cols]

    def block_amax(self, chunk: Chunk, values: np.ndarray) -> np.ndarray:
        """The absmax of each scale block of a chunk's values: [scale rows, scales per row]."""
        q, rows = self.q, self.scale_rows(chunk)
        flat = np.abs(values.reshape(len(rows), self.cols))
        if q.format.method == "mxfp4":
            return flat.reshape(len(rows), -1, q.block[1]).max(axis=-1)
        amax = np.maximum.reduceat(flat, np.flatnonzero(np.diff(rows, prepend=-1)), axis=0)
        return np.maximum.reduceat(amax, np.arange(0, self.cols, q.block[1]), axis=1)

    def quantise(self, chunk: Chunk, values: np.ndarray) -> tuple[Quantised, np.ndarray]:
        """(the chunk requantised with new block scales, its dequantised values)."""
        q, rows = self.q, self.scale_rows(chunk)
        flat = values.reshape(len(rows), self.cols)
        if q.format.method == "mxfp4":
            data, exps = codec.quantise_mxfp4(flat)
            return Quantised(data, exps, int(rows[0])), codec.dequantise_mxfp4(data, exps)
        scales = codec.fp8_scales(self.block_amax(chunk, values), q.pow2_scales)
        spread = self.spread(scales, rows)
        data = codec.encode_fp8(flat / spread)
        return Quantised(data, scales, int(rows[0])), codec.dequantise_fp8(data, spread)


def edited_quantised(q: QuantTensor, r: np.ndarray, hidden_axis: int, scale: float, budget: int, stack: ExitStack,
                     take_scratch=None, preserve: bool = False
                     ) -> Iterator[tuple[Chunk, np.ndarray, Scratch, QuantFile]]:
    """(chunk, float32 edited values, scratch, file) of a quantised tensor in file order."""
    file = QuantFile(q, stack)
    for chunk, values, scratch in iter_edited_chunks(-1, q.values, r, hidden_axis, scale, budget // BUDGET_DIVISOR,
                                                     take_scratch, read=file.read, preserve=preserve,
                                                     row_align=row_align(q, hidden_axis)):
        yield chunk, values, scratch, file


def chunk_reader(fd: int, edit, d: int, budget: int, stack: ExitStack) -> tuple:
    """(read(chunk, scratch), the chunks `apply` uses) for an edit's tensor: its stored values, or an FP8 / MXFP4
    tensor's dequantised ones (for readers of what `apply` reads, such as the adapter export)."""
    if edit.quant is None:
        return (lambda chunk, scratch: read_stored(fd, edit.info, chunk, scratch),
                plan_chunks(edit.info, edit.hidden_axis, d, budget))
    file = QuantFile(edit.quant, stack)
    return file.read, plan_chunks(edit.info, edit.hidden_axis, d, budget // BUDGET_DIVISOR,
                                  row_align(edit.quant, edit.hidden_axis))


def changed_quantised(q: QuantTensor, change, budget: int, stack: ExitStack, take_scratch
                      ) -> Iterator[tuple[Chunk, np.ndarray, Scratch, QuantFile]]:
    """(chunk, values, scratch, file) of a quantised tensor read in rows of whole scale blocks, each chunk's
    dequantised [rows, cols] values changed in place by `change(first row, values)` (a LoRA merge's delta)."""
    file = QuantFile(q, stack)
    cols = q.shape[-1]
    for chunk in plan_chunks(q.values, -1, cols, budget // BUDGET_DIVISOR, row_align(q, -1)):
        scratch = take_scratch()
        values = file.read(chunk, scratch).reshape(-1, cols)
        change(chunk.first // cols, values)
        yield chunk, values, scratch, file


def write_quantised(target, r: np.ndarray | None, preserve: bool = False, chunks=None) -> QuantError:
    """Stream one edited quantised tensor (a shard_writer.Target whose edit has `quant`) into its output
    place and its new scales into their tensor's place; returns what requantising cost. The values are the
    projection by `r`, or `chunks` (changed_quantised's) when given."""
    edit, q = target.edit, target.edit.quant
    scales_fd, scales_dst = target.scales_at
    scale_size = 4 if q.format.scale_dtype == "F32" else 1
    width = q.scale_grid[1] if q.format.method == "fp8" else q.shape[-1] // q.block[1]
    err_sq = norm_sq = worst = 0.0
    with ExitStack() as stack:
        if chunks is None:
            chunks = edited_quantised(q, r, edit.hidden_axis, edit.scale, target.budget, stack, target.buffers.take,
                                      preserve)
        else:
            chunks = chunks(stack)
        for chunk, values, scratch, file in chunks:
            out, back = file.quantise(chunk, values)
            error = back - values.reshape(back.shape)
            err_sq += float(np.square(error, dtype=np.float64).sum())
            norm_sq += float(np.square(values, dtype=np.float64).sum())
            worst = max(worst, float(np.abs(error).max(initial=0.0)))
            done = _after(2, lambda s=scratch: target.buffers.give_back(s))
            target.writer.write(target.dst_fd, memoryview(out.data.reshape(-1)),
                                target.dst + chunk.first // q.format.values_per_byte, done)
            target.writer.write(scales_fd, memoryview(out.scales.reshape(-1).view(np.uint8)),
                                scales_dst + out.scale_row * width * scale_size, done)
    return QuantError(edit.name, q.format.method, math.sqrt(err_sq / norm_sq) if norm_sq else 0.0, worst)


def _after(n: int, then):
    """A callback that runs `then` on its n-th call (the writer thread calls it once per finished write)."""
    lock, left = threading.Lock(), [n]

    def done() -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            then()
    return done


def summarise(errors: tuple[QuantError, ...], echo) -> None:
    """The per-tensor quantisation error of re-quantised tensors, largest first (ten of them)."""
    worst = sorted(errors, key=lambda e: -e.relative_rms)
    if worst:
        echo(f"re-quantised {len(worst)} tensors; quantisation error (RMS relative to |W'|, max abs):")
    for e in worst[:10]:
        echo(f"  {e.name} ({e.type_name}): {e.relative_rms:.2e}, {e.max_abs:.2e}")
