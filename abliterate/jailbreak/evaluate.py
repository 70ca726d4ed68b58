"""`abliterate jailbreak evaluate`: how often each wrapper class gets harmful requests answered, with and without a
jailbreak vector subtracted at inference, and how far each class lowers the harmfulness projection.

Per class: the refusal rate (marker list, greedy replies) on harmful requests in that class's
wrappers; with `vectors`, the same with coeff x the vector of `source` (one class, or the shared
mean) subtracted after `layer` from the assistant header on, as `steer chat --coeff -C` does. The
classes the vector was not made from are the held-out ones: a drop there is transfer, not
memorisation. The cost of hardening: over-refusal on safe prompts that look dangerous, and the KL of
the first reply token on harmless prompts. The suppression measure: the mean projection on the
harmfulness direction at the instruction's last token, wrapped minus plain, and the mean projection
on the prompts whose wrapper succeeded and on those it did not.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from abliterate.evaluate.generation import generate
from abliterate.evaluate.markers import find_refusal, strip_reasoning
from abliterate.evaluate.records import EvalSettings
from abliterate.jailbreak.wrappers import Wrapper, by_class, wrapped
from abliterate.measure.loading import LoadedModel
from abliterate.measure.probe import post_positions, project
from abliterate.measure.scores import first_token_logprobs, kl_divergence
from abliterate.measure.templates import render
from abliterate.steer.steering import check_coeff, check_layer, steering

PLAIN = "(no wrapper)"


@dataclass(frozen=True)
class Hardening:
    vectors: np.ndarray  # [num_layers + 1, d]
    source: str  # the class the vector was made from, or "all classes"
    layer: int  # steering convention: added to the residual stream after decoder layer `layer`
    coeff: float  # the multiple subtracted


@dataclass
class ClassResult:
    cls: str
    prompts: int
    refusal: float
    refusal_hardened: float | None
    held_out: bool | None  # None: no hardening; True: the vector was not made from this class
    projection: float  # mean harmfulness projection at the instruction's last token
    projection_answered: float | None  # over the prompts answered (the wrapper succeeded)
    projection_refused: float | None


@dataclass
class JailbreakReport:
    classes: list[ClassResult]
    overrefusal: float
    overrefusal_hardened: float | None
    kl_hardened: float | None
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def save_json(self, path: str | os.PathLike) -> Path:
        """Written under a temporary name, then renamed: no half file looks like a report."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path


def _refused(lm: LoadedModel, prompts: Sequence[str], settings: EvalSettings, max_new_tokens: int) -> list[bool]:
    replies = generate(lm, prompts, settings, max_new_tokens, quiet=True)
    return [find_refusal(strip_reasoning(lm.tokenizer.decode(ids, skip_special_tokens=True))) is not None
            for _, ids in replies]


def _hardened(lm: LoadedModel, hardening: Hardening | None, k: int):
    if hardening is None:
        return contextlib.nullcontext()
    return steering(lm.model, lm.arch, hardening.layer, hardening.vectors[hardening.layer + 1], -hardening.coeff,
                    last=k)


def evaluate_jailbreaks(lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], overrefusal: Sequence[str],
                        wrappers: Sequence[Wrapper], harmfulness: np.ndarray, probe_row: int, *,
                        hardening: Hardening | None = None, settings: EvalSettings | None = None,
                        max_new_tokens: int = 128, quiet: bool = False) -> JailbreakReport:
    """harmfulness: unit rows [num_layers + 1, d]; probe_row: the residual stream its projection is read at."""
    settings = settings or EvalSettings()
    if hardening is not None:
        check_layer(hardening.layer, lm.num_layers)
        check_coeff(hardening.coeff)
    kwargs = settings.template_kwargs()
    groups = {PLAIN: list(harmful), **{c: wrapped(harmful, ws) for c, ws in by_class(wrappers).items()}}
    every = [render(lm.tokenizer, p, settings.template, **kwargs) for g in groups.values() for p in g]
    k = post_positions(lm, every, settings.template, **kwargs)
    results = []
    for cls, prompts in tqdm(groups.items(), desc="classes", disable=quiet, leave=False):
        refused = _refused(lm, prompts, settings, max_new_tokens)
        with _hardened(lm, hardening, k):
            hardened = _refused(lm, prompts, settings, max_new_tokens) if hardening else None
        values = project(lm, prompts, harmfulness, template=settings.template, batch_size=settings.batch_size,
                         quiet=True, **kwargs).values[:, probe_row, 0]
        mask = np.array(refused)
        results.append(ClassResult(
            cls, len(prompts), float(mask.mean()), None if hardened is None else float(np.mean(hardened)),
            None if hardening is None or cls == PLAIN else cls != hardening.source, float(values.mean()),
            float(values[~mask].mean()) if (~mask).any() else None, float(values[mask].mean()) if mask.any() else None))
    over = _refused(lm, overrefusal, settings, max_new_tokens)
    over_hardened, kl = None, None
    if hardening is not None:
        with _hardened(lm, hardening, k):
            over_hardened = float(np.mean(_refused(lm, overrefusal, settings, max_new_tokens)))
        plain = [render(lm.tokenizer, p, settings.template, **kwargs) for p in harmless]
        base = first_token_logprobs(lm, plain, settings.batch_size)
        with _hardened(lm, hardening, k):
            steered = first_token_logprobs(lm, plain, settings.batch_size)
        kl = float(kl_divergence(base, steered).mean())
    return JailbreakReport(results, float(np.mean(over)), over_hardened, kl)


def format_report(report: JailbreakReport, hardening: Hardening | None) -> str:
    """A Markdown table: one row per class, then over-refusal and harmless KL."""
    hard = f"refused, -{hardening.coeff:g} x vector({hardening.source}) after layer {hardening.layer}" \
        if hardening else "refused, hardened"
    lines = [f"| class | prompts | refused | {hard} | held out | harmfulness projection (answered / refused) |",
             "|---|---|---|---|---|---|"]
    plain = report.classes[0].projection
    for c in report.classes:
        shift = "" if c.cls == PLAIN else f" ({c.projection - plain:+.4f})"
        held = "-" if c.held_out is None else "yes" if c.held_out else "no (source)"
        lines.append(f"| {c.cls} | {c.prompts} | {pct(c.refusal)} | {pct(c.refusal_hardened)} | {held} | "
                     f"{c.projection:.4f}{shift} ({num(c.projection_answered)} / {num(c.projection_refused)}) |")
    lines.append(f"| over-refusal (safe prompts) | | {pct(report.overrefusal)} | {pct(report.overrefusal_hardened)} "
                 "| | |")
    if report.kl_hardened is not None:
        lines.append(f"| KL, first reply token on harmless prompts | | 0 | {report.kl_hardened:.4f} | | |")
    return "\n".join(lines)


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def suppression(report: JailbreakReport) -> dict[str, float]:
    """Per class, how far the wrapper lowers the harmfulness projection (plain minus wrapped mean; > 0: lowered)."""
    plain = report.classes[0].projection
    return {c.cls: plain - c.projection for c in report.classes[1:]}
