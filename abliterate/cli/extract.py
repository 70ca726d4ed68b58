"""extract: find the refusal direction (or choose again among saved candidates with --reselect)."""

from __future__ import annotations

from pathlib import Path

import click

from abliterate.cli.common import model_options
from abliterate.options.command import recorded_command


@click.command()
@click.argument("model", required=False)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Direction file to write (.safetensors).")
@click.option("--reselect", type=click.Path(path_type=Path), default=None,
              help="Choose again among the candidates and scores saved in this file (a direction file, or the "
              "OUT.candidates.safetensors an interrupted or failed run kept) with the thresholds given here; "
              "no model is loaded.")
@click.option("--harmful", default="builtin:harmful", show_default=True,
              help="Harmful prompts: builtin:harmful, a .txt/.json/.jsonl/.csv/.parquet file, or hf:OWNER/NAME.")
@click.option("--harmless", default="builtin:harmless", show_default=True, help="Harmless prompts, same forms.")
@click.option("--field", default=None, help="Column/field holding the prompt in structured files or datasets.")
@click.option("--kind", type=click.Choice(["refusal", "harmfulness"]), default="refusal", show_default=True,
              help="refusal: one direction read at the post-instruction tokens, selected by its effect. harmfulness: "
              "harmful minus harmless at the instruction's last token, at every layer ([layers + 1, d], no "
              "selection), with its cosine similarity to the refusal difference per layer in the metadata.")
@click.option("--n-train", default=128, show_default=True, help="Prompts per set for the difference of means.")
@click.option("--n-val", default=32, show_default=True, help="Prompts per set for scoring candidates.")
@click.option("--batch-size", default=16, show_default=True, help="Prompts per forward pass.")
@click.option("--positions", type=int, default=None,
              help="Use only the last N post-instruction positions (default: all of them).")
@click.option("--screen-prompts", default=8, show_default=True, help="Harmful validation prompts (those the model "
              "refuses most) on which every candidate's ablation score is measured first.")
@click.option("--finalists", default=8, show_default=True, help="Candidates, best by ablation score, that get "
              "all three scores; 0 scores every candidate fully (slow; what pruning could miss, it cannot).")
@click.option("--kl-threshold", default=0.1, show_default=True, help="Reject candidates whose ablation moves the "
              "first-token distribution on harmless prompts by more than this KL.")
@click.option("--induce-threshold", default=0.0, show_default=True, help="Reject candidates whose addition does "
              "not raise the refusal log-odds on harmless prompts above this.")
@click.option("--prune-layers", default=0.2, show_default=True, help="Fraction of last layers never selected.")
@model_options()
@click.option("--quiet", "-q", is_flag=True)
def extract(model: str | None, out: Path, reselect: Path | None, harmful: str, harmless: str, field: str | None,
            kind: str, n_train: int, n_val: int, batch_size: int, device: str, dtype: str, template: str | None,
            positions: int | None, screen_prompts: int, finalists: int, kl_threshold: float,
            induce_threshold: float, prune_layers: float, thinking: bool, trust_remote_code: bool,
            quiet: bool) -> None:
    """Find MODEL's refusal direction and save it with all candidates and their scores.

    Difference of mean residual activations between harmful and harmless instructions at every
    layer and post-instruction position. Every candidate is screened by the refusal log-odds with
    it ablated on a few harmful prompts; the best quarter is scored on all of them, and the best
    --finalists also by the refusal log-odds with it added (must rise) and the first-token KL on
    harmless prompts (must stay small). The lowest ablation score passing both filters wins; when
    none passes, a filter is relaxed and the output says which. Candidates and scores are saved
    before the choice (OUT.candidates.safetensors while scoring), so --reselect can choose again.
    """
    from abliterate.errors import AbliterateError
    from abliterate.io.direction_file import check_output_file
    from abliterate.measure.extract import reselect as run_reselect
    from abliterate.measure.extract import save_extraction
    from abliterate.measure.selection import SelectionSettings

    check_output_file(out)
    settings = SelectionSettings(prune_layers, kl_threshold, induce_threshold, batch_size, screen_prompts, finalists)
    if (model is None) == (reselect is None):
        raise AbliterateError("give MODEL to extract, or --reselect FILE to choose again among saved candidates "
                              "(not both)")
    command = recorded_command()
    if kind == "harmfulness":
        return _harmfulness(model, out, reselect, harmful=harmful, harmless=harmless, field=field, n_train=n_train,
                            batch_size=batch_size, device=device, dtype=dtype, template=template, thinking=thinking,
                            trust_remote_code=trust_remote_code, quiet=quiet, command=command)
    result = run_reselect(reselect, settings) if reselect else _extract(
        model, out, settings, harmful=harmful, harmless=harmless, field=field, n_train=n_train, n_val=n_val,
        device=device, dtype=dtype, template=template, positions=positions, thinking=thinking,
        trust_remote_code=trust_remote_code, quiet=quiet, command=command)
    save_extraction(result, out, {"command": command})
    if not reselect:
        from abliterate.measure.extract import pending_path

        pending_path(out).unlink(missing_ok=True)
    report(result, out)


def _extract(model: str, out: Path, settings, *, harmful: str, harmless: str, field: str | None, n_train: int,
             n_val: int, device: str, dtype: str, template: str | None, positions: int | None, thinking: bool,
             trust_remote_code: bool, quiet: bool, command: str):
    from abliterate.measure.extract import PromptSets, extract, pending_path, split_prompts
    from abliterate.measure.loading import load_model
    from abliterate.measure.templates import load_template

    harmful_train, harmful_val = split_prompts(harmful, n_train=n_train, n_val=n_val, field=field, kind="harmful")
    harmless_train, harmless_val = split_prompts(harmless, n_train=n_train, n_val=n_val, field=field,
                                                 kind="harmless")
    lm = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    return extract(lm, PromptSets(harmful_train, harmless_train, harmful_val, harmless_val),
                   template=load_template(template), positions=positions, settings=settings,
                   template_kwargs={} if thinking else {"enable_thinking": False}, quiet=quiet,
                   pending=pending_path(out), metadata={"command": command})


def report(result, out: Path) -> None:
    """The best fully scored candidates (those passing the filters, else all), the choice, any relaxed filter."""
    full = [s for s in result.scores if s.full]
    shown = [s for s in full if s.rejected is None] or full
    if result.baseline_refusal == result.baseline_refusal:  # not NaN
        click.echo(f"refusal score (log-odds) on harmful validation prompts: {result.baseline_refusal:.2f} before")
    click.echo(f"{'layer':>5} {'pos':>4} {'ablated':>8} {'added':>8} {'KL':>8}")
    for s in sorted(shown, key=lambda s: s.refusal_ablated)[:10]:
        mark = " <- chosen" if (s.layer, s.position) == (result.best.layer, result.best.position) else ""
        click.echo(f"{s.layer:>5} {s.position:>4} {s.refusal_ablated:>8.2f} {s.refusal_added:>8.2f} {s.kl:>8.4f}{mark}")
    if result.relaxed:
        click.echo(f"note: {result.relaxed}")
    rejected = sum(s.rejected is not None for s in full)
    click.echo(f"{len(result.scores)} candidates screened, {len(full)} scored fully, {rejected} of those rejected by "
               f"the filters; wrote {out}")


def _harmfulness(model: str | None, out: Path, reselect: Path | None, *, harmful: str, harmless: str,
                 field: str | None, n_train: int, batch_size: int, device: str, dtype: str, template: str | None,
                 thinking: bool, trust_remote_code: bool, quiet: bool, command: str) -> None:
    """--kind harmfulness: the per-layer difference at the instruction's last token, and its table."""
    from abliterate.errors import AbliterateError
    from abliterate.measure.extract import split_prompts
    from abliterate.measure.harmfulness import harmfulness_direction, save_harmfulness
    from abliterate.measure.loading import load_model
    from abliterate.measure.templates import load_template

    if reselect is not None:
        raise AbliterateError("--reselect chooses among refusal candidates; --kind harmfulness has none to choose")
    harmful_train, _ = split_prompts(harmful, n_train=n_train, n_val=0, field=field, kind="harmful")
    harmless_train, _ = split_prompts(harmless, n_train=n_train, n_val=0, field=field, kind="harmless")
    lm = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    kwargs = {} if thinking else {"enable_thinking": False}
    result = harmfulness_direction(lm, harmful_train, harmless_train, template=load_template(template),
                                   batch_size=batch_size, quiet=quiet, **kwargs)
    save_harmfulness(result, out, lm, {"command": command})
    click.echo(f"{'resid':>5} {'|mean diff|':>12} {'cos to refusal':>15}")
    for i, (norm, cos) in enumerate(zip(result.direction.norm(dim=-1).tolist(), result.cosine.tolist(), strict=True)):
        click.echo(f"{i:>5} {norm:>12.4g} {cos:>15.3f}")
    click.echo(f"wrote {out}: the harmfulness direction at every layer ({len(harmful_train)} harmful, "
               f"{len(harmless_train)} harmless prompts)")
