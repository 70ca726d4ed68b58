"""Extraction on a model that really refuses finds the direction that carries its refusals.

The toy chat model (abliterate.toy) refuses harmful-looking requests. `abliterate extract` on its
training requests must select a direction whose ablation, by hooks and by `abliterate apply`, stops
the refusals on held-out requests without changing harmless replies, and whose addition makes
harmless requests refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from abliterate.direction_file import load_direction
from abliterate.hooks import ablate, add
from abliterate.loading import load_model
from abliterate.toy import REFUSALS, toy_prompts
from tests.test_apply import run_cli


def replies(model: torch.nn.Module, tokenizer, messages: list[str], max_new_tokens: int = 16) -> list[str]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False,
                                           add_generation_prompt=True) for m in messages]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return [tokenizer.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in out]


def refused(texts: list[str]) -> float:
    return sum(t in REFUSALS for t in texts) / len(texts)


@pytest.fixture(scope="module")
def extracted(refusing_model, tmp_path_factory) -> tuple[Path, str]:
    """(direction file, extract's output) from the real CLI on the toy's training requests."""
    root = tmp_path_factory.mktemp("extract")
    prompts = toy_prompts()
    (root / "harmful.txt").write_text("\n".join(prompts.harmful_train))
    (root / "harmless.txt").write_text("\n".join(prompts.harmless_train))
    code, out = run_cli("extract", str(refusing_model), "--harmful", str(root / "harmful.txt"), "--harmless",
                        str(root / "harmless.txt"), "--out", str(root / "d.safetensors"), "--dtype", "float32",
                        "--device", "cpu", "-q")
    assert code == 0, out
    return root / "d.safetensors", out


@pytest.fixture(scope="module")
def toy(refusing_model):
    return load_model(refusing_model, dtype="float32", device="cpu")


def test_extract_saves_the_direction_with_metadata_and_all_scored_candidates(extracted, toy):
    path, out = extracted
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        candidates = f.get_tensor("candidates")
        direction = f.get_tensor("direction")
    assert {"model", "layer", "position", "hidden_size", "command", "candidate_scores"} <= set(meta)
    assert int(meta["hidden_size"]) == toy.hidden_size == direction.shape[-1]
    assert candidates.shape[0] == toy.num_layers + 1
    assert torch.equal(direction, candidates[int(meta["layer"]), int(meta["position"])])
    assert "<- chosen" in out and "candidates scored" in out


def test_baseline_toy_refuses_held_out_harmful_requests(toy):
    prompts = toy_prompts()
    assert refused(replies(toy.model, toy.tokenizer, prompts.harmful_test)) >= 0.9
    assert refused(replies(toy.model, toy.tokenizer, prompts.harmless_test)) <= 0.1


def test_ablating_the_extracted_direction_by_hooks_stops_held_out_refusals(extracted, toy):
    prompts = toy_prompts()
    direction = torch.from_numpy(load_direction(extracted[0]).vectors)
    plain_harmless = replies(toy.model, toy.tokenizer, prompts.harmless_test)
    with ablate(toy.model, toy.arch, direction):
        harmful = replies(toy.model, toy.tokenizer, prompts.harmful_test)
        harmless = replies(toy.model, toy.tokenizer, prompts.harmless_test)
    assert refused(harmful) <= 0.1
    assert sum(a == b for a, b in zip(harmless, plain_harmless, strict=True)) >= 0.9 * len(harmless)


def test_applying_the_extracted_direction_to_the_weights_stops_held_out_refusals(extracted, toy, refusing_model,
                                                                                  tmp_path):
    prompts = toy_prompts()
    code, out = run_cli("apply", str(refusing_model), "--direction", str(extracted[0]), "--out",
                        str(tmp_path / "edited"), "-q")
    assert code == 0, out
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "edited").eval()
    harmful = replies(edited, toy.tokenizer, prompts.harmful_test)
    harmless = replies(edited, toy.tokenizer, prompts.harmless_test)
    plain_harmless = replies(toy.model, toy.tokenizer, prompts.harmless_test)
    assert refused(harmful) <= 0.1
    assert sum(a == b for a, b in zip(harmless, plain_harmless, strict=True)) >= 0.9 * len(harmless)
    with ablate(toy.model, toy.arch, torch.from_numpy(load_direction(extracted[0]).vectors)):
        assert replies(toy.model, toy.tokenizer, prompts.harmful_test) == harmful


def test_adding_the_extracted_direction_makes_harmless_requests_refused(extracted, toy):
    prompts = toy_prompts()
    with safe_open(str(extracted[0]), "pt") as f:
        layer = int(f.metadata()["layer"])
        vector = f.get_tensor("direction")
    with add(toy.model, toy.arch, layer, vector):
        harmless = replies(toy.model, toy.tokenizer, prompts.harmless_test)
    assert refused(harmless) >= 0.8
