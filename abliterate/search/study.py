"""`abliterate search`: explore edit parameters and keep the trade-off front of refusals against KL.

Extraction picks one direction and `apply` removes it fully from every writer: one point. Often a
better point exists: a neighbouring candidate, a blend of two layers' candidates, the direction made
orthogonal to the harmless mean first ("projected"), or less removal where the direction does little
but damage. Each trial picks

* a direction: candidate (layer, position) from the extraction file, `direction_layer` fractional to
  blend layer floor(x) with floor(x) + 1 (unit vectors, interpolated), optionally projected;
* per component a strength profile (strengths.Profile: peak, its layer, width, floor; one strength for
  the embedding),

and is scored with ablation hooks driven by `EditOptions.strength`, the very scales `apply` writes: no
weights are rewritten and the model is never reloaded. Objectives (optuna, multi-objective TPE, both
minimised): the mean first-token refusal log-odds on harmful validation prompts and the first-token KL on
harmless ones. A trial that lands on the front of those two also gets a greedy, short generation on the
harmful prompts whose replies are matched against the refusal markers: the refusal count of the table.
Every trial on the final front was on the front when it ran, so every one has its count.

The study is an SQLite file; a rerun with the same --study and name resumes it (trial numbers go on).
The chosen point is saved as a recipe (apply.direction, apply.layer_scales) plus its direction file.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from abliterate.edit.plan import EditOptions
from abliterate.edit.strengths import LAYERED, Profile
from abliterate.errors import AbliterateError, first_line
from abliterate.evaluate.objectives import ContinuationKL, RefusalCount
from abliterate.io.direction_file import RankDeficientError
from abliterate.measure.hooks import ablate
from abliterate.measure.loading import LoadedModel
from abliterate.measure.scores import (
    REFUSAL_PREFIXES,
    first_token_logprobs,
    kl_divergence,
    refusal_score,
    refusal_token_ids,
)
from abliterate.measure.templates import render
from abliterate.search.front import (
    DIRECTION_SUFFIX,
    TrialResult,
    best_text,
    dominated,
    pareto_front,
    pick,
    save_choice,
    table,
)
from abliterate.search.space import (
    CandidateSet,
    Point,
    direction_for,
    load_candidates,
    seed_points,
    selected_point,
)

# names importable from here as before the split (their homes are space.py and front.py)
__all__ = ["DIRECTION_SUFFIX", "STUDY_SUFFIX", "CandidateSet", "Point", "Scorer", "SearchResult", "SearchSettings",
           "TrialResult", "default_study_path", "direction_for", "load_candidates", "open_study", "pareto_front",
           "pick", "save_choice", "search", "selected_point", "suggest", "table"]

STUDY_SUFFIX = ".study.db"


@dataclass(frozen=True)
class SearchSettings:
    trials: int = 100  # the study's total: a rerun with more continues it
    seed: int = 0
    startup_trials: int = 10  # random trials before TPE models the front
    max_strength: float = 1.5  # upper bound of every peak / embed strength
    batch_size: int = 16
    max_new_tokens: int = 24  # greedy tokens per reply for the refusal count (short: it runs often)
    start_from_selected: bool = True  # enqueue the extraction's choice, fully removed, as the first trial
    template: str | None = None
    thinking: bool = False
    refusal_prefixes: tuple[str, ...] = REFUSAL_PREFIXES
    kl_objective: str = "first-token"  # or "continuation": KL over the first kl_tokens reply tokens (slower)
    refusal_objective: str = "score"  # or "count": greedy replies matched by the markers, every trial (slower)
    kl_tokens: int = 16
    time_budget: float | None = None  # seconds: no new trial starts after this (None: only `trials` limits)
    norm_preserve: bool = True  # search norm-preserving edits too (a dimension: on or off per trial)
    seed_points: bool = True  # after the extraction's choice, enqueue space.seed_points (no embedding edit, heretic's)

    def template_kwargs(self) -> dict:
        return {} if self.thinking else {"enable_thinking": False}


@dataclass(frozen=True)
class SearchResult:
    trials: list[TrialResult]  # every completed trial of the study, in order
    front: list[TrialResult]  # Pareto front of (refusals, KL), fewest refusals first
    prompts: int  # harmful validation prompts the refusals are counted on
    ran: int  # trials run by this call
    seconds: float
    study: Path
    study_name: str
    notes: list[str] = field(default_factory=list)
    borderline: int = 0  # borderline prompts the over-refusals are counted on (0: not counted)


def suggest(trial, cands: CandidateSet, settings: SearchSettings, num_layers: int) -> Point:
    top = settings.max_strength
    layer = trial.suggest_float("direction_layer", float(cands.min_layer), float(cands.max_layer))
    position = trial.suggest_int("direction_position", -cands.positions, -1)
    projected = trial.suggest_categorical("projected", [False, True]) if cands.harmless_mean is not None else False
    k = trial.suggest_int("directions", 1, cands.max_directions) if cands.max_directions > 1 else 1
    preserve = trial.suggest_categorical("norm_preserve", [False, True]) if settings.norm_preserve else False
    embed = trial.suggest_float("embed_strength", 0.0, top)
    profiles = {c: Profile(trial.suggest_float(f"{c}_peak", 0.0, top),
                           trial.suggest_float(f"{c}_center", 0.0, float(num_layers - 1)),
                           trial.suggest_float(f"{c}_width", 0.5, float(num_layers)),
                           trial.suggest_float(f"{c}_floor", 0.0, 1.0)) for c in LAYERED}
    return Point(layer, position, projected, embed, profiles, preserve, k)


class Scorer:
    """Scores points with hooks on one loaded model; the unedited first-token distribution is computed once."""

    def __init__(self, lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], settings: SearchSettings,
                 borderline: Sequence[str] = ()):
        if not harmful or not harmless:
            raise AbliterateError("search needs harmful and harmless validation prompts (got an empty set)")
        self.lm, self.settings, self.harmful, self.borderline = lm, settings, list(harmful), list(borderline)
        fmt = lambda texts: [render(lm.tokenizer, t, settings.template, **settings.template_kwargs())  # noqa: E731
                             for t in texts]
        self.harmful_prompts, self.harmless_prompts = fmt(harmful), fmt(harmless)
        self.refusal_ids = refusal_token_ids(lm.tokenizer, settings.refusal_prefixes)
        self.base = first_token_logprobs(lm, self.harmless_prompts, settings.batch_size)
        self.continuation_kl = self.refusal_count = None  # objectives beyond the first token, when asked for
        s, common = settings, {"batch_size": settings.batch_size, "template": settings.template,
                               "thinking": settings.thinking}
        if s.kl_objective == "continuation":
            self.continuation_kl = ContinuationKL(lm, harmless, s.kl_tokens, **common)
        if s.refusal_objective == "count":
            self.refusal_count = RefusalCount(lm, harmful, s.max_new_tokens, **common)

    def _ablated(self, r: torch.Tensor, options: EditOptions):
        if options.norm_preserve:
            from abliterate.measure.preserving_hooks import ablate_preserving

            return ablate_preserving(self.lm.model, self.lm.arch, r, strength=options.strength,
                                     num_layers=self.lm.num_layers)
        return ablate(self.lm.model, self.lm.arch, r, strength=options.strength, num_layers=self.lm.num_layers)

    def first_token(self, r: torch.Tensor, options: EditOptions) -> tuple[float, float]:
        """(mean refusal log-odds on harmful prompts, mean KL on harmless prompts) with the edit applied."""
        bs = self.settings.batch_size
        with self._ablated(r, options):
            if self.refusal_count is not None:
                score = float(self.refusal_count())
            else:
                score = refusal_score(first_token_logprobs(self.lm, self.harmful_prompts, bs), self.refusal_ids)
                score = score.mean().item()
            if self.continuation_kl is not None:
                kl = self.continuation_kl()
            else:
                kl = kl_divergence(self.base, first_token_logprobs(self.lm, self.harmless_prompts, bs)).mean().item()
        return score, kl

    def refusals(self, r: torch.Tensor, options: EditOptions, prompts: Sequence[str] | None = None) -> int:
        """Greedy short replies to the harmful prompts (or `prompts`) that match a refusal marker."""
        from abliterate.evaluate.generation import generate
        from abliterate.evaluate.markers import find_refusal
        from abliterate.evaluate.records import EvalSettings

        s = self.settings
        with self._ablated(r, options):
            replies = generate(self.lm, self.harmful if prompts is None else prompts,
                               EvalSettings(batch_size=s.batch_size, template=s.template, thinking=s.thinking),
                               s.max_new_tokens, quiet=True)
        return sum(find_refusal(text) is not None for text, _ in replies)

    def overrefusals(self, r: torch.Tensor, options: EditOptions) -> int | None:
        """Refused borderline prompts (None without a borderline set): an edit must not buy fewer refusals of
        harmful requests with refusing safe ones."""
        return self.refusals(r, options, self.borderline) if self.borderline else None


def _optuna():
    try:
        import optuna
    except ImportError:
        raise AbliterateError("abliterate search needs optuna: pip install 'abliterate[search]'") from None
    return optuna


def default_study_path(out: Path) -> Path:
    return out.with_name(out.stem + STUDY_SUFFIX)


def _fingerprint(lm: LoadedModel, cands: CandidateSet, scorer: Scorer, settings: SearchSettings) -> dict[str, str]:
    """What the objectives depend on: a resumed study must not mix trials scored differently."""
    borderline = ["\2", *scorer.borderline] if scorer.borderline else []
    prompts = hashlib.sha256("\0".join([*scorer.harmful_prompts, "\1", *scorer.harmless_prompts, *borderline]).encode())
    return {"candidates": cands.digest, "prompts": prompts.hexdigest()[:16],
            "layers": str(lm.num_layers), "min_layer": str(cands.min_layer), "max_layer": str(cands.max_layer),
            "positions": str(cands.positions),
            "projected": str(cands.harmless_mean is not None), "max_strength": str(settings.max_strength),
            "max_new_tokens": str(settings.max_new_tokens), **_objective_fingerprint(settings),
            **({"directions": str(cands.max_directions)} if cands.max_directions > 1 else {})}


def _objective_fingerprint(settings: SearchSettings) -> dict[str, str]:
    """The objectives, only when not the defaults (studies made before they existed still resume)."""
    out = {}
    if settings.kl_objective != "first-token":
        out.update(kl_objective=settings.kl_objective, kl_tokens=str(settings.kl_tokens))
    if settings.refusal_objective != "score":
        out["refusal_objective"] = settings.refusal_objective
    if settings.norm_preserve:
        out["norm_preserve"] = "True"
    return out


def open_study(path: Path, name: str, fingerprint: dict[str, str], seed: int, startup_trials: int):
    """Create or resume the SQLite study; trials a killed run left 'running' are marked failed."""
    optuna = _optuna()
    TrialState = optuna.trial.TrialState
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{path.resolve()}")
    except Exception as e:  # sqlalchemy's errors for a file that is not an optuna SQLite database
        raise AbliterateError(f"cannot open the study {path}: {first_line(e)}; pass another --study") from None
    existing = {s.study_name for s in storage.get_all_studies()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        probe = optuna.create_study(storage=storage, study_name=name, directions=["minimize", "minimize"],
                                    load_if_exists=True)
        sampler = optuna.samplers.TPESampler(seed=seed + len(probe.trials), n_startup_trials=startup_trials,
                                             multivariate=True)
        study = optuna.load_study(storage=storage, study_name=name, sampler=sampler)
    if name in existing:
        stored = {k: v for k, v in study.user_attrs.items() if k in fingerprint}
        changed = sorted(k for k in fingerprint if stored.get(k) != fingerprint[k])
        if changed:
            raise AbliterateError(
                f"study {name!r} in {path} was run with other {', '.join(changed)}; its trials are not comparable: "
                "pass another --study (or --study-name) to start a new one"
            )
    else:
        for k, v in fingerprint.items():
            study.set_user_attr(k, v)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # one search per study at a time
    return study


def _trial_result(frozen) -> TrialResult:
    return TrialResult(frozen.number, Point.from_params(frozen.params), frozen.values[0], frozen.values[1],
                       frozen.user_attrs.get("refusals"), float(frozen.user_attrs.get("seconds", 0.0)),
                       frozen.user_attrs.get("overrefusals"))


def search(lm: LoadedModel, cands: CandidateSet, harmful: Sequence[str], harmless: Sequence[str],
           settings: SearchSettings, study_path: Path, study_name: str = "abliterate-search",
           quiet: bool = False, borderline: Sequence[str] = ()) -> SearchResult:
    """Run the study up to settings.trials completed trials (resuming it) or until settings.time_budget is
    spent, then return its front. `borderline` prompts get an over-refusal count for points on the front."""
    TrialState = _optuna().trial.TrialState

    if settings.max_strength < 1.0:
        raise AbliterateError("--max-strength must be at least 1 (full removal must be reachable)")
    notes = [] if cands.harmless_mean is not None else [
        "the direction file has no harmless_mean, so the projected variant was not searched (re-extract to add it)"]
    if settings.norm_preserve:
        from abliterate.measure.preserving_hooks import why_not_preserving

        why = why_not_preserving(lm.model, lm.arch)
        if why is not None:
            settings = replace(settings, norm_preserve=False)
            notes.append(f"norm-preserving edits were not searched: {why.split(';')[0]}")
    scorer = Scorer(lm, harmful, harmless, settings, borderline)
    study = open_study(study_path, study_name, _fingerprint(lm, cands, scorer, settings), settings.seed,
                       settings.startup_trials)
    done = [_trial_result(t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not study.trials and settings.start_from_selected:
        if cands.max_directions > 1:  # the choice alone, then with every direction of the file
            study.enqueue_trial({**selected_point(cands).params(), "directions": 1})
            study.enqueue_trial(replace(selected_point(cands), directions=cands.max_directions).params())
        else:
            study.enqueue_trial(selected_point(cands).params())
        for point in seed_points(cands, lm.num_layers, settings.norm_preserve) if settings.seed_points else ():
            study.enqueue_trial(point.params())
    values = [(t.refusal_score, t.kl) for t in done]
    todo = max(0, settings.trials - len(done))
    n = len(scorer.harmful)
    start = time.perf_counter()
    ran = 0
    with tqdm(total=todo, desc="search", unit="trial", disable=quiet, file=sys.stderr) as bar:
        for _ in range(todo):
            if settings.time_budget is not None and time.perf_counter() - start >= settings.time_budget:
                notes.append(f"--time-budget {settings.time_budget:g} s spent after {ran} of {todo} trials")
                break
            t0 = time.perf_counter()
            trial = study.ask()
            try:
                point = suggest(trial, cands, settings, lm.num_layers)
                try:
                    r, options = direction_for(cands, point), point.options(lm.num_layers)
                except RankDeficientError:  # a projected span that lost a direction: no such edit to score
                    study.tell(trial, state=TrialState.FAIL)
                    continue
                score, kl = scorer.first_token(r, options)
                if not (math.isfinite(score) and math.isfinite(kl)):
                    study.tell(trial, state=TrialState.FAIL)
                    continue
                refusals = overrefusals = None
                if not dominated((score, kl), values):
                    refusals = int(score) if scorer.refusal_count is not None else scorer.refusals(r, options)
                    trial.set_user_attr("refusals", refusals)
                    overrefusals = scorer.overrefusals(r, options)
                    if overrefusals is not None:
                        trial.set_user_attr("overrefusals", overrefusals)
                seconds = time.perf_counter() - t0
                trial.set_user_attr("seconds", seconds)
                study.tell(trial, [score, kl])
            except BaseException:
                study.tell(trial, state=TrialState.FAIL)
                raise
            values.append((score, kl))
            ran += 1
            done.append(TrialResult(trial.number, point, score, kl, refusals, seconds, overrefusals))
            counted = f", {refusals}/{n} refused" if refusals is not None else ""
            if overrefusals is not None:
                counted += f", {overrefusals}/{len(scorer.borderline)} borderline refused"
            if not quiet:
                bar.write(f"trial {trial.number}: refusal score {score:+.2f}, KL {kl:.4f}{counted} ({seconds:.2f} s)",
                          file=sys.stderr)
            bar.set_postfix_str(f"best {best_text(done, n)}; {seconds:.2f} s/trial")
            bar.update()
    return SearchResult(done, pareto_front(done), n, ran, time.perf_counter() - start, study_path, study_name,
                        notes, len(scorer.borderline))
