"""How far to trust a refusal verdict: the markers and any judge model scored on labelled replies.

The built-in set (``data/judge_set.jsonl``, written for this project) holds replies to requests that
chat models often refuse, labelled refusal or not, in the forms that fool simple detectors: refusals
worded without the usual phrases, partial refusals (the request declined, something safe offered:
a refusal), refuse-then-comply and comply-then-disclaim (not refusals), over-refusals of safe
prompts, replies in other languages, and replies after a reasoning block. A reply counts as a refusal
when it withholds what was asked for, whatever it says around it.

`check(items, judge)` returns each verdict source's accuracy overall and per kind, so a report's
marker and judge rates can be read with their measured error.

Whether a reply *answered* (evaluate.answers) is checked the same way (`check_answers`) on the same
replies, each answered unless it refuses, plus ``data/answer_set.jsonl``: replies that neither refuse
nor answer (empty, repetitive, garbled, off-topic) and long real answers, labelled ``answered``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from abliterate.errors import AbliterateError
from abliterate.evaluate.answers import Verdict, classify
from abliterate.evaluate.judge import judge_answer_ids, judge_answers, judge_refusals
from abliterate.evaluate.markers import find_refusal, strip_reasoning
from abliterate.measure.loading import LoadedModel


@dataclass(frozen=True)
class Labelled:
    kind: str
    prompt: str
    reply: str
    refusal: bool
    answered: bool | None = None  # gives what was asked; None: unlabelled, read as not refusal

    @property
    def answers(self) -> bool:
        return (not self.refusal) if self.answered is None else self.answered


@dataclass
class Accuracy:
    """One verdict source on the labelled set: right answers overall, on refusals and on the rest, per kind."""

    name: str
    correct: int
    total: int
    refusals_found: int
    refusals: int
    compliance_kept: int
    compliance: int
    per_kind: dict[str, tuple[int, int]]  # kind -> (correct, total)
    verdicts: list[bool]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


def load_labelled(path: str | Path | None = None, answers: bool = False) -> list[Labelled]:
    """The built-in set (answers: with the answer set after it), or a JSONL file of {"prompt", "reply", "refusal":
    true/false, "kind" and "answered": true/false (both optional)}."""
    if path is None:
        data = resources.files("abliterate.evaluate").joinpath("data")
        text = data.joinpath("judge_set.jsonl").read_text(encoding="utf-8")
        if answers:
            text += "\n" + data.joinpath("answer_set.jsonl").read_text(encoding="utf-8")
        where = "the built-in judge set"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise AbliterateError(f"--judge-set {path}: {e.strerror or e}") from None
        where = str(path)
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            items.append(Labelled(str(row.get("kind", "-")), str(row["prompt"]), str(row["reply"]), row["refusal"],
                                  row.get("answered")))
        except (ValueError, KeyError, TypeError):
            raise AbliterateError(f"{where}, line {n}: expected a JSON object with prompt, reply and refusal "
                                  "(true or false)") from None
        if not isinstance(items[-1].refusal, bool) or not isinstance(items[-1].answered, bool | None):
            raise AbliterateError(f"{where}, line {n}: refusal (and answered, when given) must be true or false")
    if not items:
        raise AbliterateError(f"{where} holds no labelled replies")
    return items


def load_judge(source: str, device: str = "auto") -> LoadedModel:
    """A judge model, checked for single 'yes'/'no' tokens before it is used."""
    from abliterate.measure.loading import load_model

    judge = load_model(source, device=device)
    judge_answer_ids(judge)
    return judge


def score(name: str, items: Sequence[Labelled], verdicts: Sequence[bool],
          labels: Sequence[bool] | None = None) -> Accuracy:
    """`verdicts` against the refusal labels (or `labels`: then "refusals" are the items labelled True)."""
    labels = [i.refusal for i in items] if labels is None else list(labels)
    per_kind: dict[str, tuple[int, int]] = {}
    for item, verdict, label in zip(items, verdicts, labels, strict=True):
        right, total = per_kind.get(item.kind, (0, 0))
        per_kind[item.kind] = (right + (verdict == label), total + 1)
    pairs = list(zip(labels, verdicts, strict=True))
    return Accuracy(
        name=name, correct=sum(v == lab for lab, v in pairs), total=len(pairs),
        refusals_found=sum(v for lab, v in pairs if lab), refusals=sum(labels),
        compliance_kept=sum(not v for lab, v in pairs if not lab), compliance=len(labels) - sum(labels),
        per_kind=per_kind, verdicts=list(verdicts))


def marker_verdicts(items: Sequence[Labelled]) -> list[bool]:
    return [find_refusal(i.reply) is not None for i in items]


def check(items: Sequence[Labelled], judge: LoadedModel | None = None, batch_size: int = 8) -> list[Accuracy]:
    """The markers' accuracy, and the judge's when one is given (asked exactly as `evaluate --judge` asks)."""
    out = [score("markers", items, marker_verdicts(items))]
    if judge is not None:
        verdicts = judge_refusals(judge, [i.prompt for i in items], [strip_reasoning(i.reply) for i in items],
                                  batch_size)
        out.append(score(f"judge {judge.name}", items, verdicts))
    return out


def check_answers(items: Sequence[Labelled], judge: LoadedModel | None = None, batch_size: int = 8) -> list[Accuracy]:
    """Whether each reply answered: the markers with the answer check (evaluate.answers), and the judge when given
    (no refusal by its refusal question, yes to its answer question). The "found" class is the non-answers."""
    labels = [not i.answers for i in items]
    heuristic = [classify(i.prompt, i.reply) is not Verdict.ANSWERED for i in items]
    out = [score("markers + answer check", items, heuristic, labels)]
    if judge is not None:
        prompts, replies = [i.prompt for i in items], [strip_reasoning(i.reply) for i in items]
        refused = judge_refusals(judge, prompts, replies, batch_size)
        gives = judge_answers(judge, prompts, replies, batch_size)
        out.append(score(f"judge {judge.name}", items, [r or not g for r, g in zip(refused, gives, strict=True)],
                         labels))
    return out


def table(results: Sequence[Accuracy], found: str = "refusals found", kept: str = "non-refusals kept") -> str:
    """Markdown: accuracy overall, on refusals (`found`), on the rest (`kept`), then per kind."""
    kinds = list(dict.fromkeys(k for r in results for k in r.per_kind))
    head = ["verdicts by", "accuracy", found, kept, *kinds]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in results:
        cells = [r.name, pct(r.correct, r.total), pct(r.refusals_found, r.refusals),
                 pct(r.compliance_kept, r.compliance)]
        cells += [pct(*r.per_kind[k]) if k in r.per_kind else "-" for k in kinds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pct(a: int, b: int) -> str:
    """a of b as a percentage with the counts; '-' for none."""
    return f"{100 * a / b:.1f} % ({a}/{b})" if b else "-"
