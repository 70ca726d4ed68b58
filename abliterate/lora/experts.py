"""Where transformers 5 holds each MoE family's experts in memory, and which on-disk tensors fill them.

peft adapts in-memory names, so an adapter for fused experts (one [E, d, in] or [E, in, d] parameter per
projection, whatever the disk layout) must name the fused parameter; merging maps it back to the disk tensors.
Shared by export (disk -> memory) and merge (memory -> disk).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertParam:
    """One fused expert parameter of a transformers 5 model and where its values are on disk.

    `memory` is the parameter's in-memory name and `disk` the on-disk tensor(s) holding it ("{p}" is the
    layer's module prefix, "{e}" the expert index): several names are concatenated along the output axis per
    expert (gate and up into gate_up_proj); a name without "{e}" is one tensor holding every expert.
    `transposed` marks [E, in, out] storage (the module's `is_transposed`); 2-D parameters are [E, n] biases.
    A family's parameters are listed in registration order, the order in which peft nests its wrappers.
    """

    memory: str
    disk: tuple[str, ...]
    transposed: bool = False

    def disk_regex(self, part: int) -> re.Pattern[str]:
        return _template_regex(self.disk[part])

    def memory_regex(self) -> re.Pattern[str]:
        return _template_regex(self.memory)


@functools.cache
def _template_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template).replace(r"\{p\}", r"(?P<p>.+?)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(pattern)


def _per_expert(prefix: str, gate: str, up: str, down: str) -> tuple[ExpertParam, ...]:
    """Experts stored one tensor per expert and projection on disk, fused into gate_up_proj / down_proj."""
    e = f"{{p}}.{prefix}.experts.{{e}}."
    return (ExpertParam("{p}.mlp.experts.gate_up_proj", (e + gate + ".weight", e + up + ".weight")),
            ExpertParam("{p}.mlp.experts.down_proj", (e + down + ".weight",)))


_GRANITE = (ExpertParam("{p}.block_sparse_moe.experts.gate_up_proj", ("{p}.block_sparse_moe.input_linear.weight",)),
            ExpertParam("{p}.block_sparse_moe.experts.down_proj", ("{p}.block_sparse_moe.output_linear.weight",)))
_GPT_OSS = tuple(ExpertParam(f"{{p}}.mlp.experts.{n}", (f"{{p}}.mlp.experts.{n}",), transposed=not n.endswith("bias"))
                 for n in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"))
_QWEN_MOE = _per_expert("mlp", "gate_proj", "up_proj", "down_proj")
_MIXTRAL = _per_expert("block_sparse_moe", "w1", "w3", "w2")

# transformers 5 fuses the experts of every MoE family in memory (see its conversion_mapping.py).
EXPERT_LAYOUTS: dict[str, tuple[ExpertParam, ...]] = {
    "mixtral": _MIXTRAL, "phimoe": _MIXTRAL,
    "qwen2_moe": _QWEN_MOE, "qwen3_moe": _QWEN_MOE, "olmoe": _QWEN_MOE, "deepseek_v3": _QWEN_MOE,
    "granitemoe": _GRANITE, "granitemoeshared": _GRANITE,
    "gpt_oss": _GPT_OSS,
}
# On loading an adapter into an MoE model, peft 0.21 rewrites target_modules ending in these v4 expert names into
# target_parameters (all layers, by leaf name); a Linear writer named so is therefore adapted as a parameter.
PEFT_RENAMED_LEAVES = frozenset({"gate", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"})


def expert_param_for_disk(model_type: str | None, name: str) -> tuple[ExpertParam, str, int | None, int] | None:
    """(layout entry, in-memory parameter name, expert index or None when fused on disk, concatenated part)."""
    for param in EXPERT_LAYOUTS.get(model_type or "", ()):
        for part in range(len(param.disk)):
            m = param.disk_regex(part).fullmatch(name)
            if m:
                expert = m.groupdict().get("e")
                return param, param.memory.format(p=m["p"]), None if expert is None else int(expert), part
    return None


def looks_like_expert(name: str) -> bool:
    return bool(re.search(r"\.experts\.(\d+\.)?", name))
