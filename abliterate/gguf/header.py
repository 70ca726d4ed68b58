"""A GGUF header parsed directly: scalar metadata, tensor infos and alignment, arrays skipped.

The gguf library's reader builds a numpy view of every element of every metadata array; a real model's
tokenizer arrays (150k tokens, 150k merges) made reading the header take seconds to tens of seconds,
twice per `verify`. Here arrays are stepped over (fixed-size elements at once, strings by their
lengths), and only what editing needs is decoded. Layout (GGUF v2/v3, little-endian): magic, version
u32, tensor count u64, kv count u64; kv pairs (key string, value type u32, value); tensor infos (name
string, n_dims u32, dims u64 x n_dims, type u32, offset u64 relative to the data section); padding to
`general.alignment` (default 32); the data section.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32


class HeaderError(ValueError):
    """The header is cut short or malformed."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: innermost first
    type_id: int
    offset: int  # relative to the data section
    info_offset: int  # where this info starts in the file


@dataclass(frozen=True)
class Header:
    version: int
    kv_count: int
    metadata: dict[str, object]  # scalars and strings (arrays left out)
    metadata_end: int  # where the tensor infos start
    tensors: tuple[TensorInfo, ...]
    alignment: int
    data_start: int


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes) -> None:
        self.buf, self.at = buf, 0

    def take(self, fmt: str) -> object:
        size = struct.calcsize(fmt)
        if self.at + size > len(self.buf):
            raise HeaderError(f"the header ends early at byte {self.at}")
        (value,) = struct.unpack_from(fmt, self.buf, self.at)
        self.at += size
        return value

    def string(self) -> str:
        n = int(self.take("<Q"))  # type: ignore[arg-type]
        if self.at + n > len(self.buf):
            raise HeaderError(f"a string at byte {self.at} runs past the end of the file")
        value = bytes(self.buf[self.at : self.at + n]).decode("utf-8", errors="replace")
        self.at += n
        return value

    def value(self, type_id: int) -> object:
        if type_id in SCALARS:
            return self.take(SCALARS[type_id])
        if type_id == STRING:
            return self.string()
        if type_id == ARRAY:
            self.skip_array()
            return None
        raise HeaderError(f"unknown metadata value type {type_id} at byte {self.at}")

    def skip_array(self) -> None:
        item, count = int(self.take("<I")), int(self.take("<Q"))  # type: ignore[arg-type]
        if item in SCALARS:
            self.at += count * struct.calcsize(SCALARS[item])
            if self.at > len(self.buf):
                raise HeaderError("an array runs past the end of the file")
            return
        if item == STRING:  # a tokenizer's 150k strings: only their lengths are read
            buf, at, length = self.buf, self.at, struct.Struct("<Q").unpack_from
            try:
                for _ in range(count):
                    at += 8 + length(buf, at)[0]
            except struct.error:
                raise HeaderError("a string array runs past the end of the file") from None
            self.at = at
            return
        for _ in range(count):
            self.value(item)


def parse_header(path: Path) -> Header:
    """The header of the GGUF at `path` (raises HeaderError when cut short or malformed)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf)
        cur.at = 4
        version, n_tensors, kv_count = (int(cur.take(fmt)) for fmt in ("<I", "<Q", "<Q"))  # type: ignore[arg-type]
        metadata: dict[str, object] = {}
        for _ in range(kv_count):
            key = cur.string()
            value = cur.value(int(cur.take("<I")))  # type: ignore[arg-type]
            if value is not None:
                metadata[key] = value
        metadata_end = cur.at
        tensors = []
        for _ in range(n_tensors):
            start = cur.at
            name = cur.string()
            n_dims = int(cur.take("<I"))  # type: ignore[arg-type]
            dims = tuple(int(cur.take("<Q")) for _ in range(n_dims))  # type: ignore[arg-type]
            type_id, offset = int(cur.take("<I")), int(cur.take("<Q"))  # type: ignore[arg-type]
            tensors.append(TensorInfo(name, dims, type_id, offset, start))
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise HeaderError(f"general.alignment is {alignment!r}")
        data_start = -(-cur.at // alignment) * alignment
    return Header(version, kv_count, metadata, metadata_end, tuple(tensors), alignment, data_start)
