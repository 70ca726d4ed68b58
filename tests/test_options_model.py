"""One declaration per option (abliterate.options.declared): each declared option of a command family is in
the command's --help, names a recipe key the schema has (and takes its default), and survives being written
back as a command line and parsed again."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from abliterate.cli.demo import demo
from abliterate.cli.edit import apply, merge, verify
from abliterate.cli.evaluate import evaluate
from abliterate.cli.extract import extract
from abliterate.cli.jailbreak import jailbreak_evaluate, jailbreak_vectors
from abliterate.cli.probe import probe
from abliterate.cli.run import run
from abliterate.cli.search import search
from abliterate.cli.steer import steer_bake, steer_chat, steer_export_gguf, steer_sweep, steer_vectors
from abliterate.edit.weights import DIRECTION_NAME
from abliterate.jobs.run_options import RunOptions, regenerate_command
from abliterate.options.checkpoint_family import MergeOptions, VerifyOptions
from abliterate.options.command import given_command
from abliterate.options.declared import (
    SPEC,
    click_options,
    command_args,
    declared,
    from_params,
    option,
    option_values,
    recipe_default,
)
from abliterate.options.families import (
    ApplyOptions,
    DemoOptions,
    EvaluateOptions,
    ExtractOptions,
    ModelOptions,
    TaskOptions,
)
from abliterate.options.probe_family import JailbreakEvaluateOptions, JailbreakVectorsOptions, ProbeOptions
from abliterate.options.recipe import ExtractSettings, SelectionSettings
from abliterate.options.search_family import SearchOptions
from abliterate.options.steer_family import (
    SteerBakeOptions,
    SteerChatOptions,
    SteerExportOptions,
    SteerSweepOptions,
    SteerVectorsOptions,
)

FAMILIES = [(RunOptions, run), (ExtractOptions, extract), (ApplyOptions, apply), (EvaluateOptions, evaluate),
            (TaskOptions, evaluate), (ModelOptions, evaluate), (SearchOptions, search),
            (SteerVectorsOptions, steer_vectors), (SteerChatOptions, steer_chat), (SteerSweepOptions, steer_sweep),
            (SteerBakeOptions, steer_bake), (SteerExportOptions, steer_export_gguf), (ProbeOptions, probe),
            (JailbreakVectorsOptions, jailbreak_vectors), (JailbreakEvaluateOptions, jailbreak_evaluate),
            (MergeOptions, merge), (VerifyOptions, verify), (DemoOptions, demo)]
READ_NO_RECIPE = {TaskOptions, ModelOptions, SearchOptions, SteerVectorsOptions, SteerChatOptions, SteerSweepOptions,
                  SteerBakeOptions, SteerExportOptions, ProbeOptions, JailbreakVectorsOptions, JailbreakEvaluateOptions,
                  MergeOptions, VerifyOptions, DemoOptions}

# values a generic rule cannot guess: a valid choice, a layer range, a direction under the name the job records
SPECIAL = {"kind": "harmfulness", "layers": "2:5", "components": ("attn",), "targets": ("a\\.weight", "b.*"),
           "max_memory": 3 << 20, "requant": "Q4_0", "refusal_objective": "count", "kl_objective": "continuation",
           "coeffs": (-0.5, 1.5), "prompts": ("hi", "and bye"), "proposals": "categories",
           "sources": ("builtin:harmful", "hf:a/b:test")}


def changed(f: dataclasses.Field, cls: type) -> object:
    """A value of field `f` that differs from its default, as the command line can carry it."""
    if f.name in SPECIAL:
        return SPECIAL[f.name]
    if cls is RunOptions and f.name == "direction":
        return Path(DIRECTION_NAME)  # the job records --direction as the file uploaded beside the weights
    kind = str(f.type)
    default = None if f.default is dataclasses.MISSING else f.default
    if kind == "bool":
        return not default
    if kind.startswith("int"):
        return (default or 0) + 3
    if kind.startswith("float"):
        return (default or 0) + 0.25
    if kind.startswith("Path"):
        return Path(f"no-such-{f.name}.yaml")  # not on disk: recorded as it is, not by its name only
    return f"value-of-{f.name}"


def instance(cls: type, nested: bool = True) -> object:
    """`cls` with every recorded option changed (nested groups too)."""
    values = {}
    for f in fields(cls):
        if "abliterate.group" in f.metadata and nested:
            values[f.name] = instance(f.metadata["abliterate.group"])
        elif SPEC in f.metadata and (f.metadata[SPEC].record != "never" or f.default is dataclasses.MISSING):
            values[f.name] = changed(f, cls)
    return cls(**values)


def parsed(command: click.Command, cls: type, words: list[str]) -> object:
    with command.make_context(command.name, list(words)) as ctx:
        return from_params(cls, ctx.params)


@pytest.mark.parametrize(("cls", "command"), FAMILIES, ids=lambda x: getattr(x, "__name__", None))
def test_every_declared_option_is_in_the_commands_help(cls, command):
    text = CliRunner().invoke(command, ["--help"], terminal_width=200).output
    for _f, spec in declared(cls):
        for flag in spec.flags:
            for word in flag.split("/"):
                assert word in text, (cls.__name__, word)


@pytest.mark.parametrize(("cls", "command"), FAMILIES, ids=lambda x: getattr(x, "__name__", None))
def test_declared_recipe_keys_exist_and_options_take_the_recipes_defaults(cls, command):
    backed = [(f, spec) for f, spec in declared(cls) if spec.recipe]
    assert backed or cls in READ_NO_RECIPE
    for f, spec in backed:
        schema_default = recipe_default(spec.recipe)  # raises on a key the schema lacks
        assert f.default in (schema_default, None), (f.name, f.default, schema_default)
    with pytest.raises(ValueError, match=r"unknown recipe key 'extract\.n_trian'"):
        option("--n-trian", help="typo", recipe="extract.n_trian")


@pytest.mark.parametrize(("cls", "command"), FAMILIES, ids=lambda x: getattr(x, "__name__", None))
def test_every_recorded_option_round_trips_through_the_written_command_line(cls, command):
    options = instance(cls)
    words = command_args(options)
    if cls is RunOptions:
        words = [options.model, *words]
    back = parsed(command, cls, words)
    recorded = [f.name for f, spec in declared(cls) if spec.record != "never"]
    assert {k: option_values(back)[k] for k in recorded} == {k: option_values(options)[k] for k in recorded}


def test_the_jobs_rebuild_command_is_the_declared_options_written_back():
    options = instance(RunOptions)
    command = regenerate_command(options, "user/model")
    assert command.startswith("abliterate user/model ") and f"--direction {DIRECTION_NAME}" in command
    assert "--push" not in command and "--tasks" not in command and "--eval-harmful" not in command
    back = parsed(run, RunOptions, command.split()[1:])
    assert dataclasses.replace(back, model=options.model, tasks=options.tasks) == dataclasses.replace(
        options, out=None, push_to=None, evaluate=True, eval_harmful="builtin:harmful",
        eval_harmless="builtin:harmless", private=False, force=False, device="auto", overwrite=False, stream=False,
        quiet=False)


def test_search_options_default_to_the_studys_settings():
    from abliterate.search.study import SearchSettings

    assert SearchSettings(**SearchOptions(model="m").settings()) == SearchSettings()
    given = instance(SearchOptions)
    assert SearchSettings(**given.settings()).start_from_selected is False


def test_steering_commands_have_no_thinking_switch_and_a_bad_coefficient_list_is_one_clear_error():
    assert "--thinking" not in CliRunner().invoke(steer_chat, ["--help"]).output
    assert SteerChatOptions(model="m").model_options.thinking is False
    result = CliRunner().invoke(steer_sweep, ["m", "--vectors", "v", "--pairs", "p", "--coeffs", "1,x"])
    assert result.exit_code == 2 and "'1,x': write comma-separated numbers" in result.output


def test_extract_options_select_with_the_recipe_schemas_selection_settings():
    assert issubclass(ExtractSettings, SelectionSettings)
    o = instance(ExtractOptions)
    assert o.selection() == SelectionSettings(o.prune_layers, o.kl_threshold, o.induce_threshold, o.batch_size,
                                              o.screen_prompts, o.finalists, o.refusal_objective, o.kl_objective,
                                              o.max_new_tokens, o.kl_tokens)
    assert ExtractSettings(kl_threshold=0.3).selection() == SelectionSettings(kl_threshold=0.3)


def test_an_option_added_to_a_family_is_one_field():
    @dataclass(frozen=True)
    class Family:
        n_val: int = option("--n-val", recipe="extract.n_val", show_default=True, help="Validation prompts.")
        loud: bool = option("--loud", is_flag=True, help="Shout.")

    seen = {}

    @click.command()
    @click_options(Family)
    def cmd(**params):
        seen["options"] = from_params(Family, params)
        seen["command"] = given_command()

    result = CliRunner().invoke(cmd, ["--help"])
    assert "--n-val" in result.output and "[default: 32]" in result.output and "--loud" in result.output
    result = CliRunner().invoke(cmd, command_args(Family(n_val=7, loud=True)))
    assert result.exit_code == 0 and seen["options"] == Family(7, True)
    assert seen["command"] == "abliterate cmd --n-val 7 --loud"


def test_an_option_value_that_does_not_read_is_one_clear_error():
    result = CliRunner().invoke(apply, ["ckpt", "--out", "o", "--layers", "5:2"])
    assert result.exit_code == 2 and "selects no layer" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(apply, ["ckpt", "--out", "o", "--max-memory", "lots"])
    assert result.exit_code == 2 and "'lots' is not a size" in result.output


@pytest.mark.parametrize(("command", "args", "missing"), [
    (apply, ["ckpt"], "--out"), (extract, ["model"], "--out"), (search, ["model", "--out", "r.yaml"], "--direction"),
    (steer_bake, ["ckpt", "--vectors", "v", "--layer", "1", "--coeff", "1"], "--out"),
    (probe, ["model", "--direction", "d"], "--prompts"), (merge, ["base", "adapter"], "--out")])
def test_a_required_option_left_out_is_named_not_a_traceback(command, args, missing):
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 2 and f"Missing option '{missing}'" in result.output, result.output


def test_every_command_takes_its_options_from_a_declared_family():
    """No command keeps hand-written options: each of the CLI's commands has a family here, and each of its
    parameters is a declared option of that family or one of the shared wrappers' (placement, --arch)."""
    from abliterate.cli.main import cli

    def leaves(command):
        return [c for sub in command.commands.values() for c in leaves(sub)] if isinstance(command, click.Group) \
            else [command]

    families = {command: cls for cls, command in FAMILIES if cls not in (TaskOptions, ModelOptions)}
    wrappers = {"device_map", "max_memory", "offload_folder", "arch"}
    for command in leaves(cli):
        assert command in families, command.name
        names = {f.name for f, _ in declared(families[command])}
        assert {p.name for p in command.params} - names <= wrappers, command.name
