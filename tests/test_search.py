"""`abliterate search`: per-layer scales applied by hooks are exactly the weight edit, the search finds
edits that refuse no more than full ablation at a lower KL, and a study resumes where it stopped."""

from __future__ import annotations

import json
import random
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from abliterate.arch.table import arch_for_config
from abliterate.demo import toy
from abliterate.edit.plan import EditOptions, plan_edit
from abliterate.edit.strengths import Profile, layer_scales, uniform
from abliterate.errors import AbliterateError
from abliterate.evaluate.generation import generate
from abliterate.evaluate.markers import find_refusal
from abliterate.evaluate.records import EvalSettings
from abliterate.io.checkpoint import Checkpoint
from abliterate.io.direction_file import load_direction, save_direction
from abliterate.measure.extract import PromptSets, extract, save_extraction
from abliterate.measure.hooks import ablate
from abliterate.measure.loading import load_model
from abliterate.measure.scores import first_token_logprobs, kl_divergence
from abliterate.options.recipe import load_recipe
from abliterate.search.front import TrialResult, pareto_front, pick
from abliterate.search.space import Point, direction_for, load_candidates, selected_point
from abliterate.search.study import Scorer, SearchSettings, search
from tests.families import EFFECT_FLOOR, FAMILIES, LOGIT_TOLERANCE, build_model, save_sharded, written_direction
from tests.test_apply import run_cli

N_TRAIN = 120  # toy train prompts per set used for the difference of means; the rest validate


@pytest.fixture(scope="module")
def toy_search(refusing_model, tmp_path_factory):
    """(loaded toy model, direction file, harmful validation prompts, harmless validation prompts)."""
    root = tmp_path_factory.mktemp("search")
    lm = load_model(refusing_model, dtype="float32", device="cpu")
    p = toy.toy_prompts()
    harmful_val, harmless_val = p.harmful_train[N_TRAIN:], p.harmless_train[N_TRAIN:]
    result = extract(lm, PromptSets(p.harmful_train[:N_TRAIN], p.harmless_train[:N_TRAIN], harmful_val, harmless_val),
                     quiet=True)
    save_extraction(result, root / "dir.safetensors")
    return lm, root / "dir.safetensors", harmful_val, harmless_val


def random_scales(num_layers: int, seed: int) -> dict[str, tuple[float, ...]]:
    """Non-uniform strengths through the search's own profile representation."""
    rng = random.Random(seed)
    profiles = {c: Profile(rng.uniform(0.3, 1.5), rng.uniform(0, num_layers - 1), rng.uniform(0.5, 3),
                           rng.uniform(0, 1)) for c in ("attn", "mlp")}
    return layer_scales(profiles, rng.uniform(0.3, 1.5), num_layers)


@pytest.mark.parametrize("which", ["toy", "llama"])
def test_hook_applied_layer_scales_equal_the_weight_edit_with_the_same_scales(which, refusing_model, tmp_path):
    llama = FAMILIES["llama"]
    original = refusing_model if which == "toy" else save_sharded(build_model(llama), tmp_path / "llama")
    model = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).eval()
    config = model.config.get_text_config()
    scales = random_scales(config.num_hidden_layers, seed=3)
    assert len(set(scales["attn"])) > 1 and len(set(scales["mlp"])) > 1  # really per-layer
    (tmp_path / "scales.yaml").write_text(yaml.safe_dump({k: list(v) for k, v in scales.items()}))
    r = written_direction(model)  # a direction the model writes along: a large effect to compare against
    save_direction(tmp_path / "dir.safetensors", r, {"model": which})
    code, out = run_cli("apply", str(original), "--direction", str(tmp_path / "dir.safetensors"), "--layer-scales",
                        str(tmp_path / "scales.yaml"), "--out", str(tmp_path / "edited"), "--quiet")
    assert code == 0, out
    ids = torch.randint(3, config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(2))
    options = EditOptions(layer_scales=scales)
    with torch.no_grad():
        unedited = model(ids).logits
        with ablate(model, arch_for_config(model.config.to_dict()), r, strength=options.strength):
            hooked = model(ids).logits
        edited = AutoModelForCausalLM.from_pretrained(tmp_path / "edited", dtype=torch.float32).eval()(ids).logits
    assert (hooked - unedited).abs().max().item() >= EFFECT_FLOOR  # the edit did something the check could miss
    assert (edited - hooked).abs().max().item() <= LOGIT_TOLERANCE  # the search's hooks are the weight edit


def full_ablation(lm, direction: torch.Tensor, harmful, harmless) -> tuple[int, float]:
    """Refusals and first-token KL of removing the direction fully from every writer, measured directly."""
    render = lambda texts: [lm.tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,  # noqa: E731
                                                             add_generation_prompt=True) for t in texts]
    base = first_token_logprobs(lm, render(harmless), 16)
    with ablate(lm.model, lm.arch, direction):
        kl = kl_divergence(base, first_token_logprobs(lm, render(harmless), 16)).mean().item()
        replies = generate(lm, harmful, EvalSettings(batch_size=16), SearchSettings().max_new_tokens, quiet=True)
    return sum(find_refusal(text) is not None for text, _ in replies), kl


def test_search_reaches_full_ablation_refusals_at_a_strictly_lower_kl(toy_search, tmp_path):
    lm, direction_file, harmful, harmless = toy_search
    refused, kl = full_ablation(lm, torch.from_numpy(load_direction(direction_file).vectors), harmful, harmless)
    assert refused <= len(harmful) // 10  # full ablation works on the toy: the bar is a real one
    result = search(lm, load_candidates(direction_file, lm), harmful, harmless, SearchSettings(trials=25, seed=0),
                    tmp_path / "s.db", quiet=True)
    first = result.trials[0]  # the enqueued start: the extraction's choice, fully removed
    assert first.number == 0 and first.refusals == refused and abs(first.kl - kl) < 1e-5
    better = [t for t in result.front if t.refusals <= refused and t.kl < kl]
    assert better, [(t.refusals, t.kl) for t in result.front]
    assert pick(result.front, result.prompts).kl < kl


def test_rerun_with_more_trials_continues_the_same_study(toy_search, tmp_path):
    lm, direction_file, harmful, harmless = toy_search
    cands = load_candidates(direction_file, lm)
    first = search(lm, cands, harmful, harmless, SearchSettings(trials=4, seed=1), tmp_path / "s.db", quiet=True)
    again = search(lm, cands, harmful, harmless, SearchSettings(trials=7, seed=1), tmp_path / "s.db", quiet=True)
    assert (first.ran, again.ran) == (4, 3)
    assert [t.number for t in again.trials] == list(range(7))
    assert [t.point for t in again.trials[:4]] == [t.point for t in first.trials]
    start = selected_point(cands)
    assert sum(t.point == start for t in again.trials) == 1  # the start is enqueued once, not per run
    study = optuna.load_study(study_name="abliterate-search", storage=f"sqlite:///{tmp_path / 's.db'}")
    assert len(study.trials) == 7


def test_interrupted_trial_is_failed_and_the_rerun_goes_on(toy_search, tmp_path, monkeypatch):
    lm, direction_file, harmful, harmless = toy_search
    cands = load_candidates(direction_file, lm)
    calls = {"n": 0}
    real = Scorer.first_token

    def interrupt_third(self, r, options):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, r, options)

    monkeypatch.setattr(Scorer, "first_token", interrupt_third)
    with pytest.raises(KeyboardInterrupt):
        search(lm, cands, harmful, harmless, SearchSettings(trials=5, seed=2), tmp_path / "s.db", quiet=True)
    monkeypatch.setattr(Scorer, "first_token", real)
    result = search(lm, cands, harmful, harmless, SearchSettings(trials=5, seed=2), tmp_path / "s.db", quiet=True)
    assert result.ran == 3 and [t.number for t in result.trials] == [0, 1, 3, 4, 5]
    study = optuna.load_study(study_name="abliterate-search", storage=f"sqlite:///{tmp_path / 's.db'}")
    assert study.trials[2].state == optuna.trial.TrialState.FAIL


def test_resuming_a_study_with_other_prompts_is_refused(toy_search, tmp_path):
    lm, direction_file, harmful, harmless = toy_search
    cands = load_candidates(direction_file, lm)
    search(lm, cands, harmful, harmless, SearchSettings(trials=1), tmp_path / "s.db", quiet=True)
    with pytest.raises(AbliterateError, match="other prompts"):
        search(lm, cands, harmful[:-1], harmless, SearchSettings(trials=2), tmp_path / "s.db", quiet=True)


def test_cli_search_writes_a_recipe_that_apply_reproduces_exactly(toy_search, refusing_model, tmp_path):
    lm, direction_file, harmful, harmless = toy_search
    (tmp_path / "harmful.txt").write_text("\n".join(harmful) + "\n")
    (tmp_path / "harmless.txt").write_text("\n".join(harmless) + "\n")
    code, out = run_cli("search", str(refusing_model), "--direction", str(direction_file), "--out",
                        str(tmp_path / "found.yaml"), "--trials", "12", "--harmful", str(tmp_path / "harmful.txt"),
                        "--harmless", str(tmp_path / "harmless.txt"), "--dtype", "float32", "--device", "cpu", "-q")
    assert code == 0, out
    assert "<- chosen" in out and (tmp_path / "found.study.db").is_file()
    code, out = run_cli("apply", str(refusing_model), "--recipe", str(tmp_path / "found.yaml"), "--out",
                        str(tmp_path / "edited"), "--quiet")
    assert code == 0, out
    recipe = load_recipe("llama", tmp_path / "found.yaml").apply
    chosen = load_direction(recipe.direction)
    assert Path(recipe.direction) == tmp_path / "found.direction.safetensors"
    edited = load_model(tmp_path / "edited", dtype="float32", device="cpu")
    options = EditOptions(layer_scales=recipe.layer_scales)
    r = torch.from_numpy(chosen.vectors)
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), ablate(lm.model, lm.arch, r, strength=options.strength):
        hooked = lm.model(ids).logits
    assert (edited.model(ids).logits - hooked).abs().max().item() <= 1e-4
    again = Point.from_params(json.loads(chosen.metadata["search_params"]))
    assert again.options(lm.num_layers).layer_scales == recipe.layer_scales


def test_pick_follows_max_kl_and_max_refusals():
    p = selected_point_like()
    trials = [TrialResult(i, p, 0.0, kl, refusals, 0.1) for i, (refusals, kl) in
              enumerate([(0, 0.05), (2, 0.01), (5, 0.002), (5, 0.03), (9, 0.0), (None, 0.0)])]
    front = pareto_front(trials)
    assert [t.number for t in front] == [0, 1, 2, 4]  # (5, 0.03) is beaten; uncounted trials are not on it
    assert pick(front, 10).number == 0
    assert pick(front, 10, max_kl=0.02).number == 1
    assert pick(front, 10, max_refusals=0.5).number == 2
    with pytest.raises(AbliterateError, match="no trial on the front meets"):
        pick(front, 10, max_kl=0.001, max_refusals=0.1)


def selected_point_like() -> Point:
    return Point(1.0, -1, False, 1.0, {c: uniform(1.0) for c in ("attn", "mlp")})


def test_blended_direction_lies_between_neighbouring_candidates_and_projection_is_orthogonal(toy_search):
    lm, direction_file, *_ = toy_search
    cands = load_candidates(direction_file, lm)
    layer, pos = cands.selected
    unit = lambda v: v / v.norm()  # noqa: E731
    a, b = unit(cands.candidates[layer, pos]), unit(cands.candidates[layer - 1, pos])
    half = direction_for(cands, Point(layer - 0.5, pos, False, 1.0, {}))
    assert torch.allclose(half, unit(a + b), atol=1e-6)
    assert torch.allclose(direction_for(cands, Point(float(layer), pos, False, 1.0, {})), a, atol=1e-6)
    projected = direction_for(cands, Point(float(layer), pos, True, 1.0, {}))
    assert abs(projected @ unit(cands.harmless_mean[layer, pos])) < 1e-5 and abs(projected.norm() - 1) < 1e-5


def test_layer_scales_made_for_another_depth_are_refused(tmp_path):
    folder = save_sharded(build_model(FAMILIES["llama"]), tmp_path / "llama")  # 2 layers
    with pytest.raises(AbliterateError, match="attn have 3 entries but this model needs 2"):
        plan_edit(Checkpoint.open(folder), EditOptions(layer_scales={"attn": (1.0, 1.0, 1.0)}))


@pytest.mark.parametrize("text,message", [
    ("apply:\n  layer_scales: {attn: [1, x]}\n", "non-empty list of finite numbers"),
    ("apply:\n  layer_scales: {embed: [1, 2]}\n", "exactly one entry"),
    ("apply:\n  layer_scales: {attn: .nan}\n", "non-empty list"),
])
def test_bad_layer_scales_in_a_recipe_are_one_clear_error(tmp_path, text, message):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(AbliterateError, match=message):
        load_recipe("llama", tmp_path / "r.yaml")


def test_direction_file_without_candidates_is_one_clear_error(toy_search, tmp_path):
    lm = toy_search[0]
    save_direction(tmp_path / "bare.safetensors", torch.randn(lm.hidden_size), {"model": "toy"})
    with pytest.raises(AbliterateError, match="no 'candidates' tensor"):
        load_candidates(tmp_path / "bare.safetensors", lm)
