"""FP8 block-scaled (DeepSeek V3 / Qwen3 layout) and MXFP4 (gpt-oss layout) checkpoints are edited in their own
format: each edited tensor, dequantised, is within one quantisation step per element of the edit of the
original's dequantised values (the tests' own reference quantiser and dequantiser, not abliterate's), the edit
moves the weights along r by far more than a step, every other tensor and scale is byte-identical, transformers
loads the result, `verify` passes and catches a flipped byte, and the adapter loads with peft and is exact on
the dequantised model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from abliterate.cli.main import cli
from abliterate.io.direction_file import save_direction
from tests.families import EFFECT_FLOOR, FAMILIES, IDS, LOGIT_TOLERANCE, ablation_hooks, hook_paths
from tests.quant_models import (
    MXFP4_FAMILY,
    fp8_checkpoint,
    fp8_dequantise,
    fp8_quantise,
    fp8_step,
    mxfp4_checkpoint,
    mxfp4_dequantise,
    write_folder,
)

FP8_CASES = {"deepseek_v3": (8, 16), "qwen3": (16, 8)}  # non-square blocks: an axis mix-up cannot pass


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("model*.safetensors")):
        with safe_open(file, "pt") as f:
            out |= {n: f.get_tensor(n) for n in f.keys()}
    return out


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def edited(kind: str, tmp: Path) -> tuple[Path, Path, torch.Tensor]:
    """(quantised original, edited folder, unit direction)."""
    r = torch.randn(32, generator=torch.Generator().manual_seed(5))
    r /= r.norm()
    if kind == "mxfp4":
        original = mxfp4_checkpoint(tmp / "original", r)
    else:
        original = fp8_checkpoint(tmp / "original", kind, FP8_CASES[kind], r)
    save_direction(tmp / "dir.safetensors", r, {"model": "tiny", "layer": 1, "position": -1})
    code, out = run("apply", original, "--direction", tmp / "dir.safetensors", "--out", tmp / "edited", "--quiet")
    assert code == 0, out
    assert "quantisation error" in out
    return original, tmp / "edited", r.double()


@pytest.fixture(scope="module", params=[*FP8_CASES, "mxfp4"])
def case(request, tmp_path_factory):
    return request.param, *edited(request.param, tmp_path_factory.mktemp(request.param))


def dequantised(kind: str, t: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [.., d, in] in the stored orientation, one quantisation step per element) by the tests' reference."""
    if kind == "mxfp4":
        base = name.removesuffix("_blocks")
        values = mxfp4_dequantise(t[name], t[base + "_scales"]).double()
        scale = torch.exp2(t[base + "_scales"].double() - 127).repeat_interleave(32, -1)
        a = (values.abs() / scale).clamp(min=1.0)
        return values, torch.exp2(torch.floor(torch.log2(a)).clamp(max=2) - 1) * scale
    block = FP8_CASES[kind]
    s = t[name + "_scale_inv"]
    values = fp8_dequantise(t[name], s, block).double()
    return values, fp8_step(values, s, block)


def quantised_writers(kind: str, t: dict[str, torch.Tensor]) -> list[str]:
    if kind == "mxfp4":
        return [n for n in t if n.endswith("experts.down_proj_blocks")]
    return [n for n in t if n.endswith(("o_proj.weight", "down_proj.weight")) and t[n].dtype == torch.float8_e4m3fn]


def test_each_edited_tensor_is_within_one_step_of_the_dequantised_edit(case):
    kind, original, out, r = case
    before, after = tensors(original), tensors(out)
    names = quantised_writers(kind, before)
    assert names
    for name in names:
        w, _ = dequantised(kind, before, name)
        have, step = dequantised(kind, after, name)
        want = w - torch.einsum("d,...dn->...n", r, w).unsqueeze(-2) * r[:, None]
        assert ((have - want).abs() <= step).all(), name
        along_before = torch.einsum("d,...dn->...n", r, w)
        along_after = torch.einsum("d,...dn->...n", r, have)
        # the effect: r^T W moved by far more than a step, and what is left along r is quantisation noise
        assert (along_before - along_after).pow(2).mean().sqrt() >= 5 * step.pow(2).mean().sqrt(), name
        assert along_after.norm() <= 0.1 * along_before.norm(), name


def test_untouched_tensors_and_scales_are_byte_identical(case):
    kind, original, out, _ = case
    before, after = tensors(original), tensors(out)
    assert before.keys() == after.keys()
    changed = {n for n in before if raw(before[n]) != raw(after[n])}
    writers = set(quantised_writers(kind, before))
    scales = {n.removesuffix("_blocks") + "_scales" if kind == "mxfp4" else n + "_scale_inv" for n in writers}
    assert writers <= changed and scales <= changed
    for name in changed - writers - scales:  # float writers: the embedding, o_proj (gpt-oss keeps it float), biases
        assert before[name].dtype == torch.float32 and ("embed" in name or "o_proj" in name or "_bias" in name), name
    assert any(before[n].dtype != torch.float32 for n in set(before) - changed), "quantised tensors were left alone"


def test_transformers_loads_the_edit_as_the_reference_dequantises_it(case):
    kind, _, out, _ = case
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    after = tensors(out)
    for name in quantised_writers(kind, after):
        values, _ = dequantised(kind, after, name)
        if kind == "mxfp4":
            assert torch.equal(loaded[name.removesuffix("_blocks")], values.float().transpose(1, 2))
        elif ".experts." in name:
            layer, expert = name.split(".layers.")[1].split(".")[0], int(name.split(".experts.")[1].split(".")[0])
            assert torch.equal(loaded[f"model.layers.{layer}.mlp.experts.down_proj"][expert], values.float())
        else:
            assert torch.equal(loaded[name], values.float())


def test_verify_passes_and_catches_a_flipped_byte(case, tmp_path):
    kind, original, out, _ = case
    code, report = run("verify", original, out)
    assert code == 0, report
    assert "byte-identical" in report
    after = tensors(out)
    names = quantised_writers(kind, after)
    untouched = next(n for n, t in after.items() if t.dtype in (torch.float8_e4m3fn, torch.uint8) and n not in names
                     and not n.endswith(("_scales", "_scale_inv")))
    scale = names[0].removesuffix("_blocks") + "_scales" if kind == "mxfp4" else names[0] + "_scale_inv"
    for name in (names[0], scale, untouched):
        copy = tmp_path / name
        _flip_first_byte(out, copy, name)
        code, report = run("verify", original, copy)
        assert code != 0, name
        assert name in report or (name == scale and names[0] in report), report


def _flip_first_byte(src: Path, dst: Path, name: str) -> None:
    """A copy of the edited folder with one byte of `name` inverted."""
    import json
    import shutil

    shutil.copytree(src, dst)
    shard = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"][name]
    data = bytearray((dst / shard).read_bytes())
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    at = 8 + int.from_bytes(data[:8], "little") + header[name]["data_offsets"][0] + 1
    data[at] ^= 0xFF
    (dst / shard).write_bytes(bytes(data))


def test_adapter_loads_with_peft_and_is_exact_on_the_dequantised_model(case, tmp_path):
    kind, original, _, r = case
    code, out = run("apply", original, "--direction", original.parent / "dir.safetensors",
                    "--out", tmp_path / "adapter", "--adapter", "--quiet")
    assert code == 0, out
    assert "dequantised" in out and "dequantised" in (tmp_path / "adapter" / "abliterate.json").read_text()
    family = MXFP4_FAMILY if kind == "mxfp4" else FAMILIES[kind]
    base = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).eval()
    hooks = ablation_hooks(base, hook_paths(family, base.config.num_hidden_layers), r.float())
    with torch.no_grad():
        expected = base(IDS).logits
        for h in hooks:
            h.remove()
        unedited = base(IDS).logits
        got = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(IDS).logits
    assert (expected - unedited).abs().max() >= EFFECT_FLOOR
    assert (got - expected).abs().max() <= LOGIT_TOLERANCE


def test_merging_the_adapter_into_fp8_writes_applys_bytes_and_mxfp4_experts_are_refused(case, tmp_path):
    kind, original, out, _ = case
    code, report = run("apply", original, "--direction", original.parent / "dir.safetensors",
                       "--out", tmp_path / "adapter", "--adapter", "--quiet")
    assert code == 0, report
    code, report = run("merge", original, tmp_path / "adapter", "--out", tmp_path / "merged", "--quiet")
    if kind == "mxfp4":
        assert code == 2 and "MXFP4" in report and not (tmp_path / "merged").exists()
        return
    assert code == 0, report
    assert "quantisation error" in report
    for shard in sorted(out.glob("model-*.safetensors")):
        assert (tmp_path / "merged" / shard.name).read_bytes() == shard.read_bytes(), shard.name
    code, report = run("verify", original, tmp_path / "merged")
    assert code == 0, report


def test_whole_job_extracts_edits_and_evaluates_an_fp8_checkpoint_in_its_format(refusing_model, tmp_path):
    """The toy that refuses, released in FP8 (16 x 16 blocks): the job extracts on the dequantised model, writes
    FP8 that `verify` accepts, and evaluates the written checkpoint (hooks would miss the requantisation)."""
    import json
    import shutil

    from abliterate.demo.toy import toy_prompts
    from abliterate.jobs.run_options import RunOptions
    from abliterate.jobs.whole_job import run as run_job

    folder = tmp_path / "toy-fp8"
    floats = tensors(refusing_model)
    quantised = {}
    for name, t in floats.items():
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            quantised[name], quantised[name + "_scale_inv"] = fp8_quantise(t.float(), (16, 16))
        else:
            quantised[name] = t
    config = json.loads((refusing_model / "config.json").read_text()) | {"quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 16]}}
    names = list(quantised)
    write_folder(folder, quantised, config, [names[: len(names) // 2], names[len(names) // 2:]])
    for extra in refusing_model.iterdir():
        if extra.is_file() and not extra.name.startswith(("model", "config.json")):
            shutil.copy(extra, folder / extra.name)
    prompts, files = toy_prompts(), {}
    for name in ("harmful_train", "harmless_train", "harmful_test", "harmless_test"):
        (tmp_path / f"{name}.txt").write_text("\n".join(getattr(prompts, name)))
        files[name] = str(tmp_path / f"{name}.txt")
    (tmp_path / "quick.yaml").write_text("extract:\n  n_train: 32\n  n_val: 16\n  finalists: 4\n"
                                         "evaluate:\n  limit: 4\n  max_new_tokens: 12\n  kl_tokens: 8\n")
    result = run_job(RunOptions(model=str(folder), out=tmp_path / "out", harmful=files["harmful_train"],
                                harmless=files["harmless_train"], eval_harmful=files["harmful_test"],
                                eval_harmless=files["harmless_test"], recipe=tmp_path / "quick.yaml", quiet=True))
    written = tensors(tmp_path / "out")
    assert written["model.layers.0.self_attn.o_proj.weight"].dtype == torch.float8_e4m3fn
    code, report = run("verify", folder, tmp_path / "out")
    assert code == 0, report
    assert result.refusal_rate == 0.0
