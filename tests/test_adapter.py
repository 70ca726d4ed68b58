"""`abliterate apply --adapter` writes a plain peft LoRA adapter that computes what `apply` writes: per family,
PeftModel(base, adapter) logits equal the edited checkpoint's, peft loads every entry, the adapter is rank 1
and small, it loads in a process that never imports abliterate, and what it cannot express is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from abliterate.edit.plan import EditOptions, plan_edit
from abliterate.io.checkpoint import Checkpoint
from abliterate.io.direction_file import load_direction, save_direction
from abliterate.lora.export import AdapterOptions, export_adapter
from abliterate.lora.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from tests.families import (
    EFFECT_FLOOR,
    FAMILIES,
    IDS,
    LOGIT_TOLERANCE,
    Family,
    build_model,
    save_sharded,
    written_direction,
)
from tests.test_apply import run_cli

ALL_FAMILIES = FAMILIES
# Families whose whole adapter is refused in one line (why, and the components the refusal offers instead): the
# fixture checks the refusal, then writes the edit and the adapter of those components.
ADAPTER_REFUSED = {"dbrx": ("no in-memory layout of its experts that peft can adapt", "embed,attn")}


@dataclass(frozen=True)
class Built:
    family: Family
    root: Path
    original: Path
    edited: Path
    adapter: Path
    direction: Path


def build_family(name: str, root: Path, *extra: str, dtype: torch.dtype = torch.float32) -> Built:
    """A family's random model in shards, its `apply` output and its adapter, from one direction (where peft refuses
    some writer, of the components an adapter carries)."""
    family = ALL_FAMILIES[name]
    if family.adapter_refused is not None:
        extra = ("--components", family.adapter_refused[1], *extra)
    model = build_model(family)
    direction = written_direction(model)
    original = save_sharded(model.to(dtype), root / "original")
    save_direction(root / "dir.safetensors", direction, {"model": "tiny", "layer": 1, "position": -1})
    common = ("--direction", str(root / "dir.safetensors"), "-q", *extra)
    if name in ADAPTER_REFUSED and "--components" not in extra:
        why, components = ADAPTER_REFUSED[name]
        code, out = run_cli("apply", str(original), "--out", str(root / "refused"), "--adapter", *common)
        assert code == 2 and why in out and f"--components {components}" in out and "Traceback" not in out, out
        assert not (root / "refused").exists()
        common = (*common, "--components", components)
    code, out = run_cli("apply", str(original), "--out", str(root / "edited"), *common)
    assert code == 0, out
    code, out = run_cli("apply", str(original), "--out", str(root / "adapter"), "--adapter", *common)
    assert code == 0, out
    return Built(family, root, original, root / "edited", root / "adapter", root / "dir.safetensors")


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def load(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def adapter_tensors(adapter: Path) -> dict[str, torch.Tensor]:
    with safe_open(adapter / ADAPTER_WEIGHTS, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module", params=sorted(ALL_FAMILIES))
def built(request, tmp_path_factory) -> Built:
    """A family's adapter; where peft refuses some writer (a Mamba out_proj), the refusal is checked and the adapter
    built from the components it does carry."""
    root = tmp_path_factory.mktemp(request.param)
    refused = ALL_FAMILIES[request.param].adapter_refused
    if refused is None:
        return build_family(request.param, root)
    why, components = refused
    original = save_sharded(build_model(ALL_FAMILIES[request.param]), root / "refused")
    save_direction(root / "r.safetensors", torch.randn(32, generator=torch.Generator().manual_seed(0)), {})
    code, out = run_cli("apply", str(original), "--direction", str(root / "r.safetensors"), "--adapter", "-q",
                        "--out", str(root / "no-adapter"))
    assert code != 0 and why in out and f"--components {components}" in out and "Traceback" not in out, out
    assert not (root / "no-adapter").exists()
    return build_family(request.param, root)


def test_peft_model_computes_what_the_edited_checkpoint_computes(built):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(load(built.original), built.adapter).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    expected, unedited = logits(load(built.edited)), logits(load(built.original))
    assert (expected - unedited).abs().max() >= EFFECT_FLOOR, "the direction should matter to this model"
    assert (logits(peft_model) - expected).abs().max().item() <= LOGIT_TOLERANCE


def test_peft_loads_every_entry_of_the_adapter(built):
    """Nothing is silently dropped: each saved tensor is in the loaded model, with its values."""
    peft_model = PeftModel.from_pretrained(load(built.original), built.adapter)
    loaded = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    saved = adapter_tensors(built.adapter)
    state = {k.replace(".default", ""): v for k, v in peft_model.state_dict().items()}
    assert set(saved) <= set(loaded) | set(state)
    for key, value in saved.items():
        assert torch.equal(state[key].to(value.dtype), value), key


def test_adapter_is_rank_one_lora_of_the_base_model_and_small(built):
    config = json.loads((built.adapter / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["use_dora"]) == (1, 1, 0.0, False)
    assert config["base_model_name_or_path"] == str(built.original.absolute())
    assert config["fan_in_fan_out"] == (built.family.model_type == "gpt2")
    tensors = adapter_tensors(built.adapter)
    for key, a in tensors.items():
        if "lora_A" in key or "lora_embedding_A" in key:  # rank 1; fused experts: one row per expert
            b = tensors[key.replace("_A", "_B")]
            assert a.shape[0] == b.shape[1] and (a.shape[0] == 1 or ".experts." in key), key
        else:
            assert key.endswith(".lora_B.weight") or key.endswith("lora_embedding_B") or key.endswith(".bias"), key
    total = sum(p.stat().st_size for p in built.original.glob("*.safetensors"))
    assert (built.adapter / ADAPTER_WEIGHTS).stat().st_size < total / 4


def test_tied_output_layer_keeps_the_original_matrix(built):
    if not built.family.tied:
        pytest.skip("embeddings not tied in this family")
    base = load(built.original)
    original = base.get_output_embeddings().weight.detach().clone()
    peft_model = PeftModel.from_pretrained(base, built.adapter)
    assert torch.equal(peft_model.get_output_embeddings().weight, original)
    assert not torch.equal(peft_model.get_input_embeddings()(IDS), torch.nn.functional.embedding(IDS, original))


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> dict[str, Built]:
    """GPT-2 (Conv1D, biases, tied), Mixtral (per-expert on disk, fused in memory), gpt-oss (nested, fused bias)."""
    return {n: build_family(n, tmp_path_factory.mktemp(n)) for n in ("gpt2", "mixtral", "gpt_oss")}


def test_adapter_loads_with_plain_peft_in_a_process_that_never_imports_abliterate(three, tmp_path):
    script = textwrap.dedent("""
        import sys, torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        ids = torch.load(sys.argv[1])
        for original, adapter, out in zip(*[iter(sys.argv[2:])] * 3):
            base = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32)
            model = PeftModel.from_pretrained(base, adapter).eval()
            with torch.no_grad():
                torch.save(model(ids).logits, out)
        assert not [m for m in sys.modules if m.startswith("abliterate")], "abliterate was imported"
    """)
    torch.save(IDS, tmp_path / "ids.pt")
    args = [str(tmp_path / "ids.pt")]
    for name, b in three.items():
        args += [str(b.original), str(b.adapter), str(tmp_path / f"{name}.pt")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, b in three.items():
        got = torch.load(tmp_path / f"{name}.pt")
        assert (got - logits(load(b.edited))).abs().max().item() <= LOGIT_TOLERANCE, name


def test_biases_are_carried_as_peft_lora_only_biases_and_can_be_left_out(three, tmp_path):
    gpt2 = three["gpt2"]
    config = json.loads((gpt2.adapter / ADAPTER_CONFIG).read_text())
    assert config["bias"] == "lora_only"
    assert any(k.endswith("c_proj.base_layer.bias") for k in adapter_tensors(gpt2.adapter))
    code, out = run_cli("apply", str(gpt2.original), "--direction", str(gpt2.direction), "--out",
                        str(tmp_path / "pure"), "--adapter", "--ignore-biases", "-q")
    assert code == 0, out
    assert json.loads((tmp_path / "pure" / ADAPTER_CONFIG).read_text())["bias"] == "none"
    assert not [k for k in adapter_tensors(tmp_path / "pure") if k.endswith("bias")]
    manifest = json.loads((tmp_path / "pure" / "abliterate.json").read_text())
    assert manifest["edits"] and not [n for n in manifest["edits"] if n.endswith("bias")]


def test_export_reads_each_target_tensor_once(tmp_path, monkeypatch):
    built = build_family("gpt2", tmp_path, "--max-memory", "4KB")
    ckpt = Checkpoint.open(built.original)
    plan = plan_edit(ckpt, EditOptions())
    direction = load_direction(built.direction)
    read = {"bytes": 0}
    preadv = os.preadv

    def counting(fd, buffers, offset):
        n = preadv(fd, buffers, offset)
        read["bytes"] += n
        return n

    monkeypatch.setattr(os, "preadv", counting)
    export_adapter(ckpt, plan, direction, tmp_path / "again", AdapterOptions(max_memory=4096, quiet=True))
    assert read["bytes"] == sum(e.info.nbytes for e in plan.edits.values())


def test_hub_cache_snapshot_names_its_repository_as_the_base_model(three, tmp_path):
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-gpt2" / "snapshots" / "0123abc"
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(three["gpt2"].original, target_is_directory=True)
    code, out = run_cli("apply", str(snapshot), "--direction", str(three["gpt2"].direction), "--out",
                        str(tmp_path / "a"), "--adapter", "-q")
    assert code == 0, out
    assert json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == "tiny-org/tiny-gpt2"
    code, out = run_cli("apply", str(snapshot), "--direction", str(three["gpt2"].direction), "--out",
                        str(tmp_path / "b"), "--adapter", "--base-model", "me/mine", "-q")
    assert code == 0, out
    assert json.loads((tmp_path / "b" / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == "me/mine"


def adapter_fails(built: Built, tmp_path: Path, *extra: str) -> str:
    out = tmp_path / "refused"
    code, output = run_cli("apply", str(built.original), "--direction", str(built.direction), "--out", str(out),
                           "-q", *extra)
    lines = output.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "abliterate-tmp" in p.name]
    return lines[0]


def test_keep_tied_cannot_be_an_adapter(three, tmp_path):
    assert "--keep-tied" in adapter_fails(three["gpt2"], tmp_path, "--adapter", "--keep-tied")


def test_adapter_options_need_adapter(three, tmp_path):
    assert "--adapter" in adapter_fails(three["gpt2"], tmp_path, "--ignore-biases")


def test_a_bias_without_its_layer_is_refused(three, tmp_path):
    line = adapter_fails(three["gpt2"], tmp_path, "--adapter", "--targets", r"transformer\.h\.0\.attn\.c_proj\.bias")
    assert "c_proj.bias" in line and "--ignore-biases" in line


def test_some_experts_of_a_fused_parameter_are_refused(three, tmp_path):
    line = adapter_fails(three["mixtral"], tmp_path, "--adapter", "--targets",
                         r"model\.layers\.0\.block_sparse_moe\.experts\.0\.w2\.weight")
    assert "mlp.experts.down_proj" in line and "expert" in line


def test_experts_of_an_unknown_layout_are_refused(three, tmp_path):
    config_path = three["mixtral"].original / "config.json"
    other = tmp_path / "other"
    other.mkdir()
    for p in three["mixtral"].original.iterdir():
        (other / p.name).symlink_to(p)
    (other / "config.json").unlink()
    config = json.loads(config_path.read_text())
    config["model_type"] = "brand_new_moe"
    (other / "config.json").write_text(json.dumps(config))
    built = Built(three["mixtral"].family, tmp_path, other, tmp_path / "x", tmp_path / "y", three["mixtral"].direction)
    line = adapter_fails(built, tmp_path, "--adapter", "--targets", r".*\.w2\.weight")
    assert "brand_new_moe" in line and "no in-memory layout" in line
