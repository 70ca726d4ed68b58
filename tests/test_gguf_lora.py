"""`apply model.gguf --adapter`: a llama.cpp LoRA adapter GGUF whose base + scale B A is the edited model.

The adapter is read back with the gguf library (as llama.cpp's loader lays it out: lora_a [k, in],
lora_b [out, k], the token embedding's lora_a a row per token) and merged as llama.cpp computes it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from abliterate.edit.projection import project
from abliterate.gguf.format import read_gguf
from abliterate.io.direction_file import save_direction
from tests.gguf_models import read_values
from tests.test_gguf import LAYERS, Q8, _apply, _axis, _error, _gguf, _row
from tests.test_gguf import models as models  # the fixture: tiny Llama and Qwen2-MoE

TOLERANCE = 2e-6  # float32: |base + B A - edited| <= TOLERANCE x max |W| per tensor


def merged(base: dict[str, np.ndarray], adapter: dict[str, np.ndarray], alpha: float) -> dict[str, np.ndarray]:
    """What llama.cpp computes with the adapter at --lora (scale = alpha / rank), per adapted tensor."""
    out = {}
    for name in {n.rsplit(".", 1)[0] for n in adapter}:
        a, b = adapter[f"{name}.lora_a"].astype(np.float64), adapter[f"{name}.lora_b"].astype(np.float64)
        scale = alpha / b.shape[1]
        delta = a @ b.T if name == "token_embd.weight" else b @ a  # embeddings: rows looked up in lora_a
        out[name] = base[name].astype(np.float64) + scale * delta
    return out


def base_vocab(path) -> int:
    return read_gguf(path).by_name()["token_embd.weight"].shape[0]


def _adapter(path):
    header = read_gguf(path)
    assert header.metadata["general.type"] == "adapter" and header.metadata["adapter.type"] == "lora"
    return read_values(path), float(header.metadata["adapter.lora.alpha"])


@pytest.mark.parametrize("rank", [1, 2])
def test_gguf_lora_on_the_base_equals_the_edited_float_gguf(models, tmp_path, rank):
    root, found = models
    folder, direction, _ = found["llama"]
    if rank == 2:
        direction = tmp_path / "two.safetensors"
        save_direction(direction, torch.randn(2, 32, generator=torch.Generator().manual_seed(5)),
                       {"model": "tiny", "rank": 2})
    src = _gguf(root, folder, f"lora-base-{rank}.gguf", "llama", tied=False)
    edited = tmp_path / "edited.gguf"
    _apply(src, direction, edited)
    printed = _apply(src, direction, tmp_path / "lora.gguf", "--adapter")
    assert "--lora lora.gguf" in printed, printed
    adapter, alpha = _adapter(tmp_path / "lora.gguf")
    assert alpha == rank  # llama.cpp scales B A by alpha / rank: 1 at --lora
    # the shapes llama.cpp's loader checks: lora_a [k, in], lora_b [out, k]; token_embd's lora_a [vocab, k]
    assert adapter["blk.0.ffn_down.weight.lora_a"].shape == (rank, 64)
    assert adapter["blk.0.ffn_down.weight.lora_b"].shape == (32, rank)
    assert adapter["token_embd.weight.lora_a"].shape == (base_vocab(src), rank)
    assert adapter["token_embd.weight.lora_b"].shape == (32, rank)
    base, want = read_values(src), read_values(edited)
    got = merged(base, adapter, alpha)
    assert set(got) == {"token_embd.weight"} | {f"blk.{i}.{n}.weight" for i in range(LAYERS)
                                                 for n in ("attn_output", "ffn_down")}
    for name, value in got.items():
        top = np.abs(base[name]).max()
        assert np.abs(value - want[name]).max() <= TOLERANCE * top, name  # exactness
        assert np.abs(value - base[name]).max() > 1e-3 * top, name  # and an effect


def test_gguf_lora_of_a_quantised_tied_base_projects_its_dequantised_values(models, tmp_path):
    """On a Q8_0 base the adapter removes r from the values llama.cpp multiplies (the dequantised ones),
    exactly; the tied token_embd is left out with a note (llama.cpp would apply it to the output too)."""
    root, found = models
    folder, direction, vectors = found["qwen2_moe"]
    src = _gguf(root, folder, "lora-q8-moe.gguf", "qwen2moe", types=Q8)
    assert "experts" in _error("apply", str(src), "--direction", str(direction), "--adapter",
                               "--out", str(tmp_path / "x.gguf"))
    printed = _apply(src, direction, tmp_path / "lora.gguf", "--adapter", "--components", "attn,embed")
    assert "token_embd is left out" in printed
    adapter, alpha = _adapter(tmp_path / "lora.gguf")
    base = read_values(src)
    got = merged(base, adapter, alpha)
    assert sorted(got) == [f"blk.{i}.attn_output.weight" for i in range(LAYERS)]
    for name, value in got.items():
        want = project(base[name], _row(name, vectors), _axis(name))
        assert np.abs(value - want).max() <= TOLERANCE * np.abs(base[name]).max(), name
        assert not np.allclose(value, base[name]), name
    assert not (tmp_path / "x.gguf").exists()
