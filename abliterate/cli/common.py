"""Helpers every command module shares: --layers read as the option's, the model placement and --arch wrappers,
the model as its options load it, which options were given."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from abliterate.options import values

if TYPE_CHECKING:
    from abliterate.measure.loading import LoadedModel
    from abliterate.options.families import ModelOptions


def parse_layers(value: str | None) -> range | None:
    """--layers, read as options.values.parse_layer_range reads it, its error reported as the option's."""
    from abliterate.errors import AbliterateError

    try:
        return values.parse_layer_range(value)
    except AbliterateError as e:
        raise click.BadParameter(str(e), param_hint="'--layers'") from None


def loaded_model(name: str, model_opts: ModelOptions) -> LoadedModel:
    """MODEL loaded as the command's model options say (device, dtype, remote code)."""
    from abliterate.measure.loading import load_model

    return load_model(name, dtype=model_opts.dtype, device=model_opts.device,
                      trust_remote_code=model_opts.trust_remote_code)


def plotted(draw: Callable[[Path], bool], path: Path | None) -> None:
    """--plot PATH, when given: drawn, or a note that matplotlib (which `draw` returns False without) is missing."""
    if path is None:
        return
    if draw(path):
        click.echo(f"wrote {path}")
    else:
        click.echo("note: matplotlib is not installed; no plot written", err=True)


def given_on_command_line() -> set[str]:
    """The parameters of the running command that were set on the command line (not defaults)."""
    ctx = click.get_current_context()
    return {name for name in ctx.params if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}


# Why --device-map, --max-memory, --offload-folder and --arch are declared here and not in the options model
# (options/declared.py): they are not values a command's function reads, but a context the whole command runs in
# (every model any step loads is placed by accelerate; the family table gains the --arch family). As wrappers they
# set that context once around the command, where fields of every family would have to be passed down to each
# loader and table lookup. They are still recorded like the rest: options/command.given_command reads every
# parameter of the running command, these included, and --help lists them with the others.


def placement_options(fn):
    """--device-map, --max-memory, --offload-folder: a model bigger than the device (or RAM) placed by accelerate
    across GPUs, CPU RAM and a folder on disk; every model the command loads is placed so."""
    import functools

    @functools.wraps(fn)
    def run_placed(*args, device_map: str | None = None, max_memory: str | None = None,
                   offload_folder: str | None = None, **kwargs):
        from abliterate.measure.placement import from_options, placed

        with placed(from_options(device_map, max_memory, offload_folder)):
            return fn(*args, **kwargs)

    options = [
        click.option("--device-map", default=None, type=click.Choice(["auto", "balanced", "sequential"]),
                     help="Place the model across the GPUs, CPU RAM and --offload-folder with accelerate (pip install "
                     "'abliterate[big]'), for models bigger than one device; --device is then unused, except that "
                     "--device cpu keeps it off the GPUs."),
        click.option("--max-memory", default=None, metavar="DEVICE=SIZE,...",
                     help="With --device-map: memory per device, e.g. 0=20GiB,cpu=60GiB (default: what is free)."),
        click.option("--offload-folder", default=None, type=click.Path(file_okay=False),
                     help="With --device-map: a folder for the weights beyond every --max-memory budget (read back "
                     "from disk layer by layer at each forward: slow, but any size runs)."),
    ]
    for option in reversed(options):
        run_placed = option(run_placed)
    return run_placed


def arch_option(fn):
    """--arch FILE: a family file (YAML, see docs/architecture.md) for a model_type the shipped table lacks
    or describes wrongly; the command runs with it ahead of the table."""
    import functools

    @functools.wraps(fn)
    def run_with_arch(*args, arch: str | None = None, **kwargs):
        from abliterate.arch.table import using_arch

        with using_arch(arch):
            return fn(*args, **kwargs)

    return click.option("--arch", "arch", default=None, metavar="FILE", type=click.Path(dir_okay=False),
                        help="Family file (YAML) naming the tensors that write into the residual stream, for a "
                        "model_type abliterate's table lacks (see docs/architecture.md).")(run_with_arch)
