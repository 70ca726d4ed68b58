"""Plan a GGUF edit: which tensors change, how, and where every tensor lands in the output file.

Pure: reads the parsed header only. The same plan drives `apply` on a .gguf and its `verify`.
"""

from __future__ import annotations

from dataclasses import dataclass

from abliterate.arch.writers import Arch, Writer
from abliterate.edit.plan import EditOptions, _check_options
from abliterate.errors import AbliterateError
from abliterate.gguf.archs import OUTPUT_NAME, TOKEN_EMBEDDING, GgufArch, gguf_arch, match_writer
from abliterate.gguf.format import GgufFile, GgufTensor, align, can_dequantize, can_quantize, with_type

REQUANT_TYPES = ("auto", "Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "F16",
                 "BF16", "F32")
# --requant auto: the type written for one that cannot be written (the IQ types: llama.cpp's quantisers
# for those need an importance matrix), the K-quant (or for IQ4_NL's blocks of 32, the legacy type) of
# the nearest bits per weight at or above it; anything else as Q8_0
NEAREST = {"IQ1_S": "Q2_K", "IQ1_M": "Q2_K", "IQ2_XXS": "Q2_K", "IQ2_XS": "Q2_K", "IQ2_S": "Q2_K",
           "IQ3_XXS": "Q3_K", "IQ3_S": "Q3_K", "IQ4_XS": "Q4_K", "IQ4_NL": "Q4_1"}


@dataclass(frozen=True)
class GgufEdit:
    tensor: GgufTensor
    component: str
    layer: int | None
    hidden_axis: int
    scale: float
    out_type: str  # the GGML type written: the input's own, or --requant where gguf cannot write that one


@dataclass(frozen=True)
class Placed:
    """A tensor of the output: its (possibly retyped) info, offset in the data section, and source."""

    tensor: GgufTensor
    offset: int  # relative to the output's data section
    source: GgufTensor  # the input tensor whose bytes (or edit) it holds


@dataclass(frozen=True)
class GgufPlan:
    src: GgufFile
    family: GgufArch
    arch: Arch
    hidden_size: int
    num_layers: int
    edits: dict[str, GgufEdit]
    untie: bool  # append output.weight holding the original token embedding
    placed: tuple[Placed, ...]  # header order (the untied output last)
    notes: tuple[str, ...]

    @property
    def data_size(self) -> int:
        last = max(self.placed, key=lambda p: p.offset)
        return last.offset + last.tensor.nbytes


def plan_gguf(src: GgufFile, options: EditOptions, requant: str = "auto") -> GgufPlan:
    if options.targets:
        raise AbliterateError("--targets is not supported for GGUF files; the GGUF table names the tensors "
                              "(--components and --layers choose among them)")
    if requant not in REQUANT_TYPES:
        raise AbliterateError(f"--requant {requant} is not one of {', '.join(REQUANT_TYPES)}")
    family, arch = gguf_arch(src.architecture)
    prefix = src.architecture
    d, layers = src.int_field(f"{prefix}.embedding_length"), src.int_field(f"{prefix}.block_count")
    _check_options(options, layers)
    edits: dict[str, GgufEdit] = {}
    seen: dict[str, set[int]] = {"attn": set(), "mlp": set()}
    notes: list[str] = []
    for t in src.tensors:
        found = match_writer(t.name)
        if found is None:
            continue
        writer, layer = found
        if layer is not None:
            if layer >= layers:
                raise AbliterateError(f"{src.path}: tensor {t.name} names layer {layer} but the GGUF has {layers} "
                                      "layers; the file is inconsistent: convert it again")
            seen[writer.component].add(layer)
        scale = options.strength(writer.component, layer)
        if scale == 0.0:
            continue
        out_type = _out_type(t, d, writer, requant)
        edits[t.name] = GgufEdit(t, writer.component, layer, writer.hidden_axis, scale, out_type)
    for component, have in seen.items():
        missing = sorted(set(range(layers)) - have)
        if missing:
            raise AbliterateError(f"{src.path}: no {component} output tensor for layer(s) {missing[:5]}; llama.cpp "
                                  f"names them blk.N.attn_output / blk.N.ffn_down: the file is incomplete")
    retyped = sorted({f"{e.tensor.type_name}->{e.out_type}" for e in edits.values()
                      if e.out_type != e.tensor.type_name})
    if retyped:
        notes.append(f"some quantised types cannot be written: edited tensors re-quantised as "
                     f"{', '.join(retyped)} (--requant chooses the type)")
    if arch.normalised_block_outputs:
        notes.append(f"{src.architecture} normalises attention and MLP outputs before the residual add: the edit "
                     "removes r from those outputs before the norm, which the norm's gain can partly restore")
    untie = _untie(src, family, edits, options, notes)
    return GgufPlan(src, family, arch, d, layers, edits, untie, _place(src, edits, untie), tuple(notes))


def _out_type(t: GgufTensor, d: int, writer: Writer, requant: str) -> str:
    axis = writer.hidden_axis
    if len(t.shape) < -axis or t.shape[axis] != d:
        raise AbliterateError(f"tensor {t.name} has shape {list(t.shape)} but should have the hidden size {d} on "
                              f"axis {axis}; the GGUF does not lay out this family as llama.cpp does")
    if t.is_float or can_quantize(t.type_name):
        return t.type_name
    if not can_dequantize(t.type_name):
        raise AbliterateError(f"cannot edit {t.name}: the gguf library cannot read {t.type_name} values; use a GGUF "
                              "of this model in Q8_0, Q4_K or F16 (or another type llama.cpp's gguf-py reads)")
    return NEAREST.get(t.type_name, "Q8_0") if requant == "auto" else requant


def _untie(src: GgufFile, family: GgufArch, edits: dict[str, GgufEdit], options: EditOptions,
           notes: list[str]) -> bool:
    """A GGUF without output.weight reads the output layer from token_embd: keep that one as it was."""
    if OUTPUT_NAME in src.by_name() or TOKEN_EMBEDDING not in edits:
        return False
    if options.keep_tied:
        notes.append("--keep-tied: the shared token_embd is edited, so the output layer also stops reading the "
                     "direction from the final hidden state")
        return False
    if not family.separate_output:
        raise AbliterateError(f"llama.cpp's {src.architecture} always reads the output layer from token_embd, so it "
                              "cannot be untied: pass --keep-tied (edit the shared matrix) or --components attn,mlp")
    notes.append("token_embd is shared with the output layer: output.weight is added holding the original matrix")
    return True


def _place(src: GgufFile, edits: dict[str, GgufEdit], untie: bool) -> tuple[Placed, ...]:
    """Output offsets: the input's, shifted by the aligned size change of re-typed tensors before them
    (so an edit that keeps every type keeps every offset), and the untied output appended at the end."""
    by_offset = sorted(src.tensors, key=lambda t: t.start)
    offsets: dict[str, int] = {}
    out: dict[str, GgufTensor] = {}
    shift = 0
    for t in by_offset:
        edit = edits.get(t.name)
        new = with_type(t, edit.out_type) if edit and edit.out_type != t.type_name else t
        offsets[t.name] = t.start - src.data_start + shift
        out[t.name] = new
        shift += align(new.nbytes, src.alignment) - align(t.nbytes, src.alignment)
    placed = [Placed(out[t.name], offsets[t.name], t) for t in src.tensors]
    if untie:
        embed = src.by_name()[TOKEN_EMBEDDING]
        end = max(p.offset + p.tensor.nbytes for p in placed)
        output = GgufTensor(OUTPUT_NAME, embed.type_name, embed.type_id, embed.shape, 0, embed.nbytes, 0)
        placed.append(Placed(output, align(end, src.alignment), embed))
    return tuple(placed)
