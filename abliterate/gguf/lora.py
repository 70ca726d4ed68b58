"""`apply model.gguf --adapter`: the edit as a llama.cpp LoRA adapter GGUF instead of an edited model.

The projection W' = W - s Q^T (Q W) (Q: the k orthonormal directions, one row for a plain direction) is
W + B A with B = -s Q^T and A = Q W: rank k, exact. llama.cpp adds `scale x B (A x)` to every matmul whose
weight has an adapter pair, scale = --lora-scaled's value x alpha / rank; alpha is written as the rank, so
`--lora FILE` applies the edit as it is and `--lora-scaled FILE 0.5` half of it. Layout, as llama.cpp's
loader checks it: `NAME.lora_a` [k, in] and `NAME.lora_b` [out, k] (numpy order); for the token embedding
(looked up by row, not multiplied) `lora_a` holds a row per token, [vocab, k], and `lora_b` [d, k].

A is computed from the base file's own values (dequantised), so the adapter removes the direction from
whatever quantisation it is applied to when that is the file it was made from, and approximately from
other quantisations of the same model. A bias change cannot be a LoRA (refused unless --ignore-biases);
nor can llama.cpp's expert matmuls take this layout (MoE expert tensors are refused). A GGUF without
`output.weight` reads its output layer from `token_embd`, and llama.cpp would apply a `token_embd`
adapter to that matmul too, in the embedding's layout: the embedding edit is then left out, with a note.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from abliterate.edit.projection import widen
from abliterate.errors import AbliterateError
from abliterate.gguf.archs import OUTPUT_NAME, TOKEN_EMBEDDING
from abliterate.gguf.edit import atomic_file
from abliterate.gguf.format import FLOAT_TYPES, GgufTensor, _gguf, block_layout, dequantize
from abliterate.gguf.plan import GgufEdit, GgufPlan
from abliterate.io.direction_file import Direction
from abliterate.io.safetensors_format import pread_into
from abliterate.options.command import recorded_command

STORED = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


@dataclass(frozen=True)
class LoraResult:
    out: Path
    pairs: int
    rank: int
    nbytes: int
    notes: tuple[str, ...]


def write_gguf_lora(plan: GgufPlan, direction: Direction, out: Path, *, ignore_biases: bool = False,
                    overwrite: bool = False, max_memory: int = 256 << 20) -> LoraResult:
    """Write the plan's edit as a llama.cpp LoRA adapter GGUF at `out` (atomically)."""
    gguf = _gguf()
    edits, notes = _lora_edits(plan, ignore_biases)
    if not edits:
        raise AbliterateError("nothing to write: the edit changes no tensor a LoRA can carry (check --components "
                              "and --layers)")
    rank = direction.rank
    pairs: list[tuple[str, np.ndarray, np.ndarray]] = []
    with open(plan.src.path, "rb") as f:
        for edit in edits:
            q = np.asarray(direction.for_layer(edit.layer), np.float64).reshape(rank, -1)
            a = _lora_a(f.fileno(), edit.tensor, q, edit.hidden_axis, max(max_memory // 4, 1 << 20))
            pairs.append((edit.tensor.name, a.astype(np.float32), (-edit.scale * q.T).astype(np.float32)))
    writer_path = Path(out)
    with atomic_file(writer_path, overwrite=overwrite) as tmp:
        writer = gguf.GGUFWriter(tmp, plan.src.architecture)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))  # llama.cpp scales by alpha / rank = 1
        writer.add_string("abliterate.command", recorded_command())
        writer.add_string("abliterate.edit", f"removes {rank} direction(s) from {len(pairs)} tensors: "
                          "W + B A = W - s Q^T (Q W)")
        for name, a, b in pairs:
            writer.add_tensor(f"{name}.lora_a", a)
            writer.add_tensor(f"{name}.lora_b", b)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        size = tmp.stat().st_size
    return LoraResult(writer_path, len(pairs), rank, size, tuple(notes))


def _lora_edits(plan: GgufPlan, ignore_biases: bool) -> tuple[list[GgufEdit], list[str]]:
    """The plan's edits a llama.cpp LoRA can express (see the module docstring), and notes on the rest."""
    notes, kept = [], []
    tied = OUTPUT_NAME not in plan.src.by_name()
    for edit in plan.edits.values():
        t = edit.tensor
        if t.name.endswith(".bias"):
            if not ignore_biases:
                raise AbliterateError(f"{t.name}: the edit changes biases, which a LoRA cannot carry: pass "
                                      "--ignore-biases to leave them out (the adapter is then not the exact edit), "
                                      "or write the edited GGUF (no --adapter)")
            continue
        if len(t.shape) != 2:
            raise AbliterateError(f"{t.name} is a stack of experts {list(t.shape)}: llama.cpp's adapters for expert "
                                  "tensors take another layout; write the edited GGUF (no --adapter)")
        if t.name == TOKEN_EMBEDDING and tied:
            notes.append("token_embd is left out: this GGUF reads its output layer from token_embd, and llama.cpp "
                         "would apply a token_embd adapter to that layer too (the adapter is then the edit of "
                         "--components attn,mlp)")
            continue
        kept.append(edit)
    if ignore_biases and any(e.tensor.name.endswith(".bias") for e in plan.edits.values()):
        notes.append("--ignore-biases: the bias edits are left out (the adapter is not the exact edit)")
    return sorted(kept, key=lambda e: e.tensor.start), notes


def _lora_a(fd: int, t: GgufTensor, q: np.ndarray, hidden_axis: int, budget: int) -> np.ndarray:
    """A from the stored values, in float64: Q W [k, in] for a [d, in] matrix (hidden axis -2), or E Q^T
    [vocab, k] for a [vocab, d] embedding (hidden axis -1), reading whole rows within `budget` bytes."""
    rows, n = t.shape
    parts = []
    total = np.zeros((q.shape[0], n))
    step = max(1, budget // (8 * n))
    for first in range(0, rows, step):
        w = _read_rows(fd, t, first, min(step, rows - first)).astype(np.float64)
        if hidden_axis == -1:
            parts.append(w @ q.T)
        else:
            total += q[:, first : first + w.shape[0]] @ w
    return np.concatenate(parts) if hidden_axis == -1 else total


def _read_rows(fd: int, t: GgufTensor, first: int, count: int) -> np.ndarray:
    """Rows [first, first + count) of a 2-D tensor as float32 (dequantised when quantised)."""
    n = t.shape[-1]
    block, block_bytes = (1, np.dtype(STORED[t.type_name]).itemsize) if t.is_float else block_layout(t.type_name)
    row_bytes = n // block * block_bytes
    raw = np.empty(count * row_bytes, np.uint8)
    pread_into(fd, memoryview(raw), t.start + first * row_bytes)
    if t.is_float:
        return widen(raw.view(STORED[t.type_name]).reshape(count, n), FLOAT_TYPES[t.type_name]).astype(np.float32)
    return dequantize(raw, t.type_name, (count, n))


def describe(result: LoraResult) -> str:
    return (f"wrote a llama.cpp LoRA adapter of {result.pairs} tensors, rank {result.rank} "
            f"({result.nbytes / 1e6:.1f} MB) to {result.out}: llama-cli -m MODEL.gguf --lora {result.out.name}")

