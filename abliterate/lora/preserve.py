"""The norm-preserving edit as a peft adapter: LoRA for the projection, DoRA magnitudes for the rescaling.

`apply --norm-preserve` writes W' = (I - s Q^T Q) W D for each edited writer W [d, in], D diagonal over W's input
features. A LoRA gives (I - s Q^T Q) W; D is no low-rank update, but scaling W's input feature j by D_j is scaling
row j of the module that produces that feature, when the family file says so (`Arch.input_scalers`): the up
projection of a gated MLP (down(act(gate x) * up x)), the first layer of an MLP whose activation is positively
homogeneous, or the value projection when every head has its own values. peft's DoRA computes, per output row i of
an adapted Linear, bias_i + (m_i / |row i of W + s B A|) (W + s B A)_i x (norm detached, in the adapter's float32),
so with B = A = 0 and m_j = D_j |W_up,j| the up projection's row j is scaled by D_j, and its bias, which DoRA leaves
alone, is carried scaled (peft's bias="lora_only"). peft turns DoRA on for every target of a config, so each
writer's own magnitude is the row norm of its edited weight: its scale is 1 up to the float32 rounding of two norms
(about 1e-7 relative). What no module can carry exactly is refused with the component and the way out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from abliterate.arch.writers import POSITIVELY_HOMOGENEOUS, Arch
from abliterate.edit.plan import EditPlan, TensorEdit
from abliterate.edit.projection import (
    Chunk,
    Scratch,
    coefficients,
    column_sumsq,
    compute_dtype,
    narrow_,
    plan_chunks,
    preserve_factors,
    read_stored,
    subtract_terms,
    widen,
)
from abliterate.errors import AbliterateError
from abliterate.io.checkpoint import Checkpoint
from abliterate.lora.experts import looks_like_expert
from abliterate.lora.peft_format import Bias, Factors


@dataclass(frozen=True)
class Scaler:
    """The module whose output rows carry one writer's input features."""

    module: str  # on-disk module prefix
    part: tuple[int, int]  # the i-th of n equal blocks of its output rows
    power: int  # its rows are scaled by D ** (1 / power)
    peft_module: str = ""  # its in-memory name, which peft adapts (the on-disk one unless transformers renames it)


@dataclass(frozen=True)
class WriterStats:
    """What one writer weight [d, in] contributes: the coefficients `apply` subtracts (its chunks and sums), the
    squared norm of each input feature's column, and the row norms of the edited weight (its DoRA magnitude)."""

    coeff: np.ndarray
    sumsq: np.ndarray
    row_norms: np.ndarray


def plan_scalers(ckpt: Checkpoint, plan: EditPlan, edits: list[TensorEdit]) -> dict[str, Scaler]:
    """Writer weight name -> its Scaler, or an AbliterateError naming the component that cannot be carried exactly."""
    arch = plan.arch
    config = {**ckpt.config, **ckpt.text_config}
    components = sorted({e.component for e in edits})
    out: dict[str, Scaler] = {}
    for edit in edits:
        if edit.name.endswith((".bias", "_bias")) and len(edit.info.shape) == 1:
            continue  # a writer's bias: carried edited as a peft bias, as for the plain adapter
        way_out = _way_out(components, edit.component)
        if edit.component == "embed":
            raise AbliterateError(
                f"{edit.name}: the norm-preserving edit rescales each token's embedding row, but peft's DoRA on an "
                f"embedding scales hidden dimensions, not tokens, so no adapter carries it exactly: {way_out}")
        if looks_like_expert(edit.name) or len(edit.info.shape) > 2:
            raise AbliterateError(
                f"{edit.name}: a MoE expert; transformers holds the experts as fused parameters, on which peft has no "
                f"DoRA, so no adapter carries the norm-preserving rescaling of their inputs: {way_out}")
        if edit.hidden_axis != -2 or not edit.name.endswith(".weight") or arch is None:
            raise AbliterateError(
                f"{edit.name}: the norm-preserving adapter carries nn.Linear writers only (not GPT-2's Conv1D "
                f"layers): {way_out}")
        out[edit.name] = _scaler(ckpt, arch, config, edit, way_out)
    modules = [s.module for s in out.values()]
    if len(set(modules)) != len(modules):
        raise AbliterateError("two edited writers take their inputs from one module; the norm-preserving adapter "
                              "cannot scale it for both: write the weights (drop --adapter)")
    return out


def _way_out(components: list[str], refused: str) -> str:
    others = [c for c in components if c != refused]
    keep = (f"pass --components {','.join(others)} (recipe key apply.components; leaving {refused} unedited), or "
            if others else "")
    return f"{keep}write the weights (drop --adapter)"


def _scaler(ckpt: Checkpoint, arch: Arch, config: dict, edit: TensorEdit, way_out: str) -> Scaler:
    writer = edit.name.removesuffix(".weight")
    for rule in arch.input_scalers:
        found = rule.resolve(writer)
        if found is None or f"{found[0]}.weight" not in ckpt.tensors or (
                found[1] is not None and f"{found[1]}.weight" not in ckpt.tensors):
            continue
        module, power = found[0], 1
        if rule.via == "activation":
            act = config.get(rule.activation)
            if act not in POSITIVELY_HOMOGENEOUS:
                raise AbliterateError(
                    f"{edit.name}: its inputs are {module}'s outputs after the activation {act!r}, which is not "
                    f"positively homogeneous (act(a z) != a act(z)), so no scaling of {module} gives its D: {way_out}")
            power = POSITIVELY_HOMOGENEOUS[act]
        elif rule.via == "values":
            heads = config.get("num_attention_heads")
            kv = config.get("num_key_value_heads") or heads
            if heads is None or kv != heads:
                raise AbliterateError(
                    f"{edit.name}: its inputs are attention values shared by {heads // kv if heads and kv else '?'} "
                    f"heads each (grouped-query attention: {kv} value heads for {heads}), so its per-feature D is no "
                    f"scaling of {module}'s rows: {way_out}")
            clamps = [k for k in rule.unset if config.get(k) is not None]
            if clamps:
                raise AbliterateError(f"{edit.name}: the config sets {clamps[0]}, which clamps the attention values, "
                                      f"so scaling {module}'s rows is not exact: {way_out}")
        rows = ckpt.tensors[f"{module}.weight"][1].shape
        n = rule.part[1]
        if len(rows) != 2 or rows[0] % n or rows[0] // n != edit.info.shape[1]:
            raise AbliterateError(f"{edit.name}: {module}.weight {list(rows)} does not hold {n} equal blocks of "
                                  f"{edit.info.shape[1]} rows as the family file says: {way_out}")
        return Scaler(module, rule.part, power, arch.renamed_in_memory(module))
    raise AbliterateError(f"{edit.name}: the family file names no module whose output rows carry its input features "
                          f"(`input_scalers`), so no adapter carries its norm-preserving rescaling exactly: {way_out}")


def writer_stats(fd: int, edit: TensorEdit, r: np.ndarray, budget: int) -> WriterStats:
    """Read a writer weight [d, in] in `apply`'s chunks: coefficients summed as `apply` sums them, column sums of
    squares, then the edited rows' norms (from the chunk in memory; a matrix over the budget is read twice, as
    `apply` reads it)."""
    info = edit.info
    d, n = info.shape
    chunks = plan_chunks(info, -2, d, budget)
    scratch = Scratch()
    coeff = np.zeros((*r.shape[:-1], n), dtype=r.dtype)
    sumsq = np.zeros(n)
    stored = np.zeros((0, n))
    for chunk in chunks:
        stored = read_stored(fd, info, chunk, scratch)[0]
        rows = chunk.rows or slice(0, d)
        part = coefficients(stored, info.dtype, r[..., rows])
        coeff = part if rows.start == 0 else coeff + part
        sumsq += column_sumsq(stored, info.dtype)
    scaled = coeff * np.asarray(edit.scale, dtype=coeff.dtype)
    norms = np.zeros(d)
    for chunk in chunks:
        if len(chunks) > 1:
            stored = read_stored(fd, info, chunk, scratch)[0]
        rows = chunk.rows or slice(0, d)
        step = max(1, (1 << 16) // max(n, 1))
        for b in range(0, stored.shape[0], step):
            w = widen(stored[b : b + step], info.dtype).copy()
            block = slice(rows.start + b, rows.start + b + w.shape[0])
            subtract_terms(w, r[..., block], scaled)
            norms[block] = np.sqrt(np.einsum("ij,ij->i", w, w, dtype=np.float64))
    if not (norms > 0).all():
        raise AbliterateError(f"{edit.name}: row {int(np.argmin(norms))} is zero after the edit, and peft's DoRA "
                              "divides each row by its norm: write the weights (drop --adapter)")
    return WriterStats(coeff, sumsq, norms)


def input_factors(stats: WriterStats, scale: float) -> np.ndarray:
    """D per input feature of the writer, as `apply --norm-preserve` computes it (float64)."""
    return preserve_factors(stats.sumsq, stats.coeff, scale)


def scaler_terms(ckpt: Checkpoint, fds: dict[str, int], scaler: Scaler, factors: np.ndarray,
                 budget: int) -> tuple[np.ndarray, Bias | None]:
    """(DoRA magnitude of the scaler module [out], its bias scaled as the rows are, in its stored dtype, or None)."""
    shard, info = ckpt.tensors[f"{scaler.module}.weight"]
    out, width = info.shape
    norms = np.zeros(out)
    scratch = Scratch()
    for chunk in plan_chunks(info, -1, width, budget):
        w = widen(read_stored(fds[shard], info, chunk, scratch), info.dtype)
        first = chunk.first // width
        norms[first : first + w.shape[0]] = np.sqrt(np.einsum("ij,ij->i", w, w, dtype=np.float64))
    i, n = scaler.part
    rows = slice(i * out // n, (i + 1) * out // n)
    if not (norms[rows] > 0).all():
        raise AbliterateError(f"{scaler.module}.weight: a row is zero, and peft's DoRA divides each row by its norm: "
                              "write the weights (drop --adapter)")
    gain = np.ones(out)
    gain[rows] = factors ** (1.0 / scaler.power)
    bias = None
    if f"{scaler.module}.bias" in ckpt.tensors:
        b_shard, b_info = ckpt.tensors[f"{scaler.module}.bias"]
        stored = read_stored(fds[b_shard], b_info, Chunk(0, out, (out,)))
        values = widen(stored, b_info.dtype).astype(np.float64) * gain
        scaled = values.astype(np.float64 if b_info.dtype == "F64" else np.float32)
        bias = (b_info.dtype, b_info.shape, narrow_(scaled, b_info.dtype).tobytes())
    return norms * gain, bias


def add_scalers(factors: dict[str, Factors], magnitudes: dict[str, np.ndarray], biases: dict[str, Bias],
                writer_factors: dict[str, np.ndarray], ckpt: Checkpoint, scalers: dict[str, Scaler],
                fds: dict[str, int], budget: int, ignore_biases: bool, k: int) -> list[str]:
    """Each writer's D (`writer_factors`, by writer weight) as the DoRA magnitude of the module producing its inputs,
    with zero rank-k LoRA factors there, and that module's bias scaled alike (unless `ignore_biases`: the modules
    whose bias was left unscaled are returned)."""
    unscaled = []
    for writer, scaler in scalers.items():
        magnitude, bias = scaler_terms(ckpt, fds, scaler, writer_factors[writer], budget)
        info = ckpt.tensors[f"{scaler.module}.weight"][1]
        dtype = compute_dtype(info.dtype)
        module = scaler.peft_module or scaler.module
        factors[module] = Factors("linear", module, np.zeros((k, info.shape[1]), dtype),
                                  np.zeros((info.shape[0], k), dtype), np.ones(1, bool))
        magnitudes[module] = magnitude
        if bias is not None and not ignore_biases:
            biases[module] = bias
        elif bias is not None:
            unscaled.append(module)
    return unscaled
