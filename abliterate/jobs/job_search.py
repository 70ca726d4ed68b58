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
    from abliterate.search.study import load_candidates, pick, save_choice, search, table

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
    choice = pick(result.front, result.prompts, max_kl=options.max_kl, max_refusals=options.max_refusals)
    say(table(result.front, result.prompts, choice, result.borderline))
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
