"""Run an edit plan: write the edited model folder, one tensor chunk in memory at a time.

The projection of each edited tensor is computed chunk by chunk (projection.py) and streamed
into output shards that mirror the input's (streaming.py); everything else is copied byte for
byte. Output goes to a temporary sibling folder renamed into place only when complete, with a
manifest (abliterate.json) precise enough for `abliterate verify` to re-check the edit.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from abliterate.edit.manifest import EditManifest, ManifestEdit
from abliterate.edit.plan import EditPlan
from abliterate.edit.projection import NonFiniteError, iter_edited_chunks
from abliterate.edit.requantise import QuantError, write_quantised
from abliterate.edit.shard_writer import Target, copy_other_files, output_size, write_config, write_index, write_shards
from abliterate.errors import AbliterateError
from abliterate.io.checkpoint import Checkpoint
from abliterate.io.direction_file import Direction
from abliterate.io.safetensors_format import atomic_folder
from abliterate.options.command import recorded_command

DIRECTION_NAME = "refusal_direction.safetensors"
DEFAULT_MAX_MEMORY = 256 << 20


@dataclass(frozen=True)
class EditResult:
    out: Path
    edited: int
    bytes_written: int
    skipped_files: tuple[str, ...]
    notes: tuple[str, ...]
    quant_errors: tuple[QuantError, ...] = ()  # FP8 / MXFP4 tensors: what requantising the edit cost


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
    total = output_size(ckpt, plan)
    errors: list[QuantError] = []
    with atomic_folder(Path(out), overwrite=overwrite) as tmp, tqdm(
        total=total, unit="B", unit_scale=True, desc="editing", disable=quiet, file=sys.stderr
    ) as bar:
        write_shards(ckpt, plan, tmp, lambda t: errors.extend(project_tensor(t, direction, plan.norm_preserve)),
                     max_memory=max_memory, progress=bar.update)
        write_index(ckpt, plan, tmp)
        write_config(ckpt, plan, tmp)
        skipped = copy_other_files(ckpt, tmp)
        keep_direction(direction, tmp / DIRECTION_NAME)
        write_manifest(ckpt, plan, direction, tmp, {"max_memory": max_memory, **(manifest_extra or {})})
    return EditResult(Path(out), len(plan.edits), total, skipped, (*plan.notes, *untie_note(plan),
                                                                    *requantised_note(errors)), tuple(errors))


def requantised_note(errors: list[QuantError]) -> tuple[str, ...]:
    """What writing FP8 / MXFP4 tensors back in their format cost, for the notes (and a job's card)."""
    if not errors:
        return ()
    worst = max(errors, key=lambda e: e.relative_rms)
    methods = "/".join(sorted({e.type_name for e in errors}))
    return (f"{len(errors)} {methods} tensors were dequantised, edited and quantised again with new block scales "
            f"(largest requantisation error {worst.relative_rms:.1e} RMS relative to |W'|, in {worst.name})",)


def keep_direction(direction: Direction, path: Path) -> None:
    """The direction the edit used, beside it: a copy of its file, or (made in memory, e.g. biprojected) saved."""
    if direction.path is not None:
        shutil.copyfile(direction.path, path)
    else:
        from abliterate.io.direction_file import save_direction

        save_direction(path, direction.vectors, direction.metadata)


def untie_note(plan: EditPlan) -> tuple[str, ...]:
    if plan.untie is None:
        return ()
    return (f"embeddings were tied: wrote an untied {plan.untie[0]} holding the original matrix and set "
            "tie_word_embeddings=false, so the output layer is unchanged (--keep-tied edits the shared matrix)",)


def project_tensor(target: Target, direction: Direction, preserve: bool = False) -> tuple[QuantError, ...]:
    """Compute one edited tensor chunk by chunk and hand each chunk to the writer (FP8 / MXFP4: quantised again,
    returning what that cost)."""
    edit = target.edit
    r = direction.for_layer(edit.layer)
    if edit.quant is not None:
        try:
            return (write_quantised(target, r, preserve),)
        except NonFiniteError:
            raise AbliterateError(f"{edit.name} holds NaN or inf values; the checkpoint is corrupt: re-download it")\
                from None
    chunks = iter_edited_chunks(target.src_fd, edit.info, r, edit.hidden_axis, edit.scale, target.budget,
                                target.buffers.take, preserve=preserve)
    try:
        for chunk, values, scratch in chunks:
            target.write(memoryview(values.reshape(-1).view(np.uint8)), chunk.first * edit.info.itemsize, scratch)
    except NonFiniteError:
        raise AbliterateError(
            f"{edit.name} holds NaN or inf values; the checkpoint is corrupt: re-download it"
        ) from None
    return ()


def write_manifest(ckpt: Checkpoint, plan: EditPlan, direction: Direction, tmp: Path, extra: dict, *,
                   edits: dict | None = None, notes: list[str] | None = None) -> None:
    """What was done, precisely enough for `abliterate verify` to re-check it (an adapter passes the
    edits it carries and its own notes); `extra`'s max_memory is the edit's chunk budget."""
    extra = dict(extra)
    EditManifest(
        source=str(ckpt.root), command=recorded_command(), norm_preserve=plan.norm_preserve,
        direction={"file": DIRECTION_NAME, "metadata": direction.metadata, "per_layer": direction.per_layer,
                   "rank": direction.rank},
        untie=plan.untie, config_updates=plan.config_updates,
        edits={e.name: ManifestEdit(e.scale, e.layer, e.hidden_axis, e.component,
                                    *((e.quant.format.method,) * 2 if e.quant else ()))
               for e in (edits or plan.edits).values()},
        notes=tuple(plan.notes if notes is None else notes), max_memory=extra.pop("max_memory", None), extra=extra,
    ).write(tmp)
