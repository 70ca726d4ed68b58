"""Plan an edit: which tensors change, with which direction row and scale. Pure; no tensor data read.

The same plan feeds the weight editor, the adapter exporter and `verify`, so all three agree on
what "the edit" is by construction.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from abliterate.arch.table import arch_for_config
from abliterate.arch.writers import COMPONENTS, Arch, Writer
from abliterate.errors import AbliterateError
from abliterate.io.checkpoint import Checkpoint
from abliterate.io.quantised import QuantTensor, quantised_tensors, scale_names
from abliterate.io.safetensors_format import FLOAT_DTYPES, TensorInfo
from abliterate.options.recipe import ApplySettings
from abliterate.options.values import TO_THE_END, parse_layer_range

TIE_KEY = "tie_word_embeddings"

__all__ = ["EditOptions", "EditPlan", "edit_options", "plan_edit"]


@dataclass(frozen=True)
class EditOptions:
    """What to remove, where, and how strongly.

    scale: 1.0 removes the direction fully, 0.5 halves it, negative values amplify it.
    layers: the decoder layers to edit (None: all); the embedding is governed by `components`.
    layer_scales: optional per-component, per-layer multipliers of `scale` (index 0 for "embed").
    targets: regexes naming the writer tensors, overriding the architecture table.
    keep_tied: edit a shared input/output embedding in place instead of untying it.
    norm_preserve: rescale every vector an edited tensor writes into the residual stream (a column of an
        nn.Linear weight, a row of an embedding) to its original norm after the projection: W' = (I - s r r^T) W D.
    partial: the folder holds only some shards of the model (streaming edits one shard at a time), so
        layers without writers in it are expected, not a sign of a broken checkpoint.
    """

    scale: float = 1.0
    layers: range | None = None
    components: tuple[str, ...] = COMPONENTS
    layer_scales: dict[str, tuple[float, ...]] = field(default_factory=dict)
    targets: tuple[str, ...] = ()
    keep_tied: bool = False
    partial: bool = False
    norm_preserve: bool = False

    def strength(self, component: str, layer: int | None) -> float:
        """The scale the edit applies to one writer: pass this method as `hooks.ablate(strength=...)` so
        the in-memory ablation computes exactly what `apply` writes (one definition for both)."""
        return _scale_for(self, component, layer)


def edit_options(settings: ApplySettings, *, add: bool = False) -> EditOptions:
    """A recipe's apply section (command-line values already laid over it) as the editor's options: the one
    conversion, shared by `apply --recipe`, the whole job and `--stream`. add: amplify (scale -|scale|)."""
    try:
        layers = parse_layer_range(settings.layers or None)
    except AbliterateError as e:
        raise AbliterateError(f"recipe apply.layers: {e}") from None
    return EditOptions(scale=-abs(settings.scale) if add else settings.scale, layers=layers,
                       components=settings.components, targets=settings.targets, keep_tied=settings.keep_tied,
                       layer_scales=settings.layer_scales, norm_preserve=settings.norm_preserve)


@dataclass(frozen=True)
class TensorEdit:
    name: str
    shard: str
    info: TensorInfo
    component: str
    layer: int | None  # None for embeddings
    hidden_axis: int
    scale: float
    # FP8 / MXFP4: the stored values and scales; `info` then describes the dequantised float32 values (stored
    # orientation) and `hidden_axis` is their axis
    quant: QuantTensor | None = None


@dataclass(frozen=True)
class EditPlan:
    """Everything the writer needs. `untie` is (output embedding name, original embedding name)."""

    arch: Arch | None
    edits: dict[str, TensorEdit]
    untie: tuple[str, str] | None
    config_updates: dict[str, object]
    notes: tuple[str, ...]
    norm_preserve: bool = False  # see EditOptions
    # tensors the output adds, each appended to its `shard` (after an untied output embedding) and computed whole
    # by the writer's compute function (their `info` gives dtype, shape and size; there is nothing to read)
    added: tuple[TensorEdit, ...] = ()

    def rewritten_scales(self) -> dict[str, TensorEdit]:
        """Scale tensors written anew with the quantised tensor they scale (by its compute, not copied)."""
        return {e.quant.scales.name: e for e in self.edits.values() if e.quant is not None}


def plan_edit(ckpt: Checkpoint, options: EditOptions, *, hidden_size: int | None = None) -> EditPlan:
    d = hidden_size or ckpt.hidden_size
    unknown = set(options.components) - set(COMPONENTS)
    if unknown:
        raise AbliterateError(f"unknown component(s) {sorted(unknown)}; choose from {', '.join(COMPONENTS)}")
    _check_options(options, ckpt.num_layers)
    arch = None if options.targets else arch_for_config(ckpt.config)
    writers = _override_writers(options.targets) if options.targets else tuple(
        w for w in arch.writers if w.applies(ckpt.config))  # type: ignore[union-attr]
    edits: dict[str, TensorEdit] = {}
    matched, mtp = 0, set()
    quantised = quantised_tensors(ckpt)
    names = _writer_names(ckpt, quantised)
    for name, (shard, info) in ckpt.tensors.items():
        found = _match(writers, names[name]) if name in names else None
        if found is None:
            continue
        writer, layer = found
        matched += 1
        if layer is not None and layer >= ckpt.num_layers:
            if layer < ckpt.num_layers + _prediction_layers(ckpt):
                mtp.add(layer)
                continue
            raise AbliterateError(f"tensor {name} names layer {layer} but config.json has {ckpt.num_layers} layers")
        scale = _scale_for(options, writer.component, layer)
        if scale == 0.0:
            continue
        q = quantised.get(name)
        info = q.values if q else info
        axis = writer.hidden_axis if writer.hidden_axis is not None else _infer_axis(info, d)
        if q and q.format.transposed and writer.hidden_axis is not None:
            axis = -3 - axis  # the table describes the parameter in memory, stored transposed
        _check_editable(info, axis, d)
        edits[name] = TensorEdit(name, shard, info, writer.component, layer, axis, scale, q)
    if matched == 0 and not options.partial:
        what = f"--targets {' '.join(options.targets)}" if options.targets else f"the {arch.name} writer table"  # type: ignore[union-attr]
        raise AbliterateError(
            f"no tensor in {ckpt.root} matched {what}; the checkpoint may name its tensors differently: "
            "pass --targets REGEX (see `abliterate apply --help`)"
        )
    if arch is not None and not options.partial:
        _check_every_layer_has_writers(ckpt, arch, writers, names)
    untie, config_updates, notes = plan_tied_embeddings(ckpt, arch, edits, options)
    if mtp:
        notes.append(f"layer(s) {sorted(mtp)} are multi-token-prediction layers (num_nextn_predict_layers), which "
                     "transformers does not load and which only draft tokens for the model to check: left unedited")
    if arch is not None and arch.normalised_block_outputs:
        notes.append(
            f"{ckpt.config.get('model_type')} normalises attention and MLP outputs before the residual add: the "
            "edit removes r from those outputs before the norm, which the norm's gain can partly restore"
        )
    return EditPlan(arch, edits, untie, config_updates, tuple(notes), options.norm_preserve)


def _prediction_layers(ckpt: Checkpoint) -> int:
    """How many multi-token-prediction layers the checkpoint stores after its decoder layers (DeepSeek-V3, GLM-4.5:
    model.layers.N for N = num_hidden_layers ...), which transformers skips on loading."""
    value = ckpt.text_config.get("num_nextn_predict_layers", ckpt.text_config.get("num_mtp_layers"))
    return value if isinstance(value, int) and value > 0 else 0


def _writer_names(ckpt: Checkpoint, quantised: dict[str, QuantTensor]) -> dict[str, str]:
    """Each tensor's name as the writer table knows it (a quantised one's logical name); scales left out."""
    scales = scale_names(quantised)
    return {name: quantised[name].logical_name if name in quantised else name
            for name in ckpt.tensors if name not in scales}


def _override_writers(patterns: tuple[str, ...]) -> tuple[Writer, ...]:
    writers = []
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise AbliterateError(f"--targets {p!r} is not a valid regular expression: {e}") from None
        writers.append(Writer(p, "custom", None))
    return tuple(writers)


def _match(writers: tuple[Writer, ...], name: str) -> tuple[Writer, int | None] | None:
    for writer in writers:
        m = writer.match(name)
        if m is None:
            continue
        if writer.component != "custom":
            layer = m.groupdict().get("layer")
            return writer, int(layer) if layer is not None else None
        layer_match = re.search(r"\.(\d+)\.", name)
        if layer_match is None:
            return Writer(writer.pattern, "embed", None), None
        component = "attn" if re.search(r"att|\.o_proj|c_proj", name) and "mlp" not in name else "mlp"
        return Writer(writer.pattern, component, None), int(layer_match.group(1))
    return None


def _scale_for(options: EditOptions, component: str, layer: int | None) -> float:
    if component not in options.components:
        return 0.0
    if layer is not None and options.layers is not None and layer not in options.layers:
        return 0.0
    per_layer = options.layer_scales.get(component)
    if per_layer is None:
        return options.scale
    index = 0 if layer is None else layer
    if index >= len(per_layer):
        raise AbliterateError(f"layer scales for {component} have {len(per_layer)} entries, need layer {index}")
    return options.scale * per_layer[index]


def _check_options(options: EditOptions, num_layers: int) -> None:
    """A scale that is not a number would write NaN weights and a layer range past the model would edit
    only the embedding: both refused. Per-layer scales made for another depth (a recipe from another
    model) are refused, not truncated."""
    if not math.isfinite(options.scale):
        raise AbliterateError(f"--scale {options.scale} is not a finite number; use e.g. 1 to remove the direction "
                              "or -1 to amplify it")
    if options.layers is not None and not range(num_layers)[options.layers.start:options.layers.stop]:
        stop = "" if options.layers.stop >= TO_THE_END else options.layers.stop
        raise AbliterateError(f"--layers {options.layers.start}:{stop} selects no layer of this model; "
                              f"it has layers 0 to {num_layers - 1}")
    bad = sorted(c for c, scales in options.layer_scales.items() if not all(math.isfinite(x) for x in scales))
    if bad:
        raise AbliterateError(f"layer scales for {', '.join(bad)} hold NaN or inf; every entry must be a number")
    for component, scales in options.layer_scales.items():
        need = 1 if component == "embed" else num_layers
        if len(scales) != need:
            raise AbliterateError(
                f"layer scales for {component} have {len(scales)} entries but this model needs {need} "
                f"({num_layers} layers); they were made for another model: re-run `abliterate search` on this one"
            )


def _infer_axis(info: TensorInfo, d: int) -> int:
    """For --targets and `hidden_axis: auto`: nn.Linear [d, in] unless only the last axis is d (embeddings, Conv1D,
    biases); a stack of matrices [n, d, d] could be either and is refused."""
    if len(info.shape) >= 3 and info.shape[-2] == info.shape[-1] == d:
        raise AbliterateError(f"{info.name} has shape {list(info.shape)}: both of its last axes have the hidden size "
                              f"{d}, so which one it writes along cannot be told from the shape; name it in a family "
                              "file with its hidden_axis (--arch FILE)")
    if len(info.shape) >= 2 and info.shape[-2] == d:
        return -2
    if info.shape and info.shape[-1] == d:
        return -1
    raise AbliterateError(
        f"--targets matched {info.name} with shape {list(info.shape)}, which has no axis of the hidden size {d}"
    )


def _check_editable(info: TensorInfo, axis: int, d: int) -> None:
    if info.dtype not in FLOAT_DTYPES:
        raise AbliterateError(
            f"cannot edit {info.name}: dtype {info.dtype} is not supported (abliterate edits FP8 block-scaled and "
            "MXFP4 tensors with their scales when config.json's quantization_config names the method; other "
            "quantised or integer weights: use the bf16/fp16/fp32 release of this model)"
        )
    if len(info.shape) < -axis or info.shape[axis] != d:
        raise AbliterateError(
            f"tensor {info.name} has shape {list(info.shape)} but should have the hidden size {d} on axis {axis}; "
            "the architecture table does not fit this checkpoint: pass --targets REGEX"
        )


def _check_every_layer_has_writers(ckpt: Checkpoint, arch: Arch, writers: tuple[Writer, ...],
                                   names: dict[str, str]) -> None:
    """Each layer has an attn and an mlp writer (a hybrid family's: a writer of either, its layers differing)."""
    seen: dict[str, set[int]] = {c: set() for c in ("attn", "mlp") if any(w.component == c for w in writers)}
    for name in names.values():
        found = _match(writers, name)
        if found and found[1] is not None and found[0].component in seen:
            seen[found[0].component].add(found[1])
    if arch.hybrid:
        seen = {"attn or mlp": set().union(*seen.values())}
    for component, layers in seen.items():
        missing = sorted(set(range(ckpt.num_layers)) - layers)
        if missing:
            raise AbliterateError(
                f"no {component} output tensor found for layer(s) {missing[:5]} in {ckpt.root} although the "
                f"{arch.name} table expects one per layer; the checkpoint is incomplete or named differently: "
                "pass --targets REGEX"
            )


def plan_tied_embeddings(
    ckpt: Checkpoint, arch: Arch | None, edits: dict[str, TensorEdit], options: EditOptions
) -> tuple[tuple[str, str] | None, dict[str, object], list[str]]:
    """Keep the output embedding exactly as it was when the shared input embedding is edited."""
    notes: list[str] = []
    if arch is None:
        return None, {}, notes
    tied_flag = ckpt.tied_flag
    output_name = arch.output_embedding
    tied = bool(tied_flag) if tied_flag is not None else output_name not in ckpt.tensors
    embed = next((e for e in edits.values() if e.component == "embed" and _is_token_embedding(e.name)), None)
    if not tied or embed is None:
        return None, {}, notes
    if options.keep_tied:
        notes.append(
            "--keep-tied: the shared embedding matrix is edited, so the output layer also stops reading the "
            "direction from the final hidden state (logits change beyond residual-stream ablation)"
        )
        return None, {}, notes
    if output_name in ckpt.tensors:
        out_info = ckpt.tensors[output_name][1]
        if (out_info.dtype, out_info.shape) != (embed.info.dtype, embed.info.shape):
            raise AbliterateError(
                f"{output_name} differs in dtype/shape from {embed.name} although embeddings are tied; "
                "pass --keep-tied or fix config.json"
            )
    return (output_name, embed.name), {TIE_KEY: False}, notes


def _is_token_embedding(name: str) -> bool:
    """The tied matrix is the token embedding, not GPT-2's position embedding."""
    return "wpe" not in name
