"""`abliterate extract`: prompts -> activations -> candidates -> selection -> direction file."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from abliterate import __version__
from abliterate.errors import AbliterateError
from abliterate.io.direction_file import check_output_file, save_direction
from abliterate.io.safetensors_format import read_header
from abliterate.measure.activations import mean_residuals
from abliterate.measure.loading import LoadedModel
from abliterate.measure.scores import REFUSAL_PREFIXES, Scorer, refusal_token_ids, score_candidates
from abliterate.measure.selection import CandidateScore, check_settings, choose, scores_from_json, scores_json
from abliterate.measure.templates import post_instruction_count, post_instruction_suffix, render
from abliterate.options.command import recorded_command
from abliterate.options.recipe import SelectionSettings
from abliterate.prompts import builtin, load_prompts
from abliterate.prompts.loaders import PromptError

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
    relaxed: str | None = None  # which filter the choice relaxed and why (None: every filter held)
    settings: SelectionSettings = field(default_factory=SelectionSettings)
    model: str = ""
    num_layers: int = 0
    metadata: dict[str, str] = field(default_factory=dict)  # recorded as given (command, model name, ...)
    more: torch.Tensor | None = None  # [K - 1, d] directions beside `direction` (`--directions K`, directions.py)
    more_categories: tuple[str, ...] | None = None  # the categories `more`'s rows are (`--proposals categories`)


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


def harmful_categories(source: str, prompts: list[str], field: str | None) -> list[str | None]:
    """The category of each harmful prompt (None where its source gives none): `--proposals categories`."""
    from abliterate.prompts import prompt_categories

    try:
        labels = prompt_categories(source, field=field)
    except PromptError as e:
        raise AbliterateError(f"--harmful: {e}") from None
    return [labels.get(p) for p in prompts]


def pending_path(out: Path) -> Path:
    """Where candidates and scores are kept while scoring runs (and after a failed choice)."""
    out = Path(out)
    return out.with_name(f"{out.stem}.candidates{out.suffix or '.safetensors'}")


def extract(lm: LoadedModel, prompts: PromptSets, *, template: str | None = None, positions: int | None = None,
            settings: SelectionSettings | None = None, refusal_prefixes: tuple[str, ...] | None = None,
            template_kwargs: dict | None = None, quiet: bool = False, pending: Path | None = None,
            metadata: dict[str, str] | None = None,
            measure_finalists: Callable[[torch.Tensor, list[CandidateScore]], list[CandidateScore]] | None = None,
            directions: int = 1, categories: Sequence[str | None] | None = None) -> Extraction:
    """Candidates, their scores and the choice. With `pending`, the candidates and every round's scores are
    saved there before the next step (a failed or interrupted choice then costs no forward pass again).
    `measure_finalists` adds the scores beyond the first token that the settings rank by (see
    `search.finalists`). `metadata` is recorded in the files as given (e.g. the command line). directions > 1:
    that many directions, the choice first, then the leading principal directions of the per-prompt
    differences at its layer and position (measure/directions.py), or with `categories` (a category or None per
    harmful training prompt) categories' differences there."""
    metadata = metadata or {}
    settings = settings or SelectionSettings()
    check_settings(settings)  # before any forward pass
    if categories is not None and directions > 1:
        from abliterate.measure.directions import check_categories

        check_categories(categories, directions - 1)
    kwargs = template_kwargs or {}
    suffix = post_instruction_suffix(lm.tokenizer, template, **kwargs)

    def fmt(texts: list[str]) -> list[str]:
        return [render(lm.tokenizer, t, template, **kwargs) for t in texts]

    harmful_train, harmless_train = fmt(prompts.harmful_train), fmt(prompts.harmless_train)
    harmful_val, harmless_val = fmt(prompts.harmful_val), fmt(prompts.harmless_val)
    available = post_instruction_count(lm.tokenizer, harmful_train + harmless_train, suffix)
    k = min(positions or available, available)
    mean_harmful = mean_residuals(lm, harmful_train, k, batch_size=settings.batch_size, desc="harmful", quiet=quiet)
    harmless_mean = mean_residuals(lm, harmless_train, k, batch_size=settings.batch_size, desc="harmless",
                                   quiet=quiet)
    candidates = mean_harmful - harmless_mean  # difference of means at every layer and post-instruction position
    ids = refusal_token_ids(lm.tokenizer, refusal_prefixes or REFUSAL_PREFIXES)
    scorer = Scorer(lm, harmful_val, harmless_val, ids, settings.batch_size)
    baseline = scorer.base_harmful.mean().item()

    def partial(scores: list[CandidateScore]) -> Extraction:
        return Extraction(candidates[0, 0], None, scores, candidates, suffix, baseline, harmless_mean, None, settings,
                          lm.name, lm.num_layers, metadata)

    save = (lambda scores: save_candidates(partial(scores), pending)) if pending else None
    if save:
        save([])
    scores = score_candidates(lm, candidates, scorer, settings, quiet=quiet, on_round=save)
    if measure_finalists is not None:
        scores = measure_finalists(candidates, scores)
        if save:
            save(scores)
    try:
        choice = choose(scores, settings, lm.num_layers)
    except AbliterateError as e:
        if pending is None:
            raise
        raise AbliterateError(f"{e}; every candidate and its scores are saved in {pending}: `abliterate extract "
                              f"--reselect {pending} --out FILE` chooses again with other thresholds") from None
    best = choice.best
    r = candidates[best.layer, best.position + k]
    more = names = None
    if directions > 1:
        from abliterate.measure.directions import propose

        more, names = propose(lm, harmful_train, harmless_train, best.layer, best.position, r, directions - 1,
                              batch_size=settings.batch_size, quiet=quiet, categories=categories)
    return Extraction(r, best, choice.scores, candidates, suffix, baseline, harmless_mean, choice.relaxed, settings,
                      lm.name, lm.num_layers, metadata, more, None if names is None else tuple(names))


def reselect(path: Path, settings: SelectionSettings) -> Extraction:
    """Choose again among the candidates an extraction saved, with other thresholds; no model needed."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise AbliterateError(f"--reselect {path} does not exist; pass a file written by `abliterate extract`")
    read_header(path)  # one clear line for a truncated or non-safetensors file
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata, names = dict(f.metadata() or {}), set(f.keys())
            if "candidates" not in names or "candidate_scores" not in metadata:
                raise AbliterateError(f"--reselect {path} holds no candidates with scores; pass a file written by "
                                      "`abliterate extract` (its direction file, or the .candidates file it kept)")
            candidates = f.get_tensor("candidates").float()
            harmless = f.get_tensor("harmless_mean").float() if "harmless_mean" in names else None
    except (OSError, ValueError) as e:
        raise AbliterateError(f"cannot read {path}: {e}") from None
    num_layers = int(metadata.get("num_layers", candidates.shape[0] - 1))
    choice = choose(scores_from_json(metadata["candidate_scores"]), settings, num_layers)
    best = choice.best
    return Extraction(candidates[best.layer, best.position + candidates.shape[1]], best, choice.scores, candidates,
                      metadata.get("post_instruction_suffix", ""), float(metadata.get("refusal_score_baseline", "nan")),
                      harmless, choice.relaxed, replace(settings, batch_size=_saved_batch_size(metadata)),
                      metadata.get("model", ""), num_layers, {"extract_command": metadata.get("command", "")})


def _saved_batch_size(metadata: dict[str, str]) -> int:
    try:
        return int(json.loads(metadata.get("selection_settings", "{}")).get("batch_size", 16))
    except (ValueError, AttributeError):
        return 16


def _common_metadata(result: Extraction) -> dict[str, str]:
    return {
        "model": result.model,
        "hidden_size": str(result.candidates.shape[-1]),
        "num_layers": str(result.num_layers),
        "command": recorded_command(),
        "tool": f"abliterate {__version__}",
        "refusal_score_baseline": f"{result.baseline_refusal:.4f}",
        "post_instruction_suffix": result.suffix,
        "candidate_scores": scores_json(result.scores),
        "selection_settings": json.dumps(asdict(result.settings), separators=(",", ":")),
    }


def _extra_tensors(result: Extraction) -> dict[str, torch.Tensor]:
    extra = {"candidates": result.candidates}
    if result.harmless_mean is not None:
        extra["harmless_mean"] = result.harmless_mean
    return extra


def save_candidates(result: Extraction, path: Path) -> None:
    """The candidates and the scores so far, without a chosen direction (written atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tensors = {k: v.contiguous() for k, v in _extra_tensors(result).items()}
    save_file(tensors, str(tmp), metadata={**_common_metadata(result), **result.metadata, "status": "scoring"})
    tmp.replace(path)


def save_extraction(result: Extraction, path: Path, extra_metadata: dict | None = None) -> None:
    """Direction, every candidate and their scores in one file; `command` in extra_metadata wins."""
    path = Path(path)
    check_output_file(path)
    best = result.best
    metadata = {
        **_common_metadata(result),
        "layer": best.layer,
        "position": best.position,
        "refusal_score_ablated": f"{best.refusal_ablated:.4f}",
        "refusal_score_added": f"{best.refusal_added:.4f}",
        "kl": f"{best.kl:.5f}",
        "magnitude": f"{float(result.direction.norm()):.6g}",  # |harmful mean - harmless mean|: induction's scale
        "selection": result.relaxed or "every filter held",
        **result.metadata,
        **(extra_metadata or {}),
    }
    direction = result.direction
    if result.more is not None:  # row 0 the choice, then the principal directions (or categories) beside it
        direction = torch.cat([direction[None], result.more.to(direction.dtype)])
        metadata["rank"] = len(direction)
        metadata["proposals"] = "principal" if result.more_categories is None else "categories"
        if result.more_categories is not None:
            metadata["proposal_categories"] = json.dumps(list(result.more_categories))
    save_direction(path, direction, metadata, extra=_extra_tensors(result))
