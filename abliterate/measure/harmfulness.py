"""The harmfulness direction: harmful minus harmless mean residual at the instruction's last token.

Refusal is read at the post-instruction tokens (where the model decides how to answer); whether a
request is harmful is already encoded at the last token of the request itself, before the chat
template's suffix (Zhao et al. 2025, "LLMs Encode Harmfulness and Refusal Separately"). The two
directions differ, and how much is worth knowing per layer: the file records the cosine similarity
to the refusal direction (the same difference at the last post-instruction token) for every layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from abliterate import __version__
from abliterate.io.direction_file import check_output_file, save_direction
from abliterate.measure.activations import format_prompts, mean_residuals
from abliterate.measure.loading import LoadedModel
from abliterate.measure.probe import post_positions
from abliterate.options.command import recorded_command

KIND = "harmfulness"


@dataclass(frozen=True)
class Harmfulness:
    direction: torch.Tensor  # [num_layers + 1, d], row i: the residual stream entering decoder layer i
    refusal: torch.Tensor  # [num_layers + 1, d], the same difference at the last post-instruction token
    positions: int  # post-instruction tokens after the instruction's last one

    @property
    def cosine(self) -> torch.Tensor:
        """[num_layers + 1] cosine similarity of the harmfulness and refusal differences per layer."""
        return torch.nn.functional.cosine_similarity(self.direction.double(), self.refusal.double(), dim=-1)


def harmfulness_direction(lm: LoadedModel, harmful: list[str], harmless: list[str], *, template: str | None = None,
                          batch_size: int = 16, quiet: bool = False, **template_kwargs) -> Harmfulness:
    """Differences of means at the instruction's last token and at the last post-instruction token."""
    harmful_p = format_prompts(lm, harmful, template, **template_kwargs)
    harmless_p = format_prompts(lm, harmless, template, **template_kwargs)
    k = post_positions(lm, harmful_p + harmless_p, template, **template_kwargs)
    diff = (mean_residuals(lm, harmful_p, 1 + k, batch_size=batch_size, desc="harmful", quiet=quiet)
            - mean_residuals(lm, harmless_p, 1 + k, batch_size=batch_size, desc="harmless", quiet=quiet))
    return Harmfulness(diff[:, 0].contiguous(), diff[:, -1].contiguous(), k)


def save_harmfulness(result: Harmfulness, path: Path, lm: LoadedModel, metadata: dict[str, object]) -> None:
    """A per-layer direction file ([layers + 1, d], not normalised: each row's length is its mean difference)."""
    check_output_file(path)
    save_direction(path, result.direction, {
        "model": lm.name, "kind": KIND, "num_layers": lm.num_layers, "hidden_size": lm.hidden_size,
        "position": "instruction's last token",
        "magnitude": json.dumps([round(v, 6) for v in result.direction.norm(dim=-1).tolist()]),
        "cosine_to_refusal": json.dumps([round(v, 6) for v in result.cosine.tolist()]),
        "refusal_position": "last post-instruction token",
        "command": recorded_command(), "tool": f"abliterate {__version__}", **metadata,
    }, extra={"refusal": result.refusal})
