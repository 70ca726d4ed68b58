"""The bound `verify` enforces on an FP8 or MXFP4 tensor edited in its own format: every element, dequantised
with the written scales, within one quantisation step of the edit of the original's dequantised values.

The expected values are recomputed from the original with the editor's float32 projection (the same chunks
when the budget is the edit's, as `verify` arranges); their difference from the exact projection is a float32
rounding, far below a step (2^-4 of a value for e4m3, 2^-2 for e2m1). The step is the grid spacing at each
expected value's magnitude, with the block scale the expected values themselves give (absmax / 448 for FP8,
the smallest power of two over absmax / 6 for MXFP4): a corrupted value or scale is more than a step off.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np

from abliterate.edit import quant_codec as codec
from abliterate.edit.projection import NonFiniteError, Scratch
from abliterate.edit.quantised import QuantFile, edited_quantised
from abliterate.io.quantised import QuantTensor


@dataclass
class QuantCheck:
    element_ratio: float = 0.0  # worst |have - want| / step
    finite: bool = True


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
                flat = want.reshape(have.shape)
                if not np.isfinite(have).all():
                    check.finite = False
                    return check
                ratio = np.abs(have - flat) / _step(file, chunk, flat)
                check.element_ratio = max(check.element_ratio, float(ratio.max(initial=0.0)))
        except NonFiniteError:
            check.finite = False
    return check


def _step(file: QuantFile, chunk, want: np.ndarray) -> np.ndarray:
    """One step of the format at each expected value, with the block scales the expected values give."""
    out, _ = file.quantise(chunk, want.astype(np.float32))
    if file.q.format.method == "mxfp4":
        scales = np.exp2(out.scales.astype(np.float64) - 127)
        per_element = np.repeat(scales, file.q.block[1], axis=1)
        return np.maximum(codec.fp4_step(want, per_element), np.finfo(np.float32).tiny)
    per_element = file.spread(out.scales.astype(np.float64), file.scale_rows(chunk))
    return np.maximum(codec.fp8_step(want, per_element), np.finfo(np.float32).tiny)
