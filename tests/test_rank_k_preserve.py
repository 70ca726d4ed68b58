"""Norm-preserving edits with several directions: W' = (I - s Q^T Q) W D, per family exactly as the formula says
(logits within docs/apply.md's 1e-5 in float32, also under the search's hooks), checked by `verify` with its rank-k
bound, and carried by the norm-preserving (DoRA) adapter at rank k."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from abliterate.arch.table import arch_for_config
from abliterate.edit.projection import project
from abliterate.io.direction_file import load_direction, save_direction
from abliterate.measure.preserving_hooks import ablate_preserving, supports_preserving
from tests.families import COMMON, FAMILIES, FAMILY_NAMES, IDS, Family, build_model, save_sharded
from tests.test_apply import run_cli
from tests.test_norm_preserve import PRESERVE_FLOOR, PRESERVE_TOLERANCE, in_memory_edit
from tests.test_preserve_adapter import adapter_matches_weights

K = 3


def formula_k(w: np.ndarray, q: np.ndarray, s: float, axis: int) -> np.ndarray:
    """The definition in float64: every vector along the hidden axis loses s times its part in the span of q's
    orthonormal rows, then is scaled back to its norm."""
    v = np.moveaxis(w.astype(np.float64), axis, -1)
    q = q.astype(np.float64)
    projected = v - s * (v @ q.T) @ q
    norms = np.linalg.norm(projected, axis=-1, keepdims=True)
    out = projected * np.where(norms > 0, np.linalg.norm(v, axis=-1, keepdims=True) / np.where(norms > 0, norms, 1), 1)
    return np.moveaxis(out, -1, axis)


def orthonormal(k: int, d: int, seed: int = 0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, k)))
    return q.T.astype(np.float32)


@pytest.mark.parametrize("axis,shape", [(-2, (3, 16, 5)), (-1, (7, 16)), (-1, (16,))])
@pytest.mark.parametrize("s", [1.0, 0.6, -0.5])
def test_rank_k_projection_with_preserve_equals_the_formula_and_keeps_every_norm(axis, shape, s):
    w = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    q = orthonormal(K, 16)
    got = project(w, q, axis, s, preserve=True).astype(np.float64)
    assert np.abs(got - formula_k(w, q, s, axis)).max() <= 1e-6 * np.abs(w).max()
    norms = lambda a: np.linalg.norm(np.moveaxis(a, axis, -1), axis=-1)  # noqa: E731
    assert np.allclose(norms(got), norms(w.astype(np.float64)), rtol=1e-6)
    if s == 1.0:
        assert np.abs(np.moveaxis(got, axis, -1) @ q.T).max() <= 1e-6 * np.abs(w).max()


def written_span(model: torch.nn.Module, k: int = K) -> torch.Tensor:
    """k orthonormal directions the model writes along: the top right singular vectors of its residual stream
    after each layer but the last, on IDS (so removing their span moves logits)."""
    with torch.no_grad():
        states = model(IDS, output_hidden_states=True).hidden_states
    d = states[0].shape[-1]
    stacked = torch.cat([h.reshape(-1, d) for h in states[1:-1]]).double()
    return torch.linalg.svd(stacked, full_matrices=False).Vh[:k].float()


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_rank_k_norm_preserving_apply_equals_the_formula_per_family_and_verify_accepts_it(name, tmp_path):
    model = build_model(FAMILIES[name])
    original = save_sharded(model, tmp_path / "original")
    save_direction(tmp_path / "dir.safetensors", written_span(model), {"rank": K})
    code, out = run_cli("apply", str(original), "--direction", str(tmp_path / "dir.safetensors"), "--norm-preserve",
                        "--out", str(tmp_path / "edited"), "--quiet", "--max-memory", "4KB")
    assert code == 0, out
    code, out = run_cli("verify", str(original), str(tmp_path / "edited"))
    assert code == 0, out
    direction = load_direction(tmp_path / "edited" / "refusal_direction.safetensors")
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "edited", dtype=torch.float32).eval()
    arch = arch_for_config(model.config.to_dict())
    with torch.no_grad():
        got, unedited = edited(IDS).logits, model(IDS).logits
        if supports_preserving(model, arch):  # dense families (in memory, MoE experts are fused parameters)
            with ablate_preserving(model, arch, direction):  # the search's and evaluation's hooks compute the same
                assert (got - model(IDS).logits).abs().max().item() <= PRESERVE_TOLERANCE
            in_memory_edit(model, direction.vectors, formula_k)
            assert (got - model(IDS).logits).abs().max().item() <= PRESERVE_TOLERANCE
    assert (got - unedited).abs().max().item() >= PRESERVE_FLOOR


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def preserved_k(request, tmp_path_factory):
    """(original, edited) folders: a Llama in the given dtype, rank-k norm-preserving edit at scale 0.7."""
    root = tmp_path_factory.mktemp(f"np-k-{request.param}")
    model = build_model(FAMILIES["llama"]).to(getattr(torch, request.param))
    original = save_sharded(model, root / "original")
    save_direction(root / "dir.safetensors", torch.from_numpy(orthonormal(K, 32, seed=4)), {"rank": K})
    code, out = run_cli("apply", str(original), "--direction", str(root / "dir.safetensors"), "--norm-preserve",
                        "--scale", "0.7", "--out", str(root / "edited"), "-q", "--max-memory", "4KB")
    assert code == 0, out
    return original, root / "edited"


def test_verify_accepts_a_rank_k_norm_preserving_edit_in_each_dtype(preserved_k):
    original, edited = preserved_k
    code, out = run_cli("verify", str(original), str(edited))
    assert code == 0 and "0.7" in out, out


def test_verify_catches_a_rank_k_element_off_by_a_few_steps_of_its_dtype(preserved_k, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    original, edited = preserved_k
    shutil.copytree(edited, tmp_path / "e")
    shard = next(p for p in sorted((tmp_path / "e").glob("*.safetensors"))
                 if any(k.endswith("mlp.down_proj.weight") for k in load_file(p)))
    tensors = load_file(shard)
    name = next(k for k in tensors if k.endswith("mlp.down_proj.weight"))
    values = tensors[name].clone()
    values[3, 5] *= 1.001 if values.dtype == torch.float32 else 1.03  # a few roundings of the dtype
    tensors[name] = values
    save_file(tensors, shard, metadata={"format": "pt"})
    code, out = run_cli("verify", str(original), str(tmp_path / "e"))
    assert code == 1 and f"FAIL {name} differs from the recomputed norm-preserving projection" in out, out


def test_verify_catches_a_plain_rank_k_edit_claimed_as_norm_preserving(tmp_path):
    original = save_sharded(build_model(FAMILIES["llama"]), tmp_path / "original")
    save_direction(tmp_path / "dir.safetensors", torch.from_numpy(orthonormal(K, 32, seed=5)), {"rank": K})
    assert run_cli("apply", str(original), "--direction", str(tmp_path / "dir.safetensors"), "--out",
                   str(tmp_path / "edited"), "-q")[0] == 0
    manifest = tmp_path / "edited" / "abliterate.json"
    manifest.write_text(manifest.read_text().replace('"norm_preserve": false', '"norm_preserve": true'))
    code, out = run_cli("verify", str(original), str(tmp_path / "edited"))
    assert code == 1 and "norm-preserving projection" in out


def test_rank_k_norm_preserving_adapter_computes_the_rank_k_norm_preserving_weights(tmp_path):
    model = build_model(Family("llama", dict(COMMON, num_key_value_heads=4)))
    original = save_sharded(model, tmp_path / "original")
    save_direction(tmp_path / "dir.safetensors", written_span(model), {"rank": K})
    args = ["--direction", str(tmp_path / "dir.safetensors"), "--norm-preserve", "--components", "attn,mlp", "-q"]
    config = adapter_matches_weights(tmp_path, model, original, args)
    assert config["use_dora"] is True and config["r"] == K
