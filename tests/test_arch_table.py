"""The architecture table says what each family's code does, and docs/families.md's lists are what the tests cover.

Each family's block outputs are classified from behaviour, not from the table: in layer 0, one residual
writer's output y is doubled while the layer's other writers are held at their recorded outputs. If the
block adds its writers to the residual stream linearly, the layer's output moves by exactly c * y, where c
is the family's residual multiplier (1 for most, Granite's `residual_multiplier`); if it normalises the
writer's output first, the move is not a multiple of y. The table must agree on both counts.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from abliterate.arch.table import arch_for_config, supported_model_types
from abliterate.edit.plan import EditOptions, plan_edit
from abliterate.io.checkpoint import Checkpoint
from tests.docs import text
from tests.families import FAMILIES, FAMILY_NAMES, build_model, save_sharded
from tests.vl_families import VL_FAMILIES

ROOT = Path(__file__).resolve().parents[1]


def first(output):
    return output[0] if isinstance(output, tuple) else output


def replace_output(module: torch.nn.Module, value_of):
    def hook(_module, _inputs, output):
        new = value_of(first(output))
        return (new, *output[1:]) if isinstance(output, tuple) else new
    return module.register_forward_hook(hook)


def residual_response(model: torch.nn.Module, layer_path: str, writers: list[str], doubled: str):
    """(y, delta): the doubled writer's output and how much the layer's output moved."""
    modules = dict(model.named_modules())
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    recorded: dict[str, torch.Tensor] = {}
    hooks = [replace_output(modules[w], lambda y, w=w: recorded.setdefault(w, y.detach().clone()))
             for w in writers]
    hooks.append(replace_output(modules[layer_path], lambda o: recorded.setdefault("layer", o.detach().clone())))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    after: dict[str, torch.Tensor] = {}
    hooks = [replace_output(modules[w], (lambda y, w=w: 2 * y) if w == doubled else (lambda y, w=w: recorded[w]))
             for w in writers]
    hooks.append(replace_output(modules[layer_path], lambda o: after.setdefault("layer", o.detach().clone())))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    delta = (after["layer"] - recorded["layer"]).double()
    return recorded[doubled].double().reshape(delta.shape), delta  # an expert block's output is [tokens, d]


def classify(family) -> tuple[bool, set[float]]:
    """(normalises some writer's output, the multipliers of the writers added linearly) in layer 0."""
    model = build_model(family)
    # every layer's writers ("{L}") and, in a hybrid family, those named for layer 0 alone
    in_layer_0 = [h.replace("{L}", "0") for h in family.hooks if "{L}" in h or ".0." in h]
    layer_path = in_layer_0[0][: in_layer_0[0].index(".0.") + 2]
    writers = [h for h in in_layer_0 if h.startswith(layer_path + ".")]
    normalised, multipliers = False, set()
    for w in writers:
        y, delta = residual_response(model, layer_path, writers, w)
        c = (delta * y).sum() / (y * y).sum()
        if (delta - c * y).norm() <= 1e-5 * y.norm() and abs(c) > 1e-3:
            multipliers.add(round(c.item(), 4))
        else:
            normalised = True
    return normalised, multipliers


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_table_classifies_block_outputs_as_the_family_code_computes_them(name):
    family = FAMILIES[name]
    arch = arch_for_config({"model_type": name})
    normalised, multipliers = classify(family)
    assert arch.normalised_block_outputs == normalised
    if not normalised and family.multipliers is not None:  # writers scaled each by its own multiplier
        assert multipliers == family.multipliers
    elif not normalised:
        expected = family.config.get(arch.residual_multiplier, None) if arch.residual_multiplier else 1.0
        assert multipliers == {expected}, (multipliers, arch.residual_multiplier)


NORMALISING = [n for n in FAMILY_NAMES if arch_for_config({"model_type": n}).normalised_block_outputs]


@pytest.mark.parametrize("name", NORMALISING)
def test_families_that_normalise_block_outputs_carry_the_caveat(name, tmp_path):
    folder = save_sharded(build_model(FAMILIES[name]), tmp_path / name)
    notes = plan_edit(Checkpoint.open(folder), EditOptions()).notes
    assert any("normalises attention and MLP outputs" in n for n in notes), notes


def test_every_model_type_in_the_table_has_a_tiny_model_in_the_exactness_tests():
    assert set(supported_model_types()) == set(FAMILIES) | set(VL_FAMILIES)


def test_fused_expert_layouts_and_module_renames_are_family_data_for_the_moe_model_types_only():
    from abliterate.arch.table import arch_for_config
    from abliterate.lora.experts import expert_layout

    assert expert_layout("llama") == () and expert_layout("qwen2") == () and expert_layout("no_such_type") == ()
    qwen = expert_layout("qwen3_moe")
    assert [(p.memory, p.disk) for p in qwen] == [
        ("{p}.mlp.experts.gate_up_proj",
         ("{p}.mlp.experts.{e}.gate_proj.weight", "{p}.mlp.experts.{e}.up_proj.weight")),
        ("{p}.mlp.experts.down_proj", ("{p}.mlp.experts.{e}.down_proj.weight",))]
    assert expert_layout("olmoe") == expert_layout("deepseek_v3") == expert_layout("qwen2_moe") == qwen
    assert [p.transposed for p in expert_layout("gpt_oss")] == [True, False, True, False]
    assert expert_layout("phimoe")[0].disk[0] == "{p}.block_sparse_moe.experts.{e}.w1.weight"
    assert arch_for_config({"model_type": "mixtral"}).module_renames == ((".mlp.", ".block_sparse_moe."),)
    assert arch_for_config({"model_type": "llama"}).module_renames == ()


def test_model_type_tables_outside_the_architecture_table_name_only_its_model_types():
    recipes = {p.stem for p in (ROOT / "recipes").glob("*.yaml")} - {"default"}
    assert recipes <= set(supported_model_types())


def listed_after(section: str, label: str) -> list[str]:
    """The `names` of the paragraph starting with **label**, after its "(...):" introduction."""
    paragraph = section.split(f"**{label}**", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"`([a-z0-9_]+)`", paragraph.split("):", 1)[1])


def test_docs_family_lists_are_the_tested_model_types():
    section = text("families")
    assert sorted(listed_after(section, "Tested")) == sorted(FAMILIES)
    caveat = listed_after(section, "Normalised block outputs")
    assert sorted(caveat) == NORMALISING


def test_recipes_mention_a_shared_expert_only_for_families_that_have_one():
    for path in (ROOT / "recipes").glob("*.yaml"):
        if "shared expert" not in path.read_text() or path.stem == "default":
            continue
        names = [n for n, _ in build_model(FAMILIES[path.stem]).named_parameters()]
        assert any("shared" in n for n in names), path.name
