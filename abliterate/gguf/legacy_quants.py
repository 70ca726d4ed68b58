"""Q8_0, Q4_0, Q5_0, Q4_1 and Q5_1 quantised and dequantised in few whole-array numpy passes.

The formulas are llama.cpp's reference quantisers' (`quantize_row_q8_0_ref` etc.), as the gguf library
also implements them (tests/test_gguf_kquants.py finds the bytes equal to the library's); the library
applies them to groups of 16 rows with many temporaries, which made its (de)quantisation most of a
GGUF edit's time. Blocks are [blocks, 32] float32 values; scales are float16.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q5_0": 22, "Q4_1": 20, "Q5_1": 24}
LEGACY_TYPES = tuple(BLOCK_BYTES)


def _f16(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return v.astype(np.float16)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, F32(0.0), F32(1.0) / d)


def round_away(v: np.ndarray) -> np.ndarray:
    """C's roundf (halves away from zero), in place: rint, then the exact halves that rint sent to even
    moved one away from zero."""
    q = np.rint(v)
    ties = np.flatnonzero(np.abs(v - q) == 0.5)
    if ties.size:
        flat, src = q.reshape(-1), v.reshape(-1)
        flat[ties] = np.trunc(src[ties]) + np.sign(src[ties])
    return q


def _first_absmax(x: np.ndarray) -> np.ndarray:
    return np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """32 levels per block -> 16 bytes: level j in the low nibble of byte j, level j + 16 in the high."""
    return (q[:, :16] & 0xF) | (q[:, 16:] << 4)


def _fifth_bits(q: np.ndarray) -> np.ndarray:
    return np.packbits((q >> 4).astype(np.uint8), axis=1, bitorder="little")


SLICE_BLOCKS = 2048  # 64k values per pass: temporaries stay in cache instead of faulting in fresh pages


def quantize_legacy(values: np.ndarray, type_name: str) -> np.ndarray:
    """float32 values (a multiple of 32) -> [blocks, block bytes], a cache-sized slice at a time."""
    x = np.ascontiguousarray(values, F32).reshape(-1, 32)
    out = np.empty((x.shape[0], BLOCK_BYTES[type_name]), np.uint8)
    for start in range(0, x.shape[0], SLICE_BLOCKS):
        out[start : start + SLICE_BLOCKS] = _quantize(x[start : start + SLICE_BLOCKS], type_name)
    return out


def _quantize(x: np.ndarray, type_name: str) -> np.ndarray:
    if type_name == "Q8_0":
        d = np.abs(x).max(axis=1, keepdims=True) / F32(127)
        q = round_away(x * _inverse(d))
        return np.concatenate([_f16(d).view(np.uint8), q.astype(np.int8).view(np.uint8)], axis=1)
    if type_name in ("Q4_0", "Q5_0"):
        half = F32(8 if type_name == "Q4_0" else 16)
        d = _first_absmax(x) / -half
        scaled = x * _inverse(d)
        scaled += half + F32(0.5)
        q = np.minimum(scaled.astype(np.int8).astype(np.uint8), 2 * int(half) - 1)
        parts = [_f16(d).view(np.uint8)] + ([_fifth_bits(q)] if type_name == "Q5_0" else []) + [_nibbles(q)]
        return np.concatenate(parts, axis=1)
    top = 15 if type_name == "Q4_1" else 31
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    d = (hi - lo) / F32(top)
    scaled = (x - lo) * _inverse(d)
    scaled += F32(0.5)
    q = np.minimum(scaled.astype(np.uint8), top)
    parts = [_f16(d).view(np.uint8), _f16(lo).view(np.uint8)]
    return np.concatenate(parts + ([_fifth_bits(q)] if type_name == "Q5_1" else []) + [_nibbles(q)], axis=1)


def dequantize_legacy(raw: np.ndarray, type_name: str) -> np.ndarray:
    """[blocks, block bytes] (or flat bytes) -> float32 [blocks, 32], a cache-sized slice at a time."""
    raw = raw.reshape(-1, BLOCK_BYTES[type_name])
    out = np.empty((raw.shape[0], 32), F32)
    for start in range(0, raw.shape[0], SLICE_BLOCKS):
        out[start : start + SLICE_BLOCKS] = _dequantize(raw[start : start + SLICE_BLOCKS], type_name)
    return out


def _dequantize(raw: np.ndarray, type_name: str) -> np.ndarray:
    d = raw[:, 0:2].copy().view(np.float16).astype(F32)
    if type_name == "Q8_0":
        return raw[:, 2:].view(np.int8).astype(F32) * d
    offset = 4 if type_name in ("Q4_1", "Q5_1") else 2
    low = raw[:, -16:]
    q = np.concatenate([low & 0xF, low >> 4], axis=1)
    if type_name in ("Q5_0", "Q5_1"):
        q |= np.unpackbits(raw[:, offset : offset + 4], axis=1, bitorder="little") << 4
    if type_name in ("Q4_1", "Q5_1"):
        return q.astype(F32) * d + raw[:, 2:4].copy().view(np.float16).astype(F32)
    return (q.astype(np.int8) - np.int8(8 if type_name == "Q4_0" else 16)).astype(F32) * d
