"""`abliterate MODEL --search N`: extraction and the search on one loaded model, inside the whole job.

The model is loaded once: extraction (unless --direction gives the candidates) and every trial of the
search run on it; the chosen point becomes the recipe's apply section (its direction and per-layer
scales), which the job then writes as weights or an adapter exactly as `apply --recipe` would. What the
card shows of the search (the front, the chosen point) is returned as plain data.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from abliterate.options.recipe import Recipe, overlay, read_yaml
from abliterate.publish.card import FrontRow, SearchSummary
from abliterate.publish.front_plot import TrialPoint

RECIPE_NAME = "abliterate-recipe.yaml"  # the searched recipe, written beside the weights
# `abliterate MODEL` without --search, --one-shot, --direction or --stream: a short search, so that the default
# lands on the front (the paper's one-shot choice can cost several times the KL of a searched point with as few
# refusals: benchmarks/real_model.py); its trials, the minutes after which no trial starts, and the choice
DEFAULT_TRIALS = 32
DEFAULT_TIME_BUDGET = 600.0
DEFAULT_MAX_REFUSALS = 0.05  # the lowest KL with at most this fraction of validation prompts refused


def searches(options) -> bool:
    """Whether the job searches: --search N, or by default unless --one-shot, --direction, --stream, --directions
    (without --search: the span of K directions, as extracted) or a --recipe saying how to apply."""
    if options.search is not None:
        return True
    return not (options.one_shot or options.direction or options.stream or options.directions is not None
                or _recipe_applies(options.recipe))


def _recipe_applies(path) -> bool:
    """Whether a --recipe file has an apply section (its edit is then applied as written, not searched)."""
    if path is None or not Path(path).is_file():
        return False
    data = read_yaml(Path(path))
    return isinstance(data, dict) and bool(data.get("apply"))


def by_default(options):
    """The options of the default short search (limits the user gave are kept)."""
    limits = options.max_kl is not None or options.max_refusals is not None
    return replace(options, search=DEFAULT_TRIALS,
                   time_budget=DEFAULT_TIME_BUDGET if options.time_budget is None else options.time_budget,
                   max_refusals=options.max_refusals if limits else DEFAULT_MAX_REFUSALS)


@dataclass(frozen=True)
class SearchOutcome:
    recipe: Recipe  # the job's recipe with the chosen point as its apply section
    recipe_file: Path  # the recipe `search` wrote (apply.direction names the file beside it)
    direction: Path
    card: SearchSummary  # what the card shows: trials, front rows, the chosen trial, the limits
    offered: int = 1  # K: the directions the search could remove (k = 1..K; the chosen k is the direction's rank)


def search_step(options, recipe: Recipe, lm, prompts: tuple[list[str], ...], work: Path, study: Path,
                say) -> SearchOutcome:
    """Extract (unless options.direction), search options.search trials in `study` (resumed when it holds
    some), pick, save the choice in `work`. lm: the job's loaded model; prompts: harmful/harmless train,
    harmful/harmless validation."""
    from abliterate.measure.templates import load_template
    from abliterate.search.borderline import borderline_prompts
    from abliterate.search.study import load_candidates, save_choice, search, table

    s = recipe.extract
    harmful_val, harmless_val = prompts[2:]
    candidates = options.direction or (Path(recipe.apply.direction) if recipe.apply.direction else None)
    if candidates is None:
        from abliterate.jobs.extraction import extract_with

        candidates = work / "direction.safetensors"
        extract_with(lm, options, recipe, prompts, candidates, say)
    cands = load_candidates(candidates, lm)
    template = load_template(options.template)
    settings = search_settings(options, s.batch_size, template)
    if options.adapter:
        say("note: --adapter: the search leaves norm-preserving edits out (it edits the embeddings, whose "
            "norm-preserving rescaling no adapter carries)")
    borderline = borderline_prompts("builtin:overrefusal", s.n_val, eval_limit=recipe.evaluate.limit or 10**9)
    if study.is_file():
        say(f"resuming the search in {study}")
    result = search(lm, cands, harmful_val, harmless_val, settings, study, quiet=options.quiet, borderline=borderline)
    for note in result.notes:
        say(f"note: {note}")
    choice, why = choose_point(result, options)
    say(table(result.front, result.prompts, choice, result.borderline))
    say(why)
    recipe_file, direction = save_choice(choice, cands, lm, work / "search.yaml", prompts=result.prompts,
                                         study=study, study_name="abliterate-search",
                                         borderline=result.borderline, model_name=options.model)
    searched = overlay(recipe, {"apply": read_yaml(recipe_file)["apply"]}, str(recipe_file))
    searched = replace(searched, apply=replace(searched.apply, direction=str(direction)))
    front = tuple(FrontRow(t.number, f"{t.refusals}/{result.prompts}",
                           None if t.overrefusals is None else f"{t.overrefusals}/{result.borderline}",
                           round(t.kl, 5), t.point.describe()) for t in result.front)
    seen = tuple(TrialPoint(t.number, t.refusals, t.refusal_score, t.kl) for t in result.trials)  # the picture's
    card = SearchSummary(len(result.trials), round(result.seconds, 1), choice.number, front, options.max_kl,
                         options.max_refusals, RECIPE_NAME, seen, result.prompts)
    return SearchOutcome(searched, recipe_file, direction, card, cands.max_directions)


def choose_point(result, options):
    """The chosen trial and one line saying what it traded against the paper's point (the study's first trial).
    Within the limits; when only --max-refusals was given and no point meets it, the fewest refusals instead."""
    from abliterate.errors import AbliterateError
    from abliterate.search.study import pick

    n, note = result.prompts, ""
    try:
        choice = pick(result.front, n, max_kl=options.max_kl, max_refusals=options.max_refusals)
    except AbliterateError:
        if options.max_kl is not None or options.max_refusals is None:
            raise
        choice = pick(result.front, n)
        note = f" (no point reached {options.max_refusals:.0%} refused: the fewest refusals instead)"
    rule = ("fewest refusals" if options.max_refusals is None or options.max_kl is not None
            else f"lowest KL with at most {options.max_refusals:.0%} refused")
    line = f"chose trial {choice.number}: {choice.refusals}/{n} validation prompts refused at KL {choice.kl:.4f}, " \
           f"the {rule}{note}"
    first = next((t for t in result.trials if t.number == 0 and t.refusals is not None), None)
    if first is not None and first.number != choice.number:
        line += (f"; the paper's one-shot point (trial 0, `--one-shot`): {first.refusals}/{n} at KL {first.kl:.4f}")
    return choice, line


def search_settings(options, batch_size: int | str, template: str | None):
    """The job's search settings: without norm-preserving points when the output is an adapter (every point edits the
    embeddings, and `lora.preserve` refuses their norm-preserving rescaling), so the chosen point can be written."""
    from abliterate.search.study import SearchSettings

    return SearchSettings(trials=options.search, time_budget=options.time_budget, batch_size=batch_size,
                          template=template, norm_preserve=not options.adapter)


def write_recipe_copy(outcome: SearchOutcome, folder: Path, direction_name: str) -> None:
    """The searched recipe beside the weights, naming the direction file there, so the folder (or the
    repo it is pushed to) holds everything `abliterate apply MODEL --recipe` needs to rebuild the edit."""
    import yaml

    data = yaml.safe_load(outcome.recipe_file.read_text())
    data["apply"]["direction"] = direction_name
    if outcome.offered > 1:  # the extraction the choice came from: its rank-K file offered k = 1..K
        data["extract"] = {"directions": outcome.offered}
    header = (f"# the edit `abliterate MODEL --search` chose; rebuild it with:\n"
              f"#   abliterate apply MODEL --recipe {RECIPE_NAME} --out DIR\n")
    (folder / RECIPE_NAME).write_text(header + yaml.safe_dump(data, sort_keys=False))
