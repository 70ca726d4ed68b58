"""Reading one family file: YAML describing how a model family writes into the residual stream, checked
against a schema so that a mistake is one clear line, never a wrong edit.

A family file (see abliterate/arch/families/*.yaml for the shipped ones)::

    name: llama-like                      # shown in messages
    model_types: [llama, mistral]         # config.json model_type values it covers
    decoder_layers: model.layers          # optional: the ModuleList of decoder blocks
    output_embedding: lm_head.weight      # optional: written when tied embeddings are untied
    normalised_block_outputs: false       # optional: blocks normalise their outputs before the residual add
    residual_multiplier: null             # optional: config key of a scalar multiplying block outputs (the MLP's,
                                          # which a baked bias passes through); key[i]: element i of a list
    hybrid: false                         # optional: a layer may lack a component (one mixer per layer):
                                          # every layer has some writer, not one of each component
    notes: ""                             # optional
    writers:                              # the on-disk tensors that write into the residual stream
      - {tensor: model.embed_tokens.weight, kind: embedding}
      - {tensor: "model.layers.{layer}.self_attn.o_proj", kind: linear, component: attn}
      - {tensor: "model.layers.{layer}.mlp.experts.{n}.down_proj", kind: linear, component: mlp,
         skip_when: moe_latent_size}      # optional: not a writer when this config key is set (not null)
    hooks:                                # the in-memory modules producing those outputs, per component
      embed: [model.embed_tokens]
      attn: ["model.layers.{layer}.self_attn.o_proj"]
      mlp: ["model.layers.{layer}.mlp"]
    fused_experts:                        # optional, MoE: where transformers 5 holds the experts in memory
      model_types: [mixtral]              # optional: the file's model types whose experts are fused (default: all)
      params:                             # in registration order; "{p}": the layer's prefix, "{e}": expert index
        - {memory: "{p}.mlp.experts.gate_up_proj", disk: ["{p}.mlp.experts.{e}.w1.weight",
                                                          "{p}.mlp.experts.{e}.w3.weight"]}
        - {memory: "{p}.mlp.experts.down_proj", disk: "{p}.mlp.experts.{e}.w2.weight", transposed: false}
    module_renames:                       # optional: module-name parts transformers renames on loading
      - {memory: ".mlp.", disk: ".block_sparse_moe."}
    checkpoint_prefixes:                  # optional, vision-language: the language model's in-memory prefix and
      - {memory: model.language_model.,   # every on-disk prefix transformers loads into it (its conversion mapping);
         disk: [language_model.model.]}   # writers are then written in memory form and match each form
    peft_refuses: [out_proj]              # optional: module leaf names peft will not adapt in these model types
    input_scalers:                        # optional: norm-preserving adapters (see writers.InputScaler)
      - {writer: "model.layers.{layer}.mlp.down_proj", module: "model.layers.{layer}.mlp.up_proj", via: gate,
         gate: "model.layers.{layer}.mlp.gate_proj"}
      - {writer: "model.layers.{layer}.mlp.down_proj", module: "model.layers.{layer}.mlp.gate_up_proj", via: gate,
         part: [1, 2]}

In `tensor`, `{layer}` stands for the decoder layer index and `{n}` for any index (an expert's); the rest
is literal. Kinds: `linear` (nn.Linear prefix: `.weight` [d, in] and `.bias` [d]), `conv1d` (GPT-2's
Conv1D prefix: `.weight` [in, d] and `.bias` [d]), `embedding` (an exact name, [vocab, d]), and `tensor`
(an exact name with `hidden_axis`: -2 when d is the second-to-last axis, -1 when it is the last, auto when checkpoints
store it either way, as fused experts that transformers transposes on loading when needed).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from abliterate.arch.writers import COMPONENTS, Arch, ExpertParam, InputScaler, Writer
from abliterate.errors import AbliterateError

KINDS = ("linear", "conv1d", "embedding", "tensor")
_KEYS = {"name", "model_types", "decoder_layers", "output_embedding", "normalised_block_outputs",
         "residual_multiplier", "hybrid", "notes", "writers", "hooks", "fused_experts", "module_renames",
         "input_scalers", "checkpoint_prefixes", "peft_refuses"}
_REQUIRED = ("name", "model_types", "writers", "hooks")
_WRITER_KEYS = {"tensor", "kind", "component", "hidden_axis", "skip_when"}
_PLACEHOLDERS = {"layer": r"(?P<layer>\d+)", "n": r"\d+"}


def load_family_file(path: str | Path) -> Arch:
    """The family a YAML file describes, or an AbliterateError naming the file, the entry and the fix."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise AbliterateError(f"cannot read family file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise AbliterateError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_family(data, str(path))


def parse_family(data: Any, source: str) -> Arch:
    if not isinstance(data, dict):
        raise AbliterateError(f"{source}: a family file is a mapping with keys {', '.join(_REQUIRED)}")
    unknown = set(data) - _KEYS
    if unknown:
        raise AbliterateError(f"{source}: unknown key(s) {sorted(unknown)}; valid: {', '.join(sorted(_KEYS))}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise AbliterateError(f"{source}: missing key(s) {missing} (see docs/architecture.md, 'Adding a model family')")
    model_types = data["model_types"]
    if not (isinstance(model_types, list) and model_types and all(_is_name(m) for m in model_types)):
        raise AbliterateError(f"{source}: model_types must be a non-empty list of config.json model_type strings")
    writers = data["writers"]
    if not isinstance(writers, list) or not writers:
        raise AbliterateError(f"{source}: writers must be a non-empty list of {{tensor, kind, component}} entries")
    prefixes = _prefixes(data.get("checkpoint_prefixes"), source)
    return Arch(
        name=_string(data, "name", source),
        model_types=tuple(model_types),
        writers=tuple(dict.fromkeys(w for i, entry in enumerate(writers) for form in _forms(entry, prefixes)
                                    for w in _writers(form, f"{source}: writers[{i}]"))),
        hook_modules=_hooks(data["hooks"], source),
        decoder_layers=_string(data, "decoder_layers", source, "model.layers"),
        output_embedding=_string(data, "output_embedding", source, "lm_head.weight"),
        normalised_block_outputs=_flag(data, "normalised_block_outputs", source),
        residual_multiplier=_multiplier(data, source),
        hybrid=_flag(data, "hybrid", source),
        notes=_string(data, "notes", source, ""),
        **_fused_experts(data.get("fused_experts"), tuple(model_types), source),
        module_renames=_renames(data.get("module_renames"), source),
        input_scalers=_input_scalers(data.get("input_scalers"), source),
        checkpoint_prefixes=prefixes,
        peft_refuses=_names(data.get("peft_refuses", []), "peft_refuses", source),
    )


def _prefixes(entries: Any, source: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if entries is None:
        return ()
    ok = isinstance(entries, list) and all(
        isinstance(e, dict) and set(e) == {"memory", "disk"} and _is_name(e["memory"]) and isinstance(e["disk"], list)
        and e["disk"] and all(_is_name(d) and d.endswith(".") for d in e["disk"]) and e["memory"].endswith(".")
        for e in entries)
    if not ok:
        raise AbliterateError(f"{source}: checkpoint_prefixes is a list of {{memory, disk}}: an in-memory prefix and "
                              "the list of on-disk prefixes loaded into it, each ending with '.'")
    return tuple((e["memory"], tuple(e["disk"])) for e in entries)


def _forms(entry: Any, prefixes: tuple[tuple[str, tuple[str, ...]], ...]) -> list[Any]:
    """A writer in memory form and, under a checkpoint prefix, in each on-disk form."""
    tensor = entry.get("tensor") if isinstance(entry, dict) else None
    forms = [entry]
    for memory, disks in prefixes:
        if isinstance(tensor, str) and tensor.startswith(memory):
            forms += [dict(entry, tensor=disk + tensor[len(memory):]) for disk in disks]
    return forms


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _string(data: dict, key: str, source: str, default: str | None = "") -> Any:
    value = data.get(key, default)
    if value is default:
        return value
    if not _is_name(value):
        raise AbliterateError(f"{source}: {key} must be a non-empty string, not {value!r}")
    return value


def _multiplier(data: dict, source: str) -> str | None:
    value = _string(data, "residual_multiplier", source, None)
    if value is not None and not re.fullmatch(r"[A-Za-z_]\w*(\[\d+\])?", value):
        raise AbliterateError(f"{source}: residual_multiplier {value!r} is a config key, or key[i] for element i "
                              "of a list")
    return value


def _names(value: Any, key: str, source: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(_is_name(v) for v in value):
        raise AbliterateError(f"{source}: {key} must be a list of names")
    return tuple(value)


def _flag(data: dict, key: str, source: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise AbliterateError(f"{source}: {key} must be true or false, not {value!r}")
    return value


def _writers(entry: Any, where: str) -> tuple[Writer, ...]:
    """One entry -> its Writers (a linear or conv1d prefix gives the weight and the bias)."""
    if not isinstance(entry, dict) or not _is_name(entry.get("tensor")):
        raise AbliterateError(f"{where}: each writer is a mapping with a `tensor` name and a `kind`")
    unknown = set(entry) - _WRITER_KEYS
    if unknown:
        raise AbliterateError(f"{where}: unknown key(s) {sorted(unknown)}; valid: {', '.join(sorted(_WRITER_KEYS))}")
    kind, name = entry.get("kind"), entry["tensor"]
    if kind not in KINDS:
        raise AbliterateError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
    component = entry.get("component", "embed" if kind == "embedding" else None)
    if component not in COMPONENTS:
        raise AbliterateError(f"{where}: component {component!r} is not one of {', '.join(COMPONENTS)}")
    pattern = _pattern(name, where)
    if (component == "embed") == ("(?P<layer>" in pattern):
        raise AbliterateError(f"{where}: {name!r}: attn and mlp writers name their layer with {{layer}}, "
                              "embeddings do not")
    axis = entry.get("hidden_axis")
    if (kind == "tensor") != (axis is not None) or axis not in (None, -1, -2, "auto"):
        raise AbliterateError(f"{where}: kind tensor needs hidden_axis -2 ([..., d, in]), -1 ([..., d]) or auto "
                              "(the axis of size d, refused when both are); the other kinds imply it")
    skip = entry.get("skip_when")
    if skip is not None and not _is_name(skip):
        raise AbliterateError(f"{where}: skip_when is the config key whose value, when set, means these tensors do not "
                              "write into the residual stream")
    if kind == "linear":
        return Writer(pattern + r"\.weight", component, -2, skip), Writer(pattern + r"\.bias", component, -1, skip)
    if kind == "conv1d":
        return Writer(pattern + r"\.weight", component, -1, skip), Writer(pattern + r"\.bias", component, -1, skip)
    return (Writer(pattern, component, -1 if kind == "embedding" else None if axis == "auto" else axis, skip),)


def _pattern(name: str, where: str) -> str:
    """'model.layers.{layer}.mlp.experts.{n}.w2' -> a full-match regex; anything else in braces is an error."""
    parts = re.split(r"(\{[^}]*\})", name)
    out = []
    for part in parts:
        if part.startswith("{"):
            key = part[1:-1]
            if key not in _PLACEHOLDERS:
                raise AbliterateError(f"{where}: {part} in {name!r} is not a placeholder; use {{layer}} or {{n}}")
            out.append(_PLACEHOLDERS[key])
        else:
            out.append(re.escape(part))
    if name.count("{layer}") > 1:
        raise AbliterateError(f"{where}: {name!r} names {{layer}} more than once")
    return "".join(out)


def _hooks(hooks: Any, source: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(hooks, dict) or set(hooks) - set(COMPONENTS):
        raise AbliterateError(f"{source}: hooks maps components ({', '.join(COMPONENTS)}) to module path lists")
    out = {}
    for component, paths in hooks.items():
        if not isinstance(paths, list) or not paths or not all(_is_name(p) for p in paths):
            raise AbliterateError(f"{source}: hooks.{component} must be a non-empty list of module paths")
        out[component] = tuple(paths)
    return out


def _fused_experts(section: Any, model_types: tuple[str, ...], source: str) -> dict[str, Any]:
    """fused_experts -> Arch's fused_experts and fused_expert_types (none when the section is absent)."""
    where = f"{source}: fused_experts"
    if section is None:
        return {}
    if not isinstance(section, dict) or set(section) - {"model_types", "params"} or "params" not in section:
        raise AbliterateError(f"{where} is a mapping with `params` (and optionally `model_types`)")
    types = section.get("model_types", list(model_types))
    if not isinstance(types, list) or not types or not set(types) <= set(model_types):
        raise AbliterateError(f"{where}.model_types must be a non-empty list of the file's model_types")
    params = section["params"]
    if not isinstance(params, list) or not params:
        raise AbliterateError(f"{where}.params must be a non-empty list of {{memory, disk, transposed}} entries")
    return {"fused_experts": tuple(_expert_param(p, f"{where}.params[{i}]") for i, p in enumerate(params)),
            "fused_expert_types": tuple(types)}


def _expert_param(entry: Any, where: str) -> ExpertParam:
    if not isinstance(entry, dict) or set(entry) - {"memory", "disk", "transposed"} or not _is_name(
            entry.get("memory")):
        raise AbliterateError(f"{where}: each parameter is a mapping with `memory`, `disk` and optionally `transposed`")
    disk = entry.get("disk")
    disk = [disk] if isinstance(disk, str) else disk
    if not isinstance(disk, list) or not disk or not all(_is_name(d) for d in disk):
        raise AbliterateError(f"{where}: disk is a tensor name or a list of them")
    for name in [entry["memory"], *disk]:
        if "{p}" not in name or re.sub(r"\{[pe]\}", "", name).count("{"):
            raise AbliterateError(f"{where}: {name!r} must start from the layer's prefix {{p}}; the only other "
                                  "placeholder is {e} (the expert index)")
    if "{e}" in entry["memory"] or len({"{e}" in d for d in disk}) != 1:
        raise AbliterateError(f"{where}: {{e}} belongs in every disk name (one tensor per expert) or in none "
                              "(one tensor holding every expert), never in memory")
    transposed = entry.get("transposed", False)
    if not isinstance(transposed, bool):
        raise AbliterateError(f"{where}: transposed must be true or false")
    return ExpertParam(entry["memory"], tuple(disk), transposed)


def _renames(entries: Any, source: str) -> tuple[tuple[str, str], ...]:
    if entries is None:
        return ()
    ok = isinstance(entries, list) and all(
        isinstance(e, dict) and set(e) == {"memory", "disk"} and _is_name(e["memory"]) and _is_name(e["disk"])
        for e in entries)
    if not ok:
        raise AbliterateError(f"{source}: module_renames is a list of {{memory, disk}} name parts")
    return tuple((e["memory"], e["disk"]) for e in entries)


_SCALER_KEYS = {"writer", "module", "via", "gate", "part", "activation", "unset"}


def _input_scalers(entries: Any, source: str) -> tuple[InputScaler, ...]:
    if entries is None:
        return ()
    if not isinstance(entries, list):
        raise AbliterateError(f"{source}: input_scalers is a list of {{writer, module, via}} entries")
    return tuple(_input_scaler(e, f"{source}: input_scalers[{i}]") for i, e in enumerate(entries))


def _input_scaler(entry: Any, where: str) -> InputScaler:
    if not isinstance(entry, dict) or set(entry) - _SCALER_KEYS or not all(
            _is_name(entry.get(k)) for k in ("writer", "module")):
        raise AbliterateError(f"{where}: a mapping with `writer`, `module`, `via` and optionally "
                              "`gate`, `part`, `activation`, `unset`")
    via = entry.get("via")
    if via not in ("gate", "activation", "values"):
        raise AbliterateError(f"{where}: via {via!r} is not one of gate, activation, values")
    names = [entry["writer"], entry["module"], *([entry["gate"]] if entry.get("gate") is not None else [])]
    if any(re.sub(r"\{layer\}", "", n).count("{") for n in names) or len({"{layer}" in n for n in names}) != 1:
        raise AbliterateError(f"{where}: writer, module and gate name the same {{layer}} (or none), no other "
                              "placeholder")
    part = entry.get("part", [0, 1])
    if not (isinstance(part, list) and len(part) == 2 and all(isinstance(v, int) for v in part)
            and 0 <= part[0] < part[1]):
        raise AbliterateError(f"{where}: part is [i, n], the i-th (from 0) of n equal blocks of the module's rows")
    unset = entry.get("unset", [])
    if not isinstance(unset, list) or not all(_is_name(u) for u in unset):
        raise AbliterateError(f"{where}: unset is a list of config keys")
    if entry.get("gate") is not None and not _is_name(entry["gate"]):
        raise AbliterateError(f"{where}: gate must be a module name")
    return InputScaler(entry["writer"], entry["module"], via, entry.get("gate"), (part[0], part[1]),
                       _string(entry, "activation", where, "hidden_act"), tuple(unset))
