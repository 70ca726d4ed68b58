"""More directions beside the chosen one (`extract --directions K`): the leading principal directions of the
per-prompt harmful-minus-harmless differences at the chosen layer and position.

The difference of means r is what one direction removes; prompts differ from it, and the directions along
which they differ most are the next candidates for a rank-k edit. Per prompt, a harmful activation minus the
harmless mean and the harmful mean minus a harmless activation (both point from harmless to harmful, and
their mean is r); with r projected out, their leading right singular vectors, each scaled to the root mean
square of the differences along it. Row 0 of the file stays the chosen r, so the rank-1 edit is the file's
first row and the search can try k = 1..K. Only the chosen residual stream is kept, one vector per prompt,
and the forward stops at the layer that writes it.

With `--proposals categories` (harmful prompts labelled with categories, e.g. builtin:harmful's 16), the
further directions are categories' own differences instead: a category's harmful mean minus the harmless
mean, at the same layer and position. r is the prompt-weighted mean of those differences, so r and all C of
them span only C dimensions: the categories are taken greedily, each time the one whose difference keeps the
most norm outside the span of r and those already taken (the most different behaviour first), K - 1 of them
at most C - 1; the file records which categories its rows are.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Sequence

import torch
from tqdm import tqdm

from abliterate.errors import AbliterateError
from abliterate.io.direction_file import DEPENDENT
from abliterate.measure.activations import decoder
from abliterate.measure.batching import Batch, batches, run_fitting
from abliterate.measure.hooks import capture_residuals
from abliterate.measure.loading import LoadedModel


class _Enough(Exception):
    """Raised by the capture hook once the wanted residual stream is read: later layers need not run."""


def activations_at(lm: LoadedModel, prompts: Sequence[str], stream: int, position: int, *, batch_size: int = 16,
                   desc: str = "activations", quiet: bool = False) -> torch.Tensor:
    """Residual stream `stream` (0: entering layer 0, L + 1: leaving layer L) at token `position` (negative, from
    the end) of every prompt, in the prompts' order: [n, d] float64."""
    out = torch.empty(len(prompts), lm.hidden_size, dtype=torch.float64)
    rows: list[int] = []

    def sink(i: int, hidden: torch.Tensor) -> None:
        if i == stream:
            out[rows] = hidden[:, position, :].to(device="cpu", dtype=torch.float64)
            raise _Enough

    def step(batch: Batch) -> None:
        rows[:] = batch.indices
        with contextlib.suppress(_Enough):
            body(**batch.inputs(), use_cache=False)

    body = decoder(lm)
    with (capture_residuals(lm.model, lm.arch, sink), torch.inference_mode(),
          tqdm(total=len(prompts), desc=desc, disable=quiet, leave=False, unit="prompt") as bar):
        run_fitting(lm, list(batches(lm, prompts, batch_size)), step, progress=bar.update)  # OOM: halved
    return out


def principal_directions(harmful: torch.Tensor, harmless: torch.Tensor, r: torch.Tensor, count: int) -> torch.Tensor:
    """`count` directions [count, d] orthogonal to r: the leading principal directions of the per-prompt
    differences (harmful [n, d] minus the harmless mean, the harmful mean minus harmless [m, d]) once r is
    projected out, each scaled to the differences' root mean square along it."""
    unit = r.to(torch.float64) / r.to(torch.float64).norm()
    diffs = torch.cat([harmful - harmless.mean(0), harmful.mean(0) - harmless])
    diffs = diffs - (diffs @ unit)[:, None] * unit
    available = min(diffs.shape) - 1
    if count > available:
        raise AbliterateError(f"--directions {count + 1} needs more prompts: {len(diffs)} differences give at most "
                              f"{available + 1} directions; pass more --n-train prompts or fewer --directions")
    _, s, vt = torch.linalg.svd(diffs, full_matrices=False)
    if not bool((s[:count] > 1e-9 * s[0]).all()):
        raise AbliterateError(f"the prompts' differences span fewer than {count + 1} directions at this layer; "
                              "pass fewer --directions")
    return vt[:count] * (s[:count] / len(diffs) ** 0.5)[:, None]


def check_categories(labels: Sequence[str | None], count: int) -> None:
    """Before any forward pass: enough categories among the harmful training prompts for `count` more directions
    (r and C categories span C dimensions, so at most C - 1 beside r)."""
    found = Counter(label for label in labels if label is not None)
    if not found:
        raise AbliterateError("--proposals categories needs harmful prompts with categories: builtin:harmful, or a "
                              ".json/.jsonl/.csv/.tsv/.parquet file whose entries have a `category` field")
    if count > len(found) - 1:
        raise AbliterateError(f"--directions {count + 1} with --proposals categories needs {count + 1} categories "
                              f"among the harmful training prompts but they have {len(found)} "
                              f"({', '.join(sorted(found))}); pass --directions {len(found)} or fewer")


def category_directions(harmful: torch.Tensor, harmless: torch.Tensor, labels: Sequence[str | None],
                        r: torch.Tensor, count: int) -> tuple[torch.Tensor, list[str]]:
    """`count` category differences [count, d] (a category's harmful mean minus the harmless mean; harmful [n, d]
    in the order of `labels`, harmless [m, d]) and their categories, taken greedily: each time the one keeping
    the most of its norm outside the span of r and those taken so far."""
    check_categories(labels, count)
    names = sorted({label for label in labels if label is not None})
    index = torch.tensor([names.index(label) if label is not None else -1 for label in labels])
    diffs = torch.stack([harmful[index == i].mean(0) for i in range(len(names))]) - harmless.mean(0)
    basis = [r.to(torch.float64) / r.to(torch.float64).norm()]
    taken: list[int] = []
    for _ in range(count):
        span = torch.stack(basis)
        rest = diffs - (diffs @ span.T) @ span
        kept = rest.norm(dim=1) / diffs.norm(dim=1)
        kept[taken] = -1.0
        best = int(kept.argmax())
        if not float(kept[best]) > DEPENDENT:
            raise AbliterateError(f"the categories' differences span fewer than {count + 1} directions at this "
                                  "layer; pass fewer --directions")
        taken.append(best)
        basis.append(rest[best] / rest[best].norm())
    return diffs[taken], [names[i] for i in taken]


def propose(lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], stream: int, position: int,
            r: torch.Tensor, count: int, *, batch_size: int = 16, quiet: bool = False,
            categories: Sequence[str | None] | None = None) -> tuple[torch.Tensor, list[str] | None]:
    """`count` directions to remove beside r (formatted prompts; stream and position of the chosen candidate):
    principal directions, or with `categories` (one label or None per harmful prompt) categories' differences,
    with their categories."""
    h = activations_at(lm, harmful, stream, position, batch_size=batch_size, desc="harmful (directions)", quiet=quiet)
    b = activations_at(lm, harmless, stream, position, batch_size=batch_size, desc="harmless (directions)",
                       quiet=quiet)
    if categories is not None:
        rows, names = category_directions(h, b, categories, r, count)
        return rows.to(torch.float32), names
    return principal_directions(h, b, r, count).to(torch.float32), None
