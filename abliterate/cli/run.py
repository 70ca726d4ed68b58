"""run: the whole job (`abliterate MODEL`)."""

from __future__ import annotations

from pathlib import Path

import click

from abliterate.cli.common import arch_option
from abliterate.cli.evaluate import task_options, task_settings_from


@click.command()
@click.argument("model")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder (default: ./NAME-abliterated, or NAME-abliterated-adapter).")
@click.option("--push", "push_to", is_flag=False, flag_value="", default=None, metavar="[REPO_ID]",
              help="Push the result to the Hub (default repo: YOUR_USER/NAME-abliterated).")
@click.option("--adapter", is_flag=True, help="Write an exactly equivalent rank-1 LoRA adapter instead of weights.")
@click.option("--direction", "direction_path", type=click.Path(path_type=Path), default=None,
              help="Use this direction file instead of extracting one.")
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path), default=None,
              help="Recipe YAML overriding the family's settings (see recipes/README.md).")
@click.option("--harmful", default=None, help="Harmful prompts for extraction (default: the recipe's, built-in).")
@click.option("--harmless", default=None, help="Harmless prompts for extraction (default: the recipe's, built-in).")
@click.option("--field", default=None, help="Column/field holding the prompt in structured files or datasets.")
@click.option("--eval-harmful", default="builtin:harmful", show_default=True,
              help="Held-out harmful prompts for the evaluation.")
@click.option("--eval-harmless", default="builtin:harmless", show_default=True,
              help="Harmless prompts for the evaluation's KL.")
@click.option("--search", "search_trials", type=int, default=None, metavar="N",
              help="Search N trials of direction and per-layer strengths on the loaded model (as `abliterate "
              "search`; needs optuna) and apply the chosen point; the card shows the front and the recipe.")
@click.option("--max-kl", type=float, default=None, help="With --search: the fewest refusals with KL at most this.")
@click.option("--max-refusals", type=float, default=None,
              help="With --search: the lowest KL with at most this fraction of validation prompts refused.")
@click.option("--time-budget", type=float, default=None,
              help="With --search: seconds for the trials (no new trial starts after this).")
@click.option("--no-eval", is_flag=True, help="Skip the quick evaluation (the card then has no numbers).")
@click.option("--private", is_flag=True, help="Create the Hub repo private.")
@click.option("--force", is_flag=True, help="Push even into an existing repo abliterate did not create.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of MODEL.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, mps or auto.")
@click.option("--dtype", default=None, help="Compute dtype for extraction/evaluation (default: the recipe's).")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own Python code from the Hub.")
@click.option("--template", default=None, help="Chat template (Jinja file or text) for models without one.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--stream", is_flag=True, help="With --push and --direction: download, edit, upload and delete one "
              "shard at a time (disk for about two shards); a rerun resumes; --out is the work folder.")
@task_options
@click.option("--quiet", "-q", is_flag=True)
@arch_option
def run(model: str, out: Path | None, push_to: str | None, adapter: bool, direction_path: Path | None,
        recipe_path: Path | None, harmful: str | None, harmless: str | None, field: str | None, eval_harmful: str,
        eval_harmless: str, search_trials: int | None, max_kl: float | None, max_refusals: float | None,
        time_budget: float | None, no_eval: bool, private: bool, force: bool, revision: str | None, device: str,
        dtype: str | None, trust_remote_code: bool, template: str | None, overwrite: bool, stream: bool,
        tasks: str | None, tasks_limit: int | None, tasks_fewshot: int | None, tasks_chat_template: bool,
        quiet: bool) -> None:
    """The whole job on MODEL (a Hub id or a local folder): an abliterated checkpoint or adapter.

    Fetches only safetensors weights, config, tokenizer and chat template (never pickles; remote
    code only with --trust-remote-code); extracts and selects the refusal direction with the
    family's recipe (or takes --direction); edits every residual-stream writer (or writes a rank-1
    LoRA adapter that computes the same); evaluates quickly against the original (--no-eval skips;
    --tasks adds lm-evaluation-harness benchmarks before and after);
    writes a model card with the numbers, the commands and a sha256 manifest; with --push, uploads
    it all in one commit. The Hub token comes from `hf auth login` or HF_TOKEN and is never printed.
    """
    from abliterate.errors import AbliterateError
    from abliterate.jobs.whole_job import RunOptions
    from abliterate.jobs.whole_job import run as run_pipeline

    if tasks and (no_eval or stream):
        raise AbliterateError("--tasks runs in the evaluation; drop --no-eval / --stream to use it")
    task_settings = task_settings_from(tasks, tasks_limit, tasks_fewshot, tasks_chat_template, 8, False)
    result = run_pipeline(RunOptions(
        model=model, out=out, adapter=adapter, direction=direction_path, recipe=recipe_path, harmful=harmful,
        harmless=harmless, field=field, eval_harmful=eval_harmful, eval_harmless=eval_harmless, evaluate=not no_eval,
        push=push_to is not None, repo_id=push_to or None, private=private, force=force, revision=revision,
        device=device, dtype=dtype, trust_remote_code=trust_remote_code, template=template, overwrite=overwrite,
        stream=stream, quiet=quiet, tasks=task_settings, search=search_trials, max_kl=max_kl,
        max_refusals=max_refusals, time_budget=time_budget))
    if not stream:
        click.echo(f"wrote {result.out}")
    if result.url:
        click.echo(f"pushed to {result.url}")
    elif adapter:
        click.echo(f"load it with: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({model!r}), "
                   f"{str(result.out)!r})")
    else:
        click.echo(f"load it with: AutoModelForCausalLM.from_pretrained({str(result.out)!r})")
