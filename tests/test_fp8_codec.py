"""The FP8 e4m3fn and FP4 e2m1 codecs round as the references do (torch's float8 cast, the nearest of the 16 FP4
values with ties to the even code), and a quantised edit streamed in many small chunks (row blocks of a matrix
bigger than the budget, partial blocks at the ends of both axes) is the same as one edited whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from abliterate.cli.main import cli
from abliterate.edit import quant_codec as codec
from abliterate.io.direction_file import save_direction
from tests.quant_models import FP4, fp8_dequantise, fp8_quantise, fp8_step, mxfp4_quantise, write_folder


def test_fp8_encoding_rounds_as_torchs_float8_cast():
    g = torch.Generator().manual_seed(0)
    grid = torch.from_numpy(codec.FP8_VALUES[np.isfinite(codec.FP8_VALUES)].copy())
    ties = (grid[:-1] + grid[1:]) / 2  # halfway between neighbours, subnormals included
    x = torch.cat([torch.randn(20000, generator=g) * torch.exp2(torch.randint(-12, 9, (20000,), generator=g)),
                   grid, ties[torch.isfinite(ties)], torch.tensor([0.0, -0.0, 448.0, -448.0, 2.0**-9, 2.0**-10])])
    x = x.clamp(-448, 448)
    want = x.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert np.array_equal(codec.encode_fp8(x.numpy()), want)
    assert np.array_equal(codec.FP8_VALUES[want], x.to(torch.float8_e4m3fn).float().numpy())


def test_fp4_encoding_takes_the_nearest_value_ties_to_even():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.rand(4096, generator=g) * 12 - 6, (FP4[:7] + FP4[1:8]) / 2, -(FP4[:7] + FP4[1:8]) / 2, FP4])
    blocks = x[: len(x) // 32 * 32].reshape(-1, 32)
    packed, scales = mxfp4_quantise(blocks)  # the reference, with its own exponents
    got, exps = codec.quantise_mxfp4(blocks.numpy())
    assert np.array_equal(exps, scales.numpy()) and np.array_equal(got, packed.numpy())


@pytest.mark.parametrize("max_memory", ["1KB", "256MB"])
def test_a_quantised_edit_streamed_in_small_chunks_with_partial_blocks_is_within_a_step(tmp_path, max_memory):
    """[40, 36] matrices with 16 x 16 blocks (partial at both ends): a 1 KB budget splits each into row blocks
    of whole block rows, two passes over the matrix."""
    g = torch.Generator().manual_seed(2)
    d, n, block = 40, 36, (16, 16)
    r = torch.randn(d, generator=g).double()
    r /= r.norm()
    tensors, floats = {}, {}
    for layer in range(2):
        w = torch.randn(d, n, generator=g) * 0.05 + 0.2 * torch.outer(r.float(), torch.randn(n, generator=g))
        name = f"model.layers.{layer}.self_attn.o_proj.weight"
        tensors[name], tensors[name + "_scale_inv"] = fp8_quantise(w, block)
        floats[name] = fp8_dequantise(tensors[name], tensors[name + "_scale_inv"], block).double()
        tensors[f"model.layers.{layer}.mlp.down_proj.weight"] = torch.randn(d, n, generator=g)
    tensors["model.embed_tokens.weight"] = torch.randn(10, d, generator=g)
    config = {"model_type": "llama", "hidden_size": d, "num_hidden_layers": 2, "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)}}
    names = list(tensors)
    original = write_folder(tmp_path / "original", tensors, config, [names[:3], names[3:]])
    save_direction(tmp_path / "dir.safetensors", r.float(), {"model": "tiny"})
    out = tmp_path / "edited"
    result = CliRunner().invoke(cli, ["apply", str(original), "--direction", str(tmp_path / "dir.safetensors"),
                                      "--out", str(out), "--max-memory", max_memory, "--quiet"])
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    edited = {}
    for file in out.glob("model-*.safetensors"):
        edited |= load_file(file)
    for name, w in floats.items():
        s = edited[name + "_scale_inv"]
        assert s.shape == (3, 3)
        have = fp8_dequantise(edited[name], s, block).double()
        want = w - torch.outer(r, r @ w)
        assert ((have - want).abs() <= fp8_step(want, s, block)).all()
        assert (r @ have).norm() <= 0.05 * (r @ w).norm()
    verified = CliRunner().invoke(cli, ["verify", str(original), str(out)])
    assert verified.exit_code == 0, verified.output
