"""`abliterate apply` is exact: per family, edited logits equal the original under ablation hooks,
edited tensors keep nothing along the direction, and everything else is byte-identical."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from abliterate.cli.main import cli
from abliterate.io.direction_file import save_direction
from tests.families import (
    EFFECT_FLOOR,
    FAMILIES,
    FAMILY_NAMES,
    IDS,
    LOGIT_TOLERANCE,
    ablation_hooks,
    build_model,
    hook_paths,
    save_sharded,
    written_direction,
)


def folder_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def edited_family(request, tmp_path_factory):
    """(family, original folder, edited folder, unit direction, input hashes) for one family."""
    family = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = build_model(family)
    original = save_sharded(model, root / "original")
    (original / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    (original / "chat_template.jinja").write_text("{{ messages }}")
    r = written_direction(model)
    save_direction(root / "dir.safetensors", r, {"model": "tiny", "layer": 1, "position": -1})
    before = folder_hashes(original)
    code, out = run_cli("apply", str(original), "--direction", str(root / "dir.safetensors"),
                        "--out", str(root / "edited"), "--quiet")
    assert code == 0, out
    return family, original, root / "edited", r / r.norm(), before


def test_edited_logits_equal_original_with_ablation_hooks(edited_family):
    family, original, edited, r, _ = edited_family
    base = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).eval()
    hooks = ablation_hooks(base, hook_paths(family, base.config.get_text_config().num_hidden_layers), r)
    with torch.no_grad():
        expected = base(IDS).logits
        for h in hooks:
            h.remove()
        unedited = base(IDS).logits
        got = AutoModelForCausalLM.from_pretrained(edited, dtype=torch.float32).eval()(IDS).logits
    assert (expected - unedited).abs().max() >= EFFECT_FLOOR, "the direction should matter to this model"
    assert (got - expected).abs().max().item() <= LOGIT_TOLERANCE


def tensors_of(folder: Path) -> dict[str, tuple[str, list[str], dict]]:
    """shard -> (tensor names in file order, with tensors)"""
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        if shard.name == "refusal_direction.safetensors":
            continue
        with safe_open(shard, "pt") as f:
            out[shard.name] = (list(f.keys()), {k: f.get_tensor(k) for k in f.keys()})
    return out


def header_order(path: Path) -> list[str]:
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    header.pop("__metadata__", None)
    return sorted(header, key=lambda k: header[k]["data_offsets"][0])


def test_edit_touches_only_residual_writers_and_removes_the_direction(edited_family):
    family, original, edited, r, before = edited_family
    manifest = json.loads((edited / "abliterate.json").read_text())
    edited_names = set(manifest["edits"])
    assert any("embed" in n or "wte" in n for n in edited_names)
    layers = AutoConfig.for_model(family.model_type, **family.config).get_text_config().num_hidden_layers
    assert len(edited_names) >= 1 + family.writers_per_layer * layers
    orig, new = tensors_of(original), tensors_of(edited)
    assert orig.keys() == new.keys()
    untied = (manifest["untie"] or {}).get("output")
    for shard, (names, tensors) in orig.items():
        new_order = [n for n in header_order(edited / shard) if n != untied or untied in names]
        assert new_order == header_order(original / shard), "tensor order changed"
        for name in names:
            a, b = tensors[name], new[shard][1][name]
            assert (a.dtype, a.shape) == (b.dtype, b.shape)
            if name in edited_names:
                axis = manifest["edits"][name]["hidden_axis"]
                along = (r.double() @ b.double().reshape(-1, len(r), b.shape[-1]) if axis == -2 else
                         b.double().reshape(-1, len(r)) @ r.double())
                assert along.norm() <= 1e-6 * a.double().norm(), name
                assert not torch.equal(a, b)
            elif name != untied:
                assert a.reshape(-1).view(torch.uint8).numpy().tobytes() == \
                    b.reshape(-1).view(torch.uint8).numpy().tobytes(), f"{name} changed"
    for name in ("config.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (original / name).exists():
            assert (edited / name).exists(), name
    assert (edited / "tokenizer_config.json").read_bytes() == (original / "tokenizer_config.json").read_bytes()
    assert folder_hashes(original) == before, "the input folder was modified"
    if (original / "model.safetensors.index.json").exists() and not untied:
        assert (edited / "model.safetensors.index.json").read_bytes() == \
            (original / "model.safetensors.index.json").read_bytes()


def test_tied_embeddings_are_untied_with_the_original_output_matrix(edited_family):
    family, original, edited, _, _ = edited_family
    if not family.tied:
        pytest.skip("embeddings not tied in this family")
    manifest = json.loads((edited / "abliterate.json").read_text())
    out_name, embed_name = manifest["untie"]["output"], manifest["untie"]["copied_from"]
    config = json.loads((edited / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    index = json.loads((edited / "model.safetensors.index.json").read_text())
    assert out_name in index["weight_map"]
    orig_embed = next(t[embed_name] for _, t in tensors_of(original).values() if embed_name in t)
    new_out = next(t[out_name] for _, t in tensors_of(edited).values() if out_name in t)
    assert torch.equal(orig_embed, new_out)


def test_verify_accepts_the_edit(edited_family):
    _, original, edited, _, _ = edited_family
    code, out = run_cli("verify", str(original), str(edited))
    assert code == 0, out
    assert "OK" in out
