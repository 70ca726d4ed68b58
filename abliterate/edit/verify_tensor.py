"""The bound `verify` enforces on one edited tensor, checked streaming within a memory budget.

`apply` computes, per group g (a column of an [d, in] matrix, or a row of an [n, d] tensor) with x the
original values along the hidden axis, in float32 (float64 for float64 tensors): c' = sum_k r_k x_k
in some summation order, T = fl(s c'), and y_i = round(x_i - fl(r_i T)) to the stored dtype. So verify,
in float64 from the two files and r as apply used it (rounded to the compute dtype):

1. estimates T per group by least squares, T* = r.(x - y) / r.r, with its error bound D from the
   rounding of y (a rank-1 edit leaves nothing else);
2. checks every element: |y_i - (x_i - r_i T*)| <= rho |y_i| + 3 u |r_i T*| + |r_i| D + tiny, where
   rho is one rounding of the stored dtype plus one float32 subtraction (u for float32 itself:
   (eps/2 + u) / (1 - eps) for 16-bit), u the compute unit roundoff (2^-24; 2^-53 for float64) and
   tiny the smallest normal number of the dtype;
3. checks the coefficient against r^T W computed in float64: |T* - s c| <= |s| gamma_d sum_k |r_k x_k|
   + u |T*| + D, gamma_d = d u / (1 - d u), the classic bound on summing d products in float32 in any
   order (the only slack that is not one rounding step: it is per group, not per element).

Each chunk of the two files is read once (twice for a matrix bigger than the budget, as `apply`
reads it), and the float64 work is done in cache-sized blocks on top of the chunk buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from abliterate.edit.projection import EPS, STORAGE, TINY, Chunk, Scratch, plan_chunks, widen
from abliterate.io.safetensors_format import TensorInfo, pread_into

# float64 elements per block of work: a handful of 128 KB temporaries on top of the two chunk buffers
BLOCK_ELEMENTS = 1 << 14


def unit_roundoff(dtype: str) -> float:
    """u of the dtype `apply` computes in for this stored dtype."""
    return 2.0**-53 if dtype == "F64" else 2.0**-24


def element_rounding(dtype: str) -> float:
    """rho: relative error of one stored value: the float32 subtraction, then rounding to the dtype."""
    u = unit_roundoff(dtype)
    return u if dtype in ("F32", "F64") else (EPS[dtype] / 2 + u) / (1 - EPS[dtype])


@dataclass
class TensorCheck:
    """Worst ratios of the measured error to its bound (<= 1 passes), and the norms for the residual check."""

    element_ratio: float = 0.0
    coefficient_ratio: float = 0.0
    along: float = 0.0  # |r^T W'| (Frobenius), float64
    norm: float = 0.0  # |W|
    finite: bool = True

    @property
    def ok(self) -> bool:
        return self.finite and self.element_ratio <= 1.0 and self.coefficient_ratio <= 1.0


class _Groups:
    """Running sums over the hidden axis for m groups: r.x, sum |r x|, r.(x - y), |r|.|y|, r.y."""

    def __init__(self, m: int) -> None:
        self.c, self.a, self.p, self.q, self.ry = (np.zeros(m) for _ in range(5))

    def add(self, r: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        """r [k]; x, y [k, m] float64."""
        self.c += r @ x
        self.a += np.abs(r) @ np.abs(x)
        self.p += r @ (x - y)
        self.q += np.abs(r) @ np.abs(y)
        self.ry += r @ y


class CheckerBase:
    """What both checkers (plain here, norm-preserving in verify_preserve) derive from the tensor's dtype and r:
    r as apply rounds it, widened to float64, the unit roundoff u, the per-element rounding rho, the dtype's
    tiny, and gamma, the bound on a d-term dot product's relative error."""

    def __init__(self, info: TensorInfo, r: np.ndarray, scale: float, rho: float) -> None:
        dtype = info.dtype
        self.r = np.asarray(np.asarray(r, dtype=np.float64 if dtype == "F64" else np.float32), dtype=np.float64)
        self.rr = float(self.r @ self.r)
        self.scale = scale
        self.u, self.rho, self.tiny = unit_roundoff(dtype), rho, TINY[dtype]
        self.d = self.r.size
        self.gamma = self.d * self.u / (1 - self.d * self.u)
        self.result = TensorCheck()


class _Checker(CheckerBase):
    sums = _Groups  # the running sums `finish` turns into the per-group estimates

    def __init__(self, info: TensorInfo, r: np.ndarray, scale: float) -> None:
        super().__init__(info, r, scale, element_rounding(info.dtype))
        self.abs_r_sum = float(np.abs(self.r).sum())
        self.pending = (np.zeros(0), np.zeros(0))  # (T*, D) of the big matrix whose row blocks are being checked

    def finish(self, g: _Groups) -> tuple[np.ndarray, np.ndarray]:
        """(T*, D) per group, with the coefficient check and the residual sums recorded."""
        t = g.p / self.rr
        delta = (self.rho * g.q + 3 * self.u * np.abs(t) * self.rr + self.tiny * self.abs_r_sum) / self.rr
        allowed = abs(self.scale) * self.gamma * g.a + self.u * np.abs(t) + delta + self.tiny
        self._worst("coefficient_ratio", np.abs(t - self.scale * g.c) / allowed)
        self.result.along += float(np.square(g.ry).sum())
        return t, delta

    def check_elements(self, r: np.ndarray, x: np.ndarray, y: np.ndarray, est: tuple[np.ndarray, ...]) -> None:
        t, delta = est
        rt = np.multiply.outer(r, t)
        dev = np.abs(y - (x - rt))
        allowed = self.rho * np.abs(y) + 3 * self.u * np.abs(rt) + np.multiply.outer(np.abs(r), delta) + self.tiny
        self._worst("element_ratio", dev / allowed)
        self.result.norm += float(np.square(x).sum())

    def _worst(self, field: str, ratios: np.ndarray) -> None:
        if ratios.size == 0:
            return
        if not np.isfinite(ratios).all():
            self.result.finite = False
            return
        setattr(self.result, field, max(getattr(self.result, field), float(ratios.max())))


def _read(fd: int, info: TensorInfo, chunk: Chunk, scratch: Scratch, slot: int) -> np.ndarray:
    nbytes = chunk.count * info.itemsize
    raw = scratch.take(slot, nbytes)
    pread_into(fd, memoryview(raw), info.start + chunk.first * info.itemsize)
    return raw.view(STORAGE[info.dtype]).reshape(chunk.shape)


def _f64(stored: np.ndarray, dtype: str) -> np.ndarray:
    return widen(stored, dtype).astype(np.float64)


def _row_blocks(rows: int, cols: int) -> range:
    return range(0, rows, max(1, BLOCK_ELEMENTS // max(cols, 1)))


def check_edited_tensor(src_fd: int, info: TensorInfo, dst_fd: int, edited: TensorInfo, r: np.ndarray,
                        scale: float, hidden_axis: int, budget: int) -> TensorCheck:
    """Check `edited` against the bound above, reading both files chunk by chunk within `budget` bytes."""
    return stream_check(_Checker(info, r, scale), src_fd, info, dst_fd, edited, hidden_axis, budget)


def stream_check(check, src_fd: int, info: TensorInfo, dst_fd: int, edited: TensorInfo, hidden_axis: int,
                 budget: int) -> TensorCheck:
    """Run a checker over a tensor and its edit, chunk by chunk within `budget` bytes, in two passes per group
    of written vectors: its running sums (`check.sums`) over the hidden axis, turned into estimates by
    `check.finish`, then `check.check_elements` against them. Shared by the plain and norm-preserving checks."""
    dtype, d = info.dtype, check.r.size
    scratch = Scratch()
    chunks = plan_chunks(info, hidden_axis, d, budget)
    for i, chunk in enumerate(chunks):
        if chunk.rows is not None:  # a row block of a matrix bigger than the budget
            _check_row_block(chunks, i, src_fd, info, dst_fd, edited, check, scratch)
            continue
        xs, ys = _read(src_fd, info, chunk, scratch, 0), _read(dst_fd, edited, chunk, scratch, 1)
        if hidden_axis == -1:  # groups are rows of [n, d]
            steps = _row_blocks(xs.shape[0], d)
            for b in steps:
                x, y = _f64(xs[b : b + steps.step], dtype).T, _f64(ys[b : b + steps.step], dtype).T
                g = check.sums(x.shape[1])
                g.add(check.r, x, y)
                check.check_elements(check.r, x, y, check.finish(g))
            continue
        for xm, ym in zip(xs, ys, strict=True):  # whole [d, in] matrices: groups are columns
            blocks = _row_blocks(d, xm.shape[1])
            g = check.sums(xm.shape[1])
            for b in blocks:
                g.add(check.r[b : b + blocks.step], _f64(xm[b : b + blocks.step], dtype),
                      _f64(ym[b : b + blocks.step], dtype))
            est = check.finish(g)
            for b in blocks:
                check.check_elements(check.r[b : b + blocks.step], _f64(xm[b : b + blocks.step], dtype),
                                     _f64(ym[b : b + blocks.step], dtype), est)
    check.result.along, check.result.norm = math.sqrt(check.result.along), math.sqrt(check.result.norm)
    return check.result


def _check_row_block(chunks: list[Chunk], i: int, src_fd: int, info: TensorInfo, dst_fd: int, edited: TensorInfo,
                     check, scratch: Scratch) -> None:
    """Row blocks of one big matrix: at its first block, sum the column statistics over all of its blocks
    (pass 1); then check each block's elements as it comes (pass 2)."""
    chunk = chunks[i]
    assert chunk.rows is not None
    if chunk.rows.start == 0:
        g = check.sums(info.shape[-1])
        for block in chunks[i:]:
            xs, ys = _read(src_fd, info, block, scratch, 0)[0], _read(dst_fd, edited, block, scratch, 1)[0]
            rb = check.r[block.rows]
            steps = _row_blocks(xs.shape[0], xs.shape[1])
            for b in steps:
                g.add(rb[b : b + steps.step], _f64(xs[b : b + steps.step], info.dtype),
                      _f64(ys[b : b + steps.step], info.dtype))
            if block.last:
                break
        check.pending = check.finish(g)
    xs, ys = _read(src_fd, info, chunk, scratch, 0)[0], _read(dst_fd, edited, chunk, scratch, 1)[0]
    rb = check.r[chunk.rows]
    steps = _row_blocks(xs.shape[0], xs.shape[1])
    for b in steps:
        check.check_elements(rb[b : b + steps.step], _f64(xs[b : b + steps.step], info.dtype),
                             _f64(ys[b : b + steps.step], info.dtype), check.pending)
