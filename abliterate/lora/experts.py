"""Where transformers 5 holds each MoE family's experts in memory (the family files' `fused_experts`), and which
on-disk tensors fill them.

peft adapts in-memory names, so an adapter for fused experts (one [E, d, in] or [E, in, d] parameter per
projection, whatever the disk layout) must name the fused parameter; merging maps it back to the disk tensors.
Shared by export (disk -> memory) and merge (memory -> disk).
"""

from __future__ import annotations

import re

from abliterate.arch.table import COMPONENTS, arch_for_config
from abliterate.arch.writers import ExpertParam
from abliterate.errors import AbliterateError

__all__ = ["PEFT_RENAMED_LEAVES", "check_peft_accepts", "expert_layout", "expert_param_for_disk", "experts_model_type",
           "looks_like_expert"]


def expert_layout(model_type: str | None) -> tuple[ExpertParam, ...]:
    """The fused expert parameters transformers 5 gives `model_type` in memory, from its family file (an --arch
    file's included); none for a dense model or a model type the table lacks."""
    try:
        return arch_for_config({"model_type": model_type}).experts_for(model_type)
    except AbliterateError:
        return ()


def experts_model_type(ckpt) -> str | None:
    """The model_type whose expert layout applies: a vision-language checkpoint's own when its family lists one
    (GLM-4.5V), else its language model's (Kimi K2.5's DeepSeek-V3); for a text model both are the same."""
    outer = ckpt.config.get("model_type")
    if expert_layout(outer):
        return outer
    return ckpt.text_config.get("model_type") or outer


def check_peft_accepts(model_type: str | None, name: str, module: str, component: str) -> None:
    """Refuse an edit of `name` whose in-memory `module` peft will not adapt in this model type (the family file's
    `peft_refuses`), naming the components an adapter can carry."""
    try:
        refused = arch_for_config({"model_type": model_type}).peft_refuses
    except AbliterateError:
        return
    if module.rsplit(".", 1)[-1] in refused:
        rest = ",".join(c for c in COMPONENTS if c != component)
        raise AbliterateError(
            f"peft refuses a LoRA on {module.rsplit('.', 1)[-1]} modules of {model_type} models (Mamba mixers), so the "
            f"edit of {name} cannot go into an adapter: write the weights (drop --adapter), or pass --components "
            f"{rest} (recipe key apply.components; leaving {component} unedited)")


# On loading an adapter into an MoE model, peft 0.21 rewrites target_modules ending in these v4 expert names into
# target_parameters (all layers, by leaf name); a Linear writer named so is therefore adapted as a parameter.
PEFT_RENAMED_LEAVES = frozenset({"gate", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"})


def expert_param_for_disk(model_type: str | None, name: str) -> tuple[ExpertParam, str, int | None, int] | None:
    """(layout entry, in-memory parameter name, expert index or None when fused on disk, concatenated part)."""
    for param in expert_layout(model_type):
        for part in range(len(param.disk)):
            m = param.disk_regex(part).fullmatch(name)
            if m:
                expert = m.groupdict().get("e")
                return param, param.memory.format(p=m["p"]), None if expert is None else int(expert), part
    return None


def looks_like_expert(name: str) -> bool:
    return bool(re.search(r"\.experts\.(\d+\.)?", name))
