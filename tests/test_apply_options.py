"""Scale, layer range, per-layer directions, components, --keep-tied, --targets, chunking and dtypes
all go through the one edit path and stay exactly equivalent to hooks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from abliterate.edit.projection import EPS, STORAGE, iter_edited_chunks, narrow_, project, widen
from abliterate.io.direction_file import save_direction
from abliterate.io.safetensors_format import TensorInfo
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


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-options")
    model = build_model(FAMILIES["llama"])
    save_sharded(model, root / "original")
    return root, model


def logits_with_hooks(model, rules) -> torch.Tensor:
    """rules: {module path: (unit r, scale)}; each hook removes scale * r (r . out) from the output."""
    modules = dict(model.named_modules())

    def hook_for(r, s):
        def hook(_m, _i, out):
            if isinstance(out, tuple):
                return (hook(_m, _i, out[0]), *out[1:])
            return out - s * (out @ r).unsqueeze(-1) * r
        return hook

    handles = [modules[p].register_forward_hook(hook_for(r, s)) for p, (r, s) in rules.items()]
    try:
        with torch.no_grad():
            return model(IDS).logits
    finally:
        for h in handles:
            h.remove()


def edited_logits(folder) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(IDS).logits


def assert_exact_and_effective(model, rules, folder, tolerance: float = LOGIT_TOLERANCE) -> None:
    """The edited folder's logits equal the original's under the hooks `rules` (exactness), and those hooks move
    some logit by at least EFFECT_FLOOR (so a no-op edit, or one that misses a module, fails)."""
    expected = logits_with_hooks(model, rules)
    assert (expected - logits_with_hooks(model, {})).abs().max() >= EFFECT_FLOOR, "the edit should matter"
    assert (edited_logits(folder) - expected).abs().max().item() <= tolerance


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def direction_written_by(model, paths: list[str]) -> torch.Tensor:
    """The top right singular vector of the named modules' outputs on IDS: a direction those modules write along,
    so editing only them still moves logits well past EFFECT_FLOOR (written_direction's mixes every writer)."""
    modules, outputs = dict(model.named_modules()), []
    handles = [modules[p].register_forward_hook(
        lambda _m, _i, out: outputs.append((out[0] if isinstance(out, tuple) else out).reshape(-1, 32)))
        for p in paths]
    try:
        with torch.no_grad():
            model(IDS)
    finally:
        for h in handles:
            h.remove()
    return torch.linalg.svd(torch.cat(outputs).double(), full_matrices=False).Vh[0].float()


def test_per_layer_directions_scale_and_layer_range_match_hooks(llama):
    root, model = llama
    layers = model.config.num_hidden_layers
    # distinct rows: the embedding's and layer 1's rows are directions the model writes along (a large effect),
    # the others random, so reading the wrong row or editing a layer outside --layers is far outside the tolerance
    table = torch.randn(layers + 1, 32, generator=torch.Generator().manual_seed(4))
    written = written_direction(model)
    table[0] = written
    table[2] = written + 0.3 * unit(table[2])
    save_direction(root / "per_layer.safetensors", table, {"model": "tiny"})
    code, out = run_cli("apply", str(root / "original"), "--direction", str(root / "per_layer.safetensors"),
                        "--out", str(root / "per_layer"), "--scale", "0.5", "--layers", "1:2", "-q")
    assert code == 0, out
    rows = table / table.norm(dim=-1, keepdim=True)
    rules = {"model.embed_tokens": (rows[0], 0.5),
             "model.layers.1.self_attn.o_proj": (rows[2], 0.5), "model.layers.1.mlp": (rows[2], 0.5)}
    assert_exact_and_effective(model, rules, root / "per_layer")
    manifest = json.loads((root / "per_layer" / "abliterate.json").read_text())
    assert not any(".layers.0." in name for name in manifest["edits"])


def test_negative_scale_amplifies_and_components_select_writers(llama):
    root, model = llama
    r = direction_written_by(model, [f"model.layers.{i}.mlp" for i in range(2)])
    save_direction(root / "one.safetensors", r, {"model": "tiny"})
    code, out = run_cli("apply", str(root / "original"), "--direction", str(root / "one.safetensors"),
                        "--out", str(root / "amplified"), "--scale", "-1", "--components", "mlp", "-q")
    assert code == 0, out
    rules = {f"model.layers.{i}.mlp": (r, -1.0) for i in range(2)}
    assert_exact_and_effective(model, rules, root / "amplified")


def test_targets_regex_overrides_the_table(llama):
    root, model = llama
    r = direction_written_by(model, [f"model.layers.{i}.self_attn.o_proj" for i in range(2)])
    save_direction(root / "t.safetensors", r, {"model": "tiny"})
    code, out = run_cli("apply", str(root / "original"), "--direction", str(root / "t.safetensors"),
                        "--out", str(root / "targets"), "--targets", r"model\.layers\.\d+\.self_attn\.o_proj\.weight",
                        "-q")
    assert code == 0, out
    rules = {f"model.layers.{i}.self_attn.o_proj": (r, 1.0) for i in range(2)}
    assert_exact_and_effective(model, rules, root / "targets")


def test_keep_tied_edits_the_shared_matrix_and_also_ablates_the_final_hidden_state(tmp_path):
    family = FAMILIES["qwen2"]
    model = build_model(family)
    save_sharded(model, tmp_path / "original")
    r = written_direction(model)
    save_direction(tmp_path / "d.safetensors", r, {"model": "tiny"})
    code, out = run_cli("apply", str(tmp_path / "original"), "--direction", str(tmp_path / "d.safetensors"),
                        "--out", str(tmp_path / "kept"), "--keep-tied", "-q")
    assert code == 0, out
    assert "--keep-tied" in out
    config = json.loads((tmp_path / "kept" / "config.json").read_text())
    assert config.get("tie_word_embeddings") is True
    rules = {p.replace("{L}", str(i)): (r, 1.0) for p in family.hooks for i in range(2)}
    rules["model.norm"] = (r, 1.0)  # the output layer reads through the edited shared matrix
    assert_exact_and_effective(model, rules, tmp_path / "kept")
    # the final-state ablation is a real part of the reference: without it the logits differ by more than a
    # thousand times the tolerance (0.024 here), so an edit that left the shared matrix's lm_head role alone fails
    del rules["model.norm"]
    assert (edited_logits(tmp_path / "kept") - logits_with_hooks(model, rules)).abs().max() >= 1e3 * LOGIT_TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape,axis", [((37, 16), -1), ((16, 23), -2), ((3, 16, 9), -2), ((4, 5, 16), -1), ((16,), -1)]
)
def test_chunked_streaming_equals_whole_tensor_projection(tmp_path, dtype, shape, axis):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(8)).to(dtype)
    r = torch.randn(16, generator=torch.Generator().manual_seed(9))
    r = r / r.norm()
    path = tmp_path / "t.bin"
    raw = w.contiguous().view(torch.uint8).numpy().tobytes()
    path.write_bytes(b"\0" * 8 + raw)
    name = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
    info = TensorInfo("t", name, shape, 8, 8 + len(raw))
    stored = np.frombuffer(raw, dtype=STORAGE[name]).reshape(shape)
    expected = project(stored, r.numpy(), axis, 0.75, name)
    reference = torch.from_numpy(widen(expected, name).reshape(shape))
    # the numpy path agrees with a plain torch computation of the same formula, to one rounding step
    w32, r32 = w.float(), r.float()
    along = (r32 @ w32) if axis == -2 else (w32 @ r32)
    removed = r32.view(-1, 1) * along.unsqueeze(-2) if axis == -2 else along.unsqueeze(-1) * r32
    by_torch = (w32 - 0.75 * removed).to(dtype)
    eps = EPS[name]
    assert torch.allclose(reference.float(), by_torch.float(), rtol=2 * eps, atol=2 * eps)
    fd = os.open(path, os.O_RDONLY)
    try:
        for budget in (1, 64, 1000, 1 << 20):  # down to one element per chunk: the two-pass row-block path
            chunks = [c.reshape(-1).copy() for _, c, _ in iter_edited_chunks(fd, info, r.numpy(), axis, 0.75, budget)]
            flat = np.concatenate(chunks)
            assert flat.size == w.numel()
            # chunk shapes change BLAS summation order: equal up to a couple of rounding steps of the dtype
            got = widen(flat, name).astype(np.float64)
            want = widen(expected.reshape(-1), name).astype(np.float64)
            assert np.allclose(got, want, rtol=2 * eps, atol=2 * eps)
    finally:
        os.close(fd)


def test_bfloat16_rounding_matches_torch():
    values = torch.randn(100_000, generator=torch.Generator().manual_seed(11)) * 3
    values[:4] = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 65504.0])  # ties round to even
    ours = narrow_(values.numpy().copy(), "BF16")
    theirs = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)
    assert np.array_equal(widen(theirs, "BF16"), values.to(torch.bfloat16).float().numpy())


def test_bfloat16_checkpoint_edit_keeps_dtype_and_equals_the_rounded_projection(tmp_path):
    family = FAMILIES["mistral"]
    model = build_model(family)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", max_shard_size="40KB")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    r = written_direction(base)
    save_direction(tmp_path / "d.safetensors", r, {})
    code, out = run_cli("apply", str(tmp_path / "bf16"), "--direction", str(tmp_path / "d.safetensors"),
                        "--out", str(tmp_path / "edited"), "--max-memory", "2KB", "-q")
    assert code == 0, out
    with safe_open(tmp_path / "edited" / "model-00001-of-00002.safetensors", "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    # reference: the projection computed in float32 on the writers named here, rounded once to bfloat16
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    away = torch.eye(32) - torch.outer(r, r)
    with torch.no_grad():
        reference.model.embed_tokens.weight.copy_((reference.model.embed_tokens.weight @ away).bfloat16())
        for layer in reference.model.layers:
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                linear.weight.copy_((away @ linear.weight).bfloat16())
        expected = reference(IDS).logits
        hooks = ablation_hooks(base, hook_paths(family, 2), r)
        hooked = base(IDS).logits
        for h in hooks:
            h.remove()
        unedited = base(IDS).logits
    assert (hooked - unedited).abs().max() >= EFFECT_FLOOR
    assert (edited_logits(tmp_path / "edited") - expected).abs().max().item() <= LOGIT_TOLERANCE
    # and within bfloat16's rounding of the weights of the exact float32 edit (3.9e-3 measured, 1.26 effect)
    assert (edited_logits(tmp_path / "edited") - hooked).abs().max().item() <= 1e-2
    code, out = run_cli("verify", str(tmp_path / "bf16"), str(tmp_path / "edited"))
    assert code == 0, out


@pytest.mark.parametrize("edit_budget,verify_budget", [("4KB", None), ("4KB", "1MB"), ("1MB", "4KB")])
def test_verify_accepts_edits_made_with_any_memory_budget(tmp_path, edit_budget, verify_budget):
    model = build_model(FAMILIES["llama"])
    save_sharded(model, tmp_path / "original")
    save_direction(tmp_path / "d.safetensors", torch.randn(32, generator=torch.Generator().manual_seed(12)), {})
    code, out = run_cli("apply", str(tmp_path / "original"), "--direction", str(tmp_path / "d.safetensors"),
                        "--out", str(tmp_path / "edited"), "--max-memory", edit_budget, "-q")
    assert code == 0, out
    extra = ["--max-memory", verify_budget] if verify_budget else []
    code, out = run_cli("verify", str(tmp_path / "original"), str(tmp_path / "edited"), *extra)
    assert code == 0, out
