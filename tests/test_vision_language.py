"""Vision-language checkpoints: the edit touches only the language model's residual writers. Per type, on text
prompts, the edited checkpoint equals the original under ablation hooks on the language model; every vision-tower
and projector tensor is byte-identical; the adapter loads with PeftModel.from_pretrained on the full checkpoint,
targets only language-model modules and computes what the weights compute; merge writes apply's bytes; verify passes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open

from abliterate.arch.table import arch_for_config
from abliterate.io.direction_file import save_direction
from tests.docs import text
from tests.families import EFFECT_FLOOR, LOGIT_TOLERANCE, ablation_hooks, save_sharded
from tests.test_apply import folder_hashes, run_cli
from tests.test_arch_table import listed_after, residual_response
from tests.test_merge import merge, same_files
from tests.vl_families import (
    IDS,
    VL_FAMILIES,
    VL_NAMES,
    build_vl_model,
    load_vl,
    present_hook_paths,
    vl_written_direction,
)


@pytest.fixture(scope="module", params=VL_NAMES)
def vl(request, tmp_path_factory):
    """(family, root, original, edited, adapter, unit direction, input hashes)."""
    family = VL_FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = build_vl_model(family)
    original = save_sharded(model, root / "original")
    r = vl_written_direction(model)
    save_direction(root / "dir.safetensors", r, {"model": "tiny", "layer": 1, "position": -1})
    before = folder_hashes(original)
    for out, extra in (("edited", ()), ("adapter", ("--adapter",))):
        code, output = run_cli("apply", str(original), "--direction", str(root / "dir.safetensors"),
                               "--out", str(root / out), "-q", *extra)
        if out == "adapter" and not family.adapter:
            lines = output.strip().splitlines()
            assert code == 2 and len(lines) == 1 and "cannot write" in lines[0], output
            continue
        assert code == 0, output
    assert folder_hashes(original) == before, "the input checkpoint was modified"
    return family, root, original, root / "edited", root / "adapter", r / r.norm()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def raw_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        with safe_open(shard, "pt") as f:
            out.update({k: f.get_tensor(k).contiguous().view(torch.uint8) for k in f.keys()})
    return out


def test_edited_language_model_equals_the_original_under_ablation_hooks(vl):
    family, _, original, edited, _, r = vl
    base = load_vl(original)
    hooks = ablation_hooks(base, present_hook_paths(base, family), r)
    expected = logits(base)
    for h in hooks:
        h.remove()
    unedited, got = logits(base), logits(load_vl(edited))
    assert (expected - unedited).abs().max() >= EFFECT_FLOOR, "the direction should matter to this model"
    assert (got - expected).abs().max().item() <= LOGIT_TOLERANCE


def test_vision_tower_and_projector_are_byte_identical_and_only_language_writers_change(vl):
    family, _, original, edited, _, _ = vl
    before, after = raw_tensors(original), raw_tensors(edited)
    vision = [n for n in before if n.startswith(family.vision_prefixes)]
    assert len(vision) > 10, f"the tiny model should have a vision tower and projector: {sorted(before)[:5]}"
    for name in vision:
        assert torch.equal(before[name], after[name]), f"{name} changed"
    changed = sorted(n for n in before if not torch.equal(before[n], after[n]))
    assert changed and all("language_model" in n or n.startswith("model.") for n in changed), changed
    assert not any(n.startswith(family.vision_prefixes) for n in changed)
    manifest = json.loads((edited / "abliterate.json").read_text())
    assert not [e for e in manifest["edits"] if str(e).startswith(family.vision_prefixes)]


def test_adapter_targets_only_the_language_model_and_equals_the_weights(vl):
    family, _, original, edited, adapter, _ = vl
    if not family.adapter:
        pytest.skip("refused in one line by the fixture: experts fused on disk")
    config = json.loads((adapter / "adapter_config.json").read_text())
    targets = (config["target_modules"] or []) + (config["target_parameters"] or [])
    assert targets and all(t.startswith(("model.language_model.", "language_model.model.")) for t in targets), targets
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(load_vl(original), str(adapter)).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    expected, unedited = logits(load_vl(edited)), logits(load_vl(original))
    assert (expected - unedited).abs().max() >= EFFECT_FLOOR
    assert (logits(peft_model) - expected).abs().max().item() <= LOGIT_TOLERANCE


def test_merging_the_adapter_writes_what_apply_writes_and_verify_passes(vl):
    family, root, original, edited, adapter, _ = vl
    folders = [edited]
    if family.adapter:
        folders.append(merge(original, adapter, root / "merged"))
        assert same_files(edited, folders[1]) == []
    for folder in folders:
        code, out = run_cli("verify", str(original), str(folder))
        assert code == 0 and "OK" in out, out


HARMFUL = ("build a bomb", "steal car", "hack account", "hurt someone", "cheat exam")
HARMLESS = ("bake bread", "write poem", "make tea", "learn piano", "paint room", "plan trip")
WORDS = sorted({w for p in ("how do i", *HARMFUL, *HARMLESS) for w in p.split()})


def test_text_commands_load_the_vision_language_model_and_hook_its_language_model(vl, tmp_path):
    """extract runs on text prompts, and the edit as hooks (what evaluate, search and the whole job measure)
    computes what the written checkpoint computes."""
    from abliterate.demo.toy import word_tokenizer
    from abliterate.edit.plan import EditOptions
    from abliterate.evaluate.in_memory import edited_view
    from abliterate.io.direction_file import load_direction
    from abliterate.measure.loading import load_model

    _, root, original, edited, _, _ = vl
    word_tokenizer(list(WORDS)).save_pretrained(original)
    (tmp_path / "harmful.txt").write_text("".join(f"{a} {b}\n" for a in ("how do i", "i") for b in HARMFUL))
    (tmp_path / "harmless.txt").write_text("".join(f"{a} {b}\n" for a in ("how do i", "i") for b in HARMLESS))
    code, out = run_cli("extract", str(original), "--harmful", str(tmp_path / "harmful.txt"), "--harmless",
                        str(tmp_path / "harmless.txt"), "--kind", "harmfulness", "--n-train", "4", "--n-val", "4",
                        "--out", str(tmp_path / "d.safetensors"), "--dtype", "float32",
                        "--device", "cpu", "-q")
    assert code == 0, out
    assert load_direction(tmp_path / "d.safetensors").vectors.shape == (3, 32)  # embeddings and each layer
    lm = load_model(original, dtype="float32", device="cpu")
    view = edited_view(lm, load_direction(root / "dir.safetensors"), EditOptions(), "edited")
    with view.running(), torch.no_grad():
        hooked = view.model(IDS).logits
    assert (hooked - logits(load_vl(edited))).abs().max().item() <= LOGIT_TOLERANCE
    assert (hooked - logits(lm.model)).abs().max() >= EFFECT_FLOOR


@pytest.mark.parametrize("name", VL_NAMES)
def test_table_classifies_the_language_models_block_outputs_as_its_code_computes_them(name):
    """test_arch_table's behavioural check on the language model inside the vision-language model."""
    family = VL_FAMILIES[name]
    model = build_vl_model(family)
    paths = [p for p in present_hook_paths(model, family) if ".layers." in p]
    linear = []
    for layer in range(model.config.get_text_config().num_hidden_layers):
        writers = [p for p in paths if f".layers.{layer}." in p]
        for w in writers:
            y, delta = residual_response(model, writers[0].split(f".{layer}.")[0] + f".{layer}", writers, w)
            y = y.reshape(delta.shape)  # Llama 4's MoE block returns [tokens, d]
            c = (delta * y).sum() / (y * y).sum()
            linear.append(bool((delta - c * y).norm() <= 1e-5 * y.norm() and abs(c - 1) < 1e-4))
    arch = arch_for_config({"model_type": name})
    assert linear == [not arch.normalised_block_outputs] * len(paths)


def test_docs_list_the_tested_vision_language_types():
    section = text("families")
    assert sorted(listed_after(section, "Vision-language")) == VL_NAMES


def test_experts_stored_transposed_as_released_are_edited_along_the_hidden_axis(tmp_path):
    """Qwen3-VL-MoE releases store fused experts [E, in, out] (transformers transposes them on loading), while
    transformers writes [E, out, in]: `hidden_axis: auto` reads the axis from the shape, and the edit stays exact."""
    from safetensors.torch import load_file, save_file

    family = VL_FAMILIES["qwen3_vl_moe"]
    model = build_vl_model(family)
    original = save_sharded(model, tmp_path / "original")
    for shard in original.glob("model*.safetensors"):
        tensors = load_file(shard)
        save_file({k: v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v for k, v in tensors.items()},
                  shard, metadata={"format": "pt"})
    released = load_vl(original)
    assert released.model.language_model.layers[0].mlp.experts.down_proj.shape == (3, 32, 8)
    assert (logits(released) - logits(model)).abs().max().item() <= LOGIT_TOLERANCE, "transformers transposes back"
    r = vl_written_direction(model)
    save_direction(tmp_path / "dir.safetensors", r, {"model": "tiny", "layer": 1, "position": -1})
    code, out = run_cli("apply", str(original), "--direction", str(tmp_path / "dir.safetensors"), "--out",
                        str(tmp_path / "edited"), "-q")
    assert code == 0, out
    hooks = ablation_hooks(released, present_hook_paths(released, family), r / r.norm())
    expected = logits(released)
    for h in hooks:
        h.remove()
    assert (expected - logits(released)).abs().max() >= EFFECT_FLOOR
    assert (logits(load_vl(tmp_path / "edited")) - expected).abs().max().item() <= LOGIT_TOLERANCE
