"""A GGUF file without loading it: what the `gguf` library parses, plus the few bytes streaming needs.

The header (scalar metadata, tensor infos, alignment) is parsed by header.py, which steps over the
metadata arrays (the gguf library's reader decodes each of a tokenizer's 150k entries); the gguf
library names the types and their block sizes. Tensor bytes are read with `pread` in chunks, so
memory stays bounded by one chunk.

To write an edited file the header is rebuilt from the input's own bytes: the metadata (key/value)
section is copied verbatim, and the tensor infos are re-encoded (name, dimensions, type, offset),
which changes bytes only where a tensor changes type or one is appended (an untied `output.weight`).
"""

from __future__ import annotations

import math
import struct
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from abliterate.errors import AbliterateError, first_line
from abliterate.gguf.header import HeaderError, parse_header
from abliterate.gguf.kquants import KQUANT_TYPES, dequantize_kquant, quantize_kquant
from abliterate.gguf.legacy_quants import LEGACY_TYPES, dequantize_legacy, quantize_legacy

GGUF_MAGIC = b"GGUF"
PREFIX = 24  # magic, version (u32), tensor count (u64), metadata count (u64)
# GGML types the projection handles as floats (the names projection.py uses), by GGML type name
FLOAT_TYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise AbliterateError("GGUF support needs the gguf package: pip install 'abliterate[gguf]'") from None
    return gguf


@dataclass(frozen=True)
class GgufTensor:
    """One tensor: numpy-order shape (GGUF stores dimensions innermost first), absolute byte range."""

    name: str
    type_name: str  # GGML type name: F32, F16, BF16, Q8_0, Q4_K, ...
    type_id: int
    shape: tuple[int, ...]
    start: int
    nbytes: int
    info_offset: int  # where its tensor info starts in the header

    @property
    def end(self) -> int:
        return self.start + self.nbytes

    @property
    def is_float(self) -> bool:
        return self.type_name in FLOAT_TYPES


@dataclass(frozen=True)
class GgufFile:
    path: Path
    version: int
    kv_count: int
    alignment: int
    data_start: int
    metadata_bytes: bytes  # the key/value section, verbatim
    metadata: dict[str, object]  # scalar and string values (arrays left out)
    tensors: tuple[GgufTensor, ...]  # in header order
    file_size: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def by_name(self) -> dict[str, GgufTensor]:
        return {t.name: t for t in self.tensors}

    def int_field(self, key: str) -> int:
        value = self.metadata.get(key)
        if not isinstance(value, int):
            raise AbliterateError(f"{self.path}: metadata {key} is missing or not an integer; the GGUF is incomplete "
                                  "(re-convert it with llama.cpp's convert_hf_to_gguf.py)")
        return value


def read_gguf(path: str | Path) -> GgufFile:
    """Parse and validate a GGUF header; a truncated or foreign file is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise AbliterateError(f"{path} does not exist or is not a file; pass a .gguf model file")
    with open(path, "rb") as f:
        head = f.read(PREFIX)
    if head[:4] != GGUF_MAGIC or len(head) < PREFIX:
        raise AbliterateError(f"{path} is not a GGUF file (it does not start with 'GGUF'); pass a llama.cpp model")
    if struct.unpack("<I", head[4:8])[0] & 0xFFFF == 0:
        raise AbliterateError(f"{path} is a big-endian GGUF; abliterate edits little-endian GGUFs only")
    gguf = _gguf()
    try:
        header = parse_header(path)
    except (HeaderError, ValueError, OSError) as e:
        raise AbliterateError(f"{path} is not a readable GGUF file ({first_line(e)}); it may be truncated: "
                              "download or convert it again") from None
    size = path.stat().st_size
    tensors = []
    for info in header.tensors:
        if info.type_id not in gguf.GGMLQuantizationType._value2member_map_:
            raise AbliterateError(f"{path}: tensor {info.name} has GGML type {info.type_id}, which this gguf "
                                  "package does not know; upgrade it (pip install -U gguf)")
        qtype = gguf.GGMLQuantizationType(info.type_id)
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        numel = math.prod(info.dims)
        tensors.append(GgufTensor(info.name, qtype.name, info.type_id, tuple(reversed(info.dims)),
                                  header.data_start + info.offset, numel // block * block_bytes, info.info_offset))
    end = max((t.end for t in tensors), default=header.data_start)
    if end > size:
        raise AbliterateError(f"{path} is truncated: its tensors need {end} bytes but the file has {size}; download "
                              "or convert it again")
    with open(path, "rb") as f:
        f.seek(PREFIX)
        metadata_bytes = f.read(header.metadata_end - PREFIX)
    return GgufFile(path, header.version, header.kv_count, header.alignment, header.data_start, metadata_bytes,
                    header.metadata, tuple(tensors), size)


def align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def encode_tensor_info(t: GgufTensor, relative_offset: int) -> bytes:
    name = t.name.encode()
    dims = list(reversed(t.shape))
    return b"".join((struct.pack("<Q", len(name)), name, struct.pack("<I", len(dims)),
                     struct.pack(f"<{len(dims)}Q", *dims), struct.pack("<IQ", t.type_id, relative_offset)))


def encode_header(src: GgufFile, tensors: list[tuple[GgufTensor, int]]) -> bytes:
    """The output header: the input's prefix with the new tensor count, its metadata verbatim, then the
    given (tensor, offset relative to the data section) infos, zero-padded to the alignment."""
    prefix = GGUF_MAGIC + struct.pack("<IQQ", src.version, len(tensors), src.kv_count)
    body = prefix + src.metadata_bytes + b"".join(encode_tensor_info(t, off) for t, off in tensors)
    return body + b"\0" * (align(len(body), src.alignment) - len(body))


def with_type(t: GgufTensor, type_name: str) -> GgufTensor:
    """The same tensor stored as another GGML type (its byte size recomputed)."""
    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    numel = math.prod(t.shape)
    return replace(t, type_name=type_name, type_id=int(qtype), nbytes=numel // block * size)


def block_layout(type_name: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a GGML type."""
    gguf = _gguf()
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Raw bytes of whole rows -> float32 values of `shape`."""
    if type_name in KQUANT_TYPES:
        return dequantize_kquant(raw, type_name).reshape(shape)
    if type_name in LEGACY_TYPES:
        return dequantize_legacy(raw, type_name).reshape(shape)
    gguf = _gguf()
    values = gguf.quants.dequantize(raw.reshape(-1, raw.size // math.prod(shape[:-1] or (1,))),
                                    gguf.GGMLQuantizationType[type_name])
    return np.ascontiguousarray(values, dtype=np.float32).reshape(shape)


def quantize(values: np.ndarray, type_name: str) -> np.ndarray:
    """float32 rows -> raw bytes of the GGML type (blocks along the last axis, as GGUF stores them).
    K-quants are written by kquants.py as llama.cpp's reference quantisers write them."""
    if type_name in KQUANT_TYPES:
        return quantize_kquant(values, type_name).reshape(-1)
    if type_name in LEGACY_TYPES:
        return quantize_legacy(values, type_name).reshape(-1)
    gguf = _gguf()
    out = gguf.quants.quantize(values.reshape(-1, values.shape[-1]), gguf.GGMLQuantizationType[type_name])
    return np.ascontiguousarray(out).view(np.uint8).reshape(-1)


def can_dequantize(type_name: str) -> bool:
    """Whether the gguf library can read this type's values (some new or exotic types it cannot)."""
    return _library_handles(type_name, lambda block, size: dequantize(np.zeros(size, np.uint8), type_name,
                                                                      (block_layout(type_name)[0],)))


def can_quantize(type_name: str) -> bool:
    """Whether this type can be written: K-quants here, others where the gguf library can (it
    dequantises more types than it quantises)."""
    return type_name in KQUANT_TYPES or _library_handles(
        type_name, lambda block, _size: quantize(np.zeros((1, block), np.float32), type_name))


def _library_handles(type_name: str, attempt) -> bool:
    """Whether `attempt(block elements, block bytes)` on one zero block of the type runs in the gguf library."""
    gguf = _gguf()
    if type_name not in gguf.GGMLQuantizationType.__members__:
        return False
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    try:
        attempt(block, size)
    except (NotImplementedError, KeyError, ValueError):
        return False
    return True


if sys.byteorder != "little":  # raw bytes are reinterpreted as little-endian numbers
    raise ImportError("abliterate needs a little-endian machine")
