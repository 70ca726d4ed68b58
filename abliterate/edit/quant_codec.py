"""FP8 e4m3fn and FP4 e2m1 (MXFP4) numbers in numpy: decoding through a table, encoding with round to
nearest, ties to even, and the block scales of each format (pure; io/quantised.py says where they are).

* FP8 block-scaled: value = e4m3(q) x s per block of (rows, cols); a block's new scale is absmax / 448 (the
  largest e4m3fn value, so nothing saturates), 1 for an all-zero block, rounded up to a power of two when the
  checkpoint keeps its scales as ue8m0.
* MXFP4: value = e2m1(nibble) x 2^(byte - 127) per 32 values; a block's exponent is the smallest with
  absmax <= 6 x 2^e (6 is e2m1's largest value), byte 0 for an all-zero block.
"""

from __future__ import annotations

import numpy as np

FP8_MAX = 448.0
FP4_MAX = 6.0
FP4_POSITIVE = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)


def _fp8_table() -> np.ndarray:
    codes = np.arange(256)
    exp, man = (codes >> 3) & 0xF, (codes & 7).astype(np.float64)
    value = np.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * np.exp2(exp - 7.0))
    value = np.where(codes & 0x80, -value, value)
    value[(codes & 0x7F) == 0x7F] = np.nan
    return value.astype(np.float32)


FP8_VALUES = _fp8_table()
FP4_VALUES = np.concatenate([FP4_POSITIVE, -FP4_POSITIVE])
# a byte's two values (low nibble first) as one 8-byte item: one 1-D gather dequantises a byte
FP4_PAIRS = np.stack([FP4_VALUES[np.arange(256) & 0x0F], FP4_VALUES[np.arange(256) >> 4]], -1).view(np.uint64)[:, 0]
POW2 = np.append(np.exp2(np.arange(-127, 128, dtype=np.float64)).astype(np.float32), np.float32(np.nan))  # e8m0


def _encode(x: np.ndarray, mantissa_bits: int, bias: int, top_code: int) -> np.ndarray:
    """float32 values (already divided by their scale) as codes of a small float format with `mantissa_bits`,
    exponent `bias` and largest finite code `top_code` (sign bit above it): round to nearest, ties to even, on
    the float32 bits (dropping 23 - m bits with the usual carry), saturating; below the smallest normal
    (2^(1 - bias)) the subnormal grid of step 2^(1 - bias - m), by rint (ties to even too)."""
    a = np.abs(np.asarray(x, dtype=np.float32))
    bits = a.view(np.uint32)
    drop = 23 - mantissa_bits
    normal = (bits + np.uint32((1 << (drop - 1)) - 1) + ((bits >> np.uint32(drop)) & np.uint32(1))) >> np.uint32(drop)
    normal = normal.astype(np.int32) - ((127 - bias) << mantissa_bits)
    smallest = np.float32(2.0 ** (1 - bias))
    sub = np.rint(a * np.float32(2.0 ** (bias - 1 + mantissa_bits))).astype(np.int32)
    code = np.minimum(np.where(a < smallest, sub, normal), top_code).astype(np.uint8)
    code |= (np.signbit(x).astype(np.uint8) << np.uint8(3 + 4 * (mantissa_bits == 3)))
    return code


def encode_fp8(x: np.ndarray) -> np.ndarray:
    """float32 values (already divided by their scale) as e4m3fn bytes (saturating at 448)."""
    return _encode(x, 3, 7, 0x7E)


# e2m1 by thresholds (7 compares on bytes beat rounding on float bits): the midpoints between neighbouring values,
# a tie going to the even code (the lower value at 0.25, 1.25, 2.5, 5; the upper one at 0.75, 1.75, 3.5)
FP4_MIDPOINTS = ((0.75, False), (1.25, True), (1.75, False), (2.5, True), (3.5, False), (5.0, True))


def encode_fp4(x: np.ndarray) -> np.ndarray:
    """float32 values (already divided by their scale) as e2m1 nibbles (one per uint8, saturating at 6)."""
    a = np.abs(x)
    code = (a > np.float32(0.25)).view(np.uint8).copy()
    for midpoint, tie_down in FP4_MIDPOINTS:
        code += (a > np.float32(midpoint)) if tie_down else (a >= np.float32(midpoint))
    code |= np.signbit(x).view(np.uint8) << np.uint8(3)
    return code


def fp8_scales(amax: np.ndarray, pow2: bool = False) -> np.ndarray:
    """Each block's float32 scale_inv from its absmax."""
    s = (amax.astype(np.float32) / np.float32(FP8_MAX)).astype(np.float32)
    if pow2:
        s = np.exp2(np.ceil(np.log2(np.maximum(s, np.finfo(np.float32).tiny)))).astype(np.float32)
    return np.where(amax > 0, s, np.float32(1))


def mxfp4_exponents(amax: np.ndarray) -> np.ndarray:
    """Each block's e8m0 byte: the smallest e with absmax <= 6 x 2^e (byte 0 for a zero block)."""
    a = amax.astype(np.float64)
    mant, e = np.frexp(a / FP4_MAX)
    e = np.where(mant == 0.5, e - 1, e)
    e = np.where(a > FP4_MAX * np.exp2(e.astype(np.float64)), e + 1, e)
    return np.where(a > 0, np.clip(e + 127, 0, 254), 0).astype(np.uint8)


def dequantise_fp8(raw: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """[rows, cols] e4m3 bytes times their per-element scales (broadcastable) in float32."""
    return FP8_VALUES[raw] * scales


def dequantise_mxfp4(raw: np.ndarray, exponents: np.ndarray) -> np.ndarray:
    """[rows, G, 16] packed bytes and [rows, G] exponents as [rows, 32 G] float32 values."""
    values = FP4_PAIRS[raw].view(np.float32)
    values *= POW2[exponents][..., None]
    return values.reshape(*raw.shape[:-2], -1)


def quantise_mxfp4(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[rows, 32 G] float32 -> ([rows, G, 16] packed bytes, [rows, G] exponent bytes)."""
    blocks = values.reshape(*values.shape[:-1], -1, 32)
    exponents = mxfp4_exponents(np.abs(blocks).max(axis=-1))
    nibbles = encode_fp4(blocks * POW2[254 - exponents.astype(np.int32)][..., None])
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).astype(np.uint8), exponents


def fp8_step(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """One e4m3 step at each value's magnitude, in value units (the spacing of the grid around |v| / s)."""
    a = np.abs(values) / scales
    _, e = np.frexp(a * (1 + 2.0**-10))
    return np.ldexp(np.ones_like(a), np.maximum(e - 1, -6) - 3) * scales


def fp4_step(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """One e2m1 step at each value's magnitude, in value units."""
    a = np.abs(values) / scales
    _, e = np.frexp(a * (1 + 2.0**-10))
    return np.ldexp(np.ones_like(a), np.clip(e - 1, 0, 2) - 1) * scales
