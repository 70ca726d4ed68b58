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

from abliterate.evaluate.distance import KL, BaselineKL
from abliterate.evaluate.generation import generate
from abliterate.evaluate.markers import find_refusal
from abliterate.evaluate.records import EvalSettings
from abliterate.measure.loading import LoadedModel


class ContinuationKL:
    """Multi-token KL against the unedited model; construct it while no edit is active.

    The unedited continuations and their log-probabilities are computed once and kept on the CPU
    (prompts x tokens x vocab floats, e.g. 32 x 16 x 152k x 4 bytes = 310 MB for Qwen), which is what
    lets every trial be measured with one teacher-forced pass (distance.BaselineKL in memory; `evaluate`,
    which may release its baseline, keeps them in a temporary folder instead).
    """

    def __init__(self, lm: LoadedModel, instructions: Sequence[str], tokens: int = 16, batch_size: int = 8,
                 template: str | None = None, thinking: bool = False, quiet: bool = True):
        self.lm = lm
        settings = EvalSettings(batch_size=batch_size, template=template, thinking=thinking, kl_tokens=tokens)
        self._base = BaselineKL(lm, instructions, settings, quiet=quiet, in_memory=True)

    def __call__(self) -> float:
        """Mean KL per continuation token of the model as it runs now (0 for the unedited model)."""
        return self.measure().continuation

    def measure(self, other: LoadedModel | None = None) -> KL:
        """KL at the first reply token and over the continuation, of `other` (default: this model as it runs now)."""
        return self._base.kl(other or self.lm, quiet=True)


class RefusalCount:
    """Greedy replies to the prompts that the refusal markers count as refusals, as the model runs now."""

    def __init__(self, lm: LoadedModel, instructions: Sequence[str], max_new_tokens: int = 24, batch_size: int = 8,
                 template: str | None = None, thinking: bool = False):
        self.lm, self.instructions, self.max_new_tokens = lm, list(instructions), max_new_tokens
        self.settings = EvalSettings(batch_size=batch_size, template=template, thinking=thinking)

    def __call__(self) -> int:
        replies = generate(self.lm, self.instructions, self.settings, self.max_new_tokens, quiet=True)
        return sum(find_refusal(text) is not None for text, _ in replies)
