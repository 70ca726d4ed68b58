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


def test_inconsistent_fp8_and_mxfp4_layouts_are_refused_in_one_line_before_any_output(tmp_path):
    from tests.quant_models import fp8_quantise, mxfp4_quantise, write_folder

    g = torch.Generator().manual_seed(3)
    q, s = fp8_quantise(torch.randn(32, 32, generator=g), (16, 16))
    base = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1}
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16]}
    blocks, scales = mxfp4_quantise(torch.randn(2, 32, 32, generator=g))
    cases = {
        "no scales": ({"model.layers.0.self_attn.o_proj.weight": q}, fp8, "scales"),
        "another block size": ({"model.layers.0.self_attn.o_proj.weight": q,
                                "model.layers.0.self_attn.o_proj.weight_scale_inv": s},
                               fp8 | {"weight_block_size": [8, 8]}, "weight_block_size"),
        "e5m2": ({"model.layers.0.self_attn.o_proj.weight": q,
                  "model.layers.0.self_attn.o_proj.weight_scale_inv": s}, fp8 | {"fmt": "e5m2"}, "e5m2"),
        "gptq": ({"model.layers.0.self_attn.o_proj.weight": q.view(torch.uint8)}, {"quant_method": "gptq"},
                 "'gptq'"),
        "mxfp4 scales of another shape": ({"model.layers.0.mlp.experts.down_proj_blocks": blocks,
                                           "model.layers.0.mlp.experts.down_proj_scales": scales[:, :16]},
                                          {"quant_method": "mxfp4"}, "MXFP4"),
    }
    save_direction(tmp_path / "dir.safetensors", torch.randn(32), {"model": "tiny"})
    for i, (case, (tensors_, quant, words)) in enumerate(cases.items()):
        folder = write_folder(tmp_path / f"case{i}", tensors_ | {"model.embed_tokens.weight": torch.randn(8, 32)},
                              base | {"quantization_config": quant}, [[*tensors_, "model.embed_tokens.weight"]])
        code, report = run("apply", folder, "--direction", tmp_path / "dir.safetensors", "--out", tmp_path / "out")
        assert code == 2 and words in report and len(report.strip().splitlines()) == 1, (case, report)
        assert not (tmp_path / "out").exists()


def test_norm_preserving_hooks_refuse_a_model_running_fp8_on_its_device():
    """On a GPU transformers keeps FP8 weights as FP8Linear: the hooks would read fp8 codes, so they say why not
    (and the search leaves the norm-preserving dimension out), where on a CPU the weights are dequantised."""
    from transformers.integrations.finegrained_fp8 import FP8Linear

    from abliterate.arch.table import arch_for_config
    from abliterate.measure.preserving_hooks import why_not_preserving
    from tests.families import FAMILIES, build_model

    model = build_model(FAMILIES["qwen3"])
    arch = arch_for_config(model.config.to_dict())
    assert why_not_preserving(model, arch) is None
    model.model.layers[0].self_attn.o_proj = FP8Linear(32, 32, block_size=(16, 16))
    assert "FP8" in why_not_preserving(model, arch)


def test_deepseeks_multi_token_prediction_layer_is_copied_unedited(tmp_path):
    """DeepSeek V3 stores its MTP module as layer `num_hidden_layers` (61), which transformers does not load: the
    edit leaves it byte for byte and says so, where another layer past the config's count is refused."""
    import json

    from tests.quant_models import write_folder

    g = torch.Generator().manual_seed(4)
    r = torch.randn(32, generator=g)
    original = fp8_checkpoint(tmp_path / "original", "deepseek_v3", BLOCK, r / r.norm())
    t = tensors(original)
    extra = {n.replace("model.layers.1.", "model.layers.2."): v for n, v in t.items() if "model.layers.1." in n}
    config = json.loads((original / "config.json").read_text())
    save_direction(tmp_path / "dir.safetensors", r, {"model": "tiny"})
    reports = {}
    for mtp, expected in ((1, 0), (0, 2)):
        folder = write_folder(tmp_path / f"mtp{mtp}", t | extra, config | {"num_nextn_predict_layers": mtp},
                              [list(t), list(extra)])
        code, reports[mtp] = run("apply", folder, "--direction", tmp_path / "dir.safetensors",
                                 "--out", tmp_path / f"o{mtp}")
        assert code == expected, reports[mtp]
    assert "multi-token-prediction" in reports[1] and "names layer 2" in reports[0]
    after = tensors(tmp_path / "o1")
    assert all(torch.equal(after[n].view(torch.uint8), v.view(torch.uint8)) for n, v in extra.items())
