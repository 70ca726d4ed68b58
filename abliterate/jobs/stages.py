"""Wall time and peak memory of each stage of the whole job, printed at its end and recorded in the card.

A stage's peak RSS is its own where Linux lets a process reset its high-water mark (writing 5 to
/proc/self/clear_refs, then reading VmHWM from /proc/self/status); elsewhere it is the process's peak so far
(getrusage), which only grows, and the table says so. Peak GPU memory comes from torch's CUDA allocator,
reset per stage (what torch allocated, not what other processes or the driver hold).
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from abliterate.publish.card import StageRow

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class StageRecord:
    name: str
    seconds: float
    peak_rss: int  # bytes
    peak_gpu: int | None  # bytes torch allocated on CUDA; None without CUDA


@dataclass
class Stages:
    """Records stages as they run: `with stages.stage("extract"): ...`."""

    records: list[StageRecord] = field(default_factory=list)
    per_stage_rss: bool = True  # False: peaks are the process's peak so far (no resettable high-water mark)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.per_stage_rss = _reset_peaks() and self.per_stage_rss
        start = time.perf_counter()
        try:
            yield
        finally:
            self.records.append(StageRecord(name, time.perf_counter() - start, peak_rss(), _peak_gpu()))

    def table(self) -> str:
        """The stages as aligned text lines, and their total time."""
        gpu = any(r.peak_gpu is not None for r in self.records)
        head = f"{'stage':<10} {'wall time':>10} {'peak RSS':>10}" + (f" {'peak GPU':>10}" if gpu else "")
        lines = [head]
        for r in self.records:
            line = f"{r.name:<10} {_duration(r.seconds):>10} {_size(r.peak_rss):>10}"
            lines.append(line + (f" {_size(r.peak_gpu) if r.peak_gpu is not None else '-':>10}" if gpu else ""))
        lines.append(f"{'total':<10} {_duration(sum(r.seconds for r in self.records)):>10}")
        if not self.per_stage_rss:
            lines.append("(peak RSS: the process's peak up to the end of each stage)")
        return "\n".join(lines)

    def card_rows(self) -> tuple[StageRow, ...]:
        """One row per stage for the card: name, wall time, peak RSS (and peak GPU memory)."""
        return tuple(StageRow(r.name, _duration(r.seconds), _size(r.peak_rss),
                              _size(r.peak_gpu) if r.peak_gpu is not None else None) for r in self.records)


def peak_rss() -> int:
    """Peak resident set size in bytes: since the last reset on Linux, else of the whole process."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def _reset_peaks() -> bool:
    """Reset the RSS high-water mark (and CUDA's peak); whether the RSS reset worked."""
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _peak_gpu() -> int | None:
    if "torch" not in sys.modules:
        return None
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes} min {sec:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"
