"""Options declared once: a command family's dataclass whose fields carry their flag, help and recipe key.

Each field made with `option(...)` is at once a click option of the command (`click_options`), a value
the command's function receives and turns into the dataclass (`from_params`), possibly a recipe key it
overrides (`recipe="extract.n_train"`: its default is then the recipe schema's, so no default is written
twice), and a part of the command line written back for an artifact (`command_args`). Adding an option to
a family is one edit: one field. `group(Cls)` nests another declared dataclass (options several
commands share) whose options join the command's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from abliterate.options.command import as_word
from abliterate.options.recipe import SECTIONS

SPEC = "abliterate.option"
GROUP = "abliterate.group"
RECORDED = "abliterate.group.recorded"
EXCLUDED = "abliterate.group.excluded"
_FROM_RECIPE = object()  # option(default=...) not given: the recipe schema's default


@dataclass(frozen=True)
class Spec:
    """How one field appears on the command line and in a recorded command."""

    flags: tuple[str, ...]  # ("--n-train",), ("--quiet", "-q"), ("--eval/--no-eval",); () for an argument
    help: str
    recipe: str | None = None  # "section.key" of the recipe this option overrides
    record: str | Callable[[Any], str | None] = "value"  # "value", "path" (a file by its name), "never", or a rule
    click: Mapping[str, Any] = field(default_factory=dict)  # type, is_flag, metavar, multiple, show_default, ...
    parse: Callable[[Any], Any] | None = None  # reads the text given (options.values); its error is the option's

    @property
    def argument(self) -> bool:
        return not self.flags


def recipe_default(key: str) -> Any:
    """The default of recipe key "section.key" in the schema (options/recipe.py); a typo is an error here."""
    section, _, name = key.partition(".")
    cls = SECTIONS.get(section)
    names = {f.name for f in fields(cls)} if cls else set()
    if name not in names:
        raise ValueError(f"option declared with unknown recipe key {key!r}")
    return getattr(cls(), name)


def option(*flags: str, help: str, default: Any = _FROM_RECIPE, recipe: str | None = None,
           record: str | Callable[[Any], str | None] = "value", parse: Callable[[Any], Any] | None = None,
           **click_kwargs: Any) -> Any:
    """A dataclass field that is a command-line option (no flags: the command's positional argument)."""
    if default is _FROM_RECIPE:
        default = recipe_default(recipe) if recipe else (False if click_kwargs.get("is_flag") else None)
    spec = Spec(tuple(flags), help, recipe, record, dict(click_kwargs), parse)
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={SPEC: spec})
    return field(default=default, metadata={SPEC: spec})


def like(cls: type, name: str, **changes: Any) -> Any:
    """A field declared as option `name` of family `cls` is (flag, help, type, recipe key, record rule), for a
    command sharing it: one declaration, not a copy. `changes` replace the default (e.g. None where the command
    falls back to its recipe itself), the help or any click keyword."""
    f = next(f for f in fields(cls) if f.name == name)
    spec = f.metadata[SPEC]
    default = changes.pop("default", _default(f))
    spec = dataclasses.replace(spec, help=changes.pop("help", spec.help), click={**spec.click, **changes})
    return field(default=default, metadata={SPEC: spec})


def group(cls: type, *, record: bool = True, exclude: tuple[str, ...] = ()) -> Any:
    """A field holding another declared dataclass, its options part of the command's (record=False: none of
    them is written back into a recorded command; `exclude`: those fields are no option of this command and
    keep their defaults)."""
    return field(default_factory=cls, metadata={GROUP: cls, RECORDED: record, EXCLUDED: tuple(exclude)})


def declared(cls: type) -> list[tuple[dataclasses.Field, Spec]]:
    """(field, spec) of every option of `cls`, nested groups' included, in declaration order."""
    out: list[tuple[dataclasses.Field, Spec]] = []
    for f in fields(cls):
        if GROUP in f.metadata:
            out += [(g, spec if f.metadata[RECORDED] else dataclasses.replace(spec, record="never"))
                    for g, spec in declared(f.metadata[GROUP]) if g.name not in f.metadata[EXCLUDED]]
        elif SPEC in f.metadata:
            out.append((f, f.metadata[SPEC]))
    return out


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def click_options(cls: type, exclude: tuple[str, ...] = ()) -> Callable:
    """A decorator adding every declared option (and the argument, if any) of `cls`, but those named in
    `exclude`, to a click command."""
    import click

    params = []
    for f, spec in declared(cls):
        if f.name in exclude:
            continue
        if spec.argument:
            params.append(click.argument(f.name, **{"required": True, **spec.click}))
            continue
        default = _default(f)
        if isinstance(default, tuple) and not spec.click.get("multiple"):
            default = as_word(default)  # as it is typed; `parse` reads it back
        callback = _callback(spec.parse) if spec.parse else None
        given = {} if default is None or default is dataclasses.MISSING else {"default": default}  # none: required
        params.append(click.option(*spec.flags, f.name, help=spec.help,  # is checked, and absent reads as None
                                   **{**given, "callback": callback, **spec.click}))

    def decorate(fn: Callable) -> Callable:
        for param in reversed(params):
            fn = param(fn)
        return fn

    return decorate


def _callback(parse: Callable[[Any], Any]) -> Callable:
    import click

    from abliterate.errors import AbliterateError

    def read(_ctx, param, value):
        try:
            return None if value is None else parse(value)
        except AbliterateError as e:
            raise click.BadParameter(str(e), param=param) from None

    return read


def from_params(cls: type, params: Mapping[str, Any]) -> Any:
    """The dataclass from a command's parsed parameters (groups built from theirs; other params ignored)."""
    values = {}
    for f in fields(cls):
        if GROUP in f.metadata:
            values[f.name] = from_params(f.metadata[GROUP], params)
        elif SPEC in f.metadata and f.name in params:
            values[f.name] = params[f.name]
    return cls(**values)


def public_path(value: str | Path | None) -> str | None:
    """A local file by its name only; prompt sources such as builtin:NAME or hf:OWNER/NAME as they are."""
    if value is None or not Path(value).exists():
        return None if value is None else str(value)
    return Path(value).name


def command_args(options: Any) -> list[str]:
    """The declared options of a dataclass instance that differ from their defaults, as command-line words
    (the argument first), each by its record rule: what a recorded command writes back."""
    args: list[str] = []
    flags: list[str] = []
    for f, spec in declared(type(options)):
        value = getattr(_owner(options, f), f.name)
        if spec.record == "never" or value == _default(f):
            continue
        if callable(spec.record):
            value = spec.record(value)
        elif spec.record == "path":
            value = public_path(value)
        if value is None:
            continue
        if spec.argument:
            args.append(str(value))
        elif spec.click.get("is_flag") or "/" in spec.flags[0]:
            on, _, off = spec.flags[0].partition("/")
            flags.append(on if value else off)
        else:
            for v in value if spec.click.get("multiple") else [value]:
                flags += [spec.flags[0], as_word(v)]
    return args + flags


def option_values(options: Any) -> dict[str, Any]:
    """Field name -> value of every declared option of a family instance, its groups' included."""
    return {f.name: getattr(_owner(options, f), f.name) for f, _ in declared(type(options))}


def _owner(options: Any, target: dataclasses.Field) -> Any:
    """The (possibly nested) instance holding field `target`."""
    for f in fields(options):
        if f is target:
            return options
        if GROUP in f.metadata:
            nested = getattr(options, f.name)
            if any(g is target for g, _ in declared(type(nested))):
                return _owner(nested, target)
    raise KeyError(target.name)


def recipe_overrides(options: Any, section: str, given: set[str] | None = None) -> dict[str, Any]:
    """recipe key -> value for the declared options of `options` that override keys of recipe `section`;
    with `given` only those set on the command line (the others leave the recipe's value)."""
    out = {}
    for f, spec in declared(type(options)):
        if spec.recipe and spec.recipe.startswith(section + ".") and (given is None or f.name in given):
            out[spec.recipe.partition(".")[2]] = getattr(_owner(options, f), f.name)
    return out
