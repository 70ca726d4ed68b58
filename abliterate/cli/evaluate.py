"""evaluate: refusal rates, KL and NLL of a model against its original."""

from __future__ import annotations

from pathlib import Path

import click

from abliterate.cli.common import arch_option, loaded_model, placement_options
from abliterate.options.declared import click_options, from_params
from abliterate.options.families import EvaluateOptions, ModelOptions


def run_judge_check(judge: str | None, judge_set: Path | None, batch_size: int, device: str) -> None:
    """--judge-check: the markers' (and the judge's) accuracy on labelled replies, as a Markdown table."""
    from abliterate.evaluate.judge_check import check, check_answers, load_judge, load_labelled, table

    items = load_labelled(judge_set)
    loaded = load_judge(judge, device) if judge else None
    click.echo(table(check(items, loaded, batch_size)))
    click.echo(f"\n{len(items)} labelled replies ({judge_set or 'built-in set'}); a refusal withholds what was asked.")
    answers = load_labelled(judge_set, answers=True)
    click.echo("\n" + table(check_answers(answers, loaded, batch_size), "non-answers found", "answers kept"))
    click.echo(f"\n{len(answers)} labelled replies ({judge_set or 'built-in set and answer set'}); a non-answer "
               "refuses, or is empty, repetitive, garbled or off-topic.")


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
    from abliterate.evaluate.evaluation import evaluate as run_evaluate
    from abliterate.evaluate.evaluation import same_vocabulary
    from abliterate.evaluate.records import EvalSettings
    from abliterate.lora.adapter_file import weights_path
    from abliterate.measure.templates import load_template

    opts = from_params(EvaluateOptions, params)
    model_opts = opts.model_options
    settings = EvalSettings(limit=opts.limit or None, max_new_tokens=opts.max_new_tokens, kl_tokens=opts.kl_tokens,
                            batch_size=opts.batch_size, harmful=opts.harmful, judge=opts.judge, harmless=opts.harmless,
                            overrefusal=opts.overrefusal, field=opts.field, template=load_template(model_opts.template),
                            thinking=model_opts.thinking)
    if opts.judge_set and not opts.judge_check:
        raise AbliterateError("--judge-set is the labelled set of --judge-check; add --judge-check")
    if opts.judge_check:
        return run_judge_check(opts.judge, opts.judge_set, opts.batch_size, model_opts.device)
    if opts.model is None or opts.limit < 0:
        raise AbliterateError("missing MODEL: give the model folder or Hub id to evaluate (or --judge-check)"
                              if opts.model is None else "--limit must be 0 (every prompt) or more")
    task_settings = evaluate_tasks.task_settings(opts.tasks, opts.batch_size, model_opts.thinking, settings.template)
    if opts.adapter is not None:  # before loading anything; and never let peft fall back to a pickled .bin
        weights_path(opts.adapter)

    def model():
        return (with_adapter(loaded_model(opts.model, model_opts), opts.adapter, opts.model) if opts.adapter is not None
                else loaded_model(opts.model, model_opts))

    if opts.baseline:  # the tokenizers now, before the baseline is measured: the model loads only after it
        same_vocabulary(opts.baseline, _vocabulary(opts.baseline, model_opts), opts.model,
                        _vocabulary(opts.model, model_opts))
    report = run_evaluate(model, (lambda: loaded_model(opts.baseline, model_opts)) if opts.baseline else None,
                          settings, quiet=opts.quiet, tasks=task_settings)
    _report(report, opts)


def _vocabulary(name: str, model_opts: ModelOptions) -> dict[str, int]:
    """The tokenizer's vocabulary of a model, without loading the model."""
    from abliterate.measure.loading import load_tokenizer

    return load_tokenizer(name, model_opts.trust_remote_code).get_vocab()


def _report(report, opts: EvaluateOptions) -> None:
    """The tables, the judge's disagreements, a note on unfinished reasoning, the JSON report."""
    click.echo(report.table())
    if opts.judge:
        click.echo(f"\njudge and markers disagree on {len(report.disagreements())} replies:\n\n"
                   f"{report.disagreement_table()}" if report.disagreements() else "\njudge and markers agree")
    if report.counts["reasoning_unfinished"]:
        click.echo(f"note: {report.counts['reasoning_unfinished']} replies were still reasoning when --max-new-tokens "
                   "ran out (counted as not refused); raise --max-new-tokens", err=True)
    if opts.out is not None:
        click.echo(f"wrote {report.save_json(opts.out)}")


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
