"""`abliterate steer`'s subcommands' options, declared once (abliterate.options.declared): one family per
subcommand, the options they share made by one function each."""

from __future__ import annotations

from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

import click

from abliterate.options.declared import group, option
from abliterate.options.families import ModelOptions, batch_size_option
from abliterate.options.values import parse_coeffs

NO_THINKING = ("thinking",)  # steering reads and generates without the template's thinking switch


def vectors_option() -> Any:
    return option("--vectors", required=True, type=click.Path(path_type=Path), default=None,
                  help="Vectors file written by `abliterate steer vectors`.")


def pairs_option(help: str) -> Any:
    return option("--pairs", required=True, type=click.Path(path_type=Path), default=None, help=help)


def coeff_option() -> Any:
    return option("--coeff", required=True, type=float, default=None,
                  help="Multiplier of the vector (negative: the opposite).")


def out_option(help: str) -> Any:
    return option("--out", required=True, type=click.Path(path_type=Path), default=None, help=help)


def overwrite_option(help: str) -> Any:
    return option("--overwrite", is_flag=True, record="never", help=help)


def quiet_option(help: str | None = None) -> Any:
    return option("--quiet", "-q", is_flag=True, record="never", help=help or "No progress bars.")


@dataclass(frozen=True, kw_only=True)
class SteerVectorsOptions:
    """`steer vectors`: one steering vector per layer from contrastive pairs."""

    model: str = option(help="", default=MISSING)
    pairs_path: Path = pairs_option("JSONL or a JSON array: CAA A/B items (question, answer_matching_behavior, "
                              "answer_not_matching_behavior) or ActAdd prompt pairs (positive, negative).")
    out: Path = out_option("Vectors file to write (.safetensors).")
    model_options: ModelOptions = group(ModelOptions, exclude=NO_THINKING)
    batch_size: int = batch_size_option(16)
    quiet: bool = quiet_option()


@dataclass(frozen=True, kw_only=True)
class SteerChatOptions:
    """`steer chat`: greedy replies with a vector added."""

    model: str = option(help="", default=MISSING)
    vectors_path: Path = vectors_option()
    layer: int = option("--layer", required=True, type=int, default=None,
                        help="Add the vector to the residual stream after this layer.")
    coeff: float = coeff_option()
    cls: str | None = option("--class", help="With a `jailbreak vectors` file: steer with this class's vector (e.g. "
                             "--coeff -1 subtracts it: hardening against that kind of jailbreak).")
    prompts: tuple[str, ...] = option("--prompt", multiple=True, default=(),
                                      help="A user message (repeatable); default: one per stdin line.")
    max_new_tokens: int = option("--max-new-tokens", default=64, show_default=True, help="Greedy tokens per reply.")
    model_options: ModelOptions = group(ModelOptions, exclude=NO_THINKING)
    batch_size: int = batch_size_option(16)


@dataclass(frozen=True, kw_only=True)
class SteerSweepOptions:
    """`steer sweep`: the behaviour's probability per layer and coefficient."""

    model: str = option(help="", default=MISSING)
    vectors_path: Path = vectors_option()
    pairs_path: Path = pairs_option("Held-out A/B items (same format as for `steer vectors`).")
    layers: str | None = option("--layers", help="Layers to steer, START:END (END excluded). Default: all.")
    coeffs: tuple[float, ...] = option("--coeffs", default=(-2, -1, 0, 1, 2), parse=parse_coeffs,
                                       type=str, show_default=True, help="Comma-separated multipliers of "
                                       "the vector (negative: the opposite behaviour).")
    plot_path: Path | None = option("--plot", type=click.Path(path_type=Path),
                                    help="Also draw the table as a PNG here (needs matplotlib).")
    model_options: ModelOptions = group(ModelOptions, exclude=NO_THINKING)
    batch_size: int = batch_size_option(16)
    quiet: bool = quiet_option()


@dataclass(frozen=True, kw_only=True)
class SteerBakeOptions:
    """`steer bake`: a vector written into a checkpoint's MLP output bias (or a peft adapter)."""

    checkpoint: Path = option(help="", type=click.Path(path_type=Path), default=MISSING)
    vectors_path: Path = vectors_option()
    layer: int = option("--layer", required=True, type=int, default=None, help="Bake the vector into this layer's "
                        "MLP output bias (the residual stream after the layer, as `steer chat --layer` adds it).")
    coeff: float = coeff_option()
    out: Path = out_option("Output model folder (must not exist).")
    cls: str | None = option("--class", help="With a `jailbreak vectors` file: bake this class's vector.")
    adapter: bool = option("--adapter", is_flag=True, help="Write a peft LoRA adapter instead (the vector as the "
                           "LoRA B bias, `lora_bias`): exact for families without an MLP output bias too (Qwen2/3, "
                           "Mistral, Phi-3).")
    overwrite: bool = overwrite_option("Replace --out if it exists (only once the new one is complete).")
    quiet: bool = quiet_option("No progress bar.")


@dataclass(frozen=True, kw_only=True)
class SteerExportOptions:
    """`steer export-gguf`: a vectors file as a llama.cpp control vector."""

    vectors_path: Path = option(help="", metavar="VECTORS", type=click.Path(path_type=Path), default=MISSING)
    layers: str = option("--layers", required=True, default=None, help="Layers whose output to steer, START:END "
                         "(END excluded) or one layer, e.g. 12 (what `steer chat --layer 12` steers). llama.cpp "
                         "cannot steer layer 0.")
    coeff: float = coeff_option()
    out: Path = out_option("Control vector file to write (.gguf).")
    overwrite: bool = overwrite_option("Replace --out if it exists.")
