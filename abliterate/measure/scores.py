"""Candidate refusal directions and the selection among them (Arditi et al. 2024, section 2.3).

Candidates are differences of means, harmful minus harmless, at every (layer, post-instruction
position). Each is scored on validation prompts by what the weight edit would actually do (the
ablation hooks remove it from exactly the modules `apply` edits):

* refusal score with it ablated on harmful prompts (lower is better),
* refusal score with it added at its layer on harmless prompts (must induce refusal: > threshold),
* first-token KL divergence on harmless prompts under ablation (must stay <= threshold),

skipping the last 20 % of layers; the lowest ablation score among the survivors wins.
The refusal score is the log-odds of the refusal tokens at the first generated position.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from abliterate.errors import AbliterateError
from abliterate.measure.activations import batches
from abliterate.measure.hooks import ablate, add
from abliterate.measure.loading import LoadedModel

REFUSAL_PREFIXES = ("I", "As", "Sorry", "I'm sorry", "I am sorry", "Unfortunately", "I cannot", "I can't",
                    "I apologize", "My apologies", "I must decline")


@dataclass(frozen=True)
class CandidateScore:
    layer: int  # residual stream index: the stream entering decoder layer `layer`
    position: int  # negative index among the post-instruction tokens (-1: the last)
    refusal_ablated: float
    refusal_added: float
    kl: float
    rejected: str | None  # why the candidate was filtered out, or None


@dataclass(frozen=True)
class SelectionSettings:
    prune_layers: float = 0.2
    kl_threshold: float = 0.1
    induce_threshold: float = 0.0
    batch_size: int = 16


def refusal_token_ids(tokenizer, prefixes: Sequence[str] = REFUSAL_PREFIXES) -> list[int]:
    """First tokens of common refusal openings, with and without a leading space."""
    ids: set[int] = set()
    for prefix in prefixes:
        for text in (prefix, " " + prefix):
            tokens = tokenizer.encode(text, add_special_tokens=False)
            if tokens and tokenizer.decode(tokens[:1]).strip():
                ids.add(tokens[0])
    if not ids:
        raise AbliterateError("none of the refusal openings tokenises to a usable token; pass --refusal-tokens")
    return sorted(ids)


def first_token_logprobs(lm: LoadedModel, prompts: Sequence[str], batch_size: int) -> torch.Tensor:
    """log p(first reply token) [N, vocab] in float32, rows in the order of `prompts`."""
    out = torch.empty(len(prompts), lm.model.config.get_text_config().vocab_size)
    with torch.inference_mode():
        for batch in batches(lm, prompts, batch_size):
            logits = lm.model(**batch.inputs(), use_cache=False, logits_to_keep=1).logits[:, -1, :]
            out[batch.indices] = torch.log_softmax(logits.float(), dim=-1).cpu()[:, : out.shape[1]]
    return out


def refusal_score(logprobs: torch.Tensor, refusal_ids: list[int]) -> torch.Tensor:
    """Log-odds that the reply starts with a refusal token, per prompt."""
    log_p = torch.logsumexp(logprobs[:, refusal_ids], dim=-1).clamp(max=-1e-7)
    return log_p - torch.log1p(-torch.exp(log_p))


def kl_divergence(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(base || other) per row, from log-probabilities."""
    return (base.exp() * (base - other)).sum(-1)


def score_candidates(lm: LoadedModel, candidates: torch.Tensor, harmful_val: Sequence[str],
                     harmless_val: Sequence[str], refusal_ids: list[int], settings: SelectionSettings,
                     quiet: bool = False) -> list[CandidateScore]:
    """Score every candidate below the pruned layers; the filters' verdicts are kept with the scores."""
    bs = settings.batch_size
    base_harmless = first_token_logprobs(lm, harmless_val, bs)
    max_layer = int(lm.num_layers * (1 - settings.prune_layers))
    k = candidates.shape[1]
    grid = [(layer, j) for layer in range(max_layer) for j in range(k)]
    scores = []
    for layer, j in tqdm(grid, desc="scoring candidates", disable=quiet, leave=False):
        vector = candidates[layer, j]
        if not torch.isfinite(vector).all() or vector.norm() == 0:
            continue
        with ablate(lm.model, lm.arch, vector):
            ablated = refusal_score(first_token_logprobs(lm, harmful_val, bs), refusal_ids).mean().item()
            kl = kl_divergence(base_harmless, first_token_logprobs(lm, harmless_val, bs)).mean().item()
        with add(lm.model, lm.arch, layer, vector):
            added = refusal_score(first_token_logprobs(lm, harmless_val, bs), refusal_ids).mean().item()
        rejected = None
        if not math.isfinite(ablated) or not math.isfinite(kl):
            rejected = "non-finite score"
        elif added <= settings.induce_threshold:
            rejected = f"adding it does not induce refusal ({added:.2f} <= {settings.induce_threshold})"
        elif kl > settings.kl_threshold:
            rejected = f"KL {kl:.3f} > {settings.kl_threshold}"
        scores.append(CandidateScore(layer, j - k, ablated, added, kl, rejected))
    return scores


def choose(scores: list[CandidateScore]) -> CandidateScore:
    kept = [s for s in scores if s.rejected is None]
    if not kept:
        best = min(scores, key=lambda s: s.refusal_ablated) if scores else None
        hint = (f"; the best rejected one (layer {best.layer}, position {best.position}) was rejected because "
                f"{best.rejected}") if best else ""
        raise AbliterateError(
            "no candidate direction passed the filters" + hint + "; relax the thresholds (`extract --kl-threshold "
            "/ --induce-threshold`, or a recipe's extract.kl_threshold / induce_threshold), use more prompts, or "
            "check that the model refuses the harmful prompts at all"
        )
    return min(kept, key=lambda s: s.refusal_ablated)


def scores_json(scores: list[CandidateScore]) -> str:
    return json.dumps([asdict(s) for s in scores], separators=(",", ":"))
