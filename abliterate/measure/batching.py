"""Batch sizes that fit the device: `--batch-size auto`, and halving instead of an out-of-memory traceback.

Every batched loop that runs the model (extraction's means, candidate scoring, generation) hands each batch
to `run_fitting`: when the device runs out of memory (torch.cuda.OutOfMemoryError) the batch is split in
halves and retried, one line says so, and the smaller size holds for the rest of the loop and is saved per
model, device and dtype (XDG cache, ~/.cache/abliterate/batch_sizes.json), so the next command starts from a
size that fits. Rows are independent (left padding, masked, positions counted from each row's first real
token), so a split batch computes what the whole one would. `auto` is the largest size that fits on CUDA
(starting from the cached size, or 256, and halving) and a fixed default elsewhere (CPU memory is
plentiful next to the weights; larger CPU batches gain little).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from abliterate.errors import AbliterateError
from abliterate.measure.loading import LoadedModel

AUTO = 0  # --batch-size auto, as the settings carry it
AUTO_START = 256  # the first size `auto` tries on CUDA without a cached one
CPU_DEFAULT = 16


@dataclass(frozen=True)
class Batch:
    indices: list[int]  # positions of these prompts in the caller's list
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions counted from each row's first real token, as generate() does for left padding
        (models with absolute position embeddings would otherwise see shifted positions)."""
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}


def batches(lm: LoadedModel, prompts: Sequence[str] | Sequence[list[int]], batch_size: int) -> Iterator[Batch]:
    """Left-padded batches of similar length; `indices` map rows back to `prompts` (texts or token ids).
    batch_size: as `resolve` reads it (AUTO: the largest that fits; on CUDA capped by a cached size that fits)."""
    tok = lm.tokenizer
    batch_size = resolve(lm, batch_size)
    ids = [list(p) for p in prompts] if prompts and not isinstance(prompts[0], str) else \
        tok(list(prompts), add_special_tokens=False)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tok.pad({"input_ids": [ids[i] for i in idx]}, padding=True, return_tensors="pt")
        yield Batch(idx, enc["input_ids"].to(lm.device), enc["attention_mask"].to(lm.device))


def cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "abliterate" / "batch_sizes.json"


def _key(lm: LoadedModel) -> str:
    dtype = next(lm.model.parameters()).dtype
    device = torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else lm.device.type
    return f"{lm.name}|{device}|{str(dtype).removeprefix('torch.')}"


def cached(lm: LoadedModel) -> int | None:
    try:
        return int(json.loads(cache_file().read_text())[_key(lm)])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remember(lm: LoadedModel, size: int) -> None:
    """Save the largest size known to fit this model on this device (best effort: a cache)."""
    path = cache_file()
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
        data[_key(lm)] = size
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except (OSError, ValueError):
        pass


def resolve(lm: LoadedModel, requested: int | str) -> int:
    """The batch size a loop starts with: the requested one, capped by a cached size known to fit; `auto`
    (or 0): on CUDA the cached size or AUTO_START, elsewhere CPU_DEFAULT."""
    size = AUTO if requested in ("auto", AUTO) else int(requested)
    known = cached(lm)
    if size == AUTO:
        return (known or AUTO_START) if lm.device.type == "cuda" else CPU_DEFAULT
    return min(size, known) if known and lm.device.type == "cuda" else size


class Fitting:
    """The largest batch known to fit during one loop (shared by its batches), halved on out-of-memory."""

    def __init__(self, lm: LoadedModel, size: int) -> None:
        self.lm, self.size = lm, max(1, size)

    def run(self, batch: Batch, fn: Callable[[Batch], None]) -> None:
        """fn on the batch in pieces of at most `size` rows; on out-of-memory, halve and retry the piece.
        fn must change nothing before it succeeds (write its results only at its end)."""
        pending = list(split(batch, self.size))
        while pending:
            piece = pending.pop(0)
            try:
                fn(piece)
            except torch.cuda.OutOfMemoryError:
                if len(piece.indices) == 1:
                    raise AbliterateError("out of GPU memory with one prompt per batch; place the model across "
                                          "devices with --device-map auto (and --max-memory)") from None
                torch.cuda.empty_cache()
                self.size = len(piece.indices) // 2
                print(f"note: out of GPU memory at batch size {len(piece.indices)}; continuing at {self.size}",
                      file=sys.stderr)
                remember(self.lm, self.size)
                pending = [part for p in (piece, *pending) for part in split(p, self.size)]


def split(batch: Batch, size: int) -> list[Batch]:
    """The batch as pieces of at most `size` rows, each without the padding columns no row of it needs."""
    out = []
    for start in range(0, len(batch.indices), size):
        mask = batch.attention_mask[start:start + size]
        first = int((mask.sum(0) > 0).nonzero()[0]) if bool(mask.any()) else 0
        out.append(Batch(batch.indices[start:start + size], batch.input_ids[start:start + size, first:],
                         mask[:, first:]))
    return out


def run_fitting(lm: LoadedModel, batch_list: list[Batch], fn: Callable[[Batch], None], size: int | None = None,
                progress: Callable[[int], None] | None = None) -> None:
    """fn on every batch (see `Fitting.run`); size: the largest batch to run at once (default: as built)."""
    fitting = Fitting(lm, size or max((len(b.indices) for b in batch_list), default=1))
    for batch in batch_list:
        fitting.run(batch, fn)
        if progress is not None:
            progress(len(batch.indices))
