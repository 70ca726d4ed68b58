"""The projection math for each orientation, on whole tensors or streamed in bounded chunks.

With r a unit vector of the hidden size d and s the scale (1 removes r fully, negative amplifies):

* hidden axis -2, ``W [..., d, in]`` (nn.Linear, fused experts [E, d, in]):  W' = W - s r (r^T W)
* hidden axis -1, ``W [..., d]`` (embeddings, Conv1D, [E, in, d], biases):     W' = W - s (W r) r^T

Both compute in float32 (float64 for float64 tensors) and cast back to the stored dtype once.
Streaming reads a tensor from a file descriptor in chunks bounded by a memory budget: rows of
[n, d] for axis -1; whole [k, d, in] matrices for axis -2, or, when one matrix exceeds the
budget, row blocks of it in two passes (sum r^T W over the blocks, then subtract).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .safetensors_io import TensorInfo, pread_into


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def coefficients(w: torch.Tensor, r: torch.Tensor, hidden_axis: int) -> torch.Tensor:
    """r^T W along the hidden axis: [..., in] for axis -2, [...] for axis -1."""
    return torch.matmul(r, w) if hidden_axis == -2 else torch.matmul(w, r)


def subtract_(w: torch.Tensor, r: torch.Tensor, coeff: torch.Tensor, hidden_axis: int, scale: float) -> None:
    """In place: W -= s r coeff (axis -2) or W -= s coeff r^T (axis -1), without a W-sized temporary."""
    if hidden_axis == -2:  # w [k, d, n], coeff [k, n]
        k, d, _ = w.shape
        w.baddbmm_(r.view(1, d, 1).expand(k, d, 1), coeff.unsqueeze(1), alpha=-scale)
    else:  # w [n, d], coeff [n]
        w.addr_(coeff, r, alpha=-scale)


def project(w: torch.Tensor, r: torch.Tensor, hidden_axis: int, scale: float = 1.0) -> torch.Tensor:
    """Whole-tensor reference: the edited tensor in w's dtype (for tests and small tensors)."""
    work = w.to(compute_dtype(w.dtype), copy=True)
    r = r.to(work.dtype)
    d = r.numel()
    view = work.reshape(-1, d, w.shape[-1]) if hidden_axis == -2 else work.reshape(-1, d)
    subtract_(view, r, coefficients(view, r, hidden_axis), hidden_axis, scale)
    return work.to(w.dtype)


@dataclass(frozen=True)
class Chunk:
    """Elements [first, first + count) of a tensor, viewed as `shape`.

    For a row block of an axis -2 matrix too big for the budget, `rows` is its slice of the d rows
    and `last` marks the block that completes the matrix.
    """

    first: int
    count: int
    shape: tuple[int, ...]
    rows: slice | None = None
    last: bool = True


def plan_chunks(info: TensorInfo, hidden_axis: int, d: int, budget: int) -> list[Chunk]:
    """Split a tensor so that one chunk's raw bytes, float32 copy and cast-back fit in `budget`."""
    numel = math.prod(info.shape)
    if numel == 0:
        return []
    per_elem = 2 * info.itemsize + torch.finfo(compute_dtype(info.torch_dtype)).bits // 8
    max_elems = max(budget // per_elem, 1)
    if hidden_axis == -1:
        rows = numel // d
        step = max(1, max_elems // d)
        return [Chunk(r0 * d, n * d, (n, d)) for r0 in range(0, rows, step) for n in [min(step, rows - r0)]]
    cols = info.shape[-1]
    matrix = d * cols
    batch = numel // matrix
    if matrix <= max_elems:
        step = max(1, max_elems // matrix)
        return [Chunk(b0 * matrix, k * matrix, (k, d, cols)) for b0 in range(0, batch, step)
                for k in [min(step, batch - b0)]]
    step = max(1, max_elems // cols)
    return [
        Chunk(b * matrix + r0 * cols, n * cols, (1, n, cols), slice(r0, r0 + n), r0 + n == d)
        for b in range(batch) for r0 in range(0, d, step) for n in [min(step, d - r0)]
    ]


def read_chunk(fd: int, info: TensorInfo, chunk: Chunk) -> torch.Tensor:
    """A chunk read into a fresh buffer and widened to compute precision."""
    raw = bytearray(chunk.count * info.itemsize)
    pread_into(fd, memoryview(raw), info.start + chunk.first * info.itemsize)
    t = torch.frombuffer(raw, dtype=info.torch_dtype).view(chunk.shape)
    return t.to(compute_dtype(t.dtype))  # a copy for 16-bit dtypes; the buffer itself for float32


def iter_edited_chunks(
    fd: int, info: TensorInfo, r: torch.Tensor, hidden_axis: int, scale: float, budget: int
) -> Iterator[tuple[Chunk, torch.Tensor]]:
    """Yield (chunk, edited values in the stored dtype) in file order."""
    r = r.to(compute_dtype(info.torch_dtype))
    chunks = plan_chunks(info, hidden_axis, r.numel(), budget)
    coeff: torch.Tensor | None = None
    for i, chunk in enumerate(chunks):
        if chunk.rows is None:
            w = read_chunk(fd, info, chunk)
            subtract_(w, r, coefficients(w, r, hidden_axis), hidden_axis, scale)
            yield chunk, w.to(info.torch_dtype)
            continue
        if chunk.rows.start == 0:  # first pass over this matrix's row blocks: r^T W
            coeff = torch.zeros(info.shape[-1], dtype=r.dtype)
            for block in chunks[i:]:
                coeff += torch.matmul(r[block.rows], read_chunk(fd, info, block)[0])
                if block.last:
                    break
        w = read_chunk(fd, info, chunk)
        subtract_(w, r[chunk.rows], coeff.unsqueeze(0), -2, scale)  # type: ignore[union-attr]
        yield chunk, w.to(info.torch_dtype)


def residual_along(
    fd: int, info: TensorInfo, r: torch.Tensor, hidden_axis: int, budget: int
) -> tuple[float, float]:
    """(|r^T W|, |W|) of a stored tensor, Frobenius norms in float64, streamed like the edit."""
    r = r.to(torch.float64)
    along = total = 0.0
    coeff: torch.Tensor | None = None
    for chunk in plan_chunks(info, hidden_axis, r.numel(), budget):
        w = read_chunk(fd, info, chunk).to(torch.float64)
        total += float(w.square().sum())
        if chunk.rows is None:
            along += float(coefficients(w, r, hidden_axis).square().sum())
            continue
        part = torch.matmul(r[chunk.rows], w[0])
        coeff = part if chunk.rows.start == 0 else coeff + part  # type: ignore[operator]
        if chunk.last:
            along += float(coeff.square().sum())
    return math.sqrt(along), math.sqrt(total)
