"""Norm-preserving edits: W' = (I - s r r^T) W D, each written vector keeping its norm, per family exactly as the
formula says (weights and logits), checked by `verify`, scored by the search's hooks as `apply` writes it;
biprojection as an apply option. The adapter: tests/test_preserve_adapter.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from abliterate.arch.table import arch_for_config
from abliterate.edit.projection import project
from abliterate.io.direction_file import load_direction, save_direction
from abliterate.measure.preserving_hooks import ablate_preserving, supports_preserving
from tests.families import FAMILIES, FAMILY_NAMES, IDS, build_model, save_sharded, written_direction
from tests.test_apply import run_cli

# docs/apply.md's bound for norm-preserving logits against the formula applied in memory (float32); the edit must move
# some logit by a thousand times that for the comparison to mean something.
PRESERVE_TOLERANCE = 1e-5
PRESERVE_FLOOR = 1000 * PRESERVE_TOLERANCE


def formula(w: np.ndarray, r: np.ndarray, s: float, axis: int) -> np.ndarray:
    """The definition in float64: every vector along the hidden axis projected, then scaled back to its norm."""
    v = np.moveaxis(w.astype(np.float64), axis, -1)
    r = r.astype(np.float64)
    projected = v - s * (v @ r)[..., None] * r
    norms = np.linalg.norm(projected, axis=-1, keepdims=True)
    out = projected * np.where(norms > 0, np.linalg.norm(v, axis=-1, keepdims=True) / np.where(norms > 0, norms, 1), 1)
    return np.moveaxis(out, -1, axis)


@pytest.mark.parametrize("axis,shape", [(-2, (3, 16, 5)), (-1, (7, 16)), (-1, (16,))])
@pytest.mark.parametrize("s", [1.0, 0.6, -0.5])
def test_projection_with_preserve_equals_the_formula_and_keeps_every_norm(axis, shape, s):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32)
    r = rng.standard_normal(16)
    r = (r / np.linalg.norm(r)).astype(np.float32)
    got = project(w, r, axis, s, preserve=True).astype(np.float64)
    want = formula(w, r, s, axis)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(w).max()
    norms = lambda a: np.linalg.norm(np.moveaxis(a, axis, -1), axis=-1)  # noqa: E731
    assert np.allclose(norms(got), norms(w.astype(np.float64)), rtol=1e-6)
    if s == 1.0:
        assert np.abs(np.moveaxis(got, axis, -1) @ r).max() <= 1e-6 * np.abs(w).max()


def in_memory_edit(model: torch.nn.Module, r: torch.Tensor | np.ndarray, edit=None) -> None:
    """`edit(w, r, s, axis)` (default: the rank-1 formula) applied to the model's writer parameters in float64:
    the reference the streamed edit must match."""
    edit = edit or formula
    r = r.numpy() if isinstance(r, torch.Tensor) else r
    arch = arch_for_config(model.config.to_dict())
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if output.weight is embedding.weight:  # the edit unties: the output layer keeps the original matrix
        output.weight = torch.nn.Parameter(output.weight.detach().clone())
    with torch.no_grad():
        for name, p in model.named_parameters():
            writer = next((w for w in arch.writers if w.match(arch.renamed_on_disk(name))), None)  # EXAONE renames
            if writer is not None:
                p.copy_(torch.from_numpy(edit(p.numpy(), r, 1.0, writer.hidden_axis)))


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_norm_preserving_apply_equals_the_formula_per_family_and_verify_accepts_it(name, tmp_path):
    family = FAMILIES[name]
    model = build_model(family)
    original = save_sharded(model, tmp_path / "original")
    r = written_direction(model)
    save_direction(tmp_path / "dir.safetensors", r, {"model": "tiny"})
    code, out = run_cli("apply", str(original), "--direction", str(tmp_path / "dir.safetensors"), "--norm-preserve",
                        "--out", str(tmp_path / "edited"), "--quiet", "--max-memory", "4KB")
    assert code == 0, out
    assert json.loads((tmp_path / "edited" / "abliterate.json").read_text())["norm_preserve"] is True
    code, out = run_cli("verify", str(original), str(tmp_path / "edited"))
    assert code == 0, out
    unit = r / r.norm()
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "edited", dtype=torch.float32).eval()
    ids = IDS
    arch = arch_for_config(model.config.to_dict())
    with torch.no_grad():
        got = edited(ids).logits
        unedited = model(ids).logits
        if supports_preserving(model, arch):  # dense families: the search's hooks compute the same
            with ablate_preserving(model, arch, unit):
                hooked = model(ids).logits
            assert (got - hooked).abs().max().item() <= PRESERVE_TOLERANCE
        in_memory_edit(model, unit)
        if supports_preserving(model, arch):
            assert (got - model(ids).logits).abs().max().item() <= PRESERVE_TOLERANCE
    assert (got - unedited).abs().max().item() >= PRESERVE_FLOOR


def test_verify_catches_a_plain_edit_claimed_as_norm_preserving(tmp_path):
    original = save_sharded(build_model(FAMILIES["llama"]), tmp_path / "original")
    save_direction(tmp_path / "dir.safetensors", torch.randn(32, generator=torch.Generator().manual_seed(1)), {})
    assert run_cli("apply", str(original), "--direction", str(tmp_path / "dir.safetensors"), "--out",
                   str(tmp_path / "edited"), "-q")[0] == 0
    manifest = tmp_path / "edited" / "abliterate.json"
    manifest.write_text(manifest.read_text().replace('"norm_preserve": false', '"norm_preserve": true'))
    code, out = run_cli("verify", str(original), str(tmp_path / "edited"))
    assert code == 1 and "norm-preserving projection" in out


def test_biproject_removes_the_direction_made_orthogonal_to_the_harmless_mean(tmp_path):
    original = save_sharded(build_model(FAMILIES["llama"]), tmp_path / "original")
    g = torch.Generator().manual_seed(3)
    r, means = torch.randn(32, generator=g), torch.randn(3, 2, 32, generator=g)
    save_direction(tmp_path / "dir.safetensors", r, {"layer": 1, "position": -1}, extra={"harmless_mean": means})
    code, out = run_cli("apply", str(original), "--direction", str(tmp_path / "dir.safetensors"), "--biproject",
                        "--out", str(tmp_path / "edited"), "-q")
    assert code == 0, out
    used = load_direction(tmp_path / "edited" / "refusal_direction.safetensors")
    h = means[1, -1] / means[1, -1].norm()
    assert abs(float(torch.from_numpy(used.vectors) @ h)) < 1e-6
    assert used.metadata["biprojected"] == "true"
    assert run_cli("verify", str(original), str(tmp_path / "edited"))[0] == 0
    with safe_open(str(tmp_path / "edited" / "refusal_direction.safetensors"), "np") as f:
        assert "harmless_mean" not in f.keys()
    save_direction(tmp_path / "bare.safetensors", r, {"layer": 1, "position": -1})
    code, out = run_cli("apply", str(original), "--direction", str(tmp_path / "bare.safetensors"), "--biproject",
                        "--out", str(tmp_path / "e2"))
    assert code != 0 and "no harmless mean" in out
