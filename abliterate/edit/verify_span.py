"""The bound `verify` enforces on a tensor edited with several directions (rank k), streamed within a budget.

`apply` computes, per group g (a column of a [d, in] matrix, or a row of an [n, d] tensor) with x the original
values along the hidden axis and Q [k, d] the orthonormal rows as it used them (float32): c_i = q_i . x
summed in float32, T_i = fl(s c_i), then y = x - q_1 T_1 - ... - q_k T_k one exact-product term at a time,
rounded once to the stored dtype. Recomputed here in float64 as y* = x - s Q^T (Q x), every element must meet

    |y_j - y*_j| <= rho |y_j| + sum_i |q_ij| (|s| gamma_d a_i + 3 u |s c_i|) + k u (|x_j| + sum_i |q_ij s c_i|) + tiny

with a_i = sum_k |q_ik x_k| (the float32 summation bound of c_i, gamma_d = d u / (1 - d u)), u the compute
unit roundoff, rho one rounding of the stored dtype (verify_tensor.element_rounding) and tiny its smallest
normal: the coefficient errors, the k product and subtraction roundings, and the final rounding. Unlike the
rank-1 check, the coefficients are not estimated from y, so the summation slack is per element.

Norm-preserving (`apply --norm-preserve`): apply then multiplies z = x - sum_i q_i T_i by its factor
F = fl(sqrt(S / (S - (2s - s^2) sum_i c_i^2))) (S = |x|^2 summed in float64; 1 where the denominator is not
positive) and rounds once more. Recomputed as y* = F* z*, every element must meet

    |y_j - y*_j| <= rho_2 |y_j| + F_hi (1 + u) E_j + dF |z*_j| + tiny

with E_j the right-hand side above without its rho |y_j| and tiny terms (z's own error), rho_2 two roundings as for
one direction (verify_preserve.preserve_rounding), [F_lo, F_hi] the range F takes over every c' the float32
summation bound allows (F is monotonic in sum c'^2 / S) and dF = max(F* - F_lo, F_hi - F*) + (u + 8 2^-53) F_hi:
the factor's summation slack, its float32 rounding and a few float64 ones.
"""

from __future__ import annotations

import math

import numpy as np

from abliterate.edit.projection import TINY, Chunk, Scratch, plan_chunks
from abliterate.edit.verify_preserve import F64_U, preserve_rounding
from abliterate.edit.verify_tensor import BLOCK_ELEMENTS, TensorCheck, _f64, _read, element_rounding, unit_roundoff
from abliterate.io.safetensors_format import TensorInfo


class _SpanChecker:
    def __init__(self, info: TensorInfo, q: np.ndarray, scale: float, preserve: bool = False) -> None:
        dtype = info.dtype
        self.q = np.asarray(np.asarray(q, dtype=np.float64 if dtype == "F64" else np.float32), dtype=np.float64)
        self.abs_q = np.abs(self.q)
        self.s, self.dtype, self.preserve = scale, dtype, preserve
        self.u, self.rho, self.tiny = unit_roundoff(dtype), element_rounding(dtype), TINY[dtype]
        d = self.q.shape[1]
        self.gamma = d * self.u / (1 - d * self.u)
        self.eta = (d + 4) * F64_U
        self.result = TensorCheck()
        self.pending = (np.zeros(0), np.zeros(0), np.zeros(0))  # (c, a, S) of the big matrix being checked in blocks

    def coefficients(self, x: np.ndarray, rows: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(Q x, |Q| |x|, |x|^2) of columns x [rows, m] over the given rows of Q: [k, m], [k, m], [m]."""
        return self.q[:, rows] @ x, self.abs_q[:, rows] @ np.abs(x), np.einsum("jm,jm->m", x, x)

    def _factor(self, c: np.ndarray, a: np.ndarray, ss: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(F*, F_hi, dF) per group: the norm-preserving factor recomputed, the largest apply can have computed and
        how far apply's can be from F* (see the module docstring)."""
        k2 = 2 * self.s - self.s**2
        safe = np.where(ss > 0, ss, 1.0)

        def factor(cc: np.ndarray, slack: float) -> tuple[np.ndarray, np.ndarray]:
            left = 1 - k2 * cc / (safe * (1 + slack))
            return left > 0, np.where(left > 0, 1 / np.sqrt(np.where(left > 0, left, 1.0)), 1.0)

        spread = self.gamma * a
        _, f = factor(np.einsum("km,km->m", c, c), 0.0)
        pos_a, fa = factor(np.square(np.maximum(np.abs(c) - spread, 0.0)).sum(0), self.eta)
        pos_b, fb = factor(np.square(np.abs(c) + spread).sum(0), -self.eta)
        lo, hi = np.minimum(fa, fb), np.maximum(fa, fb)
        hi = np.where(pos_a != pos_b, np.inf, hi)  # the denominator may reach 0: any factor >= 1 is possible
        lo = np.where(pos_a != pos_b, np.minimum(lo, 1.0), lo)
        zero = ss == 0
        f, lo, hi = np.where(zero, 1.0, f), np.where(zero, 1.0, lo), np.where(zero, 1.0, hi)
        return f, hi, np.maximum(f - lo, hi - f) + (self.u + 8 * F64_U) * hi

    def check(self, x: np.ndarray, y: np.ndarray, c: np.ndarray, a: np.ndarray, rows: slice,
              ss: np.ndarray | None = None) -> None:
        """Elements of columns x, y [rows, m] against the bound, given their groups' c, a [k, m] (and S [m])."""
        q, abs_q, s = self.q[:, rows], self.abs_q[:, rows], self.s
        sc = s * c
        want = x - q.T @ sc
        err = (abs_q.T @ (abs(s) * self.gamma * a + 3 * self.u * np.abs(sc))
               + q.shape[0] * self.u * (np.abs(x) + abs_q.T @ np.abs(sc)))
        if self.preserve and ss is not None:
            f, hi, df = self._factor(c, a, ss)
            with np.errstate(invalid="ignore"):  # hi = inf (any factor possible): no bound on those groups
                err = np.where(np.isinf(hi), np.inf, hi * (1 + self.u) * err + df * np.abs(want))
            want = f * want
            allowed = preserve_rounding(self.dtype) * np.abs(y) + err + self.tiny
        else:
            allowed = self.rho * np.abs(y) + err + self.tiny
        with np.errstate(invalid="ignore"):
            ratios = np.where(np.isinf(allowed), 0.0, np.abs(y - want) / np.where(np.isinf(allowed), 1.0, allowed))
        if ratios.size:
            if not np.isfinite(ratios).all():
                self.result.finite = False
            else:
                self.result.element_ratio = max(self.result.element_ratio, float(ratios.max()))
        self.result.norm += float(np.square(x).sum())

    def along(self, y_coeff: np.ndarray) -> None:
        self.result.along += float(np.square(y_coeff).sum())


def check_span_edited(src_fd: int, info: TensorInfo, dst_fd: int, edited: TensorInfo, q: np.ndarray,
                      scale: float, hidden_axis: int, budget: int, preserve: bool = False) -> TensorCheck:
    """Check `edited` (rank-k edit of `info` by the rows of q, norm-preserving if asked) against the bound above,
    chunk by chunk."""
    check = _SpanChecker(info, q, scale, preserve)
    d = check.q.shape[1]
    scratch = Scratch()
    chunks = plan_chunks(info, hidden_axis, d, budget)
    every = slice(0, d)
    for i, chunk in enumerate(chunks):
        if chunk.rows is not None:
            _row_block(chunks, i, src_fd, info, dst_fd, edited, check, scratch)
            continue
        xs, ys = _read(src_fd, info, chunk, scratch, 0), _read(dst_fd, edited, chunk, scratch, 1)
        if hidden_axis == -1:  # groups are rows of [n, d]
            step = max(1, BLOCK_ELEMENTS // d)
            for b in range(0, xs.shape[0], step):
                x, y = _f64(xs[b : b + step], info.dtype).T, _f64(ys[b : b + step], info.dtype).T
                c, a, ss = check.coefficients(x, every)
                check.check(x, y, c, a, every, ss)
                check.along(check.q @ y)
            continue
        for xm, ym in zip(xs, ys, strict=True):  # whole [d, in] matrices: groups are columns
            _matrix(xm, ym, info.dtype, check)
    check.result.coefficient_ratio = 0.0  # folded into the element bound above
    check.result.along, check.result.norm = math.sqrt(check.result.along), math.sqrt(check.result.norm)
    return check.result


def _matrix(xm: np.ndarray, ym: np.ndarray, dtype: str, check: _SpanChecker) -> None:
    """One stored [d, in] matrix in float64 row blocks of cache size: coefficients first, then the elements."""
    k, n = check.q.shape[0], xm.shape[1]
    step = max(1, BLOCK_ELEMENTS // max(n, 1))
    blocks = [slice(b, min(b + step, xm.shape[0])) for b in range(0, xm.shape[0], step)]
    c, a, yc, ss = np.zeros((k, n)), np.zeros((k, n)), np.zeros((k, n)), np.zeros(n)
    for rows in blocks:
        part = check.coefficients(_f64(xm[rows], dtype), rows)
        c, a, ss, yc = c + part[0], a + part[1], ss + part[2], yc + check.q[:, rows] @ _f64(ym[rows], dtype)
    check.along(yc)
    for rows in blocks:
        check.check(_f64(xm[rows], dtype), _f64(ym[rows], dtype), c, a, rows, ss)


def _row_block(chunks: list[Chunk], i: int, src_fd: int, info: TensorInfo, dst_fd: int, edited: TensorInfo,
               check: _SpanChecker, scratch: Scratch) -> None:
    """Row blocks of a matrix bigger than the budget: at its first block sum the coefficients over all of its
    blocks (as `apply` does), then check each block as it comes."""
    chunk = chunks[i]
    assert chunk.rows is not None
    if chunk.rows.start == 0:
        k, n = check.q.shape[0], info.shape[-1]
        c, a, yc, ss = np.zeros((k, n)), np.zeros((k, n)), np.zeros((k, n)), np.zeros(n)
        for block in chunks[i:]:
            xs, ys = _read(src_fd, info, block, scratch, 0)[0], _read(dst_fd, edited, block, scratch, 1)[0]
            step = max(1, BLOCK_ELEMENTS // max(n, 1))
            for b in range(0, xs.shape[0], step):
                rows = slice(block.rows.start + b, block.rows.start + min(b + step, xs.shape[0]))
                x, y = _f64(xs[b : b + step], info.dtype), _f64(ys[b : b + step], info.dtype)
                part = check.coefficients(x, rows)
                c, a, ss, yc = c + part[0], a + part[1], ss + part[2], yc + check.q[:, rows] @ y
            if block.last:
                break
        check.pending = (c, a, ss)
        check.along(yc)
    c, a, ss = check.pending
    xs, ys = _read(src_fd, info, chunk, scratch, 0)[0], _read(dst_fd, edited, chunk, scratch, 1)[0]
    step = max(1, BLOCK_ELEMENTS // max(xs.shape[1], 1))
    for b in range(0, xs.shape[0], step):
        rows = slice(chunk.rows.start + b, chunk.rows.start + min(b + step, xs.shape[0]))
        check.check(_f64(xs[b : b + step], info.dtype), _f64(ys[b : b + step], info.dtype), c, a, rows, ss)
