"""Which tensors write into the residual stream, per model family: data, in one place.

Every tensor that adds something to the residual stream (token and position embeddings, the
attention output projection, the MLP output projection, each MoE expert's and shared expert's
output projection, and their biases) is listed here by its on-disk name, with the axis that
holds the hidden dimension d:

* ``hidden_axis=-2``: ``nn.Linear`` layout ``[..., d, in]`` (a row per residual coordinate),
  also fused experts stored ``[experts, d, in]``.
* ``hidden_axis=-1``: ``[..., d]``: embeddings ``[vocab, d]``, GPT-2 ``Conv1D`` ``[in, d]``,
  fused experts stored ``[experts, in, d]``, and every bias.

`hook_modules` names the in-memory transformers modules whose outputs those tensors produce, so
that hooks can reproduce an edit exactly (tests, search). Adding a family is adding an entry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from abliterate.errors import AbliterateError

COMPONENTS = ("embed", "attn", "mlp")
_L = r"(?P<layer>\d+)"


@dataclass(frozen=True)
class Writer:
    """A family of tensors writing into the residual stream, matched by a full regex on its name."""

    pattern: str
    component: str  # one of COMPONENTS
    hidden_axis: int | None  # -2 or -1, see the module docstring; None: read it from the shape

    def match(self, name: str) -> re.Match[str] | None:
        return re.fullmatch(self.pattern, name)


@dataclass(frozen=True)
class Arch:
    """How one model family lays out its residual writers on disk and in memory."""

    name: str
    model_types: tuple[str, ...]
    writers: tuple[Writer, ...]
    hook_modules: dict[str, tuple[str, ...]]  # component -> module paths, "{layer}" filled in
    decoder_layers: str = "model.layers"  # the ModuleList of decoder blocks (activations, steering)
    output_embedding: str = "lm_head.weight"  # written when tied embeddings are untied
    # Families that normalise a block's output before adding it to the residual (Gemma 2/3, OLMo 2):
    # the edit removes r from the block output *before* that norm, not from the residual stream.
    normalised_block_outputs: bool = False
    # The config key of a scalar multiplying every block output before the residual add (Granite): an edit is
    # unaffected (the product is linear), but a bias written to steer must be divided by it.
    residual_multiplier: str | None = None
    notes: str = ""


def _linear(prefix: str, component: str) -> tuple[Writer, ...]:
    """An nn.Linear writing into the residual: weight [d, in] and optional bias [d]."""
    return (Writer(prefix + r"\.weight", component, -2), Writer(prefix + r"\.bias", component, -1))


def _conv1d(prefix: str, component: str) -> tuple[Writer, ...]:
    """GPT-2's Conv1D: weight stored transposed, [in, d], and bias [d]."""
    return (Writer(prefix + r"\.weight", component, -1), Writer(prefix + r"\.bias", component, -1))


def _embedding(name: str) -> Writer:
    return Writer(re.escape(name), "embed", -1)


_DECODER = rf"model\.layers\.{_L}"
_LLAMA_WRITERS = (
    _embedding("model.embed_tokens.weight"),
    *_linear(rf"{_DECODER}\.self_attn\.o_proj", "attn"),
    # dense MLP, or MoE experts / shared expert(s) stored one tensor per expert
    *_linear(rf"{_DECODER}\.mlp\.(?:experts\.\d+\.|shared_experts?\.)?down_proj", "mlp"),
)
_LLAMA_HOOKS = {
    "embed": ("model.embed_tokens",),
    "attn": ("model.layers.{layer}.self_attn.o_proj",),
    "mlp": ("model.layers.{layer}.mlp",),
}

ARCHS: tuple[Arch, ...] = (
    Arch(
        name="llama-like",
        model_types=(
            "llama", "mistral", "ministral", "qwen2", "qwen3", "gemma", "phi3", "olmo",
            "cohere", "cohere2", "stablelm", "glm", "smollm3", "seed_oss", "arcee",
            "apertus", "helium", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "hunyuan_v1_dense",
        ),
        writers=_LLAMA_WRITERS,
        hook_modules=_LLAMA_HOOKS,
    ),
    Arch(
        name="granite (block outputs scaled by residual_multiplier)",
        model_types=("granite",),
        writers=_LLAMA_WRITERS,
        hook_modules=_LLAMA_HOOKS,
        residual_multiplier="residual_multiplier",
    ),
    Arch(
        name="llama-like, normalised block outputs",
        model_types=("gemma2", "gemma3_text", "olmo2", "olmo3", "glm4", "exaone4"),
        writers=_LLAMA_WRITERS,
        hook_modules=_LLAMA_HOOKS,
        normalised_block_outputs=True,
        notes="attention and MLP outputs pass through a norm before the residual add",
    ),
    Arch(
        name="mixtral-like",
        model_types=("mixtral", "phimoe"),
        writers=(
            _embedding("model.embed_tokens.weight"),
            *_linear(rf"{_DECODER}\.self_attn\.o_proj", "attn"),
            *_linear(rf"{_DECODER}\.block_sparse_moe\.experts\.\d+\.w2", "mlp"),
        ),
        hook_modules=_LLAMA_HOOKS,
    ),
    Arch(
        name="gpt-oss (fused experts [experts, in, d])",
        model_types=("gpt_oss",),
        writers=(
            _embedding("model.embed_tokens.weight"),
            *_linear(rf"{_DECODER}\.self_attn\.o_proj", "attn"),
            Writer(rf"{_DECODER}\.mlp\.experts\.down_proj", "mlp", -1),
            Writer(rf"{_DECODER}\.mlp\.experts\.down_proj_bias", "mlp", -1),
        ),
        hook_modules=_LLAMA_HOOKS,
    ),
    Arch(
        name="granite-moe (fused experts [experts, d, in])",
        model_types=("granitemoe", "granitemoeshared"),
        writers=(
            _embedding("model.embed_tokens.weight"),
            *_linear(rf"{_DECODER}\.self_attn\.o_proj", "attn"),
            Writer(rf"{_DECODER}\.block_sparse_moe\.output_linear\.weight", "mlp", -2),
            *_linear(rf"{_DECODER}\.shared_mlp\.output_linear", "mlp"),
        ),
        hook_modules={**_LLAMA_HOOKS, "mlp": ("model.layers.{layer}.block_sparse_moe",
                                               "model.layers.{layer}.shared_mlp")},
        residual_multiplier="residual_multiplier",
    ),
    Arch(
        name="gpt2 (Conv1D)",
        model_types=("gpt2",),
        writers=(
            _embedding("transformer.wte.weight"),
            _embedding("transformer.wpe.weight"),
            *_conv1d(rf"transformer\.h\.{_L}\.attn\.c_proj", "attn"),
            *_conv1d(rf"transformer\.h\.{_L}\.mlp\.c_proj", "mlp"),
        ),
        hook_modules={
            "embed": ("transformer.wte", "transformer.wpe"),
            "attn": ("transformer.h.{layer}.attn.c_proj",),
            "mlp": ("transformer.h.{layer}.mlp",),
        },
        decoder_layers="transformer.h",
        notes="position embeddings write into the residual too and are edited with the token embeddings",
    ),
    Arch(
        name="gpt-bigcode",
        model_types=("gpt_bigcode",),
        writers=(
            _embedding("transformer.wte.weight"),
            _embedding("transformer.wpe.weight"),
            *_linear(rf"transformer\.h\.{_L}\.attn\.c_proj", "attn"),
            *_linear(rf"transformer\.h\.{_L}\.mlp\.c_proj", "mlp"),
        ),
        hook_modules={
            "embed": ("transformer.wte", "transformer.wpe"),
            "attn": ("transformer.h.{layer}.attn.c_proj",),
            "mlp": ("transformer.h.{layer}.mlp",),
        },
        decoder_layers="transformer.h",
    ),
    Arch(
        name="gpt-neox",
        model_types=("gpt_neox",),
        writers=(
            _embedding("gpt_neox.embed_in.weight"),
            *_linear(rf"gpt_neox\.layers\.{_L}\.attention\.dense", "attn"),
            *_linear(rf"gpt_neox\.layers\.{_L}\.mlp\.dense_4h_to_h", "mlp"),
        ),
        hook_modules={
            "embed": ("gpt_neox.embed_in",),
            "attn": ("gpt_neox.layers.{layer}.attention.dense",),
            "mlp": ("gpt_neox.layers.{layer}.mlp",),
        },
        decoder_layers="gpt_neox.layers",
        output_embedding="embed_out.weight",
    ),
    Arch(
        name="phi (phi-1/phi-2)",
        model_types=("phi",),
        writers=(
            _embedding("model.embed_tokens.weight"),
            *_linear(rf"{_DECODER}\.self_attn\.dense", "attn"),
            *_linear(rf"{_DECODER}\.mlp\.fc2", "mlp"),
        ),
        hook_modules={**_LLAMA_HOOKS, "attn": ("model.layers.{layer}.self_attn.dense",)},
    ),
    Arch(
        name="starcoder2",
        model_types=("starcoder2",),
        writers=(
            _embedding("model.embed_tokens.weight"),
            *_linear(rf"{_DECODER}\.self_attn\.o_proj", "attn"),
            *_linear(rf"{_DECODER}\.mlp\.c_proj", "mlp"),
        ),
        hook_modules=_LLAMA_HOOKS,
    ),
)

_BY_MODEL_TYPE = {mt: arch for arch in ARCHS for mt in arch.model_types}


def arch_for_config(config: dict) -> Arch:
    """The writer table for a config.json, or a clear error telling the user how to proceed."""
    model_type = config.get("model_type")
    arch = _BY_MODEL_TYPE.get(model_type or "")
    if arch is None:
        archs = ", ".join(config.get("architectures") or []) or "none listed"
        raise AbliterateError(
            f"model_type {model_type!r} (architectures: {archs}) is not in abliterate's table of "
            "residual-stream writers; pass --targets REGEX naming the tensors that write into the residual "
            "stream, or add the family to abliterate/archs.py (see docs/architecture.md)"
        )
    return arch


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)
