"""jailbreak: jailbreak vectors per wrapper class, and how they transfer between classes (their options:
options/probe_family)."""

from __future__ import annotations

from pathlib import Path

import click

from abliterate.cli.common import arch_option, loaded_model, placement_options, plotted
from abliterate.options.command import recorded_command
from abliterate.options.declared import click_options, from_params
from abliterate.options.probe_family import JailbreakEvaluateOptions, JailbreakVectorsOptions


@click.group()
def jailbreak() -> None:
    """Jailbreak vectors: measure how jailbreak classes move the residual stream, and harden against them.

    \b
    abliterate jailbreak vectors MODEL --out vectors.safetensors [--wrappers builtin:jailbreaks]
    abliterate jailbreak evaluate MODEL [--vectors F --from CLASS --coeff C --layer L]
    abliterate steer chat MODEL --vectors F --class CLASS --layer L --coeff -C   (hardened chat)
    """


def _classes(value: str | None) -> list[str] | None:
    return [c.strip() for c in value.split(",") if c.strip()] if value else None


def _prompts(source: str, field: str | None, limit: int, option: str) -> list[str]:
    from abliterate.errors import AbliterateError
    from abliterate.evaluate.evaluation import select
    from abliterate.prompts import load_prompts
    from abliterate.prompts.loaders import PromptError

    if limit < 0:
        raise AbliterateError(f"--limit {limit} is negative; give a number of prompts, or 0 for all")
    try:
        return select(load_prompts(source, field=field), limit or None)
    except PromptError as e:
        raise AbliterateError(f"{option} {source}: {e}") from None


@jailbreak.command("vectors")
@click_options(JailbreakVectorsOptions)
@placement_options
@arch_option
def jailbreak_vectors(**params) -> None:
    """One vector per wrapper class and layer: the mean residual on wrapped harmful requests minus on the same
    requests unwrapped, averaged over the post-instruction tokens; prints the class-by-class cosine similarity.

    Saved as a steering file (row L + 1: after decoder layer L; not normalised): `direction` is the mean over
    classes, each class is `vector.CLASS` (`--class` in `probe`, `steer chat` and `jailbreak evaluate --from`).
    """
    from abliterate.io.direction_file import check_output_file
    from abliterate.jailbreak.vectors import jailbreak_vectors, save_jailbreak_vectors
    from abliterate.jailbreak.wrappers import class_names, load_wrappers
    from abliterate.measure.templates import load_template
    from abliterate.steer.steering import check_layer

    opts = from_params(JailbreakVectorsOptions, params)
    model_opts = opts.model_options
    check_output_file(opts.out, "vectors.safetensors")
    chosen = load_wrappers(opts.wrappers, _classes(opts.classes))
    requests = _prompts(opts.harmful, opts.field, opts.limit, "--harmful")
    lm = loaded_model(opts.model, model_opts)
    layer = lm.num_layers // 2 if opts.layer is None else opts.layer
    check_layer(layer, lm.num_layers)
    vectors = jailbreak_vectors(lm, requests, chosen, template=load_template(model_opts.template),
                                batch_size=opts.batch_size,
                                quiet=opts.quiet, **({} if model_opts.thinking else {"enable_thinking": False}))
    save_jailbreak_vectors(opts.out, vectors, lm, {"wrappers": opts.wrappers, "harmful": opts.harmful,
                                                   "prompts": len(requests),
                                                "command": recorded_command()})
    _show_cosines(class_names(chosen), vectors, layer, lm.hidden_size, opts.plot_path)
    click.echo(f"wrote {opts.out}: {len(vectors)} classes x {lm.num_layers + 1} rows from {len(requests)} requests")


def _show_cosines(names: list[str], vectors, layer: int, hidden_size: int, plot_path: Path | None) -> None:
    from abliterate.jailbreak.vectors import cosine_matrix, format_matrix, plot_matrix, random_cosine

    matrix = cosine_matrix(vectors, layer + 1)
    click.echo(f"cosine similarity of the class vectors after layer {layer} (random directions: |cos| about "
               f"{random_cosine(hidden_size):.3f}):")
    click.echo(format_matrix(names, matrix))
    plotted(lambda path: plot_matrix(names, matrix, path, layer), plot_path)


@jailbreak.command("evaluate")
@click_options(JailbreakEvaluateOptions)
@placement_options
@arch_option
def jailbreak_evaluate(**params) -> None:
    """Refusal rate on wrapped harmful requests per class, with and without a jailbreak vector subtracted (from
    the assistant header on, as `steer chat` steers), over-refusal, harmless KL, and per class how far the
    wrapper lowers the projection on the harmfulness direction at the instruction's last token."""
    from abliterate.jailbreak.run import run_evaluate

    opts = from_params(JailbreakEvaluateOptions, params)
    sets = {name: _prompts(getattr(opts, name), opts.field, opts.limit, f"--{name}") for name in
            ("harmful", "harmless", "overrefusal")}
    report, table = run_evaluate(opts.model, opts.wrappers, _classes(opts.classes), sets,
                                 vectors_path=opts.vectors_path, source=opts.source, coeff=opts.coeff, layer=opts.layer,
                                 harmfulness_path=opts.harmfulness_path,
                                 max_new_tokens=opts.max_new_tokens, model_options=opts.model_options,
                                 batch_size=opts.batch_size, quiet=opts.quiet)
    click.echo(table)
    if opts.out is not None:
        report.settings["command"] = recorded_command()
        report.save_json(opts.out)
        click.echo(f"wrote {opts.out}")
