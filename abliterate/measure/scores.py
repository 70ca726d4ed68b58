"""Scoring candidate refusal directions (Arditi et al. 2024, section 2.3), by successive halving.

Candidates are differences of means, harmful minus harmless, at every (layer, post-instruction
position). Each is scored on validation prompts by what the weight edit would actually do (the
ablation hooks remove it from exactly the modules `apply` edits):

* refusal score with it ablated on harmful prompts (lower is better),
* refusal score with it added at its layer on harmless prompts (must induce refusal),
* first-token KL divergence on harmless prompts under ablation (must stay small).

The refusal score is the log-odds of the refusal tokens at the first generated position. Scoring
every candidate fully costs three forward sets each; instead every candidate is screened by its
ablation score on the few harmful prompts the model refuses most, the best quarter is scored on
all harmful prompts (reusing the screened ones), and only the best `finalists` get the other two
scores. What the pruning can miss: a candidate whose ablation score on the screening prompts ranks
it out although it would win on all of them, and one that ranks below the finalists by ablation
score but passes the filters when none of them does (in that case the next `finalists` get their
induction score, and their KL where they induce, before any filter is relaxed). `finalists=0` scores
every candidate fully.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from tqdm import tqdm

from abliterate.errors import AbliterateError
from abliterate.measure.batching import Batch, batches, run_fitting
from abliterate.measure.hooks import ablate, ablate_rows, add
from abliterate.measure.loading import LoadedModel
from abliterate.measure.selection import CandidateScore, SelectionSettings, verdict

REFUSAL_PREFIXES = ("I", "As", "Sorry", "I'm sorry", "I am sorry", "Unfortunately", "I cannot", "I can't",
                    "I apologize", "My apologies", "I must decline")
HALVING = 4  # each round keeps a quarter of the candidates and scores them on four times the prompts


def refusal_token_ids(tokenizer, prefixes: Sequence[str] = REFUSAL_PREFIXES) -> list[int]:
    """First tokens of common refusal openings, with and without a leading space."""
    ids: set[int] = set()
    for prefix in prefixes:
        for text in (prefix, " " + prefix):
            tokens = tokenizer.encode(text, add_special_tokens=False)
            if tokens and tokenizer.decode(tokens[:1]).strip():
                ids.add(tokens[0])
    if not ids:
        raise AbliterateError(f"this tokenizer encodes none of the refusal openings ({', '.join(prefixes[:3])}...) "
                              "as a token that decodes to text, so candidate directions cannot be scored; compute "
                              "the direction elsewhere and pass it with --direction FILE")
    return sorted(ids)


def _logprobs(lm: LoadedModel, batch_list: Sequence[Batch], n: int) -> torch.Tensor:
    vocab = lm.model.config.get_text_config().vocab_size
    return _first_token(lm, batch_list, torch.empty(n, vocab), lambda lp: lp[:, :vocab])


def _first_token(lm: LoadedModel, batch_list: Sequence[Batch], out: torch.Tensor,
                 keep: Callable[[torch.Tensor], torch.Tensor], before: Callable[[Batch], None] | None = None,
                 progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """out[rows] = keep(log p(first reply token) [rows, vocab], float32 on the CPU) for every batch; before(batch)
    runs before each forward (hooks reading the batch's rows)."""
    def step(batch: Batch) -> None:
        if before is not None:
            before(batch)
        logits = lm.model(**batch.inputs(), use_cache=False, logits_to_keep=1).logits[:, -1, :]
        out[batch.indices] = keep(torch.log_softmax(logits.float(), dim=-1).cpu())

    with torch.inference_mode():
        run_fitting(lm, list(batch_list), step, progress=progress)  # out of memory: halved, never a traceback
    return out


def first_token_logprobs(lm: LoadedModel, prompts: Sequence[str] | Sequence[list[int]],
                         batch_size: int) -> torch.Tensor:
    """log p(first reply token) [N, vocab] in float32, rows in the order of `prompts`."""
    return _logprobs(lm, list(batches(lm, prompts, batch_size)), len(prompts))


def refusal_score(logprobs: torch.Tensor, refusal_ids: list[int]) -> torch.Tensor:
    """Log-odds that the reply starts with a refusal token, per prompt."""
    log_p = torch.logsumexp(logprobs[:, refusal_ids], dim=-1).clamp(max=-1e-7)
    return log_p - torch.log1p(-torch.exp(log_p))


def kl_divergence(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(base || other) per row, from log-probabilities."""
    return (base.exp() * (base - other)).sum(-1)


class Scorer:
    """The validation prompts tokenised and batched once, their unedited scores, and the three scores."""

    def __init__(self, lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], refusal_ids: list[int],
                 batch_size: int) -> None:
        self.lm, self.ids, self.bs = lm, refusal_ids, batch_size
        encode = lambda texts: lm.tokenizer(list(texts), add_special_tokens=False)["input_ids"]  # noqa: E731
        self.harmful, self.harmless = encode(harmful), encode(harmless)
        self._harmless_batches = list(batches(lm, self.harmless, batch_size))
        self.base_harmful = self.refusal(list(range(len(self.harmful))))  # [n], unedited
        self.base_harmless = _logprobs(lm, self._harmless_batches, len(self.harmless))
        # the prompts the model refuses most first: they show best which directions carry the refusal
        self.order = sorted(range(len(self.harmful)), key=lambda i: -float(self.base_harmful[i]))

    def refusal(self, prompt_indices: Sequence[int]) -> torch.Tensor:
        """Per-prompt refusal log-odds on these harmful prompts, under whatever hooks are active."""
        subset = [self.harmful[i] for i in prompt_indices]
        return refusal_score(_logprobs(self.lm, list(batches(self.lm, subset, self.bs)), len(subset)), self.ids)

    def ablated(self, vector: torch.Tensor, prompt_indices: Sequence[int]) -> torch.Tensor:
        with ablate(self.lm.model, self.lm.arch, vector):
            return self.refusal(prompt_indices)

    def ablated_many(self, jobs: Sequence[tuple[torch.Tensor, Sequence[int]]],
                     progress: Callable[[int], None] | None = None) -> list[torch.Tensor]:
        """`ablated` for several (vector, harmful prompt indices) at once: every row is ablated by its own vector
        and the rows of all of them are batched together by length, so batches are full and hardly padded
        (a few screening prompts per candidate would otherwise make small batches padded to their longest)."""
        units = torch.stack([v.to(torch.float32) / v.to(torch.float32).norm() for v, _ in jobs]).to(self.lm.device)
        owner = torch.tensor([j for j, (_, idx) in enumerate(jobs) for _ in idx], dtype=torch.long)
        prompts = [self.harmful[i] for _, idx in jobs for i in idx]
        running = [units[:0]]
        set_rows = lambda batch: running.__setitem__(0, units[owner[batch.indices]])  # noqa: E731
        ids = self.ids
        with ablate_rows(self.lm.model, self.lm.arch, lambda: running[0]):
            scores = _first_token(self.lm, list(batches(self.lm, prompts, self.bs)), torch.empty(len(prompts)),
                                  lambda lp: refusal_score(lp, ids), before=set_rows, progress=progress)
        return list(scores.split([len(idx) for _, idx in jobs]))

    def added_and_kl(self, layer: int, vector: torch.Tensor) -> tuple[float, float]:
        return self.added(layer, vector), self.kl(vector)

    def kl(self, vector: torch.Tensor) -> float:
        """Mean first-token KL on the harmless prompts, unedited || the vector ablated."""
        with ablate(self.lm.model, self.lm.arch, vector):
            logprobs = _logprobs(self.lm, self._harmless_batches, len(self.harmless))
        return kl_divergence(self.base_harmless, logprobs).mean().item()

    def added(self, layer: int, vector: torch.Tensor) -> float:
        """Mean refusal log-odds on the harmless prompts with the vector added at `layer`."""
        with add(self.lm.model, self.lm.arch, layer, vector):
            return refusal_score(_logprobs(self.lm, self._harmless_batches, len(self.harmless)), self.ids).mean().item()


def score_candidates(lm: LoadedModel, candidates: torch.Tensor, scorer: Scorer, settings: SelectionSettings,
                     quiet: bool = False,
                     on_round: Callable[[list[CandidateScore]], None] | None = None) -> list[CandidateScore]:
    """Score the candidates below the pruned layers by successive halving (see the module docstring).

    on_round(scores) is called after every round with every candidate's scores so far, so that the
    caller can save them before the next, longer round.
    """
    k = candidates.shape[1]
    top = int(lm.num_layers * (1 - settings.prune_layers))
    grid = [(layer, j) for layer in range(top) for j in range(k)
            if torch.isfinite(candidates[layer, j]).all() and candidates[layer, j].norm() > 0]
    n = len(scorer.harmful)
    per_prompt: dict[tuple[int, int], torch.Tensor] = {c: torch.empty(0) for c in grid}
    full: dict[tuple[int, int], tuple[float, float | None]] = {}

    def snapshot() -> list[CandidateScore]:
        scores = [CandidateScore(layer, j - k, per_prompt[(layer, j)].mean().item(),
                                 *full.get((layer, j), (None, None)), None, len(per_prompt[(layer, j)]))
                  for layer, j in grid if len(per_prompt[(layer, j)])]
        return [replace(s, rejected=verdict(s, settings, lm.num_layers)) for s in scores]

    def rank(pool: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return sorted(pool, key=lambda c: _mean_or_inf(per_prompt[c]))

    exhaustive = settings.finalists <= 0 or settings.finalists >= len(grid)
    size = n if exhaustive else min(n, max(1, settings.screen_prompts))
    alive = grid
    while True:
        todo = [(c, scorer.order[len(per_prompt[c]):size]) for c in alive if len(per_prompt[c]) < size]
        with tqdm(total=sum(len(t) for _, t in todo), desc=f"ablation score, {len(alive)} candidates x {size} "
                  "prompts", unit="prompt", disable=quiet, leave=False) as bar:
            measured = scorer.ablated_many([(candidates[c], t) for c, t in todo], bar.update) if todo else []
        for (c, _), values in zip(todo, measured, strict=True):
            per_prompt[c] = torch.cat([per_prompt[c], values])
        if on_round:
            on_round(snapshot())
        if size >= n:
            break
        alive = rank(alive)[: max(settings.finalists, math.ceil(len(alive) / HALVING))]
        size = min(n, size * HALVING)
    ranked = rank(alive)
    count = len(ranked) if exhaustive else settings.finalists
    for c in tqdm(ranked[:count], desc=f"full scores, {len(ranked[:count])} candidates", disable=quiet, leave=False):
        full[c] = scorer.added_and_kl(c[0], candidates[c])
    if on_round:
        on_round(snapshot())
    fallback = ranked[count : 2 * count]  # only when none of the finalists passes every filter
    if fallback and not any(s.rejected is None for s in snapshot()):
        # Induction first, the KL only where it induces: one that does not cannot pass, and ranks below every
        # finalist by ablation score, so a relaxed choice takes a finalist over it whenever one is within the
        # KL limit. Only when none is are the other KLs measured: the choice is what full scores would give.
        # Objectives measured by generation rank otherwise: there every one is scored fully.
        lazy = settings.refusal_objective == "score" and settings.kl_objective == "first-token"
        for c in tqdm(fallback, desc=f"full scores, {len(fallback)} more candidates", disable=quiet, leave=False):
            added = scorer.added(c[0], candidates[c])
            full[c] = (added, scorer.kl(candidates[c]) if not lazy or added > settings.induce_threshold else None)
        if not any(_within_kl(s, settings) for s in snapshot()):
            for c in tqdm([c for c in fallback if full[c][1] is None], desc="KL of the rest", disable=quiet,
                          leave=False):
                full[c] = (full[c][0], scorer.kl(candidates[c]))
        if on_round:
            on_round(snapshot())
    return snapshot()


def _within_kl(s: CandidateScore, settings: SelectionSettings) -> bool:
    """Fully scored, finite, and within the first-token KL limit: what a relaxed choice may pick first."""
    return (s.full and all(math.isfinite(x) for x in (s.refusal_ablated, s.refusal_added, s.kl))
            and s.kl <= settings.kl_threshold)


def _mean_or_inf(values: torch.Tensor) -> float:
    m = values.mean().item() if len(values) else math.inf
    return m if math.isfinite(m) else math.inf
