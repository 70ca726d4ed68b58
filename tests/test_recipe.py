"""Recipes: one per family, layered default -> family -> user file, every key checked."""

from __future__ import annotations

import pytest

from abliterate.arch.table import supported_model_types
from abliterate.errors import AbliterateError
from abliterate.options.recipe import Recipe, load_recipe, recipe_dir, save_recipe


def test_every_family_recipe_names_a_supported_model_type_and_loads():
    files = sorted(p.stem for p in recipe_dir().glob("*.yaml") if p.stem != "default")
    assert len(files) >= 12
    for model_type in files:
        assert model_type in supported_model_types(), model_type
        recipe = load_recipe(model_type)
        assert recipe.name == model_type and recipe.notes


def test_family_overrides_default_and_user_file_overrides_family(tmp_path):
    assert load_recipe("mixtral").extract.batch_size == 8
    assert load_recipe("llama").extract.batch_size == Recipe().extract.batch_size
    user = tmp_path / "mine.yaml"
    user.write_text("apply:\n  scale: 0.75\n  layers: '4:12'\n  layer_scales: {attn: [1, 0.5]}\nextract:\n  n_val: 8\n")
    recipe = load_recipe("mixtral", user)
    assert recipe.apply.scale == 0.75 and recipe.apply.layers == "4:12" and recipe.extract.n_val == 8
    assert recipe.apply.layer_scales == {"attn": (1.0, 0.5)}
    assert recipe.extract.batch_size == 8  # the family's value survives


def test_unknown_model_type_uses_the_default():
    assert load_recipe("something_new") == load_recipe(None)


@pytest.mark.parametrize("text,message", [
    ("extract:\n  n_trian: 3\n", "unknown extract key"),
    ("apply:\n  scale: lots\n", "apply.scale should be float"),
    ("apply:\n  components: [embed, lm_head]\n", "subset of"),
    ("surprise: 1\n", "unknown key"),
    ("apply: [1, 2]\n", "must be a mapping"),
    ("apply:\n  scale: [\n", "not valid YAML"),
])
def test_bad_recipe_files_are_one_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(AbliterateError, match=message):
        load_recipe("llama", path)


def test_saved_recipe_loads_back_identically(tmp_path):
    recipe = load_recipe("qwen2_moe")
    save_recipe(recipe, tmp_path / "r.yaml")
    assert load_recipe(None, tmp_path / "r.yaml") == recipe
