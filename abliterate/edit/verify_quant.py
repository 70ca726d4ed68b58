"""The bound `verify` enforces on an FP8 or MXFP4 tensor edited in its own format: every element, dequantised
with the written scales, within one quantisation step of the edit of the original's dequantised values, and
every written block scale the one those values call for.

The expected values are recomputed from the original with the editor's float32 projection (the same chunks
when the budget is the edit's, as `verify` arranges); their difference from the exact projection is a float32
rounding, far below a step (2^-4 of a value for e4m3, 2^-2 for e2m1). A block's scale must be absmax / 448
(FP8) or the smallest power of two over absmax / 6 (MXFP4, and FP8 kept as ue8m0) of the expected values,
within 1e-5 (a power of two: the neighbouring one only where absmax is that close to the boundary). The step
is the grid spacing at each expected value's magnitude with that scale: a corrupted value or scale is caught.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np

from abliterate.edit import quant_codec as codec
from abliterate.edit.projection import Chunk, NonFiniteError, Scratch
from abliterate.edit.requantise import QuantFile, edited_quantised
from abliterate.io.quantised import QuantTensor

SCALE_TOLERANCE = 1e-5  # relative: the float32 arithmetic of the editor against the recomputation


@dataclass
class QuantCheck:
    element_ratio: float = 0.0  # worst |have - want| / step
    finite: bool = True
    scales_ok: bool = True


def check_quantised(original: QuantTensor, edited: QuantTensor, r: np.ndarray, scale: float, hidden_axis: int,
                    budget: int, preserve: bool = False) -> QuantCheck:
    check = QuantCheck()
    scratch = Scratch()
    with ExitStack() as stack:
        got = QuantFile(edited, stack)
        try:
            for chunk, want, _, file in edited_quantised(original, r, hidden_axis, scale, budget, stack,
                                                         preserve=preserve):
                have = got.read(chunk, scratch).reshape(-1, original.shape[-1]).astype(np.float64)
                if not np.isfinite(have).all():
                    check.finite = False
                    return check
                expected, written = _scales(file, got, chunk, want)
                check.scales_ok &= _scales_agree(file, expected, written, file.block_amax(chunk, want))
                ratio = np.abs(have - want.reshape(have.shape)) / _step(file, chunk, want.reshape(have.shape),
                                                                         expected)
                check.element_ratio = max(check.element_ratio, float(ratio.max(initial=0.0)))
        except NonFiniteError:
            check.finite = False
    return check


def _scales(file: QuantFile, got: QuantFile, chunk: Chunk, want: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the block scales the expected values call for, the written ones), as float64 multipliers."""
    out, _ = file.quantise(chunk, want)
    written = got.read_scales(out.scale_row, out.scales.shape[0])
    if file.q.format.method == "mxfp4":
        return np.exp2(out.scales.astype(np.float64) - 127), np.exp2(written.astype(np.float64) - 127)
    return out.scales.astype(np.float64), written.astype(np.float64)


def _scales_agree(file: QuantFile, expected: np.ndarray, written: np.ndarray, amax: np.ndarray) -> bool:
    close = np.abs(written - expected) <= SCALE_TOLERANCE * expected
    if file.q.format.method == "mxfp4" or file.q.pow2_scales:
        top = codec.FP4_MAX if file.q.format.method == "mxfp4" else codec.FP8_MAX
        power = np.exp2(np.round(np.log2(written))) == written
        fits = (amax <= top * written * (1 + SCALE_TOLERANCE)) & (amax >= top * written / 2 * (1 - SCALE_TOLERANCE))
        close |= power & fits
    return bool(close.all())


def _step(file: QuantFile, chunk: Chunk, want: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """One step of the format at each expected value, with the expected block scales."""
    if file.q.format.method == "mxfp4":
        per_element = np.repeat(scales, file.q.block[1], axis=1)
        return np.maximum(codec.fp4_step(want, per_element), np.finfo(np.float32).tiny)
    per_element = file.spread(scales, file.scale_rows(chunk))
    return np.maximum(codec.fp8_step(want, per_element), np.finfo(np.float32).tiny)
