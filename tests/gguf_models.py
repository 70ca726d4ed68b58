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
        elif type_name == "Q4_K":
            writer.add_tensor(name, random_q4_k(value.shape), raw_dtype=qtype)
        else:
            writer.add_tensor(name, gguf.quants.quantize(value.astype(np.float32), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_q4_k(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Valid Q4_K bytes of random values (the gguf library reads Q4_K but cannot write it): random
    4-bit codes and sub-block scales, with each block's two float16 scales set to small numbers."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q4_K]
    blocks = np.random.default_rng(seed).integers(0, 256, (int(np.prod(shape)) // block, size), dtype=np.uint8)
    blocks[:, 0:4] = np.array([0.002, 0.001], np.float16).view(np.uint8)
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
