"""What the architecture table holds per family: residual writers on disk, hook modules in memory.

Every tensor that adds something to the residual stream (token and position embeddings, the
attention output projection, the MLP output projection, each MoE expert's and shared expert's
output projection, and their biases) is a `Writer`: a full-match regex on its on-disk name, its
component, and the axis that holds the hidden dimension d:

* ``hidden_axis=-2``: ``nn.Linear`` layout ``[..., d, in]`` (a row per residual coordinate),
  also fused experts stored ``[experts, d, in]``.
* ``hidden_axis=-1``: ``[..., d]``: embeddings ``[vocab, d]``, GPT-2 ``Conv1D`` ``[in, d]``,
  fused experts stored ``[experts, in, d]``, and every bias.

The families themselves are data (abliterate/arch/families/*.yaml, read by family_file.py).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

COMPONENTS = ("embed", "attn", "mlp")


@dataclass(frozen=True)
class Writer:
    """A family of tensors writing into the residual stream, matched by a full regex on its name."""

    pattern: str
    component: str  # one of COMPONENTS
    hidden_axis: int | None  # -2 or -1, see the module docstring; None: read it from the shape
    # a config key that, when set (not null), means these tensors write elsewhere (Nemotron-H's experts into a latent
    # space when moe_latent_size is set): the writer does not apply to that checkpoint
    skip_when: str | None = None

    def match(self, name: str) -> re.Match[str] | None:
        return re.fullmatch(self.pattern, name)

    def applies(self, config: dict) -> bool:
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
        return self.skip_when is None or (text.get(self.skip_when) is None and config.get(self.skip_when) is None)


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


# Activations f with f(a z) = a^p f(z) for every a > 0 (positively homogeneous of degree p), by transformers'
# ACT2FN name: scaling a hidden unit's pre-activation by a^(1/p) scales what it passes on by a.
POSITIVELY_HOMOGENEOUS = {"relu": 1, "leaky_relu": 1, "relu2": 2}


@dataclass(frozen=True)
class InputScaler:
    """A module whose output rows carry a writer's input features, for the norm-preserving adapter: scaling the
    writer's input feature j by D_j is scaling row j of `module` (and its bias) by D_j, exactly when `via` holds.

    `writer` and `module` are on-disk module prefixes with "{layer}"; `part` = (i, n): only the i-th of n equal
    blocks of the module's output rows (gate and up fused as gate_up_proj: (1, 2)). `via`:

    * ``gate``: the rows multiply the gate's activation elementwise (down(act(gate x) * up x)): exact for any
      activation; `gate` names the gate module, whose absence means the rule does not apply (an ungated MLP);
    * ``activation``: the rows pass through the activation the config key `activation` names (fc2(act(fc1 x))):
      exact only for a positively homogeneous one (POSITIVELY_HOMOGENEOUS), scaled by D^(1/p);
    * ``values``: the rows are the attention values each head mixes into the writer's input: exact only when every
      head has its own values (num_key_value_heads == num_attention_heads) and the config keys in `unset` (a
      clamp of the values, ...) are null.
    """

    writer: str
    module: str
    via: str  # "gate", "activation", "values"
    gate: str | None = None
    part: tuple[int, int] = (0, 1)
    activation: str = "hidden_act"
    unset: tuple[str, ...] = ()

    def resolve(self, writer_module: str) -> tuple[str, str | None] | None:
        """(scaler module, gate module or None) of the layer of an on-disk writer module name; None: this rule is
        for other writers."""
        m = _template_regex(self.writer.replace("{layer}", "{e}")).fullmatch(writer_module)
        if m is None:
            return None
        layer = m.group("e") if "{layer}" in self.writer else ""
        return self.module.replace("{layer}", layer), None if self.gate is None else self.gate.replace("{layer}", layer)


@dataclass(frozen=True)
class Arch:
    """How one model family lays out its residual writers on disk and in memory."""

    name: str
    model_types: tuple[str, ...]
    writers: tuple[Writer, ...]
    hook_modules: dict[str, tuple[str, ...]]  # component -> module paths, "{layer}" filled in
    decoder_layers: str = "model.layers"  # the ModuleList of decoder blocks (activations, steering)
    output_embedding: str = "lm_head.weight"  # written when tied embeddings are untied
    # Families that normalise a block's output before adding it to the residual (Gemma 2/3, OLMo 2/3, GLM-4,
    # EXAONE 4): the edit removes r from the block output *before* that norm, not from the residual stream.
    normalised_block_outputs: bool = False
    # The config key of a scalar multiplying every block output before the residual add (Granite; "key[i]": element
    # i of a list, Falcon-H1's MLP multiplier): an edit is unaffected (the product is linear), but a bias written
    # to steer on the MLP output must be divided by it.
    residual_multiplier: str | None = None
    # Hybrid stacks whose layers may lack a component (Nemotron-H: one mixer per layer, Mamba, attention, MLP or MoE):
    # each layer needs a writer of some component rather than one of each (hooks go where a layer has its modules
    # in every family).
    hybrid: bool = False
    notes: str = ""
    # Where transformers 5 holds MoE experts in memory (fused parameters, for adapters: peft targets in-memory
    # names), for the model types in `fused_expert_types` (a family file may cover dense types too).
    fused_experts: tuple[ExpertParam, ...] = ()
    fused_expert_types: tuple[str, ...] = ()
    # (in-memory, on-disk) substrings of module names transformers renames on loading (Mixtral's .mlp.), applied
    # in order, each to the result of the ones before (list the longer of two overlapping parts first)
    module_renames: tuple[tuple[str, str], ...] = ()
    # Module leaf names peft refuses to adapt in these model types (peft 0.22: a Mamba mixer's out_proj in falcon_h1
    # and nemotron_h, which its fused training kernel reads directly): an adapter editing one is refused
    peft_refuses: tuple[str, ...] = ()
    # For norm-preserving adapters: which module's output rows carry each writer's input features (first match)
    input_scalers: tuple[InputScaler, ...] = ()
    # Vision-language checkpoints: (in-memory prefix, its on-disk prefixes) of the language model (and lm_head), as
    # transformers' conversion mapping renames them on loading; writers are written in memory form and match every form
    checkpoint_prefixes: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def memory_name(self, disk_name: str) -> str:
        """The in-memory name transformers loads an on-disk tensor or module into (the longest disk prefix first)."""
        pairs = [(memory, disk) for memory, disks in self.checkpoint_prefixes for disk in (memory, *disks)]
        for memory, disk in sorted(pairs, key=lambda p: -len(p[1])):
            if disk_name.startswith(disk):
                return memory + disk_name[len(disk):]
        return disk_name

    def disk_names(self, memory_name: str) -> list[str]:
        """Every on-disk form of an in-memory tensor or module name (itself first)."""
        names = [memory_name]
        for memory, disks in self.checkpoint_prefixes:
            if memory_name.startswith(memory):
                names += [disk + memory_name[len(memory):] for disk in disks]
        return list(dict.fromkeys(names))

    def renamed_on_disk(self, memory_name: str) -> str:
        """An in-memory module or parameter name with every `module_renames` part applied in order (EXAONE 3)."""
        for memory, disk in self.module_renames:
            memory_name = memory_name.replace(memory, disk)
        return memory_name

    def renamed_in_memory(self, disk_name: str) -> str:
        """An on-disk module or tensor name with every `module_renames` part undone, in order."""
        for memory, disk in self.module_renames:  # a module name ends where a part's trailing dot would be
            disk_name = (disk_name + ".").replace(disk, memory)[:-1]
        return disk_name

    def experts_for(self, model_type: str | None) -> tuple[ExpertParam, ...]:
        """The fused expert parameters of `model_type` (none for a dense model type of the family)."""
        return self.fused_experts if model_type in self.fused_expert_types else ()
