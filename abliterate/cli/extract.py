"""extract: find the refusal direction."""

from __future__ import annotations

from pathlib import Path

import click

from abliterate.cli.common import command_line, model_options


@click.command()
@click.argument("model")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Direction file to write (.safetensors).")
@click.option("--harmful", default="builtin:harmful", show_default=True,
              help="Harmful prompts: builtin:harmful, a .txt/.json/.jsonl/.csv/.parquet file, or hf:OWNER/NAME.")
@click.option("--harmless", default="builtin:harmless", show_default=True, help="Harmless prompts, same forms.")
@click.option("--field", default=None, help="Column/field holding the prompt in structured files or datasets.")
@click.option("--n-train", default=128, show_default=True, help="Prompts per set for the difference of means.")
@click.option("--n-val", default=32, show_default=True, help="Prompts per set for scoring candidates.")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--positions", type=int, default=None,
              help="Use only the last N post-instruction positions (default: all of them).")
@click.option("--kl-threshold", default=0.1, show_default=True, help="Reject candidates whose ablation moves the "
              "first-token distribution on harmless prompts by more than this KL.")
@click.option("--induce-threshold", default=0.0, show_default=True, help="Reject candidates whose addition does "
              "not raise the refusal log-odds on harmless prompts above this.")
@click.option("--prune-layers", default=0.2, show_default=True, help="Fraction of last layers never selected.")
@model_options()
@click.option("--quiet", "-q", is_flag=True)
def extract(model: str, out: Path, harmful: str, harmless: str, field: str | None, n_train: int, n_val: int,
            batch_size: int, device: str, dtype: str, template: str | None, positions: int | None,
            kl_threshold: float, induce_threshold: float, prune_layers: float, thinking: bool,
            trust_remote_code: bool, quiet: bool) -> None:
    """Find MODEL's refusal direction and save it with all candidates and their scores.

    Difference of mean residual activations between harmful and harmless instructions at every
    layer and post-instruction position; each candidate is scored on validation prompts by the
    refusal log-odds with it ablated (lower is better), the refusal log-odds with it added (must
    rise), and the first-token KL on harmless prompts (must stay small). Built-in prompt sets are
    used unless --harmful/--harmless say otherwise.
    """
    from abliterate.io.direction_file import check_output_file
    from abliterate.measure.extract import PromptSets, save_extraction, split_prompts
    from abliterate.measure.extract import extract as run_extract
    from abliterate.measure.loading import load_model
    from abliterate.measure.scores import SelectionSettings
    from abliterate.measure.templates import load_template

    check_output_file(out)
    harmful_train, harmful_val = split_prompts(harmful, n_train=n_train, n_val=n_val, field=field, kind="harmful")
    harmless_train, harmless_val = split_prompts(harmless, n_train=n_train, n_val=n_val, field=field,
                                                 kind="harmless")
    lm = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    settings = SelectionSettings(prune_layers, kl_threshold, induce_threshold, batch_size)
    result = run_extract(lm, PromptSets(harmful_train, harmless_train, harmful_val, harmless_val),
                         template=load_template(template), positions=positions, settings=settings,
                         template_kwargs={} if thinking else {"enable_thinking": False}, quiet=quiet)
    save_extraction(result, out, lm, {"command": command_line(click.get_current_context())})
    kept = sorted((s for s in result.scores if s.rejected is None), key=lambda s: s.refusal_ablated)[:10]
    click.echo(f"refusal score (log-odds) on harmful validation prompts: {result.baseline_refusal:.2f} before")
    click.echo(f"{'layer':>5} {'pos':>4} {'ablated':>8} {'added':>8} {'KL':>8}")
    for s in kept:
        mark = " <- chosen" if s == result.best else ""
        click.echo(f"{s.layer:>5} {s.position:>4} {s.refusal_ablated:>8.2f} {s.refusal_added:>8.2f} {s.kl:>8.4f}{mark}")
    rejected = sum(s.rejected is not None for s in result.scores)
    click.echo(f"{len(result.scores)} candidates scored, {rejected} rejected by the filters; wrote {out}")
