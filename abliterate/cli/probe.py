"""probe: how prompt sets project on a direction, layer by layer (its options: options/probe_family)."""

from __future__ import annotations

from pathlib import Path

import click

from abliterate.cli.common import arch_option, loaded_model, placement_options, plotted
from abliterate.options.command import recorded_command
from abliterate.options.declared import click_options, from_params
from abliterate.options.probe_family import ProbeOptions


@click.command()
@click_options(ProbeOptions)
@placement_options
@arch_option
def probe(**params) -> None:
    """Mean projection of MODEL's residual stream on a direction, for each prompt set.

    Prompts are formatted with the chat template. Printed per residual stream (row i enters decoder
    layer i, as `extract` numbers its layers; 0 is the embeddings, the last row the output of the
    last layer): each set's mean projection at the instruction's last token (inst) and averaged over
    the tokens the template puts after the message (post). --out keeps every position.
    """
    from abliterate.measure.probe import format_table, load_probe_direction, plot, project, to_json
    from abliterate.measure.templates import load_template

    opts = from_params(ProbeOptions, params)
    model_opts = opts.model_options
    sets = _load_sets(opts.sources, opts.field, opts.limit)
    lm = loaded_model(opts.model, model_opts)
    units = load_probe_direction(opts.direction_path, hidden_size=lm.hidden_size, num_layers=lm.num_layers,
                                 name=opts.class_name)
    kwargs = {} if model_opts.thinking else {"enable_thinking": False}
    results = {name: project(lm, prompts, units, template=load_template(model_opts.template),
                             batch_size=opts.batch_size,
                             desc=name, quiet=opts.quiet, **kwargs) for name, prompts in sets.items()}
    click.echo(format_table(results))
    if opts.out is not None:
        _write_text(opts.out, to_json(results, {"model": opts.model, "direction": str(opts.direction_path),
                                             "class": opts.class_name, "command": recorded_command()}))
        click.echo(f"wrote {opts.out}")
    plotted(lambda path: plot(results, path), opts.plot_path)


def _load_sets(sources: tuple[str, ...], field: str | None, limit: int) -> dict[str, list[str]]:
    """Every set read before the model loads, named by its source (files by their name)."""
    from abliterate.errors import AbliterateError
    from abliterate.evaluate.evaluation import select
    from abliterate.prompts import load_prompts
    from abliterate.prompts.loaders import PromptError

    if limit < 0:
        raise AbliterateError(f"--limit {limit} is negative; give a number of prompts per set, or 0 for all")
    sets: dict[str, list[str]] = {}
    for source in sources:
        name = Path(source).stem if Path(source).exists() else source
        try:
            sets[name] = select(load_prompts(source, field=field), limit or None)
        except PromptError as e:
            raise AbliterateError(f"--prompts {source}: {e}") from None
    if len(sets) != len(sources):
        raise AbliterateError("two --prompts name the same set; give each set once")
    return sets


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text + "\n", encoding="utf-8")
    tmp.replace(path)
