"""Helpers every command module shares: option parsers, the model options, which options were given."""

from __future__ import annotations

import re

import click

from abliterate.arch.table import COMPONENTS


def parse_size(value: str) -> int:
    """'256MB', '1G', '1048576' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", value.lower())
    if not m:
        raise click.BadParameter(f"{value!r} is not a size; write e.g. 256MB or 1GB")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def parse_layers(value: str | None) -> range | None:
    """--layers, read as plan.parse_layer_range reads it, its error reported as the option's."""
    from abliterate.edit.plan import parse_layer_range
    from abliterate.errors import AbliterateError

    try:
        return parse_layer_range(value)
    except AbliterateError as e:
        raise click.BadParameter(str(e), param_hint="'--layers'") from None


def parse_components(value: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in value.split(",") if p.strip())
    bad = [p for p in parts if p not in COMPONENTS]
    if bad or not parts:
        raise click.BadParameter(f"{value!r}: choose from {','.join(COMPONENTS)}")
    return parts


def model_options(*, thinking: bool = True, batch_size: int | None = None):
    """The options of every command that loads a model to run it: device, dtype, template, thinking mode,
    remote code, --arch (and a batch size, where the command has a default for it)."""
    options = [click.option("--device", default="auto", show_default=True, help="cpu, cuda, mps or auto."),
               click.option("--dtype", default="auto", show_default=True,
                            help="auto (the checkpoint's), bfloat16, float16, float32."),
               click.option("--template", default=None,
                            help="Chat template (Jinja file or text) for models without one.")]
    if thinking:
        options.append(click.option("--thinking", is_flag=True, help="Keep the template's thinking mode on (default: "
                                    "enable_thinking=False is passed to templates that support it, so the first "
                                    "reply token is the answer)."))
    options.append(click.option("--trust-remote-code", is_flag=True,
                                help="Allow the model's own Python code from the Hub."))
    if batch_size is not None:
        options.append(click.option("--batch-size", default=batch_size, show_default=True,
                                    help="Prompts per forward pass; lower it if memory runs out."))

    def decorate(fn):
        fn = arch_option(fn)
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def given_on_command_line() -> set[str]:
    """The parameters of the running command that were set on the command line (not defaults)."""
    ctx = click.get_current_context()
    return {name for name in ctx.params if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}


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
