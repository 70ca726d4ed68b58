"""Parse prompt files (.txt, .json, .jsonl, .csv, .tsv, .parquet) and Hub datasets into lists of records.

Each format is one small function returning the file's records; ``LOADERS`` maps a file suffix to it, so adding a
format is one function and one dict entry. Records are either plain strings or dicts (rows); choosing the
text column, stripping and filtering happen once in :func:`rows_to_prompts`, so every format behaves the same way.
Errors are :class:`PromptError` with one line that names the file, the problem and the fix.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from abliterate.errors import AbliterateError

#: Column names tried, in this order, when the caller gives no ``field``.
COMMON_FIELDS: tuple[str, ...] = ("prompt", "instruction", "goal", "text", "question")

Record = str | Mapping[str, Any]


class PromptError(AbliterateError, ValueError):
    """A prompt source cannot be used; the message is one line naming the problem and the fix.

    Subclasses AbliterateError so the CLI prints it without a traceback, and ValueError so library callers
    can catch it as the bad-input error it is.
    """

    def __init__(self, message: str) -> None:
        # Keep the promise of one line even when an underlying library message spans several.
        super().__init__(" ".join(message.split()))


# --------------------------------------------------------------------------- field selection


def pick_field(columns: Sequence[str], field: str | None, where: str, *, ambiguous: str = "error") -> str:
    """Return the column that holds the prompts.

    An explicit ``field`` must exist (exact name, else a unique case-insensitive match). Without one, the columns
    are matched case-insensitively against :data:`COMMON_FIELDS`; ``ambiguous="error"`` refuses to guess when
    several match (local files: the user can always pass ``--field``), ``ambiguous="first"`` takes the earliest
    name in COMMON_FIELDS (Hub datasets, whose schemas are fixed and well known).
    """
    found = ", ".join(repr(c) for c in columns) or "none"
    if field is not None:
        if field in columns:
            return field
        folded = [c for c in columns if c.lower() == field.lower()]
        if len(folded) == 1:
            return folded[0]
        raise PromptError(f"{where}: no field {field!r}; fields found: {found}. Pass --field with one of them.")
    lower = {c.lower(): c for c in columns}
    matches = [lower[name] for name in COMMON_FIELDS if name in lower]
    if len(matches) == 1 or (matches and ambiguous == "first"):
        return matches[0]
    if not matches:
        raise PromptError(
            f"{where}: none of the usual prompt fields ({', '.join(COMMON_FIELDS)}) found; fields found: {found}. "
            "Pass --field NAME to choose one."
        )
    raise PromptError(
        f"{where}: several possible prompt fields ({', '.join(repr(m) for m in matches)}); fields found: {found}. "
        "Pass --field NAME to choose one."
    )


def _columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Union of keys in first-seen order, so sparse rows still show every field in error messages."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def rows_to_prompts(records: Sequence[Record], field: str | None, where: str) -> list[str]:
    """Turn parsed records into stripped prompt strings, skipping blank ones; duplicates are kept on purpose.

    Duplicates are kept because the caller's file is the caller's decision (a repeated prompt is a weight, not
    necessarily a mistake); blank entries are dropped because an empty prompt carries no signal.
    """
    if not records:
        return []
    if all(isinstance(r, str) for r in records):
        return [s for s in (r.strip() for r in records) if s]  # type: ignore[union-attr]
    if not all(isinstance(r, Mapping) for r in records):
        kinds = sorted({type(r).__name__ for r in records})
        raise PromptError(
            f"{where}: entries must be all strings or all objects, found {', '.join(kinds)}. "
            "Make every entry a string or an object with a prompt field."
        )
    rows: Sequence[Mapping[str, Any]] = records  # type: ignore[assignment]
    column = pick_field(_columns(rows), field, where)
    out: list[str] = []
    for i, row in enumerate(rows, 1):
        value = row.get(column)
        if value is None:
            continue  # a row without this field (or with null) is a blank prompt
        if not isinstance(value, str):
            raise PromptError(
                f"{where}: entry {i} has a {type(value).__name__} in field {column!r}, expected text. "
                "Fix that entry or pass --field naming a text field."
            )
        if value.strip():
            out.append(value.strip())
    return out


# --------------------------------------------------------------------------- one function per format


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: tolerate the BOM that spreadsheet exports add
    except UnicodeDecodeError as e:
        raise PromptError(f"{path}: not valid UTF-8 text (byte {e.start}). Save the file as UTF-8.") from None
    except OSError as e:
        raise PromptError(f"{path}: cannot read file ({e.strerror or e}). Check its permissions.") from None


def load_txt(path: Path, field: str | None) -> list[Record]:
    """One prompt per line; blank lines are skipped (``field`` does not apply to plain text)."""
    return _read_text(path).splitlines()


def load_json(path: Path, field: str | None) -> list[Record]:
    """A list of strings or of objects, or an object holding exactly one such list (or the one ``field`` names)."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise PromptError(
            f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}. Fix the file."
        ) from None
    if isinstance(data, dict):
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if field is not None and field in lists and all(isinstance(x, str) for x in lists[field]):
            return lists[field]  # --field named the key holding a list of strings
        if len(lists) != 1:
            keys = ", ".join(repr(k) for k in data) or "none"
            what = "no list" if not lists else f"several lists ({', '.join(repr(k) for k in lists)})"
            raise PromptError(
                f"{path}: a JSON object with {what} under its keys (keys found: {keys}). "
                "Use a top-level list, or pass --field naming the key that holds a list of strings."
            )
        data = next(iter(lists.values()))
    if not isinstance(data, list):
        raise PromptError(
            f"{path}: top-level JSON is a {type(data).__name__}, expected a list of prompts. "
            'Write a list such as ["first prompt", "second prompt"].'
        )
    return data


def load_jsonl(path: Path, field: str | None) -> list[Record]:
    """One JSON string or object per line; blank lines are skipped, a bad line is reported by its number."""
    records: list[Record] = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise PromptError(
                f"{path}: invalid JSON on line {n}: {e.msg}. Fix that line (one JSON value per line)."
            ) from None
    return records


def _load_delimited(path: Path, delimiter: str) -> list[Record]:
    text = _read_text(path)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        rows = [{k: v for k, v in row.items() if k is not None} for row in reader]
    except csv.Error as e:
        raise PromptError(f"{path}: malformed {'CSV' if delimiter == ',' else 'TSV'} ({e}). Fix the file.") from None
    return rows  # a header-only file yields no rows, reported by the caller as "no prompts"


def load_csv(path: Path, field: str | None) -> list[Record]:
    """Comma-separated with a header row (stdlib csv; quoted fields may contain commas and newlines)."""
    return _load_delimited(path, ",")


def load_tsv(path: Path, field: str | None) -> list[Record]:
    """Tab-separated with a header row."""
    return _load_delimited(path, "\t")


def load_parquet(path: Path, field: str | None) -> list[Record]:
    """A Parquet table; needs the optional ``pyarrow`` package, imported only here."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PromptError(
            f"{path}: reading .parquet needs pyarrow, which is not installed. Run: pip install pyarrow"
        ) from None
    try:
        columns = list(pq.read_schema(path).names)
        column = pick_field(columns, field, str(path))
        values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    except PromptError:
        raise
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise PromptError(f"{path}: cannot read Parquet ({type(e).__name__}: {e}). Check the file.") from None
    return [{column: v} for v in values]


#: Suffix (lower case) -> parser. Dispatch is by this table, never an if-chain.
LOADERS: dict[str, Callable[[Path, str | None], list[Record]]] = {
    ".txt": load_txt,
    ".json": load_json,
    ".jsonl": load_jsonl,
    ".csv": load_csv,
    ".tsv": load_tsv,
    ".parquet": load_parquet,
}


def filter_split(records: Sequence[Record], split: str, where: str) -> list[Record]:
    """Keep the rows whose ``split`` field equals ``split`` (files in the built-in sets' own format)."""
    if not records or not all(isinstance(r, Mapping) and "split" in r for r in records):
        raise PromptError(
            f"{where}: split {split!r} requested, but the entries have no 'split' field. "
            "Use split 'all', or add a split field (train/val/test) to every entry."
        )
    kept = [r for r in records if r["split"] == split]  # type: ignore[index]
    if not kept:
        found = ", ".join(sorted({str(r["split"]) for r in records}))  # type: ignore[index]
        raise PromptError(f"{where}: no entries in split {split!r}; splits found: {found}. Choose one of those.")
    return kept


def file_categories(path: Path, field: str | None) -> dict[str, str]:
    """prompt -> the `category` of its entry, for a structured file whose entries carry one ({} otherwise: plain
    text, or no such field); prompts as `load_file` strips them, the first entry winning for a repeated one."""
    loader = LOADERS.get(path.suffix.lower())
    if loader is None or not path.is_file() or path.stat().st_size == 0:
        return {}
    rows = [r for r in loader(path, field) if isinstance(r, Mapping)]
    if not any(r.get("category") not in (None, "") for r in rows):
        return {}
    column = pick_field(_columns(rows), field, str(path))
    out: dict[str, str] = {}
    for row in rows:
        prompt, category = row.get(column), row.get("category")
        if isinstance(prompt, str) and prompt.strip() and category not in (None, ""):
            out.setdefault(prompt.strip(), str(category))
    return out


def load_file(path: Path, field: str | None, split: str | None = None) -> list[str]:
    """Read prompts from a local file, choosing the parser by suffix; ``split`` filters on a 'split' field."""
    loader = LOADERS.get(path.suffix.lower())
    if loader is None:  # checked first: naming the supported formats helps even before the file exists
        raise PromptError(
            f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; "
            f"supported: {', '.join(LOADERS)}, builtin:NAME, hf:OWNER/NAME."
        )
    if not path.exists():
        raise PromptError(f"{path}: file not found. Check the path, or use builtin:harmful / builtin:harmless.")
    if path.is_dir():
        raise PromptError(f"{path}: is a directory, expected a prompt file ({', '.join(LOADERS)}).")
    if path.stat().st_size == 0:
        raise PromptError(f"{path}: file is empty. Put at least one prompt in it.")
    records = loader(path, field)
    if split is not None:
        records = filter_split(records, split, str(path))
    return rows_to_prompts(records, field, str(path))


# --------------------------------------------------------------------------- Hugging Face Hub datasets


def parse_hf(spec: str) -> tuple[str, str | None, str | None]:
    """Split ``OWNER/NAME[:SPLIT]`` or ``OWNER/NAME:CONFIG:SPLIT`` into (repo, config, split)."""
    parts = spec.split(":")
    repo = parts[0]
    if repo.count("/") != 1 or not all(repo.split("/")) or len(parts) > 3 or not all(parts):
        raise PromptError(
            f"hf:{spec}: not a dataset reference. "
            "Write hf:OWNER/NAME, hf:OWNER/NAME:SPLIT or hf:OWNER/NAME:CONFIG:SPLIT."
        )
    if len(parts) == 3:
        return repo, parts[1], parts[2]
    return repo, None, parts[1] if len(parts) == 2 else None


def load_hf(spec: str, field: str | None, split: str | None) -> list[str]:
    """Load a Hub dataset with the optional ``datasets`` package (imported lazily: most users never need it).

    ``split`` (the caller's, passed through as the Hub split name) must agree with one written in the spec. With
    neither, a dataset with a single split uses it and one with several is refused (listing them) rather than
    silently mixing train and test prompts.
    """
    repo, config, spec_split = parse_hf(spec)
    where = f"hf:{spec}"
    if spec_split and split and spec_split != split:
        raise PromptError(f"{where}: names split {spec_split!r} but split {split!r} was also requested. Give only one.")
    try:
        import datasets
    except ImportError:
        raise PromptError(
            f"{where}: loading Hub datasets needs the datasets package. Run: pip install datasets"
        ) from None
    chosen = spec_split or split
    try:
        ds = datasets.load_dataset(repo, config, split=chosen)
    except Exception as e:  # network, missing repo, gated access, bad split: all reported the same way
        first = (str(e).strip().splitlines() or [""])[0]
        raise PromptError(
            f"{where}: could not load dataset ({type(e).__name__}: {first}). Check the name, split and access."
        ) from None
    if isinstance(ds, Mapping):  # a DatasetDict: no split was named
        names = list(ds)
        if len(names) != 1:
            example = names[0] if names else "train"
            raise PromptError(f"{where}: dataset has splits {', '.join(names)}; add one, e.g. hf:{spec}:{example}.")
        ds = ds[names[0]]
    columns = list(ds.column_names)
    column = pick_field(columns, field, where, ambiguous="first")
    return rows_to_prompts([{column: v} for v in ds[column]], column, where)
