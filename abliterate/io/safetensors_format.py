"""Safetensors without loading: header parsing, bounded reads, range copies, atomic output folders.

The editor never maps or loads a whole file. It parses the header itself (8-byte little-endian
length, then JSON), reads one tensor (or one chunk of one) at a time with `pread`, and copies
untouched byte ranges kernel-side with `copy_file_range`, so memory stays bounded by one chunk
whatever the checkpoint size.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from abliterate.errors import AbliterateError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit

DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F6_E2M3": 1, "F6_E3M2": 1, "F4": 1,
}
# Dtypes the editor can project in float32 and round back without losing meaning.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")

if sys.byteorder != "little":  # safetensors is little-endian and we reinterpret raw bytes
    raise ImportError("abliterate needs a little-endian machine")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of a safetensors header; offsets are absolute positions in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class ShardHeader:
    """A parsed, validated safetensors header. `tensors` is in on-disk data order."""

    path: Path
    header_bytes: bytes  # the raw JSON (with its padding), for byte-identical rewrites
    metadata: dict[str, str] | None
    tensors: tuple[TensorInfo, ...]

    @property
    def data_start(self) -> int:
        return 8 + len(self.header_bytes)

    @property
    def file_size(self) -> int:
        return self.data_start + (self.tensors[-1].end - self.data_start if self.tensors else 0)

    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}


def read_header(path: Path) -> ShardHeader:
    """Parse and validate a safetensors header; every way a file can be broken is one clear error."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise AbliterateError(f"{path} is not a safetensors file (only {size} bytes); re-download it")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise AbliterateError(
                    f"{path} is truncated or corrupt: its header claims {length} bytes but the file has "
                    f"{size}; re-download it"
                )
            raw = f.read(length)
    except OSError as e:
        raise AbliterateError(f"cannot read {path}: {e.strerror}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AbliterateError(f"{path} has a corrupt safetensors header (not JSON); re-download it") from None
    if not isinstance(header, dict):
        raise AbliterateError(f"{path} has a corrupt safetensors header (not an object); re-download it")
    metadata = header.pop("__metadata__", None)
    data_start = 8 + length
    tensors = sorted(
        (_parse_entry(path, name, entry, data_start) for name, entry in header.items()),
        key=lambda t: (t.start, t.end),
    )
    cursor = data_start
    for t in tensors:
        if t.start != cursor:
            raise AbliterateError(
                f"{path} is corrupt: tensor {t.name} starts at byte {t.start - data_start} of the data, "
                f"expected {cursor - data_start} (overlap or hole); re-download it"
            )
        cursor = t.end
    if cursor > size:
        raise AbliterateError(
            f"{path} is truncated: its header describes {cursor} bytes but the file has {size}; re-download it"
        )
    if cursor < size:
        raise AbliterateError(
            f"{path} is corrupt: {size - cursor} bytes after the last tensor; re-download it"
        )
    return ShardHeader(path, raw, metadata, tuple(tensors))


def _parse_entry(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    bad = f"{path} is corrupt: header entry for {name!r}"
    if not isinstance(entry, dict):
        raise AbliterateError(f"{bad} is not an object; re-download it")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise AbliterateError(f"{bad} has unknown dtype {dtype!r}; re-download it or report the dtype")
    if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise AbliterateError(f"{bad} has an invalid shape {shape!r}; re-download it")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise AbliterateError(f"{bad} has invalid data_offsets {offsets!r}; re-download it")
    start, end = offsets
    if not 0 <= start <= end or end - start != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise AbliterateError(f"{bad}: data_offsets {offsets} do not match shape {shape} {dtype}")
    return TensorInfo(name, dtype, tuple(shape), data_start + start, data_start + end)


def encode_header(tensors: list[tuple[str, str, tuple[int, ...], int]], metadata: dict | None) -> bytes:
    """Header JSON for (name, dtype, shape, nbytes) in data order, padded to 8 bytes like safetensors."""
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, nbytes in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def pread_into(fd: int, buf: memoryview, offset: int) -> None:
    """Fill `buf` from `offset`; short reads only happen if the file shrank under us."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise AbliterateError(f"unexpected end of file at byte {offset + done}: was the input modified?")
        done += n


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def copy_range(src_fd: int, dst_fd: int, src_offset: int, dst_offset: int, count: int) -> None:
    """Copy bytes between files inside the kernel (reflink on CoW filesystems), else via a buffer."""
    try:
        while count > 0:
            n = os.copy_file_range(src_fd, dst_fd, count, src_offset, dst_offset)
            if n == 0:
                raise AbliterateError(f"unexpected end of input at byte {src_offset}: was it modified?")
            src_offset, dst_offset, count = src_offset + n, dst_offset + n, count - n
    except (AttributeError, OSError):  # no copy_file_range here, or not between these filesystems
        buf = bytearray(min(count, 16 << 20))
        while count > 0:
            view = memoryview(buf)[: min(count, len(buf))]
            pread_into(src_fd, view, src_offset)
            pwrite_all(dst_fd, view, dst_offset)
            src_offset, dst_offset, count = src_offset + len(view), dst_offset + len(view), count - len(view)


@contextlib.contextmanager
def atomic_folder(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder that becomes `out` only if the block finishes.

    A killed run leaves a `.abliterate-tmp-*` folder that never looks like a finished model;
    an existing `out` is refused unless `overwrite`, and is replaced only at the very end.
    """
    out = out.absolute()
    if out.exists() and not overwrite:
        raise AbliterateError(f"output folder {out} already exists; pass --overwrite or choose another --out")
    if not out.parent.is_dir():
        raise AbliterateError(f"the parent folder of {out} does not exist; create it first")
    tmp = out.parent / f".{out.name}.abliterate-tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        trash = out.parent / f".{out.name}.abliterate-old-{uuid.uuid4().hex[:8]}"
        out.rename(trash)
        tmp.rename(out)
        shutil.rmtree(trash) if trash.is_dir() else trash.unlink()
    else:
        tmp.rename(out)
