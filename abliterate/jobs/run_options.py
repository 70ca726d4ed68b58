"""The whole job's options (`abliterate MODEL`, also `--push --stream` and `--search`), its output paths, and the
command line that rebuilds an output as a card's reader can run it: shared by the job's modules, so none of them
imports another for these."""

from __future__ import annotations

from dataclasses import MISSING, dataclass
from pathlib import Path

import click

from abliterate.options.command import command_line
from abliterate.options.declared import command_args, group, like, option
from abliterate.options.families import ExtractOptions, TaskOptions

__all__ = ["RunOptions", "default_out", "kept_path", "public_model", "regenerate_command", "study_path"]


def _uploaded_direction(_path: Path) -> str:
    """--direction as the card's reader has it: the file uploaded beside the weights."""
    from abliterate.edit.weights import DIRECTION_NAME

    return DIRECTION_NAME


@dataclass(frozen=True)
class RunOptions:
    """The whole job's options: each field is its click option and, unless recorded "never", part of the
    command the card gives to rebuild the output (abliterate.options.declared)."""

    model: str = option(help="", default=MISSING, record="never")  # the argument (regenerate_command writes it)
    out: Path | None = option("--out", type=click.Path(path_type=Path), record="never",
                              help="Output folder (default: ./NAME-abliterated, or NAME-abliterated-adapter).")
    push_to: str | None = option("--push", is_flag=False, flag_value="", metavar="[REPO_ID]", record="never",
                                 help="Push the result to the Hub (default repo: YOUR_USER/NAME-abliterated).")
    adapter: bool = option("--adapter", is_flag=True,
                           help="Write an exactly equivalent LoRA adapter instead of weights (rank 1, rank k "
                           "for k directions).")
    revision: str | None = option("--revision", help="Hub revision (branch, tag or commit) of MODEL.")
    direction: Path | None = option("--direction", type=click.Path(path_type=Path), record=_uploaded_direction,
                                    help="Use this direction file instead of extracting one.")
    recipe: Path | None = option("--recipe", type=click.Path(path_type=Path), record="path",
                                 help="Recipe YAML overriding the family's settings (see recipes/README.md).")
    harmful: str | None = option("--harmful", recipe="extract.harmful", default=None, record="path",
                                 help="Harmful prompts for extraction (default: the recipe's, built-in).")
    harmless: str | None = option("--harmless", recipe="extract.harmless", default=None, record="path",
                                  help="Harmless prompts for extraction (default: the recipe's, built-in).")
    field: str | None = option("--field", help="Column/field holding the prompt in structured files or datasets.")
    dtype: str | None = option("--dtype", recipe="extract.dtype", default=None,
                               help="Compute dtype for extraction/evaluation (default: the recipe's).")
    template: str | None = option("--template", record="path",
                                  help="Chat template (Jinja file or text) for models without one.")
    directions: int | None = like(ExtractOptions, "directions", default=None, show_default=False)  # None: recipe's
    proposals: str | None = like(ExtractOptions, "proposals", default=None, show_default=False)
    search: int | None = option("--search", type=int, metavar="N",
                                help="Search N trials of direction and per-layer strengths on the loaded model (as "
                                "`abliterate search`) and apply the chosen point; the card shows the front and the "
                                "recipe. Default without --direction, --directions, --stream, --one-shot or a recipe "
                                "with an apply section: a short search (32 trials, none started after 10 minutes) "
                                "choosing the lowest KL with at most 5 % of the validation prompts refused.")
    one_shot: bool = option("--one-shot", is_flag=True,
                            help="The paper's one-shot selection: apply the extraction's choice, removed fully from "
                            "every writer, without the default short search.")
    max_kl: float | None = option("--max-kl", type=float,
                                  help="With --search: the fewest refusals with KL at most this.")
    max_refusals: float | None = option("--max-refusals", type=float, help="With --search: the lowest KL with at "
                                        "most this fraction of validation prompts refused.")
    time_budget: float | None = option("--time-budget", type=float,
                                       help="With --search: seconds for the trials (no new trial starts after this).")
    eval_harmful: str = option("--eval-harmful", default="builtin:harmful", show_default=True, record="never",
                               help="Held-out harmful prompts for the evaluation.")
    eval_harmless: str = option("--eval-harmless", default="builtin:harmless", show_default=True, record="never",
                                help="Harmless prompts for the evaluation's KL.")
    evaluate: bool = option("--eval/--no-eval", default=True, record="never",
                            help="Run the quick evaluation (--no-eval: skip it; the card then has no numbers).")
    tasks: TaskOptions = group(TaskOptions, record=False)  # lm-evaluation-harness tasks in the evaluation
    private: bool = option("--private", is_flag=True, record="never", help="Create the Hub repo private.")
    force: bool = option("--force", is_flag=True, record="never",
                         help="Push even into an existing repo abliterate did not create.")
    device: str = option("--device", default="auto", show_default=True, record="never",
                         help="cpu, cuda, mps or auto.")
    trust_remote_code: bool = option("--trust-remote-code", is_flag=True,
                                     help="Allow the model's own Python code from the Hub.")
    overwrite: bool = option("--overwrite", is_flag=True, record="never", help="Replace --out if it exists.")
    stream: bool = option("--stream", is_flag=True, record="never",
                          help="With --push and --direction: download, edit, upload and delete one shard at a time "
                          "(disk for about two shards); a rerun resumes; --out is the work folder.")
    quiet: bool = option("--quiet", "-q", is_flag=True, record="never", help="No progress messages.")

    @property
    def push(self) -> bool:
        return self.push_to is not None

    @property
    def repo_id(self) -> str | None:
        """The repo named after --push; None: the default (YOUR_USER/NAME-abliterated)."""
        return self.push_to or None


def default_out(model: str, adapter: bool) -> Path:
    name = model.rstrip("/").rsplit("/", 1)[-1]
    return Path(f"{name}-abliterated{'-adapter' if adapter else ''}")


def kept_path(options: RunOptions, what: str, suffix: str = ".safetensors") -> Path:
    """A file kept beside the output folder when the job fails after computing it."""
    out = options.out or default_out(options.model, options.adapter)
    return out.with_name(f"{out.name}.{what}{suffix}")


def study_path(options: RunOptions) -> Path:
    """The `--search` study (SQLite), beside the output folder from its first trial, so that a failure or a kill
    leaves every finished trial there; a rerun with the kept extraction (--direction) resumes it."""
    return kept_path(options, "search", ".study.db")


def regenerate_command(options: RunOptions, model: str | None = None) -> str:
    """The command that rebuilds this output, as a reader of the card can run it: the model as `model` (the
    card's base model) when given; --direction as the file uploaded beside the weights; other local files
    by their names only (no path of the publisher's disk); no --push, no token, no evaluation settings."""
    return command_line([model or options.model, *command_args(options)])


def public_model(name: str) -> str:
    """A Hub id as it is; a local folder by its name only (a card never shows the publisher's disk)."""
    from abliterate.publish.card import is_hub_id

    return name if is_hub_id(name) else Path(name.rstrip("/")).name or name
