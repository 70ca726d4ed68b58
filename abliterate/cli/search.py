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
    from abliterate.search.objectives import borderline_prompts
    from abliterate.search.study import SearchSettings, default_study_path, load_candidates, pick, save_choice, table
    from abliterate.search.study import search as run_search

    o = from_params(SearchOptions, params)
    m = o.model_options
    _, harmful_val = split_prompts(o.harmful, n_train=0, n_val=o.n_val, field=o.field, kind="harmful")
    _, harmless_val = split_prompts(o.harmless, n_train=0, n_val=o.n_val, field=o.field, kind="harmless")
    borderline = borderline_prompts(o.overrefusal, o.n_val, field=o.field)
    lm = loaded_model(o.model, m)
    cands = load_candidates(o.direction_path, lm)
    settings = SearchSettings(**o.settings(), template=load_template(m.template))
    study = o.study_path or default_study_path(o.out)
    result = run_search(lm, cands, harmful_val, harmless_val, settings, study, o.study_name, quiet=o.quiet,
                        borderline=borderline)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    choice = pick(result.front, result.prompts, max_kl=o.max_kl, max_refusals=o.max_refusals)
    click.echo(table(result.front, result.prompts, choice, result.borderline))
    rate = f"{result.seconds / result.ran:.2f} s/trial" if result.ran else "no new trials"
    click.echo(f"{len(result.trials)} trials in the study ({result.ran} run now, {rate}); study: {study}")
    recipe, direction = save_choice(choice, cands, lm, o.out, prompts=result.prompts, study=study,
                                    study_name=o.study_name, borderline=result.borderline)
    click.echo(f"wrote {recipe} and {direction}; apply it with: abliterate apply MODEL --recipe {recipe} --out DIR")
