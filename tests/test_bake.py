"""Baked steering computes what hook steering computes; `apply --add` makes the toy refuse harmless requests.

`abliterate steer bake` writes coeff * vector into a bias of one layer's MLP output projection; the
baked checkpoint's logits must equal the original model's under `abliterate.steer.steering` (every
position) in float32, on the toy chat model and on tiny random models (Llama: bias added through the
global mlp_bias flag; GPT-2: an existing bias changed). `apply --add` amplifies the refusal direction
extracted from the toy and must make its held-out harmless requests refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from abliterate.arch.table import arch_for_config
from abliterate.demo.toy import toy_prompts
from abliterate.io.direction_file import save_direction
from abliterate.measure.extract import PromptSets, extract, save_extraction
from abliterate.measure.loading import load_model
from abliterate.steer.steering import steering
from tests.families import FAMILIES, FAMILY_NAMES, build_model, save_sharded
from tests.test_apply import run_cli
from tests.test_extract import refused, replies

TOLERANCE = 1e-5


def random_vectors(num_layers: int, hidden: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(num_layers + 1, hidden)).astype(np.float32)


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def bake_cli(original: Path, vectors: Path, layer: int, coeff: float, out: Path) -> tuple[int, str]:
    return run_cli("steer", "bake", str(original), "--vectors", str(vectors), "--layer", str(layer),
                   "--coeff", str(coeff), "--out", str(out), "-q")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Tiny random Llama, GPT-2 and GPT-NeoX checkpoints (sharded, float32)."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: save_sharded(build_model(FAMILIES[name]), root / name) for name in ("llama", "gpt2", "gpt_neox")}


def hook_and_baked_logits(original: Path, baked: Path, vector: np.ndarray, layer: int, coeff: float,
                          input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(plain, hook-steered, baked) float32 logits over every position of input_ids."""
    model = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).eval()
    arch = arch_for_config(model.config.to_dict())
    with torch.no_grad():
        plain = model(input_ids=input_ids).logits
        with steering(model, arch, layer, vector, coeff):
            hooked = model(input_ids=input_ids).logits
        model = AutoModelForCausalLM.from_pretrained(baked, dtype=torch.float32).eval()
        baked_logits = model(input_ids=input_ids).logits
    return plain, hooked, baked_logits


@pytest.mark.parametrize("name,layer", [("llama", 0), ("llama", 1), ("gpt2", 0), ("gpt_neox", 1)])
def test_baked_bias_logits_equal_hook_steering_logits_on_tiny_models(tiny, tmp_path, name, layer):
    original = tiny[name]
    config = json.loads((original / "config.json").read_text())
    layers, hidden = config.get("num_hidden_layers", config.get("n_layer")), config.get("hidden_size",
                                                                                           config.get("n_embd"))
    vectors = random_vectors(layers, hidden)
    save_direction(tmp_path / "v.safetensors", vectors, {"kind": "steering"})
    code, out = bake_cli(original, tmp_path / "v.safetensors", layer, 1.5, tmp_path / "baked")
    assert code == 0, out
    ids = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(1))
    plain, hooked, baked = hook_and_baked_logits(original, tmp_path / "baked", vectors[layer + 1], layer, 1.5, ids)
    assert (hooked - plain).abs().max() > 1e-2  # the steering changes the logits: the comparison means something
    assert (baked - hooked).abs().max() <= TOLERANCE


# Why bake refuses a family: its MLP output is normalised, it has no bias to write to, or its MLP is MoE.
REFUSALS = ("normalises", "no bias", "dense MLPs only")


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_bake_is_exact_on_every_family_it_accepts(tmp_path, name):
    """Every family bake accepts gets the hook's logits (Granite's residual_multiplier folded into the bias);
    the others are refused with one of the known reasons, never baked approximately."""
    model = build_model(FAMILIES[name])
    config = model.config.get_text_config()
    original = save_sharded(model, tmp_path / name)
    vectors = random_vectors(config.num_hidden_layers, config.hidden_size)
    save_direction(tmp_path / "v.safetensors", vectors, {"kind": "steering"})
    code, out = bake_cli(original, tmp_path / "v.safetensors", 1, 1.5, tmp_path / "baked")
    if code != 0:
        assert code == 2 and any(why in out for why in REFUSALS) and "Traceback" not in out, out
        assert name not in BAKED, out
        pytest.skip(f"bake refuses {name} in one line: {next(why for why in REFUSALS if why in out)}")
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    plain, hooked, baked = hook_and_baked_logits(original, tmp_path / "baked", vectors[2], 1, 1.5, ids)
    assert (hooked - plain).abs().max() > 1e-2
    assert (baked - hooked).abs().max() <= TOLERANCE


# Families bake must accept (a dense MLP with a bias or an mlp_bias switch, outputs added without a norm).
BAKED = {"llama", "gpt2", "gpt_neox", "granite", "phi", "starcoder2", "gpt_bigcode", "smollm3", "internlm3", "ernie4_5",
         "exaone"}


def test_baking_llama_sets_mlp_bias_adds_zero_biases_and_copies_every_other_tensor(tiny, tmp_path):
    original = tiny["llama"]
    vectors = random_vectors(2, 32)
    save_direction(tmp_path / "v.safetensors", vectors, {"kind": "steering"})
    code, out = bake_cli(original, tmp_path / "v.safetensors", 1, -2.0, tmp_path / "baked")
    assert code == 0, out
    assert json.loads((tmp_path / "baked" / "config.json").read_text())["mlp_bias"] is True
    before, after = all_tensors(original), all_tensors(tmp_path / "baked")
    assert all(torch.equal(before[k], after[k]) for k in before)
    added = set(after) - set(before)
    assert added == {f"model.layers.{i}.mlp.{p}.bias" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}
    target = "model.layers.1.mlp.down_proj.bias"
    assert torch.equal(after[target], torch.from_numpy(vectors[2]) * -2.0)
    assert all(not after[k].any() for k in added - {target})
    index = json.loads((tmp_path / "baked" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(after)
    for name in added:  # each new bias lies in the shard its weight is in
        assert index["weight_map"][name] == index["weight_map"][name.replace(".bias", ".weight")]


def test_baked_toy_logits_equal_hook_steering_logits_over_all_positions(refusing_model, tmp_path):
    lm = load_model(refusing_model, dtype="float32", device="cpu")
    vectors = random_vectors(lm.num_layers, lm.hidden_size, seed=3)
    save_direction(tmp_path / "v.safetensors", vectors, {"kind": "steering"})
    code, out = bake_cli(refusing_model, tmp_path / "v.safetensors", 3, 2.0, tmp_path / "baked")
    assert code == 0, out
    texts = [lm.tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False,
                                              add_generation_prompt=True) for m in toy_prompts().harmless_test[:4]]
    ids = lm.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")["input_ids"]
    plain, hooked, baked = hook_and_baked_logits(refusing_model, tmp_path / "baked", vectors[4], 3, 2.0, ids)
    assert (hooked - plain).abs().max() > 1e-2
    assert (baked - hooked).abs().max() <= TOLERANCE


@pytest.mark.parametrize("family,why", [("gemma2", "normalises"), ("qwen2", "no bias"),
                                        ("mixtral", "dense MLPs only")])
def test_bake_refuses_families_where_a_bias_cannot_steer_exactly(tmp_path, family, why):
    original = save_sharded(build_model(FAMILIES[family]), tmp_path / family)
    save_direction(tmp_path / "v.safetensors", random_vectors(2, 32), {"kind": "steering"})
    code, out = bake_cli(original, tmp_path / "v.safetensors", 0, 1.0, tmp_path / "baked")
    assert code == 2 and why in out and "Traceback" not in out
    assert not (tmp_path / "baked").exists()


def test_bake_refuses_a_layer_out_of_range_and_vectors_of_another_model(tiny, tmp_path):
    save_direction(tmp_path / "v.safetensors", random_vectors(2, 32), {"kind": "steering"})
    code, out = bake_cli(tiny["llama"], tmp_path / "v.safetensors", 2, 1.0, tmp_path / "baked")
    assert code == 2 and "out of range" in out
    save_direction(tmp_path / "w.safetensors", random_vectors(3, 32), {"kind": "steering"})
    code, out = bake_cli(tiny["llama"], tmp_path / "w.safetensors", 0, 1.0, tmp_path / "baked")
    assert code == 2 and "shape [4, 32]" in out and "needs [3, 32]" in out
    assert not (tmp_path / "baked").exists()


@pytest.fixture(scope="module")
def refusal_direction(refusing_model, tmp_path_factory) -> Path:
    """The toy's refusal direction, extracted with the library on its training requests."""
    lm = load_model(refusing_model, dtype="float32", device="cpu")
    p = toy_prompts()
    result = extract(lm, PromptSets(p.harmful_train, p.harmless_train, p.harmful_train[:16], p.harmless_train[:16]),
                     quiet=True)
    path = tmp_path_factory.mktemp("direction") / "d.safetensors"
    save_extraction(result, path)
    return path


def refused_after_add(refusing_model: Path, direction: Path, out: Path, *scale: str) -> tuple[float, float]:
    """(harmless, harmful) held-out refusal rates of the checkpoint `apply --add` writes."""
    code, text = run_cli("apply", str(refusing_model), "--direction", str(direction), "--out", str(out), "--add",
                         *scale, "-q")
    assert code == 0, text
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = load_model(refusing_model, dtype="float32", device="cpu").tokenizer
    p = toy_prompts()
    return refused(replies(model, tok, p.harmless_test)), refused(replies(model, tok, p.harmful_test))


def test_apply_add_at_scale_2_makes_most_held_out_harmless_requests_refused(refusing_model, refusal_direction,
                                                                           tmp_path):
    harmless, harmful = refused_after_add(refusing_model, refusal_direction, tmp_path / "added", "--scale", "2")
    assert harmless >= 0.8
    assert harmful >= 0.9  # harmful requests stay refused
    _, at_2, stays = stated_add_rates()
    assert f"{100 * harmless:.1f}" == at_2 and f"{100 * harmful:.1f}" == stays  # what docs/steer.md states


def test_apply_add_means_a_negative_scale_and_already_raises_refusals_at_scale_1(refusing_model, refusal_direction,
                                                                                tmp_path):
    harmless, _ = refused_after_add(refusing_model, refusal_direction, tmp_path / "added")
    code, text = run_cli("apply", str(refusing_model), "--direction", str(refusal_direction), "--out",
                         str(tmp_path / "negative"), "--scale=-1", "-q")
    assert code == 0, text
    added, negative = all_tensors(tmp_path / "added"), all_tensors(tmp_path / "negative")
    assert added.keys() == negative.keys() and all(torch.equal(added[k], negative[k]) for k in added)
    assert harmless >= 0.3  # the unedited toy refuses at most 10 % of them (tests/test_extract.py)
    assert f"{100 * harmless:.1f}" == stated_add_rates()[0]


def stated_add_rates() -> tuple[str, str, str]:
    """docs/steer.md's `apply --add` refusal rates on the toy (printed by benchmarks/toy_numbers.py): harmless at
    scale 1, harmless at scale 1.5 and 2, harmful."""
    import re

    from tests.docs import flat

    stated = re.search(r"`--add` at scale 1 makes ([\d.]+) % of the 72 held-out harmless requests refused \(0.0 % "
                       r"unedited\), `--add --scale 1.5` or `2` ([\d.]+) % \(harmful ones stay refused: ([\d.]+) %\)",
                       flat("steer"))
    assert stated, "docs/steer.md no longer states the --add rates"
    return stated.group(1), stated.group(2), stated.group(3)


def test_apply_add_as_an_adapter_computes_what_the_amplified_weights_compute(refusing_model, refusal_direction,
                                                                            tmp_path):
    from peft import PeftModel

    for out, extra in ((tmp_path / "weights", ()), (tmp_path / "adapter", ("--adapter",))):
        code, text = run_cli("apply", str(refusing_model), "--direction", str(refusal_direction), "--out", str(out),
                             "--add", "--scale", "2", "-q", *extra)
        assert code == 0, text
    ids = load_model(refusing_model, dtype="float32", device="cpu").tokenizer(
        [f"<|user|> {m} <|end|> <|assistant|>" for m in toy_prompts().harmless_test[:8]], add_special_tokens=False,
        return_tensors="pt", padding=True)
    base = AutoModelForCausalLM.from_pretrained(refusing_model, dtype=torch.float32).eval()
    with torch.inference_mode():
        plain = base(**ids).logits
        peft_logits = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(**ids).logits
        weights_logits = AutoModelForCausalLM.from_pretrained(tmp_path / "weights", dtype=torch.float32).eval()(
            **ids).logits
    assert (weights_logits - plain).abs().max() > 0.1  # the edit does something
    torch.testing.assert_close(peft_logits, weights_logits, atol=TOLERANCE, rtol=0)
