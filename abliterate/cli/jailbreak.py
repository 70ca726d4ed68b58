"""jailbreak: jailbreak vectors per wrapper class, and how they transfer between classes."""

from __future__ import annotations

from pathlib import Path

import click

from abliterate.cli.common import model_options
from abliterate.options.command import recorded_command

WRAPPERS_HELP = ("Jailbreak wrappers: builtin:jailbreaks (six classes written for this project) or a JSONL file of "
                 '{"class": ..., "template": "... {prompt} ..."} objects.')


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
    from abliterate.prompts import PromptError, load_prompts

    if limit < 0:
        raise AbliterateError(f"--limit {limit} is negative; give a number of prompts, or 0 for all")
    try:
        return select(load_prompts(source, field=field), limit or None)
    except PromptError as e:
        raise AbliterateError(f"{option} {source}: {e}") from None


@jailbreak.command("vectors")
@click.argument("model")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Vectors file to write (.safetensors).")
@click.option("--wrappers", default="builtin:jailbreaks", show_default=True, help=WRAPPERS_HELP)
@click.option("--classes", default=None, help="Comma-separated classes to use (default: every class of --wrappers).")
@click.option("--harmful", default="builtin:harmful:train", show_default=True,
              help="Harmful requests to wrap: builtin:NAME[:SPLIT], a file, or hf:OWNER/NAME.")
@click.option("--field", default=None, help="Column/field holding the prompt in structured files or datasets.")
@click.option("--limit", default=32, show_default=True, help="Harmful requests used, spread over the set (0: all).")
@click.option("--layer", type=int, default=None, help="Print the cosine matrix at the residual stream after this "
              "decoder layer (default: the middle one).")
@click.option("--plot", "plot_path", default=None, type=click.Path(path_type=Path),
              help="Also draw the cosine matrix as a PNG here (needs matplotlib).")
@model_options(batch_size=16)
@click.option("--quiet", "-q", is_flag=True)
def jailbreak_vectors(model: str, out: Path, wrappers: str, classes: str | None, harmful: str, field: str | None,
                      limit: int, layer: int | None, plot_path: Path | None, device: str, dtype: str,
                      template: str | None, thinking: bool, trust_remote_code: bool, batch_size: int,
                      quiet: bool) -> None:
    """One vector per wrapper class and layer: the mean residual on wrapped harmful requests minus on the same
    requests unwrapped, averaged over the post-instruction tokens; prints the class-by-class cosine similarity.

    Saved as a steering file (row L + 1: after decoder layer L; not normalised): `direction` is the mean over
    classes, each class is `vector.CLASS` (`--class` in `probe`, `steer chat` and `jailbreak evaluate --from`).
    """
    from abliterate.io.direction_file import check_output_file
    from abliterate.jailbreak.vectors import jailbreak_vectors, save_jailbreak_vectors
    from abliterate.jailbreak.wrappers import class_names, load_wrappers
    from abliterate.measure.loading import load_model
    from abliterate.measure.templates import load_template
    from abliterate.steer.steering import check_layer

    check_output_file(out, "vectors.safetensors")
    chosen = load_wrappers(wrappers, _classes(classes))
    requests = _prompts(harmful, field, limit, "--harmful")
    lm = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    layer = lm.num_layers // 2 if layer is None else layer
    check_layer(layer, lm.num_layers)
    vectors = jailbreak_vectors(lm, requests, chosen, template=load_template(template), batch_size=batch_size,
                                quiet=quiet, **({} if thinking else {"enable_thinking": False}))
    save_jailbreak_vectors(out, vectors, lm, {"wrappers": wrappers, "harmful": harmful, "prompts": len(requests),
                                              "command": recorded_command()})
    _show_cosines(class_names(chosen), vectors, layer, lm.hidden_size, plot_path)
    click.echo(f"wrote {out}: {len(vectors)} classes x {lm.num_layers + 1} rows from {len(requests)} requests")


def _show_cosines(names: list[str], vectors, layer: int, hidden_size: int, plot_path: Path | None) -> None:
    from abliterate.jailbreak.vectors import cosine_matrix, format_matrix, plot_matrix, random_cosine

    matrix = cosine_matrix(vectors, layer + 1)
    click.echo(f"cosine similarity of the class vectors after layer {layer} (random directions: |cos| about "
               f"{random_cosine(hidden_size):.3f}):")
    click.echo(format_matrix(names, matrix))
    if plot_path is not None:
        if plot_matrix(names, matrix, plot_path, layer):
            click.echo(f"wrote {plot_path}")
        else:
            click.echo("note: matplotlib is not installed; no plot written", err=True)


@jailbreak.command("evaluate")
@click.argument("model")
@click.option("--wrappers", default="builtin:jailbreaks", show_default=True, help=WRAPPERS_HELP)
@click.option("--classes", default=None, help="Comma-separated classes to evaluate (default: all of --wrappers).")
@click.option("--vectors", "vectors_path", default=None, type=click.Path(path_type=Path),
              help="A file from `jailbreak vectors`: measure each class again with a vector subtracted.")
@click.option("--from", "source", default=None, help="The class whose vector is subtracted (default: the mean over "
              "classes); the other classes are held out.")
@click.option("--coeff", default=1.0, show_default=True, help="Multiple of the vector subtracted.")
@click.option("--layer", type=int, default=None, help="Subtract after this decoder layer; the harmfulness "
              "projection is read there too (default: the middle layer).")
@click.option("--harmful", default="builtin:harmful:test", show_default=True, help="Harmful requests to wrap.")
@click.option("--harmless", default="builtin:harmless:test", show_default=True,
              help="Harmless requests: the harmfulness direction (with --harmful) and the KL.")
@click.option("--overrefusal", default="builtin:overrefusal", show_default=True,
              help="Safe prompts that look dangerous, for the over-refusal rate.")
@click.option("--harmfulness", "harmfulness_path", default=None, type=click.Path(path_type=Path),
              help="A direction file from `extract --kind harmfulness` (default: measured from --harmful and "
              "--harmless at the instruction's last token).")
@click.option("--field", default=None, help="Column/field holding the prompt in structured files or datasets.")
@click.option("--limit", default=16, show_default=True, help="Prompts per set, spread over it (0: all).")
@click.option("--max-new-tokens", default=128, show_default=True, help="Greedy tokens per reply (refusals may come "
              "after a preamble: keep at least 128 for numbers you publish).")
@click.option("--out", default=None, type=click.Path(path_type=Path), help="Also write the report as JSON.")
@model_options(batch_size=8)
@click.option("--quiet", "-q", is_flag=True)
def jailbreak_evaluate(model: str, wrappers: str, classes: str | None, vectors_path: Path | None, source: str | None,
                       coeff: float, layer: int | None, harmful: str, harmless: str, overrefusal: str,
                       harmfulness_path: Path | None, field: str | None, limit: int, max_new_tokens: int,
                       out: Path | None, device: str, dtype: str, template: str | None, thinking: bool,
                       trust_remote_code: bool, batch_size: int, quiet: bool) -> None:
    """Refusal rate on wrapped harmful requests per class, with and without a jailbreak vector subtracted (from
    the assistant header on, as `steer chat` steers), over-refusal, harmless KL, and per class how far the
    wrapper lowers the projection on the harmfulness direction at the instruction's last token."""
    from abliterate.jailbreak.run import run_evaluate

    sets = {name: _prompts(src, field, limit, f"--{name}") for name, src in
            (("harmful", harmful), ("harmless", harmless), ("overrefusal", overrefusal))}
    report, table = run_evaluate(model, wrappers, _classes(classes), sets, vectors_path=vectors_path, source=source,
                                 coeff=coeff, layer=layer, harmfulness_path=harmfulness_path,
                                 max_new_tokens=max_new_tokens, device=device, dtype=dtype, template=template,
                                 thinking=thinking, trust_remote_code=trust_remote_code, batch_size=batch_size,
                                 quiet=quiet)
    click.echo(table)
    if out is not None:
        report.settings["command"] = recorded_command()
        report.save_json(out)
        click.echo(f"wrote {out}")
