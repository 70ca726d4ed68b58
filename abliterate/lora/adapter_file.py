"""Reading a peft LoRA adapter for merging: its settings (refusing what is not W + scaling B A) and its tensors.

Any rank, rank/alpha patterns and rsLoRA are read; other peft types, LoRA variants (DoRA, aLoRA, ...),
modules_to_save and pickle-only adapters are refused with the reason.
"""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from abliterate.edit.projection import STORAGE, compute_dtype, widen
from abliterate.errors import AbliterateError
from abliterate.io.checkpoint import PICKLE_SUFFIXES
from abliterate.io.json_files import read_json_object
from abliterate.io.safetensors_format import ShardHeader, pread_into, read_header
from abliterate.lora.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS

# LoraConfig fields that make the adapter something other than W + scaling B A (peft 0.21's LoRA variants).
VARIANT_FIELDS = ("use_dora", "velora_config", "alora_invocation_tokens", "monteclora_config", "use_bdlora",
                  "arrow_config", "kasa_config", "use_qalora", "layer_replication", "trainable_token_indices")


@dataclass(frozen=True)
class LoraSettings:
    """What merging needs from adapter_config.json."""

    r: int
    alpha: float
    rslora: bool
    fan_in_fan_out: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_parameters: tuple[str, ...]

    def scaling(self, key: str) -> tuple[int, float]:
        """(rank, scaling) of a module or parameter, with peft's pattern matching (first pattern that matches)."""
        r = next((v for k, v in self.rank_pattern.items() if re.match(rf"(.*\.)?({k})$", key)), self.r)
        alpha = next((v for k, v in self.alpha_pattern.items() if re.match(rf"(.*\.)?({k})$", key)), self.alpha)
        return r, alpha / (math.sqrt(r) if self.rslora else r)


class AdapterFile:
    """adapter_model.safetensors, read tensor by tensor (bfloat16 included) into float32 or float64."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header: ShardHeader = read_header(path)
        self.infos = self.header.by_name()
        self.fd = os.open(path, os.O_RDONLY)
        # the factors of a fused parameter serve every expert's tensor: keep the last few
        self.load = functools.lru_cache(maxsize=4)(self._load)

    def close(self) -> None:
        os.close(self.fd)

    def _load(self, key: str) -> np.ndarray:
        info = self.infos[key]
        raw = np.empty(info.nbytes, np.uint8)
        pread_into(self.fd, memoryview(raw), info.start)
        values = widen(raw.view(STORAGE[info.dtype]).reshape(info.shape), info.dtype)
        return values.astype(compute_dtype(info.dtype), copy=False)

def read_lora_config(adapter_dir: Path) -> LoraSettings:
    path = adapter_dir / ADAPTER_CONFIG
    config = read_json_object(path, f"{adapter_dir} has no {ADAPTER_CONFIG}; pass a peft adapter folder")
    if config.get("peft_type") != "LORA":
        raise AbliterateError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA; only LoRA adapters merge "
                              "into weights this way (use peft's merge_and_unload for other methods)")
    variants = [k for k in VARIANT_FIELDS if config.get(k)]
    if config.get("init_lora_weights") == "mica":
        variants.append("init_lora_weights=mica")
    if variants:
        dora = (" (abliterate's norm-preserving adapter is DoRA: `abliterate apply --norm-preserve` writes the same "
                "edit as weights, which `verify` checks)" if "use_dora" in variants else "")
        raise AbliterateError(f"{path}: {', '.join(variants)} set: this LoRA variant is not W + scaling B A, which is "
                              f"all `abliterate merge` computes; merge it with peft (merge_and_unload){dora}")
    if config.get("modules_to_save"):
        raise AbliterateError(f"{path}: modules_to_save {config['modules_to_save']} replaces whole modules; "
                              "`abliterate merge` does not merge those: use peft's merge_and_unload")
    try:
        return LoraSettings(int(config["r"]), float(config.get("lora_alpha", 8)),  # peft's default alpha
                             bool(config.get("use_rslora")), bool(config.get("fan_in_fan_out")),
                             dict(config.get("rank_pattern") or {}), dict(config.get("alpha_pattern") or {}),
                             tuple(config.get("target_parameters") or ()))
    except (KeyError, TypeError, ValueError) as e:
        raise AbliterateError(f"{path}: invalid LoRA settings ({e}); re-save the adapter with peft") from None


def weights_path(adapter_dir: Path) -> Path:
    """The adapter's safetensors weights; a folder holding only pickles is refused (merge and evaluate alike)."""
    path = adapter_dir / ADAPTER_WEIGHTS
    if path.is_file():
        return path
    pickles = sorted(p.name for p in adapter_dir.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise AbliterateError(f"{adapter_dir} holds only pickle weights ({', '.join(pickles)}); abliterate never "
                              "loads pickles: re-save the adapter with safe_serialization (safetensors)")
    raise AbliterateError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}; pass a peft adapter folder")
