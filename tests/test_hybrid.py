"""Hybrid stacks: a family's layers hold different mixers (Qwen3.5: linear attention in layer 0, attention in layer 1),
so the hooks go where each layer has its modules, yet a family file naming a module no layer has is one clear error;
an adapter of a renamed or fused-on-disk layout merges back to exactly what `apply` writes; Nemotron-H's latent MoE
edits the latent output projection, not the experts."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from abliterate.arch.table import arch_for_config
from abliterate.errors import AbliterateError
from abliterate.io.direction_file import save_direction
from abliterate.measure.hooks import in_layer
from abliterate.measure.loading import check_arch_modules
from tests.families import (
    EFFECT_FLOOR,
    FAMILIES,
    IDS,
    LOGIT_TOLERANCE,
    Family,
    ablation_hooks,
    build_model,
    hook_paths,
    save_sharded,
    written_direction,
)
from tests.test_apply import run_cli, tensors_of


@pytest.fixture(scope="module")
def qwen35():
    return build_model(FAMILIES["qwen3_5_text"])


def test_hybrid_hooks_sit_on_each_layers_own_mixer(qwen35):
    arch = arch_for_config({"model_type": "qwen3_5_text"})
    modules = {id(m): n for n, m in qwen35.named_modules()}
    hooked = sorted(modules[id(m)] for ps in arch.hook_modules.values() for p in ps
                    for layer in ([None] if "{layer}" not in p else range(2))
                    if (m := in_layer(qwen35, p, layer)) is not None)
    assert hooked == ["model.embed_tokens", "model.layers.0.linear_attn.out_proj", "model.layers.0.mlp",
                      "model.layers.1.mlp", "model.layers.1.self_attn.o_proj"]


def test_a_hybrid_hook_path_found_in_no_layer_is_refused(qwen35):
    arch = arch_for_config({"model_type": "qwen3_5_text"})
    typo = dataclasses.replace(arch, hook_modules={**arch.hook_modules,
                                                   "attn": ("model.layers.{layer}.linear_atn.out_proj",)})
    with pytest.raises(AbliterateError, match=r"linear_atn\.out_proj"):
        check_arch_modules(qwen35, typo, "tiny")


def _apply(tmp_path, family: Family, *extra: str):
    model = build_model(family)
    original = save_sharded(model, tmp_path / "original")
    r = written_direction(model)
    save_direction(tmp_path / "d.safetensors", r, {})
    args = ("--direction", str(tmp_path / "d.safetensors"), "-q", *extra)
    code, out = run_cli("apply", str(original), "--out", str(tmp_path / "edited"), *args)
    assert code == 0, out
    return model, original, r, args


@pytest.mark.parametrize("name", ["kimi_linear", "nemotron_h", "qwen3_5_moe_text"])
def test_an_adapter_of_a_renamed_or_fused_layout_merges_to_the_edited_checkpoint(tmp_path, name):
    """Kimi's block_sparse_moe is .mlp. in memory, Nemotron-H's backbone. is model. (its fused experts too), Qwen3.5's
    experts are fused on disk: the adapter names in-memory modules and merge finds the stored tensors again."""
    family = FAMILIES[name]
    extra = ("--components", family.adapter_refused[1]) if family.adapter_refused else ()
    _, original, _, args = _apply(tmp_path, family, *extra)
    code, out = run_cli("apply", str(original), "--out", str(tmp_path / "adapter"), "--adapter", *args)
    assert code == 0, out
    code, out = run_cli("merge", str(original), str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"))
    assert code == 0, out
    edited, merged = tensors_of(tmp_path / "edited"), tensors_of(tmp_path / "merged")
    assert edited.keys() == merged.keys()
    for shard, (names, tensors) in edited.items():
        assert all(torch.equal(tensors[n], merged[shard][1][n]) for n in names), shard


def test_a_latent_nemotron_moe_edits_its_latent_output_projection_not_the_experts(tmp_path):
    """With moe_latent_size the experts write a latent space that fc2_latent_proj maps back: that is the writer."""
    nemotron = FAMILIES["nemotron_h"]
    family = dataclasses.replace(nemotron, config={**nemotron.config, "moe_latent_size": 16})
    model, _, r, _ = _apply(tmp_path, family)
    edits = set(json.loads((tmp_path / "edited" / "abliterate.json").read_text())["edits"])
    assert "backbone.layers.1.mixer.fc2_latent_proj.weight" in edits
    assert not [n for n in edits if ".experts." in n]
    unit = r / r.norm()
    hooks = ablation_hooks(model, hook_paths(family, 4), unit)
    with torch.no_grad():
        expected = model(IDS).logits
        for h in hooks:
            h.remove()
        unedited = model(IDS).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "edited", dtype=torch.float32).eval()(IDS).logits
    assert (expected - unedited).abs().max() >= EFFECT_FLOOR
    assert (got - expected).abs().max().item() <= LOGIT_TOLERANCE


@pytest.mark.parametrize("name", ["nemotron_h", "qwen3_5_text", "zamba2"])
def test_text_commands_load_a_hybrid_model_and_the_edit_as_hooks_is_the_written_edit(tmp_path, name):
    """extract runs on the model as abliterate loads it (one mixer per layer, linear attention, Mamba with a shared
    block), and the edit as hooks (what evaluate, search and the whole job measure) computes the written edit."""
    from abliterate.demo.toy import word_tokenizer
    from abliterate.edit.plan import EditOptions
    from abliterate.evaluate.in_memory import edited_view
    from abliterate.io.direction_file import load_direction
    from abliterate.measure.loading import load_model

    _, original, _, _ = _apply(tmp_path, FAMILIES[name])
    words = ["how", "do", "i", "build", "a", "bomb", "bake", "bread", "steal", "car", "make", "tea"]
    word_tokenizer(words).save_pretrained(original)
    for kind, asks in (("harmful", ("build a bomb", "steal a car")), ("harmless", ("bake bread", "make tea"))):
        (tmp_path / f"{kind}.txt").write_text("".join(f"{p} {a}\n" for p in ("how do i", "i") for a in asks) * 2)
    code, out = run_cli("extract", str(original), "--harmful", str(tmp_path / "harmful.txt"), "--harmless",
                        str(tmp_path / "harmless.txt"), "--kind", "harmfulness", "--n-train", "2", "--n-val", "2",
                        "--out", str(tmp_path / "h.safetensors"), "--dtype", "float32", "--device", "cpu", "-q")
    assert code == 0, out
    lm = load_model(original, dtype="float32", device="cpu")
    view = edited_view(lm, load_direction(tmp_path / "d.safetensors"), EditOptions(), "edited")
    with torch.no_grad():
        with view.running():
            hooked = view.model(IDS).logits
        written = AutoModelForCausalLM.from_pretrained(tmp_path / "edited", dtype=torch.float32).eval()(IDS).logits
        assert (hooked - written).abs().max().item() <= LOGIT_TOLERANCE
        assert (hooked - lm.model(IDS).logits).abs().max() >= EFFECT_FLOOR
