"""`abliterate MODEL`: the whole job, from a Hub id or folder to an edited checkpoint or adapter.

fetch (safetensors only) -> recipe for the family -> extract and select the direction (or take
--direction) -> edit the weights or export the adapter -> quick evaluation -> model card and
checksums -> push. Every stage is the library function the subcommands call; this module only
chains them. The output is staged under a temporary name and renamed when complete.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from abliterate.errors import AbliterateError
from abliterate.jobs.extraction import extract_with, job_prompts, load_job_model, with_command_line
from abliterate.jobs.job_search import by_default, searches
from abliterate.jobs.run_options import (
    RunOptions,
    default_out,
    kept_path,
    public_model,
    regenerate_command,
    study_path,
)
from abliterate.jobs.stages import StageRecord, Stages
from abliterate.options.command import command_line
from abliterate.options.declared import command_args

if TYPE_CHECKING:
    from abliterate.publish.card import EditSummary

__all__ = ["RunOptions", "RunResult", "default_out", "extract_with", "kept_path", "public_model",
           "regenerate_command", "run"]


@dataclass(frozen=True)
class RunResult:
    out: Path
    url: str | None
    direction_layer: str | None
    refusal_rate: float | None
    stages: tuple[StageRecord, ...] = ()  # wall time and peak memory of each stage


def run(options: RunOptions) -> RunResult:
    from abliterate.edit.weights import DIRECTION_NAME
    from abliterate.io import hub
    from abliterate.io.checkpoint import Checkpoint
    from abliterate.io.direction_file import load_direction
    from abliterate.options.recipe import load_recipe
    from abliterate.publish.card import CardInfo, DirectionSummary, EvalSummary, base_license, write_card

    if options.one_shot and options.search is not None:
        raise AbliterateError("--one-shot applies the extraction's choice without searching: drop --search or "
                              "--one-shot")
    if not searches(options) and any(v is not None for v in (options.max_kl, options.max_refusals,
                                                              options.time_budget)):
        raise AbliterateError("--max-kl, --max-refusals and --time-budget choose among searched points: drop "
                              "--one-shot / --direction, or add --search N")
    if options.search is not None and (options.stream or options.search < 1):
        raise AbliterateError("--search needs at least 1 trial and the whole model (not --stream): the trials run "
                              "on the loaded model")
    if options.directions is not None and (options.direction or options.stream):
        raise AbliterateError("--directions sets how many directions extraction proposes; with --direction (or "
                              "--stream) nothing is extracted: drop one of them")
    if options.tasks.tasks and (not options.evaluate or options.stream):
        raise AbliterateError("--tasks runs in the evaluation; drop --no-eval / --stream to use it")
    from abliterate.evaluate.tasks import task_settings
    from abliterate.measure.templates import load_template

    tasks = task_settings(options.tasks, batch_size=8, thinking=False,  # checked before anything loads
                          template=load_template(options.template))
    if options.stream:
        from abliterate.jobs.hub_stream import run_stream

        return RunResult(options.out or default_out(options.model, False), run_stream(options), None, None)
    say = (lambda _msg: None) if options.quiet else (lambda msg: click.echo(msg, err=True))
    out = options.out or default_out(options.model, options.adapter)
    if out.exists() and not options.overwrite:
        raise AbliterateError(f"{out} already exists; pass --overwrite or choose another --out")
    if options.push:  # fail before hours of work, not after
        from abliterate.publish.push import check_target, target_repo

        repo_id = target_repo(options.repo_id, options.model)
        check_target(repo_id, force=options.force)

    stages = Stages()
    source = Path(options.model) if hub.is_local(options.model) else None
    if source is None:
        say(f"fetching {options.model} (safetensors, config, tokenizer) ...")
        with stages.stage("fetch"):
            source = hub.fetch(options.model, revision=options.revision, trust_remote_code=options.trust_remote_code)
    ckpt = Checkpoint.open(source)
    recipe = with_command_line(options, load_recipe(ckpt.config.get("model_type"), options.recipe))
    say(f"recipe: {recipe.name}")
    typed = options  # what the card's rebuild command records: the default search is what `abliterate MODEL` does
    if options.search is None and searches(options) and not recipe.apply.direction:
        options = by_default(options)  # the short default search (jobs/job_search.py), unless --one-shot
        say(f"searching {options.search} trials (at most {options.time_budget / 60:g} minutes of trials) for the "
            "lowest KL with few refusals; --one-shot applies the extraction's choice instead")

    study = study_path(options)
    if options.search and study.is_file() and not (options.direction or recipe.apply.direction):
        raise AbliterateError(f"{study} holds the search of an earlier run of this job: rerun with --direction "
                              f"{kept_path(options, 'direction')} --search {options.search} (the extraction it "
                              "searched) to resume it, or delete it to search anew")
    work = out.with_name(out.name + ".abliterate-partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    loaded: list = []  # the job's one model, loaded at its first use and shared by every stage

    def model():
        if not loaded:
            say(f"loading {options.model} ({options.dtype or recipe.extract.dtype} dtype) ...")
            with stages.stage("load"):
                loaded.append(load_job_model(options, recipe, source))
        return loaded[0]

    try:
        searched = None
        if options.search:
            from abliterate.jobs.job_search import search_step

            prompts = job_prompts(options, recipe)  # bad prompt files fail before the model loads
            lm = model()
            with stages.stage("search"):  # extraction included, unless --direction
                searched = search_step(options, recipe, lm, prompts, work, study, say)
            recipe = searched.recipe
        direction_path = (searched.direction if searched else options.direction) or (
            Path(recipe.apply.direction) if recipe.apply.direction else None)
        if direction_path is None:
            direction_path = work / "direction.safetensors"
            prompts = job_prompts(options, recipe)
            lm = model()
            with stages.stage("extract"):
                extract_with(lm, options, recipe, prompts, direction_path, say)
        direction = load_direction(direction_path, hidden_size=ckpt.hidden_size, num_layers=ckpt.num_layers)
        if recipe.apply.biprojected:
            from abliterate.io.direction_file import biproject

            direction = biproject(direction)
        staged = work / "output"
        with stages.stage("adapter" if options.adapter else "edit"):
            edit = _edit(options, recipe, ckpt, direction, staged)
        for note in edit.notes:
            say(f"note: {note}")
        if searched:
            from abliterate.jobs.job_search import write_recipe_copy

            write_recipe_copy(searched, staged, DIRECTION_NAME)
        evaluation = None
        if options.evaluate:
            lm = None  # evaluation is the model's last use: it takes the only reference (see _evaluate)
            with stages.stage("evaluate"):
                evaluation = _evaluate(options, recipe, lambda: (model(), loaded.pop())[1], direction, staged, say,
                                       tasks)
        card_text = (source / "README.md").read_text(errors="replace") if (source / "README.md").is_file() else None
        base_model = public_model(options.model if source != Path(options.model)
                                  else str(ckpt.config.get("_name_or_path") or options.model))
        write_card(staged, CardInfo(
            base_model=base_model, adapter=options.adapter, license=base_license(card_text),
            direction=DirectionSummary.of(direction.metadata, base_model),
            edit=edit, evaluation=EvalSummary.of(evaluation) if evaluation else None,
            regenerate=regenerate_command(typed, base_model),
            recipe_name=recipe.name, direction_file=DIRECTION_NAME, search=searched.card if searched else None,
            stages=stages.card_rows()))
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
        study.unlink(missing_ok=True)  # the front is in the card, the choice in the recipe beside the weights
    except BaseException as e:
        kept = _keep(options, work, study if options.search else None)
        if kept and isinstance(e, AbliterateError):
            raise AbliterateError(f"{e}; {kept}") from None
        if kept:
            click.echo(kept, err=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    url = None
    if options.push:
        from abliterate.publish.push import push

        say(f"pushing {out} to {repo_id} ...")
        with stages.stage("push"):
            url = push(out, repo_id, private=options.private, force=options.force)
    say(stages.table())
    return RunResult(out, url, direction.metadata.get("layer"), evaluation.refusal_rate if evaluation else None,
                     tuple(stages.records))


def _keep(options: RunOptions, work: Path, study: Path | None) -> str:
    """After a failure: the extraction moved beside the output (never lost to a later failure), and one line
    saying where it and the search's study (already there) are and what rerun goes on from them; "" when this
    run computed nothing a rerun could reuse."""
    extracted = (work / "direction.safetensors").is_file()
    direction = kept_path(options, "direction") if extracted else options.direction
    if extracted:
        (work / "direction.safetensors").replace(direction)
    searched = study is not None and study.is_file()
    if direction is None or not (extracted or searched):
        return ""
    if not searched:
        return (f"the extraction (every candidate and its scores) is kept in {direction}: rerun with --direction "
                f"{direction} to skip it")
    what = f"the extraction is kept in {direction} and the search's" if extracted else "the search's"
    return (f"{what} finished trials and their front in {study}: rerun with --direction {direction} --search "
            f"{options.search} to resume the search from them")


def _edit(options: RunOptions, recipe, ckpt, direction, staged: Path) -> EditSummary:
    """Write the edited weights or the adapter to `staged`; return what the card says was done."""
    from abliterate.edit.plan import edit_options, plan_edit
    from abliterate.edit.weights import untie_note
    from abliterate.publish.card import EditSummary

    a = recipe.apply
    plan = plan_edit(ckpt, edit_options(recipe.apply))
    if options.adapter:
        from abliterate.lora.export import AdapterOptions, export_adapter

        notes = tuple(export_adapter(ckpt, plan, direction, staged, AdapterOptions(
            base_model=options.model if not Path(options.model).exists() else None, quiet=options.quiet)).notes)
    else:
        from abliterate.edit.weights import apply_edit

        notes = apply_edit(ckpt, plan, direction, staged, quiet=options.quiet).notes
    notes = tuple(n for n in notes if n not in untie_note(plan)) + (
        ("per-layer scales from the recipe",) if a.layer_scales else ())
    return EditSummary(a.scale, a.layers, tuple(a.components), len(plan.edits),
                       plan.untie[0] if plan.untie and not options.adapter else None, notes, plan.norm_preserve)


def _evaluate(options: RunOptions, recipe, take_model, direction, staged: Path, say, tasks):
    """Evaluate the output against the original on the job's loaded model (`take_model()` hands over the only
    reference): the edit runs as hooks on it (the same model serves as the baseline), unless hooks cannot compute
    it; then the model is measured as the baseline and released before the output loads."""
    from abliterate.edit.plan import edit_options
    from abliterate.evaluate.evaluation import EvalSettings, evaluate
    from abliterate.evaluate.in_memory import edited_view, why_not_in_memory
    from abliterate.measure.templates import load_template
    from abliterate.options.families import EvaluateOptions, ModelOptions

    e = recipe.evaluate
    settings = EvalSettings(limit=e.limit or None, max_new_tokens=e.max_new_tokens, kl_tokens=e.kl_tokens,
                            batch_size=e.batch_size, harmful=options.eval_harmful, harmless=options.eval_harmless,
                            template=load_template(options.template))
    edit = edit_options(recipe.apply)
    lm = take_model()
    edited = edited_view(lm, direction, edit, f"{options.model} + adapter" if options.adapter else str(staged))
    baseline = lm
    if edited is None:
        say(f"note: the output is loaded for evaluation ({why_not_in_memory(lm, edit)})")
        source, held = Path(lm.name), [lm]
        del lm, baseline  # evaluate measures the baseline first and releases it: never two models at once
        baseline, edited = held.pop, lambda: _load_output(options, source, staged)
    # the command a card's reader runs to measure this: an adapter on its base model, as `evaluate --adapter` does
    # (OUTPUT alone is no model); the recipe's settings; local files by their names only
    measured = EvaluateOptions(
        model=public_model(options.model) if options.adapter else "OUTPUT",
        adapter=Path("OUTPUT") if options.adapter else None, baseline=public_model(options.model),
        harmful=options.eval_harmful, harmless=options.eval_harmless, limit=e.limit,
        max_new_tokens=e.max_new_tokens, kl_tokens=e.kl_tokens, tasks=options.tasks,
        model_options=ModelOptions(template=options.template))
    args = ["evaluate", *command_args(measured)]
    tasks = replace(tasks, batch_size=e.batch_size) if tasks else None
    report = evaluate(edited, baseline, settings, quiet=options.quiet, command=command_line(args), tasks=tasks)
    say(report.table())
    return report


def _load_output(options: RunOptions, source: Path, staged: Path):
    """The written output as a model: the edited folder, or the base model with the adapter."""
    from abliterate.measure.loading import LoadedModel, load_model

    load = lambda path: load_model(path, dtype=options.dtype or "auto", device=options.device,  # noqa: E731
                                   trust_remote_code=options.trust_remote_code)
    if not options.adapter:
        return load(staged)
    from peft import PeftModel

    base = load(source)
    return LoadedModel(PeftModel.from_pretrained(base.model, str(staged)).eval(), base.tokenizer, base.arch,
                       f"{options.model} + adapter")
