"""evaluate: refusal rates, KL and NLL of a model against its original."""

from __future__ import annotations

from pathlib import Path

import click

from abliterate.cli.common import arch_option, loaded_model, placement_options
from abliterate.options.declared import click_options, from_params
from abliterate.options.families import EvaluateOptions


def run_judge_check(judge: str | None, judge_set: Path | None, batch_size: int, device: str) -> None:
    """--judge-check: the markers' (and the judge's) accuracy on labelled replies, as a Markdown table."""
    from abliterate.evaluate.judge_check import check, load_judge, load_labelled, table

    items = load_labelled(judge_set)
    loaded = load_judge(judge, device) if judge else None
    click.echo(table(check(items, loaded, batch_size)))
    click.echo(f"\n{len(items)} labelled replies ({judge_set or 'built-in set'}); a refusal withholds what was asked.")


@click.command()
@click_options(EvaluateOptions)
@placement_options
@arch_option
def evaluate(**params) -> None:
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
    from abliterate.evaluate.evaluation import EvalSettings, same_vocabulary
    from abliterate.evaluate.evaluation import evaluate as run_evaluate
    from abliterate.lora.adapter_file import weights_path
    from abliterate.measure.loading import load_tokenizer
    from abliterate.measure.templates import load_template

    o = from_params(EvaluateOptions, params)
    m = o.model_options
    settings = EvalSettings(limit=o.limit or None, max_new_tokens=o.max_new_tokens, kl_tokens=o.kl_tokens,
                            batch_size=o.batch_size, harmful=o.harmful, judge=o.judge, harmless=o.harmless,
                            overrefusal=o.overrefusal, field=o.field, template=load_template(m.template),
                            thinking=m.thinking)
    if o.judge_set and not o.judge_check:
        raise AbliterateError("--judge-set is the labelled set of --judge-check; add --judge-check")
    if o.judge_check:
        return run_judge_check(o.judge, o.judge_set, o.batch_size, m.device)
    if o.model is None or o.limit < 0:
        raise AbliterateError("missing MODEL: give the model folder or Hub id to evaluate (or --judge-check)"
                              if o.model is None else "--limit must be 0 (every prompt) or more")
    task_settings = evaluate_tasks.task_settings(o.tasks, o.batch_size, m.thinking, settings.template)
    if o.adapter is not None:  # before loading anything; and never let peft fall back to a pickled .bin
        weights_path(o.adapter)
    model = lambda: (with_adapter(loaded_model(o.model, m), o.adapter, o.model) if o.adapter is not None  # noqa: E731
                     else loaded_model(o.model, m))
    if o.baseline:  # the tokenizers now, before the baseline is measured: the model loads only after it
        vocab = lambda name: load_tokenizer(name, m.trust_remote_code).get_vocab()  # noqa: E731
        same_vocabulary(o.baseline, vocab(o.baseline), o.model, vocab(o.model))
    report = run_evaluate(model, (lambda: loaded_model(o.baseline, m)) if o.baseline else None, settings, quiet=o.quiet,
                          tasks=task_settings)
    _report(report, o)


def _report(report, o: EvaluateOptions) -> None:
    """The tables, the judge's disagreements, a note on unfinished reasoning, the JSON report."""
    click.echo(report.table())
    if o.judge:
        click.echo(f"\njudge and markers disagree on {len(report.disagreements())} replies:\n\n"
                   f"{report.disagreement_table()}" if report.disagreements() else "\njudge and markers agree")
    if report.counts["reasoning_unfinished"]:
        click.echo(f"note: {report.counts['reasoning_unfinished']} replies were still reasoning when --max-new-tokens "
                   "ran out (counted as not refused); raise --max-new-tokens", err=True)
    if o.out is not None:
        click.echo(f"wrote {report.save_json(o.out)}")


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
