"""GGUF edits with several directions (a rank-k file): float tensors get exactly the safetensors span edit,
quantised ones the span projection of their dequantised values within one quantisation step, and `verify`
checks both against the span (and catches an edit that removed fewer directions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from abliterate.edit.projection import project
from abliterate.gguf.format import read_gguf
from abliterate.io.direction_file import load_direction, save_direction
from tests.families import build_model
from tests.gguf_models import gguf_tensors, read_values
from tests.test_apply import run_cli
from tests.test_gguf import LAYERS, LLAMA, MOE, Q8, D, _apply, _axis, _gguf, _row, _tamper

K = 3


def _rows(name: str, vectors: np.ndarray) -> np.ndarray:
    """The rows [k, d] a GGUF tensor is edited with: all of a [k, d] file, else its residual stream's (_row)."""
    return vectors if vectors.ndim == 2 else _row(name, vectors)


@pytest.fixture(scope="module")
def rank_k_models(tmp_path_factory):
    """Tiny Llama (one set of K directions) and Qwen2-MoE (K per residual stream) as safetensors."""
    root = tmp_path_factory.mktemp("gguf-rank-k")
    out = {}
    for family, shape in ((LLAMA, (K, D)), (MOE, (LAYERS + 1, K, D))):
        folder = root / family.model_type
        build_model(family).save_pretrained(folder)
        direction = root / f"{family.model_type}-dir.safetensors"
        save_direction(direction, torch.randn(shape, generator=torch.Generator().manual_seed(5)),
                       {"model": "tiny", "rank": K})
        out[family.model_type] = (folder, direction, load_direction(direction).vectors)
    return root, out


@pytest.mark.parametrize(("family", "dtype"), [("llama", "F32"), ("qwen2_moe", "F32"), ("llama", "F16")])
def test_float_gguf_rank_k_edit_equals_the_safetensors_edit(rank_k_models, family, dtype):
    from transformers import AutoModelForCausalLM

    root, found = rank_k_models
    folder, direction, vectors = found[family]
    if dtype == "F16":
        half = root / f"{family}-f16"
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16).save_pretrained(half)
        folder = half
    src = _gguf(root, folder, f"{family}-{dtype}.gguf", {"llama": "llama", "qwen2_moe": "qwen2moe"}[family],
                tied=False, types={r".*": dtype})
    _apply(src, direction, root / f"{family}-{dtype}-edited.gguf")
    _apply(folder, direction, root / f"{family}-{dtype}-edited-st")
    want, got = gguf_tensors(root / f"{family}-{dtype}-edited-st"), read_values(root / f"{family}-{dtype}-edited.gguf")
    assert set(got) == set(want)
    for name in got:
        assert np.array_equal(got[name], want[name].astype(np.float32)), name
    down = "blk.0.ffn_down_exps.weight" if family == "qwen2_moe" else "blk.0.ffn_down.weight"
    if dtype == "F32":  # nothing left along the span
        q = _rows(down, vectors).astype(np.float64)
        w = got[down].astype(np.float64)
        assert np.abs(np.einsum("kd,...dn->...kn", q, w)).max() <= 1e-6 * np.abs(w).max()


def test_q8_0_rank_k_tensors_are_within_one_quantisation_step_of_the_span_projection(rank_k_models):
    root, found = rank_k_models
    folder, direction, vectors = found["qwen2_moe"]
    src = _gguf(root, folder, "moe-q8.gguf", "qwen2moe", types=Q8)
    _apply(src, direction, root / "moe-q8-edited.gguf", "--max-memory", "4KB")  # row blocks in two passes
    before, after = read_values(src), read_values(root / "moe-q8-edited.gguf")
    edited = read_gguf(root / "moe-q8-edited.gguf").by_name()
    writers = [n for n in before if n.startswith("token_embd") or "attn_output" in n or "ffn_down" in n]
    assert len(writers) == 1 + LAYERS * 3
    for name in writers:
        assert edited[name].type_name == "Q8_0"
        want = project(before[name], _rows(name, vectors), _axis(name))
        blocks = want.reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127
        assert (np.abs(after[name].reshape(-1, 32) - blocks) <= step).all(), name
        one = project(before[name], _rows(name, vectors)[0], _axis(name)).reshape(-1, 32)
        assert not (np.abs(after[name].reshape(-1, 32) - one) <= step).all(), name  # not the rank-1 edit


@pytest.mark.parametrize("types", [None, Q8], ids=["F32", "Q8_0"])
def test_verify_accepts_a_rank_k_gguf_edit_and_rejects_a_changed_byte_or_fewer_directions(rank_k_models, types,
                                                                                         tmp_path):
    root, found = rank_k_models
    folder, direction, _ = found["qwen2_moe"]
    tag = "q8" if types else "f32"
    src = _gguf(root, folder, f"verify-{tag}.gguf", "qwen2moe", types=types)
    out = root / f"verify-{tag}-edited.gguf"
    _apply(src, direction, out, "--max-memory", "8KB")
    code, printed = run_cli("verify", str(src), str(out))
    assert code == 0 and "OK" in printed, printed
    code, printed = run_cli("verify", str(src), str(out), "--max-memory", "4KB")
    assert code == 0, printed
    at = 3 if types is None else 2 + 5
    code, printed = run_cli("verify", str(src), str(_tamper(out, "blk.1.ffn_down_exps.weight", 40, at)))
    assert code == 1 and "FAIL blk.1.ffn_down_exps.weight" in printed, printed
    first = load_direction(direction).leading(1)  # what removing only the first direction would be
    save_direction(tmp_path / "first.safetensors", first.vectors, {})
    code, printed = run_cli("verify", str(src), str(out), "--direction", str(tmp_path / "first.safetensors"))
    assert code == 1 and "FAIL" in printed, printed
