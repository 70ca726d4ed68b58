"""Jailbreak wrappers: templates with a ``{prompt}`` slot, grouped in classes (role play, prefix injection...).

A wrapper turns a harmful request into a jailbreak attempt of its class. The built-in set
(``builtin:jailbreaks``, data/jailbreaks.jsonl) was written for this project, three wrappers in each
of six classes: role_play, refusal_suppression, prefix_injection, style_injection, hypothetical,
payload_splitting. Users pass their own file: JSONL or a JSON array of objects, either one wrapper
per object (``{"class": ..., "template": ...}``) or one class per object (``{"class": ...,
"templates": [...]}``). The slot is replaced literally, so other braces in a template are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from abliterate.errors import AbliterateError
from abliterate.io.json_files import json_records

SLOT = "{prompt}"
BUILTIN = "builtin:jailbreaks"


@dataclass(frozen=True)
class Wrapper:
    cls: str
    template: str

    def wrap(self, prompt: str) -> str:
        return self.template.replace(SLOT, prompt)


def _check(where: str, cls: object, template: object) -> Wrapper:
    if not isinstance(cls, str) or not cls.strip():
        raise AbliterateError(f"{where}: the wrapper has no class; give each wrapper a non-empty \"class\"")
    if not isinstance(template, str) or SLOT not in template:
        raise AbliterateError(f"{where}: the template of class {cls!r} has no {SLOT} slot; write {SLOT} where the "
                              "request goes")
    return Wrapper(cls.strip(), template)


def parse_wrappers(where: str, text: str) -> list[Wrapper]:
    wrappers: list[Wrapper] = []
    for at, item in json_records(where, text, example='{"class": "role_play", "template": "... {prompt} ..."}'):
        if not isinstance(item, dict) or "class" not in item or not ("template" in item or "templates" in item):
            raise AbliterateError(f"{at}: expected an object with \"class\" and \"template\" (or \"templates\", a "
                                  "list)")
        if "templates" in item:
            templates = item["templates"]
            if not isinstance(templates, list) or not templates:
                raise AbliterateError(f"{at}: class {item['class']!r} is empty; give it at least one template")
            wrappers += [_check(at, item["class"], t) for t in templates]
        else:
            wrappers.append(_check(at, item["class"], item["template"]))
    if not wrappers:
        raise AbliterateError(f"{where} has no wrappers; write one JSON object per line with class and template")
    return wrappers


def load_wrappers(source: str | Path, classes: Sequence[str] | None = None) -> list[Wrapper]:
    """Built-in or file wrappers, optionally only the named classes (each must have at least one wrapper)."""
    text_source = str(source)
    if text_source == BUILTIN:
        text = (resources.files(__package__) / "data" / "jailbreaks.jsonl").read_text(encoding="utf-8")
    elif text_source.startswith("builtin:"):
        raise AbliterateError(f"unknown built-in wrapper set {text_source!r}; use {BUILTIN} or a JSONL file")
    else:
        path = Path(source)
        if not path.is_file():
            raise AbliterateError(f"wrappers file {path} does not exist; pass {BUILTIN} or a JSONL file of "
                                  "{\"class\": ..., \"template\": \"... {prompt} ...\"} objects")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise AbliterateError(f"wrappers file {path} is not UTF-8 text") from None
    wrappers = parse_wrappers(text_source, text)
    if classes:
        known = class_names(wrappers)
        empty = [c for c in classes if c not in known]
        if empty:
            raise AbliterateError(f"class {empty[0]!r} has no wrapper in {text_source}; its classes are "
                                  f"{', '.join(known)}")
        wrappers = [w for w in wrappers if w.cls in classes]
    return wrappers


def class_names(wrappers: Sequence[Wrapper]) -> list[str]:
    """Classes in the order they first appear."""
    return list(dict.fromkeys(w.cls for w in wrappers))


def by_class(wrappers: Sequence[Wrapper]) -> dict[str, list[Wrapper]]:
    return {c: [w for w in wrappers if w.cls == c] for c in class_names(wrappers)}


def wrapped(prompts: Sequence[str], wrappers: Sequence[Wrapper]) -> list[str]:
    """Every prompt in every wrapper, prompt-major (prompt 0 in each wrapper, then prompt 1...)."""
    return [w.wrap(p) for p in prompts for w in wrappers]
