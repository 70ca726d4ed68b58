"""`abliterate probe`'s and the `jailbreak` subcommands' options, declared once (abliterate.options.declared):
the commands that measure how prompt sets and jailbreak wrappers move the residual stream."""

from __future__ import annotations

from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

import click

from abliterate.options.declared import group, option
from abliterate.options.families import ModelOptions, batch_size_option

WRAPPERS_HELP = ("Jailbreak wrappers: builtin:jailbreaks (six classes written for this project) or a JSONL file of "
                 '{"class": ..., "template": "... {prompt} ..."} objects.')


def field_option() -> Any:
    return option("--field", help="Column/field holding the prompt in structured files or datasets.")


def limit_option(default: int, help: str) -> Any:
    return option("--limit", default=default, show_default=True, help=help)


def wrappers_option() -> Any:
    return option("--wrappers", default="builtin:jailbreaks", show_default=True, help=WRAPPERS_HELP)


def quiet_option() -> Any:
    return option("--quiet", "-q", is_flag=True, record="never", help="No progress bars.")


@dataclass(frozen=True, kw_only=True)
class ProbeOptions:
    """`probe`: prompt sets' mean projection on a direction, per layer."""

    model: str = option(help="", default=MISSING)
    direction_path: Path = option("--direction", required=True, type=click.Path(path_type=Path), default=None,
                                  help="Any direction file: from `extract` (refusal or --kind harmfulness), `steer "
                                  "vectors` or `jailbreak vectors`. A [d] direction is used at every layer; rows are "
                                  "normalised.")
    class_name: str | None = option("--class", help="With a `jailbreak vectors` file: probe this class's vector "
                                    "instead of the shared one.")
    sources: tuple[str, ...] = option("--prompts", required=True, multiple=True, default=(), help="A prompt set "
                                      "(repeatable): builtin:NAME[:SPLIT], a .txt/.json/.jsonl/.csv/.parquet file, or "
                                      "hf:OWNER/NAME[:SPLIT]. Each set is one column group of the table and one line "
                                      "of the plot.")
    field: str | None = field_option()
    limit: int = limit_option(64, "Prompts per set, spread over it (0: all).")
    plot_path: Path | None = option("--plot", type=click.Path(path_type=Path), help="Also draw the means as a PNG "
                                    "here, one line per set (needs matplotlib).")
    out: Path | None = option("--out", type=click.Path(path_type=Path), help="Also write every mean and standard "
                              "deviation, per layer and position, as JSON.")
    model_options: ModelOptions = group(ModelOptions)
    batch_size: int = batch_size_option(16)
    quiet: bool = quiet_option()


@dataclass(frozen=True, kw_only=True)
class JailbreakVectorsOptions:
    """`jailbreak vectors`: one vector per wrapper class and layer."""

    model: str = option(help="", default=MISSING)
    out: Path = option("--out", required=True, type=click.Path(path_type=Path), default=None,
                       help="Vectors file to write (.safetensors).")
    wrappers: str = wrappers_option()
    classes: str | None = option("--classes", help="Comma-separated classes to use (default: every class of "
                                 "--wrappers).")
    harmful: str = option("--harmful", default="builtin:harmful:train", show_default=True,
                          help="Harmful requests to wrap: builtin:NAME[:SPLIT], a file, or hf:OWNER/NAME.")
    field: str | None = field_option()
    limit: int = limit_option(32, "Harmful requests used, spread over the set (0: all).")
    layer: int | None = option("--layer", type=int, help="Print the cosine matrix at the residual stream after this "
                               "decoder layer (default: the middle one).")
    plot_path: Path | None = option("--plot", type=click.Path(path_type=Path),
                                    help="Also draw the cosine matrix as a PNG here (needs matplotlib).")
    model_options: ModelOptions = group(ModelOptions)
    batch_size: int = batch_size_option(16)
    quiet: bool = quiet_option()


@dataclass(frozen=True, kw_only=True)
class JailbreakEvaluateOptions:
    """`jailbreak evaluate`: refusal per wrapper class, with and without a jailbreak vector subtracted."""

    model: str = option(help="", default=MISSING)
    wrappers: str = wrappers_option()
    classes: str | None = option("--classes", help="Comma-separated classes to evaluate (default: all of "
                                 "--wrappers).")
    vectors_path: Path | None = option("--vectors", type=click.Path(path_type=Path), help="A file from `jailbreak "
                                       "vectors`: measure each class again with a vector subtracted.")
    source: str | None = option("--from", help="The class whose vector is subtracted (default: the mean over "
                                "classes); the other classes are held out.")
    coeff: float = option("--coeff", default=1.0, show_default=True, help="Multiple of the vector subtracted.")
    layer: int | None = option("--layer", type=int, help="Subtract after this decoder layer; the harmfulness "
                               "projection is read there too (default: the middle layer).")
    harmful: str = option("--harmful", default="builtin:harmful:test", show_default=True,
                          help="Harmful requests to wrap.")
    harmless: str = option("--harmless", default="builtin:harmless:test", show_default=True,
                           help="Harmless requests: the harmfulness direction (with --harmful) and the KL.")
    overrefusal: str = option("--overrefusal", default="builtin:overrefusal", show_default=True,
                              help="Safe prompts that look dangerous, for the over-refusal rate.")
    harmfulness_path: Path | None = option("--harmfulness", type=click.Path(path_type=Path), help="A direction file "
                                           "from `extract --kind harmfulness` (default: measured from --harmful and "
                                           "--harmless at the instruction's last token).")
    field: str | None = field_option()
    limit: int = limit_option(16, "Prompts per set, spread over it (0: all).")
    max_new_tokens: int = option("--max-new-tokens", default=128, show_default=True, help="Greedy tokens per reply "
                                 "(refusals may come after a preamble: keep at least 128 for numbers you publish).")
    out: Path | None = option("--out", type=click.Path(path_type=Path), help="Also write the report as JSON.")
    model_options: ModelOptions = group(ModelOptions)
    batch_size: int = batch_size_option(8)
    quiet: bool = quiet_option()
