"""More directions beside the chosen one (`extract --directions K`): the leading principal directions of the
per-prompt harmful-minus-harmless differences at the chosen layer and position.

The difference of means r is what one direction removes; prompts differ from it, and the directions along
which they differ most are the next candidates for a rank-k edit. Per prompt, a harmful activation minus the
harmless mean and the harmful mean minus a harmless activation (both point from harmless to harmful, and
their mean is r); with r projected out, their leading right singular vectors, each scaled to the root mean
square of the differences along it. Row 0 of the file stays the chosen r, so the rank-1 edit is the file's
first row and the search can try k = 1..K. Only the chosen residual stream is kept, one vector per prompt,
and the forward stops at the layer that writes it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from tqdm import tqdm

from abliterate.errors import AbliterateError
from abliterate.measure.activations import batches, decoder
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

    body = decoder(lm)
    with capture_residuals(lm.model, lm.arch, sink), torch.inference_mode():
        for batch in tqdm(list(batches(lm, prompts, batch_size)), desc=desc, disable=quiet, leave=False):
            rows[:] = batch.indices
            with contextlib.suppress(_Enough):
                body(**batch.inputs(), use_cache=False)
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


def propose(lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], stream: int, position: int,
            r: torch.Tensor, count: int, *, batch_size: int = 16, quiet: bool = False) -> torch.Tensor:
    """`count` directions to remove beside r (formatted prompts; stream and position of the chosen candidate)."""
    h = activations_at(lm, harmful, stream, position, batch_size=batch_size, desc="harmful (directions)", quiet=quiet)
    b = activations_at(lm, harmless, stream, position, batch_size=batch_size, desc="harmless (directions)",
                       quiet=quiet)
    return principal_directions(h, b, r, count).to(torch.float32)
