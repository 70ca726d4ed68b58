"""Objectives for search and selection that see more than the first reply token.

The fast defaults score the first reply token only: refusal log-odds and first-token KL. An edit can
leave the first token alone and damage what follows, or stop a refusal opening while the reply still
refuses a few tokens later. These two objectives measure the model as it currently runs (inside the
ablation hooks of a trial or candidate), against the unedited model's cached outputs:

* `ContinuationKL`: KL(unedited || edited) of next-token distributions averaged over the first
  `tokens` tokens of the unedited model's own greedy reply, teacher-forced (what `evaluate` reports
  as the multi-token KL, with the unedited model as the baseline);
* `RefusalCount`: greedy replies matched against the refusal markers, whole reply, reasoning removed
  (what `evaluate` counts).

Both cost generation or several tokens of forward passes per evaluation, so callers use them only
when asked (`search --kl-objective continuation`, `--refusal-objective count`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from abliterate.evaluate.distance import KL, _teacher_forced, continuation_kls
from abliterate.evaluate.generation import generate
from abliterate.evaluate.markers import find_refusal
from abliterate.evaluate.records import EvalSettings
from abliterate.measure.loading import LoadedModel
from abliterate.measure.templates import render


class ContinuationKL:
    """Multi-token KL against the unedited model; construct it while no edit is active.

    The unedited continuations and their log-probabilities are computed once and kept on the CPU
    (prompts x (tokens + 1) x vocab floats, e.g. 32 x 17 x 152k x 4 bytes = 330 MB for Qwen), which
    is what lets every trial be measured with one teacher-forced pass. `evaluate`, which has two
    models, keeps the baseline's side in a temporary folder instead (distance.BaselineKL).
    """

    def __init__(self, lm: LoadedModel, instructions: Sequence[str], tokens: int = 16, batch_size: int = 8,
                 template: str | None = None, thinking: bool = False, quiet: bool = True):
        self.lm = lm
        settings = EvalSettings(batch_size=batch_size, template=template, thinking=thinking)
        tok = lm.tokenizer
        prompts = [render(tok, t, template, **settings.template_kwargs()) for t in instructions]
        continuations = [ids for _, ids in generate(lm, instructions, settings, tokens, desc="KL continuations",
                                                    quiet=quiet)]
        prompt_ids = tok(prompts, add_special_tokens=False)["input_ids"]
        order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]) + len(continuations[i]))
        self.batches: list[tuple[list[list[int]], list[int], int, torch.Tensor]] = []
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            rows = [prompt_ids[i] + continuations[i] for i in idx]
            n_dist = [max(1, len(continuations[i])) for i in idx]  # distributions predicting continuation tokens
            keep = max(n_dist) + 1
            self.batches.append((rows, n_dist, keep, _teacher_forced(lm, rows, keep)))

    def __call__(self) -> float:
        """Mean KL per continuation token of the model as it runs now (0 for the unedited model)."""
        return self.measure().continuation

    def measure(self, other: LoadedModel | None = None) -> KL:
        """KL at the first reply token and over the continuation, of `other` (default: this model as it runs now)."""
        lm = other or self.lm
        first, total, count = [], 0.0, 0
        for rows, n_dist, keep, base_lp in self.batches:
            batch_first, batch_total = continuation_kls(base_lp, _teacher_forced(lm, rows, keep), n_dist, keep)
            first += batch_first
            total += batch_total
            count += sum(n_dist)
        return KL(sum(first) / len(first), total / count, count)


class RefusalCount:
    """Greedy replies to the prompts that the refusal markers count as refusals, as the model runs now."""

    def __init__(self, lm: LoadedModel, instructions: Sequence[str], max_new_tokens: int = 24, batch_size: int = 8,
                 template: str | None = None, thinking: bool = False):
        self.lm, self.instructions, self.max_new_tokens = lm, list(instructions), max_new_tokens
        self.settings = EvalSettings(batch_size=batch_size, template=template, thinking=thinking)

    def __call__(self) -> int:
        replies = generate(self.lm, self.instructions, self.settings, self.max_new_tokens, quiet=True)
        return sum(find_refusal(text) is not None for text, _ in replies)
