"""The whole job's extraction stage on an already loaded model (shared by the whole job and `--search`)."""

from __future__ import annotations

from pathlib import Path

from abliterate.jobs.run_options import RunOptions, kept_path


def extract_with(lm, options: RunOptions, recipe, prompts: tuple[list[str], ...], path: Path, say) -> None:
    """Extraction on an already loaded model (prompts: harmful/harmless train, harmful/harmless validation)."""
    from abliterate.measure.extract import PromptSets, extract, save_extraction
    from abliterate.measure.selection import SelectionSettings
    from abliterate.measure.templates import load_template

    s = recipe.extract
    settings = SelectionSettings(s.prune_layers, s.kl_threshold, s.induce_threshold, s.batch_size, s.screen_prompts,
                                 s.finalists)
    pending = kept_path(options, "candidates")  # beside the output: it must outlive a failed job
    result = extract(lm, PromptSets(*prompts), positions=s.positions, template=load_template(options.template),
                     settings=settings, template_kwargs={"enable_thinking": False}, quiet=options.quiet,
                     pending=pending, metadata={"model": options.model})
    save_extraction(result, path)
    pending.unlink(missing_ok=True)
    if result.relaxed:
        say(f"note: {result.relaxed}")
    say(f"direction: layer {result.best.layer}, post-instruction position {result.best.position} "
        f"(refusal log-odds {result.baseline_refusal:.2f} -> {result.best.refusal_ablated:.2f} when ablated)")
