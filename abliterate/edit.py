"""Run an edit plan: write a complete model folder, one tensor chunk in memory at a time.

Each output shard keeps its input's name, header and tensor order. Untouched byte ranges are
copied kernel-side on a background thread while the main thread projects the edited tensors,
so the edit costs little more than a `cp` of the folder. Output goes to a temporary sibling
folder that is renamed into place only when everything is written.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import shlex
import shutil
import sys
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import __version__
from .checkpoint import INDEX_NAME, Checkpoint
from .direction_file import Direction
from .errors import AbliterateError
from .plan import EditPlan, TensorEdit
from .projection import NonFiniteError, Scratch, iter_edited_chunks
from .safetensors_io import atomic_folder, copy_range, encode_header, pwrite_all

MANIFEST_NAME = "abliterate.json"
DIRECTION_NAME = "refusal_direction.safetensors"
DEFAULT_MAX_MEMORY = 256 << 20


@dataclass(frozen=True)
class EditResult:
    out: Path
    edited: int
    bytes_written: int
    skipped_files: tuple[str, ...]
    notes: tuple[str, ...]


def apply_edit(
    ckpt: Checkpoint,
    plan: EditPlan,
    direction: Direction,
    out: Path,
    *,
    overwrite: bool = False,
    max_memory: int = DEFAULT_MAX_MEMORY,
    quiet: bool = False,
    manifest_extra: dict | None = None,
) -> EditResult:
    """Write the edited checkpoint to `out` atomically; the input folder is only ever read."""
    if Path(out).absolute() == ckpt.root.absolute():
        raise AbliterateError("--out is the input folder; abliterate never modifies its input: choose another --out")
    copied, skipped = ckpt.other_files()
    layouts = {shard: _shard_layout(ckpt, plan, shard) for shard in ckpt.shards}
    total = sum(layout.size for layout in layouts.values())
    with atomic_folder(Path(out), overwrite=overwrite) as tmp, tqdm(
        total=total, unit="B", unit_scale=True, desc="editing", disable=quiet, file=sys.stderr
    ) as bar:
        _write_shards(ckpt, layouts, direction, tmp, max_memory, bar.update)  # type: ignore[arg-type]
        _write_index(ckpt, plan, tmp)
        _write_config(ckpt, plan, tmp)
        for rel in copied:
            if rel.name == "config.json" and rel.parent == Path("."):
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ckpt.root / rel, tmp / rel)
        if direction.path is not None:
            shutil.copyfile(direction.path, tmp / DIRECTION_NAME)
        _write_manifest(ckpt, plan, direction, tmp, manifest_extra or {})
    return EditResult(Path(out), len(plan.edits), total, tuple(map(str, skipped)), plan.notes)


@dataclass(frozen=True)
class _Copy:
    shard: str  # source shard file
    src: int
    dst: int
    size: int


@dataclass(frozen=True)
class _Edit:
    edit: TensorEdit
    dst: int


@dataclass(frozen=True)
class _ShardOut:
    header: bytes
    size: int
    segments: tuple[_Copy | _Edit, ...]


def _shard_layout(ckpt: Checkpoint, plan: EditPlan, shard: str) -> _ShardOut:
    """What an output shard consists of: the input's header and tensors, in the same order, each
    copied or edited, plus the untied output embedding when it has to be added to this shard."""
    src = ckpt.headers[shard]
    out_name, embed_name = plan.untie or (None, None)
    append = embed_name is not None and out_name not in ckpt.tensors and ckpt.tensors[embed_name][0] == shard
    header = src.header_bytes
    if append:
        embed = ckpt.tensors[embed_name][1]
        entries = [(t.name, t.dtype, t.shape, t.nbytes) for t in src.tensors]
        header = encode_header([*entries, (out_name, embed.dtype, embed.shape, embed.nbytes)], src.metadata)
    shift = 8 + len(header) - src.data_start
    segments: list[_Copy | _Edit] = []
    for info in src.tensors:
        edit = plan.edits.get(info.name)
        if info.name == out_name:  # a stored tied output embedding becomes the original embedding
            embed_shard, embed = ckpt.tensors[embed_name]
            segments.append(_Copy(embed_shard, embed.start, info.start + shift, info.nbytes))
        elif edit is not None:
            segments.append(_Edit(edit, info.start + shift))
        elif segments and isinstance(last := segments[-1], _Copy) and last.shard == shard \
                and last.src + last.size == info.start and last.dst + last.size == info.start + shift:
            segments[-1] = _Copy(shard, last.src, last.dst, last.size + info.nbytes)  # one copy per run
        else:
            segments.append(_Copy(shard, info.start, info.start + shift, info.nbytes))
    size = src.file_size + shift
    if append:
        embed = ckpt.tensors[embed_name][1]
        segments.append(_Copy(shard, embed.start, size, embed.nbytes))
        size += embed.nbytes
    return _ShardOut(header, size, tuple(segments))


class _Writer:
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


def _write_shards(ckpt: Checkpoint, layouts: dict[str, _ShardOut], direction: Direction, tmp: Path,
                  max_memory: int, progress: Callable[[int], object]) -> None:
    """This thread computes the edited tensors while the writer thread writes: the copies of all
    untouched ranges (queued up front) and each edited chunk (double-buffered)."""
    with ExitStack() as stack:
        src = {shard: os.open(ckpt.root / shard, os.O_RDONLY) for shard in ckpt.shards}
        dst = {shard: os.open(tmp / shard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644) for shard in layouts}
        for fd in [*src.values(), *dst.values()]:
            stack.callback(os.close, fd)
        writer = _Writer(progress)
        stack.callback(writer.abort)  # runs first: no descriptor closes under a running write
        for shard, layout in layouts.items():
            os.ftruncate(dst[shard], layout.size)
            pwrite_all(dst[shard], memoryview(len(layout.header).to_bytes(8, "little") + layout.header), 0)
            progress(8 + len(layout.header))
            for seg in layout.segments:
                if isinstance(seg, _Copy):
                    writer.copy(src[seg.shard], dst[shard], seg.src, seg.dst, seg.size)
        free: queue.SimpleQueue[Scratch] = queue.SimpleQueue()
        for _ in range(2):
            free.put(Scratch())
        for shard, layout in layouts.items():
            for seg in layout.segments:
                if isinstance(seg, _Edit):
                    _edit_tensor(src[seg.edit.shard], dst[shard], seg, direction, max_memory // 2, writer, free)
        writer.finish()


def _edit_tensor(src_fd: int, dst_fd: int, seg: _Edit, direction: Direction, budget: int, writer: _Writer,
                 free: queue.SimpleQueue) -> None:
    """Compute one tensor's chunks; the writer frees each chunk's buffers once it is written."""
    edit = seg.edit
    r = direction.for_layer(edit.layer)
    chunks = iter_edited_chunks(src_fd, edit.info, r, edit.hidden_axis, edit.scale, budget, free.get)
    try:
        for chunk, values, scratch in chunks:
            data = memoryview(values.reshape(-1).view(np.uint8))
            writer.write(dst_fd, data, seg.dst + chunk.first * edit.info.itemsize, lambda s=scratch: free.put(s))
    except NonFiniteError:
        raise AbliterateError(
            f"{edit.name} holds NaN or inf values; the checkpoint is corrupt: re-download it"
        ) from None


def _write_index(ckpt: Checkpoint, plan: EditPlan, tmp: Path) -> None:
    if ckpt.index_bytes is None:
        return
    if plan.untie is None or plan.untie[0] in ckpt.tensors:
        (tmp / INDEX_NAME).write_bytes(ckpt.index_bytes)
        return
    index = json.loads(ckpt.index_bytes)
    out_name, embed_name = plan.untie
    index["weight_map"][out_name] = ckpt.tensors[embed_name][0]
    if isinstance(index.get("metadata", {}).get("total_size"), int):
        index["metadata"]["total_size"] += ckpt.tensors[embed_name][1].nbytes
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=False) + "\n")


def _write_config(ckpt: Checkpoint, plan: EditPlan, tmp: Path) -> None:
    src = ckpt.root / "config.json"
    if not plan.config_updates:
        shutil.copyfile(src, tmp / "config.json")
        return
    config = json.loads(src.read_text())
    config.update(plan.config_updates)
    if isinstance(config.get("text_config"), dict):
        config["text_config"].update(plan.config_updates)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _write_manifest(ckpt: Checkpoint, plan: EditPlan, direction: Direction, tmp: Path, extra: dict) -> None:
    """What was done, precisely enough for `abliterate verify` to re-check it."""
    manifest = {
        "tool": "abliterate",
        "version": __version__,
        "command": shlex.join(["abliterate", *sys.argv[1:]]),
        "source": str(ckpt.root),
        "direction": {"file": DIRECTION_NAME if direction.path else None, "metadata": direction.metadata,
                      "per_layer": direction.per_layer},
        "untie": {"output": plan.untie[0], "copied_from": plan.untie[1]} if plan.untie else None,
        "config_updates": plan.config_updates,
        "edits": {e.name: {"scale": e.scale, "layer": e.layer, "hidden_axis": e.hidden_axis,
                           "component": e.component} for e in plan.edits.values()},
        "notes": list(plan.notes),
        **extra,
    }
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
