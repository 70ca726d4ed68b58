"""Prompt sets for finding and checking the refusal direction, and loaders for the user's own prompts.

Built-in sets, written for this project (not copied from published benchmarks) and shipped as package data:

* ``harmful``: requests a safety-tuned chat model refuses, 16 categories, each split 60/20/20 into train/val/test.
* ``harmless``: benign requests in the same imperative forms and lengths, so the difference between the two sets'
  activations is mostly harmfulness rather than style; same splits.
* ``overrefusal``: safe prompts that only look dangerous ("kill a Python process"), with the trigger word, for
  checking that an edit does not teach the model to refuse on keywords. No splits (evaluation only).
* :func:`general_text`: neutral encyclopedic prose for measuring language-model loss before and after an edit.

Splits are fixed in the data files (assigned per category by a hash of the prompt), so a direction fitted on
``train`` is never evaluated on the same prompts, and results are reproducible across installs.

:func:`load_prompts` reads ``builtin:NAME[:SPLIT]``, ``hf:OWNER/NAME[:SPLIT]``, or a ``.txt``/``.json``/``.jsonl``/
``.csv``/``.tsv``/``.parquet`` file. Prompts are stripped of surrounding whitespace and blank ones dropped;
duplicates are kept (the user's file is taken as written, and order is preserved).
"""

from __future__ import annotations

import functools
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

from abliterate.prompts.loaders import LOADERS, PromptError, file_categories, load_file, load_hf

__all__ = ["BUILTIN_NAMES", "SPLITS", "BuiltinName", "Split", "builtin", "builtin_records", "general_text",
           "load_prompts", "prompt_categories", "supported_suffixes"]

Split = Literal["train", "val", "test", "all"]
BuiltinName = Literal["harmful", "harmless", "overrefusal"]
SPLITS: tuple[str, ...] = get_args(Split)
BUILTIN_NAMES: tuple[str, ...] = get_args(BuiltinName)
_UNSPLIT = frozenset({"overrefusal"})  # evaluation-only sets without train/val/test


def _data(filename: str) -> str:
    """Read a data file through importlib.resources, so it works from a wheel or zip as well as a checkout."""
    return (resources.files(__package__) / "data" / filename).read_text(encoding="utf-8")


def _check_name(name: str) -> str:
    if name not in BUILTIN_NAMES:
        raise PromptError(f"unknown built-in prompt set {name!r}; choose one of: {', '.join(BUILTIN_NAMES)}.")
    return name


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise PromptError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}.")
    return split


@functools.cache
def _records(name: str) -> tuple[dict[str, Any], ...]:
    """Parse a built-in JSONL set once per process; callers get copies, so the cache cannot be mutated."""
    return tuple(json.loads(line) for line in _data(f"{name}.jsonl").splitlines() if line.strip())


def builtin_records(name: BuiltinName) -> list[dict[str, Any]]:
    """All records of a built-in set with their metadata (``category``, and ``split`` or ``trigger``)."""
    return [dict(r) for r in _records(_check_name(name))]


def builtin(name: BuiltinName, split: Split = "all") -> list[str]:
    """The prompts of a built-in set, optionally one split of it, categories interleaved: the files are grouped
    by category, and extraction and `--limit` take a prefix, which must cover every category, not the first few."""
    _check_name(name)
    _check_split(split)
    if split != "all" and name in _UNSPLIT:
        raise PromptError(f"builtin:{name} has no train/val/test splits (it is for evaluation); use split 'all'.")
    return _interleaved([r for r in _records(name) if split == "all" or r["split"] == split])


def _interleaved(records: list[dict[str, Any]]) -> list[str]:
    """Round-robin over the categories in the order they first appear, each category's prompts in file order."""
    by_category: dict[Any, list[str]] = {}
    for r in records:
        by_category.setdefault(r.get("category"), []).append(r["prompt"])
    queues = list(by_category.values())
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


@functools.cache
def general_text() -> str:
    """About 4,500 words of neutral encyclopedic prose, for measuring how much an edit changes language modelling."""
    return _data("general_text.txt")


def supported_suffixes() -> tuple[str, ...]:
    """File suffixes :func:`load_prompts` understands (for CLI help and error messages)."""
    return tuple(LOADERS)


def _merge_split(where: str, in_source: str | None, argument: str) -> str:
    """One split from ``NAME:SPLIT`` and the ``split`` argument; refusing a conflict beats silently picking one."""
    if in_source is None:
        return argument
    _check_split(in_source)
    if argument not in ("all", in_source):
        raise PromptError(
            f"{where} names split {in_source!r} but split {argument!r} was also requested; give only one."
        )
    return in_source


def load_prompts(
    source: str | os.PathLike[str],
    *,
    field: str | None = None,
    split: Split = "all",
    min_count: int = 1,
) -> list[str]:
    """Load prompts from a built-in set, a Hub dataset, or a local file, and insist on at least ``min_count``.

    ``source`` is ``builtin:NAME[:SPLIT]``, ``hf:OWNER/NAME[:SPLIT]`` (or ``hf:OWNER/NAME:CONFIG:SPLIT``), or a path.
    ``field`` names the column/key holding the prompts in structured files; without it one of
    :data:`COMMON_FIELDS` is used if exactly one is present (for Hub datasets, the first present). ``split`` selects
    a built-in split, filters files whose entries carry a ``split`` field, or names the Hub split. Whitespace is
    stripped and blank prompts dropped; duplicates are kept. Every failure is a one-line :class:`PromptError`.
    """
    _check_split(split)
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    text = os.fspath(source)
    if text.startswith("builtin:"):
        where = text
        name, _, in_source = text.removeprefix("builtin:").partition(":")
        prompts = builtin(_check_name(name), _merge_split(where, in_source or None, split))  # type: ignore[arg-type]
    elif text.startswith("hf:"):
        where = text
        prompts = load_hf(text.removeprefix("hf:"), field, None if split == "all" else split)
    else:
        where = text
        prompts = load_file(Path(text), field, None if split == "all" else split)
    if not prompts:
        raise PromptError(f"{where}: contains no prompts (only blank entries). Add at least {min_count}.")
    if len(prompts) < min_count:
        raise PromptError(f"{where}: found {len(prompts)} prompts, need at least {min_count}. Add more prompts.")
    return prompts


def prompt_categories(source: str | os.PathLike[str], *, field: str | None = None) -> dict[str, str]:
    """prompt -> category, for sources that label their prompts: the built-in sets (``category``) and local
    .json/.jsonl/.csv/.tsv/.parquet files whose entries have a ``category`` field; {} for others (plain text, Hub
    datasets). Used by ``extract --proposals categories``."""
    text = os.fspath(source)
    if text.startswith("builtin:"):
        name = text.removeprefix("builtin:").partition(":")[0]
        return {r["prompt"].strip(): str(r["category"]) for r in reversed(_records(_check_name(name)))
                if r.get("category")}
    if text.startswith("hf:"):
        return {}
    return file_categories(Path(text), field)
