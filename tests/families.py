"""Tiny random models, one per architecture family, saved as sharded float32 safetensors.

Each family lists, independently of abliterate's own table, the in-memory modules whose outputs
an edit must be equivalent to ablating: the reference the exactness tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
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
    writers_per_layer: int = 2  # edited tensors per layer at least (a hybrid layer may hold one mixer only)
    # what each writer's output is multiplied by before the residual add, where writers differ (Falcon-H1); None:
    # every writer's by the table's residual_multiplier (1 for most)
    multipliers: frozenset[float] | None = None
    # (why `apply --adapter` is refused, the --components an adapter does carry), where peft refuses some writer
    adapter_refused: tuple[str, str] | None = None
    # the released checkpoints store tensors under their in-memory names (Qwen3.5-MoE's fused experts), which
    # save_pretrained would split back into one tensor per expert
    saved_as_in_memory: bool = False


# Llama-like configs also name special tokens inside the tiny vocabulary (several defaults point past it).
LLAMA_LIKE = dict(COMMON, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(num_local_experts=3, num_experts_per_tok=2)
GPT2_LIKE = dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
GPT2_HOOKS = ("transformer.wte", "transformer.wpe", "transformer.h.{L}.attn.c_proj", "transformer.h.{L}.mlp")
GRANITE_MOE_HOOKS = ("model.embed_tokens", "model.layers.{L}.self_attn.o_proj", "model.layers.{L}.block_sparse_moe")
# Granite scales embeddings and block outputs by config multipliers: set them away from 1 so they matter.
GRANITE = dict(embedding_multiplier=3.0, residual_multiplier=0.5, logits_scaling=2.0)
# Cohere multiplies its logits by 1/16 by default, which would shrink every effect the tests measure below their floor.
COHERE = dict(LLAMA_LIKE, logit_scale=1.0)
# DeepSeek-style MoE (routed experts, one shared expert, the first layer dense) and multi-head latent attention.
DEEPSEEK_MOE = dict(n_routed_experts=3, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                    first_k_dense_replace=1)
MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)

# Hybrid stacks: each mixer kind in a 2-4 layer model, the hooks naming each layer's own modules (layers differ).
LINEAR_ATTN = dict(LLAMA_LIKE, layer_types=["linear_attention", "full_attention"], linear_key_head_dim=8,
                   linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4)
QWEN_MOE = dict(num_experts=3, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24)
QWEN3_NEXT_HOOKS = ("model.embed_tokens", "model.layers.0.linear_attn.out_proj", "model.layers.1.self_attn.o_proj",
                    "model.layers.{L}.mlp")
MAMBA2 = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=8)
MAMBA_ATTN_HOOKS = ("model.embed_tokens", "model.layers.0.mamba.out_proj", "model.layers.1.self_attn.o_proj")
HYBRID = [
    Family("qwen3_next", dict(LINEAR_ATTN, **QWEN_MOE, mlp_only_layers=[0]), hooks=QWEN3_NEXT_HOOKS),
    Family("qwen3_5_text", LINEAR_ATTN, hooks=QWEN3_NEXT_HOOKS),
    Family("qwen3_5_moe_text", dict(LINEAR_ATTN, **QWEN_MOE), hooks=QWEN3_NEXT_HOOKS, saved_as_in_memory=True),
    Family("granitemoehybrid", dict(LLAMA_LIKE, **MAMBA2, **MOE, **GRANITE, layer_types=["mamba", "attention"],
                                    shared_intermediate_size=24, attention_multiplier=0.3),
           hooks=(*MAMBA_ATTN_HOOKS, "model.layers.{L}.block_sparse_moe", "model.layers.{L}.shared_mlp")),
    Family("lfm2", dict(LLAMA_LIKE, layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False),
           hooks=("model.embed_tokens", "model.layers.0.conv.out_proj", "model.layers.1.self_attn.out_proj",
                  "model.layers.{L}.feed_forward"), final_norm="model.embedding_norm", tied=True),
    Family("lfm2_moe", dict(LLAMA_LIKE, num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"],
                            num_dense_layers=1, num_experts=3, num_experts_per_tok=2, moe_intermediate_size=16),
           hooks=("model.embed_tokens", "model.layers.0.conv.out_proj", "model.layers.1.self_attn.out_proj",
                  "model.layers.2.conv.out_proj", "model.layers.{L}.feed_forward"),
           final_norm="model.embedding_norm", tied=True),
    Family("jamba", dict(LLAMA_LIKE, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                         expert_layer_offset=1, num_experts=3, num_experts_per_tok=2, mamba_d_state=8,
                         mamba_dt_rank=4),
           hooks=(*MAMBA_ATTN_HOOKS, "model.layers.{L}.feed_forward"), final_norm="model.final_layernorm"),
    Family("bamba", dict(LLAMA_LIKE, **MAMBA2, attn_layer_indices=[1]),
           hooks=(*MAMBA_ATTN_HOOKS, "model.layers.{L}.feed_forward"), final_norm="model.final_layernorm"),
    # Zamba2's shared attention block only feeds the Mamba mixers' inputs: the Mamba outputs are the only writers
    Family("zamba2", dict(COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_key_value_heads=4,
                          num_hidden_layers=3, mamba_d_state=8, n_mamba_heads=4, mamba_headdim=16, chunk_size=8,
                          layers_block_type=["mamba", "hybrid", "mamba"], use_shared_attention_adapter=True,
                          adapter_rank=4),
           hooks=("model.embed_tokens", "model.layers.0.mamba.out_proj", "model.layers.1.mamba_decoder.mamba.out_proj",
                  "model.layers.2.mamba.out_proj"), final_norm="model.final_layernorm", tied=True,
           writers_per_layer=1),
    # Falcon-H1's multipliers away from 1 (and from each other) so that they matter
    Family("falcon_h1", dict(LLAMA_LIKE, **dict(MAMBA2, mamba_d_head=8), mamba_d_ssm=32, lm_head_multiplier=0.7,
                             embedding_multiplier=3.0, mlp_multipliers=[1.5, 0.6], key_multiplier=1.3,
                             attention_out_multiplier=0.8, attention_in_multiplier=1.2, ssm_in_multiplier=1.4,
                             ssm_multipliers=[1.1, 0.9, 1.2, 0.8, 1.3], ssm_out_multiplier=0.7),
           hooks=("model.embed_tokens", "model.layers.{L}.mamba.out_proj", "model.layers.{L}.self_attn.o_proj",
                  "model.layers.{L}.feed_forward.down_proj"), final_norm="model.final_layernorm",
           multipliers=frozenset({0.7, 0.8, 0.6}), adapter_refused=("peft refuses a LoRA on out_proj", "embed,mlp")),
    # Nemotron-H: one mixer per layer (Mamba-2, MoE with a shared expert, attention, ReLU^2 MLP), `backbone.` on disk
    Family("nemotron_h", dict(LLAMA_LIKE, layers_block_type=["mamba", "moe", "attention", "mlp"], mamba_num_heads=4,
                              mamba_head_dim=16, ssm_state_size=8, n_groups=1, chunk_size=8, n_routed_experts=3,
                              num_experts_per_tok=2, moe_intermediate_size=16,
                              moe_shared_expert_intermediate_size=24),
           hooks=("model.embeddings", "model.layers.{L}.mixer"), final_norm="model.norm_f", writers_per_layer=1,
           adapter_refused=("peft refuses a LoRA on out_proj", "embed,mlp")),
    Family("kimi_linear", dict(LLAMA_LIKE, num_key_value_heads=4, layer_types=["linear_attention", "full_attention"],
                               mlp_layer_types=["dense", "sparse"], num_experts=3, num_experts_per_tok=2,
                               moe_intermediate_size=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                               v_head_dim=8, linear_head_dim=8, linear_num_heads=4)),
]

FAMILIES: dict[str, Family] = {f.model_type: f for f in [
    Family("llama", COMMON),
    Family("mistral", COMMON),
    Family("ministral", LLAMA_LIKE),
    Family("qwen2", dict(COMMON, tie_word_embeddings=True), tied=True),
    Family("qwen3", dict(COMMON, head_dim=8)),
    Family("gemma", LLAMA_LIKE, tied=True),
    Family("gemma2", dict(COMMON, head_dim=8), tied=True),
    Family("gemma3_text", dict(COMMON, head_dim=8), tied=True),
    Family("phi3", dict(COMMON, pad_token_id=0)),
    Family("olmo", LLAMA_LIKE),
    Family("olmo2", COMMON),
    Family("olmo3", LLAMA_LIKE),
    Family("granite", dict(LLAMA_LIKE, **GRANITE)),
    Family("cohere", COHERE, tied=True),
    Family("cohere2", COHERE, tied=True),
    Family("stablelm", LLAMA_LIKE),
    Family("glm", LLAMA_LIKE),
    Family("glm4", LLAMA_LIKE),
    Family("smollm3", LLAMA_LIKE, tied=True),
    Family("exaone4", LLAMA_LIKE),
    Family("seed_oss", LLAMA_LIKE),
    Family("arcee", LLAMA_LIKE),
    Family("apertus", LLAMA_LIKE),
    Family("helium", LLAMA_LIKE),
    Family("hunyuan_v1_dense", dict(LLAMA_LIKE, rope_scaling=None)),
    Family("gpt2", GPT2_LIKE, tied=True, hooks=GPT2_HOOKS, final_norm="transformer.ln_f"),
    Family("gpt_bigcode", GPT2_LIKE, tied=True, hooks=GPT2_HOOKS, final_norm="transformer.ln_f"),
    Family("gpt_neox", dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64),
           hooks=("gpt_neox.embed_in", "gpt_neox.layers.{L}.attention.dense", "gpt_neox.layers.{L}.mlp"),
           final_norm="gpt_neox.final_layer_norm"),
    Family("phi", LLAMA_LIKE, hooks=("model.embed_tokens", "model.layers.{L}.self_attn.dense", "model.layers.{L}.mlp"),
           final_norm="model.final_layernorm"),
    Family("starcoder2", LLAMA_LIKE, tied=True),
    Family("mixtral", dict(COMMON, **MOE)),
    Family("phimoe", dict(LLAMA_LIKE, **MOE)),
    Family("qwen2_moe", dict(COMMON, num_experts=3, num_experts_per_tok=2, moe_intermediate_size=16,
                             shared_expert_intermediate_size=24)),
    Family("qwen3_moe", dict(COMMON, head_dim=8, num_experts=3, num_experts_per_tok=2, moe_intermediate_size=16)),
    Family("olmoe", dict(COMMON, num_experts=3, num_experts_per_tok=2)),
    Family("deepseek_v3", dict(
        COMMON, num_key_value_heads=4, n_routed_experts=3, num_experts_per_tok=2, moe_intermediate_size=16,
        n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1, head_dim=8, rope_scaling=None)),
    Family("gpt_oss", dict(COMMON, head_dim=8, num_local_experts=3, num_experts_per_tok=2, layer_types=None)),
    Family("granitemoe", dict(COMMON, **MOE, **GRANITE), hooks=GRANITE_MOE_HOOKS),
    Family("granitemoeshared", dict(LLAMA_LIKE, **MOE, **GRANITE, shared_intermediate_size=24),
           hooks=(*GRANITE_MOE_HOOKS, "model.layers.{L}.shared_mlp")),
    # issue 26, text families (h-text): MoE configs keep layer 0 dense where the family has that switch
    Family("ministral3", LLAMA_LIKE),
    Family("internlm3", dict(LLAMA_LIKE, attention_bias=True, mlp_bias=True)),
    Family("ernie4_5", dict(LLAMA_LIKE, use_bias=True), tied=True),
    Family("ernie4_5_moe", dict(LLAMA_LIKE, use_bias=True, moe_num_experts=3, moe_k=2, moe_intermediate_size=16,
                                moe_num_shared_experts=1, moe_layer_start_index=1), tied=True),
    Family("glm4_moe", dict(LLAMA_LIKE, attention_bias=True, **DEEPSEEK_MOE, num_mtp_layers=0)),
    Family("glm4_moe_lite", dict(LLAMA_LIKE, num_key_value_heads=4, **DEEPSEEK_MOE, **MLA)),
    Family("deepseek_v2", dict(LLAMA_LIKE, num_key_value_heads=4, **DEEPSEEK_MOE, **dict(MLA, q_lora_rank=None))),
    Family("deepseek_v32", dict(LLAMA_LIKE, num_key_value_heads=4, **DEEPSEEK_MOE, **MLA, n_group=1, topk_group=1,
                                index_topk=8, index_head_dim=16, index_n_heads=2)),
    Family("dots1", dict(LLAMA_LIKE, **DEEPSEEK_MOE)),
    Family("cohere2_moe", dict(COHERE, num_experts=3, num_experts_per_tok=2, num_shared_experts=1), tied=True),
    Family("hunyuan_v1_moe", dict(LLAMA_LIKE, num_experts=3, moe_topk=2)),
    Family("minimax_m2", dict(LLAMA_LIKE, **MOE)),
    Family("exaone", dict(LLAMA_LIKE, attention_bias=True)),  # GPT-2-style names on disk, Llama in memory
    # DBRX's attention reads rope_theta and clip_qkv from attn_config, whose class defaults neither (the released
    # config sets both)
    Family("dbrx", dict(vocab_size=96, d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
                        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                        ffn_config=dict(ffn_hidden_size=16, moe_num_experts=3, moe_top_k=2)),
           hooks=("transformer.wte", "transformer.blocks.{L}.norm_attn_norm.attn.out_proj",
                  "transformer.blocks.{L}.ffn"), final_norm="transformer.norm_f"),
    # Gemma 4: full-attention layers get global_head_dim (512 by default); the MoE block beside the MLP is on
    Family("gemma4_text", dict(LLAMA_LIKE, global_head_dim=8, hidden_size_per_layer_input=8,
                               vocab_size_per_layer_input=96, sliding_window=8, enable_moe_block=True, num_experts=3,
                               top_k_experts=2, moe_intermediate_size=16), tied=True,
           hooks=(*LLAMA_HOOKS, "model.layers.{L}.experts", "model.layers.{L}.per_layer_projection")),
    *HYBRID,
]}

# Families the exactness test runs on: every one above.
FAMILY_NAMES = sorted(FAMILIES)

# The exactness tests' tolerance on logits in float32 (the README states it), and the least the removed direction
# must move some logit for the comparison to mean something: a thousand times the tolerance, so an edit that is
# even a fraction of a percent wrong fails.
LOGIT_TOLERANCE = 1e-5
EFFECT_FLOOR = 1e4 * LOGIT_TOLERANCE
IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))


def build_model(family: Family, seed: int = 0) -> torch.nn.Module:
    """A random model whose every parameter (biases and norm gains included) is non-trivial."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family.model_type, **family.config)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.saved_as_in_memory = family.saved_as_in_memory
    return model


def written_direction(model: torch.nn.Module) -> torch.Tensor:
    """A unit direction the model writes along: the top right singular vector of its residual stream after each
    layer but the last (whose output is normalised) on IDS. Removing it moves logits by far more than removing a
    random direction, which is mostly orthogonal to what the model writes."""
    with torch.no_grad():
        states = model(IDS, output_hidden_states=True).hidden_states
    d = states[0].shape[-1]
    stacked = torch.cat([h.reshape(-1, d) for h in states[1:-1]]).double()
    return torch.linalg.svd(stacked, full_matrices=False).Vh[0].float()


def save_sharded(model: torch.nn.Module, folder: Path, *, shards_at_least: int = 2) -> Path:
    """save_pretrained with a shard size small enough to give several shards."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if getattr(model, "saved_as_in_memory", False):
        model.config.save_pretrained(folder)
        save_torch_state_dict(model.state_dict(), folder, max_shard_size=max(total // (shards_at_least + 1), 1024))
    else:
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
