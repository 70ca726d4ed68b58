"""Run an edit plan: write a complete model folder, one tensor chunk in memory at a time.

Each output shard keeps its input's name, header and tensor order. Untouched byte ranges are
copied kernel-side on a background thread while the main thread projects the edited tensors,
so the edit costs little more than a `cp` of the folder. Output goes to a temporary sibling
folder that is renamed into place only when everything is written.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import INDEX_NAME, Checkpoint
from .direction_file import Direction
from .errors import AbliterateError
from .plan import EditPlan, TensorEdit
from .projection import iter_edited_chunks
from .safetensors_io import atomic_folder, copy_range, encode_header, pwrite_all, tensor_bytes

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
    ) as bar, ThreadPoolExecutor(max_workers=1, thread_name_prefix="copy") as copier:
        for shard, layout in layouts.items():
            _write_shard(ckpt, layout, direction, tmp / shard, max_memory, copier, bar.update)
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


def _write_shard(ckpt: Checkpoint, layout: _ShardOut, direction: Direction, dst: Path, max_memory: int,
                 copier: ThreadPoolExecutor, progress: Callable[[int], object]) -> None:
    """Copies run on the copier thread while this thread computes the edited tensors."""
    fds: dict[str, int] = {}
    dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    pending: list[Future] = []

    def src_fd(shard: str) -> int:
        if shard not in fds:
            fds[shard] = os.open(ckpt.root / shard, os.O_RDONLY)
        return fds[shard]

    try:
        os.ftruncate(dst_fd, layout.size)
        pwrite_all(dst_fd, memoryview(len(layout.header).to_bytes(8, "little") + layout.header), 0)
        progress(8 + len(layout.header))
        for seg in layout.segments:
            if isinstance(seg, _Copy):
                fd = src_fd(seg.shard)
                pending.append(copier.submit(_copy_and_report, fd, dst_fd, seg.src, seg.dst, seg.size, progress))
            else:
                _edit_tensor(src_fd(seg.edit.shard), dst_fd, seg.edit, direction, seg.dst, max_memory, progress)
        for f in pending:
            f.result()
    finally:
        for f in pending:
            f.cancel()
        for f in pending:
            if not f.cancelled():
                f.exception()  # wait: never close a descriptor a running copy still uses
        for fd in [*fds.values(), dst_fd]:
            os.close(fd)


def _copy_and_report(src_fd: int, dst_fd: int, src_off: int, dst_off: int, n: int, progress) -> None:
    step = 64 << 20  # report progress as the copy goes
    for off in range(0, n, step):
        m = min(step, n - off)
        copy_range(src_fd, dst_fd, src_off + off, dst_off + off, m)
        progress(m)


def _edit_tensor(src_fd: int, dst_fd: int, edit: TensorEdit, direction: Direction, dst_start: int,
                 max_memory: int, progress: Callable[[int], object]) -> None:
    r = direction.for_layer(edit.layer)
    for chunk, values in iter_edited_chunks(src_fd, edit.info, r, edit.hidden_axis, edit.scale, max_memory):
        if not torch.isfinite(values).all():
            raise AbliterateError(f"editing {edit.name} produced NaN/inf; the input tensor holds non-finite values")
        data = tensor_bytes(values)
        pwrite_all(dst_fd, data, dst_start + chunk.first * edit.info.itemsize)
        progress(len(data))


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
