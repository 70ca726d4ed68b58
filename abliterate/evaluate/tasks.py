"""Standard benchmarks through lm-evaluation-harness, on models already loaded for the evaluation.

KL measures how far the next-token distribution moved, not what the model can still do; reasoning
damage shows up in benchmarks such as GSM8K even when KL is small. This module runs harness tasks
(registered names such as ``gsm8k`` or ``mmlu``, or local task folders and YAML files in the harness's
format) on the model, the baseline and a peft adapter alike: the harness's ``HFLM`` wraps the model
object that abliterate loaded, so nothing is loaded twice and an adapter is measured as it runs.

Settings follow the harness's conventions, so the numbers compare with published ones: each task's
own few-shot count unless ``num_fewshot`` is given, no chat template unless ``chat_template`` (then
few-shot examples as a multi-turn conversation, the harness's default), greedy generation as the task
configures it. The harness is an optional extra: ``pip install 'abliterate[bench]'``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from abliterate.errors import AbliterateError
from abliterate.measure.loading import LoadedModel
from abliterate.options.families import TaskOptions

INSTALL_HINT = "pip install 'abliterate[bench]'"


@dataclass(frozen=True)
class TaskSettings:
    tasks: tuple[str, ...]  # registered names, or paths of local task folders / YAML files
    limit: int | None = None  # documents per task (the harness's --limit); None: all
    num_fewshot: int | None = None  # None: each task's own
    chat_template: bool = False  # render through the model's chat template (harness: --apply_chat_template)
    batch_size: int = 8
    thinking: bool = False  # with chat_template: leave the template's thinking mode on
    template: str | None = None  # --template: the chat template to render with, for tokenizers without one

    def to_dict(self) -> dict:
        """The settings as recorded: a given template by its sha256 (the text is the user's file)."""
        out = asdict(self)
        if self.template is not None:
            out["template"] = "sha256:" + hashlib.sha256(self.template.encode()).hexdigest()
        return out


@dataclass
class Score:
    """One metric of one task: the value and the harness's standard error (None when it has none)."""

    value: float
    stderr: float | None


@dataclass
class TaskRun:
    """What the harness measured on one model: task -> metric (``acc``, ``exact_match,strict-match``) -> score."""

    scores: dict[str, dict[str, Score]]
    samples: dict[str, int]  # documents per task
    n_shot: dict[str, int]
    versions: dict[str, object]
    top_level: list[str]  # what was asked for (groups and tasks), in order: the rows of the table
    groups: dict[str, list[str]] = field(default_factory=dict)  # group -> its subtasks
    raw_samples: dict[str, list[dict]] = field(default_factory=dict, repr=False)  # with keep_samples


@dataclass
class TaskRow:
    task: str
    metric: str
    n: int
    n_shot: int | None
    model: Score
    baseline: Score | None

    @property
    def difference(self) -> Score | None:
        """model - baseline; its standard error combines both as independent (a bound for paired items)."""
        if self.baseline is None:
            return None
        errors = (self.model.stderr, self.baseline.stderr)
        stderr = None if None in errors else math.sqrt(sum(e * e for e in errors))  # type: ignore[operator]
        return Score(self.model.value - self.baseline.value, stderr)


@dataclass
class TaskReport:
    """The benchmark part of an evaluation report: rows for the table and card, settings for the record."""

    rows: list[TaskRow]
    settings: dict
    model: TaskRun
    baseline: TaskRun | None = None

    def table(self) -> str:
        with_base = self.baseline is not None
        head = "| task | metric | n | shots | model |" + (" baseline | difference |" if with_base else "")
        lines = [head, "|---" * (7 if with_base else 5) + "|"]
        for r in self.rows:
            cells = [r.task, r.metric, str(r.n), "-" if r.n_shot is None else str(r.n_shot), fmt(r.model)]
            if with_base:
                cells += [fmt(r.baseline), fmt(r.difference, signed=True)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def card_rows(self) -> list[tuple[str, str]]:
        """(name, value) rows in the card's evaluation table (baseline and difference in the value)."""
        out = []
        for r in self.rows:
            name = f"{r.task} {r.metric} (n={r.n}, {r.n_shot if r.n_shot is not None else '?'}-shot, lm-eval)"
            value = fmt(r.model)
            if r.baseline is not None:
                value += f" (baseline {fmt(r.baseline)}, difference {fmt(r.difference, signed=True)})"
            out.append((name, value))
        return out

    def to_dict(self) -> dict:
        return {"rows": [{**asdict(r), "difference": asdict(r.difference) if r.difference else None}
                         for r in self.rows], "settings": self.settings}


def fmt(score: Score | None, signed: bool = False) -> str:
    if score is None:
        return "-"
    value = f"{score.value:+.4f}" if signed else f"{score.value:.4f}"
    return value if score.stderr is None else f"{value} ± {score.stderr:.4f}"


def require_harness():
    """The lm_eval module, or the one-line error naming the extra to install."""
    try:
        import lm_eval
    except ImportError:
        raise AbliterateError(f"--tasks needs lm-evaluation-harness, which is not installed; {INSTALL_HINT}") from None
    return lm_eval


def task_settings(options: TaskOptions, batch_size: int, thinking: bool,
                  template: str | None = None) -> TaskSettings | None:
    """TaskSettings for --tasks (None without it), checked before any model loads: the harness installed,
    every task known; the other --tasks-* options need --tasks."""
    if not options.tasks:
        if options.tasks_limit is not None or options.tasks_fewshot is not None or options.tasks_chat_template:
            raise AbliterateError("--tasks-limit, --tasks-fewshot and --tasks-chat-template need --tasks")
        return None
    settings = TaskSettings(parse_tasks(options.tasks), limit=options.tasks_limit, num_fewshot=options.tasks_fewshot,
                            chat_template=options.tasks_chat_template, batch_size=batch_size, thinking=thinking,
                            template=template)
    check_tasks(settings)
    return settings


def parse_tasks(value: str | None) -> tuple[str, ...]:
    """'gsm8k, mmlu,./my_tasks' -> ('gsm8k', 'mmlu', './my_tasks'); empty entries dropped."""
    return tuple(t.strip() for t in (value or "").split(",") if t.strip())


@dataclass(frozen=True)
class _Resolved:
    names: list[str]  # what to pass to the harness, in the order given
    include: list[str]  # folders to index besides (or instead of) the built-in tasks
    builtin: bool  # some names are the harness's own: index its task folder too


def _resolve(tasks: Sequence[str]) -> _Resolved:
    """Local folders and YAML files become include paths and the task names they define."""
    names: list[str] = []
    include: list[str] = []
    builtin = False
    for entry in tasks:
        path = Path(entry).expanduser()
        if path.is_dir() or entry.endswith((".yaml", ".yml")):
            files = sorted(path.glob("*.y*ml")) if path.is_dir() else [path]
            if not files or not all(f.is_file() for f in files):
                raise AbliterateError(f"--tasks {entry}: no task YAML file there; a local task is a folder of "
                                      "YAML files in lm-evaluation-harness's format, or one such file")
            for f in files:
                name = _task_name(f, entry)
                if isinstance(name, str) and name not in names:
                    names.append(name)
            include.append(str((path if path.is_dir() else path.parent).resolve()))
        else:
            names.append(entry)
            builtin = True
    return _Resolved(names, list(dict.fromkeys(include)), builtin)


class _AnyTagLoader(yaml.SafeLoader):
    """Reads task YAML without running it: tags such as `!function utils.process_docs` load as None."""


_AnyTagLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _task_name(path: Path, entry: str) -> str | None:
    """The task (or group) a harness YAML file defines; None for a file that only holds shared settings."""
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_AnyTagLoader)  # the loader runs no tag
    except (OSError, yaml.YAMLError) as e:
        raise AbliterateError(f"--tasks {entry}: cannot read {path.name} ({str(e).splitlines()[0]})") from None
    name = (config.get("task") or config.get("group")) if isinstance(config, dict) else None
    return name if isinstance(name, str) else None


_MANAGERS: dict[tuple, object] = {}


def task_manager(include: Sequence[str], builtin: bool):
    """The harness's task index (indexing its ~200 built-in task folders takes seconds: kept per process)."""
    from lm_eval.tasks import TaskManager

    key = (tuple(include), builtin)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=list(include) or None, include_defaults=builtin)
    return _MANAGERS[key]


def check_tasks(settings: TaskSettings):
    """Fail on an unknown task before any model runs; returns (task manager, task names)."""
    require_harness()
    if settings.limit is not None and settings.limit < 1:
        raise AbliterateError("--tasks-limit must be at least 1 (leave it out for every document)")
    if settings.num_fewshot is not None and settings.num_fewshot < 0:
        raise AbliterateError("--tasks-fewshot must be 0 or more")
    resolved = _resolve(settings.tasks)
    if not resolved.names:
        raise AbliterateError("--tasks names no task; give names such as gsm8k,arc_easy or a local task folder")
    manager = task_manager(resolved.include, resolved.builtin)
    unknown = [n for n in resolved.names if n not in manager.all_tasks]
    if unknown:
        raise AbliterateError(f"--tasks: unknown task {', '.join(unknown)}; `lm-eval ls tasks` lists the registered "
                              "ones, and a local task is a folder of YAML files in the harness's format")
    return manager, resolved.names


def run_tasks(lm: LoadedModel, settings: TaskSettings, quiet: bool = False, keep_samples: bool = False,
              checked=None) -> TaskRun:
    """Run the tasks on the loaded model (a peft model runs with its adapter) and collect the scores."""
    require_harness()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from abliterate.measure.batching import AUTO, resolve

    manager, names = checked or check_tasks(settings)
    template_args = {} if settings.thinking else {"enable_thinking": False}
    if settings.chat_template and not (settings.template or getattr(lm.tokenizer, "chat_template", None)):
        raise AbliterateError("--tasks-chat-template: the tokenizer has no chat template; pass --template FILE "
                              "(a Jinja chat template)")
    with _harness_logs(), _template_in(lm.tokenizer, settings.template), lm.running():
        size = settings.batch_size or ("auto" if lm.device.type == "cuda" else resolve(lm, AUTO))  # harness: CUDA
        wrapped = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=size,
                       chat_template_args=template_args)
        try:
            results = simple_evaluate(model=wrapped, tasks=names, task_manager=manager, limit=settings.limit,
                                      num_fewshot=settings.num_fewshot, apply_chat_template=settings.chat_template,
                                      log_samples=keep_samples)
        except (FileNotFoundError, ValueError) as e:  # a local task's data file, a malformed task
            raise AbliterateError(f"--tasks: the harness could not run {', '.join(names)} "
                                  f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return _collect(results, names, keep_samples)


@contextmanager
def _template_in(tokenizer, template: str | None):
    """The harness renders (and records) the tokenizer's own template: lend it --template for the run."""
    if template is None:
        yield
        return
    saved = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        yield
    finally:
        tokenizer.chat_template = saved


def _collect(results: dict, names: list[str], keep_samples: bool) -> TaskRun:
    scores: dict[str, dict[str, Score]] = {}
    for task, entry in results["results"].items():
        metrics = {}
        for key, value in entry.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = entry.get(f"{metric}_stderr,{filt}")
            name = metric if filt == "none" else f"{metric},{filt}"
            metrics[name] = Score(float(value), float(stderr) if isinstance(stderr, (int, float)) else None)
        scores[task] = metrics
    samples = {t: int(v["effective"] if isinstance(v, dict) else v) for t, v in results.get("n-samples", {}).items()}
    return TaskRun(scores=scores, samples=samples, n_shot={k: int(v) for k, v in results.get("n-shot", {}).items()},
                   versions=dict(results.get("versions", {})), top_level=names,
                   groups={k: list(v) for k, v in results.get("group_subtasks", {}).items()},
                   raw_samples=results.get("samples", {}) if keep_samples else {})


def _count(run: TaskRun, task: str) -> int:
    """Documents behind a row: its own, or its subtasks' for a group."""
    if task in run.samples:
        return run.samples[task]
    return sum(_count(run, sub) for sub in run.groups.get(task, []))


def compare(model: TaskRun, baseline: TaskRun | None, settings: TaskSettings) -> TaskReport:
    """Rows for the tasks asked for (a group's aggregate, not its subtasks), each metric with its difference."""
    import lm_eval

    rows = []
    for task in model.top_level:
        for metric, score in model.scores.get(task, {}).items():
            base = baseline.scores.get(task, {}).get(metric) if baseline else None
            rows.append(TaskRow(task, metric, _count(model, task), model.n_shot.get(task), score, base))
    recorded = {**settings.to_dict(), "lm_eval": lm_eval.__version__, "n_shot": model.n_shot,
                "task_versions": model.versions, "fewshot_as_multiturn": settings.chat_template}
    return TaskReport(rows, recorded, model, baseline)


class _harness_logs:
    """The harness logs warnings meant for its own CLI users (e.g. about taking a model object); keep them
    out of abliterate's output unless something goes wrong."""

    def __init__(self, level: int = logging.ERROR):
        self.level = level
        self.saved: list[tuple[logging.Logger, int]] = []

    def __enter__(self):
        for name in ("lm-eval", "lm_eval"):
            logger = logging.getLogger(name)
            self.saved.append((logger, logger.level))
            logger.setLevel(self.level)
        return self

    def __exit__(self, *exc):
        for logger, level in self.saved:
            logger.setLevel(level)
