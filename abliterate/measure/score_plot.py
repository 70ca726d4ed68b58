"""Extraction's candidates as a picture: every candidate's score on a layer x position heat map (`extract --plot`).

The colour is the refusal log-odds on harmful validation prompts with the candidate ablated (lower:
the direction removes more refusal), as screening measured it; candidates never screened (pruned
layers) are blank. Finalists scored in full are circled, those the filters rejected crossed, and the
chosen candidate is starred, so a reader sees where in the model the refusal direction lives and how
sharply the choice stands out. Needs matplotlib; without it nothing is drawn and the caller says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from abliterate.measure.selection import CandidateScore


def score_grid(scores: Sequence[CandidateScore]) -> tuple[list[int], list[int], list[list[float]]]:
    """(layers, positions, grid[layer row][position column]) of the ablated refusal scores; NaN where unscreened."""
    layers = list(range(min(s.layer for s in scores), max(s.layer for s in scores) + 1))
    positions = list(range(min(s.position for s in scores), max(s.position for s in scores) + 1))
    grid = [[math.nan] * len(positions) for _ in layers]
    for s in scores:
        grid[s.layer - layers[0]][s.position - positions[0]] = s.refusal_ablated
    return layers, positions, grid


def draw_scores(scores: Sequence[CandidateScore], chosen: tuple[int, int] | None, path: Path,
                title: str = "") -> bool:
    """The heat map as a PNG at `path` (written atomically); False, and nothing written, without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return False
    layers, positions, grid = score_grid(scores)
    values = np.ma.masked_invalid(np.array(grid, dtype=float))
    fig, ax = plt.subplots(figsize=(max(6.5, 3.5 + 0.6 * len(positions)), max(4.5, 1.5 + 0.22 * len(layers))))
    image = ax.imshow(values, aspect="auto", origin="lower", cmap="viridis",
                      extent=(positions[0] - 0.5, positions[-1] + 0.5, layers[0] - 0.5, layers[-1] + 0.5))
    fig.colorbar(image, ax=ax, label="refusal log-odds with it ablated (lower: better)")
    full = [s for s in scores if s.full]
    for rejected, style in ((False, {"facecolors": "none", "edgecolors": "white", "label": "scored in full"}),
                            (True, {"marker": "x", "color": "white", "label": "rejected by the filters"})):
        pts = [s for s in full if (s.rejected is not None) == rejected]
        if pts:
            ax.scatter([s.position for s in pts], [s.layer for s in pts], s=40, **style)
    if chosen is not None:
        ax.scatter([chosen[1]], [chosen[0]], marker="*", s=260, color="tab:red", edgecolors="white",
                   label=f"chosen: layer {chosen[0]}, position {chosen[1]}")
    ax.set_xticks(positions)
    ax.set_xlabel("post-instruction position (-1: last before the reply)")
    ax.set_ylabel("layer (stream entering it)")
    ax.set_title(title or f"{len(scores)} candidates", fontsize="medium")
    ax.legend(fontsize="small", loc="upper left", framealpha=0.8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True
