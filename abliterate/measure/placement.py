"""Where a loaded model's weights live when it does not fit one device: accelerate's big-model dispatch.

`--device-map auto` hands the placement to accelerate through transformers (`device_map`, `max_memory`,
`offload_folder`): layers fill the GPUs, then CPU RAM, then a folder on disk, each within its `--max-memory`
budget, and accelerate's hooks move every offloaded module's weights in for its forward and out again. Our
forward hooks (ablation, steering, residual capture) run around that same forward call, so they see the
module's output as an undispatched model computes it (the tests compare extraction and evaluation on a model
offloaded to disk with the same in memory). The commands set a placement for their block (`placed`);
`load_model` reads it, so every model a command loads (a baseline, a judge) follows it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from abliterate.errors import AbliterateError

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_SIZE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)$", re.I)


@dataclass(frozen=True)
class Placement:
    device_map: str | None = None  # None: the whole model on --device
    max_memory: dict[str | int, str] | None = None  # device (GPU index, "cpu", "mps") -> budget, e.g. "20GiB"
    offload_folder: Path | None = None  # where weights beyond every budget go

    def from_pretrained_kwargs(self) -> dict[str, object]:
        """transformers' from_pretrained arguments for this placement (empty: not dispatched)."""
        if self.device_map is None:
            return {}
        out: dict[str, object] = {"device_map": self.device_map}
        if self.max_memory:
            out["max_memory"] = dict(self.max_memory)
        if self.offload_folder is not None:
            out["offload_folder"] = str(self.offload_folder)
        return out


_CURRENT: ContextVar[Placement | None] = ContextVar("abliterate_placement", default=None)


def current() -> Placement:
    return _CURRENT.get() or Placement()


@contextlib.contextmanager
def placed(placement: Placement) -> Iterator[Placement]:
    """Every model loaded within the block is placed so."""
    token = _CURRENT.set(placement)
    try:
        yield placement
    finally:
        _CURRENT.reset(token)


def from_options(device_map: str | None, max_memory: str | None, offload_folder: str | Path | None) -> Placement:
    """The command line's --device-map, --max-memory and --offload-folder, checked (one line per mistake)."""
    if device_map is None:
        if max_memory or offload_folder:
            raise AbliterateError("--max-memory and --offload-folder place a model across devices: add "
                                  "--device-map auto")
        return Placement()
    if device_map not in DEVICE_MAPS:
        raise AbliterateError(f"--device-map {device_map!r} is not one of {', '.join(DEVICE_MAPS)}")
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise AbliterateError("--device-map needs accelerate: pip install 'abliterate[big]'") from None
    return Placement(device_map, parse_max_memory(max_memory) if max_memory else None,
                     Path(offload_folder) if offload_folder else None)


def parse_max_memory(text: str) -> dict[str | int, str]:
    """'0=20GiB,cpu=60GiB' -> {0: '20GiB', 'cpu': '60GiB'}: a budget per device (GPU index, cpu or mps)."""
    out: dict[str | int, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, size = (x.strip() for x in item.partition("="))
        if not sep or not _SIZE.match(size) or not (key.isdigit() or key in ("cpu", "mps")):
            raise AbliterateError(f"--max-memory {text!r}: give DEVICE=SIZE pairs separated by commas, DEVICE a GPU "
                                  "index, cpu or mps and SIZE like 20GiB or 500MB (e.g. 0=20GiB,cpu=60GiB)")
        out[int(key) if key.isdigit() else key] = size.replace(" ", "")
    if not out:
        raise AbliterateError("--max-memory is empty; give e.g. 0=20GiB,cpu=60GiB")
    return out
