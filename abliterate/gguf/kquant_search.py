"""The scale searches of llama.cpp's reference K-quant quantisers, vectorised over groups of values.

Each search works on `x` laid out [n, G]: G groups (sub-blocks) of n values, one group per column, so
that a sum over a group is numpy's reduction along axis 0 of a C-contiguous array: sequential, in
float32, in the order the reference's loop adds (which is what makes the result bit-identical; a
pairwise or float64 sum would round differently and pick another scale in a few blocks). Every
product and quotient is evaluated in float32 in the reference's order, without fused multiply-adds.
Integers are rounded half to even, as the reference's `nearest_int` does.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)


def nearest(v: np.ndarray) -> np.ndarray:
    """Round half to even to float32 integers (the reference's magic-number rounding)."""
    return np.rint(v)


def seq_sum(a: np.ndarray) -> np.ndarray:
    """sum over axis 0 starting from +0, left to right in float32 (`float s = 0; s += a[i]`)."""
    return np.add.reduce(a, axis=0, initial=F32(0.0))


def first_absmax(x: np.ndarray) -> np.ndarray:
    """Per column, the value with the largest magnitude (the first one on ties)."""
    return np.take_along_axis(x, np.argmax(np.abs(x), axis=0)[None], axis=0)[0]


def search_min_scale(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group, an affine quantisation x ~ scale * L - the_min with L in 0..nmax: the reference's
    `make_qkx2_quants` (a weighted least-squares fit at nstep + 1 trial inverse scales, keeping the
    trial with the smallest weighted error). Returns (scale, the_min, L as float32)."""
    with np.errstate(all="ignore"):
        lo = np.minimum(x.min(axis=0), F32(0.0))
        hi = x.max(axis=0)
        sum_w = np.add.reduce(w, axis=0)
        sum_x = np.add.reduce(w * x, axis=0)
        flat = hi == lo
        iscale = F32(nmax) / (hi - lo)
        scale = F32(1.0) / iscale
        levels = np.clip(nearest(iscale * (x - lo)), 0, nmax)
        best = _error(scale * levels + lo - x, w, use_mad)
        the_min = lo  # each trial starts from the best fit's min so far, as the reference's does
        trial, wl, tmp = np.empty_like(x), np.empty_like(x), np.empty_like(x)  # reused: no allocation per trial
        for step in range(nstep + 1):
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (hi - the_min)
            np.subtract(x, the_min, out=trial)
            trial *= iscale
            np.rint(trial, out=trial)
            np.clip(trial, F32(0.0), F32(nmax), out=trial)
            np.multiply(w, trial, out=wl)
            sum_l = seq_sum(wl)
            sum_l2 = seq_sum(np.multiply(wl, trial, out=tmp))
            sum_xl = seq_sum(np.multiply(wl, x, out=tmp))
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0
            this_min = np.where(positive, F32(0.0), this_min)
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            np.multiply(trial, this_scale, out=tmp)  # this_scale * l + this_min - x, in the reference's order
            tmp += this_min
            tmp -= x
            if use_mad:
                np.abs(tmp, out=tmp)
            else:
                tmp *= tmp
            tmp *= w
            error = seq_sum(tmp)
            better = (det > 0) & (error < best)
            if better.any():
                np.copyto(levels, trial, where=better)
                best = np.where(better, error, best)
                scale = np.where(better, this_scale, scale)
                the_min = np.where(better, this_min, the_min)
        return np.where(flat, F32(0.0), scale), -the_min, np.where(flat, F32(0.0), levels)


def _error(diff: np.ndarray, w: np.ndarray, use_mad: bool) -> np.ndarray:
    return seq_sum(w * (np.abs(diff) if use_mad else diff * diff))


def search_symmetric_scale(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group, x ~ scale * l with l in -nmax..nmax-1, weighted by x^2: the reference's
    `make_qx_quants` with rmse_type 1 (19 trial inverse scales around -nmax / max, the one with the
    largest (sum w x l)^2 / sum w l^2 kept). Returns (scale, L = l + nmax as float32)."""
    with np.errstate(all="ignore"):
        peak = first_absmax(x)
        empty = np.abs(peak) < GROUP_MAX_EPS
        w = x * x
        wx = w * x

        def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            levels = np.clip(nearest(iscale * x), -nmax, nmax - 1)
            return levels, seq_sum(wx * levels), seq_sum(w * levels * levels)

        levels, sumlx, suml2 = trial(F32(-nmax) / peak)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0.0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            candidate, sumlx, suml2 = trial(-(F32(nmax) + F32(0.1) * F32(step)) / peak)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            levels = np.where(better, candidate, levels)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
        return np.where(empty, F32(0.0), scale), np.where(empty, F32(0.0), levels + F32(nmax))


def search_q3_scale(x: np.ndarray, nmax: int = 4, tries: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Per group, the reference's `make_q3_quants` with its refinement: start from -nmax / max, then up to
    `tries` passes that move one level at a time where it raises (sum w x l)^2 / sum w l^2 (w = x^2),
    a group stopping after a pass that changed nothing. Returns (scale, L = l + nmax as float32)."""
    with np.errstate(all="ignore"):
        peak = first_absmax(x)
        empty = np.abs(peak) < GROUP_MAX_EPS
        levels = np.clip(nearest(F32(-nmax) / peak * x), -nmax, nmax - 1)
        w = x * x
        wx = w * x
        sumlx, suml2 = seq_sum(wx * levels), seq_sum(w * levels * levels)
        active = ~empty
        for _ in range(tries):
            changed = np.zeros_like(active)
            for i in range(x.shape[0]):
                xi, wi, wxi, li = x[i], w[i], wx[i], levels[i]
                slx = sumlx - wxi * li
                sl2 = suml2 - wi * li * li
                new = np.clip(nearest(xi * sl2 / slx), -nmax, nmax - 1)
                slx2 = slx + wxi * new
                sl22 = sl2 + wi * new * new
                take = active & (slx > 0) & (new != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
                levels[i] = np.where(take, new, li)
                sumlx = np.where(take, slx2, sumlx)
                suml2 = np.where(take, sl22, suml2)
                changed |= take
            active &= changed
            if not active.any():
                break
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0.0))
        return np.where(empty, F32(0.0), scale), np.where(empty, F32(0.0), levels + F32(nmax))
