"""Tensor streaming: write a checkpoint's shards anew, tensor by tensor, within a memory budget.

Each output shard keeps its input's name, header and tensor order (plus an untied output
embedding where the plan adds one). Untouched byte ranges are copied kernel-side; the tensors a
plan changes are computed chunk by chunk on the calling thread by a `compute` function (the
projection for `apply`, the LoRA delta for `merge`) and handed to one writer thread, with two
chunk buffers in flight, so computing and writing overlap and memory stays bounded.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import shutil
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from abliterate.edit.plan import EditPlan, TensorEdit
from abliterate.edit.projection import Scratch
from abliterate.io.checkpoint import INDEX_NAME, Checkpoint
from abliterate.io.safetensors_format import copy_range, encode_header, pwrite_all


def chunk_budget(max_memory: int) -> int:
    """Bytes per chunk (read buffer plus computed copy): two chunks are in flight at once."""
    return max(max_memory // 2, 1)


@dataclass(frozen=True)
class Copy:
    shard: str  # source shard file
    src: int
    dst: int
    size: int


@dataclass(frozen=True)
class Computed:
    edit: TensorEdit
    dst: int


@dataclass(frozen=True)
class Filled:
    """A scale tensor the compute of the quantised tensor it scales writes (neither copied nor computed here)."""

    name: str
    dst: int


@dataclass(frozen=True)
class ShardLayout:
    header: bytes
    size: int
    segments: tuple[Copy | Computed | Filled, ...]


def shard_layout(ckpt: Checkpoint, plan: EditPlan, shard: str) -> ShardLayout:
    """What an output shard consists of: the input's header and tensors, in the same order, each
    copied or edited, plus the untied output embedding when it has to be added to this shard, then the
    plan's added tensors that belong to it."""
    src = ckpt.headers[shard]
    out_name, embed_name = plan.untie or (None, None)
    append = embed_name is not None and out_name not in ckpt.tensors and ckpt.tensors[embed_name][0] == shard
    added = [e for e in plan.added if e.shard == shard]
    header = src.header_bytes
    if append or added:
        entries = [(t.name, t.dtype, t.shape, t.nbytes) for t in src.tensors]
        if append:
            embed = ckpt.tensors[embed_name][1]
            entries.append((out_name, embed.dtype, embed.shape, embed.nbytes))
        entries += [(e.name, e.info.dtype, e.info.shape, e.info.nbytes) for e in added]
        header = encode_header(entries, src.metadata)
    shift = 8 + len(header) - src.data_start
    segments: list[Copy | Computed | Filled] = []
    scales = plan.rewritten_scales()
    for info in src.tensors:
        edit = plan.edits.get(info.name)
        if info.name in scales:
            segments.append(Filled(info.name, info.start + shift))
        elif info.name == out_name:  # a stored tied output embedding becomes the original embedding
            embed_shard, embed = ckpt.tensors[embed_name]
            segments.append(Copy(embed_shard, embed.start, info.start + shift, info.nbytes))
        elif edit is not None:
            segments.append(Computed(edit, info.start + shift))
        elif segments and isinstance(last := segments[-1], Copy) and last.shard == shard \
                and last.src + last.size == info.start and last.dst + last.size == info.start + shift:
            segments[-1] = Copy(shard, last.src, last.dst, last.size + info.nbytes)  # one copy per run
        else:
            segments.append(Copy(shard, info.start, info.start + shift, info.nbytes))
    size = src.file_size + shift
    if append:
        embed = ckpt.tensors[embed_name][1]
        segments.append(Copy(shard, embed.start, size, embed.nbytes))
        size += embed.nbytes
    for e in added:
        segments.append(Computed(e, size))
        size += e.info.nbytes
    return ShardLayout(header, size, tuple(segments))


class Writer:
    """One thread does every write, like `cp`: two kernel writers only contend. Edited chunks go
    before queued copies (a computed chunk's buffer is freed only once written), copies run in
    64 MB pieces in between, so the computing thread never waits for the copying."""

    EDIT, COPY = 0, 1

    def __init__(self, progress: Callable[[int], object]) -> None:
        self._tasks: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._progress = progress
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="abliterate-writer", daemon=True)
        self._thread.start()

    def copy(self, src_fd: int, dst_fd: int, src: int, dst: int, size: int) -> None:
        for off in range(0, size, 64 << 20):
            n = min(64 << 20, size - off)
            self._put(self.COPY, lambda o=off, n=n: (copy_range(src_fd, dst_fd, src + o, dst + o, n), n)[1])

    def write(self, dst_fd: int, data: memoryview, offset: int, done: Callable[[], None]) -> None:
        def task() -> int:
            try:
                pwrite_all(dst_fd, data, offset)
                return len(data)
            finally:
                done()
        self._put(self.EDIT, task)

    def finish(self) -> None:
        """Wait for every queued write; re-raise the first failure."""
        self._tasks.put((2, next(self._seq), None))
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        self._error = self._error or KeyboardInterrupt()
        self.finish() if self._thread.is_alive() else None

    def _put(self, priority: int, task: Callable[[], int]) -> None:
        if self._error is not None:
            raise self._error
        self._tasks.put((priority, next(self._seq), task))

    def _run(self) -> None:
        while True:
            _, _, task = self._tasks.get()
            if task is None:
                return
            if self._error is not None:
                continue  # after a failure, only drain (edit tasks still free their buffers)
            try:
                self._progress(task())
            except BaseException as e:
                self._error = e


class Buffers:
    """The two chunk buffers shared by the computing thread and the writer thread."""

    def __init__(self, count: int = 2) -> None:
        self._free: queue.SimpleQueue[Scratch] = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(Scratch())

    def take(self) -> Scratch:
        return self._free.get()

    def give_back(self, scratch: Scratch) -> None:
        self._free.put(scratch)


@dataclass(frozen=True)
class Target:
    """Where one computed tensor goes, and the means to produce it."""

    edit: TensorEdit
    src_fd: int  # the input shard holding the tensor
    dst_fd: int
    dst: int  # byte offset of the tensor in the output shard
    writer: Writer
    buffers: Buffers
    budget: int  # bytes per chunk
    scales_at: tuple[int, int] | None = None  # a quantised tensor's scales: (output descriptor, byte offset)

    def write(self, data: memoryview, offset: int, scratch: Scratch) -> None:
        """Queue `data` (held in `scratch`) for the writer; the buffers return once it is written."""
        self.writer.write(self.dst_fd, data, self.dst + offset, lambda: self.buffers.give_back(scratch))


ComputeFn = Callable[[Target], None]


def write_shards(ckpt: Checkpoint, plan: EditPlan, tmp: Path, compute: ComputeFn, *, max_memory: int,
                 progress: Callable[[int], object]) -> int:
    """Write every output shard into `tmp`; returns the bytes written. Copies of all untouched
    ranges are queued up front; `compute` runs here for each changed tensor, in file order."""
    layouts = {shard: shard_layout(ckpt, plan, shard) for shard in ckpt.shards}
    with ExitStack() as stack:
        src = {shard: os.open(ckpt.root / shard, os.O_RDONLY) for shard in ckpt.shards}
        dst = {shard: os.open(tmp / shard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644) for shard in layouts}
        for fd in [*src.values(), *dst.values()]:
            stack.callback(os.close, fd)
        writer = Writer(progress)
        stack.callback(writer.abort)  # runs first: no descriptor closes under a running write
        for shard, layout in layouts.items():
            os.ftruncate(dst[shard], layout.size)
            pwrite_all(dst[shard], memoryview(len(layout.header).to_bytes(8, "little") + layout.header), 0)
            progress(8 + len(layout.header))
            for seg in layout.segments:
                if isinstance(seg, Copy):
                    writer.copy(src[seg.shard], dst[shard], seg.src, seg.dst, seg.size)
        buffers = Buffers()
        filled = {seg.name: (dst[shard], seg.dst) for shard, layout in layouts.items()
                  for seg in layout.segments if isinstance(seg, Filled)}
        for shard, layout in layouts.items():
            for seg in layout.segments:
                if isinstance(seg, Computed):
                    quant = seg.edit.quant
                    compute(Target(seg.edit, src[seg.edit.shard], dst[shard], seg.dst, writer, buffers,
                                   chunk_budget(max_memory), filled.get(quant.scales.name) if quant else None))
        writer.finish()
    return sum(layout.size for layout in layouts.values())


def output_size(ckpt: Checkpoint, plan: EditPlan) -> int:
    return sum(shard_layout(ckpt, plan, shard).size for shard in ckpt.shards)


def write_index(ckpt: Checkpoint, plan: EditPlan, tmp: Path) -> None:
    """The input's index (byte for byte when nothing is added), with an untied output embedding and the plan's
    added tensors mapped to the shards holding them."""
    if ckpt.index_bytes is None:
        return
    new = {e.name: (e.shard, e.info.nbytes) for e in plan.added}
    if plan.untie is not None and plan.untie[0] not in ckpt.tensors:
        embed_shard, embed = ckpt.tensors[plan.untie[1]]
        new = {plan.untie[0]: (embed_shard, embed.nbytes), **new}
    if not new:
        (tmp / INDEX_NAME).write_bytes(ckpt.index_bytes)
        return
    index = json.loads(ckpt.index_bytes)
    for name, (shard, nbytes) in new.items():
        index["weight_map"][name] = shard
        if isinstance(index.get("metadata", {}).get("total_size"), int):
            index["metadata"]["total_size"] += nbytes
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=False) + "\n")


def write_config(ckpt: Checkpoint, plan: EditPlan, tmp: Path) -> None:
    src = ckpt.root / "config.json"
    if not plan.config_updates:
        shutil.copyfile(src, tmp / "config.json")
        return
    config = json.loads(src.read_text())
    config.update(plan.config_updates)
    if isinstance(config.get("text_config"), dict):
        config["text_config"].update(plan.config_updates)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def copy_other_files(ckpt: Checkpoint, tmp: Path) -> tuple[str, ...]:
    """Copy tokenizer, generation config, chat template... (config.json is written by write_config);
    returns what was deliberately left out (other weight formats, the base model's card)."""
    copied, skipped = ckpt.other_files()
    for rel in copied:
        if rel != Path("config.json"):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ckpt.root / rel, tmp / rel)
    return tuple(map(str, skipped))
