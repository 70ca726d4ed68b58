"""FP8 edits beyond one direction removed plainly: a norm-preserving edit and a rank-2 span, each within one
quantisation step per element of the tests' own float64 reference on the dequantised weights, and verified."""

from __future__ import annotations

import torch

from abliterate.io.direction_file import save_direction
from tests.quant_models import fp8_checkpoint, fp8_dequantise, fp8_step
from tests.test_fp8 import run, tensors

BLOCK = (8, 16)


def _writers(t: dict[str, torch.Tensor]) -> list[str]:
    return [n for n in t if n.endswith(("o_proj.weight", "down_proj.weight")) and t[n].dtype == torch.float8_e4m3fn]


def test_norm_preserving_and_rank_two_fp8_edits_are_within_a_step_and_verify(tmp_path):
    g = torch.Generator().manual_seed(7)
    q = torch.linalg.qr(torch.randn(32, 2, generator=g).double()).Q.T  # two orthonormal rows
    original = fp8_checkpoint(tmp_path / "original", "qwen3", BLOCK, q[0].float())
    save_direction(tmp_path / "one.safetensors", q[0].float(), {"model": "tiny"})
    save_direction(tmp_path / "two.safetensors", q.float(), {"model": "tiny", "rank": 2})
    cases = {"preserve": ("one.safetensors", "--norm-preserve"), "span": ("two.safetensors",)}
    before = tensors(original)
    for case, (direction, *flags) in cases.items():
        out = tmp_path / case
        code, report = run("apply", original, "--direction", tmp_path / direction, "--out", out, "--quiet", *flags)
        assert code == 0, report
        after = tensors(out)
        for name in _writers(before):
            w = fp8_dequantise(before[name], before[name + "_scale_inv"], BLOCK).double()
            if case == "preserve":
                r = q[0]
                want = w - torch.outer(r, r @ w)
                want = want * (w.norm(dim=0) / want.norm(dim=0))
            else:
                want = w - q.T @ (q @ w)
            s = after[name + "_scale_inv"]
            have = fp8_dequantise(after[name], s, BLOCK).double()
            assert ((have - want).abs() <= fp8_step(want, s, BLOCK)).all(), (case, name)
            assert (have - w).abs().max() > 10 * fp8_step(want, s, BLOCK).max(), (case, name)
        code, report = run("verify", original, out)
        assert code == 0, report
