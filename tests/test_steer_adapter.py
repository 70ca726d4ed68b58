"""`steer bake --adapter`: a steering vector as a peft adapter whose LoRA B bias carries it, exact on every family
whose MLP output a constant can be added to, including those without an MLP output bias (Qwen2, Mistral, Phi-3)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from abliterate.arch.table import arch_for_config
from abliterate.io.direction_file import save_direction
from abliterate.steer.steering import steering
from tests.families import FAMILIES, build_model, save_sharded
from tests.test_apply import run_cli
from tests.test_bake import TOLERANCE, random_vectors


def adapter_cli(original, vectors, layer: int, coeff: float, out, *extra: str) -> tuple[int, str]:
    return run_cli("steer", "bake", str(original), "--vectors", str(vectors), "--layer", str(layer), "--coeff",
                   str(coeff), "--out", str(out), "--adapter", "-q", *extra)


@pytest.mark.parametrize(("family", "layer"), [("qwen2", 1), ("mistral", 0), ("phi3", 1), ("granite", 1)])
def test_adapter_logits_equal_hook_steering_logits_on_families_without_an_mlp_bias(tmp_path, family, layer):
    original = save_sharded(build_model(FAMILIES[family]), tmp_path / family)
    vectors = random_vectors(2, 32, seed=5)
    save_direction(tmp_path / "v.safetensors", vectors, {"kind": "steering"})
    code, out = adapter_cli(original, tmp_path / "v.safetensors", layer, 1.5, tmp_path / "adapter")
    assert code == 0, out
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["lora_bias"] is True and config["target_modules"] == [f"model.layers.{layer}.mlp.down_proj"]
    ids = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(2))
    model = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with steering(model, arch_for_config(model.config.to_dict()), layer, vectors[layer + 1], 1.5):
            hooked = model(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(model, tmp_path / "adapter").eval()(input_ids=ids).logits
    assert (hooked - plain).abs().max() > 1e-2  # the steering changes the logits: the comparison means something
    assert (adapted - hooked).abs().max() <= TOLERANCE


def test_adapter_of_one_jailbreak_class_carries_that_class_vector(tmp_path):
    original = save_sharded(build_model(FAMILIES["qwen2"]), tmp_path / "qwen2")
    vectors = {"vector.role_play": random_vectors(2, 32, seed=1), "vector.prefix": random_vectors(2, 32, seed=2)}
    save_direction(tmp_path / "j.safetensors", np.mean(list(vectors.values()), axis=0), {"kind": "jailbreak"},
                   extra=vectors)
    code, out = adapter_cli(original, tmp_path / "j.safetensors", 0, -1.0, tmp_path / "a", "--class", "prefix")
    assert code == 0, out
    from safetensors.numpy import load_file

    bias = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    np.testing.assert_array_equal(bias["base_model.model.model.layers.0.mlp.down_proj.lora_B.bias"],
                                  -vectors["vector.prefix"][1])
    code, out = adapter_cli(original, tmp_path / "j.safetensors", 0, -1.0, tmp_path / "b", "--class", "nope")
    assert code == 2 and "no class 'nope'" in out and "role_play" in out
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(("family", "why"), [("gemma2", "normalises"), ("mixtral", "dense MLPs only")])
def test_adapter_refuses_families_where_a_constant_cannot_steer_exactly(tmp_path, family, why):
    original = save_sharded(build_model(FAMILIES[family]), tmp_path / family)
    save_direction(tmp_path / "v.safetensors", random_vectors(2, 32), {"kind": "steering"})
    code, out = adapter_cli(original, tmp_path / "v.safetensors", 0, 1.0, tmp_path / "adapter")
    assert code == 2 and why in out and "Traceback" not in out
    assert not (tmp_path / "adapter").exists()
