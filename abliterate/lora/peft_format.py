"""The peft LoRA adapter format as abliterate writes it: file names, key names, the factors and the config.

Kept apart from the export's arithmetic so that merge (which reads any peft adapter) and export agree on the
names from one place.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from abliterate.io.checkpoint import Checkpoint
from abliterate.io.safetensors_format import encode_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DORA_MAGNITUDE = "lora_magnitude_vector"  # a DoRA module's magnitude, as peft saves it
NUMPY_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64"}


@dataclass
class Factors:
    """The LoRA factors of one peft module or parameter, filled in as target tensors are read."""

    kind: str  # "linear", "conv1d", "embedding" (target_modules) or "param" (target_parameters)
    target: str  # module path, or parameter path for "param"
    a: np.ndarray  # [rank, in]
    b: np.ndarray  # [out, rank]
    filled: np.ndarray  # which experts' rows were computed (experts may be spread over several tensors)
    order: int = 0  # registration order among the targeted parameters of one module (nesting of ParamWrappers)


Bias = tuple[str, tuple[int, ...], bytes]  # a bias peft carries for an adapted layer: dtype, shape, stored bytes


def peft_keys(export_factors: dict[str, Factors]) -> Iterator[tuple[str, np.ndarray]]:
    """(key in adapter_model.safetensors, values) for every factor, named as peft saves them."""
    params_by_module: dict[str, list[Factors]] = {}
    for f in export_factors.values():
        if f.kind == "param":
            params_by_module.setdefault(f.target.rsplit(".", 1)[0], []).append(f)
    for f in export_factors.values():
        if f.kind == "embedding":
            yield f"{PEFT_PREFIX}{f.target}.lora_embedding_A", f.a
            yield f"{PEFT_PREFIX}{f.target}.lora_embedding_B", f.b
            continue
        module = f.target
        if f.kind == "param":
            module = f.target.rsplit(".", 1)[0]
            # peft wraps a module's targeted parameters in registration order, the first one innermost
            depth = sum(1 for g in params_by_module[module] if g.order > f.order)
            module += ".base_layer" * depth
        yield f"{PEFT_PREFIX}{module}.lora_A.weight", f.a
        yield f"{PEFT_PREFIX}{module}.lora_B.weight", f.b


def write_weights(factors: dict[str, Factors], biases: dict[str, Bias], path: Path,
                  magnitudes: dict[str, np.ndarray] | None = None) -> int:
    """adapter_model.safetensors: factors in float32 (float64 for float64 models), biases in their stored dtype,
    DoRA magnitudes (norm-preserving adapters, by module) in the factors' dtype."""
    tensors: dict[str, Bias] = {}
    for key, values in peft_keys(factors):
        tensors[key] = (NUMPY_DTYPES[values.dtype], values.shape, np.ascontiguousarray(values).tobytes())
    for module, norms in (magnitudes or {}).items():
        values = norms.astype(factors[module].a.dtype)
        key = f"{PEFT_PREFIX}{module}.{DORA_MAGNITUDE}"
        tensors[key] = (NUMPY_DTYPES[values.dtype], values.shape, values.tobytes())
    for module, entry in biases.items():
        tensors[f"{PEFT_PREFIX}{module}.base_layer.bias"] = entry
    names = sorted(tensors)
    header = encode_header([(n, tensors[n][0], tensors[n][1], len(tensors[n][2])) for n in names], {"format": "pt"})
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        for n in names:
            f.write(tensors[n][2])
    return path.stat().st_size


def adapter_config(ckpt: Checkpoint, factors: dict[str, Factors], biases: dict[str, Bias],
                   base_model: str | None, rank: int = 1, dora: bool = False) -> dict:
    """A plain peft LoraConfig: r = lora_alpha = the number of directions (scaling 1), no dropout, the targets by
    full in-memory name; `dora` for a norm-preserving adapter (DoRA on every target)."""
    modules = sorted(f.target for f in factors.values() if f.kind != "param")
    params = sorted(f.target for f in factors.values() if f.kind == "param")
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or base_model_name(ckpt),
        "revision": None,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": dora,
        "lora_bias": False,
        "bias": "lora_only" if biases else "none",
        "fan_in_fan_out": any(f.kind == "conv1d" for f in factors.values()),
        "target_modules": modules or None,
        "target_parameters": params or None,
        "exclude_modules": None,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
        "ensure_weight_tying": False,
    }


def base_model_name(ckpt: Checkpoint) -> str:
    """The Hub id when the folder is a Hub cache snapshot (models--org--name/snapshots/rev), else its path."""
    parts = ckpt.root.absolute().parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part.removeprefix("models--").replace("--", "/")
    name = ckpt.config.get("_name_or_path")
    if isinstance(name, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists():
        return name
    return str(ckpt.root.absolute())
