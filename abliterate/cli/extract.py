"""extract: find the refusal direction (or choose again among saved candidates with --reselect)."""

from __future__ import annotations

from pathlib import Path

import click

from abliterate.cli.common import arch_option, loaded_model, placement_options, plotted
from abliterate.options.command import recorded_command
from abliterate.options.declared import click_options, from_params
from abliterate.options.families import ExtractOptions, ModelOptions


@click.command()
@click_options(ExtractOptions)
@placement_options
@arch_option
def extract(**params) -> None:
    """Find MODEL's refusal direction and save it with all candidates and their scores.

    Difference of mean residual activations between harmful and harmless instructions at every
    layer and post-instruction position. Every candidate is screened by the refusal log-odds with
    it ablated on a few harmful prompts; the best quarter is scored on all of them, and the best
    --finalists also by the refusal log-odds with it added (must rise) and the first-token KL on
    harmless prompts (must stay small). The lowest ablation score passing both filters wins
    (--refusal-objective count: the fewest refused replies; --kl-objective continuation: the KL over
    the first reply tokens); when none passes, a filter is relaxed and the output says which.
    Candidates and scores are saved before the choice (OUT.candidates.safetensors while scoring), so
    --reselect can choose again.
    """
    from abliterate.errors import AbliterateError
    from abliterate.io.direction_file import check_output_file
    from abliterate.measure.extract import reselect as run_reselect
    from abliterate.measure.extract import save_extraction

    opts = from_params(ExtractOptions, params)
    model_opts = opts.model_options
    check_output_file(opts.out)
    if (opts.model is None) == (opts.reselect is None):
        raise AbliterateError("give MODEL to extract, or --reselect FILE to choose again among saved candidates "
                              "(not both)")
    command = recorded_command()
    if opts.directions > 1 and (opts.reselect or opts.kind == "harmfulness"):
        raise AbliterateError("--directions needs MODEL and --kind refusal: the extra directions are measured on the "
                              "model at the chosen layer (--reselect loads no model)")
    if opts.proposals == "categories" and opts.directions < 2:
        raise AbliterateError("--proposals categories chooses the directions beside the chosen one: add --directions K "
                              "(K >= 2)")
    if opts.kind == "harmfulness":
        return _harmfulness(opts, model_opts, command)
    result = run_reselect(opts.reselect, opts.selection()) if opts.reselect else _extract(opts, model_opts, command)
    save_extraction(result, opts.out, {"command": command})
    if not opts.reselect:
        from abliterate.measure.extract import pending_path

        pending_path(opts.out).unlink(missing_ok=True)
    report(result, opts.out)
    _plot(result, opts.plot_path)


def _plot(result, path: Path | None) -> None:
    """--plot: every candidate's score as a layer x position heat map, the choice marked."""
    from abliterate.measure.score_plot import draw_scores

    title = f"{result.model}: {len(result.scores)} candidates" if result.model else ""
    plotted(lambda p: draw_scores(result.scores, (result.best.layer, result.best.position), p, title), path)


def _extract(opts: ExtractOptions, model_opts: ModelOptions, command: str):
    from abliterate.jobs.extraction import extraction, proposal_categories, split_sets
    from abliterate.measure.extract import pending_path
    from abliterate.measure.templates import load_template

    sets = split_sets(opts.harmful, opts.harmless, n_train=opts.n_train, n_val=opts.n_val, field=opts.field)
    categories = proposal_categories(opts.harmful, sets, opts.field, opts.proposals,
                                     opts.directions)  # before the model loads
    lm = loaded_model(opts.model, model_opts)
    return extraction(lm, sets, opts.selection(), template=load_template(model_opts.template),
                      thinking=model_opts.thinking,
                      positions=opts.positions, directions=opts.directions, categories=categories, quiet=opts.quiet,
                      pending=pending_path(opts.out), metadata={"command": command})


def report(result, out: Path) -> None:
    """The best fully scored candidates (those passing the filters, else all), the choice, any relaxed filter."""
    full = [s for s in result.scores if s.full]
    shown = [s for s in full if s.rejected is None] or full
    if result.baseline_refusal == result.baseline_refusal:  # not NaN
        click.echo(f"refusal score (log-odds) on harmful validation prompts: {result.baseline_refusal:.2f} before")
    replies, continuation = (any(getattr(s, a) is not None for s in shown) for a in ("refusals", "kl_continuation"))
    click.echo(f"{'layer':>5} {'pos':>4} {'ablated':>8} {'added':>8} {'KL':>8}" + (f" {'refused':>9}" * replies)
               + (f" {'KL reply':>9}" * continuation))
    for s in sorted(shown, key=lambda s: (s.refusals or 0, s.refusal_ablated))[:10]:
        mark = " <- chosen" if (s.layer, s.position) == (result.best.layer, result.best.position) else ""
        extra = (f" {_count(s):>9}" if replies else "") + (f" {_number(s.kl_continuation):>9}" if continuation else "")
        click.echo(f"{s.layer:>5} {s.position:>4} {s.refusal_ablated:>8.2f} {s.refusal_added:>8.2f} {s.kl:>8.4f}"
                   f"{extra}{mark}")
    if result.relaxed:
        click.echo(f"note: {result.relaxed}")
    rejected = sum(s.rejected is not None for s in full)
    more = "" if result.more is None else f" ({len(result.more) + 1} directions: the chosen one first" + (
        f", then categories {', '.join(result.more_categories)})" if result.more_categories else ")")
    click.echo(f"{len(result.scores)} candidates screened, {len(full)} scored fully, {rejected} of those rejected by "
               f"the filters; wrote {out}{more}")


def _count(s) -> str:
    return "-" if s.refusals is None else f"{s.refusals}/{s.replies}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _harmfulness(opts: ExtractOptions, model_opts: ModelOptions, command: str) -> None:
    """--kind harmfulness: the per-layer difference at the instruction's last token, and its table."""
    from abliterate.errors import AbliterateError
    from abliterate.measure.extract import split_prompts
    from abliterate.measure.harmfulness import harmfulness_direction, save_harmfulness
    from abliterate.measure.templates import load_template

    if opts.reselect is not None:
        raise AbliterateError("--reselect chooses among refusal candidates; --kind harmfulness has none to choose")
    if opts.plot_path is not None:
        raise AbliterateError("--plot draws the refusal candidates' scores; --kind harmfulness has no candidates")
    harmful_train, _ = split_prompts(opts.harmful, n_train=opts.n_train, n_val=0, field=opts.field, kind="harmful")
    harmless_train, _ = split_prompts(opts.harmless, n_train=opts.n_train, n_val=0, field=opts.field, kind="harmless")
    lm = loaded_model(opts.model, model_opts)
    kwargs = {} if model_opts.thinking else {"enable_thinking": False}
    result = harmfulness_direction(lm, harmful_train, harmless_train, template=load_template(model_opts.template),
                                   batch_size=opts.batch_size, quiet=opts.quiet, **kwargs)
    save_harmfulness(result, opts.out, lm, {"command": command})
    click.echo(f"{'resid':>5} {'|mean diff|':>12} {'cos to refusal':>15}")
    for i, (norm, cos) in enumerate(zip(result.direction.norm(dim=-1).tolist(), result.cosine.tolist(), strict=True)):
        click.echo(f"{i:>5} {norm:>12.4g} {cos:>15.3f}")
    click.echo(f"wrote {opts.out}: the harmfulness direction at every layer ({len(harmful_train)} harmful, "
               f"{len(harmless_train)} harmless prompts)")
