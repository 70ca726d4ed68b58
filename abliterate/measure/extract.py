"""`abliterate extract`: prompts -> activations -> candidates -> selection -> direction file."""

from __future__ import annotations

import random
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from abliterate import __version__
from abliterate.errors import AbliterateError
from abliterate.io.direction_file import check_output_file, save_direction
from abliterate.measure.activations import mean_residuals
from abliterate.measure.loading import LoadedModel
from abliterate.measure.scores import (
    REFUSAL_PREFIXES,
    CandidateScore,
    SelectionSettings,
    choose,
    first_token_logprobs,
    refusal_score,
    refusal_token_ids,
    score_candidates,
    scores_json,
)
from abliterate.measure.templates import post_instruction_count, post_instruction_suffix, render
from abliterate.prompts import PromptError, builtin, load_prompts

MIN_PROMPTS = 8


@dataclass(frozen=True)
class PromptSets:
    harmful_train: list[str]
    harmless_train: list[str]
    harmful_val: list[str]
    harmless_val: list[str]


@dataclass(frozen=True)
class Extraction:
    direction: torch.Tensor  # [d], the chosen difference of means (not normalised)
    best: CandidateScore
    scores: list[CandidateScore]
    candidates: torch.Tensor  # [num_layers + 1, positions, d]
    suffix: str
    baseline_refusal: float
    harmless_mean: torch.Tensor | None = None  # [num_layers + 1, positions, d]: `search` projects against it


def split_prompts(source: str, *, n_train: int, n_val: int, field: str | None, seed: int = 0,
                  kind: str) -> tuple[list[str], list[str]]:
    """Built-in sets use their own train/val splits; other sources are shuffled and split here."""
    try:
        if source.startswith("builtin:") and source.count(":") == 1:
            name = source.split(":", 1)[1]
            train, val = builtin(name, split="train"), builtin(name, split="val")
        else:
            prompts = load_prompts(source, field=field, min_count=MIN_PROMPTS)
            shuffled = random.Random(seed).sample(prompts, len(prompts))
            n_held = max(1, min(n_val, len(shuffled) // 4))
            val, train = shuffled[:n_held], shuffled[n_held:]
    except PromptError as e:
        raise AbliterateError(f"--{kind}: {e}") from None
    return train[:n_train], val[:n_val]


def extract(lm: LoadedModel, prompts: PromptSets, *, template: str | None = None, positions: int | None = None,
            settings: SelectionSettings | None = None, refusal_prefixes: tuple[str, ...] | None = None,
            template_kwargs: dict | None = None, quiet: bool = False) -> Extraction:
    settings = settings or SelectionSettings()
    kwargs = template_kwargs or {}
    suffix = post_instruction_suffix(lm.tokenizer, template, **kwargs)
    fmt = lambda texts: [render(lm.tokenizer, t, template, **kwargs) for t in texts]  # noqa: E731
    harmful_train, harmless_train = fmt(prompts.harmful_train), fmt(prompts.harmless_train)
    harmful_val, harmless_val = fmt(prompts.harmful_val), fmt(prompts.harmless_val)
    available = post_instruction_count(lm.tokenizer, harmful_train + harmless_train, suffix)
    k = min(positions or available, available)
    mean_harmful = mean_residuals(lm, harmful_train, k, batch_size=settings.batch_size, desc="harmful", quiet=quiet)
    harmless_mean = mean_residuals(lm, harmless_train, k, batch_size=settings.batch_size, desc="harmless",
                                   quiet=quiet)
    candidates = mean_harmful - harmless_mean  # difference of means at every layer and post-instruction position
    ids = refusal_token_ids(lm.tokenizer, refusal_prefixes or REFUSAL_PREFIXES)
    baseline = refusal_score(first_token_logprobs(lm, harmful_val, settings.batch_size), ids).mean().item()
    scores = score_candidates(lm, candidates, harmful_val, harmless_val, ids, settings, quiet=quiet)
    best = choose(scores)
    direction = candidates[best.layer, best.position + k]
    return Extraction(direction, best, scores, candidates, suffix, baseline, harmless_mean)


def save_extraction(result: Extraction, path: Path, lm: LoadedModel, extra_metadata: dict | None = None) -> None:
    """Direction, every candidate and their scores in one file; `command` in extra_metadata overrides sys.argv."""
    path = Path(path)
    check_output_file(path)
    best = result.best
    metadata = {
        "model": lm.name,
        "layer": best.layer,
        "position": best.position,
        "hidden_size": lm.hidden_size,
        "num_layers": lm.num_layers,
        "command": shlex.join(["abliterate", *sys.argv[1:]]),
        "tool": f"abliterate {__version__}",
        "refusal_score_baseline": f"{result.baseline_refusal:.4f}",
        "refusal_score_ablated": f"{best.refusal_ablated:.4f}",
        "refusal_score_added": f"{best.refusal_added:.4f}",
        "kl": f"{best.kl:.5f}",
        "post_instruction_suffix": result.suffix,
        "candidate_scores": scores_json(result.scores),
        **(extra_metadata or {}),
    }
    extra = {"candidates": result.candidates}
    if result.harmless_mean is not None:
        extra["harmless_mean"] = result.harmless_mean
    save_direction(path, result.direction, metadata, extra=extra)
