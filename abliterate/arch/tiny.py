"""A tiny random instance of a checkpoint's own architecture, built from its config.json: few layers (enough to hold
every kind of layer its pattern lists), a small width and vocabulary. Discovery (discover.py) finds the residual
writers on it; nothing is downloaded and no weight of the checkpoint is read.
"""

from __future__ import annotations

import copy
from typing import Any

from abliterate.errors import AbliterateError

WIDTH = 64
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# config keys -> the tiny value (set only where the config has the key with an int value)
SIZES = {
    "hidden_size": WIDTH, "n_embd": WIDTH, "d_model": WIDTH,
    "intermediate_size": 96, "ffn_hidden_size": 96, "n_inner": 96, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 48, "shared_intermediate_size": 48, "moe_shared_expert_intermediate_size": 48,
    "num_attention_heads": 4, "n_head": 4, "head_dim": 8, "attention_head_dim": 8,
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "kv_lora_rank": 16, "q_lora_rank": 16,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_topk": 2,
    "n_group": 1, "topk_group": 1, "vocab_size": 128,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    "mamba_n_heads": 4, "mamba_num_heads": 4, "n_mamba_heads": 4, "mamba_d_head": 32, "mamba_head_dim": 32,
    "mamba_headdim": 32, "mamba_d_state": 8, "ssm_state_size": 8, "mamba_d_ssm": 128, "mamba_chunk_size": 16,
    "chunk_size": 16, "mamba_dt_rank": 8, "attention_hidden_size": 2 * WIDTH, "kv_channels": 8,
    "num_query_groups": 4, "adapter_rank": 4, "n_groups": 1, "mamba_n_groups": 1, "mamba_ngroups": 1,
}
MAX_LAYERS = 8
MAX_PARAMETERS = 20_000_000


def shrunk_config(config: dict) -> dict:
    """The config with its text model (and any nested model config) made tiny."""
    out = copy.deepcopy(config)
    for sub in _configs(out):
        _shrink(sub)
    return out


def _configs(config: dict) -> list[dict]:
    """The config and every nested config dict in it (text_config, vision_config, ...)."""
    return [config] + [c for v in config.values() if isinstance(v, dict) and "model_type" in v for c in _configs(v)]


def _shrink(config: dict) -> None:
    layers_key = next((k for k in LAYER_KEYS if isinstance(config.get(k), int)), None)
    if layers_key is not None:
        total = config[layers_key]
        n = _layers_needed(config, total)
        config[layers_key] = n
        for key, value in list(config.items()):  # per-layer patterns follow the layer count
            if isinstance(value, (list, str)) and len(value) == total and total > 1 and key != "model_type":
                config[key] = value[:n]
        if isinstance(config.get("first_k_dense_replace"), int):
            config["first_k_dense_replace"] = min(config["first_k_dense_replace"], 1)
    heads = config.get("num_attention_heads")
    for key, value in SIZES.items():
        if isinstance(config.get(key), int) and not isinstance(config.get(key), bool):
            config[key] = value
    kv = config.get("num_key_value_heads")
    if isinstance(kv, int) and isinstance(heads, int):
        config["num_key_value_heads"] = 4 if kv >= heads else 2
    vocab = config.get("vocab_size")
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(vocab, int) and isinstance(config.get(key), int) and config[key] >= vocab:
            config[key] = None if key != "pad_token_id" else 0


def _layers_needed(config: dict, total: int) -> int:
    """Enough layers for every distinct entry of the per-layer patterns (at least 2, at most MAX_LAYERS)."""
    n = min(2, total)
    for value in config.values():
        if isinstance(value, (list, str)) and len(value) == total and total > 1:
            seen: set = set()
            for i, kind in enumerate(value):
                if kind not in seen and isinstance(kind, str):
                    seen.add(kind)
                    n = max(n, i + 1)
    return min(n, total, MAX_LAYERS)


def model_class(config: Any):
    """The auto class transformers loads this config's checkpoint with: the causal LM's, or for a vision-language
    model whose type has none, or that was saved as one (Llama 4 has a text class too), the image-text-to-text one
    (its ForConditionalGeneration)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if type(config) not in AutoModelForImageTextToText._model_mapping:
        return AutoModelForCausalLM
    saved_as = set(getattr(config, "architectures", None) or [])
    if type(config) not in AutoModelForCausalLM._model_mapping or saved_as & set(
            MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values()):
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def tiny_model(config: dict):
    """A float64 random model of the config's architecture, shrunk; every parameter perturbed (biases and norm gains
    non-trivial). An AbliterateError when transformers cannot build it."""
    import torch
    from transformers import AutoConfig

    model_type = config.get("model_type")
    small = shrunk_config(config)
    try:
        cfg = AutoConfig.for_model(model_type, **{k: v for k, v in small.items() if k != "model_type"})
        cfg._experts_implementation = "eager"  # float64 (the grouped kernels take 16/32-bit floats only)
        torch.manual_seed(0)
        model = model_class(cfg).from_config(cfg)
    except Exception as e:  # a config the shrinking broke, or a class transformers cannot build from a config
        raise AbliterateError(f"cannot build a tiny {model_type} from its config to find its residual writers "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    count = sum(p.numel() for p in model.parameters())
    if count > MAX_PARAMETERS:
        raise AbliterateError(f"a tiny {model_type} built from its config still has {count:,} parameters (its config "
                              "keeps sizes discovery does not know how to shrink)")
    model = model.double().eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model
