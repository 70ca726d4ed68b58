"""search: an Optuna study for a gentler edit (its options: options/search_family.SearchOptions)."""

from __future__ import annotations

import click

from abliterate.cli.common import arch_option, loaded_model, placement_options
from abliterate.options.declared import click_options, from_params
from abliterate.options.search_family import SearchOptions


@click.command()
@click_options(SearchOptions)
@placement_options
@arch_option
def search(**params) -> None:
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
    from abliterate.measure.templates import load_template
    from abliterate.search.borderline import borderline_prompts
    from abliterate.search.front import pick, save_choice, table
    from abliterate.search.space import load_candidates
    from abliterate.search.study import SearchSettings, default_study_path
    from abliterate.search.study import search as run_search

    opts = from_params(SearchOptions, params)
    model_opts = opts.model_options
    _, harmful_val = split_prompts(opts.harmful, n_train=0, n_val=opts.n_val, field=opts.field, kind="harmful")
    _, harmless_val = split_prompts(opts.harmless, n_train=0, n_val=opts.n_val, field=opts.field, kind="harmless")
    borderline = borderline_prompts(opts.overrefusal, opts.n_val, field=opts.field)
    lm = loaded_model(opts.model, model_opts)
    cands = load_candidates(opts.direction_path, lm)
    settings = SearchSettings(**opts.settings(), template=load_template(model_opts.template))
    study = opts.study_path or default_study_path(opts.out)
    result = run_search(lm, cands, harmful_val, harmless_val, settings, study, opts.study_name, quiet=opts.quiet,
                        borderline=borderline)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    choice = pick(result.front, result.prompts, max_kl=opts.max_kl, max_refusals=opts.max_refusals)
    click.echo(table(result.front, result.prompts, choice, result.borderline))
    rate = f"{result.seconds / result.ran:.2f} s/trial" if result.ran else "no new trials"
    click.echo(f"{len(result.trials)} trials in the study ({result.ran} run now, {rate}); study: {study}")
    recipe, direction = save_choice(choice, cands, lm, opts.out, prompts=result.prompts, study=study,
                                    study_name=opts.study_name, borderline=result.borderline)
    click.echo(f"wrote {recipe} and {direction}; apply it with: abliterate apply MODEL --recipe {recipe} --out DIR")
