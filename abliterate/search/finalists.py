"""Extraction's finalists measured by what the model generates, for `--refusal-objective count` and
`--kl-objective continuation` in `extract` and the whole job.

The first-token scores that screen candidates are cheap but see one token: a direction can stop a
refusal's first word while the reply still refuses a few tokens later, or leave the first token alone
and change what follows. Counting refused replies needs generation and the refusal markers, which
live in evaluate/, so this step sits above measure/: it runs every finalist (the candidates with full
scores, below the pruned layers) under the same ablation hooks selection uses, and returns the scores
with `refusals` / `kl_continuation` filled in; `measure.selection.choose` then ranks by them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from abliterate.evaluate.objectives import ContinuationKL, RefusalCount
from abliterate.measure.hooks import ablate
from abliterate.measure.loading import LoadedModel
from abliterate.measure.selection import CandidateScore, check_settings, max_layer
from abliterate.options.recipe import SelectionSettings

Measure = Callable[[torch.Tensor, list[CandidateScore]], list[CandidateScore]]


def by_generation(settings: SelectionSettings) -> bool:
    """Whether the settings need finalists measured beyond the first token."""
    return settings.refusal_objective == "count" or settings.kl_objective == "continuation"


def finalist_measure(lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], settings: SelectionSettings,
                     *, template: str | None = None, thinking: bool = False, quiet: bool = False) -> Measure:
    """A function (candidates [layers + 1, positions, d], scores) -> scores with the generation measures of every
    finalist; harmful / harmless are the raw validation instructions. The unedited model's continuations for the
    KL are generated here, once, before any ablation."""
    check_settings(settings)
    common = dict(batch_size=settings.batch_size, template=template, thinking=thinking)
    kl = (ContinuationKL(lm, harmless, settings.kl_tokens, quiet=quiet, **common)
          if settings.kl_objective == "continuation" else None)
    count = (RefusalCount(lm, harmful, settings.max_new_tokens, **common)
             if settings.refusal_objective == "count" else None)

    def measure(candidates: torch.Tensor, scores: list[CandidateScore]) -> list[CandidateScore]:
        top = max_layer(lm.num_layers, settings.prune_layers)
        finalists = [i for i, s in enumerate(scores) if s.full and s.layer < top]
        out = list(scores)
        for i in tqdm(finalists, desc="finalists by replies", disable=quiet):
            s = scores[i]
            with ablate(lm.model, lm.arch, candidates[s.layer, s.position], num_layers=lm.num_layers):
                refusals = count() if count else None
                continuation = kl() if kl else None
            out[i] = replace(s, refusals=refusals, replies=len(harmful) if count else 0, kl_continuation=continuation)
        return out

    return measure
