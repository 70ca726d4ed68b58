"""Reading the JSON files users and tools hand us, one way: a file that must hold one JSON object (a model's
config.json, an adapter's adapter_config.json), and record files holding a JSON array of objects or one
object per line (steering pairs, jailbreak wrappers). A broken file is one line naming it and the fix."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from abliterate.errors import AbliterateError


def read_json_object(path: Path, missing: str, fix: str = "") -> dict:
    """The JSON object in `path`; `missing` is the error when there is no such file, `fix` ends the others."""
    if not path.is_file():
        raise AbliterateError(missing)
    suffix = f"; {fix}" if fix else ""
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AbliterateError(f"{path} is not valid JSON ({e}){suffix}") from None
    if not isinstance(data, dict):
        raise AbliterateError(f"{path} is not a JSON object{suffix}")
    return data


def json_records(where: str, text: str, example: str = "") -> Iterator[tuple[str, object]]:
    """(where, item) for each item of a JSON array, or each line of a JSON-lines text (blank lines skipped);
    `example` (a line as it should be) is shown when a line is not JSON."""
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise AbliterateError(f"{where}:{e.lineno}: not valid JSON ({e.msg}); write a JSON array of objects or "
                                  "one JSON object per line") from None
        yield from ((f"{where} item {i}", item) for i, item in enumerate(items, 1))
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{where}:{n}", json.loads(line)
        except json.JSONDecodeError as e:
            raise AbliterateError(f"{where}:{n}: not valid JSON ({e.msg}); write one JSON object per line"
                                  + (f", e.g. {example}" if example else "")) from None
