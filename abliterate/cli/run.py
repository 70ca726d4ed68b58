"""run: the whole job (`abliterate MODEL`); its options are declared once, in jobs/run_options.RunOptions."""

from __future__ import annotations

import click

from abliterate.cli.common import arch_option
from abliterate.jobs.run_options import RunOptions
from abliterate.options.declared import click_options, from_params


@click.command()
@click_options(RunOptions)
@arch_option
def run(**params) -> None:
    """The whole job on MODEL (a Hub id or a local folder): an abliterated checkpoint or adapter.

    Fetches only safetensors weights, config, tokenizer and chat template (never pickles; remote
    code only with --trust-remote-code); extracts and selects the refusal direction with the
    family's recipe (or takes --direction); edits every residual-stream writer (or writes a rank-1
    LoRA adapter that computes the same); evaluates quickly against the original (--no-eval skips;
    --tasks adds lm-evaluation-harness benchmarks before and after);
    writes a model card with the numbers, the commands and a sha256 manifest; with --push, uploads
    it all in one commit. The Hub token comes from `hf auth login` or HF_TOKEN and is never printed.
    """
    from abliterate.jobs.whole_job import run as run_pipeline

    options = from_params(RunOptions, params)
    result = run_pipeline(options)
    if not options.stream:
        click.echo(f"wrote {result.out}")
    if result.url:
        click.echo(f"pushed to {result.url}")
    elif options.adapter:
        click.echo(f"load it with: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({options.model!r}), "
                   f"{str(result.out)!r})")
    else:
        click.echo(f"load it with: AutoModelForCausalLM.from_pretrained({str(result.out)!r})")
