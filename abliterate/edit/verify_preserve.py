"""The bound `verify` enforces on a norm-preserving edit (`apply --norm-preserve`), streamed within a budget.

`apply` computes, per group g (a column of an [d, in] matrix, or a row of an [n, d] tensor) with x the
original values along the hidden axis (float32; float64 for float64 tensors): c' = sum_k r_k x_k in some
order, T = fl(s c'), z_i = fl(x_i - fl(r_i T)), the factor F = fl(sqrt(S / (S - (2s - s^2) c'^2))) from
S = |x|^2 summed in float64 (1 where the denominator is not positive), and y_i = round(fl(z_i F)) to the
stored dtype. So y = F (x - r T) + e with |e_i| <= rho |y_i| + u |F r_i T|, rho = (2u + e) / (1 - 2u - e)
(two float32 roundings, then e: half a step of a 16-bit dtype, 0 otherwise). Verify, in float64 from the
two files and r as apply used it:

1. estimates F and T per group: with P the projection orthogonal to r, P y = F P x + P e, so
   F* = (Px . Py) / |Px|^2, and r . y = F (r . x - T r . r) + r . e gives T*; their error bounds Da and
   DT follow from the bound on e (Cauchy-Schwarz with |Px_i| <= |x_i| + |r_i| |r . x| / r . r);
2. checks every element: |y_i - F* (x_i - r_i T*)| <= rho |y_i| + 3u |F* r_i T*| + Da |x_i - r_i T*|
   + (|F*| + Da) |r_i| DT + tiny;
3. checks the coefficient as the plain edit's: |T* - s c| <= |s| gamma_d sum_k |r_k x_k| + u |T*| + DT, with
   c = r . x in float64 and gamma_d = d u / (1 - d u);
4. checks the factor: F* must lie within Da plus one rounding (u, and a few float64 ones) of the range
   F takes over every c' the float32 summation bound allows, F being monotonic in c'^2 / S.

The only slack that is not one or two rounding steps is the float32 summation bound, per group, as for the
plain edit (verify_tensor.py). Each chunk of the two files is read once (twice for a matrix bigger than
the budget, as `apply` reads it).
"""

from __future__ import annotations

import numpy as np

from abliterate.edit.projection import EPS
from abliterate.edit.verify_tensor import CheckerBase, TensorCheck, stream_check, unit_roundoff
from abliterate.io.safetensors_format import TensorInfo

F64_U = 2.0**-53


def preserve_rounding(dtype: str) -> float:
    """rho: the relative error of a stored value of the norm-preserving edit: the subtraction and the
    multiplication by F in the compute dtype, then rounding to the stored dtype."""
    u = unit_roundoff(dtype)
    e = 0.0 if dtype in ("F32", "F64") else EPS[dtype] / 2
    return (2 * u + e) / (1 - 2 * u - e)


class _Sums:
    """Running sums over the hidden axis for m groups."""

    def __init__(self, m: int) -> None:
        # r.x, |r|.|x|, x.x, r.y, x.y, |x|.|y|, |r|.|y|
        self.c, self.a, self.s, self.ry, self.xy, self.xay, self.q = (np.zeros(m) for _ in range(7))

    def add(self, r: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        """r [k]; x, y [k, m] float64."""
        ar, ax, ay = np.abs(r), np.abs(x), np.abs(y)
        self.c += r @ x
        self.a += ar @ ax
        self.s += np.einsum("km,km->m", x, x)
        self.ry += r @ y
        self.xy += np.einsum("km,km->m", x, y)
        self.xay += np.einsum("km,km->m", ax, ay)
        self.q += ar @ ay


class _PreserveChecker(CheckerBase):
    sums = _Sums  # the running sums `finish` turns into the per-group estimates

    def __init__(self, info: TensorInfo, r: np.ndarray, scale: float) -> None:
        super().__init__(info, r, scale, preserve_rounding(info.dtype))
        self.pending: tuple[np.ndarray, ...] = ()  # estimates of the big matrix whose row blocks are being checked

    def finish(self, g: _Sums) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(F*, T*, Da, DT) per group, with the coefficient and factor checks and the residual sums recorded."""
        rr, u, rho = self.rr, self.u, self.rho
        e64 = (self.d + 4) * F64_U  # float64 evaluation of the sums below
        pxpx = g.s - g.c * g.c / rr
        pxpy = g.xy - g.c * g.ry / rr
        noise = e64 * (g.s + g.c * g.c / rr)
        usable = pxpx > noise  # else x lies along r (or is 0): apply's factor is 1 there
        safe = np.where(usable, pxpx, 1.0)
        f = np.where(usable, pxpy / safe, 1.0)
        t = (g.c - g.ry / np.where(f != 0, f, 1.0)) / rr
        abs_f, abs_t, abs_c = np.abs(f), np.abs(t), np.abs(g.c)
        da = np.where(usable, (rho * (g.xay + abs_c * g.q / rr) + 4 * u * abs_f * abs_t * (g.a + abs_c)
                               + abs_f * noise + e64 * (g.xay + abs_c * g.q / rr)) / safe, 0.0)
        firm = abs_f > da
        low = np.where(firm, abs_f - da, 1.0)
        dt = np.where(firm, (np.abs(g.ry) * da / (np.maximum(abs_f, 1e-300) * low)
                             + (rho * g.q + 4 * u * abs_f * abs_t * rr) / low) / rr, np.inf)
        allowed = abs(self.scale) * self.gamma * g.a + u * abs_t + dt + self.tiny
        self._worst(np.abs(t - self.scale * g.c), allowed)
        lo, hi = self._factor_range(g)
        half = (hi - lo) / 2 + (u + 8 * F64_U) * hi + da + self.tiny
        self._worst(np.abs(f - (lo + hi) / 2), half)
        self.result.along += float(np.square(g.ry).sum())
        return f, t, da, dt

    def _factor_range(self, g: _Sums) -> tuple[np.ndarray, np.ndarray]:
        """The least and greatest factor apply can compute for c' within the float32 summation bound of c."""
        k = 2 * self.scale - self.scale**2
        spread = self.gamma * g.a
        c_lo, c_hi = np.maximum(np.abs(g.c) - spread, 0.0), np.abs(g.c) + spread
        eta = (self.d + 4) * F64_U
        s = np.where(g.s > 0, g.s, 1.0)
        ends = []
        for ratio in (c_lo * c_lo / (s * (1 + eta)), c_hi * c_hi / (s * (1 - eta))):
            left = 1 - k * ratio
            ends.append((left > 0, np.where(left > 0, 1 / np.sqrt(np.where(left > 0, left, 1.0)), 1.0)))
        (pos_a, fa), (pos_b, fb) = ends
        lo, hi = np.minimum(fa, fb), np.maximum(fa, fb)
        hi = np.where(pos_a != pos_b, np.inf, hi)  # the denominator may reach 0: any factor >= 1 is possible
        zero = g.s == 0
        return np.where(zero, 1.0, np.where(pos_a != pos_b, np.minimum(lo, 1.0), lo)), np.where(zero, 1.0, hi)

    def check_elements(self, r: np.ndarray, x: np.ndarray, y: np.ndarray, est: tuple[np.ndarray, ...]) -> None:
        f, t, da, dt = est
        rt = np.multiply.outer(r, t)
        proj = x - rt
        dev = np.abs(y - f * proj)
        allowed = (self.rho * np.abs(y) + 3 * self.u * np.abs(f * rt) + da * np.abs(proj)
                   + np.multiply.outer(np.abs(r), (np.abs(f) + da) * dt) + self.tiny)
        self._worst(dev, allowed, field="element_ratio")
        self.result.norm += float(np.square(x).sum())

    def _worst(self, dev: np.ndarray, allowed: np.ndarray, field: str = "coefficient_ratio") -> None:
        if dev.size == 0:
            return
        if not np.isfinite(dev).all():
            self.result.finite = False
            return
        ratios = np.where(np.isinf(allowed), 0.0, dev / np.where(np.isinf(allowed), 1.0, allowed))
        setattr(self.result, field, max(getattr(self.result, field), float(ratios.max())))


def check_preserved_tensor(src_fd: int, info: TensorInfo, dst_fd: int, edited: TensorInfo, r: np.ndarray,
                           scale: float, hidden_axis: int, budget: int) -> TensorCheck:
    """Check `edited` (the norm-preserving edit of `info` along r) against the bound above, chunk by chunk."""
    return stream_check(_PreserveChecker(info, r, scale), src_fd, info, dst_fd, edited, hidden_axis, budget)
