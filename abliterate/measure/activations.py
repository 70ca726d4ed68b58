"""Residual-stream activations at the post-instruction positions, as running means.

One forward per batch (left padding, attention mask, length-sorted to waste little on padding)
through the decoder only, with hooks that keep just the last k positions of each residual
stream and add them into float64 sums: memory never holds more than one batch of activations.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from abliterate.measure.hooks import capture_residuals
from abliterate.measure.loading import LoadedModel
from abliterate.measure.templates import render


@dataclass(frozen=True)
class Batch:
    indices: list[int]  # positions of these prompts in the caller's list
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions counted from each row's first real token, as generate() does for left padding
        (models with absolute position embeddings would otherwise see shifted positions)."""
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}


def format_prompts(lm: LoadedModel, instructions: Sequence[str], template: str | None = None,
                   **template_kwargs) -> list[str]:
    return [render(lm.tokenizer, text, template, **template_kwargs) for text in instructions]


def batches(lm: LoadedModel, prompts: Sequence[str] | Sequence[list[int]], batch_size: int) -> Iterator[Batch]:
    """Left-padded batches of similar length; `indices` map rows back to `prompts` (texts or token ids)."""
    tok = lm.tokenizer
    ids = [list(p) for p in prompts] if prompts and not isinstance(prompts[0], str) else \
        tok(list(prompts), add_special_tokens=False)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tok.pad({"input_ids": [ids[i] for i in idx]}, padding=True, return_tensors="pt")
        yield Batch(idx, enc["input_ids"].to(lm.device), enc["attention_mask"].to(lm.device))


def decoder(lm: LoadedModel) -> torch.nn.Module:
    """The transformer without its LM head: extraction needs no logits."""
    get = getattr(lm.model, "get_decoder", None)
    return get() if callable(get) else lm.model.base_model


def mean_residuals(lm: LoadedModel, prompts: Sequence[str] | Sequence[list[int]], positions: int, *,
                   batch_size: int = 16, desc: str = "activations", quiet: bool = False) -> torch.Tensor:
    """Mean residual stream [num_layers + 1, positions, d] over prompts, at their last `positions` tokens."""
    sums = torch.zeros(lm.num_layers + 1, positions, lm.hidden_size, dtype=torch.float64)

    def sink(i: int, hidden: torch.Tensor) -> None:
        sums[i] += hidden[:, -positions:, :].to(device="cpu", dtype=torch.float64).sum(0)

    body = decoder(lm)
    with capture_residuals(lm.model, lm.arch, sink), torch.inference_mode():
        for batch in tqdm(list(batches(lm, prompts, batch_size)), desc=desc, disable=quiet, leave=False):
            body(**batch.inputs(), use_cache=False)
    return (sums / len(prompts)).to(torch.float32)
