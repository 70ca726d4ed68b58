"""Bake a steering vector into a checkpoint: a bias on one layer's MLP output projection.

The bias adds coeff * vector to what decoder layer L's MLP writes, i.e. to the residual stream after
layer L (steering-vector row L + 1): the same place `abliterate.steer.steering` adds it, so the baked
checkpoint computes what the hook computes, without hooks. Unlike the hook used for generation, a
bias acts on every position, the prompt's included.

Families whose MLP output projection already has a bias (GPT-2, GPT-NeoX, Phi, StarCoder2...) get
it changed in place. Families that only have a global switch (Llama's ``mlp_bias``, also Granite,
SmolLM3, Helium, Seed-OSS, Arcee in transformers 5.24) need the flag set in config.json, which gives
*every* MLP projection of every layer a bias: those are added as zeros (their output is unchanged),
and the chosen layer's output-projection bias holds the vector. Every other tensor is copied byte
for byte; shards keep their names and tensor order, new biases are appended to the shard holding
their weight.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from abliterate.arch.table import arch_for_config
from abliterate.edit.plan import EditPlan, TensorEdit
from abliterate.edit.shard_writer import (
    Target,
    copy_other_files,
    output_size,
    write_config,
    write_index,
    write_shards,
)
from abliterate.edit.weights import DEFAULT_MAX_MEMORY
from abliterate.errors import AbliterateError
from abliterate.io.checkpoint import Checkpoint
from abliterate.io.safetensors_format import DTYPE_SIZES, TensorInfo, atomic_folder, pread_into

TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
BIAS_FLAG = "mlp_bias"
NOTE_FILE = "abliterate-steer.json"


@dataclass(frozen=True)
class BakeResult:
    out: Path
    bias: str  # the tensor holding the vector
    added: tuple[str, ...]  # zero biases added because the config flag is global
    config_flag: str | None
    skipped_files: tuple[str, ...]


def output_projection(ckpt: Checkpoint, layer: int) -> tuple[str, str]:
    """(weight name, bias name) of the dense MLP output projection of `layer`, or a clear refusal."""
    arch = arch_for_config(ckpt.config)
    if arch.normalised_block_outputs:
        raise AbliterateError(f"{ckpt.config.get('model_type')} normalises the MLP output before the residual add, so "
                              "a bias there is not a constant addition; steer with hooks (`abliterate steer chat`)")
    weights = []
    for writer in arch.writers:
        if writer.component != "mlp" or not writer.pattern.endswith(r"\.weight") or not writer.applies(ckpt.config):
            continue
        for name in ckpt.tensors:
            m = writer.match(name)
            if m and "layer" in m.groupdict() and int(m["layer"]) == layer:
                weights.append(name)
    if not weights:
        raise AbliterateError(f"layer {layer} of this {ckpt.config.get('model_type')} model has no MLP writing into "
                              "the residual stream; baking supports dense MLPs only; steer with hooks instead")
    if len(weights) != 1:
        found = ", ".join(weights)
        raise AbliterateError(f"layer {layer} has {len(weights)} MLP output projections ({found}); "
                              "baking supports dense MLPs only (not mixture-of-experts); steer with hooks instead")
    return weights[0], weights[0][: -len("weight")] + "bias"


def residual_scale(ckpt: Checkpoint) -> float:
    """The multiplier the family applies to block outputs before the residual add (1.0 for most)."""
    key = arch_for_config(ckpt.config).residual_multiplier
    if key is None:
        return 1.0
    name, _, index = key.partition("[")  # "mlp_multipliers[1]": Falcon-H1's MLP output multiplier
    value = ckpt.config.get(name, 1.0)  # transformers' default for the families that have one
    if index:
        i = int(index.rstrip("]"))
        value = value[i] if isinstance(value, list) and len(value) > i else value
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value == 0:
        raise AbliterateError(f"config.json's {key} is {value!r}; baking divides the vector by it, so it must be a "
                              "finite non-zero number")
    return float(value)


def _biased_skeleton(ckpt: Checkpoint) -> tuple[str, dict[str, tuple[int, ...]]]:
    """The config flag that gives MLPs biases, and every bias tensor (name -> shape) it makes the model expect."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ckpt.root)
    if not hasattr(config, BIAS_FLAG):
        raise AbliterateError(f"{config.model_type} has no bias on its MLP output projection and no `{BIAS_FLAG}` "
                              "switch to add one; steer with hooks (`abliterate steer chat`) instead")
    setattr(config, BIAS_FLAG, True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    on_disk = arch_for_config(ckpt.config).renamed_on_disk  # the names transformers renames on loading (EXAONE 3)
    return BIAS_FLAG, {on_disk(k): tuple(v.shape) for k, v in model.state_dict().items()
                       if k.endswith(".bias") and on_disk(k) not in ckpt.tensors}


def _bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().view(torch.uint8).numpy().tobytes())


def bake(checkpoint: str | Path, vectors_path: str | Path, layer: int, coeff: float, out: str | Path, *,
         overwrite: bool = False, quiet: bool = False, cls: str | None = None) -> BakeResult:
    """Write CHECKPOINT with coeff * (the steering vector after `layer`, row layer + 1 of the vectors
    file) added by a bias of that layer's MLP output projection."""
    from abliterate.steer.steering import check_coeff, check_layer, load_vectors

    check_coeff(coeff)
    ckpt = Checkpoint.open(checkpoint)
    vectors = load_vectors(vectors_path, hidden_size=ckpt.hidden_size, num_layers=ckpt.num_layers, cls=cls)
    check_layer(layer, ckpt.num_layers)
    vector = vectors[layer + 1]
    weight, bias = output_projection(ckpt, layer)
    weight_info = ckpt.tensors[weight][1]
    dtype = ckpt.tensors[bias][1].dtype if bias in ckpt.tensors else weight_info.dtype
    if dtype not in TORCH_DTYPES:
        raise AbliterateError(f"{weight} is stored as {dtype}; baking needs a floating-point checkpoint")
    flag, new_shapes = (None, {}) if bias in ckpt.tensors else _biased_skeleton(ckpt)
    if flag is not None and bias not in new_shapes:
        raise AbliterateError(f"setting {flag} does not give {bias} to the model; this family cannot be baked")
    # Granite-style families scale each block output by a config multiplier before the residual add: divide it
    # out so that the bias adds coeff * vector to the residual stream, exactly what the hook adds.
    delta = (torch.as_tensor(vector, dtype=torch.float64) * coeff / residual_scale(ckpt)).float()
    plan, kinds = _bake_plan(ckpt, flag, new_shapes, bias, layer, dtype)
    zeros = tuple(name for name, kind in kinds.items() if kind == "zeros")
    with atomic_folder(Path(out), overwrite=overwrite) as tmp, tqdm(
        total=output_size(ckpt, plan), unit="B", unit_scale=True, desc="bake", disable=quiet, file=sys.stderr
    ) as bar:
        write_shards(ckpt, plan, tmp, lambda target: _write_bias(target, kinds, delta),
                     max_memory=DEFAULT_MAX_MEMORY, progress=bar.update)
        write_index(ckpt, plan, tmp)
        write_config(ckpt, plan, tmp)
        skipped = copy_other_files(ckpt, tmp)
        (tmp / NOTE_FILE).write_text(json.dumps({
            "steering": {"layer": layer, "coeff": coeff, "bias": bias, "vectors": str(vectors_path),
                         "residual": f"after decoder layer {layer} (steering-vector row {layer + 1})",
                         "positions": "every position, prompt included", "zero_biases_added": len(zeros),
                         "config_flag": flag},
        }, indent=2) + "\n")
    return BakeResult(Path(out), bias, zeros, flag, skipped)


def _bake_plan(ckpt: Checkpoint, flag: str | None, new_shapes: dict[str, tuple[int, ...]], bias: str, layer: int,
               dtype: str) -> tuple[EditPlan, dict[str, str]]:
    """The shard writer's plan: the existing bias edited in place, or the flag set and every bias it makes the model
    expect appended to the shard of its weight; and what each bias holds ("zeros", "vector", or "added": the
    stored values plus the vector)."""
    kinds: dict[str, str] = {}
    added = []
    for name, shape in new_shapes.items():
        owner = name[: -len("bias")] + "weight"
        if owner not in ckpt.tensors:
            raise AbliterateError(f"{flag} adds {name} but the checkpoint has no {owner}; this family cannot be baked")
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        added.append(TensorEdit(name, ckpt.tensors[owner][0], TensorInfo(name, dtype, tuple(shape), 0, nbytes), "mlp",
                                None, 0, 1.0))
        kinds[name] = "vector" if name == bias else "zeros"
    edits = {}
    if bias in ckpt.tensors:
        shard, info = ckpt.tensors[bias]
        edits[bias] = TensorEdit(bias, shard, info, "mlp", layer, 0, 1.0)
        kinds[bias] = "added"
    return EditPlan(None, edits, None, {flag: True} if flag else {}, (), added=tuple(added)), kinds


def _write_bias(target: Target, kinds: dict[str, str], delta: torch.Tensor) -> None:
    """One bias, whole (biases are small): zeros, the vector, or the stored values plus the vector."""
    e = target.edit
    dtype = TORCH_DTYPES[e.info.dtype]
    if kinds[e.name] == "zeros":
        value = torch.zeros(e.info.shape, dtype=dtype)
    elif kinds[e.name] == "vector":
        value = delta.to(dtype)
    else:
        buf = bytearray(e.info.nbytes)
        pread_into(target.src_fd, memoryview(buf), e.info.start)
        value = (torch.frombuffer(buf, dtype=dtype).float() + delta).to(dtype)
    target.write(_bytes(value), 0, target.buffers.take())
