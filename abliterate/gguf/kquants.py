"""K-quants (Q2_K ... Q6_K) quantised and dequantised with numpy, vectorised over super-blocks of 256.

Quantising follows llama.cpp's reference quantisers (`quantize_row_qN_K_ref`, the path llama-quantize
takes without an importance matrix) step for step in float32, so an edited K-quant tensor is written
as llama.cpp itself would write it: tests/test_gguf_kquants.py checks the bytes against the reference
C routines' output (tests/data/kquant_reference.json, made by benchmarks/kquant_reference.py). The
block layouts are ggml's (ggml-common.h): scales are float16, sub-block scales packed in 4, 6 or 8 bits.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from abliterate.gguf.kquant_search import (
    F32,
    GROUP_MAX_EPS,
    nearest,
    search_min_scale,
    search_q3_scale,
    search_symmetric_scale,
    seq_sum,
)

QK_K = 256
BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
KQUANT_TYPES = tuple(BLOCK_BYTES)


def _f16(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.asarray(v, np.float32).astype(np.float16)


def _groups(x: np.ndarray, n: int) -> np.ndarray:
    """[blocks, 256] -> [n, blocks * 256 / n]: one sub-block of n values per column."""
    return np.ascontiguousarray(x.reshape(-1, n).T)


def _blocks(g: np.ndarray, n: int, nb: int) -> np.ndarray:
    """The inverse of _groups: [n, blocks * 256 / n] -> [blocks, 256 / n, n]."""
    return g.T.reshape(nb, QK_K // n, n)


def _u8(v: np.ndarray) -> np.ndarray:
    """An integer-valued float array as C converts an int to uint8_t (modulo 256)."""
    return (v.astype(np.int64) & 0xFF).astype(np.uint8)


def _pack_bits(levels: np.ndarray, bits: int, stride: int) -> np.ndarray:
    """[blocks, k * 8 / bits * stride] levels -> [blocks, k * stride] bytes: byte j of each run of
    `stride` holds levels j, j + stride, ... at bit offsets 0, bits, 2 bits, ... (ggml's qs layout)."""
    nb = levels.shape[0]
    per = 8 // bits
    v = levels.astype(np.uint8).reshape(nb, -1, per, stride)
    out = np.zeros((nb, v.shape[1], stride), np.uint8)
    for k in range(per):
        out |= v[:, :, k] << (bits * k)
    return out.reshape(nb, -1)


def _unpack_bits(data: np.ndarray, bits: int, stride: int) -> np.ndarray:
    nb = data.shape[0]
    v = data.reshape(nb, -1, 1, stride)
    shifts = (np.arange(8 // bits, dtype=np.uint8) * bits).reshape(1, 1, -1, 1)
    return ((v >> shifts) & ((1 << bits) - 1)).reshape(nb, -1)


def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins per block -> ggml's 12 bytes (Q4_K, Q5_K)."""
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _unpack_scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ls = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    lm = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return ls, lm


def _quantize_affine(x: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, ...]:
    """Q4_K / Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins. Returns (d, dmin, ls, lm, levels)."""
    nb = x.shape[0]
    g = _groups(x, 32)
    av = np.sqrt(seq_sum(g * g) / F32(32))
    scales, mins, levels = search_min_scale(g, av + np.abs(g), nmax, rmin, 0.1, nstep, False)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(axis=1), F32(0.0))
    max_min = np.maximum(mins.max(axis=1), F32(0.0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0.0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0.0))
    ls = np.minimum(_u8(nearest(inv_scale[:, None] * scales)), 63)
    lm = np.minimum(_u8(nearest(inv_min[:, None] * mins)), 63)
    d, dmin = _f16(max_scale / F32(63)), _f16(max_min / F32(63))
    step = d.astype(np.float32)[:, None] * ls.astype(np.float32)
    offset = dmin.astype(np.float32)[:, None] * lm.astype(np.float32)
    levels = _blocks(levels, 32, nb)
    with np.errstate(all="ignore"):
        fresh = np.clip(nearest((x.reshape(nb, 8, 32) + offset[..., None]) / step[..., None]), 0, nmax)
    levels = np.where((step != 0)[..., None], fresh, levels).reshape(nb, QK_K).astype(np.uint8)
    return d, dmin, ls, lm, levels


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, ls, lm, levels = _quantize_affine(x, 15, -1.0, 20)
    return np.concatenate([_halves(d, dmin), _pack_scale_min_k4(ls, lm), _pack_bits(levels, 4, 32)], axis=1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, ls, lm, levels = _quantize_affine(x, 31, -0.5, 15)
    high = _pack_bits(levels >> 4, 1, 32)
    return np.concatenate([_halves(d, dmin), _pack_scale_min_k4(ls, lm), high, _pack_bits(levels & 15, 4, 32)],
                          axis=1)


def _halves(*values: np.ndarray) -> np.ndarray:
    return np.stack(values, axis=1).view(np.uint8).reshape(values[0].shape[0], -1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    scales, levels = search_symmetric_scale(_groups(x, 16), 32)
    scales = scales.reshape(nb, 16)
    max_scale = np.take_along_axis(scales, np.argmax(np.abs(scales), axis=1)[:, None], axis=1)[:, 0]
    empty = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(all="ignore"):
        iscale = F32(-128.0) / max_scale
        d = np.where(empty, np.float16(0), _f16(F32(1.0) / iscale))
        q_scales = np.minimum(nearest(iscale[:, None] * scales), 127)
        q_scales = np.where(empty[:, None], 0, q_scales).astype(np.int64).astype(np.int8)
        step = d.astype(np.float32)[:, None] * q_scales.astype(np.float32)
        fresh = np.clip(nearest(x.reshape(nb, 16, 16) / step[..., None]), -32, 31) + 32
    levels = np.where((step != 0)[..., None], fresh, _blocks(levels, 16, nb)).reshape(nb, QK_K).astype(np.uint8)
    levels[empty] = 0
    low = (levels & 15).reshape(nb, 2, 2, 64)  # halves of 128, then the two 64-runs sharing a byte
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(nb, 128)
    qh = _pack_bits(levels >> 4, 2, 32)
    return np.concatenate([ql, qh, q_scales.view(np.uint8), d.view(np.uint8).reshape(nb, 2)], axis=1)


def quantize_q3_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    scales, levels = search_q3_scale(_groups(x, 16))
    scales = scales.reshape(nb, 16)
    max_scale = np.take_along_axis(scales, np.argmax(np.abs(scales), axis=1)[:, None], axis=1)[:, 0]
    with np.errstate(all="ignore"):
        iscale = F32(-32.0) / max_scale
        has = max_scale != 0
        q = np.where(has[:, None], np.clip(nearest(iscale[:, None] * scales), -32, 31) + 32, 0).astype(np.uint8)
        d = np.where(has, _f16(F32(1.0) / iscale), np.float16(0))
        step = d.astype(np.float32)[:, None] * (q.astype(np.float32) - F32(32)) * has[:, None]
        fresh = np.clip(nearest(x.reshape(nb, 16, 16) / step[..., None]), -4, 3) + 4
    levels = np.where((step != 0)[..., None], fresh, _blocks(levels, 16, nb)).reshape(nb, QK_K).astype(np.uint8)
    packed = np.zeros((nb, 12), np.uint8)
    packed[:, 0:8] = (q[:, 0:8] & 0xF) | ((q[:, 8:16] & 0xF) << 4)
    high = (q >> 4).reshape(nb, 4, 4)  # scale j's high bits go to byte 8 + j % 4 at bit 2 * (j // 4)
    packed[:, 8:12] = high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) | (high[:, 3] << 6)
    hmask = _pack_bits(levels >> 2, 1, 32)
    qs = _pack_bits(levels & 3, 2, 32)
    return np.concatenate([hmask, qs, packed, d.view(np.uint8).reshape(nb, 2)], axis=1)


def quantize_q2_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    g = _groups(x, 16)
    scales, mins, levels = search_min_scale(g, np.abs(g), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
    max_scale = np.maximum(scales.max(axis=1), F32(0.0))
    max_min = np.maximum(mins.max(axis=1), F32(0.0))
    with np.errstate(all="ignore"):
        ls = np.where(max_scale[:, None] > 0, _u8(nearest((F32(15) / max_scale)[:, None] * scales)), 0)
        lm = np.where(max_min[:, None] > 0, _u8(nearest((F32(15) / max_min)[:, None] * mins)), 0)
    packed = (ls.astype(np.uint8) | (lm.astype(np.uint8) << 4)).astype(np.uint8)
    d = np.where(max_scale > 0, _f16(max_scale / F32(15)), np.float16(0))
    dmin = np.where(max_min > 0, _f16(max_min / F32(15)), np.float16(0))
    step = d.astype(np.float32)[:, None] * (packed & 0xF).astype(np.float32)
    offset = dmin.astype(np.float32)[:, None] * (packed >> 4).astype(np.float32)
    with np.errstate(all="ignore"):
        fresh = np.clip(nearest((x.reshape(nb, 16, 16) + offset[..., None]) / step[..., None]), 0, 3)
    levels = np.where((step != 0)[..., None], fresh, _blocks(levels, 16, nb)).reshape(nb, QK_K).astype(np.uint8)
    return np.concatenate([packed, _pack_bits(levels, 2, 32), _halves(d, dmin)], axis=1)


QUANTIZERS = {"Q2_K": quantize_q2_k, "Q3_K": quantize_q3_k, "Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k,
              "Q6_K": quantize_q6_k}


SLICE_BLOCKS = 512  # the searches' temporaries per slice: about 15 arrays of 512 KB, cache-sized


def quantize_kquant(values: np.ndarray, type_name: str) -> np.ndarray:
    """float32 values (a multiple of 256) -> the type's blocks as bytes, [blocks, block bytes]: slices
    of SLICE_BLOCKS blocks, on as many threads as there are cores (numpy releases the GIL in its loops)."""
    x = np.ascontiguousarray(values, np.float32).reshape(-1, QK_K)
    out = np.empty((x.shape[0], BLOCK_BYTES[type_name]), np.uint8)

    def one(start: int) -> None:
        out[start : start + SLICE_BLOCKS] = QUANTIZERS[type_name](x[start : start + SLICE_BLOCKS])

    starts = range(0, x.shape[0], SLICE_BLOCKS)
    if len(starts) == 1:
        one(0)
    else:
        list(_pool().map(one, starts))
    return out


@functools.cache
def _pool() -> ThreadPoolExecutor:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return ThreadPoolExecutor(max_workers=min(8, cores), thread_name_prefix="kquant")


def _affine_steps(raw: np.ndarray, nsub: int, head: int) -> tuple[np.ndarray, np.ndarray]:
    """(step, offset) per sub-block of Q4_K/Q5_K blocks [blocks, bytes]: value = step * level - offset."""
    halves = raw[:, head : head + 4].copy().view(np.float16).astype(np.float32)
    ls, lm = _unpack_scale_min_k4(raw[:, head + 4 : head + 16])
    return halves[:, :1] * ls.astype(np.float32), halves[:, 1:2] * lm.astype(np.float32)


def kquant_steps(raw: np.ndarray, type_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(step, levels - 1) per sub-block of written K-quant blocks: [blocks, sub-blocks] float32 steps,
    so that verify can bound an element's error by its own sub-block's step."""
    if type_name in ("Q4_K", "Q5_K"):
        return _affine_steps(raw, 8, 0)[0], np.float32(15 if type_name == "Q4_K" else 31)
    if type_name == "Q6_K":
        d = raw[:, 208:210].copy().view(np.float16).astype(np.float32)
        return np.abs(d * raw[:, 192:208].view(np.int8).astype(np.float32)), np.float32(63)
    if type_name == "Q3_K":
        d = raw[:, 108:110].copy().view(np.float16).astype(np.float32)
        return np.abs(d * _q3_scales(raw[:, 96:108]).astype(np.float32)), np.float32(7)
    d = raw[:, 80:82].copy().view(np.float16).astype(np.float32)
    return d * (raw[:, 0:16] & 0xF).astype(np.float32), np.float32(3)


def _q3_scales(packed: np.ndarray) -> np.ndarray:
    low = np.concatenate([packed[:, 0:8] & 0xF, packed[:, 0:8] >> 4], axis=1)
    high = (packed[:, 8:12, None] >> (2 * np.arange(4, dtype=np.uint8))) & 3  # [blocks, j % 4, j // 4]
    return (low | (high.transpose(0, 2, 1).reshape(-1, 16) << 4)).astype(np.int16) - 32


def dequantize_kquant(raw: np.ndarray, type_name: str) -> np.ndarray:
    """Blocks of the type as bytes -> float32 values [blocks, 256] (ggml's dequantize_row_qN_K)."""
    raw = raw.reshape(-1, BLOCK_BYTES[type_name])
    nb = raw.shape[0]
    if type_name in ("Q4_K", "Q5_K"):
        step, offset = _affine_steps(raw, 8, 0)
        if type_name == "Q4_K":
            levels = _unpack_bits(raw[:, 16:144], 4, 32)
        else:
            levels = _unpack_bits(raw[:, 48:176], 4, 32) | (_unpack_bits(raw[:, 16:48], 1, 32) << 4)
        values = step[..., None] * levels.reshape(nb, 8, 32).astype(np.float32) - offset[..., None]
    elif type_name == "Q6_K":
        ql = raw[:, 0:128].reshape(nb, 2, 1, 64)
        low = ((ql >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 15).reshape(nb, 256)
        levels = low | (_unpack_bits(raw[:, 128:192], 2, 32) << 4)
        d = raw[:, 208:210].copy().view(np.float16).astype(np.float32)
        step = d * raw[:, 192:208].view(np.int8).astype(np.float32)
        values = step[..., None] * (levels.reshape(nb, 16, 16).astype(np.float32) - 32)
    elif type_name == "Q3_K":
        levels = _unpack_bits(raw[:, 32:96], 2, 32) | (_unpack_bits(raw[:, 0:32], 1, 32) << 2)
        d = raw[:, 108:110].copy().view(np.float16).astype(np.float32)
        step = d * _q3_scales(raw[:, 96:108]).astype(np.float32)
        values = step[..., None] * (levels.reshape(nb, 16, 16).astype(np.float32) - 4)
    else:
        halves = raw[:, 80:84].copy().view(np.float16).astype(np.float32)
        sc = raw[:, 0:16]
        step, offset = halves[:, :1] * (sc & 0xF).astype(np.float32), halves[:, 1:2] * (sc >> 4).astype(np.float32)
        levels = _unpack_bits(raw[:, 16:80], 2, 32).reshape(nb, 16, 16).astype(np.float32)
        values = step[..., None] * levels - offset[..., None]
    return values.reshape(nb, QK_K)
