"""Tiny random models, one per architecture family, saved as sharded float32 safetensors.

Each family lists, independently of abliterate's own table, the in-memory modules whose outputs
an edit must be equivalent to ablating: the reference the exactness tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
LLAMA_HOOKS = ("model.embed_tokens", "model.layers.{L}.self_attn.o_proj", "model.layers.{L}.mlp")


@dataclass(frozen=True)
class Family:
    model_type: str
    config: dict
    hooks: tuple[str, ...] = LLAMA_HOOKS  # "{L}" is every layer
    final_norm: str = "model.norm"
    tied: bool = False
    notes: dict = field(default_factory=dict)


FAMILIES: dict[str, Family] = {f.model_type + f.notes.get("suffix", ""): f for f in [
    Family("llama", COMMON),
    Family("mistral", COMMON),
    Family("qwen2", dict(COMMON, tie_word_embeddings=True), tied=True),
    Family("qwen3", dict(COMMON, head_dim=8)),
    Family("gemma2", dict(COMMON, head_dim=8), tied=True),
    Family("gemma3_text", dict(COMMON, head_dim=8), tied=True),
    Family("phi3", dict(COMMON, pad_token_id=0)),
    Family("olmo2", COMMON),
    Family("gpt2", dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64), tied=True,
           hooks=("transformer.wte", "transformer.wpe", "transformer.h.{L}.attn.c_proj", "transformer.h.{L}.mlp"),
           final_norm="transformer.ln_f"),
    Family("gpt_neox", dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64),
           hooks=("gpt_neox.embed_in", "gpt_neox.layers.{L}.attention.dense", "gpt_neox.layers.{L}.mlp"),
           final_norm="gpt_neox.final_layer_norm"),
    Family("mixtral", dict(COMMON, num_local_experts=3, num_experts_per_tok=2)),
    Family("qwen2_moe", dict(COMMON, num_experts=3, num_experts_per_tok=2, moe_intermediate_size=16,
                             shared_expert_intermediate_size=24)),
    Family("qwen3_moe", dict(COMMON, head_dim=8, num_experts=3, num_experts_per_tok=2, moe_intermediate_size=16)),
    Family("gpt_oss", dict(COMMON, head_dim=8, num_local_experts=3, num_experts_per_tok=2, layer_types=None)),
    Family("granitemoe", dict(COMMON, num_local_experts=3, num_experts_per_tok=2),
           hooks=("model.embed_tokens", "model.layers.{L}.self_attn.o_proj", "model.layers.{L}.block_sparse_moe")),
]}

# Families the exactness test runs on: every one above.
FAMILY_NAMES = sorted(FAMILIES)


def build_model(family: Family, seed: int = 0) -> torch.nn.Module:
    """A random model whose every parameter (biases and norm gains included) is non-trivial."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family.model_type, **family.config)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def save_sharded(model: torch.nn.Module, folder: Path, *, shards_at_least: int = 2) -> Path:
    """save_pretrained with a shard size small enough to give several shards."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size=max(total // (shards_at_least + 1), 1024))
    assert len(list(folder.glob("*.safetensors"))) >= shards_at_least
    return folder


def hook_paths(family: Family, num_layers: int) -> list[str]:
    return [h.replace("{L}", str(layer)) for h in family.hooks
            for layer in (range(num_layers) if "{L}" in h else [None])]


def ablation_hooks(model: torch.nn.Module, paths: list[str], r: torch.Tensor) -> list:
    """Forward hooks removing r from each named module's output: the reference for an exact edit."""
    def remove(_module, _inputs, output):
        if isinstance(output, tuple):
            return (remove(None, None, output[0]), *output[1:])
        return output - (output @ r).unsqueeze(-1) * r

    modules = dict(model.named_modules())
    missing = [p for p in paths if p not in modules]
    assert not missing, f"modules not found: {missing}"
    return [modules[p].register_forward_hook(remove) for p in paths]
