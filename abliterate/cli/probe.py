"""probe: how prompt sets project on a direction, layer by layer."""

from __future__ import annotations

from pathlib import Path

import click

from abliterate.cli.common import model_options
from abliterate.options.command import recorded_command


@click.command()
@click.argument("model")
@click.option("--direction", "direction_path", required=True, type=click.Path(path_type=Path),
              help="Any direction file: from `extract` (refusal or --kind harmfulness), `steer vectors` or "
              "`jailbreak vectors`. A [d] direction is used at every layer; rows are normalised.")
@click.option("--class", "class_name", default=None,
              help="With a `jailbreak vectors` file: probe this class's vector instead of the shared one.")
@click.option("--prompts", "sources", required=True, multiple=True,
              help="A prompt set (repeatable): builtin:NAME[:SPLIT], a .txt/.json/.jsonl/.csv/.parquet file, or "
              "hf:OWNER/NAME[:SPLIT]. Each set is one column group of the table and one line of the plot.")
@click.option("--field", default=None, help="Column/field holding the prompt in structured files or datasets.")
@click.option("--limit", default=64, show_default=True, help="Prompts per set, spread over it (0: all).")
@click.option("--plot", "plot_path", default=None, type=click.Path(path_type=Path),
              help="Also draw the means as a PNG here, one line per set (needs matplotlib).")
@click.option("--out", default=None, type=click.Path(path_type=Path),
              help="Also write every mean and standard deviation, per layer and position, as JSON.")
@model_options(batch_size=16)
@click.option("--quiet", "-q", is_flag=True)
def probe(model: str, direction_path: Path, class_name: str | None, sources: tuple[str, ...], field: str | None,
          limit: int, plot_path: Path | None, out: Path | None, device: str, dtype: str, template: str | None,
          thinking: bool, trust_remote_code: bool, batch_size: int, quiet: bool) -> None:
    """Mean projection of MODEL's residual stream on a direction, for each prompt set.

    Prompts are formatted with the chat template. Printed per residual stream (row i enters decoder
    layer i, as `extract` numbers its layers; 0 is the embeddings, the last row the output of the
    last layer): each set's mean projection at the instruction's last token (inst) and averaged over
    the tokens the template puts after the message (post). --out keeps every position.
    """
    from abliterate.measure.loading import load_model
    from abliterate.measure.probe import format_table, load_probe_direction, plot, project, to_json
    from abliterate.measure.templates import load_template

    sets = _load_sets(sources, field, limit)
    lm = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    units = load_probe_direction(direction_path, hidden_size=lm.hidden_size, num_layers=lm.num_layers,
                                 name=class_name)
    kwargs = {} if thinking else {"enable_thinking": False}
    results = {name: project(lm, prompts, units, template=load_template(template), batch_size=batch_size,
                             desc=name, quiet=quiet, **kwargs) for name, prompts in sets.items()}
    click.echo(format_table(results))
    if out is not None:
        _write_text(out, to_json(results, {"model": model, "direction": str(direction_path), "class": class_name,
                                           "command": recorded_command()}))
        click.echo(f"wrote {out}")
    if plot_path is not None:
        if plot(results, plot_path):
            click.echo(f"wrote {plot_path}")
        else:
            click.echo("note: matplotlib is not installed; no plot written", err=True)


def _load_sets(sources: tuple[str, ...], field: str | None, limit: int) -> dict[str, list[str]]:
    """Every set read before the model loads, named by its source (files by their name)."""
    from abliterate.errors import AbliterateError
    from abliterate.evaluate.evaluation import select
    from abliterate.prompts import PromptError, load_prompts

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
