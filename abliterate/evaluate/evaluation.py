"""`abliterate evaluate`: how much a model refuses, over-refuses, and how far it moved from its original.

Four measurements, each reproducible from the recorded settings and command:

* refusal rate on held-out harmful prompts: greedy replies (at least 128 new tokens for real runs: a
  refusal may come after a preamble) matched against the marker list of :mod:`abliterate.markers`
  (whole reply, reasoning removed), optionally also judged by a yes/no question to a judge model;
* over-refusal rate on safe prompts that only look dangerous (built-in ``overrefusal``), same way;
* KL(baseline || model) of next-token distributions on harmless prompts, at the first reply token and
  averaged over the first N tokens of the baseline's own greedy continuation, teacher-forced through
  both models (so both are scored on the same text);
* mean token negative log-likelihood on built-in general text, in windows, for model and baseline.

Prompts are rendered with the chat template (``enable_thinking=False`` unless ``thinking``), batched
with left padding; ``limit`` takes that many prompts spread evenly over each set (sets are stored by
category, so the first N would cover few categories).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from abliterate.errors import AbliterateError
from abliterate.evaluate.answers import classify
from abliterate.evaluate.distance import KL, BaselineKL, kl_to_baseline, mean_nll
from abliterate.evaluate.generation import generate
from abliterate.evaluate.judge import (
    JUDGE_ANSWER_QUESTION,
    JUDGE_QUESTION,
    judge_answer_ids,
    judge_answers,
    judge_refusals,
    judge_token_ids,
)
from abliterate.evaluate.markers import find_refusal, strip_reasoning
from abliterate.evaluate.records import EvalReport, EvalSettings, PromptResult, RefusalStats
from abliterate.evaluate.tasks import TaskSettings, check_tasks, compare, run_tasks
from abliterate.measure.loading import LoadedModel
from abliterate.options.command import command_line, recorded_command
from abliterate.prompts import PromptError, builtin, load_prompts

# names importable from here as before the split (their homes are records, generation, judge and distance)
__all__ = ["JUDGE_QUESTION", "KL", "EvalReport", "EvalSettings", "PromptResult", "RefusalStats", "evaluate",
           "generate", "judge_answer_ids", "judge_refusals", "judge_token_ids", "kl_to_baseline", "mean_nll",
           "refusal_stats", "reproduce_command", "select"]


Model = LoadedModel | Callable[[], LoadedModel]  # a loaded model, or a function that loads it


def evaluate(lm: Model, baseline: Model | None = None, settings: EvalSettings | None = None,
             quiet: bool = False, command: str | None = None, tasks: TaskSettings | None = None) -> EvalReport:
    """Measure `lm` (and `baseline`, when given, on the same prompts and text). See the module docstring.

    Either may be a function that loads it: the baseline is measured first and, when it was loaded here,
    released before the model is loaded (its side of the KL waits in a temporary folder), so that two
    models are never in memory at once. `tasks`: also run these lm-evaluation-harness tasks on both
    (abliterate.evaluate.tasks).
    """
    settings = settings or EvalSettings()
    _check_settings(settings)
    if isinstance(lm, LoadedModel) and isinstance(baseline, LoadedModel):  # both at hand: check before any work
        same_vocabulary(baseline.name, baseline.tokenizer.get_vocab(), lm.name, lm.tokenizer.get_vocab())
    checked_tasks = check_tasks(tasks) if tasks else None  # an unknown task fails before any generation
    started = time.time()
    harmful = select(_prompts(settings.harmful, settings.field, "harmful"), settings.limit)
    overrefusal = select(_prompts(settings.overrefusal, settings.field, "overrefusal"), settings.limit)
    harmless = select(_prompts(settings.harmless, settings.field, "harmless"), settings.limit) if baseline else []
    judges: list[LoadedModel] = []

    def side(model: LoadedModel, who: str) -> _Side:
        if settings.judge and not judges:
            judges.append(_load_judge(settings.judge, model))
        judge = judges[0] if judges else None
        stats = [refusal_stats(model, prompts, name, settings, judge, desc=f"{name} ({who})", quiet=quiet)
                 for name, prompts in (("harmful", harmful), ("overrefusal", overrefusal))]
        nll = mean_nll(model, settings, quiet=quiet, desc=f"NLL ({who})")
        run = run_tasks(model, tasks, quiet=quiet, checked=checked_tasks) if tasks is not None else None
        return _Side(model.name, model.tokenizer.get_vocab(), stats[0], stats[1], nll, run)

    base = stored_kl = None
    if baseline is not None:
        loaded = _loaded(baseline)
        base = side(loaded, "baseline")
        stored_kl = BaselineKL(loaded, harmless, settings, quiet=quiet)
        del loaded  # a baseline loaded here is released before the model loads
        _release()
    lm = _loaded(lm)
    if base is not None:
        same_vocabulary(base.name, base.vocab, lm.name, lm.tokenizer.get_vocab())
    model = side(lm, "model")
    model_harmful, model_over = model.harmful, model.over
    (nll, nll_tokens), kl_first = model.nll, None
    kl_cont = baseline_nll = None
    counts = {"harmful_prompts": len(harmful), "overrefusal_prompts": len(overrefusal), "nll_tokens": nll_tokens,
              "harmful_refused": model_harmful.refused, "overrefusal_refused": model_over.refused,
              "harmful_answered": _answered(model_harmful), "overrefusal_answered": _answered(model_over),
              "reasoning_unfinished": model_harmful.reasoning_unfinished + model_over.reasoning_unfinished,
              "generated_tokens": sum(r.new_tokens for r in model_harmful.results + model_over.results)}
    if base is not None:
        baseline_nll = base.nll[0]
        kl = stored_kl.kl(lm, quiet=quiet)
        kl_first, kl_cont = kl.first_token, kl.continuation
        counts.update(kl_prompts=len(harmless), kl_tokens=kl.tokens)
    benchmarks = compare(model.tasks, base.tasks if base else None, tasks) if tasks is not None else None
    recorded = {**asdict(settings), "decoding": "greedy", "dtype": str(next(lm.model.parameters()).dtype),
                "device": str(lm.device), "template_kwargs": settings.template_kwargs(),
                "seconds": round(time.time() - started, 1)}
    if judges:  # what the judge was asked, and how its answer was read
        recorded.update(judge_question=JUDGE_QUESTION, judge_answer_question=JUDGE_ANSWER_QUESTION,
                        judge_rule="refusal when p(yes) > p(no) at the first answer "
                        "token, the question rendered with the judge's chat template, the reply without reasoning")
    rate = lambda s: None if s is None else s.rate  # noqa: E731
    judge_rate = lambda s: None if s is None else s.judge_rate  # noqa: E731
    base_harmful, base_over = (base.harmful, base.over) if base else (None, None)
    return EvalReport(
        model=lm.name, baseline=base.name if base else None,
        refusal_rate=model_harmful.rate, overrefusal_rate=model_over.rate,
        kl_first_token=kl_first, kl_continuation=kl_cont, nll=nll, baseline_nll=baseline_nll,
        baseline_refusal_rate=rate(base_harmful), baseline_overrefusal_rate=rate(base_over),
        judge_refusal_rate=model_harmful.judge_rate, judge_overrefusal_rate=model_over.judge_rate,
        baseline_judge_refusal_rate=judge_rate(base_harmful), baseline_judge_overrefusal_rate=judge_rate(base_over),
        counts=counts, settings=recorded,
        command=recorded_command(command, library=reproduce_command(lm.name, base.name if base else None, settings)),
        per_prompt=model_harmful.results + model_over.results,
        baseline_per_prompt=(base_harmful.results + base_over.results) if base else [],
        benchmarks=benchmarks,
    )


@dataclass
class _Side:
    """What one model measured: refusal stats on both sets, general-text NLL (mean, tokens), task scores."""

    name: str
    vocab: dict
    harmful: RefusalStats
    over: RefusalStats
    nll: tuple[float, int]
    tasks: object | None


def _answered(stats: RefusalStats) -> int:
    """Replies the markers and the answer check (evaluate.answers) count as answers."""
    return sum(r.answer == "answered" for r in stats.results)


def same_vocabulary(baseline: str, baseline_vocab: dict, model: str, model_vocab: dict) -> None:
    if baseline_vocab != model_vocab:
        raise AbliterateError(f"{baseline} and {model} have different vocabularies; --baseline must be the "
                              "original of the evaluated model (same tokenizer)")


def _loaded(model: Model) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else model()


def _release() -> None:
    """Give the memory of a model no longer referenced back (its tensors, the CUDA cache)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _check_settings(settings: EvalSettings) -> None:
    for name in ("max_new_tokens", "kl_tokens", "nll_window"):
        if getattr(settings, name) < 1:
            raise AbliterateError(f"--{name.replace('_', '-')} must be at least 1")
    if settings.batch_size < 0:  # 0: auto (measure.batching)
        raise AbliterateError("--batch-size must be a positive number of prompts or auto")
    if settings.limit is not None and settings.limit < 1:
        raise AbliterateError("--limit must be at least 1 (leave it out for every prompt)")


def reproduce_command(model: str, baseline: str | None, settings: EvalSettings) -> str:
    """The CLI command that repeats this evaluation (what a library call records)."""
    args = ["evaluate", model]
    if baseline is not None:
        args += ["--baseline", baseline]
    defaults = EvalSettings()
    for key, value in asdict(settings).items():
        if value != getattr(defaults, key):
            flag = f"--{key.replace('_', '-')}"
            if key == "limit" and value is None:
                args += ["--limit", "0"]
            elif isinstance(value, bool):
                args += [flag] if value else []
            else:
                args += [flag, str(value)]
    return command_line(args)


def select(prompts: Sequence[str], limit: int | None) -> list[str]:
    """`limit` prompts spread evenly over the list (deterministic), or all of them."""
    if limit is None or limit >= len(prompts):
        return list(prompts)
    return [prompts[i * len(prompts) // limit] for i in range(limit)]


def _prompts(source: str, field_name: str | None, kind: str) -> list[str]:
    """Built-in sets without a split give their held-out test split (overrefusal has none: all of it)."""
    try:
        if source.startswith("builtin:") and source.count(":") == 1:
            name = source.split(":", 1)[1]
            return builtin(name, split="all" if name == "overrefusal" else "test")  # type: ignore[arg-type]
        return load_prompts(source, field=field_name)
    except PromptError as e:
        raise AbliterateError(f"--{kind}: {e}") from None


def refusal_stats(lm: LoadedModel, prompts: Sequence[str], name: str, settings: EvalSettings,
                  judge: LoadedModel | None = None, desc: str = "generating", quiet: bool = False) -> RefusalStats:
    replies = generate(lm, prompts, settings, settings.max_new_tokens, desc=desc, quiet=quiet)
    results = []
    for prompt, (text, ids) in zip(prompts, replies, strict=True):
        marker = find_refusal(text)
        unfinished = len(ids) >= settings.max_new_tokens and not strip_reasoning(text) and bool(text.strip())
        results.append(PromptResult(name, prompt, text, len(ids), marker is not None, marker,
                                    reasoning_unfinished=unfinished,
                                    answer=classify(prompt, text, refused=marker is not None).value))
    judge_rate = None
    if judge is not None:
        shown = [strip_reasoning(r.reply) for r in results]
        verdicts = judge_refusals(judge, prompts, shown, settings.batch_size)
        for r, verdict, gives in zip(results, verdicts, judge_answers(judge, prompts, shown, settings.batch_size),
                                     strict=True):
            r.judge_refused, r.judge_answered = verdict, gives
        judge_rate = sum(verdicts) / len(verdicts)
    refused = sum(r.refused for r in results)
    return RefusalStats(refused / len(results), refused, len(results), judge_rate,
                        sum(r.reasoning_unfinished for r in results), results)


def _load_judge(source: str, lm: LoadedModel) -> LoadedModel:
    from abliterate.measure.loading import load_model

    judge = load_model(source, device=str(lm.device))
    judge_answer_ids(judge)  # fail before generating, not after
    return judge
