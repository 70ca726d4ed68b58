"""search: an Optuna study for a gentler edit."""

from __future__ import annotations

from pathlib import Path

import click

from abliterate.cli.common import model_options


@click.command()
@click.argument("model")
@click.option("--direction", "direction_path", required=True, type=click.Path(path_type=Path),
              help="Direction file written by `abliterate extract` (its candidates are what is searched).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Recipe YAML to write for the chosen point (its direction file goes beside it).")
@click.option("--study", "study_path", default=None, type=click.Path(path_type=Path),
              help="SQLite file holding the study; rerun with it to resume. Default: OUT's name + .study.db.")
@click.option("--study-name", default="abliterate-search", show_default=True)
@click.option("--trials", default=100, show_default=True,
              help="Completed trials the study should have; a rerun with more continues it.")
@click.option("--time-budget", type=float, default=None,
              help="Seconds: start no new trial after this long (whichever of --trials and this comes first).")
@click.option("--max-kl", type=float, default=None, help="Choose the fewest refusals with KL at most this.")
@click.option("--max-refusals", type=float, default=None,
              help="Choose the lowest KL with at most this fraction of prompts refused (0.05: 5 %).")
@click.option("--seed", default=0, show_default=True)
@click.option("--startup-trials", default=10, show_default=True, help="Random trials before TPE takes over.")
@click.option("--max-strength", default=1.5, show_default=True, help="Upper bound of every strength (>= 1).")
@click.option("--norm-preserve/--no-norm-preserve", default=True, show_default=True,
              help="Search norm-preserving edits too (each written vector keeps its norm; `apply --norm-preserve`).")
@click.option("--from-random", is_flag=True, help="Do not start from the extraction's choice (fully removed).")
@click.option("--harmful", default="builtin:harmful", show_default=True,
              help="Harmful prompts (built-in sets: their validation split), a file or hf:OWNER/NAME.")
@click.option("--harmless", default="builtin:harmless", show_default=True, help="Harmless prompts, same forms.")
@click.option("--overrefusal", default="builtin:overrefusal", show_default=True,
              help="Borderline prompts (safe but dangerous-looking) whose refusals points on the front also count, "
              "a third objective; 'none' skips it. The built-in set's prompts that `evaluate` reports on are left out.")
@click.option("--field", default=None, help="Column/field holding the prompt in structured files or datasets.")
@click.option("--n-val", default=32, show_default=True, help="Validation prompts per set.")
@click.option("--max-new-tokens", default=24, show_default=True,
              help="Greedy tokens per reply when counting refusals of points on the front.")
@click.option("--kl-objective", type=click.Choice(["first-token", "continuation"]), default="first-token",
              show_default=True, help="KL at the first reply token (fast), or averaged over the first --kl-tokens "
              "tokens of the unedited model's own reply, teacher-forced (sees damage after the first token).")
@click.option("--kl-tokens", default=16, show_default=True, help="Reply tokens in --kl-objective continuation.")
@click.option("--refusal-objective", type=click.Choice(["score", "count"]), default="score", show_default=True,
              help="First-token refusal log-odds (fast), or the number of greedy replies of --max-new-tokens the "
              "refusal markers count, generated every trial (sees refusals after a preamble).")
@click.option("--batch-size", default=16, show_default=True)
@model_options()
@click.option("--quiet", "-q", is_flag=True)
def search(model: str, direction_path: Path, out: Path, study_path: Path | None, study_name: str, trials: int,
           time_budget: float | None, max_kl: float | None, max_refusals: float | None, seed: int,
           startup_trials: int, max_strength: float, norm_preserve: bool, from_random: bool, harmful: str,
           harmless: str, overrefusal: str, field: str | None, n_val: int, max_new_tokens: int,
           kl_objective: str, kl_tokens: int, refusal_objective: str, batch_size: int, device: str, dtype: str,
           template: str | None, thinking: bool, trust_remote_code: bool,
           quiet: bool) -> None:
    """Search edit parameters for MODEL and save the chosen trade-off as a recipe `apply --recipe` reads.

    Each trial picks a direction (any saved candidate, a blend of two neighbouring layers' candidates,
    optionally made orthogonal to the harmless mean) and per component a per-layer strength profile, and
    scores it with ablation hooks (no weights rewritten): first-token refusal log-odds on harmful and KL on
    harmless validation prompts, plus greedy refusal counts on harmful and borderline prompts for points on
    the front (--kl-objective and --refusal-objective score beyond the first token instead, at the cost of
    speed). Prints the front of refusals against KL; --max-kl or --max-refusals picks the point (default:
    fewest refusals, then fewest borderline refusals, then lowest KL).
    """
    from abliterate.measure.extract import split_prompts
    from abliterate.measure.loading import load_model
    from abliterate.measure.templates import load_template
    from abliterate.search.objectives import borderline_prompts
    from abliterate.search.study import SearchSettings, default_study_path, load_candidates, pick, save_choice, table
    from abliterate.search.study import search as run_search

    _, harmful_val = split_prompts(harmful, n_train=0, n_val=n_val, field=field, kind="harmful")
    _, harmless_val = split_prompts(harmless, n_train=0, n_val=n_val, field=field, kind="harmless")
    borderline = borderline_prompts(overrefusal, n_val, field=field)
    lm = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    cands = load_candidates(direction_path, lm)
    settings = SearchSettings(trials=trials, seed=seed, startup_trials=startup_trials, max_strength=max_strength,
                              batch_size=batch_size, max_new_tokens=max_new_tokens, start_from_selected=not from_random,
                              template=load_template(template), thinking=thinking, kl_objective=kl_objective,
                              kl_tokens=kl_tokens, refusal_objective=refusal_objective, time_budget=time_budget,
                              norm_preserve=norm_preserve)
    study = study_path or default_study_path(out)
    result = run_search(lm, cands, harmful_val, harmless_val, settings, study, study_name, quiet=quiet,
                        borderline=borderline)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    choice = pick(result.front, result.prompts, max_kl=max_kl, max_refusals=max_refusals)
    click.echo(table(result.front, result.prompts, choice, result.borderline))
    rate = f"{result.seconds / result.ran:.2f} s/trial" if result.ran else "no new trials"
    click.echo(f"{len(result.trials)} trials in the study ({result.ran} run now, {rate}); study: {study}")
    recipe, direction = save_choice(choice, cands, lm, out, prompts=result.prompts, study=study,
                                    study_name=study_name, borderline=result.borderline)
    click.echo(f"wrote {recipe} and {direction}; apply it with: abliterate apply MODEL --recipe {recipe} --out DIR")
