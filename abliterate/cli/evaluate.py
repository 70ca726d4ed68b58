"""evaluate: refusal rates, KL and NLL of a model against its original."""

from __future__ import annotations

from pathlib import Path

import click

from abliterate.cli.common import model_options
from abliterate.options.declared import click_options
from abliterate.options.families import TaskOptions

task_options = click_options(TaskOptions)  # --tasks and its settings, shared by `evaluate` and the whole job


def run_judge_check(judge: str | None, judge_set: Path | None, batch_size: int, device: str) -> None:
    """--judge-check: the markers' (and the judge's) accuracy on labelled replies, as a Markdown table."""
    from abliterate.evaluate.judge_check import check, load_judge, load_labelled, table

    items = load_labelled(judge_set)
    loaded = load_judge(judge, device) if judge else None
    click.echo(table(check(items, loaded, batch_size)))
    click.echo(f"\n{len(items)} labelled replies ({judge_set or 'built-in set'}); a refusal withholds what was asked.")


@click.command()
@click.argument("model", required=False)
@click.option("--baseline", default=None, help="The original model (folder or Hub id): KL and its own rates and NLL.")
@click.option("--adapter", "adapter_dir", default=None, type=click.Path(path_type=Path),
              help="A peft adapter folder to load on MODEL (e.g. from `apply --adapter`).")
@click.option("--out", default=None, type=click.Path(path_type=Path), help="Write the full report as JSON here.")
@click.option("--harmful", default="builtin:harmful", show_default=True,
              help="Harmful prompts (builtin sets: their held-out test split), a file or hf:OWNER/NAME.")
@click.option("--harmless", default="builtin:harmless", show_default=True, help="Harmless prompts for the KL.")
@click.option("--overrefusal", default="builtin:overrefusal", show_default=True,
              help="Safe prompts that look dangerous.")
@click.option("--field", default=None, help="Column/field holding the prompt in structured files or datasets.")
@click.option("--limit", default=32, show_default=True, help="Prompts per set, spread evenly over it; 0: all.")
@click.option("--max-new-tokens", default=128, show_default=True,
              help="Greedy tokens per reply; keep at least 128 for numbers you publish (refusals can come late).")
@click.option("--kl-tokens", default=16, show_default=True, help="Tokens of the baseline's continuation in the KL.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--judge", default=None, help="A chat model asked, per reply, whether it refuses (yes/no), "
              "reported next to the marker counts, with the replies where the two disagree.")
@click.option("--judge-check", is_flag=True, help="Instead of evaluating MODEL: print the markers' and --judge's "
              "accuracy on labelled replies (the built-in set, or --judge-set).")
@click.option("--judge-set", default=None, type=click.Path(path_type=Path),
              help="With --judge-check: a JSONL file of {prompt, reply, refusal: true/false, kind} to score on.")
@task_options
@model_options()
@click.option("--quiet", "-q", is_flag=True)
def evaluate(model: str | None, baseline: str | None, adapter_dir: Path | None, out: Path | None, harmful: str,
             harmless: str, overrefusal: str, field: str | None, limit: int, max_new_tokens: int, kl_tokens: int,
             batch_size: int, judge: str | None, judge_check: bool, judge_set: Path | None, tasks: str | None,
             tasks_limit: int | None, tasks_fewshot: int | None, tasks_chat_template: bool, device: str, dtype: str,
             template: str | None, thinking: bool,
             trust_remote_code: bool, quiet: bool) -> None:
    """Refusal and over-refusal rates, KL to the original and general-text NLL of MODEL.

    Greedy replies to held-out harmful prompts and to safe prompts that look dangerous are matched
    against a list of refusal phrases (whole reply, reasoning blocks removed); with --baseline, the
    KL of next-token distributions on harmless prompts along the baseline's own continuation, and
    every metric for the baseline too. With --tasks, also lm-evaluation-harness benchmarks on both
    (`pip install 'abliterate[bench]'`), with standard errors and the difference. Prints Markdown
    tables for a model card.
    """
    from abliterate.errors import AbliterateError
    from abliterate.evaluate import tasks as evaluate_tasks
    from abliterate.evaluate.evaluation import EvalSettings
    from abliterate.evaluate.evaluation import evaluate as run_evaluate
    from abliterate.lora.adapter_file import weights_path
    from abliterate.measure.loading import load_model
    from abliterate.measure.templates import load_template

    settings = EvalSettings(limit=limit or None, max_new_tokens=max_new_tokens, kl_tokens=kl_tokens,
                            batch_size=batch_size, harmful=harmful, judge=judge, harmless=harmless,
                            overrefusal=overrefusal, field=field, template=load_template(template), thinking=thinking)
    if judge_set and not judge_check:
        raise AbliterateError("--judge-set is the labelled set of --judge-check; add --judge-check")
    if judge_check:
        return run_judge_check(judge, judge_set, batch_size, device)
    if model is None:
        raise AbliterateError("missing MODEL: give the model folder or Hub id to evaluate (or --judge-check)")
    if limit < 0:
        raise AbliterateError("--limit must be 0 (every prompt) or more")
    task_settings = evaluate_tasks.task_settings(TaskOptions(tasks, tasks_limit, tasks_fewshot, tasks_chat_template),
                                                 batch_size, thinking, settings.template)
    if adapter_dir is not None:  # before loading anything; and never let peft fall back to a pickled .bin
        weights_path(adapter_dir)
    lm = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    lm = with_adapter(lm, adapter_dir, model) if adapter_dir is not None else lm
    base = load_model(baseline, dtype=dtype, device=device, trust_remote_code=trust_remote_code) if baseline else None
    report = run_evaluate(lm, base, settings, quiet=quiet, tasks=task_settings)
    click.echo(report.table())
    if judge:
        click.echo(f"\njudge and markers disagree on {len(report.disagreements())} replies:\n\n"
                   f"{report.disagreement_table()}" if report.disagreements() else "\njudge and markers agree")
    if report.counts["reasoning_unfinished"]:
        click.echo(f"note: {report.counts['reasoning_unfinished']} replies were still reasoning when --max-new-tokens "
                   "ran out (counted as not refused); raise --max-new-tokens", err=True)
    if out is not None:
        click.echo(f"wrote {report.save_json(out)}")


def with_adapter(lm, adapter_dir: Path, model: str):
    """`lm` with the peft adapter at `adapter_dir` on it, or one line saying why it does not fit."""
    from peft import PeftModel

    from abliterate.errors import AbliterateError, first_line
    from abliterate.measure.loading import LoadedModel

    try:
        peft_model = PeftModel.from_pretrained(lm.model, str(adapter_dir)).eval()
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: shapes of another model
        reason = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), first_line(e))
        raise AbliterateError(f"cannot load the adapter {adapter_dir} onto {model} ({reason}); is it the "
                              "adapter of another model?") from None
    return LoadedModel(peft_model, lm.tokenizer, lm.arch, f"{model} + {adapter_dir}")
