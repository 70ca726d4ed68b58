"""The architecture table: every family file shipped in abliterate/arch/families/, looked up by model_type.

A user adds a family without editing Python: `--arch FILE` (a family file, see family_file.py) is used
for the command's model, ahead of the shipped table, for the duration of the command (`using_arch`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from importlib import resources
from pathlib import Path

from abliterate.arch.family_file import load_family_file, parse_family
from abliterate.arch.writers import COMPONENTS, Arch, Writer
from abliterate.errors import AbliterateError

__all__ = ["COMPONENTS", "Arch", "Writer", "arch_for_config", "refused_model_types", "shipped_archs",
           "supported_model_types", "using_arch"]

_EXTRA: list[Arch] = []  # the --arch families in force, innermost last (a stack, not a ContextVar: threads see it)


@cache
def shipped_archs() -> tuple[Arch, ...]:
    """Every shipped family file, parsed and checked (a broken package file fails loudly, naming the file)."""
    import yaml

    folder = resources.files("abliterate.arch") / "families"
    archs, owner = [], {}
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".yaml"):
            continue
        arch = parse_family(yaml.safe_load(entry.read_text()), f"abliterate/arch/families/{entry.name}")
        for mt in arch.model_types:
            if mt in owner:
                raise AbliterateError(f"model_type {mt!r} is in both {owner[mt]} and {entry.name}")
            owner[mt] = entry.name
        archs.append(arch)
    return tuple(archs)


def _by_model_type() -> dict[str, Arch]:
    return {mt: arch for arch in shipped_archs() for mt in arch.model_types}


@contextmanager
def using_arch(path: str | Path | None) -> Iterator[Arch | None]:
    """Within the block, a config whose model_type the family file at `path` lists gets that family (ahead of the
    shipped table); other configs (a judge model, say) still get the table's."""
    if path is None:
        yield None
        return
    arch = load_family_file(path)
    _EXTRA.append(arch)
    try:
        yield arch
    finally:
        _EXTRA.remove(arch)


def arch_for_config(config: dict) -> Arch:
    """The writer table for a config.json, or a clear error telling the user how to proceed. A model_type in no
    family file that transformers knows gets its writers discovered on a tiny instance of its config (discover.py)."""
    model_type = config.get("model_type")
    for extra in reversed(_EXTRA):
        if model_type in extra.model_types:
            return extra
    arch = _by_model_type().get(model_type or "")
    if arch is None and _EXTRA:
        covered = ", ".join(_EXTRA[-1].model_types)
        raise AbliterateError(f"the --arch family {_EXTRA[-1].name!r} covers model_type(s) {covered}, not "
                              f"{model_type!r}; add it to the file's model_types")
    if arch is None and model_type in refused_model_types():
        raise AbliterateError(f"model_type {model_type!r} is not supported: {refused_model_types()[model_type]}")
    if arch is None and model_type and _known_to_transformers(model_type):
        from abliterate.arch.discover import discovered_arch, earlier_discovery

        if len(config) > 1:  # a checkpoint's config: discovery builds its tiny instance from it
            return discovered_arch(config)
        arch = earlier_discovery(model_type)  # a lookup by model_type alone (expert layouts) gets what was found
    if arch is None:
        archs = ", ".join(config.get("architectures") or []) or "none listed"
        raise AbliterateError(
            f"model_type {model_type!r} (architectures: {archs}) is not in abliterate's table of residual-stream "
            "writers; describe the family in a YAML file and pass --arch FILE (see docs/architecture.md, "
            "'Adding a model family'), or pass --targets REGEX naming the tensors that write into the residual stream"
        )
    return arch


def _known_to_transformers(model_type: str) -> bool:
    """Whether transformers has a config class for the type, its own or registered (discovery builds from it)."""
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


@cache
def refused_model_types() -> dict[str, str]:
    """model_type -> why abliterate refuses it (abliterate/arch/refused.yaml): families whose residual writes no
    weight edit removes exactly, or whose residual stream the hooks do not measure."""
    import yaml

    return dict(yaml.safe_load((resources.files("abliterate.arch") / "refused.yaml").read_text()))


def supported_model_types() -> list[str]:
    return sorted(_by_model_type())
