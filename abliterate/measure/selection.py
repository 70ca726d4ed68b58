"""Choosing among scored candidates: pure, so a saved extraction can be re-chosen without the model.

The filters of Arditi et al. (2024, section 2.3) keep candidates whose ablation leaves harmless
replies nearly unchanged (first-token KL <= kl_threshold) and whose addition makes harmless
prompts refused (refusal log-odds > induce_threshold), outside the last `prune_layers` of layers;
the lowest ablation score among them wins. When no candidate passes every filter, the choice is
still made, with the filters relaxed one at a time and the reason recorded:

1. the induction filter is dropped (the best ablation score among those within the KL limit);
2. else the KL limit is raised to twice the lowest KL any remaining candidate reaches;
3. else both.

Only when no candidate has finite full scores is there nothing to choose.

By default candidates are ranked by the first-token scores alone (fast). With
``refusal_objective="count"`` the finalists also carry a count of refused greedy replies (measured
by the caller, `search.finalists`, since counting needs generation) and the fewest refusals win, the
ablation score breaking ties; with ``kl_objective="continuation"`` the KL filter reads the KL averaged over the
reply's first tokens instead of the first token's. The settings saved with the scores record which.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace

from abliterate.errors import AbliterateError
from abliterate.options.recipe import KL_OBJECTIVES, REFUSAL_OBJECTIVES, SelectionSettings

__all__ = ["CandidateScore", "Choice", "SelectionSettings", "choose", "scores_from_json", "scores_json", "verdict"]


@dataclass(frozen=True)
class CandidateScore:
    layer: int  # residual stream index: the stream entering decoder layer `layer`
    position: int  # negative index among the post-instruction tokens (-1: the last)
    refusal_ablated: float  # mean refusal log-odds on `prompts` harmful validation prompts, direction ablated
    refusal_added: float | None  # None: pruned before the full scores (see `prompts`)
    kl: float | None  # None also for a fallback candidate that did not induce refusal (scores.py)
    rejected: str | None  # why the candidate was not chosen by the strict filters, or None
    prompts: int = 0  # harmful validation prompts behind refusal_ablated
    refusals: int | None = None  # refused greedy replies of `replies` harmful validation prompts, ablated
    replies: int = 0
    kl_continuation: float | None = None  # KL over the first reply tokens on harmless prompts, ablated

    @property
    def full(self) -> bool:
        return self.refusal_added is not None and self.kl is not None


def _kl(s: CandidateScore, settings: SelectionSettings) -> float | None:
    return s.kl_continuation if settings.kl_objective == "continuation" else s.kl


def _measured(s: CandidateScore, settings: SelectionSettings) -> bool:
    """Has every score the settings rank and filter by."""
    return s.full and _kl(s, settings) is not None and (settings.refusal_objective == "score" or s.refusals is not None)


def _values(s: CandidateScore, settings: SelectionSettings) -> tuple[float, ...]:
    extra = (float(s.refusals),) if settings.refusal_objective == "count" else ()
    return (s.refusal_ablated, s.refusal_added, _kl(s, settings), *extra)


def check_settings(settings: SelectionSettings) -> None:
    if settings.refusal_objective not in REFUSAL_OBJECTIVES:
        raise AbliterateError(f"unknown refusal objective {settings.refusal_objective!r}; use one of "
                              f"{', '.join(REFUSAL_OBJECTIVES)}")
    if settings.kl_objective not in KL_OBJECTIVES:
        raise AbliterateError(f"unknown KL objective {settings.kl_objective!r}; use one of {', '.join(KL_OBJECTIVES)}")


@dataclass(frozen=True)
class Choice:
    best: CandidateScore
    scores: list[CandidateScore]  # every candidate with the verdict of the strict filters
    relaxed: str | None  # one line: which filter was relaxed and why; None when all filters held


def max_layer(num_layers: int, prune_layers: float) -> int:
    """Residual streams at or above this index are never chosen."""
    return int(num_layers * (1 - prune_layers))


def verdict(s: CandidateScore, settings: SelectionSettings, num_layers: int) -> str | None:
    """Why the strict filters reject `s` (None: it passes)."""
    if s.refusal_added is not None and s.kl is None:  # a fallback candidate that failed induction (scores.py)
        return (f"adding it does not induce refusal ({s.refusal_added:.2f} <= {settings.induce_threshold}; KL not "
                "measured)")
    if not s.full:
        return f"pruned after screening (ablation score on {s.prompts} prompts)"
    if not _measured(s, settings):
        return "not among the finalists measured by generated replies"
    if not all(math.isfinite(x) for x in _values(s, settings)):
        return "non-finite score"
    if s.layer >= max_layer(num_layers, settings.prune_layers):
        return f"in the last {settings.prune_layers:.0%} of layers"
    if s.refusal_added <= settings.induce_threshold:
        return f"adding it does not induce refusal ({s.refusal_added:.2f} <= {settings.induce_threshold})"
    if _kl(s, settings) > settings.kl_threshold:
        return f"{settings.kl_objective} KL {_kl(s, settings):.3f} > {settings.kl_threshold}"
    return None


def choose(scores: list[CandidateScore], settings: SelectionSettings, num_layers: int) -> Choice:
    """The best candidate under the strict filters, else under relaxed ones (saying which and why)."""
    check_settings(settings)
    judged = [replace(s, rejected=verdict(s, settings, num_layers)) for s in scores]
    top = max_layer(num_layers, settings.prune_layers)
    usable = [s for s in judged if _measured(s, settings) and s.layer < top
              and all(math.isfinite(x) for x in _values(s, settings))]
    if not usable:
        if settings.refusal_objective == "count" and not any(s.refusals is not None for s in scores):
            raise AbliterateError("--refusal-objective count needs refused-reply counts, which these scores lack; "
                                  "run `abliterate extract MODEL --refusal-objective count` (it generates them)")
        raise AbliterateError(
            f"none of the {len(scores)} candidates has finite full scores below the last "
            f"{settings.prune_layers:.0%} of layers; check that the model runs in this dtype (try --dtype float32) "
            "and refuses the harmful prompts at all")
    key = (lambda s: (s.refusals, s.refusal_ablated)) if settings.refusal_objective == "count" else (
        lambda s: s.refusal_ablated)
    best = lambda pool: min(pool, key=key)  # noqa: E731
    kl = lambda s: _kl(s, settings)  # noqa: E731
    ranked = "fewest refused replies" if settings.refusal_objective == "count" else "best ablation score"
    induces = lambda s: s.refusal_added > settings.induce_threshold  # noqa: E731
    passed = [s for s in usable if s.rejected is None]
    if passed:
        return Choice(best(passed), judged, None)
    within_kl = [s for s in usable if kl(s) <= settings.kl_threshold]
    if within_kl:
        strongest = max(s.refusal_added for s in within_kl)
        return Choice(best(within_kl), judged, (
            f"induction filter relaxed: adding no candidate within KL {settings.kl_threshold} raised the harmless "
            f"prompts' refusal log-odds above {settings.induce_threshold} (highest {strongest:.2f}); chose the "
            f"{ranked} among those {len(within_kl)}"))
    inducing = [s for s in usable if induces(s)]
    pool, what = (inducing, "KL limit relaxed") if inducing else (usable, "KL limit and induction filter relaxed")
    lowest = min(kl(s) for s in pool)
    limit = 2 * lowest
    chosen = best([s for s in pool if kl(s) <= limit])
    why = "" if inducing else f" and none induces refusal (threshold {settings.induce_threshold})"
    return Choice(chosen, judged, (
        f"{what}: no candidate stays within KL {settings.kl_threshold} (lowest {lowest:.3f}){why}; chose the "
        f"{ranked} among those within KL {limit:.3f} (twice the lowest)"))


def scores_json(scores: list[CandidateScore]) -> str:
    return json.dumps([asdict(s) for s in scores], separators=(",", ":"))


def scores_from_json(text: str) -> list[CandidateScore]:
    """Scores as saved by `scores_json` (files written before screening existed lack `prompts`)."""
    names = {f.name for f in fields(CandidateScore)}
    try:
        rows = json.loads(text)
        return [CandidateScore(**{k: v for k, v in row.items() if k in names}) for row in rows]
    except (ValueError, TypeError) as e:
        raise AbliterateError(f"the saved candidate scores cannot be read ({e}); re-run `abliterate extract`") from None
