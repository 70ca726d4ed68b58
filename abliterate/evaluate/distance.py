"""How far a model moved: KL to its baseline along the baseline's own continuation, and general-text NLL."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from abliterate.errors import AbliterateError
from abliterate.evaluate.generation import generate
from abliterate.evaluate.records import EvalSettings
from abliterate.measure.batching import Batch, batches, resolve, run_fitting
from abliterate.measure.loading import LoadedModel
from abliterate.measure.scores import kl_divergence
from abliterate.measure.templates import render
from abliterate.prompts import general_text

NLL_LOGITS_BUDGET = 32 << 20  # bytes of float32 logits one forward may produce when scoring general text
KL_LOGITS_BUDGET = 64 << 20  # bytes of float32 log-probabilities one KL forward may produce (per model)


@dataclass
class KL:
    first_token: float
    continuation: float
    tokens: int  # (prompt, position) pairs averaged in `continuation`


def kl_to_baseline(lm: LoadedModel, baseline: LoadedModel, instructions: Sequence[str], settings: EvalSettings,
                   quiet: bool = False) -> KL:
    """KL(baseline || model) along the baseline's greedy continuation, teacher-forced through both models."""
    return BaselineKL(baseline, instructions, settings, quiet=quiet).kl(lm, quiet=quiet)


class BaselineKL:
    """The baseline's side of KL(baseline || model): its greedy continuations of the harmless prompts and its
    next-token log-probabilities along them, kept in a temporary folder (rows x tokens x vocab floats: 330 MB for
    32 prompts, 16 tokens and a 152k vocabulary) rather than in memory, so that the baseline can be released
    before the model is loaded (`in_memory`: kept in memory, for a search that measures many edits of the
    one model it keeps loaded). `kl(model)` teacher-forces the same rows through the model."""

    def __init__(self, baseline: LoadedModel, instructions: Sequence[str], settings: EvalSettings,
                 quiet: bool = False, in_memory: bool = False) -> None:
        tok = baseline.tokenizer
        prompts = [render(tok, t, settings.template, **settings.template_kwargs()) for t in instructions]
        continuations = [ids for _, ids in generate(baseline, instructions, settings, settings.kl_tokens,
                                                    desc="KL continuations", quiet=quiet)]
        prompt_ids = tok(prompts, add_special_tokens=False)["input_ids"]
        self.rows = [p + c for p, c in zip(prompt_ids, continuations, strict=True)]
        self.n_dist = [max(1, len(c)) for c in continuations]  # distributions predicting each continuation token
        self.batch_size = settings.batch_size
        self._folder = None if in_memory else tempfile.TemporaryDirectory(prefix="abliterate-kl-")
        self._files: dict[int, Path] = {}
        self._loaded: tuple[Path | None, dict[int, torch.Tensor]] = (None, {})

        def step(batch: Batch) -> None:
            lp = _teacher_forced_batch(baseline, batch, self._keep(batch))
            rows = {i: lp[b, -1 - self.n_dist[i]:-1].clone() for b, i in enumerate(batch.indices)}
            if self._folder is None:
                self._loaded[1].update(rows)
                return
            path = Path(self._folder.name) / f"{batch.indices[0]}.pt"
            torch.save(rows, path)
            self._files.update(dict.fromkeys(batch.indices, path))

        self._run(baseline, step, "KL (baseline)", quiet)

    def kl(self, lm: LoadedModel, quiet: bool = False) -> KL:
        first, total = torch.empty(len(self.rows)), torch.empty(len(self.rows), dtype=torch.float64)

        def step(batch: Batch) -> None:
            lp = _teacher_forced_batch(lm, batch, self._keep(batch))
            kls = [self._row_kl(i, lp[b, -1 - self.n_dist[i]:-1]) for b, i in enumerate(batch.indices)]
            first[batch.indices] = torch.tensor([float(k[0]) for k in kls])
            total[batch.indices] = torch.tensor([float(k.sum()) for k in kls], dtype=torch.float64)

        self._run(lm, step, "KL", quiet)
        count = sum(self.n_dist)
        return KL(first.mean().item(), (total.sum() / count).item(), count)

    def _keep(self, batch: Batch) -> int:
        return max(self.n_dist[i] for i in batch.indices) + 1

    def _run(self, lm: LoadedModel, step, desc: str, quiet: bool) -> None:
        """step on batches of rows; at most KL_LOGITS_BUDGET of float32 log-probabilities per forward."""
        vocab = lm.model.config.get_text_config().vocab_size
        size = max(1, min(resolve(lm, self.batch_size), KL_LOGITS_BUDGET // (4 * vocab * (max(self.n_dist) + 1))))
        with torch.inference_mode(), lm.running(), \
                tqdm(total=len(self.rows), desc=desc, unit="prompt", disable=quiet, leave=False) as bar:
            run_fitting(lm, list(batches(lm, self.rows, size)), step, progress=bar.update)

    def _row_kl(self, i: int, model_lp: torch.Tensor) -> torch.Tensor:
        """KL per continuation token of row i: its stored baseline log-probs against the model's."""
        path, loaded = self._loaded
        if self._folder is not None and path != self._files[i]:  # read in the order written: each file once
            self._loaded = (self._files[i], torch.load(self._files[i]))
            loaded = self._loaded[1]
        base = loaded[i]
        vocab = min(base.shape[-1], model_lp.shape[-1])
        return kl_divergence(base[..., :vocab], model_lp[..., :vocab])


def _teacher_forced_batch(lm: LoadedModel, batch: Batch, keep: int) -> torch.Tensor:
    """log-probs [B, keep, vocab] (float32, on the CPU) at the last `keep` positions (run inside lm.running())."""
    with torch.inference_mode():
        logits = lm.model(**batch.inputs(), use_cache=False, logits_to_keep=keep).logits
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
    count = sum(len(w) - 1 for w in windows)
    if count == 0:
        raise AbliterateError("the general text is shorter than two tokens for this tokenizer")
    size = resolve(lm, settings.batch_size)
    pieces = [Batch(list(range(i, min(i + size, len(windows)))), torch.tensor(windows[i:i + size], device=lm.device),
                    torch.ones(min(size, len(windows) - i), len(windows[0]), dtype=torch.long, device=lm.device))
              for i in range(0, len(windows), size)]
    totals = torch.zeros(len(windows), dtype=torch.float64)

    def step(batch: Batch) -> None:
        totals[batch.indices] = _window_nll(lm, batch.input_ids)

    with torch.inference_mode(), lm.running(), \
            tqdm(total=len(windows), desc=desc, unit="window", disable=quiet, leave=False) as bar:
        run_fitting(lm, pieces, step, progress=bar.update)  # out of memory: halved, never a traceback
    return totals.sum().item() / count, count


def _window_nll(lm: LoadedModel, chunk: torch.Tensor, step: int | None = None) -> torch.Tensor:
    """Summed NLL per window [rows] (float64) of each token given the ones before it, `step` positions per forward
    with the KV cache (default: as many as keep the float32 logits within NLL_LOGITS_BUDGET): the logits of a
    whole window ([batch, window, vocab], gigabytes for a 150k vocabulary) are never held at once; the model
    runs whole (its own final norm, logit scaling or soft-capping)."""
    vocab = lm.model.config.get_text_config().vocab_size
    step = step or max(1, min(256, NLL_LOGITS_BUDGET // (4 * vocab * chunk.shape[0])))
    total, cache = torch.zeros(chunk.shape[0], dtype=torch.float64), {}
    for s in range(0, chunk.shape[1] - 1, step):
        out = lm.model(input_ids=chunk[:, s:s + step], use_cache=True, **cache)
        key = "cache" if "cache" in out else "past_key_values"  # transformers >= 5.2x names it `cache`
        cache = {key: out[key]}
        targets = chunk[:, s + 1:s + step + 1]
        logits = out.logits[:, :targets.shape[1]].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                reduction="none")
        total += nll.view(targets.shape).sum(-1).double().cpu()
        del out, logits
    return total
