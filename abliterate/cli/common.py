"""Helpers every command module shares: option parsers, the model options, the recorded command line."""

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
    remote code (and a batch size, where the command has a default for it)."""
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
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def command_line(ctx: click.Context) -> str:
    """The command as given, rebuilt from the parameters set on the command line: sys.argv is the
    caller's when the CLI runs in-process (tests, scripts), so it cannot be recorded as is."""
    import shlex

    args = ["abliterate", ctx.info_name or ""]
    for param in ctx.command.params:
        if ctx.get_parameter_source(param.name) != click.core.ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        if isinstance(param, click.Argument):
            args.append(str(value))
        elif isinstance(param, click.Option) and param.is_flag:
            args.append(param.opts[0] if value or not param.secondary_opts else param.secondary_opts[0])
        else:
            for v in value if isinstance(param, click.Option) and param.multiple else [value]:
                args += [param.opts[0], str(v)]
    return shlex.join(args)
