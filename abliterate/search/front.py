"""The trade-off front of refusals against KL: which trials are on it, picking one within limits, the table, and
the chosen point saved as a recipe plus its direction file."""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from abliterate import __version__
from abliterate.errors import AbliterateError
from abliterate.evaluate.intervals import interval_text
from abliterate.io.direction_file import Direction, save_direction
from abliterate.measure.loading import LoadedModel
from abliterate.options.command import recorded_command
from abliterate.search.space import CandidateSet, Point, direction_for

DIRECTION_SUFFIX = ".direction.safetensors"


@dataclass(frozen=True)
class TrialResult:
    number: int
    point: Point
    refusal_score: float  # mean first-token refusal log-odds on harmful validation prompts
    kl: float  # mean first-token KL on harmless validation prompts
    refusals: int | None  # greedy replies matching a refusal marker (None: not counted, was off the front)
    seconds: float
    overrefusals: int | None = None  # refused borderline (safe but dangerous-looking) prompts, counted with refusals


def dominated(values: tuple[float, float], others: list[tuple[float, float]]) -> bool:
    return any(o[0] <= values[0] and o[1] <= values[1] and o != values for o in others)


def best_text(trials: list[TrialResult], n: int) -> str:
    counted = [t for t in trials if t.refusals is not None]
    if not counted:
        return "-"
    best = min(counted, key=lambda t: (t.refusals, t.kl))
    return f"#{best.number} {best.refusals}/{n} refused, KL {best.kl:.4f}"


def _objectives(t: TrialResult) -> tuple[int, int, float]:
    return t.refusals or 0, t.overrefusals or 0, t.kl


def pareto_front(trials: list[TrialResult]) -> list[TrialResult]:
    """Counted trials not beaten on refusals, over-refusals (when counted) and KL, fewest refusals first."""
    counted = [t for t in trials if t.refusals is not None]
    front = [t for t in counted if not any(
        all(a <= b for a, b in zip(_objectives(o), _objectives(t), strict=True)) and _objectives(o) != _objectives(t)
        for o in counted)]
    unique = {_objectives(t): t for t in sorted(front, key=lambda t: -t.number)}  # equal points: first trial
    return sorted(unique.values(), key=lambda t: (t.refusals, t.overrefusals or 0, t.kl))


def pick(front: list[TrialResult], prompts: int, *, max_kl: float | None = None,
         max_refusals: float | None = None) -> TrialResult:
    """Fewest refusals within --max-kl; lowest KL within --max-refusals (a fraction of the prompts)."""
    if not front:
        raise AbliterateError("the study has no completed trial yet; run more --trials")
    fits = [t for t in front if (max_kl is None or t.kl <= max_kl)
            and (max_refusals is None or t.refusals <= max_refusals * prompts + 1e-9)]
    if not fits:
        lowest_kl, fewest = min(t.kl for t in front), min(t.refusals for t in front)
        raise AbliterateError(
            f"no trial on the front meets the limits (lowest KL {lowest_kl:.4f}, fewest refusals {fewest}/{prompts}); "
            "relax --max-kl / --max-refusals or run more --trials"
        )
    if max_refusals is not None and max_kl is None:
        return min(fits, key=lambda t: (t.kl, t.overrefusals or 0, t.refusals))
    return min(fits, key=lambda t: (t.refusals, t.overrefusals or 0, t.kl))


def table(front: list[TrialResult], prompts: int, chosen: TrialResult | None = None, borderline: int = 0) -> str:
    """The front, one trial a line: refused (with the 95 % Wilson interval of its rate), borderline, KL, score."""
    over = f" {'borderline':>10}" if borderline else ""
    lines = [f"{'trial':>5} {'refused':>9} {'95 % CI':>13}{over} {'KL':>8} {'score':>7}  edit"]
    for t in front:
        mark = "  <- chosen" if chosen is not None and t.number == chosen.number else ""
        over = f" {f'{t.overrefusals}/{borderline}':>10}" if borderline else ""
        interval = interval_text(t.refusals, prompts) if t.refusals is not None and prompts else "-"
        lines.append(f"{t.number:>5} {f'{t.refusals}/{prompts}':>9} {interval:>13}{over} {t.kl:>8.4f} "
                     f"{t.refusal_score:>+7.2f}  {t.point.describe()}{mark}")
    return "\n".join(lines)


def _proposals(metadata: dict[str, str], k: int) -> dict[str, str]:
    """Where the extraction's rows 1..k-1 came from (principal directions or categories), for the chosen file."""
    out = {key: metadata[key] for key in ("proposals",) if key in metadata}
    with contextlib.suppress(KeyError, ValueError, TypeError):  # none recorded (principal directions), or bad
        out["proposal_categories"] = json.dumps(list(json.loads(metadata["proposal_categories"]))[: k - 1])
    return out


def save_choice(choice: TrialResult, cands: CandidateSet, lm: LoadedModel, out: Path, *, prompts: int,
                study: Path, study_name: str, borderline: int = 0, model_name: str | None = None) -> tuple[Path, Path]:
    """Write OUT (a recipe naming the direction and per-layer scales) and its direction file beside it
    (`model_name`: what the direction file records as its model, default the loaded model's name)."""
    out = Path(out)
    direction_path = out.with_name(out.stem + DIRECTION_SUFFIX)
    r = direction_for(cands, choice.point)
    rank = {"rank": r.rank, **_proposals(cands.metadata, r.rank)} if isinstance(r, Direction) else {}
    command = recorded_command()
    save_direction(direction_path, r.vectors if isinstance(r, Direction) else r, {**rank,
        "model": model_name or lm.name, "layer": math.floor(choice.point.layer), "position": choice.point.position,
        "hidden_size": lm.hidden_size, "num_layers": lm.num_layers, "command": command,
        "tool": f"abliterate {__version__}", "search_params": json.dumps(choice.point.params()),
        "search_trial": choice.number, "refusals": f"{choice.refusals}/{prompts}", "kl": f"{choice.kl:.5f}",
        "overrefusals": None if choice.overrefusals is None else f"{choice.overrefusals}/{borderline}"})
    options = choice.point.options(lm.num_layers)
    recipe = {
        "name": "search",
        "notes": (f"abliterate search, trial {choice.number} of study {study_name!r} ({study.name}): "
                  f"{choice.refusals}/{prompts} validation prompts refused"
                  + (f", {choice.overrefusals}/{borderline} borderline" if choice.overrefusals is not None else "")
                  + f", first-token KL {choice.kl:.4f}; "
                  f"{choice.point.describe()}"),
        "apply": {"direction": direction_path.name, "scale": 1.0, "layers": None,
                  "components": ["embed", "attn", "mlp"], "targets": [], "keep_tied": False,
                  "layer_scales": {c: list(v) for c, v in options.layer_scales.items()},
                  "norm_preserve": options.norm_preserve},
    }
    header = (f"# written by: {command}\n# model: {lm.name}\n"
              f"# apply it: abliterate apply MODEL --recipe {out.name} --out DIR\n")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(header + yaml.safe_dump(recipe, sort_keys=False))
    tmp.replace(out)
    return out, direction_path
