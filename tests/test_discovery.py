"""Day-one support: a model_type in no family file gets its residual writers found on a tiny instance of its own
config. A renamed Llama and a real hybrid (LFM2: short-convolution and attention layers) taken out of the table are
edited exactly (edited logits = the original under hooks on the writers this test names, with the effect floor; the
adapter = the weights; verify passes), the run names the tensors it edits, and a family whose blocks normalise their
outputs (Gemma 2 taken out of the table) is refused in one line with the --arch route."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import abliterate.arch.discover as discover
import abliterate.arch.table as table
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


class RenamedConfig(LlamaConfig):
    model_type = "abliterate_renamed_llama"


class RenamedForCausalLM(LlamaForCausalLM):
    config_class = RenamedConfig


AutoConfig.register(RenamedConfig.model_type, RenamedConfig)
AutoModelForCausalLM.register(RenamedConfig, RenamedForCausalLM)

LFM2_TYPES = ["conv", "full_attention", "conv", "full_attention"]
LFM2 = Family("lfm2", dict(LLAMA_LIKE, num_hidden_layers=4, layer_types=LFM2_TYPES, block_auto_adjust_ff_dim=False),
              hooks=("model.embed_tokens", "model.layers.{L}.feed_forward.w2"))
LFM2_MIXERS = {0: "conv.out_proj", 1: "self_attn.out_proj", 2: "conv.out_proj", 3: "self_attn.out_proj"}
CASES = {
    "renamed": Family(RenamedConfig.model_type, LLAMA_LIKE, LLAMA_HOOKS),
    "lfm2": LFM2,
}


@pytest.fixture(autouse=True)
def without(monkeypatch):
    """Take the test's real types out of the shipped table (were a family file to list them) and forget earlier
    discoveries."""
    shipped = table._by_model_type
    monkeypatch.setattr(table, "_by_model_type",
                        lambda: {k: v for k, v in shipped().items() if k not in ("lfm2", "gemma2")})
    monkeypatch.setattr(discover, "_CACHE", {})


def reference_paths(name: str, family: Family, layers: int) -> list[str]:
    paths = hook_paths(family, layers)
    if name == "lfm2":
        paths += [f"model.layers.{i}.{m}" for i, m in LFM2_MIXERS.items()]
    return paths


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_type_in_no_family_file_is_discovered_and_edited_exactly(name, tmp_path):
    family = CASES[name]
    model = build_model(family)
    original = save_sharded(model, tmp_path / "original")
    r = written_direction(model)
    save_direction(tmp_path / "dir.safetensors", r, {"model": "tiny", "layer": 1, "position": -1})
    common = ("--direction", str(tmp_path / "dir.safetensors"))
    code, out = run_cli("apply", str(original), "--out", str(tmp_path / "edited"), *common)
    assert code == 0, out
    assert "is in no family file" in out and "down_proj" * (name == "renamed") in out, out
    layers = model.config.num_hidden_layers
    hooks = ablation_hooks(model, reference_paths(name, family, layers), r / r.norm())
    with torch.no_grad():
        expected = model(IDS).logits
        for h in hooks:
            h.remove()
        unedited = model(IDS).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "edited", dtype=torch.float32).eval()(IDS).logits
    assert (expected - unedited).abs().max() >= EFFECT_FLOOR
    assert (got - expected).abs().max().item() <= LOGIT_TOLERANCE
    code, out = run_cli("verify", str(original), str(tmp_path / "edited"))
    assert code == 0 and "OK" in out, out
    code, out = run_cli("apply", str(original), "--out", str(tmp_path / "adapter"), "--adapter", "-q", *common)
    assert code == 0, out
    base = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).eval()
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()(IDS).logits
    assert (adapted - got).abs().max().item() <= LOGIT_TOLERANCE


def test_discovered_hooks_compute_the_written_edit():
    """What extraction, evaluation and search hook is what apply writes: the discovered hook modules."""
    arch = discover.discovered_arch(AutoConfig.for_model("lfm2", **LFM2.config).to_dict(), report=False)
    assert arch.decoder_layers == "model.layers"
    hooked = {p.replace("{layer}", "L") for ps in arch.hook_modules.values() for p in ps}
    assert hooked == {"model.embed_tokens", "model.layers.L.conv.out_proj", "model.layers.L.self_attn.out_proj",
                      "model.layers.L.feed_forward.w2"}, hooked


def test_a_family_that_normalises_its_block_outputs_is_refused_in_one_line(tmp_path):
    original = save_sharded(build_model(Family("gemma2", dict(LLAMA_LIKE))), tmp_path / "original")
    save_direction(tmp_path / "dir.safetensors", torch.ones(32), {"model": "tiny", "layer": 1, "position": -1})
    code, out = run_cli("apply", str(original), "--direction", str(tmp_path / "dir.safetensors"), "--out",
                        str(tmp_path / "edited"))
    assert code != 0 and not (tmp_path / "edited").exists()
    line = out.strip()
    assert "\n" not in line and "gemma2" in line and "--arch FILE" in line and "normalise" in line, out


@pytest.mark.parametrize("model_type", ["gemma3n", "gemma4_unified", "mistral4"])
def test_types_neither_listed_nor_discoverable_are_refused_in_one_line(model_type):
    """Gemma 3n (parallel AltUp streams) and Gemma 4 unified (per-layer configs) cannot be built small from their
    configs, Mistral 4's tiny instance does not run: each is one line naming the type and the --arch route."""
    from abliterate.arch.table import arch_for_config, supported_model_types
    from abliterate.errors import AbliterateError

    if model_type in supported_model_types():
        pytest.skip(f"{model_type} is in a family file now")
    with pytest.raises(AbliterateError) as refused:
        arch_for_config(AutoConfig.for_model(model_type).to_dict())
    message = str(refused.value)
    assert "\n" not in message and model_type in message and "--arch FILE" in message
