"""The architecture table is data: shipped family files load against a schema, a mistake in a user's file is
one clear line, and `--arch FILE` adds a family the table lacks (exactly, as the table's own families are)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from abliterate.arch.table import shipped_archs, supported_model_types
from abliterate.cli.main import cli
from abliterate.io.direction_file import save_direction
from tests.families import (
    EFFECT_FLOOR,
    IDS,
    LLAMA_HOOKS,
    LLAMA_LIKE,
    LOGIT_TOLERANCE,
    Family,
    ablation_hooks,
    build_model,
    hook_paths,
    save_sharded,
    written_direction,
)
from tests.test_apply import run_cli

ROOT = Path(__file__).resolve().parents[1]
# A family transformers builds and the shipped table lacks: the subject of --arch.
NEW = Family("cwm", LLAMA_LIKE, hooks=LLAMA_HOOKS)  # Code World Model: Llama-like, no chat checkpoint
NEW_FAMILY = """\
    name: cwm
    model_types: [cwm]
    writers:
      - {tensor: model.embed_tokens.weight, kind: embedding}
      - {tensor: "model.layers.{layer}.self_attn.o_proj", kind: linear, component: attn}
      - {tensor: "model.layers.{layer}.mlp.down_proj", kind: linear, component: mlp}
    hooks:
      embed: [model.embed_tokens]
      attn: ["model.layers.{layer}.self_attn.o_proj"]
      mlp: ["model.layers.{layer}.mlp"]
"""


@pytest.fixture(scope="module")
def new_family(tmp_path_factory) -> tuple[Path, Path, torch.Tensor]:
    root = tmp_path_factory.mktemp("arch")
    built = build_model(NEW)
    r = written_direction(built)
    model = save_sharded(built, root / "model")
    save_direction(root / "dir.safetensors", r, {"model": "tiny", "layer": 1, "position": -1})
    (root / "cwm.yaml").write_text(textwrap.dedent(NEW_FAMILY))
    return root, model, r / r.norm()


def test_shipped_family_files_each_own_their_model_types_and_ship_as_package_data():
    files = sorted(p.name for p in (ROOT / "abliterate" / "arch" / "families").glob("*.yaml"))
    assert len(files) == len(shipped_archs())
    types = [mt for arch in shipped_archs() for mt in arch.model_types]
    assert len(types) == len(set(types)) == len(supported_model_types())
    assert '"arch/families/*.yaml"' in (ROOT / "pyproject.toml").read_text()


def test_arch_file_adds_a_family_the_table_lacks_and_its_edit_is_exact(new_family):
    root, model, r = new_family
    code, out = run_cli("apply", str(model), "--direction", str(root / "dir.safetensors"), "--out",
                        str(root / "edited"), "--arch", str(root / "cwm.yaml"))
    assert code == 0 and "is in no family file" not in out, out  # the file is used, nothing is discovered
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    hooks = ablation_hooks(base, hook_paths(NEW, 2), r)
    with torch.no_grad():
        expected = base(IDS).logits
        for h in hooks:
            h.remove()
        unedited = base(IDS).logits
        got = AutoModelForCausalLM.from_pretrained(root / "edited", dtype=torch.float32).eval()(IDS).logits
    assert (expected - unedited).abs().max() >= EFFECT_FLOOR
    assert (got - expected).abs().max() <= LOGIT_TOLERANCE
    code, out = run_cli("verify", str(model), str(root / "edited"), "--arch", str(root / "cwm.yaml"))
    assert code == 0 and "5 edited" in out, out


def test_arch_file_replaces_the_table_entry_of_a_listed_model_type(new_family, tmp_path):
    """A family file for llama naming only the attention writers edits only those."""
    root = new_family[0]
    llama = save_sharded(build_model(Family("llama", LLAMA_LIKE)), tmp_path / "llama")
    (tmp_path / "attn.yaml").write_text(textwrap.dedent("""\
        name: llama, attention only
        model_types: [llama]
        writers: [{tensor: "model.layers.{layer}.self_attn.o_proj", kind: linear, component: attn}]
        hooks: {attn: ["model.layers.{layer}.self_attn.o_proj"]}
    """))
    code, out = run_cli("apply", str(llama), "--direction", str(root / "dir.safetensors"), "--out",
                        str(tmp_path / "e"), "--arch", str(tmp_path / "attn.yaml"), "-q")
    assert code == 0, out
    code, out = run_cli("verify", str(llama), str(tmp_path / "e"))
    assert code == 0 and "2 edited (2 at scale 1)" in out, out


_MOE = 'name: x\nmodel_types: [cwm]\nwriters: [{tensor: "a.{layer}.b", kind: linear, component: mlp}]\nhooks: {}\n'
BAD_FILES = {
    "unknown key": ("name: x\nmodel_types: [cwm]\nwriters: []\nhooks: {}\ncolour: red\n", "unknown key"),
    "no writers": ("name: x\nmodel_types: [cwm]\nwriters: []\nhooks: {}\n", "writers must be"),
    "bad kind": ('name: x\nmodel_types: [cwm]\nwriters: [{tensor: a, kind: dense}]\nhooks: {}\n', "kind 'dense'"),
    "bad component": ('name: x\nmodel_types: [cwm]\nwriters: [{tensor: "a.{layer}.b", kind: linear, '
                      'component: ffn}]\nhooks: {}\n', "component 'ffn'"),
    "layer missing": ('name: x\nmodel_types: [cwm]\nwriters: [{tensor: a.b, kind: linear, component: mlp}]\n'
                      'hooks: {}\n', "{layer}"),
    "bad placeholder": ('name: x\nmodel_types: [cwm]\nwriters: [{tensor: "a.{layer}.{e}", kind: linear, '
                        'component: mlp}]\nhooks: {}\n', "not a placeholder"),
    "tensor axis": ('name: x\nmodel_types: [cwm]\nwriters: [{tensor: "a.{layer}", kind: tensor, '
                    'component: mlp}]\nhooks: {}\n', "hidden_axis"),
    "expert types": (_MOE + "fused_experts: {model_types: [llama], params: [{memory: '{p}.m', disk: '{p}.d'}]}\n",
                     "the file's model_types"),
    "expert placeholder": (_MOE + "fused_experts: {params: [{memory: '{p}.m', disk: '{p}.{n}.d'}]}\n",
                           "the only other placeholder is {e}"),
    "expert index": (_MOE + "fused_experts: {params: [{memory: '{p}.m', disk: ['{p}.{e}.a', '{p}.b']}]}\n",
                     "{e} belongs in every disk name"),
    "renames": (_MOE + "module_renames: [{memory: .mlp.}]\n", "module_renames is a list of {memory, disk}"),
    "multiplier": (_MOE + "residual_multiplier: mlp.multipliers\n", "a config key, or key[i]"),
    "hybrid flag": (_MOE + "hybrid: sometimes\n", "hybrid must be true or false"),
    "peft_refuses": (_MOE + "peft_refuses: out_proj\n", "peft_refuses must be a list of names"),
    "not yaml": ("name: [x\n", "not valid YAML"),
    "not a mapping": ("- a\n- b\n", "a family file is a mapping"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_wrong_family_file_is_one_line_naming_the_file_and_the_fix(new_family, tmp_path, case):
    root, model, _ = new_family
    text, expected = BAD_FILES[case]
    (tmp_path / "bad.yaml").write_text(text)
    code, out = run_cli("apply", str(model), "--direction", str(root / "dir.safetensors"), "--out",
                        str(tmp_path / "e"), "--arch", str(tmp_path / "bad.yaml"), "-q")
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "bad.yaml" in lines[0], out
    assert expected in lines[0]
    assert not (tmp_path / "e").exists()


def test_model_running_commands_use_the_arch_file(refusing_model, tmp_path):
    """extract loads the model with the family file's modules: a path the model lacks is named in one line."""
    (tmp_path / "wrong.yaml").write_text(textwrap.dedent("""\
        name: llama with a wrong layer list
        model_types: [llama]
        decoder_layers: model.blocks
        writers: [{tensor: model.embed_tokens.weight, kind: embedding}]
        hooks: {embed: [model.embed_tokens]}
    """))
    code, out = run_cli("extract", str(refusing_model), "--out", str(tmp_path / "d.safetensors"), "--arch",
                        str(tmp_path / "wrong.yaml"), "--device", "cpu")
    lines = out.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: ") and "model.blocks" in lines[-1], out


@pytest.mark.parametrize("command", [("apply",), ("verify",), ("merge",), ("run",), ("extract",), ("evaluate",),
                                     ("search",), ("steer", "vectors"), ("steer", "chat"), ("steer", "sweep"),
                                     ("steer", "bake")])
def test_every_command_that_needs_the_table_takes_arch(command):
    from click.testing import CliRunner

    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0 and "--arch FILE" in result.output
