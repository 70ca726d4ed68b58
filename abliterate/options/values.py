"""Readers of option values written as text: sizes, layer ranges, component lists. One reading each,
shared by the command line and the recipes; a bad value is one clear error."""

from __future__ import annotations

import re

from abliterate.arch.writers import COMPONENTS
from abliterate.errors import AbliterateError

TO_THE_END = 1 << 30  # the stop of an open range "START:"; layers past the model are never planned


def parse_size(value: str | int) -> int:
    """'256MB', '1G', '1048576' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(value).lower())
    if not m:
        raise AbliterateError(f"{value!r} is not a size; write e.g. 256MB or 1GB")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def parse_layer_range(text: str | None) -> range | None:
    """'8:20' (start inclusive, end exclusive), '8:' or ':20', or one layer '12'; None: every layer.
    The one reading of --layers and of a recipe's apply.layers."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d*)\s*(?::\s*(\d*))?\s*", text)
    if not m or (m.group(2) is None and not m.group(1)):
        raise AbliterateError(f"{text!r} is not a layer range; write START:END (END excluded), e.g. 8:20")
    start = int(m.group(1) or 0)
    if m.group(2) is None:
        return range(start, start + 1)
    layers = range(start, int(m.group(2)) if m.group(2) else TO_THE_END)
    if not layers:
        raise AbliterateError(f"{text!r} selects no layer (END is excluded); write START:END with START < END")
    return layers


def checked_layers(text: str | None) -> str | None:
    """--layers kept as written (recipes record the text), once it reads as a range."""
    parse_layer_range(text)
    return text


def parse_components(value: str | tuple[str, ...]) -> tuple[str, ...]:
    """'embed,attn' (or a tuple of names) -> the components, each one of the table's."""
    parts = value if isinstance(value, tuple) else tuple(p.strip() for p in value.split(",") if p.strip())
    bad = [p for p in parts if p not in COMPONENTS]
    if bad or not parts:
        raise AbliterateError(f"{','.join(parts) if isinstance(value, tuple) else value!r}: choose from "
                              f"{','.join(COMPONENTS)}")
    return parts


def parse_batch_size(value: str | int) -> int:
    """--batch-size: a positive number of prompts, or 'auto' (read as 0, which also reads back as auto: the
    largest that fits on CUDA, found by halving on out-of-memory and cached per model; a fixed default on CPU)."""
    if str(value).strip().lower() in ("auto", "0"):
        return 0
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = -1
    if size < 1:
        raise AbliterateError(f"--batch-size {value!r}: give a positive number of prompts or auto")
    return size


def parse_coeffs(value: str | tuple[float, ...]) -> tuple[float, ...]:
    """'-2,-1,0,1,2' -> the multipliers, at least one (steer sweep --coeffs)."""
    if isinstance(value, tuple):
        return value
    try:
        coeffs = tuple(float(c) for c in value.split(",") if c.strip())
    except ValueError:
        raise AbliterateError(f"{value!r}: write comma-separated numbers, e.g. -2,-1,0,1,2") from None
    if not coeffs:
        raise AbliterateError("give at least one coefficient, e.g. -2,-1,0,1,2")
    return coeffs
