"""The command that produced an artifact, recorded one way by every artifact that names one.

Artifacts (the manifest abliterate.json, direction and extraction files, search recipes, evaluation
reports) record the `abliterate` command line that made them. Inside a CLI command that is the command
as given, rebuilt from its parsed parameters: `sys.argv` is the caller's when the CLI runs in-process
(tests, scripts), so it is never used. A library call outside the CLI records what its caller describes.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

LIBRARY_CALL = "(abliterate library call)"


def command_line(args: Sequence[object]) -> str:
    """`abliterate ARGS...`, quoted for a POSIX shell: the one way a command is written down."""
    return shlex.join(["abliterate", *(str(a) for a in args)])


def as_word(value: object) -> str:
    """One option value as typed on a command line: a list of names comma-separated (`--components attn,mlp`)."""
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def given_command() -> str | None:
    """The running CLI command as given (the parameters set on the command line, long names, in declaration
    order), or None outside the CLI."""
    import click

    ctx = click.get_current_context(silent=True)
    if ctx is None or ctx.command is None:
        return None
    args: list[object] = [ctx.info_name or ""]
    for param in ctx.command.params:
        if ctx.get_parameter_source(param.name) != click.core.ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        if isinstance(param, click.Argument):
            args.append(value)
        elif isinstance(param, click.Option) and param.is_flag:
            args.append(param.opts[0] if value or not param.secondary_opts else param.secondary_opts[0])
        else:
            for v in value if isinstance(param, click.Option) and param.multiple else [value]:
                args += [param.opts[0], as_word(v)]
    return command_line(args)


def recorded_command(explicit: str | None = None, *, library: str | None = None) -> str:
    """What an artifact records as the command that produced it, the one rule for every artifact:
    `explicit` when the caller states it (the evaluation command a whole job puts on its card), else the
    running CLI command as given, else `library` (what a library call equals, e.g. `evaluate`'s settings
    as flags), else a note that it was a library call."""
    return explicit or given_command() or library or LIBRARY_CALL
