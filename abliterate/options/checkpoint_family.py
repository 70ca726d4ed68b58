"""`abliterate merge`'s and `verify`'s options, declared once (abliterate.options.declared); `apply`'s, the
third command that reads and writes checkpoints, are options/families.ApplyOptions."""

from __future__ import annotations

from dataclasses import MISSING, dataclass
from pathlib import Path

import click

from abliterate.arch.writers import COMPONENTS
from abliterate.options.declared import option
from abliterate.options.values import parse_components, parse_size


def _optional_size(value: str | int | None) -> int | None:
    return None if value is None else parse_size(value)


@dataclass(frozen=True, kw_only=True)
class MergeOptions:
    """`merge`: a LoRA adapter merged into its base checkpoint."""

    base: Path = option(help="", type=click.Path(path_type=Path), default=MISSING)
    adapter_dir: Path = option(help="", metavar="ADAPTER", type=click.Path(path_type=Path), default=MISSING)
    out: Path = option("--out", required=True, type=click.Path(path_type=Path), default=None,
                       help="Output model folder (must not exist).")
    max_memory: int = option("--max-memory", default=256 << 20, parse=parse_size, type=str, show_default="256MB",
                             help="Memory budget for tensor chunks.")
    overwrite: bool = option("--overwrite", is_flag=True, record="never",
                             help="Replace --out if it exists (only once the new one is complete).")
    quiet: bool = option("--quiet", "-q", is_flag=True, record="never", help="No progress bar.")


@dataclass(frozen=True, kw_only=True)
class VerifyOptions:
    """`verify`: an edited checkpoint checked against its original (or a download against its checksums)."""

    original: Path = option(help="", type=click.Path(path_type=Path), default=MISSING)
    edited: Path | None = option(help="", type=click.Path(path_type=Path), required=False)
    direction_path: Path | None = option("--direction", type=click.Path(path_type=Path),
                                         help="Direction file. Default: the copy `apply` wrote into EDITED.")
    from_options: bool = option("--from-options", is_flag=True, help="Ignore EDITED's abliterate.json; expect the "
                                "edit that the options below describe (defaults: full removal from every writer).")
    scale: float = option("--scale", default=1.0, show_default=True, help="With --from-options: the edit's scale.")
    layers: str | None = option("--layers", help="With --from-options: the edited layers, START:END (END "
                                "excluded). Default: all.")
    components: tuple[str, ...] = option("--components", default=COMPONENTS, parse=parse_components, type=str,
                                         help="With --from-options: the edited writers (embed, attn, mlp), "
                                         "comma-separated. Default: all.")
    max_memory: int | None = option("--max-memory", parse=_optional_size, type=str,
                                    help="Memory budget for tensor chunks (default: the one the edit used).")
