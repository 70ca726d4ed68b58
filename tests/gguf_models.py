"""Tiny GGUF files for the tests, written with the gguf library from a tiny random safetensors model.

Tensor names follow llama.cpp's (token_embd, blk.N.attn_output, blk.N.ffn_down, MoE experts
stacked into blk.N.ffn_down_exps [E, d, ff], shared expert ffn_down_shexp); tensors these tests do
not edit keep a llama.cpp-like name or their own (the editor must only copy them).
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

from abliterate.gguf.kquants import KQUANT_TYPES, quantize_kquant

NAMES = (
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", r"blk.\1.attn_\2.\3"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)", r"blk.\1.attn_output.\2"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"blk.\1.ffn_\2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_expert\.(gate|up|down)_proj\.weight", r"blk.\1.ffn_\2_shexp.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate\.weight", r"blk.\1.ffn_gate_inp.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_expert_gate\.weight", r"blk.\1.ffn_gate_inp_shexp.weight"),
)
EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")


def gguf_tensors(folder: Path) -> dict[str, np.ndarray]:
    """A saved checkpoint's float32 tensors under llama.cpp names, experts stacked per layer."""
    tensors: dict[str, np.ndarray] = {}
    experts: dict[str, dict[int, np.ndarray]] = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        for name, value in load_file(shard).items():
            m = EXPERT.fullmatch(name)
            if m:
                experts.setdefault(f"blk.{m.group(1)}.ffn_{m.group(3)}_exps.weight", {})[int(m.group(2))] = value
                continue
            for pattern, target in NAMES:
                if re.fullmatch(pattern, name):
                    name = re.sub(pattern, target, name)
                    break
            tensors[name] = value
    for name, by_index in experts.items():
        tensors[name] = np.stack([by_index[i] for i in sorted(by_index)])
    return tensors


def write_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray], *, hidden: int, layers: int,
               types: dict[str, str] | None = None, extra: dict[str, object] | None = None) -> Path:
    """Write tensors (float32, numpy order) as GGUF; `types` maps a regex of names to a GGML type."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(layers)
    writer.add_embedding_length(hidden)
    writer.add_name("tiny test model")
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(8)])
    for key, value in (extra or {}).items():
        writer.add_string(key, str(value))
    for name, value in tensors.items():
        type_name = next((t for p, t in (types or {}).items() if re.fullmatch(p, name)), "F32")
        qtype = gguf.GGMLQuantizationType[type_name]
        if type_name == "F32":
            writer.add_tensor(name, value.astype(np.float32))
        elif type_name == "F16":
            writer.add_tensor(name, value.astype(np.float16))
        elif value.dtype == np.uint8:  # raw blocks given as they are
            writer.add_tensor(name, value, raw_dtype=qtype)
        elif type_name in KQUANT_TYPES:  # the values quantised as llama.cpp's reference would
            blocks = quantize_kquant(value.astype(np.float32), type_name)
            writer.add_tensor(name, blocks.reshape(*value.shape[:-1], -1), raw_dtype=qtype)
        elif type_name in RANDOM_HALVES:
            writer.add_tensor(name, random_blocks(value.shape, type_name), raw_dtype=qtype)
        else:
            writer.add_tensor(name, gguf.quants.quantize(value.astype(np.float32), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# types the tests write as random blocks (llama.cpp's quantisers for them need an importance matrix):
# the byte offsets of their float16 scales, set to small numbers so that every block is finite
RANDOM_HALVES = {"IQ4_XS": (0,), "IQ4_NL": (0,)}


def random_blocks(shape: tuple[int, ...], type_name: str, seed: int = 0) -> np.ndarray:
    """Valid blocks of a type of random values: random bytes, with each float16 scale small."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    blocks = np.random.default_rng(seed).integers(0, 256, (int(np.prod(shape)) // block, size), dtype=np.uint8)
    for at in RANDOM_HALVES[type_name]:
        blocks[:, at : at + 2] = np.array([0.002], np.float16).view(np.uint8)
    return blocks.reshape(*shape[:-1], shape[-1] // block * size)


def read_values(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF dequantised to float32, numpy order (tests only: loads the whole file)."""
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        out[t.name] = np.asarray(gguf.quants.dequantize(np.array(t.data), t.tensor_type), np.float32).reshape(shape)
    return out


def raw_bytes(path: Path) -> dict[str, bytes]:
    reader = gguf.GGUFReader(path)
    return {t.name: bytes(np.array(t.data).view(np.uint8).reshape(-1)) for t in reader.tensors}


def kquant_inputs(seed: int, blocks: int) -> np.ndarray:
    """[blocks, 256] float32 test inputs for the K-quant quantisers, the kinds of block that steer their
    searches differently: Gaussian weights of scales 1e-4..1e2, per-sub-block scales, one-signed
    blocks, heavy tails and outliers, zero and constant sub-blocks and blocks, and values on a grid
    (dequantised-like, so that rounding meets exact halves)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((blocks, 256)) * 10.0 ** rng.uniform(-4, 2, (blocks, 1))
    kind = np.arange(blocks) % 8
    sub = 10.0 ** rng.uniform(-2, 1, (blocks, 16, 1))
    x[kind == 1] = (x.reshape(blocks, 16, 16) * sub).reshape(blocks, 256)[kind == 1]
    x[kind == 2] = np.abs(x[kind == 2]) * np.where(rng.random((int((kind == 2).sum()), 1)) < 0.5, 1, -1)
    x[kind == 3] = rng.standard_t(2, (int((kind == 3).sum()), 256)) * 0.01
    x[kind == 3, rng.integers(0, 256)] *= 50
    zero = (kind == 4)[:, None] & (rng.random((blocks, 16)) < 0.4).repeat(16, axis=1)
    x[zero] = 0.0
    x[kind == 5] = rng.choice([0.0, 0.5, -1.25, 3.0], (int((kind == 5).sum()), 1)) * np.ones(256)
    grid = rng.integers(-8, 8, (blocks, 256)) * 10.0 ** rng.uniform(-3, 0, (blocks, 1))
    x[kind >= 6] = (grid + (kind[:, None] == 7) * rng.integers(-3, 1, (blocks, 1)) * 0.5 * grid.std())[kind >= 6]
    return x.astype(np.float32)
