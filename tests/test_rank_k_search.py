"""`extract --directions K` proposes K directions (the choice first) and the search chooses k = 1..K of them; a
searched rank-k point saved as a recipe is what `apply --recipe` writes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from abliterate.demo import toy
from abliterate.edit.plan import EditOptions
from abliterate.errors import AbliterateError
from abliterate.io.direction_file import Direction, load_direction, normalise
from abliterate.measure.directions import principal_directions
from abliterate.measure.extract import PromptSets, extract, save_extraction
from abliterate.measure.hooks import ablate
from abliterate.measure.loading import load_model
from abliterate.options.recipe import SelectionSettings, load_recipe
from abliterate.search.front import save_choice
from abliterate.search.space import direction_for, load_candidates
from abliterate.search.study import Scorer, SearchSettings, search
from tests.test_apply import run_cli

K = 3
N_TRAIN, N_VAL = 96, 16


@pytest.fixture(scope="module")
def toy_rank_k(refusing_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("rank-k-search")
    lm = load_model(refusing_model, dtype="float32", device="cpu")
    p = toy.toy_prompts()
    harmful_val, harmless_val = (s[N_TRAIN : N_TRAIN + N_VAL] for s in (p.harmful_train, p.harmless_train))
    result = extract(lm, PromptSets(p.harmful_train[:N_TRAIN], p.harmless_train[:N_TRAIN], harmful_val, harmless_val),
                     quiet=True, directions=K, settings=SelectionSettings(finalists=2))
    save_extraction(result, root / "dir.safetensors")
    return lm, result, root / "dir.safetensors", harmful_val, harmless_val


@pytest.fixture(scope="module")
def searched(toy_rank_k, tmp_path_factory):
    lm, _, path, harmful, harmless = toy_rank_k
    cands = load_candidates(path, lm)
    settings = SearchSettings(trials=8, seed=0, norm_preserve=False, max_new_tokens=8)
    return cands, search(lm, cands, harmful, harmless, settings, tmp_path_factory.mktemp("study") / "s.db", quiet=True)


def test_principal_directions_find_the_axis_the_differences_vary_along():
    g = torch.Generator().manual_seed(0)
    d, r = 16, torch.zeros(16, dtype=torch.float64)
    r[0] = 1.0
    harmful = 2.0 * r + 0.01 * torch.randn(200, d, generator=g, dtype=torch.float64)
    harmful[:, 5] += 3.0 * torch.randn(200, generator=g, dtype=torch.float64)  # the spread beside r
    harmless = 0.01 * torch.randn(200, d, generator=g, dtype=torch.float64)
    more = principal_directions(harmful, harmless, r, 2)
    assert more.shape == (2, d)
    assert abs(float(more[0, 5]) / float(more[0].norm())) > 0.999
    assert float(more[0].norm()) > 2.0  # scaled to the spread along it (RMS ~ 3 over half the differences)
    assert float((more @ r).abs().max()) < 1e-9
    with pytest.raises(AbliterateError, match="more prompts"):
        principal_directions(harmful[:2], harmless[:1], r, 3)


def test_extract_directions_writes_k_rows_with_the_choice_first(toy_rank_k):
    lm, result, path, *_ = toy_rank_k
    direction = load_direction(path, hidden_size=lm.hidden_size, num_layers=lm.num_layers)
    assert direction.rank == K and direction.vectors.shape == (K, lm.hidden_size)
    assert np.array_equal(direction.vectors[0], normalise(result.direction.numpy()))
    assert np.array_equal(direction.leading(1).vectors, normalise(result.direction.numpy()))
    cands = load_candidates(path, lm)
    assert cands.max_directions == K


def test_extract_directions_is_refused_with_reselect(toy_rank_k, tmp_path):
    _, _, path, *_ = toy_rank_k
    code, out = run_cli("extract", "--reselect", str(path), "--directions", "2", "--out", str(tmp_path / "x.st"))
    assert code != 0 and "--directions needs MODEL" in out


def test_search_tries_each_k_and_its_scores_are_the_span_ablation(toy_rank_k, searched):
    lm, _, _, harmful, harmless = toy_rank_k
    cands, result = searched
    ks = [t.point.directions for t in result.trials]
    assert ks[:2] == [1, K] and set(ks) == {1, 2, 3}  # the choice alone, then with every direction; then searched
    full = result.trials[1]
    r = direction_for(cands, full.point)
    assert isinstance(r, Direction) and r.rank == K
    again = Scorer(lm, harmful, harmless, SearchSettings()).first_token(r, full.point.options(lm.num_layers))
    assert again == pytest.approx((full.refusal_score, full.kl), abs=1e-6)
    assert abs(full.kl - result.trials[0].kl) > 1e-6  # removing two more directions changes the model
    with pytest.raises(AbliterateError, match="holds 1"):
        direction_for(replace(cands, more=None), full.point)


def test_a_searched_rank_k_recipe_is_what_apply_writes(toy_rank_k, searched, refusing_model, tmp_path):
    lm, _, _, harmful, _ = toy_rank_k
    cands, result = searched
    chosen = next(t for t in result.trials[2:] if t.point.directions == 2)  # a searched point, not the start
    recipe_path, direction_path = save_choice(chosen, cands, lm, tmp_path / "found.yaml", prompts=len(harmful),
                                              study=tmp_path / "s.db", study_name="abliterate-search")
    saved = load_direction(direction_path)
    assert saved.rank == chosen.point.directions
    code, out = run_cli("apply", str(refusing_model), "--recipe", str(recipe_path), "--out", str(tmp_path / "edited"),
                        "--quiet")
    assert code == 0, out
    recipe = load_recipe("llama", recipe_path).apply
    edited = load_model(tmp_path / "edited", dtype="float32", device="cpu")
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    strength = EditOptions(layer_scales=recipe.layer_scales).strength
    with torch.no_grad(), ablate(lm.model, lm.arch, saved, strength=strength):
        hooked = lm.model(ids).logits
    assert (edited.model(ids).logits - hooked).abs().max().item() <= 1e-4
