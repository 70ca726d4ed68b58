"""`abliterate merge BASE ADAPTER` merges LoRA adapters the way peft computes them: an abliterate adapter gives
byte for byte what `apply` writes (every family, float32 and bfloat16, whole-matrix and two-pass chunking), a
higher-rank peft adapter gives peft's merge_and_unload (1e-5 relative), and what it cannot merge is refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file

from abliterate.lora.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from tests.test_adapter import ALL_FAMILIES, Built, build_family, load, logits
from tests.test_apply import folder_hashes, run_cli


def tensors_by_name(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        with safe_open(shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def merge(base: Path, adapter: Path, out: Path, *extra: str) -> Path:
    code, output = run_cli("merge", str(base), str(adapter), "--out", str(out), "-q", *extra)
    assert code == 0, output
    return out


def same_files(a: Path, b: Path, skip: tuple[str, ...] = ("abliterate.json",)) -> list[str]:
    """Names of files that differ between two folders (a missing file counts as different)."""
    names = {p.name for p in a.iterdir()} | {p.name for p in b.iterdir()}
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None  # noqa: E731
    return sorted(n for n in names - set(skip) if digest(a / n) != digest(b / n))


@pytest.fixture(scope="module", params=sorted(ALL_FAMILIES))
def built(request, tmp_path_factory) -> Built:
    return build_family(request.param, tmp_path_factory.mktemp(request.param))


def test_merging_the_adapter_writes_what_apply_writes_byte_for_byte(built):
    before = folder_hashes(built.original)
    merged = merge(built.original, built.adapter, built.root / "merged")
    assert same_files(built.edited, merged) == []
    assert folder_hashes(built.original) == before, "the base folder was modified"
    code, out = run_cli("verify", str(built.original), str(merged))
    assert code == 0 and "OK" in out, out


@pytest.mark.parametrize("name", ["llama", "gpt2", "mixtral", "gpt_oss", "granitemoe"])
def test_byte_identity_holds_for_two_pass_chunks_and_bfloat16(name, tmp_path):
    """A 4 KB budget splits matrices into row blocks (two passes in `apply`); bfloat16 rounds to nearest even."""
    small = build_family(name, tmp_path / "small", "--max-memory", "4KB")
    assert same_files(small.edited, merge(small.original, small.adapter, tmp_path / "m1", "--max-memory", "4KB")) == []
    bf16 = build_family(name, tmp_path / "bf16", dtype=torch.bfloat16)
    assert same_files(bf16.edited, merge(bf16.original, bf16.adapter, tmp_path / "m2")) == []


def test_an_adapter_with_one_module_per_expert_merges_onto_the_per_expert_tensors(tmp_path):
    """The transformers 4 form of a Mixtral adapter (experts as separate modules, on-disk names) merges too."""
    b = build_family("mixtral", tmp_path)
    per_expert = copy_adapter(b.adapter, tmp_path / "per-expert")
    modules = []

    def split(tensors: dict[str, torch.Tensor]) -> None:
        for key in [k for k in tensors if ".mlp.experts.lora_A" in k]:
            a, bb = tensors.pop(key), tensors.pop(key.replace("lora_A", "lora_B"))
            layer = key.split(".mlp.")[0]
            for e in range(a.shape[0]):
                module = f"{layer}.block_sparse_moe.experts.{e}.w2".removeprefix("base_model.model.")
                tensors[f"base_model.model.{module}.lora_A.weight"] = a[e : e + 1].clone()
                tensors[f"base_model.model.{module}.lora_B.weight"] = bb[:, e : e + 1].clone()
                modules.append(module)

    edit_weights(per_expert, split)
    config = json.loads((per_expert / ADAPTER_CONFIG).read_text())
    edit_config(per_expert, target_parameters=None, target_modules=config["target_modules"] + modules)
    assert same_files(b.edited, merge(b.original, per_expert, tmp_path / "merged")) == []


# ---------------------------------------------------------------- any LoRA adapter, against peft's own merge

PEFT_ADAPTERS = {
    "llama": dict(r=3, lora_alpha=5, use_rslora=True, rank_pattern={"o_proj": 4}, alpha_pattern={"down_proj": 16},
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                  "embed_tokens"]),
    "gpt2": dict(r=2, lora_alpha=4, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc", "wte"]),
    "gpt_neox": dict(r=2, lora_alpha=3, lora_bias=True, bias="lora_only",
                     target_modules=["query_key_value", "dense", "dense_4h_to_h"]),
    "mixtral": dict(r=2, lora_alpha=4, target_modules=["o_proj"],
                    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
    "qwen2_moe": dict(r=2, lora_alpha=4, target_modules=["o_proj", "shared_expert.down_proj"],
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
    "gpt_oss": dict(r=2, lora_alpha=4, target_modules=["o_proj"],
                    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj",
                                       "mlp.experts.down_proj_bias"]),
    "granitemoe": dict(r=2, lora_alpha=4, target_parameters=["block_sparse_moe.experts.gate_up_proj",
                                                             "block_sparse_moe.experts.down_proj"]),
}


def peft_adapter(name: str, root: Path) -> tuple[Path, Path, torch.Tensor, dict[str, torch.Tensor]]:
    """(base folder, adapter folder, PeftModel logits, tensors of peft's merge_and_unload) for a random adapter."""
    from tests.families import build_model, save_sharded

    model = build_model(ALL_FAMILIES[name])
    base = save_sharded(model, root / "base")
    torch.manual_seed(5)
    peft_model = get_peft_model(model, LoraConfig(lora_dropout=0.0, init_lora_weights=False, **PEFT_ADAPTERS[name]))
    with torch.no_grad():
        for key, p in peft_model.named_parameters():
            if "lora_" in key:
                p.copy_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(root / "adapter")
    expected = logits(peft_model.eval())
    peft_model.merge_and_unload().save_pretrained(root / "peft-merged")
    return base, root / "adapter", expected, tensors_by_name(root / "peft-merged")


@pytest.mark.parametrize("name", sorted(PEFT_ADAPTERS))
def test_merging_a_higher_rank_peft_adapter_matches_peft(name, tmp_path):
    base, adapter, expected, reference = peft_adapter(name, tmp_path)
    merged = merge(base, adapter, tmp_path / "merged")
    got, original = tensors_by_name(merged), tensors_by_name(base)
    changed = [k for k in got if k in original and not torch.equal(got[k], original[k])]
    assert changed, "the adapter should change something"
    for key, value in got.items():
        if key in reference and key != "lm_head.weight":
            scale = reference[key].abs().max().clamp_min(1e-6)
            assert (value - reference[key]).abs().max() <= 1e-5 * scale, key
    assert set(changed) <= set(reference)
    assert (logits(load(merged)) - expected).abs().max().item() <= 1e-4  # peft's unmerged forward


def test_a_tied_embedding_is_untied_as_peft_computes_it_not_as_merge_and_unload_writes_it(tmp_path):
    """peft's merge_and_unload changes the shared matrix, so its output layer changes too; PeftModel's does not."""
    base, adapter, expected, reference = peft_adapter("gpt2", tmp_path)
    merged = merge(base, adapter, tmp_path / "merged")
    got, original = tensors_by_name(merged), tensors_by_name(base)
    wte = "transformer.wte.weight"
    assert torch.allclose(got[wte], reference[wte], rtol=0, atol=1e-6)  # the same input embedding...
    assert not torch.equal(reference[wte], original[wte])  # ...which peft's merged model also uses as output layer
    assert torch.equal(got["lm_head.weight"], original[wte])
    assert json.loads((merged / "config.json").read_text())["tie_word_embeddings"] is False
    assert (logits(load(merged)) - expected).abs().max().item() <= 1e-4


# ---------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("llama-peft")
    base, adapter, _, _ = peft_adapter("llama", root)
    return base, adapter


def copy_adapter(adapter: Path, dest: Path) -> Path:
    dest.mkdir()
    for p in adapter.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


def edit_config(adapter: Path, **changes) -> None:
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    config.update(changes)
    (adapter / ADAPTER_CONFIG).write_text(json.dumps(config))


def edit_weights(adapter: Path, change) -> None:
    with safe_open(adapter / ADAPTER_WEIGHTS, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, adapter / ADAPTER_WEIGHTS, metadata={"format": "pt"})


def merge_fails(base: Path, adapter: Path) -> str:
    out = adapter.parent / "refused"
    code, output = run_cli("merge", str(base), str(adapter), "--out", str(out), "-q")
    lines = output.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), output
    assert not out.exists() and not [p for p in adapter.parent.iterdir() if "abliterate-tmp" in p.name]
    return lines[0]


def test_dora_is_refused(llama_adapter, tmp_path):
    base, adapter = llama_adapter
    adapter = copy_adapter(adapter, tmp_path / "dora")
    edit_config(adapter, use_dora=True)
    assert "use_dora" in merge_fails(base, adapter)


def test_other_peft_methods_are_refused(llama_adapter, tmp_path):
    base, adapter = llama_adapter
    adapter = copy_adapter(adapter, tmp_path / "ia3")
    edit_config(adapter, peft_type="IA3")
    assert "IA3" in merge_fails(base, adapter)


def test_modules_to_save_are_refused(llama_adapter, tmp_path):
    base, adapter = llama_adapter
    adapter = copy_adapter(adapter, tmp_path / "mts")
    edit_config(adapter, modules_to_save=["lm_head"])
    assert "modules_to_save" in merge_fails(base, adapter)


def test_an_adapter_for_another_model_is_refused(llama_adapter, tmp_path):
    _, adapter = llama_adapter
    other = build_family("gpt_neox", tmp_path / "neox")
    line = merge_fails(other.original, copy_adapter(adapter, tmp_path / "wrong"))
    assert "neox" in line and "has no" in line and "another model" in line


def test_factors_of_the_wrong_shape_are_refused(llama_adapter, tmp_path):
    base, adapter = llama_adapter
    adapter = copy_adapter(adapter, tmp_path / "shape")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    edit_weights(adapter, lambda t: t.update({key: torch.zeros(3, 20)}))
    assert "q_proj" in merge_fails(base, adapter)


def test_a_bias_without_a_place_is_refused(llama_adapter, tmp_path):
    base, adapter = llama_adapter
    adapter = copy_adapter(adapter, tmp_path / "bias")
    key = "base_model.model.model.layers.0.self_attn.o_proj.base_layer.bias"
    edit_weights(adapter, lambda t: t.update({key: torch.zeros(32)}))
    line = merge_fails(base, adapter)
    assert "o_proj.bias" in line and "cannot be placed" in line


def test_a_tied_output_layer_adapter_is_refused(tmp_path):
    tied = build_family("qwen2", tmp_path / "qwen2")
    model = load(tied.original)
    peft_model = get_peft_model(model, LoraConfig(r=1, target_modules=["lm_head"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "lm_head")
    assert "ties" in merge_fails(tied.original, tmp_path / "lm_head")


def test_pickle_adapters_are_never_loaded(llama_adapter, tmp_path):
    base, adapter = llama_adapter
    adapter = copy_adapter(adapter, tmp_path / "pickle")
    (adapter / ADAPTER_WEIGHTS).unlink()
    (adapter / "adapter_model.bin").write_bytes(b"never opened")
    assert "pickle" in merge_fails(base, adapter)


def test_peft_model_from_the_merged_abliterate_adapter_agrees(tmp_path):
    """The loop closes: PeftModel(base, adapter) == merge(base, adapter) == apply(base)."""
    b = build_family("qwen2_moe", tmp_path)
    merged = merge(b.original, b.adapter, tmp_path / "merged")
    peft_logits = logits(PeftModel.from_pretrained(load(b.original), b.adapter).eval())
    assert (logits(load(merged)) - peft_logits).abs().max().item() <= 1e-4
