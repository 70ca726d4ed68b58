"""Tiny random vision-language models (a tiny vision tower and projector too), one per vision-language type the
table edits, saved as sharded float32 safetensors in the layout transformers 5 writes (its older tensor names).

As in families.py, each lists independently of abliterate's table the in-memory modules an edit must equal
ablating, here the language model's; everything else (vision tower, projector) must stay byte-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForImageTextToText

TEXT = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
LM = "model.language_model"
LM_HOOKS = (f"{LM}.embed_tokens", f"{LM}.layers.{{L}}.self_attn.o_proj", f"{LM}.layers.{{L}}.mlp")
# Text-only inputs: token ids below 88, the image/video/vision-marker ids the configs below set are 88..95.
IDS = torch.randint(3, 88, (2, 12), generator=torch.Generator().manual_seed(2))
MARKERS = dict(image_token_id=95, video_token_id=94, vision_start_token_id=93, vision_end_token_id=92)
MROPE = dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2])  # sections of head_dim / 2
QWEN_VISION = dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32)


@dataclass(frozen=True)
class VLFamily:
    model_type: str
    text: dict
    vision: dict
    top: dict = field(default_factory=dict)  # the outer config's own keys
    hooks: tuple[str, ...] = LM_HOOKS  # "{L}": every layer that has the module (hybrid stacks differ per layer)
    tied: bool = False
    # on-disk prefixes of the vision tower and projector: every tensor under them must stay byte-identical
    vision_prefixes: tuple[str, ...] = ("vision_tower.", "multi_modal_projector.")
    # False: experts fused on disk in a layout peft's adapter cannot name (refused in one line)
    adapter: bool = True


VL_FAMILIES: dict[str, VLFamily] = {f.model_type: f for f in [
    VLFamily("gemma3", dict(TEXT), dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=28, patch_size=14),
             dict(mm_tokens_per_image=4, image_token_index=95, boi_token_index=94, eoi_token_index=93,
                  tie_word_embeddings=True), tied=True),
    VLFamily("mistral3", dict(TEXT, tie_word_embeddings=False),
             dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
                  image_size=28, patch_size=14),
             dict(image_token_index=95, tie_word_embeddings=False)),
    VLFamily("qwen2_5_vl", dict(TEXT, rope_parameters=MROPE),
             dict(QWEN_VISION, fullatt_block_indexes=[0]), dict(MARKERS, tie_word_embeddings=False),
             vision_prefixes=("visual.",)),
    VLFamily("gemma4", dict(TEXT, global_head_dim=8, hidden_size_per_layer_input=8, vocab_size_per_layer_input=96,
                            sliding_window=8, enable_moe_block=True, num_experts=3, top_k_experts=2,
                            moe_intermediate_size=16),
             dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=8, global_head_dim=8),
             dict(image_token_id=95, boi_token_id=94, eoi_token_id=93, tie_word_embeddings=True),
             hooks=(*LM_HOOKS, f"{LM}.layers.{{L}}.experts", f"{LM}.layers.{{L}}.per_layer_projection"), tied=True,
             vision_prefixes=("model.vision_tower.", "model.embed_vision.")),
    VLFamily("glm4v", dict(TEXT, rope_parameters=MROPE),
             dict(QWEN_VISION), dict(MARKERS, image_start_token_id=91, image_end_token_id=90,
                                     video_start_token_id=89, video_end_token_id=88, tie_word_embeddings=False),
             vision_prefixes=("model.visual.",)),
    VLFamily("glm4v_moe", dict(TEXT, n_routed_experts=3, num_experts_per_tok=2, moe_intermediate_size=8,
                               n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                               rope_parameters=dict(MROPE, partial_rotary_factor=1.0)),
             dict(QWEN_VISION), dict(MARKERS, image_start_token_id=91, image_end_token_id=90,
                                     video_start_token_id=89, video_end_token_id=88, tie_word_embeddings=False),
             vision_prefixes=("model.visual.",)),
    VLFamily("kimi_k25", dict(TEXT, num_key_value_heads=4, n_routed_experts=3, num_experts_per_tok=2,
                              moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                              q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1,
                              topk_group=1, rope_scaling=None),
             dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, pos_emb_height=4,
                  pos_emb_width=4),
             dict(media_placeholder_token_id=95, tie_word_embeddings=False),
             vision_prefixes=("vision_tower.", "mm_projector.", "model.mm_projector.")),
    VLFamily("llama4", dict(TEXT, intermediate_size_mlp=64, num_local_experts=3, num_experts_per_tok=1,
                            interleave_moe_layer_step=2, rope_scaling=None),
             dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14, vision_output_dim=16, projector_input_dim=16, projector_output_dim=32),
             dict(image_token_index=95, boi_token_index=94, eoi_token_index=93, tie_word_embeddings=False),
             hooks=("language_model.model.embed_tokens", "language_model.model.layers.{L}.self_attn.o_proj",
                    "language_model.model.layers.{L}.feed_forward"),
             vision_prefixes=("vision_model.", "multi_modal_projector."), adapter=False),
    VLFamily("lfm2_vl", dict(TEXT, layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False),
             dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, num_patches=16),
             dict(image_token_id=95, projector_hidden_size=24, downsample_factor=2, tie_word_embeddings=True),
             hooks=(f"{LM}.embed_tokens", f"{LM}.layers.{{L}}.self_attn.out_proj", f"{LM}.layers.{{L}}.conv.out_proj",
                    f"{LM}.layers.{{L}}.feed_forward.w2"), tied=True,
             vision_prefixes=("model.vision_tower.", "model.multi_modal_projector.")),
    VLFamily("qwen3_vl_moe", dict(TEXT, num_experts=3, num_experts_per_tok=2, moe_intermediate_size=8,
                                  rope_parameters=dict(MROPE, mrope_interleaved=True)),
             dict(QWEN_VISION, deepstack_visual_indexes=[0], num_position_embeddings=16),
             dict(MARKERS, tie_word_embeddings=False), vision_prefixes=("model.visual.",), adapter=False),
    VLFamily("qwen3_vl", dict(TEXT, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                         mrope_section=[1, 1, 2], mrope_interleaved=True)),
             dict(QWEN_VISION, deepstack_visual_indexes=[0], num_position_embeddings=16),
             dict(MARKERS, tie_word_embeddings=False), vision_prefixes=("model.visual.",)),
]}
VL_NAMES = sorted(VL_FAMILIES)


def build_vl_model(family: VLFamily, seed: int = 0) -> torch.nn.Module:
    """A random vision-language model whose every parameter (biases and norm gains included) is non-trivial."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family.model_type, text_config=family.text, vision_config=family.vision,
                                  **family.top)
    model = AutoModelForImageTextToText.from_config(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def load_vl(folder) -> torch.nn.Module:
    return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()


def vl_written_direction(model: torch.nn.Module) -> torch.Tensor:
    """The top right singular vector of the language model's residual stream (families.written_direction)."""
    with torch.no_grad():
        states = model(IDS, output_hidden_states=True).hidden_states
    d = states[0].shape[-1]
    stacked = torch.cat([h.reshape(-1, d) for h in states[1:-1]]).double()
    return torch.linalg.svd(stacked, full_matrices=False).Vh[0].float()


def present_hook_paths(model: torch.nn.Module, family: VLFamily) -> list[str]:
    """The family's hook paths in every layer that has them; each path must exist in some layer."""
    modules = dict(model.named_modules())
    layers = model.config.get_text_config().num_hidden_layers
    out = []
    for h in family.hooks:
        found = [p for p in (h.replace("{L}", str(i)) for i in (range(layers) if "{L}" in h else [0])) if p in modules]
        assert found, f"{h} is in no layer"
        out += found
    return out
