"""The model card (README.md) and the checksum manifest of an output folder.

The card is rendered from plain data (what was done, the evaluation, the commands) and never
computes tensors. Its YAML header carries the metadata the Hub indexes (base_model,
base_model_relation, library_name, tags, license); its body says what was edited, how to
reproduce it, and lists the sha256 of every file, which `abliterate verify FOLDER` checks.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from abliterate.errors import AbliterateError
from abliterate.evaluate.intervals import interval_text
from abliterate.evaluate.records import EvalReport
from abliterate.publish.front_plot import FRONT_PICTURE, FrontPicture, TrialPoint, draw_front

CHECKSUMS_NAME = "SHA256SUMS"
CARD_NAME = "README.md"


@dataclass(frozen=True)
class DirectionSummary:
    """Which direction was removed. Built from a direction file's metadata, which a user's file may lack
    keys of: those are None and the card shows "?"."""

    model: str  # the model it was measured on, as the card names it
    layer: str | None = None
    position: str | None = None
    selection: str | None = None  # which selection filter was relaxed, if one was
    rank: int = 1  # k: the span of k directions removed (metadata `rank`)
    proposals: str | None = None  # where rows 1..k-1 came from (metadata `proposals`): principal, categories
    categories: tuple[str, ...] = ()  # with proposals "categories": the categories of rows 1..k-1

    @classmethod
    def of(cls, metadata: Mapping[str, str], model: str) -> DirectionSummary:
        rank = metadata.get("rank", "1")
        try:
            categories = tuple(str(c) for c in json.loads(metadata.get("proposal_categories", "[]")))
        except (ValueError, TypeError):
            categories = ()
        return cls(model, metadata.get("layer"), metadata.get("position"), metadata.get("selection"),
                   int(rank) if rank.isdigit() else 1, metadata.get("proposals"), categories)

    def beside(self) -> str:
        """What the card says of the directions beside the chosen one ("" for one direction)."""
        if self.rank <= 1:
            return ""
        n = self.rank - 1
        if self.proposals == "principal":
            what = f"the {n} leading principal directions of the per-prompt differences there"
        elif self.proposals == "categories" and self.categories:
            what = f"the differences of {n} categories of the harmful prompts there ({', '.join(self.categories)})"
        else:
            what = f"{n} more directions from the file"
        return f"; with {what}, {self.rank} directions (rank {self.rank})"


@dataclass(frozen=True)
class EditSummary:
    """What the edit did, as the card states it."""

    scale: float
    layers: str | None  # as given (START:END); None: every layer
    components: tuple[str, ...]
    edited: int  # tensors edited
    untied: str | None = None  # the output embedding written untied, holding the original matrix
    notes: tuple[str, ...] = ()
    norm_preserve: bool = False  # each written vector rescaled to its original norm (`--norm-preserve`)


@dataclass(frozen=True)
class EvalSummary:
    """The evaluation as the card shows it: (metric, value) rows and the command that measured them."""

    rows: tuple[tuple[str, str], ...]
    command: str

    @classmethod
    def of(cls, report: EvalReport) -> EvalSummary:
        """The report's rows (the baseline's value beside the model's), then its benchmark rows."""
        rows = [(metric, value if base is None else f"{value} (baseline {base})")
                for metric, value, base in report.rows()]
        rows += report.benchmarks.card_rows() if report.benchmarks else []
        return cls(tuple(rows), report.command)


@dataclass(frozen=True)
class FrontRow:
    """One point of the search's Pareto front."""

    trial: int
    refused: str  # "k/n" refused validation prompts
    borderline: str | None  # "k/n" refused borderline prompts; None when they were not counted
    kl: float
    edit: str  # the point, described


@dataclass(frozen=True)
class SearchSummary:
    """What `--search` did, as the card shows it: the front, the chosen trial and the limits that chose it."""

    trials: int
    seconds: float
    chosen: int
    front: tuple[FrontRow, ...]
    max_kl: float | None
    max_refusals: float | None
    recipe_file: str  # the chosen recipe's name beside the weights
    trials_seen: tuple[TrialPoint, ...] = ()  # every completed trial, for the picture (empty: the front only)
    prompts: int = 0  # validation prompts the refusals are counted on (0: read from the front's k/n)

    def picture(self) -> FrontPicture:
        """What the card's picture of the front shows."""
        front = [(row.trial, int(k), float(row.kl)) for row in self.front
                 for k, _, n in [row.refused.partition("/")] if k.isdigit() and n.isdigit()]
        prompts = self.prompts or next((int(row.refused.partition("/")[2]) for row in self.front
                                        if row.refused.partition("/")[2].isdigit()), 0)
        return FrontPicture(front, self.trials_seen, self.chosen, prompts, self.trials)


@dataclass(frozen=True)
class StageRow:
    """One stage of the job that made the output, as the card shows it (values already formatted)."""

    stage: str
    wall_time: str
    peak_rss: str
    peak_gpu: str | None = None  # None: no CUDA device


@dataclass(frozen=True)
class CardInfo:
    base_model: str
    adapter: bool
    license: str | None
    direction: DirectionSummary
    edit: EditSummary
    evaluation: EvalSummary | None
    regenerate: str  # the command that rebuilds this output
    recipe_name: str = "default"
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    direction_file: str = "refusal_direction.safetensors"
    search: SearchSummary | None = None
    stages: tuple[StageRow, ...] = ()  # wall time and peak memory of each stage of the job
    front_picture: str | None = None  # the search front's PNG beside the card; "": not drawn (no matplotlib)


def sha256_file(path: Path, block: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def checksums(folder: Path, exclude: tuple[str, ...] = (CARD_NAME, CHECKSUMS_NAME)) -> dict[str, str]:
    """sha256 of every file below `folder` (the card and the manifest themselves excluded)."""
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and str(p.relative_to(folder)) not in exclude and ".cache" not in p.parts}


def write_checksums(folder: Path, sums: dict[str, str]) -> None:
    (folder / CHECKSUMS_NAME).write_text("".join(f"{h}  {p}\n" for p, h in sums.items()))


def read_checksums(folder: Path) -> dict[str, str]:
    path = folder / CHECKSUMS_NAME
    if not path.is_file():
        raise AbliterateError(f"{folder} has no {CHECKSUMS_NAME}; pass the original folder too to verify an edit")
    sums = {}
    for line in path.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise AbliterateError(f"{path}: malformed line {line!r}")
        sums[name] = digest
    return sums


def check_checksums(folder: Path) -> list[str]:
    """Problems found comparing `folder` with its SHA256SUMS (empty: everything matches)."""
    problems = []
    for name, digest in read_checksums(folder).items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(path) != digest:
            problems.append(f"{name} does not match its sha256")
    return problems


def is_hub_id(name: str) -> bool:
    """OWNER/NAME of a Hub repo, not a local path: only those belong in `base_model` and in a Hub link."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name)) and not Path(name).exists()


def metadata(info: CardInfo) -> dict[str, object]:
    meta: dict[str, object] = {
        **({"base_model": info.base_model} if is_hub_id(info.base_model) else {}),
        "base_model_relation": "adapter" if info.adapter else "finetune",
        "library_name": "peft" if info.adapter else "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["abliterated", "abliterate", "refusal-direction", *(["lora", "peft"] if info.adapter else [])],
    }
    if info.license:
        meta["license"] = info.license
    return meta


def _formula(scale: float, rank: int, norm_preserve: bool) -> str:
    basis = "Q (Q^T W), Q their orthonormal basis," if rank > 1 else "r (r^T W)"
    if not norm_preserve:
        return f"W' = W - {scale} {basis}"
    removed = "Q Q^T" if rank > 1 else "r r^T"
    return (f"W' = (I - {scale} {removed}) W D, D rescaling each vector written into the residual stream to its "
            "original norm (norm-preserving),")


def render_card(info: CardInfo) -> str:
    header = yaml.safe_dump(metadata(info), sort_keys=False, allow_unicode=True)
    d, e = info.direction, info.edit
    lora = "DoRA adapter (norm-preserving)" if e.norm_preserve else "LoRA adapter"
    kind = f"a rank-{d.rank} {lora} for" if info.adapter else "a copy of"
    lines = [
        f"---\n{header}---\n",
        f"# {info.base_model.rsplit('/', 1)[-1]}, abliterated\n",
        f"This is {kind} {_link(info.base_model)} with its refusal direction "
        "projected out of every matrix that writes into the residual stream (Arditi et al. 2024, "
        "[arXiv 2406.11717](https://arxiv.org/abs/2406.11717)), made with abliterate. Other weights are unchanged, "
        "byte for byte.\n",
        "## What was done\n",
        "| | |\n|---|---|",
        f"| direction | difference of means at layer {d.layer or '?'}, post-instruction position "
        f"{d.position or '?'}, from `{d.model}`{d.beside()} |",
        f"| edit | {_formula(e.scale, d.rank, e.norm_preserve)} on {e.edited} tensors "
        f"({', '.join(e.components)}; layers {e.layers or 'all'}) |",
        f"| recipe | `{info.recipe_name}` |",
    ]
    if d.selection and d.selection != "every filter held":
        lines.append(f"| selection | {d.selection} |")
    if e.untied:
        lines.append(f"| tied embeddings | untied: `{e.untied}` holds the original matrix |")
    lines.append(f"\nThe direction is in `{info.direction_file}` beside the weights.")
    for note in e.notes:
        lines.append(f"\n> {note}")
    if info.search:
        lines += search_section(info.search, info.base_model, info.front_picture)
    if info.evaluation:
        lines += ["\n## Evaluation\n", "| metric | value |", "|---|---|"]
        lines += [f"| {metric} | {value} |" for metric, value in info.evaluation.rows]
        lines.append("\nRates come with their count and 95 % Wilson score interval. A reply is answered when it has no "
                     "refusal marker and is not empty, repetitive, garbled or off-topic (a cheap check of the reply's "
                     "words, not of its meaning; a judge model reads meaning).")
        lines.append(f"\nMeasured with:\n\n```bash\n{info.evaluation.command}\n```")
    lines += stages_section(info.stages)
    lines += ["\n## Reproduce\n", f"```bash\n{info.regenerate}\n```"]
    if info.files:
        lines += ["\n## Files (sha256)\n", "Check a download with `abliterate verify FOLDER`.\n", "```"]
        lines += [f"{h}  {p}" for p, h in info.files.items()]
        lines.append("```")
    return "\n".join(lines) + "\n"


def stages_section(stages: tuple[StageRow, ...]) -> list[str]:
    """What each stage of the job that made this output took: wall time, peak memory."""
    if not stages:
        return []
    gpu = any(s.peak_gpu is not None for s in stages)
    head = "| stage | wall time | peak RSS |" + (" peak GPU memory |" if gpu else "")
    return ["\n## Resources\n", head, "|---|---|---|" + ("---|" if gpu else ""),
            *(f"| {s.stage} | {s.wall_time} | {s.peak_rss} |" + (f" {s.peak_gpu or '-'} |" if gpu else "")
              for s in stages)]


def search_section(s: SearchSummary, base_model: str, picture: str | None = None) -> list[str]:
    """The search's front (refusals, borderline refusals, KL on validation prompts), its picture and the chosen
    point."""
    borderline = any(row.borderline for row in s.front)
    lines = ["\n## Search\n",
             f"{s.trials} trials ({s.seconds} s) searched the direction and per-layer strengths; the "
             "front of refused validation prompts (greedy replies matched against refusal markers)"
             + (", refused borderline prompts" if borderline else "")
             + " and first-token KL on harmless ones (95 % CI: the Wilson score interval of the refusal rate):\n",
             "| trial | refused | 95 % CI |" + (" borderline refused |" if borderline else "") + " KL | edit |",
             "|---|---|---|" + ("---|" if borderline else "") + "---|---|"]
    for row in s.front:
        mark = " **(chosen)**" if row.trial == s.chosen else ""
        over = f" {row.borderline} |" if borderline else ""
        lines.append(f"| {row.trial}{mark} | {row.refused} | {_interval(row.refused)} |{over} {row.kl} | {row.edit} |")
    limits = {"max-kl": s.max_kl, "max-refusals": s.max_refusals}
    rule = ", ".join(f"{k} {v}" for k, v in limits.items() if v is not None) or "fewest refusals, then lowest KL"
    lines.append(f"\nChosen by: {rule}. `{s.recipe_file}` beside the weights holds the chosen edit; "
                 f"`abliterate apply {base_model} --recipe {s.recipe_file} --out DIR`, run in a "
                 "download of this repo, rebuilds these weights byte for byte.")
    if picture:
        lines.append(f"\n![refused validation prompts against KL: every trial, the front, the chosen point]({picture})")
    elif picture == "":
        lines.append("\nNo picture of the front: matplotlib is not installed (`pip install 'abliterate[plot]'`).")
    return lines


def _interval(count: str) -> str:
    """The 95 % Wilson interval of a "k/n" count's rate ("-" when it is no such count)."""
    k, _, n = count.partition("/")
    if not (k.isdigit() and n.isdigit()) or int(n) == 0 or int(k) > int(n):
        return "-"
    return interval_text(int(k), int(n))


def _link(model: str) -> str:
    return f"[{model}](https://huggingface.co/{model})" if is_hub_id(model) else f"`{model}`"


def write_card(folder: Path, info: CardInfo) -> None:
    """README.md and SHA256SUMS for a finished output folder; with a search, its front as a picture beside them
    (listed in SHA256SUMS), unless matplotlib is missing: then the card says so."""
    picture = None
    if info.search is not None:
        picture = FRONT_PICTURE if draw_front(info.search.picture(), folder / FRONT_PICTURE) else ""
    sums = checksums(folder)
    write_checksums(folder, sums)
    (folder / CARD_NAME).write_text(render_card(replace(info, files=sums, front_picture=picture)))


def base_license(card_text: str | None) -> str | None:
    """The license in a base model card's YAML header, if any."""
    if not card_text or not card_text.startswith("---"):
        return None
    try:
        meta = yaml.safe_load(card_text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return str(value) if value else None
