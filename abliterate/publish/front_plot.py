"""The search front as a picture beside the card: refused prompts against KL, every trial, the chosen point marked.

Two panels. Left: the trials whose refusals were counted (greedy replies), refused validation prompts
against first-token KL, the Pareto front as a step line and the chosen trial as a star. Right: every
trial by what the search measured first, the first-token refusal score against KL (trials dominated
there were never counted, so they appear only here). KL on a log axis when every value is positive.
Needs matplotlib (`pip install 'abliterate[plot]'`); without it nothing is drawn and the caller says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

FRONT_PICTURE = "search_front.png"


@dataclass(frozen=True)
class TrialPoint:
    """One trial of the search as the picture places it."""

    trial: int
    refusals: int | None  # refused validation prompts; None: not counted (dominated at the first token)
    refusal_score: float  # mean first-token refusal log-odds
    kl: float


@dataclass(frozen=True)
class FrontPicture:
    """What the picture shows: the front's (trial, refused, KL), every trial (may be empty), the choice."""

    front: Sequence[tuple[int, int, float]]
    trials: Sequence[TrialPoint]
    chosen: int
    prompts: int  # validation prompts the refusals are counted on (0: unknown)
    total: int  # trials the study ran


def draw_front(s: FrontPicture, path: Path) -> bool:
    """Write the picture to `path` (atomically); False, and nothing written, when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    front = list(s.front)
    counted = [(t.trial, t.refusals, t.kl) for t in s.trials if t.refusals is not None] or front
    scored = list(s.trials)
    fig, axes = plt.subplots(1, 2 if scored else 1, figsize=(11 if scored else 6, 4.2), squeeze=False)
    ax = axes[0][0]
    ax.scatter([kl for _, _, kl in counted], [k for _, k, _ in counted], s=18, color="0.6", label="counted trials")
    line = sorted(front, key=lambda p: p[2])
    ax.step([kl for _, _, kl in line], [k for _, k, _ in line], where="post", color="tab:blue", label="front")
    ax.scatter([kl for _, _, kl in line], [k for _, k, _ in line], s=26, color="tab:blue")
    chosen = [p for p in front if p[0] == s.chosen]
    if chosen:
        _, k, kl = chosen[0]
        ax.scatter([kl], [k], marker="*", s=260, color="tab:red", zorder=5, label=f"chosen (trial {s.chosen})")
        ax.annotate(f"{k}/{s.prompts or '?'} at KL {kl:.4g}", (kl, k), textcoords="offset points", xytext=(8, 8),
                    fontsize="small")
    _kl_axis(ax, [kl for _, _, kl in counted])
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(f"refused validation prompts{f' (of {s.prompts})' if s.prompts else ''}")
    ax.set_title(f"search front: {len(counted)} counted of {s.total} trials", fontsize="medium")
    ax.legend(fontsize="small")
    if scored:
        bx = axes[0][1]
        for was_counted, style in ((False, {"facecolors": "none", "edgecolors": "0.5", "label": "not counted"}),
                                   (True, {"color": "tab:blue", "label": "counted"})):
            pts = [t for t in scored if (t.refusals is not None) == was_counted]
            bx.scatter([t.kl for t in pts], [t.refusal_score for t in pts], s=18, **style)
        mine = [t for t in scored if t.trial == s.chosen]
        if mine:
            bx.scatter([mine[0].kl], [mine[0].refusal_score], marker="*", s=260, color="tab:red", zorder=5,
                       label="chosen")
        _kl_axis(bx, [t.kl for t in scored])
        bx.set_ylabel("first-token refusal score (log-odds)")
        bx.set_title("every trial, first-token scores", fontsize="medium")
        bx.legend(fontsize="small")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True


def _kl_axis(ax, kls: list[float]) -> None:
    if kls and min(kls) > 0:
        ax.set_xscale("log")
    ax.set_xlabel("first-token KL on harmless prompts" + (" (log)" if kls and min(kls) > 0 else ""))
