"""The edit manifest (abliterate.json beside edited weights or an adapter, OUT.abliterate.json beside an edited
GGUF): what an edit did, precisely enough for `verify` to re-check it. Written by `apply` and the adapter
export, passed on by `merge`, read by `verify` as a typed record: a file missing a key `verify` needs is one
clear error, not a silently different check."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abliterate import __version__
from abliterate.errors import AbliterateError

MANIFEST_NAME = "abliterate.json"
_OWN_KEYS = ("tool", "version", "command", "source", "norm_preserve", "direction", "untie", "config_updates", "edits",
             "notes", "max_memory")


@dataclass(frozen=True)
class ManifestEdit:
    """One edited tensor: W' = W - scale r r^T W along `hidden_axis`, r the direction row of `layer`."""

    scale: float
    layer: int | None  # None: the embedding's row
    hidden_axis: int
    component: str
    type: str | None = None  # GGUF: the tensor's type in the input (a quantisation or float type)
    written_type: str | None = None  # GGUF: the type written (the input's, or --requant's)

    def to_json(self) -> dict[str, Any]:
        gguf = {"type": self.type, "written_type": self.written_type} if self.type is not None else {}
        return {"scale": self.scale, "layer": self.layer, "hidden_axis": self.hidden_axis,
                "component": self.component, **gguf}


@dataclass(frozen=True)
class EditManifest:
    source: str  # the input folder
    command: str  # the command that made the edit
    edits: dict[str, ManifestEdit]
    direction: dict[str, Any] = field(default_factory=dict)  # file, metadata, per_layer, rank
    norm_preserve: bool = False
    untie: tuple[str, str] | None = None  # (output embedding written, the embedding it copies)
    config_updates: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    max_memory: int | None = None  # the chunk budget of the edit: verify reuses it (the same float32 summation)
    extra: dict[str, Any] = field(default_factory=dict)  # other sections: the adapter's settings, a merged adapter
    tool: str = "abliterate"
    version: str = __version__

    def to_json(self) -> dict[str, Any]:
        return {"tool": self.tool, "version": self.version, "command": self.command, "source": self.source,
                "norm_preserve": self.norm_preserve, "direction": self.direction,
                "untie": {"output": self.untie[0], "copied_from": self.untie[1]} if self.untie else None,
                "config_updates": self.config_updates,
                "edits": {name: e.to_json() for name, e in self.edits.items()},
                "notes": list(self.notes), **({"max_memory": self.max_memory} if self.max_memory else {}),
                **self.extra}

    def write(self, folder: Path) -> None:
        self.write_file(folder / MANIFEST_NAME)

    def write_file(self, path: Path) -> None:
        """The manifest as `path`, written under a temporary name and renamed (never half a file)."""
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def from_json(cls, data: Any, path: Path) -> EditManifest:
        """The record, checked: `edits` (each with scale, layer, hidden_axis) and `source` are required."""
        bad = f"{path} is not an abliterate edit manifest"
        if not isinstance(data, dict) or not isinstance(data.get("edits"), dict) or "source" not in data:
            raise AbliterateError(f"{bad} (it needs `source` and `edits`); re-run the edit, or verify with the "
                                  "edit's options instead of the manifest")
        edits = {}
        for name, e in data["edits"].items():
            if not isinstance(e, dict) or not {"scale", "layer", "hidden_axis"} <= set(e):
                raise AbliterateError(f"{bad}: edits.{name} needs scale, layer and hidden_axis")
            edits[name] = ManifestEdit(float(e["scale"]), e["layer"], int(e["hidden_axis"]), str(e.get("component")),
                                       e.get("type"), e.get("written_type"))
        untie = data.get("untie")
        if untie is not None and not (isinstance(untie, dict) and {"output", "copied_from"} <= set(untie)):
            raise AbliterateError(f"{bad}: untie needs output and copied_from")
        return cls(source=str(data["source"]), command=str(data.get("command", "")), edits=edits,
                   direction=dict(data.get("direction") or {}), norm_preserve=bool(data.get("norm_preserve", False)),
                   untie=(untie["output"], untie["copied_from"]) if untie else None,
                   config_updates=dict(data.get("config_updates") or {}), notes=tuple(data.get("notes") or ()),
                   max_memory=data.get("max_memory"), extra={k: v for k, v in data.items() if k not in _OWN_KEYS},
                   tool=str(data.get("tool", "abliterate")), version=str(data.get("version", "")))


def read_manifest(folder: Path) -> EditManifest | None:
    """The manifest in `folder`, or None when there is none."""
    return read_manifest_file(Path(folder) / MANIFEST_NAME)


def read_manifest_file(path: Path, upgrade: Callable[[Any], Any] | None = None) -> EditManifest | None:
    """The manifest at `path`, or None when there is none (`upgrade`: turns an older writer's JSON into this
    record's, before it is checked)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AbliterateError(f"{path} is not valid JSON ({e}); re-run the edit") from None
    return EditManifest.from_json(upgrade(data) if upgrade else data, path)
