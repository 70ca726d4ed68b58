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
import json
import math
import os
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from abliterate import __version__
from abliterate.edit.plan import EditOptions
from abliterate.edit.strengths import LAYERED, Profile, layer_scales, uniform
from abliterate.errors import AbliterateError, first_line
from abliterate.io.direction_file import save_direction
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

STUDY_SUFFIX = ".study.db"
DIRECTION_SUFFIX = ".direction.safetensors"


@dataclass(frozen=True)
class CandidateSet:
    """The extraction's candidates, and which of them the search may pick."""

    candidates: torch.Tensor  # [num_layers + 1, positions, d] differences of means
    harmless_mean: torch.Tensor | None  # same shape, for the projected variant (None in older files)
    min_layer: int  # lowest residual-stream index searched (below it some candidate is zero: e.g. the embeddings
    # of a chat template's fixed suffix tokens, identical for both sets)
    max_layer: int  # highest residual-stream index searched (extraction's pruning)
    selected: tuple[int, int]  # (layer, position) extraction chose
    metadata: dict[str, str]
    digest: str  # identifies the candidates, so a resumed study is known to be about the same ones

    @property
    def positions(self) -> int:
        return self.candidates.shape[1]


@dataclass(frozen=True)
class Point:
    """One edit: a direction and a strength per writer."""

    layer: float  # residual index; the fraction blends with the next layer's candidate
    position: int  # negative index among the post-instruction positions
    projected: bool
    embed: float
    profiles: dict[str, Profile]

    def options(self, num_layers: int) -> EditOptions:
        return EditOptions(layer_scales=layer_scales(self.profiles, self.embed, num_layers))

    def params(self) -> dict[str, object]:
        out: dict[str, object] = {"direction_layer": self.layer, "direction_position": self.position,
                                  "projected": self.projected, "embed_strength": self.embed}
        for c, p in self.profiles.items():
            out.update({f"{c}_peak": p.peak, f"{c}_center": p.center, f"{c}_width": p.width, f"{c}_floor": p.floor})
        return out

    @classmethod
    def from_params(cls, params: dict) -> Point:
        profiles = {c: Profile(params[f"{c}_peak"], params[f"{c}_center"], params[f"{c}_width"], params[f"{c}_floor"])
                    for c in LAYERED}
        return cls(float(params["direction_layer"]), int(params["direction_position"]),
                   bool(params.get("projected", False)), float(params["embed_strength"]), profiles)

    def describe(self) -> str:
        layer = f"{self.layer:.2f}".rstrip("0").rstrip(".")
        parts = [f"dir L{layer} p{self.position}{' proj' if self.projected else ''}", f"embed {self.embed:.2f}"]
        parts += [f"{c} {p.peak:.2f}@{p.center:.1f} w{p.width:.1f} f{p.floor:.2f}" for c, p in self.profiles.items()]
        return ", ".join(parts)


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

    def template_kwargs(self) -> dict:
        return {} if self.thinking else {"enable_thinking": False}


@dataclass(frozen=True)
class TrialResult:
    number: int
    point: Point
    refusal_score: float  # mean first-token refusal log-odds on harmful validation prompts
    kl: float  # mean first-token KL on harmless validation prompts
    refusals: int | None  # greedy replies matching a refusal marker (None: not counted, was off the front)
    seconds: float


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


def load_candidates(path: str | Path, lm: LoadedModel) -> CandidateSet:
    """The candidates that `abliterate extract` saved beside the direction, checked against the model."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise AbliterateError(f"direction file {path} does not exist; make one with `abliterate extract`")
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            metadata = dict(f.metadata() or {})
            if "candidates" not in names:
                raise AbliterateError(f"{path} has no 'candidates' tensor; search needs the file written by "
                                      "`abliterate extract` (re-run it)")
            candidates = f.get_tensor("candidates").float()
            harmless = f.get_tensor("harmless_mean").float() if "harmless_mean" in names else None
    except (OSError, ValueError) as e:  # safetensors raises SafetensorError (a ValueError subclass) on bad files
        raise AbliterateError(f"cannot read {path}: {e}") from None
    want = (lm.num_layers + 1, lm.hidden_size)
    if candidates.ndim != 3 or (candidates.shape[0], candidates.shape[2]) != want:
        raise AbliterateError(f"{path}: candidates have shape {list(candidates.shape)} but this model needs "
                              f"[{want[0]}, positions, {want[1]}]; use a direction extracted from this model")
    if harmless is not None and harmless.shape != candidates.shape:
        harmless = None
    scores = json.loads(metadata.get("candidate_scores", "[]"))
    max_layer = max((s["layer"] for s in scores), default=int(lm.num_layers * 0.8) - 1)
    k = candidates.shape[1]
    selected = (int(metadata.get("layer", max_layer)), int(metadata.get("position", -1)))
    if not (0 <= selected[0] <= lm.num_layers and -k <= selected[1] < 0):
        raise AbliterateError(f"{path}: metadata names candidate {selected}, outside the saved candidates")
    max_layer = max(max_layer, selected[0])
    usable = [bool(torch.isfinite(candidates[i]).all() and (candidates[i].norm(dim=-1) > 0).all())
              for i in range(max_layer + 1)]
    if harmless is not None:
        usable = [u and bool((harmless[i].norm(dim=-1) > 0).all()) for i, u in enumerate(usable)]
    min_layer = max_layer + 1
    while min_layer > 0 and usable[min_layer - 1]:
        min_layer -= 1
    if min_layer > selected[0]:
        raise AbliterateError(f"{path}: the candidates at layers up to {selected[0]} include zero or non-finite "
                              "vectors; re-run `abliterate extract`")
    digest = hashlib.sha256(candidates.numpy().tobytes()).hexdigest()[:16]
    return CandidateSet(candidates, harmless, min_layer, max_layer, selected, metadata, digest)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def direction_for(cands: CandidateSet, point: Point) -> torch.Tensor:
    """The unit direction [d] a point removes: blended between neighbouring layers, optionally projected."""
    j = point.position + cands.positions
    lo = min(math.floor(point.layer), cands.candidates.shape[0] - 1)
    frac = point.layer - lo
    hi = min(lo + 1, cands.candidates.shape[0] - 1)

    def blend(t: torch.Tensor) -> torch.Tensor:
        return _unit((1 - frac) * _unit(t[lo, j]) + frac * _unit(t[hi, j])) if frac > 0 else _unit(t[lo, j])

    r = blend(cands.candidates)
    if point.projected:
        if cands.harmless_mean is None:
            raise AbliterateError("the projected variant needs the harmless mean; re-run `abliterate extract`")
        h = blend(cands.harmless_mean)
        r = _unit(r - (r @ h) * h)
    return r


def selected_point(cands: CandidateSet) -> Point:
    """The extraction's own choice, removed fully from every writer: what `apply` does by default."""
    return Point(float(cands.selected[0]), cands.selected[1], False, 1.0, {c: uniform(1.0) for c in LAYERED})


def suggest(trial, cands: CandidateSet, settings: SearchSettings, num_layers: int) -> Point:
    top = settings.max_strength
    layer = trial.suggest_float("direction_layer", float(cands.min_layer), float(cands.max_layer))
    position = trial.suggest_int("direction_position", -cands.positions, -1)
    projected = trial.suggest_categorical("projected", [False, True]) if cands.harmless_mean is not None else False
    embed = trial.suggest_float("embed_strength", 0.0, top)
    profiles = {c: Profile(trial.suggest_float(f"{c}_peak", 0.0, top),
                           trial.suggest_float(f"{c}_center", 0.0, float(num_layers - 1)),
                           trial.suggest_float(f"{c}_width", 0.5, float(num_layers)),
                           trial.suggest_float(f"{c}_floor", 0.0, 1.0)) for c in LAYERED}
    return Point(layer, position, projected, embed, profiles)


class Scorer:
    """Scores points with hooks on one loaded model; the unedited first-token distribution is computed once."""

    def __init__(self, lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], settings: SearchSettings):
        if not harmful or not harmless:
            raise AbliterateError("search needs harmful and harmless validation prompts (got an empty set)")
        self.lm, self.settings, self.harmful = lm, settings, list(harmful)
        fmt = lambda texts: [render(lm.tokenizer, t, settings.template, **settings.template_kwargs())  # noqa: E731
                             for t in texts]
        self.harmful_prompts, self.harmless_prompts = fmt(harmful), fmt(harmless)
        self.refusal_ids = refusal_token_ids(lm.tokenizer, settings.refusal_prefixes)
        self.base = first_token_logprobs(lm, self.harmless_prompts, settings.batch_size)

    def _ablated(self, r: torch.Tensor, options: EditOptions):
        return ablate(self.lm.model, self.lm.arch, r, strength=options.strength, num_layers=self.lm.num_layers)

    def first_token(self, r: torch.Tensor, options: EditOptions) -> tuple[float, float]:
        """(mean refusal log-odds on harmful prompts, mean KL on harmless prompts) with the edit applied."""
        bs = self.settings.batch_size
        with self._ablated(r, options):
            score = refusal_score(first_token_logprobs(self.lm, self.harmful_prompts, bs), self.refusal_ids)
            kl = kl_divergence(self.base, first_token_logprobs(self.lm, self.harmless_prompts, bs))
        return score.mean().item(), kl.mean().item()

    def refusals(self, r: torch.Tensor, options: EditOptions) -> int:
        """Greedy short replies to the harmful prompts that match a refusal marker."""
        from abliterate.evaluate.evaluation import EvalSettings, generate
        from abliterate.evaluate.markers import find_refusal

        s = self.settings
        with self._ablated(r, options):
            replies = generate(self.lm, self.harmful, EvalSettings(batch_size=s.batch_size, template=s.template,
                                                                   thinking=s.thinking), s.max_new_tokens, quiet=True)
        return sum(find_refusal(text) is not None for text, _ in replies)


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
    prompts = hashlib.sha256("\0".join([*scorer.harmful_prompts, "\1", *scorer.harmless_prompts]).encode())
    return {"candidates": cands.digest, "prompts": prompts.hexdigest()[:16],
            "layers": str(lm.num_layers), "min_layer": str(cands.min_layer), "max_layer": str(cands.max_layer),
            "positions": str(cands.positions),
            "projected": str(cands.harmless_mean is not None), "max_strength": str(settings.max_strength),
            "max_new_tokens": str(settings.max_new_tokens)}


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


def _dominated(values: tuple[float, float], others: list[tuple[float, float]]) -> bool:
    return any(o[0] <= values[0] and o[1] <= values[1] and o != values for o in others)


def _best_text(trials: list[TrialResult], n: int) -> str:
    counted = [t for t in trials if t.refusals is not None]
    if not counted:
        return "-"
    best = min(counted, key=lambda t: (t.refusals, t.kl))
    return f"#{best.number} {best.refusals}/{n} refused, KL {best.kl:.4f}"


def _trial_result(frozen) -> TrialResult:
    return TrialResult(frozen.number, Point.from_params(frozen.params), frozen.values[0], frozen.values[1],
                       frozen.user_attrs.get("refusals"), float(frozen.user_attrs.get("seconds", 0.0)))


def search(lm: LoadedModel, cands: CandidateSet, harmful: Sequence[str], harmless: Sequence[str],
           settings: SearchSettings, study_path: Path, study_name: str = "abliterate-search",
           quiet: bool = False) -> SearchResult:
    """Run the study up to settings.trials completed trials (resuming it), then return its front."""
    TrialState = _optuna().trial.TrialState

    if settings.max_strength < 1.0:
        raise AbliterateError("--max-strength must be at least 1 (full removal must be reachable)")
    scorer = Scorer(lm, harmful, harmless, settings)
    study = open_study(study_path, study_name, _fingerprint(lm, cands, scorer, settings), settings.seed,
                       settings.startup_trials)
    done = [_trial_result(t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not study.trials and settings.start_from_selected:
        study.enqueue_trial(selected_point(cands).params())
    values = [(t.refusal_score, t.kl) for t in done]
    todo = max(0, settings.trials - len(done))
    n = len(scorer.harmful)
    start = time.perf_counter()
    notes = [] if cands.harmless_mean is not None else [
        "the direction file has no harmless_mean, so the projected variant was not searched (re-extract to add it)"]
    with tqdm(total=todo, desc="search", unit="trial", disable=quiet, file=sys.stderr) as bar:
        for _ in range(todo):
            t0 = time.perf_counter()
            trial = study.ask()
            try:
                point = suggest(trial, cands, settings, lm.num_layers)
                r, options = direction_for(cands, point), point.options(lm.num_layers)
                score, kl = scorer.first_token(r, options)
                if not (math.isfinite(score) and math.isfinite(kl)):
                    study.tell(trial, state=TrialState.FAIL)
                    continue
                refusals = None
                if not _dominated((score, kl), values):
                    refusals = scorer.refusals(r, options)
                    trial.set_user_attr("refusals", refusals)
                seconds = time.perf_counter() - t0
                trial.set_user_attr("seconds", seconds)
                study.tell(trial, [score, kl])
            except BaseException:
                study.tell(trial, state=TrialState.FAIL)
                raise
            values.append((score, kl))
            done.append(TrialResult(trial.number, point, score, kl, refusals, seconds))
            counted = f", {refusals}/{n} refused" if refusals is not None else ""
            if not quiet:
                bar.write(f"trial {trial.number}: refusal score {score:+.2f}, KL {kl:.4f}{counted} ({seconds:.2f} s)",
                          file=sys.stderr)
            bar.set_postfix_str(f"best {_best_text(done, n)}; {seconds:.2f} s/trial")
            bar.update()
    return SearchResult(done, pareto_front(done), n, todo, time.perf_counter() - start, study_path, study_name,
                        notes)


def pareto_front(trials: list[TrialResult]) -> list[TrialResult]:
    """Counted trials not beaten on both refusals and KL, fewest refusals first."""
    counted = [t for t in trials if t.refusals is not None]
    front = [t for t in counted if not any(
        o.refusals <= t.refusals and o.kl <= t.kl and (o.refusals, o.kl) != (t.refusals, t.kl) for o in counted)]
    unique = {(t.refusals, t.kl): t for t in sorted(front, key=lambda t: -t.number)}  # equal points: first trial
    return sorted(unique.values(), key=lambda t: (t.refusals, t.kl))


def pick(front: list[TrialResult], prompts: int, *, max_kl: float | None = None,
         max_refusals: float | None = None) -> TrialResult:
    """Fewest refusals within --max-kl; lowest KL within --max-refusals (a fraction of the prompts)."""
    if not front:
        raise AbliterateError("the study has no completed trial yet; run more --trials")
    fits = [t for t in front if (max_kl is None or t.kl <= max_kl)
            and (max_refusals is None or t.refusals <= max_refusals * prompts + 1e-9)]
    if not fits:
        lowest_kl, fewest = min(t.kl for t in front), min(t.refusals for t in front)
        raise AbliterateError(
            f"no trial on the front meets the limits (lowest KL {lowest_kl:.4f}, fewest refusals {fewest}/{prompts}); "
            "relax --max-kl / --max-refusals or run more --trials"
        )
    if max_refusals is not None and max_kl is None:
        return min(fits, key=lambda t: (t.kl, t.refusals))
    return min(fits, key=lambda t: (t.refusals, t.kl))


def table(front: list[TrialResult], prompts: int, chosen: TrialResult | None = None) -> str:
    lines = [f"{'trial':>5} {'refused':>9} {'KL':>8} {'score':>7}  edit"]
    for t in front:
        mark = "  <- chosen" if chosen is not None and t.number == chosen.number else ""
        lines.append(f"{t.number:>5} {f'{t.refusals}/{prompts}':>9} {t.kl:>8.4f} {t.refusal_score:>+7.2f}  "
                     f"{t.point.describe()}{mark}")
    return "\n".join(lines)


def save_choice(choice: TrialResult, cands: CandidateSet, lm: LoadedModel, out: Path, *, prompts: int,
                study: Path, study_name: str) -> tuple[Path, Path]:
    """Write OUT (a recipe naming the direction and per-layer scales) and its direction file beside it."""
    out = Path(out)
    direction_path = out.with_name(out.stem + DIRECTION_SUFFIX)
    r = direction_for(cands, choice.point)
    command = shlex.join(["abliterate", *sys.argv[1:]])
    save_direction(direction_path, r, {
        "model": lm.name, "layer": math.floor(choice.point.layer), "position": choice.point.position,
        "hidden_size": lm.hidden_size, "num_layers": lm.num_layers, "command": command,
        "tool": f"abliterate {__version__}", "search_params": json.dumps(choice.point.params()),
        "search_trial": choice.number, "refusals": f"{choice.refusals}/{prompts}", "kl": f"{choice.kl:.5f}"})
    options = choice.point.options(lm.num_layers)
    recipe = {
        "name": "search",
        "notes": (f"abliterate search, trial {choice.number} of study {study_name!r} ({study.name}): "
                  f"{choice.refusals}/{prompts} validation prompts refused, first-token KL {choice.kl:.4f}; "
                  f"{choice.point.describe()}"),
        "apply": {"direction": direction_path.name, "scale": 1.0, "layers": None,
                  "components": ["embed", "attn", "mlp"], "targets": [], "keep_tied": False,
                  "layer_scales": {c: list(v) for c, v in options.layer_scales.items()}},
    }
    header = (f"# written by: {command}\n# model: {lm.name}\n"
              f"# apply it: abliterate apply MODEL --recipe {out.name} --out DIR\n")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(header + yaml.safe_dump(recipe, sort_keys=False))
    tmp.replace(out)
    return out, direction_path
