"""How far a model moved: KL to its baseline along the baseline's own continuation, and general-text NLL."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from abliterate.errors import AbliterateError
from abliterate.evaluate.generation import generate
from abliterate.evaluate.records import EvalSettings
from abliterate.measure.loading import LoadedModel
from abliterate.measure.scores import kl_divergence
from abliterate.measure.templates import render
from abliterate.prompts import general_text

NLL_LOGITS_BUDGET = 32 << 20  # bytes of float32 logits one forward may produce when scoring general text


@dataclass
class KL:
    first_token: float
    continuation: float
    tokens: int  # (prompt, position) pairs averaged in `continuation`


def kl_to_baseline(lm: LoadedModel, baseline: LoadedModel, instructions: Sequence[str], settings: EvalSettings,
                   quiet: bool = False) -> KL:
    """KL(baseline || model) along the baseline's greedy continuation, teacher-forced through both models."""
    tok = baseline.tokenizer
    prompts = [render(tok, t, settings.template, **settings.template_kwargs()) for t in instructions]
    continuations = [ids for _, ids in generate(baseline, instructions, settings, settings.kl_tokens,
                                                desc="KL continuations", quiet=quiet)]
    first, total, count = [], 0.0, 0
    prompt_ids = tok(prompts, add_special_tokens=False)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]) + len(continuations[i]))
    step = settings.batch_size
    for start in tqdm(range(0, len(order), step), desc="KL", disable=quiet, leave=False):
        idx = order[start:start + step]
        rows = [prompt_ids[i] + continuations[i] for i in idx]
        n_dist = [max(1, len(continuations[i])) for i in idx]  # distributions predicting each continuation token
        keep = max(n_dist) + 1
        base_lp = _teacher_forced(baseline, rows, keep)
        batch_first, batch_total = continuation_kls(base_lp, _teacher_forced(lm, rows, keep), n_dist, keep)
        first += batch_first
        total += batch_total
        count += sum(n_dist)
    return KL(sum(first) / len(first), total / count, count)


def continuation_kls(base_lp: torch.Tensor, model_lp: torch.Tensor, n_dist: list[int],
                     keep: int) -> tuple[list[float], float]:
    """Per row of a batch: KL at the first reply token, and the batch's KL summed over each row's continuation."""
    vocab = min(base_lp.shape[-1], model_lp.shape[-1])
    kl = kl_divergence(base_lp[..., :vocab], model_lp[..., :vocab])  # [B, keep]
    first, total = [], 0.0
    for b, n in enumerate(n_dist):
        row = kl[b, keep - 1 - n: keep - 1]  # positions T-1-n .. T-2: predicting continuation tokens 0..n-1
        first.append(row[0].item())
        total += row.sum().item()
    return first, total


def _teacher_forced(lm: LoadedModel, rows: list[list[int]], keep: int) -> torch.Tensor:
    """log-probs [B, keep, vocab] (float32) at the last `keep` positions of left-padded rows."""
    width = max(len(r) for r in rows)
    pad = lm.tokenizer.pad_token_id or 0
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=lm.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=lm.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode(), lm.running():
        logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                          logits_to_keep=keep).logits
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def mean_nll(lm: LoadedModel, settings: EvalSettings, quiet: bool = False, desc: str = "NLL",
             text: str | None = None) -> tuple[float, int]:
    """Mean negative log-likelihood per predicted token of `text` (default: built-in general text), in windows.

    The text is cut into full windows of min(nll_window, context length) tokens (the tail shorter than a
    window is dropped unless it is all there is); each window is scored on its own.
    """
    ids = lm.tokenizer(text if text is not None else general_text())["input_ids"]
    context = getattr(lm.model.config.get_text_config(), "max_position_embeddings", None) or settings.nll_window
    window = max(2, min(settings.nll_window, context))
    windows = [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)] or [ids]
    total, count = 0.0, 0
    with torch.inference_mode(), lm.running():
        for start in tqdm(range(0, len(windows), settings.batch_size), desc=desc, disable=quiet, leave=False):
            chunk = torch.tensor(windows[start:start + settings.batch_size], device=lm.device)
            total += _window_nll(lm, chunk)
            count += chunk[:, 1:].numel()
    if count == 0:
        raise AbliterateError("the general text is shorter than two tokens for this tokenizer")
    return total / count, count


def _window_nll(lm: LoadedModel, chunk: torch.Tensor, step: int | None = None) -> float:
    """Summed NLL of each token of the windows given the ones before it, `step` positions per forward with the
    KV cache (default: as many as keep the float32 logits within NLL_LOGITS_BUDGET): the logits of a whole
    window ([batch, window, vocab], gigabytes for a 150k vocabulary) are never held at once; the model runs
    whole (its own final norm, logit scaling or soft-capping)."""
    vocab = lm.model.config.get_text_config().vocab_size
    step = step or max(1, min(256, NLL_LOGITS_BUDGET // (4 * vocab * chunk.shape[0])))
    total, cache = 0.0, {}
    for s in range(0, chunk.shape[1] - 1, step):
        out = lm.model(input_ids=chunk[:, s:s + step], use_cache=True, **cache)
        key = "cache" if "cache" in out else "past_key_values"  # transformers >= 5.2x names it `cache`
        cache = {key: out[key]}
        targets = chunk[:, s + 1:s + step + 1]
        logits = out.logits[:, :targets.shape[1]].float()
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                   reduction="sum").item()
        del out, logits
    return total
