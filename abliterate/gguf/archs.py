"""GGUF architectures: llama.cpp's architecture string -> the family in abliterate's writer table.

llama.cpp gives every family the same tensor names (`token_embd`, `blk.N.attn_output`,
`blk.N.ffn_down`, MoE `blk.N.ffn_down_exps` / `ffn_down_shexp`), and its converter stores every
matrix in nn.Linear order ([..., d, in] in numpy order, GPT-2's Conv1D transposed), so one list of
writers serves all families. What differs per family, and lives here as data:

* the Hugging Face `model_type` it corresponds to (the writer table in abliterate/arch/ then says
  whether block outputs are normalised before the residual add, which the edit notes);
* whether llama.cpp's loader accepts a separate `output.weight` (needed to untie an edited token
  embedding). Gemma, Gemma 2 and Command-R always read the output layer from `token_embd`: an extra
  tensor would make llama.cpp refuse the file, so those need --keep-tied (read from llama.cpp's
  src/models/*.cpp: families that create LLM_TENSOR_OUTPUT as optional or required).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from abliterate.arch.table import arch_for_config
from abliterate.arch.writers import Arch, Writer
from abliterate.errors import AbliterateError

OUTPUT_NAME = "output.weight"
TOKEN_EMBEDDING = "token_embd.weight"
_L = r"blk\.(?P<layer>\d+)"

WRITERS: tuple[Writer, ...] = (
    Writer(re.escape(TOKEN_EMBEDDING), "embed", -1),
    Writer(r"position_embd\.weight", "embed", -1),
    Writer(rf"{_L}\.attn_output\.weight", "attn", -2),
    Writer(rf"{_L}\.attn_output\.bias", "attn", -1),
    Writer(rf"{_L}\.ffn_down(?:_exps|_shexp)?\.weight", "mlp", -2),
    Writer(rf"{_L}\.ffn_down(?:_exps|_shexp)?\.bias", "mlp", -1),
)


@dataclass(frozen=True)
class GgufArch:
    model_type: str  # the Hugging Face model_type whose table row describes the family
    separate_output: bool = True  # llama.cpp loads an `output.weight` when there is one


GGUF_ARCHS: dict[str, GgufArch] = {
    "llama": GgufArch("llama"),  # also Mistral and Mixtral (experts as ffn_down_exps)
    "qwen2": GgufArch("qwen2"),
    "qwen3": GgufArch("qwen3"),
    "qwen2moe": GgufArch("qwen2_moe"),
    "qwen3moe": GgufArch("qwen3_moe"),
    "gemma": GgufArch("gemma", separate_output=False),
    "gemma2": GgufArch("gemma2", separate_output=False),
    "gemma3": GgufArch("gemma3_text"),
    "phi2": GgufArch("phi"),
    "phi3": GgufArch("phi3"),
    "phimoe": GgufArch("phimoe"),
    "olmo": GgufArch("olmo"),
    "olmo2": GgufArch("olmo2"),
    "olmoe": GgufArch("olmoe"),
    "granite": GgufArch("granite"),
    "granitemoe": GgufArch("granitemoe"),
    "command-r": GgufArch("cohere", separate_output=False),
    "cohere2": GgufArch("cohere2", separate_output=False),
    "stablelm": GgufArch("stablelm"),
    "gpt2": GgufArch("gpt2"),
    "starcoder": GgufArch("gpt_bigcode"),
    "starcoder2": GgufArch("starcoder2"),
    "gptneox": GgufArch("gpt_neox"),
    "gpt-oss": GgufArch("gpt_oss"),
    "smollm3": GgufArch("smollm3"),
    "exaone4": GgufArch("exaone4"),
    "glm4": GgufArch("glm4"),
    "seed_oss": GgufArch("seed_oss"),
    "arcee": GgufArch("arcee"),
    "apertus": GgufArch("apertus"),
    "deepseek2": GgufArch("deepseek_v3"),
}


def gguf_arch(name: str) -> tuple[GgufArch, Arch]:
    """The GGUF family and its row of the writer table, or a clear error naming the supported ones."""
    found = GGUF_ARCHS.get(name)
    if found is None:
        raise AbliterateError(
            f"GGUF architecture {name!r} is not in abliterate's GGUF table; supported: {', '.join(sorted(GGUF_ARCHS))}"
            " (add it to abliterate/gguf/archs.py if llama.cpp names its tensors like these)"
        )
    return found, arch_for_config({"model_type": found.model_type})


def match_writer(name: str) -> tuple[Writer, int | None] | None:
    for writer in WRITERS:
        m = writer.match(name)
        if m is not None:
            layer = m.groupdict().get("layer")
            return writer, int(layer) if layer is not None else None
    return None
