"""Merge a LoRA adapter into a checkpoint, tensor by tensor, with the streaming writer `apply` uses.

Any peft LoRA adapter (any rank, rank/alpha patterns, rsLoRA, lora_bias, saved biases) is merged the way peft
computes it: W + scaling B A for a layer's weight [out, in], its transpose for ``fan_in_fan_out`` (Conv1D) and
embeddings, per expert for ``target_parameters`` on fused experts, which are mapped back to the on-disk tensors
they are loaded from (one tensor per expert and projection for Mixtral or Qwen MoE). Deltas are computed in
float32 in cache-sized blocks and rounded once into the stored dtype; everything else is copied byte for byte.
A rank-1 abliterate adapter gives exactly the bytes `apply` writes with the same --max-memory.

Refused, with the reason: other peft types, LoRA variants (DoRA, aLoRA, ...), modules_to_save, layer
replication, entries that name no tensor of the checkpoint, and shapes that do not fit.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from abliterate.arch.table import arch_for_config
from abliterate.edit.manifest import read_manifest
from abliterate.edit.plan import EditOptions, EditPlan, TensorEdit, plan_tied_embeddings
from abliterate.edit.projection import BLOCK_ELEMENTS, STORAGE, narrow_into, plan_chunks, read_stored, widen
from abliterate.edit.requantise import QuantError, changed_quantised, write_quantised
from abliterate.edit.shard_writer import Target as StreamTarget
from abliterate.edit.shard_writer import copy_other_files, output_size, write_config, write_index, write_shards
from abliterate.edit.weights import DEFAULT_MAX_MEMORY, DIRECTION_NAME
from abliterate.errors import AbliterateError
from abliterate.io.checkpoint import Checkpoint
from abliterate.io.quantised import quantised_tensors
from abliterate.io.safetensors_format import atomic_folder
from abliterate.lora.adapter_file import AdapterFile, read_lora_config, weights_path
from abliterate.lora.merge_plan import MergeTarget, place_entries


@dataclass(frozen=True)
class MergeResult:
    out: Path
    merged: int  # checkpoint tensors written from the adapter
    adapter_entries: int
    notes: tuple[str, ...]
    quant_errors: tuple[QuantError, ...] = ()  # FP8 tensors merged: what requantising cost


def merge_adapter(ckpt: Checkpoint, adapter_dir: Path, out: Path, *, overwrite: bool = False,
                  max_memory: int = DEFAULT_MAX_MEMORY, quiet: bool = False) -> MergeResult:
    """Write `ckpt` with `adapter_dir` merged into `out`, atomically; the inputs are only ever read."""
    if Path(out).absolute() in (ckpt.root.absolute(), Path(adapter_dir).absolute()):
        raise AbliterateError("--out is an input folder; abliterate never modifies its inputs: choose another --out")
    settings = read_lora_config(Path(adapter_dir))
    weights = AdapterFile(weights_path(Path(adapter_dir)))
    try:
        packed = sorted(n for n, q in quantised_tensors(ckpt).items() if q.format.transposed)
        if packed and settings.target_parameters:
            raise AbliterateError(f"merging into MXFP4 experts ({packed[0]}, ...) is not supported: edit the weights "
                                  "with `abliterate apply` (it edits them in MXFP4), or merge into a bf16 release")
        targets = place_entries(ckpt, settings, weights)
        plan = _merge_plan(ckpt, targets)
        with atomic_folder(Path(out), overwrite=overwrite) as tmp:
            errors = _write_checkpoint(ckpt, plan, targets, weights, tmp, max_memory, quiet)
            notes = _pass_on_manifest(ckpt, Path(adapter_dir), tmp)
    finally:
        weights.close()
    return MergeResult(Path(out), len(targets), len(weights.infos), (*plan.notes, *notes), errors)


def _merge_plan(ckpt: Checkpoint, targets: dict[str, MergeTarget]) -> EditPlan:
    """The layout `apply` would write for these tensors, untying embeddings exactly as `apply` does."""
    try:
        arch = arch_for_config(ckpt.config)
    except AbliterateError:
        arch = None
    edits = {}
    quantised = quantised_tensors(ckpt)
    for name, target in targets.items():
        shard, info = ckpt.tensors[name]
        component = "embed" if target.embedding else "merge"
        q = quantised.get(name)
        if q is not None and (q.format.transposed or target.replacement):
            raise AbliterateError(f"merging into {q.format.method} tensor {name} is not supported: edit the weights "
                                  "with `abliterate apply` (it edits them in their own format), or merge into a "
                                  "bf16 release")
        edits[name] = TensorEdit(name, shard, q.values if q else info, component, None, -1, 1.0, q)
    if arch is None:
        tied = ckpt.tied_flag
        if tied and any(t.embedding for t in targets.values()):
            raise AbliterateError(f"{ckpt.root} ties its input and output embeddings and abliterate does not know this "
                                  "family's output layer, so it cannot keep the output layer as peft does; add the "
                                  "family (a YAML file in abliterate/arch/families/, or --arch FILE)")
        return EditPlan(None, edits, None, {}, ())
    untie, config_updates, notes = plan_tied_embeddings(ckpt, arch, edits, EditOptions())
    return EditPlan(arch, edits, untie, config_updates, tuple(notes))


def _write_checkpoint(ckpt: Checkpoint, plan: EditPlan, targets: dict[str, MergeTarget], weights: AdapterFile,
                      tmp: Path, max_memory: int, quiet: bool) -> tuple[QuantError, ...]:
    """Shards as `apply` writes them (same layout, same streaming), then index, config, other files."""
    errors: list[QuantError | None] = []
    with tqdm(total=output_size(ckpt, plan), unit="B", unit_scale=True, desc="merging", disable=quiet,
              file=sys.stderr) as bar:
        write_shards(ckpt, plan, tmp, lambda out: errors.append(_merge_tensor(out, targets[out.edit.name], weights)),
                     max_memory=max_memory, progress=bar.update)
    write_index(ckpt, plan, tmp)
    write_config(ckpt, plan, tmp)
    copy_other_files(ckpt, tmp)
    return tuple(e for e in errors if e is not None)


def _merge_tensor(out: StreamTarget, target: MergeTarget, weights: AdapterFile) -> QuantError | None:
    """Stream one tensor: rows of [rows, last dim] within the budget, each block widened, added to, rounded back.

    A saved replacement (a bias carried by the adapter) is read from the adapter file instead of the base."""
    src_fd, src_info = (weights.fd, target.replacement) if target.replacement else (out.src_fd, out.edit.info)
    out_info = out.edit.info
    pieces = [(p.start, p.stop, *p.factors()) for p in target.pieces]
    if not all(np.isfinite(u).all() and np.isfinite(v).all() for _, _, u, v in pieces):
        raise AbliterateError(f"the adapter's factors for {out.edit.name} hold NaN or inf; the adapter is broken")
    if out.edit.quant is not None:  # FP8: dequantised rows, the delta added in float32, quantised again
        def change(first: int, w: np.ndarray) -> None:
            _add_delta(w, (first, first + w.shape[0]), pieces)
        return write_quantised(out, None, chunks=lambda stack: changed_quantised(
            out.edit.quant, change, out.budget, stack, out.buffers.take))
    cols = out_info.shape[-1] if out_info.shape else 1
    dtype = np.float64 if "F64" in (src_info.dtype, out_info.dtype) else np.float32
    for chunk in plan_chunks(out_info, -1, cols, out.budget):
        scratch = out.buffers.take()
        stored = read_stored(src_fd, src_info, chunk, scratch)
        if src_info.dtype == out_info.dtype and out_info.dtype in ("F32", "F64"):
            result = stored  # edited in place, as `apply` does
        else:
            result = scratch.take(1, chunk.count * out_info.itemsize).view(STORAGE[out_info.dtype]).reshape(
                chunk.shape)
        first = chunk.first // cols
        step = max(1, BLOCK_ELEMENTS // cols)
        for i in range(0, chunk.shape[0], step):
            rows = (first + i, first + min(i + step, chunk.shape[0]))
            w = widen(stored[i : i + step], src_info.dtype).astype(dtype, copy=False)
            _add_delta(w, rows, pieces)
            narrow_into(result[i : i + step], w, out_info.dtype)
        out.write(memoryview(result.reshape(-1).view(np.uint8)), chunk.first * out_info.itemsize, scratch)


EXACT_RANK = 16


def _add_delta(w: np.ndarray, rows: tuple[int, int], pieces: list) -> None:
    """w (rows [r0, r1) of the tensor) += U[rows] @ V for each piece overlapping them; up to rank EXACT_RANK as
    exact outer products added one after the other (what `apply` subtracts for k directions, so an abliterate
    adapter merges to its bytes), higher ranks as one matrix product."""
    r0, r1 = rows
    for start, stop, u, v in pieces:
        lo, hi = max(r0, start), min(r1, stop)
        if lo >= hi:
            continue
        uu = u[lo - start : hi - start].astype(w.dtype, copy=False)
        vv = v.astype(w.dtype, copy=False)
        part = w[lo - r0 : hi - r0].reshape(hi - lo, -1)  # a view
        if uu.shape[1] > EXACT_RANK:
            part += uu @ vv
            continue
        for j in range(uu.shape[1]):
            part += np.multiply.outer(uu[:, j], vv[j])


def _pass_on_manifest(ckpt: Checkpoint, adapter_dir: Path, tmp: Path) -> list[str]:
    """An abliterate adapter's manifest (and direction) go with the merged model, so `verify` checks it."""
    manifest = read_manifest(adapter_dir)
    if manifest is None:
        return []
    notes = ["abliterate adapter: its manifest was passed on; `abliterate verify` checks the merged model"]
    if Path(manifest.source).absolute() != ckpt.root.absolute():
        notes.append(f"the adapter was made from {manifest.source}, not {ckpt.root}: `verify` will report "
                     "the difference")
    replace(manifest, source=str(ckpt.root),
            extra={**manifest.extra, "merged_adapter": str(adapter_dir.absolute())}).write(tmp)
    if (adapter_dir / DIRECTION_NAME).is_file():
        shutil.copyfile(adapter_dir / DIRECTION_NAME, tmp / DIRECTION_NAME)
    return notes
