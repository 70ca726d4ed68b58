"""Jailbreak vectors: per class, the mean residual on wrapped harmful prompts minus on the same prompts unwrapped.

Measured at the post-instruction positions (what the chat template adds after the user's message,
where the model decides whether to refuse) and averaged over them, at every residual stream. The
file is a direction/steering file: ``direction`` [layers + 1, d] is the mean of the class vectors
(row L + 1: after decoder layer L, as `steer vectors` writes), ``vector.CLASS`` each class's, none
normalised, so `steer chat --coeff -1` subtracts the measured shift. Vectors of different classes
being similar is what the research (Ball et al. 2024) reports as a shared jailbreak mechanism;
`cosine_matrix` measures it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from abliterate.io.direction_file import save_direction
from abliterate.jailbreak.wrappers import Wrapper, by_class, wrapped
from abliterate.measure.activations import format_prompts, mean_residuals
from abliterate.measure.loading import LoadedModel
from abliterate.measure.probe import VECTOR_PREFIX, post_positions

KIND = "jailbreak"


def jailbreak_vectors(lm: LoadedModel, harmful: Sequence[str], wrappers: Sequence[Wrapper], *,
                      template: str | None = None, batch_size: int = 16, quiet: bool = False,
                      **template_kwargs) -> dict[str, torch.Tensor]:
    """{class: [num_layers + 1, d]} wrapped-minus-plain mean residual over the post-instruction positions."""
    groups = by_class(wrappers)
    plain = format_prompts(lm, harmful, template, **template_kwargs)
    every = plain + format_prompts(lm, wrapped(harmful, wrappers), template, **template_kwargs)
    k = post_positions(lm, every, template, **template_kwargs)
    base = mean_residuals(lm, plain, k, batch_size=batch_size, desc="plain", quiet=quiet).mean(dim=1)
    out = {}
    for cls, members in groups.items():
        prompts = format_prompts(lm, wrapped(harmful, members), template, **template_kwargs)
        out[cls] = mean_residuals(lm, prompts, k, batch_size=batch_size, desc=cls, quiet=quiet).mean(dim=1) - base
    return out


def cosine_matrix(vectors: dict[str, torch.Tensor], row: int) -> np.ndarray:
    """[classes, classes] cosine similarity of the class vectors at one residual-stream row."""
    stacked = torch.stack([v[row].double() for v in vectors.values()])
    unit = stacked / stacked.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return (unit @ unit.T).numpy()


def random_cosine(dim: int) -> float:
    """The expected |cosine| of two random directions in `dim` dimensions, the chance level to compare with."""
    return math.sqrt(2 / (math.pi * dim))


def format_matrix(names: Sequence[str], matrix: np.ndarray) -> str:
    width = max(6, *(len(n) for n in names))
    lines = [" " * width + "".join(f" {n[:width]:>{width}}" for n in names)]
    for name, row in zip(names, matrix, strict=True):
        lines.append(f"{name:>{width}}" + "".join(f" {v:>{width}.3f}" for v in row))
    return "\n".join(lines)


def save_jailbreak_vectors(path: str | Path, vectors: dict[str, torch.Tensor], lm: LoadedModel,
                           metadata: dict[str, object]) -> None:
    shared = torch.stack(list(vectors.values())).mean(dim=0)
    extra = {VECTOR_PREFIX + cls: v for cls, v in vectors.items()}
    save_direction(path, shared, {"model": lm.name, "kind": KIND, "classes": json.dumps(list(vectors)),
                                  "num_layers": lm.num_layers, **metadata}, extra=extra)


def plot_matrix(names: Sequence[str], matrix: np.ndarray, path: Path, layer: int) -> bool:
    """The cosine matrix as a heat map PNG; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.0 * len(names) + 1.5))
    image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="small")
    ax.set_title(f"jailbreak vectors, cosine after layer {layer}")
    fig.colorbar(image)
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True
