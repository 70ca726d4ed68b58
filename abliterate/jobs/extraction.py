"""The extraction stage on an already loaded model: one orchestration that `abliterate extract`, the whole job and
`--search` all call (the train/validation split, the categories, the finalists' measures, `measure.extract`)."""

from __future__ import annotations

from pathlib import Path

from abliterate.jobs.run_options import RunOptions, kept_path


def with_command_line(options: RunOptions, recipe):
    """The recipe with the extract settings given on the whole job's command line laid over it (a field left
    None keeps the recipe's): what the job extracts with, and what it records."""
    from dataclasses import replace

    from abliterate.options.declared import recipe_overrides

    given = {k: v for k, v in recipe_overrides(options, "extract").items() if v is not None}
    return replace(recipe, extract=replace(recipe.extract, **given))


def split_sets(harmful: str, harmless: str, *, n_train: int, n_val: int, field: str | None):
    """Both prompt sets split into training and validation prompts (`measure.extract.PromptSets`): one split for
    `abliterate extract`, the whole job and `--search`."""
    from abliterate.measure.extract import PromptSets, split_prompts

    harmful_train, harmful_val = split_prompts(harmful, n_train=n_train, n_val=n_val, field=field, kind="harmful")
    harmless_train, harmless_val = split_prompts(harmless, n_train=n_train, n_val=n_val, field=field,
                                                 kind="harmless")
    return PromptSets(harmful_train, harmless_train, harmful_val, harmless_val)


def proposal_categories(harmful: str, sets, field: str | None, proposals: str, directions: int):
    """The harmful training prompts' categories when the directions beside the chosen one come from them
    (`--proposals categories`), checked against their number before any model loads; else None."""
    from abliterate.measure.directions import check_categories
    from abliterate.measure.extract import harmful_categories

    if proposals != "categories" or directions < 2:
        return None
    categories = harmful_categories(harmful, sets.harmful_train, field)
    check_categories(categories, directions - 1)
    return categories


def extraction(lm, sets, settings, *, template: str | None, thinking: bool, positions: int, directions: int,
               categories, quiet: bool, pending: Path, metadata: dict[str, str]):
    """The extraction stage on a loaded model, as `abliterate extract` and the whole job run it: the finalists'
    generation measures when the selection asks for them, then `measure.extract.extract`."""
    from abliterate.measure.extract import extract
    from abliterate.search.finalists import by_generation, finalist_measure

    measure = finalist_measure(lm, sets.harmful_val, sets.harmless_val, settings, template=template,
                               thinking=thinking, quiet=quiet) if by_generation(settings) else None
    return extract(lm, sets, positions=positions, template=template, settings=settings,
                   template_kwargs={} if thinking else {"enable_thinking": False}, quiet=quiet, pending=pending,
                   metadata=metadata, measure_finalists=measure, directions=directions, categories=categories)


def job_prompts(options: RunOptions, recipe) -> tuple[list[str], list[str], list[str], list[str]]:
    """The whole job's (harmful train, harmless train, harmful val, harmless val) prompts, as the recipe and the
    command line set them: shared by plain extraction and `--search`."""
    settings = recipe.extract
    sets = split_sets(options.harmful or settings.harmful, options.harmless or settings.harmless,
                      n_train=settings.n_train, n_val=settings.n_val, field=options.field)
    return sets.harmful_train, sets.harmless_train, sets.harmful_val, sets.harmless_val


def load_job_model(options: RunOptions, recipe, source: Path):
    """The job's one loaded model: extraction, search and evaluation all run on it."""
    from abliterate.measure.loading import load_model

    return load_model(source, dtype=options.dtype or recipe.extract.dtype, device=options.device,
                      trust_remote_code=options.trust_remote_code)


def extract_with(lm, options: RunOptions, recipe, prompts: tuple[list[str], ...], path: Path, say) -> None:
    """Extraction on an already loaded model (prompts: harmful/harmless train, harmful/harmless validation)."""
    from abliterate.measure.extract import PromptSets, save_extraction
    from abliterate.measure.templates import load_template

    settings = recipe.extract
    pending = kept_path(options, "candidates")  # beside the output: it must outlive a failed job
    sets = PromptSets(*prompts)
    categories = proposal_categories(options.harmful or settings.harmful, sets, options.field, settings.proposals,
                                     settings.directions)
    result = extraction(lm, sets, settings.selection(), template=load_template(options.template), thinking=False,
                        positions=settings.positions, directions=settings.directions, categories=categories,
                        quiet=options.quiet, pending=pending, metadata={"model": options.model})
    save_extraction(result, path)
    pending.unlink(missing_ok=True)
    if result.relaxed:
        say(f"note: {result.relaxed}")
    what = "principal directions" if result.more_categories is None else \
        f"categories' directions ({', '.join(result.more_categories)})"
    more = "" if result.more is None else f"; with {len(result.more)} {what} beside it (rank {len(result.more) + 1})"
    say(f"direction: layer {result.best.layer}, post-instruction position {result.best.position} "
        f"(refusal log-odds {result.baseline_refusal:.2f} -> {result.best.refusal_ablated:.2f} when ablated){more}")
