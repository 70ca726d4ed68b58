"""Text commands on the families whose layout is not Llama's (DBRX's own names and 2-D fused experts, EXAONE 3's
names renamed on loading, Gemma 4's per-layer-input branch and expert block): extract runs on text prompts and reports
every residual stream, and the edit as hooks (what evaluate, search and the whole job measure) computes what the
written checkpoint computes, with an effect."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from abliterate.demo.toy import word_tokenizer
from abliterate.edit.plan import EditOptions
from abliterate.evaluate.in_memory import edited_view
from abliterate.io.direction_file import load_direction, save_direction
from abliterate.measure.loading import load_model
from tests.families import (
    EFFECT_FLOOR,
    FAMILIES,
    IDS,
    LOGIT_TOLERANCE,
    ablation_hooks,
    build_model,
    hook_paths,
    save_sharded,
    written_direction,
)
from tests.test_apply import run_cli
from tests.test_vision_language import HARMFUL, HARMLESS, WORDS


@pytest.mark.parametrize("name", ["dbrx", "exaone", "gemma4_text"])
def test_extract_runs_and_the_hooked_edit_is_the_written_one(name, tmp_path):
    model = build_model(FAMILIES[name])
    original = save_sharded(model, tmp_path / "original")
    word_tokenizer(list(WORDS)).save_pretrained(original)
    (tmp_path / "harmful.txt").write_text("".join(f"{a} {b}\n" for a in ("how do i", "i") for b in HARMFUL))
    (tmp_path / "harmless.txt").write_text("".join(f"{a} {b}\n" for a in ("how do i", "i") for b in HARMLESS))
    code, out = run_cli("extract", str(original), "--harmful", str(tmp_path / "harmful.txt"), "--harmless",
                        str(tmp_path / "harmless.txt"), "--kind", "harmfulness", "--n-train", "4", "--n-val", "4",
                        "--out", str(tmp_path / "x.safetensors"), "--dtype", "float32", "--device", "cpu", "-q")
    assert code == 0, out
    assert load_direction(tmp_path / "x.safetensors").vectors.shape == (3, 32)  # embeddings and each layer
    save_direction(tmp_path / "dir.safetensors", written_direction(model), {"model": "tiny"})
    code, out = run_cli("apply", str(original), "--direction", str(tmp_path / "dir.safetensors"), "--out",
                        str(tmp_path / "edited"), "-q")
    assert code == 0, out
    lm = load_model(original, dtype="float32", device="cpu")
    view = edited_view(lm, load_direction(tmp_path / "dir.safetensors"), EditOptions(), "edited")
    with torch.no_grad():
        with view.running():
            hooked = view.model(IDS).logits
        plain = lm.model(IDS).logits
        written = AutoModelForCausalLM.from_pretrained(tmp_path / "edited", dtype=torch.float32).eval()(IDS).logits
    assert (hooked - written).abs().max().item() <= LOGIT_TOLERANCE
    assert (hooked - plain).abs().max() >= EFFECT_FLOOR


def test_multi_token_prediction_layers_after_the_decoder_layers_are_left_unedited(tmp_path):
    """GLM-4.5 and DeepSeek-V3 checkpoints store their multi-token-prediction layer as model.layers.N (N =
    num_hidden_layers), which transformers skips on loading: the edit leaves it byte-identical and is exact on the
    model; a layer past the decoder layers that the config does not declare is still refused."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from tests.test_apply import folder_hashes

    model = build_model(FAMILIES["glm4_moe"])
    original = save_sharded(model, tmp_path / "original")
    index = json.loads((original / "model.safetensors.index.json").read_text())
    extra = {}
    for name, shard in index["weight_map"].items():
        if name.startswith("model.layers.1."):
            with safe_open(original / shard, "pt") as f:
                extra[name.replace("model.layers.1.", "model.layers.2.")] = f.get_tensor(name).clone()
    save_file(extra, original / "model-mtp.safetensors", metadata={"format": "pt"})
    index["weight_map"].update({name: "model-mtp.safetensors" for name in extra})
    (original / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((original / "config.json").read_text())
    (original / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    r = written_direction(model)
    save_direction(tmp_path / "dir.safetensors", r, {"model": "tiny"})
    code, out = run_cli("apply", str(original), "--direction", str(tmp_path / "dir.safetensors"), "--out",
                        str(tmp_path / "edited"))
    assert code == 0 and "multi-token-prediction" in out, out
    mtp = "model-mtp.safetensors"
    assert folder_hashes(tmp_path / "edited")[mtp] == folder_hashes(original)[mtp]
    assert run_cli("verify", str(original), str(tmp_path / "edited"))[0] == 0
    hooks = ablation_hooks(model, hook_paths(FAMILIES["glm4_moe"], 2), r / r.norm())
    with torch.no_grad():
        expected = model(IDS).logits
        for h in hooks:
            h.remove()
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "edited", dtype=torch.float32).eval()(IDS).logits
    assert (got - expected).abs().max().item() <= LOGIT_TOLERANCE
    (original / "config.json").write_text(json.dumps(config))
    code, out = run_cli("apply", str(original), "--direction", str(tmp_path / "dir.safetensors"), "--out",
                        str(tmp_path / "refused"))
    assert code == 2 and "names layer 2 but config.json has 2 layers" in out, out
