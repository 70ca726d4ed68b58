"""Tiny FP8 block-scaled and MXFP4 checkpoints in the layouts of DeepSeek V3's / Qwen3's FP8 releases and of
gpt-oss, quantised by the tests' own reference (torch's float8 cast, a table for FP4), independent of abliterate's
codec; and the reference dequantisation the tests compare against."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.families import FAMILIES, Family, build_model

FP8_MAX = 448.0
FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def fp8_quantise(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3fn values, float32 scale_inv per block), blocks at the end of an axis may be partial."""
    rows, cols = w.shape
    sr, sc = math.ceil(rows / block[0]), math.ceil(cols / block[1])
    scales = torch.ones(sr, sc)
    for i in range(sr):
        for j in range(sc):
            amax = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]].abs().max()
            if amax > 0:
                scales[i, j] = amax / FP8_MAX
    full = scales.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (w / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scales


def fp8_dequantise(q: torch.Tensor, scales: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    rows, cols = q.shape
    full = scales.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return q.float() * full


def fp8_step(w: torch.Tensor, scales: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """One e4m3 step at each element's magnitude, in weight units."""
    rows, cols = w.shape
    full = scales.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols].double()
    a = (w.double().abs() / full).clamp(min=2.0**-6)
    return torch.exp2(torch.floor(torch.log2(a)) - 3) * full


def mxfp4_quantise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., rows, cols] -> ([..., rows, cols/32, 16] packed bytes, [..., rows, cols/32] e8m0 bytes): the nearest
    of the 16 values (ties to the even code), exponent the smallest with absmax <= 6 x 2^e."""
    blocks = w.reshape(*w.shape[:-1], -1, 32).double()
    amax = blocks.abs().amax(-1)
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.full_like(amax, -127.0))
    x = blocks / torch.exp2(exp)[..., None]
    dist = (x.abs()[..., None] - FP4[:8].double()).abs()
    best = dist.min(-1, keepdim=True).values
    ties = (dist == best) & (torch.arange(8) % 2 == 0)  # prefer the even code (even mantissa)
    code = torch.where(ties.any(-1), ties.int().argmax(-1), dist.argmin(-1))
    code = (code | torch.where(torch.signbit(x), 8, 0)).to(torch.uint8)  # the sign bit, of zero too
    packed = code[..., 0::2] | (code[..., 1::2] << 4)
    return packed, (exp + 127).to(torch.uint8)


def mxfp4_dequantise(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    lo, hi = FP4[(packed & 15).long()], FP4[(packed >> 4).long()]
    values = torch.stack([lo, hi], -1).reshape(*packed.shape[:-1], 32)
    values = values * torch.exp2(scales.double() - 127)[..., None].float()
    return values.reshape(*values.shape[:-2], -1)


def write_folder(folder: Path, tensors: dict[str, torch.Tensor], config: dict, shards: list[list[str]]) -> Path:
    """Safetensors shards holding the named tensors as listed, an index and config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in names}, folder / file, metadata={"format": "pt"})
        weight_map |= {n: file for n in names}
    assert sorted(weight_map) == sorted(tensors)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def saved_tensors(model: torch.nn.Module, folder: Path) -> dict[str, torch.Tensor]:
    """The model's tensors as save_pretrained lays them out on disk (experts one tensor each where the family
    stores them so)."""
    model.save_pretrained(folder)
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            tensors |= {n: f.get_tensor(n) for n in f.keys()}
    return tensors


def writing_along(name: str, p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The residual writers (o_proj, down_proj, experts) made to write strongly along r, as a model writes along
    the direction an edit removes: r^T W is then many quantisation steps, so an edit that is not done shows."""
    g = torch.Generator().manual_seed(len(name))
    if name.endswith(("o_proj.weight", "down_proj.weight")) and p.ndim == 2:
        return p + 0.2 * torch.outer(r, torch.randn(p.shape[1], generator=g))
    if name.endswith("experts.down_proj"):  # gpt-oss: [experts, in, d]
        return p + 0.2 * torch.randn(*p.shape[:2], 1, generator=g) * r
    return p


def fp8_checkpoint(folder: Path, model_type: str, block: tuple[int, int], r: torch.Tensor) -> Path:
    """The tiny family model with every linear weight inside its decoder layers in FP8 (the releases leave the
    embeddings, norms, routers and lm_head alone), a scale tensor stored in the other shard than its weight."""
    model = build_model(FAMILIES[model_type])
    tensors = {}
    for name, p in saved_tensors(model, folder.with_name(folder.name + "-float")).items():
        p = writing_along(name, p.float(), r)
        quantise = name.startswith("model.layers.") and name.endswith("proj.weight") and p.ndim == 2
        if quantise:
            q, s = fp8_quantise(p.float(), block)
            tensors[name], tensors[name + "_scale_inv"] = q, s
        else:
            tensors[name] = p.float().contiguous()
    names = list(tensors)
    first = [n for n in names if ".layers.0." in n or n.startswith("model.embed")]
    rest = [n for n in names if n not in first]
    moved = next(n for n in first if n.endswith("o_proj.weight_scale_inv"))  # the other shard than its weight
    first.remove(moved)
    config = model.config.to_dict() | {"quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}}
    return write_folder(folder, tensors, config, [first, [*rest, moved]])


# gpt-oss's MXFP4 release quantises the experts only; its rows of 32 values need the expert widths to be multiples
MXFP4_FAMILY = Family("gpt_oss", dict(FAMILIES["gpt_oss"].config, intermediate_size=64))


def mxfp4_checkpoint(folder: Path, r: torch.Tensor) -> Path:
    """The tiny gpt-oss with its experts' projections as `*_blocks` / `*_scales` (stored [experts, out, in]:
    the transpose of the parameters in memory), the rest float32, as the gpt-oss release lays it out."""
    model = build_model(MXFP4_FAMILY)
    tensors = {}
    for name, p in saved_tensors(model, folder.with_name(folder.name + "-float")).items():
        p = writing_along(name, p.float(), r)
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[name + "_blocks"], tensors[name + "_scales"] = mxfp4_quantise(p.float().transpose(1, 2))
        else:
            tensors[name] = p.float().contiguous()
    names = list(tensors)
    first = [n for n in names if ".layers.0." in n or n.startswith("model.embed")]
    config = model.config.to_dict() | {"quantization_config": {
        "quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}}
    return write_folder(folder, tensors, config, [first, [n for n in names if n not in first]])
