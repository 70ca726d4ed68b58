"""Quantised safetensors checkpoints the editor takes in their own format: which tensors carry scales, how.

The formats are data (`FORMATS`, keyed by config.json's `quantization_config.quant_method`), following
transformers' own integrations (finegrained_fp8, mxfp4), so an edited folder loads where the original does:

* ``fp8`` (DeepSeek V3/R1, Qwen3 FP8 releases): `NAME` stored as float8 e4m3fn, `NAME_scale_inv` (for
  `X.weight`: `X.weight_scale_inv`) float32 with one value per block of `weight_block_size` (rows, columns;
  the last block of an axis may be partial); dequantised value = fp8 x scale_inv. `scale_fmt: ue8m0`: the
  scales are powers of two.
* ``mxfp4`` (gpt-oss experts): `X_blocks` uint8 [..., rows, G, 16], two FP4 e2m1 values per byte (low nibble
  first), `X_scales` uint8 [..., rows, G], an e8m0 exponent (2^(byte - 127)) per 32 values along the row;
  the dequantised [..., rows, 32 G] is the transpose of the parameter in memory (and of the bf16 release's `X`).

Only the headers are read here; the numbers are edit/quant_codec.py's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from abliterate.errors import AbliterateError
from abliterate.io.safetensors_format import TensorInfo

if TYPE_CHECKING:
    from abliterate.io.checkpoint import Checkpoint


@dataclass(frozen=True)
class QuantFormat:
    """One quantisation method's on-disk layout."""

    method: str  # quantization_config.quant_method
    data_dtype: str  # safetensors dtype of the stored values
    scale_dtype: str
    data_suffix: str  # the stored tensor's name is the logical name + data_suffix
    scale_suffix: str  # ... and its scales' (".weight" names: ".weight" + scale_suffix)
    values_per_byte: int
    row_block: int | None  # rows per scale (None: the config's weight_block_size)
    col_block: int | None  # values per scale along a row
    transposed: bool  # the in-memory parameter is the transpose of the dequantised stored layout


FORMATS: dict[str, QuantFormat] = {f.method: f for f in (
    QuantFormat("fp8", "F8_E4M3", "F32", "", "_scale_inv", 1, None, None, False),
    QuantFormat("mxfp4", "U8", "U8", "_blocks", "_scales", 2, 1, 32, True),
)}


@dataclass(frozen=True)
class QuantTensor:
    """One quantised tensor: stored values and scales (with the files holding them), the dequantised shape in
    the stored orientation [..., rows, cols] and the block (rows, cols) each scale covers."""

    format: QuantFormat
    data: TensorInfo
    data_path: Path
    scales: TensorInfo
    scales_path: Path
    shape: tuple[int, ...]
    block: tuple[int, int]
    logical_name: str  # the name the family files and a bf16 release use
    pow2_scales: bool = False  # scale_fmt ue8m0: scales must stay powers of two

    @property
    def scale_grid(self) -> tuple[int, int]:
        """Scales per matrix: (row blocks, column blocks)."""
        return math.ceil(self.shape[-2] / self.block[0]), math.ceil(self.shape[-1] / self.block[1])

    @property
    def values(self) -> TensorInfo:
        """The dequantised values as a float32 tensor (for the chunk planner; never read from a file)."""
        return TensorInfo(self.data.name, "F32", self.shape, 0, 4 * math.prod(self.shape))


def quant_method(config: dict) -> str | None:
    q = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    return q.get("quant_method") if isinstance(q, dict) else None


def quantised_tensors(ckpt: Checkpoint) -> dict[str, QuantTensor]:
    """Every quantised tensor of a checkpoint by its stored name (empty for an unquantised one); a layout
    that does not fit its format is one error naming the tensor."""
    config = ckpt.config.get("quantization_config") or ckpt.text_config.get("quantization_config")
    if not isinstance(config, dict) or config.get("quant_method") is None:
        return {}
    if config["quant_method"] not in FORMATS:
        raise AbliterateError(f"{ckpt.root} is quantised with {config['quant_method']!r}; abliterate edits "
                              f"{' and '.join(FORMATS)} checkpoints in their own format, other methods not: use the "
                              "bf16/fp16/fp32 release of this model")
    fmt = FORMATS[config["quant_method"]]
    if fmt.method == "fp8" and config.get("fmt", "e4m3") != "e4m3":
        raise AbliterateError(f"{ckpt.root}: FP8 format {config.get('fmt')!r} is not supported (only e4m3, as "
                              "DeepSeek V3 and Qwen3 ship); use a bf16 release of this model")
    found = {}
    for name, (shard, info) in ckpt.tensors.items():
        if info.dtype != fmt.data_dtype or not name.endswith(fmt.data_suffix):
            continue
        logical = name[: len(name) - len(fmt.data_suffix)] if fmt.data_suffix else name
        scale_name = _scale_name(fmt, logical)
        if scale_name not in ckpt.tensors:
            if fmt.method == "fp8":
                raise AbliterateError(f"{name} is float8 but its scales {scale_name} are not in {ckpt.root}: the "
                                      "checkpoint is incomplete (re-download it), or a view of some of its shards "
                                      "(`--push --stream`) split a weight from its scales (edit it whole)")
            continue  # a uint8 tensor that is not MXFP4 data
        scale_shard, scales = ckpt.tensors[scale_name]
        found[name] = _describe(fmt, config, ckpt.root, (shard, info), (scale_shard, scales), logical)
    return found


def scale_names(quantised: dict[str, QuantTensor]) -> dict[str, str]:
    """scale tensor name -> the stored tensor it scales."""
    return {q.scales.name: name for name, q in quantised.items()}


def _scale_name(fmt: QuantFormat, logical: str) -> str:
    return logical + fmt.scale_suffix


def _describe(fmt: QuantFormat, config: dict, root: Path, data: tuple[str, TensorInfo],
              scales: tuple[str, TensorInfo], logical: str) -> QuantTensor:
    (shard, info), (scale_shard, scale_info) = data, scales
    if scale_info.dtype != fmt.scale_dtype:
        raise AbliterateError(f"{scale_info.name} is {scale_info.dtype}, not the {fmt.scale_dtype} scales of "
                              f"{fmt.method}; this layout is not supported: use a bf16 release of this model")
    if fmt.method == "mxfp4":
        if len(info.shape) < 3 or info.shape[-1] * 2 != fmt.col_block or scale_info.shape != info.shape[:-1]:
            raise AbliterateError(f"{info.name} {list(info.shape)} with scales {list(scale_info.shape)} is not "
                                  "MXFP4 as gpt-oss stores it ([..., rows, G, 16] and [..., rows, G])")
        shape = (*info.shape[:-2], info.shape[-2] * fmt.col_block)
        return QuantTensor(fmt, info, root / shard, scale_info, root / scale_shard, shape,
                           (1, fmt.col_block), logical)
    shape = info.shape
    block = config.get("weight_block_size") or (shape[-2:] if len(shape) >= 2 else None)
    ok = (len(shape) >= 2 and isinstance(block, (list, tuple)) and len(block) == 2
          and all(isinstance(b, int) and b > 0 for b in block))
    want = (*shape[:-2], math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1])) if ok else None
    if want is None or (scale_info.shape != want and not (scale_info.shape == () and block == list(shape[-2:]))):
        raise AbliterateError(f"{info.name} {list(shape)} with scales {list(scale_info.shape)} does not fit "
                              f"weight_block_size {block}; the checkpoint or its config is inconsistent")
    return QuantTensor(fmt, info, root / shard, scale_info, root / scale_shard, tuple(shape),
                       (int(block[0]), int(block[1])), logical, pow2_scales=config.get("scale_fmt") == "ue8m0")
