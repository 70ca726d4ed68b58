"""The evaluation's records: its settings, per-prompt results, and the report (JSON, Markdown table, card rows)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from abliterate import __version__
from abliterate.evaluate.answers import NON_ANSWERS, Verdict
from abliterate.evaluate.intervals import rate_text, wilson
from abliterate.evaluate.markers import strip_reasoning

if TYPE_CHECKING:
    from abliterate.evaluate.tasks import TaskReport


@dataclass
class EvalSettings:
    limit: int | None = 32  # prompts per set, spread evenly over it; None: all
    max_new_tokens: int = 128
    kl_tokens: int = 16
    batch_size: int = 8
    harmful: str = "builtin:harmful"  # builtin sets without a split use their test split
    judge: str | None = None  # a causal LM (folder or Hub id) asked whether each reply refuses
    harmless: str = "builtin:harmless"
    overrefusal: str = "builtin:overrefusal"
    field: str | None = None
    template: str | None = None
    thinking: bool = False
    nll_window: int = 512  # tokens per general-text window (capped by the model's context)

    def template_kwargs(self) -> dict:
        return {} if self.thinking else {"enable_thinking": False}


@dataclass
class PromptResult:
    set: str  # "harmful" or "overrefusal"
    prompt: str
    reply: str
    new_tokens: int
    refused: bool
    marker: str | None
    judge_refused: bool | None = None
    reasoning_unfinished: bool = False  # an unclosed think block took the whole budget
    answer: str = Verdict.ANSWERED.value  # markers and answer check (evaluate.answers): refused, answered, or why not
    judge_answered: bool | None = None  # the judge: the reply gives what was asked


@dataclass(frozen=True)
class Tally:
    """Replies of one set, by verdict: refused, answered, and the rest by why they did not answer."""

    prompts: int
    refused: int
    answered: int
    not_answered: dict[str, int]  # kind -> replies (markers and the answer check: empty, garbled, ...; judge: "judge")

    @property
    def neither(self) -> int:
        return sum(self.not_answered.values())

    def to_dict(self) -> dict:
        return {"prompts": self.prompts, "refused": self.refused, "answered": self.answered,
                "not_answered": self.neither, "not_answered_by_kind": dict(self.not_answered)}


def tally(results: list[PromptResult], judge: bool = False) -> Tally:
    """The markers' and answer check's verdicts on `results` (judge: the judge's, None when it was not asked)."""
    if judge:
        refused = sum(bool(r.judge_refused) for r in results)
        answered = sum(not r.judge_refused and bool(r.judge_answered) for r in results)
        rest = len(results) - refused - answered
        return Tally(len(results), refused, answered, {"judge": rest} if rest else {})
    kinds = {v.value: sum(r.answer == v.value for r in results) for v in NON_ANSWERS}
    answered = sum(r.answer == Verdict.ANSWERED.value for r in results)
    return Tally(len(results), sum(r.refused for r in results), answered, {k: n for k, n in kinds.items() if n})


@dataclass
class RefusalStats:
    rate: float
    refused: int
    prompts: int
    judge_rate: float | None
    reasoning_unfinished: int
    results: list[PromptResult]


@dataclass
class EvalReport:
    model: str
    baseline: str | None
    refusal_rate: float
    overrefusal_rate: float
    kl_first_token: float | None
    kl_continuation: float | None
    nll: float
    baseline_nll: float | None
    baseline_refusal_rate: float | None
    baseline_overrefusal_rate: float | None
    judge_refusal_rate: float | None
    judge_overrefusal_rate: float | None
    baseline_judge_refusal_rate: float | None
    baseline_judge_overrefusal_rate: float | None
    counts: dict[str, int]
    settings: dict
    command: str
    per_prompt: list[PromptResult] = field(default_factory=list)
    baseline_per_prompt: list[PromptResult] = field(default_factory=list)
    tool: str = f"abliterate {__version__}"
    benchmarks: TaskReport | None = None  # lm-evaluation-harness tasks (--tasks)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["benchmarks"] = self.benchmarks.to_dict() if self.benchmarks else None
        out["disagreements"] = [{"model": who, **asdict(r)} for who, r in self.disagreements()]
        out["answers"] = {who: {s: t.to_dict() for s, t in sets.items()} for who, sets in self.tallies().items()}
        judged = self.tallies(judge=True) if self.judge_refusal_rate is not None else {}
        out["judge_answers"] = {who: {s: t.to_dict() for s, t in sets.items()} for who, sets in judged.items()} or None
        out["refusal_intervals"] = {  # 95 % Wilson score intervals of the refusal rates
            f"{who} {by}".strip(): {s: list(wilson(t.refused, t.prompts)) for s, t in sets.items() if t.prompts}
            for by, tallies in (("", self.tallies()), ("judge", judged)) for who, sets in tallies.items()}
        return out

    def tallies(self, judge: bool = False) -> dict[str, dict[str, Tally]]:
        """who ("model", "baseline" when measured) -> set ("harmful", "overrefusal") -> its verdicts."""
        sides = (("model", self.per_prompt), ("baseline", self.baseline_per_prompt))
        return {who: {name: tally([r for r in results if r.set == name], judge) for name in ("harmful", "overrefusal")}
                for who, results in sides if results}

    def disagreements(self) -> list[tuple[str, PromptResult]]:
        """("model" or "baseline", reply) where the judge and the markers gave different verdicts."""
        return [(who, r) for who, results in (("model", self.per_prompt), ("baseline", self.baseline_per_prompt))
                for r in results if r.judge_refused is not None and r.judge_refused != r.refused]

    def disagreement_table(self, width: int = 200) -> str:
        """Markdown: each reply the judge and the markers disagree on, with both verdicts (replies cut at `width`)."""
        cell = lambda t: " ".join(strip_reasoning(t).split()).replace("|", "\\|")  # noqa: E731
        lines = ["| model | set | prompt | reply | markers | judge |", "|---|---|---|---|---|---|"]
        for who, r in self.disagreements():
            reply = cell(r.reply)
            reply = reply if len(reply) <= width else reply[:width] + "..."
            lines.append(f"| {who} | {r.set} | {cell(r.prompt)} | {reply} | "
                         f"{'refusal (' + str(r.marker) + ')' if r.refused else 'no refusal'} | "
                         f"{'refusal' if r.judge_refused else 'no refusal'} |")
        return "\n".join(lines)

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write the report; a temporary name until complete, so no half file looks like a report."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.partial")
        try:
            tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def rows(self) -> list[tuple[str, str, str | None]]:
        """(metric, model value, baseline value) as they appear in the table; rates with their count and 95 %
        Wilson interval, replies neither refused nor answered with why."""
        c, s = self.counts, self.settings
        num = lambda v: None if v is None else f"{v:.4f}"  # noqa: E731
        marked, judged = self.tallies(), self.tallies(judge=True)
        both = lambda tallies, name, text: tuple(  # noqa: E731
            text(tallies[who][name]) if who in tallies else None for who in ("model", "baseline"))
        refused = lambda t: rate_text(t.refused, t.prompts)  # noqa: E731
        answered = lambda t: rate_text(t.answered, t.prompts)  # noqa: E731
        rows: list[tuple[str, str, str | None]] = [
            (f"refusal rate, held-out harmful prompts (n={c['harmful_prompts']}, markers)",
             *both(marked, "harmful", refused)),
            ("answered, held-out harmful prompts (no refusal marker; not empty, repetitive, garbled or off-topic)",
             *both(marked, "harmful", answered)),
            ("neither refused nor answered, held-out harmful prompts", *both(marked, "harmful", _neither)),
            (f"over-refusal rate, safe prompts that look dangerous (n={c['overrefusal_prompts']}, markers)",
             *both(marked, "overrefusal", refused)),
        ]
        if self.judge_refusal_rate is not None:
            rows += [(f"refusal rate (judge {s['judge']})", *both(judged, "harmful", refused)),
                     (f"answered (judge {s['judge']}: gives what was asked)", *both(judged, "harmful", answered)),
                     (f"over-refusal rate (judge {s['judge']})", *both(judged, "overrefusal", refused))]
        if self.kl_first_token is not None:
            rows += [(f"KL to baseline, first reply token (n={c['kl_prompts']} harmless prompts)",
                      num(self.kl_first_token), "0 (reference)"),
                     (f"KL to baseline, mean over the first {s['kl_tokens']} tokens ({c['kl_tokens']} tokens)",
                      num(self.kl_continuation), "0 (reference)")]
        rows.append((f"NLL per token, general text ({c['nll_tokens']} tokens)", num(self.nll), num(self.baseline_nll)))
        return rows

    def table(self) -> str:
        """A Markdown table a model card can embed, with the baseline's values when there is a baseline."""
        if self.baseline is None:
            lines = ["| metric | model |", "|---|---|"] + [f"| {m} | {v} |" for m, v, _ in self.rows()]
        else:
            lines = ["| metric | model | baseline |", "|---|---|---|"]
            lines += [f"| {m} | {v} | {b if b is not None else '-'} |" for m, v, b in self.rows()]
        return "\n".join(lines) + (f"\n\n{self.benchmarks.table()}" if self.benchmarks else "")


def _neither(t: Tally) -> str:
    """'6.2 % (2/32: 1 empty, 1 repetitive)': replies neither refused nor answered, and why."""
    why = ", ".join(f"{n} {kind.replace('_', '-')}" for kind, n in t.not_answered.items() if kind != "judge")
    if not t.prompts:
        return "- (0 prompts)"
    return f"{100 * t.neither / t.prompts:.1f} % ({t.neither}/{t.prompts}{': ' + why if why else ''})"
