"""A steering vector as an exact peft LoRA adapter: the vector is the bias of the LoRA B layer (peft's `lora_bias`).

peft computes W x + b_base + scaling * B(A x) for a targeted Linear; with A and B's weight zero,
r = alpha = 1 and B's bias set to coeff * vector, the module's output gains exactly that constant.
Targeting layer L's MLP output projection puts it in the residual stream after layer L, as `steer
chat --layer L` (and `steer bake`) add it. This works where baking cannot: families whose MLP output
projection has no bias and no switch to add one (Qwen2/3, Mistral, Phi-3). It acts on every
position, the prompt's included, like a baked bias. The same families are refused as by `steer
bake` (normalised block outputs, mixture-of-experts MLPs); Granite's residual multiplier is divided out as
there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from abliterate.io.checkpoint import Checkpoint
from abliterate.io.safetensors_format import atomic_folder, encode_header
from abliterate.steer.bake import output_projection, residual_scale

PEFT_PREFIX = "base_model.model."


def steering_adapter_config(base_model: str, module: str) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "r": 1, "lora_alpha": 1, "lora_dropout": 0.0, "use_rslora": False, "use_dora": False, "lora_bias": True,
        "bias": "none", "fan_in_fan_out": False, "target_modules": [module], "exclude_modules": None,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "init_lora_weights": True, "inference_mode": True,
    }


def write_steering_adapter(checkpoint: str | Path, vectors_path: str | Path, layer: int, coeff: float,
                           out: str | Path, *, cls: str | None = None, overwrite: bool = False) -> str:
    """Write the adapter folder; returns the targeted module's name."""
    from abliterate.steer.steering import check_coeff, check_layer, load_vectors

    check_coeff(coeff)
    ckpt = Checkpoint.open(checkpoint)
    vectors = load_vectors(vectors_path, hidden_size=ckpt.hidden_size, num_layers=ckpt.num_layers, cls=cls)
    check_layer(layer, ckpt.num_layers)
    weight, _ = output_projection(ckpt, layer)
    module = weight.removesuffix(".weight")
    n_in = ckpt.tensors[weight][1].shape[-1]
    # Granite-style families scale block outputs before the residual add: the bias is divided by that scale
    bias = (np.float64(coeff) * vectors[layer + 1].astype(np.float64) / residual_scale(ckpt)).astype(np.float32)
    tensors = {f"{PEFT_PREFIX}{module}.lora_A.weight": np.zeros((1, n_in), np.float32),
               f"{PEFT_PREFIX}{module}.lora_B.weight": np.zeros((ckpt.hidden_size, 1), np.float32),
               f"{PEFT_PREFIX}{module}.lora_B.bias": bias}
    names = sorted(tensors)
    header = encode_header([(n, "F32", tensors[n].shape, tensors[n].nbytes) for n in names], {"format": "pt"})
    with atomic_folder(Path(out), overwrite=overwrite) as tmp:
        with open(tmp / "adapter_model.safetensors", "wb") as f:
            f.write(len(header).to_bytes(8, "little") + header)
            for n in names:
                f.write(tensors[n].tobytes())
        config = steering_adapter_config(str(ckpt.root.absolute()), module)
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "abliterate-steer.json").write_text(json.dumps({"steering": {
            "layer": layer, "coeff": coeff, "module": module, "vectors": str(vectors_path), "class": cls,
            "residual": f"after decoder layer {layer} (steering-vector row {layer + 1})",
            "positions": "every position, prompt included"}}, indent=2) + "\n")
    return module
