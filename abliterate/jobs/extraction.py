"""The whole job's extraction stage on an already loaded model (shared by the whole job and `--search`)."""

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


def job_prompts(options: RunOptions, recipe) -> tuple[list[str], list[str], list[str], list[str]]:
    """The whole job's (harmful train, harmless train, harmful val, harmless val) prompts, as the recipe and the
    command line set them: shared by plain extraction and `--search`."""
    from abliterate.measure.extract import split_prompts

    s = recipe.extract
    harmful, harmless = options.harmful or s.harmful, options.harmless or s.harmless
    harmful_train, harmful_val = split_prompts(harmful, n_train=s.n_train, n_val=s.n_val, field=options.field,
                                               kind="harmful")
    harmless_train, harmless_val = split_prompts(harmless, n_train=s.n_train, n_val=s.n_val, field=options.field,
                                                 kind="harmless")
    return harmful_train, harmless_train, harmful_val, harmless_val


def load_job_model(options: RunOptions, recipe, source: Path):
    """The job's one loaded model: extraction, search and evaluation all run on it."""
    from abliterate.measure.loading import load_model

    return load_model(source, dtype=options.dtype or recipe.extract.dtype, device=options.device,
                      trust_remote_code=options.trust_remote_code)


def extract_with(lm, options: RunOptions, recipe, prompts: tuple[list[str], ...], path: Path, say) -> None:
    """Extraction on an already loaded model (prompts: harmful/harmless train, harmful/harmless validation)."""
    from abliterate.measure.extract import PromptSets, extract, harmful_categories, save_extraction
    from abliterate.measure.templates import load_template
    from abliterate.search.finalists import by_generation, finalist_measure

    s = recipe.extract
    settings = s.selection()
    pending = kept_path(options, "candidates")  # beside the output: it must outlive a failed job
    template = load_template(options.template)
    measure = finalist_measure(lm, prompts[2], prompts[3], settings, template=template,
                               quiet=options.quiet) if by_generation(settings) else None
    categories = harmful_categories(options.harmful or s.harmful, prompts[0], options.field) if (
        s.proposals == "categories" and s.directions > 1) else None
    result = extract(lm, PromptSets(*prompts), positions=s.positions, template=template, settings=settings,
                     template_kwargs={"enable_thinking": False}, quiet=options.quiet, pending=pending,
                     metadata={"model": options.model}, measure_finalists=measure, directions=s.directions,
                     categories=categories)
    save_extraction(result, path)
    pending.unlink(missing_ok=True)
    if result.relaxed:
        say(f"note: {result.relaxed}")
    what = "principal directions" if result.more_categories is None else \
        f"categories' directions ({', '.join(result.more_categories)})"
    more = "" if result.more is None else f"; with {len(result.more)} {what} beside it (rank {len(result.more) + 1})"
    say(f"direction: layer {result.best.layer}, post-instruction position {result.best.position} "
        f"(refusal log-odds {result.baseline_refusal:.2f} -> {result.best.refusal_ablated:.2f} when ablated){more}")
