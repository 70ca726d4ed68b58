"""Residual-stream activations at the post-instruction positions, as running means.

One forward per batch (left padding, attention mask, length-sorted to waste little on padding)
through the decoder only, with hooks that keep just the last k positions of each residual
stream and add them into float64 sums: memory never holds more than one batch of activations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

from abliterate.measure.batching import Batch, batches, run_fitting
from abliterate.measure.hooks import capture_residuals
from abliterate.measure.loading import LoadedModel
from abliterate.measure.templates import render


def format_prompts(lm: LoadedModel, instructions: Sequence[str], template: str | None = None,
                   **template_kwargs) -> list[str]:
    return [render(lm.tokenizer, text, template, **template_kwargs) for text in instructions]


def decoder(lm: LoadedModel) -> torch.nn.Module:
    """The transformer without its LM head: extraction needs no logits."""
    get = getattr(lm.model, "get_decoder", None)
    return get() if callable(get) else lm.model.base_model


def mean_residuals(lm: LoadedModel, prompts: Sequence[str] | Sequence[list[int]], positions: int, *,
                   batch_size: int = 16, desc: str = "activations", quiet: bool = False) -> torch.Tensor:
    """Mean residual stream [num_layers + 1, positions, d] over prompts, at their last `positions` tokens."""
    sums = torch.zeros(lm.num_layers + 1, positions, lm.hidden_size, dtype=torch.float64)
    staged = torch.zeros_like(sums)  # one batch's sums, added once the batch completes (it may be retried)

    def sink(i: int, hidden: torch.Tensor) -> None:
        staged[i] += hidden[:, -positions:, :].to(device="cpu", dtype=torch.float64).sum(0)

    def step(batch: Batch) -> None:
        staged.zero_()
        body(**batch.inputs(), use_cache=False)
        sums.add_(staged)

    body = decoder(lm)
    with capture_residuals(lm.model, lm.arch, sink), torch.inference_mode(), \
            tqdm(total=len(prompts), desc=desc, unit="prompt", disable=quiet, leave=False) as bar:
        run_fitting(lm, list(batches(lm, prompts, batch_size)), step, progress=bar.update)
    return (sums / len(prompts)).to(torch.float32)


__all__ = ["decoder", "format_prompts", "mean_residuals"]
