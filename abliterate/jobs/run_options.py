"""The whole job's options (`abliterate MODEL`, also `--push --stream` and `--search`), its output paths, and the
command line that rebuilds an output as a card's reader can run it: shared by the job's modules, so none of them
imports another for these."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from abliterate.options.command import command_line


@dataclass(frozen=True)
class RunOptions:
    model: str
    out: Path | None = None
    adapter: bool = False
    direction: Path | None = None
    recipe: Path | None = None
    harmful: str | None = None
    harmless: str | None = None
    field: str | None = None
    eval_harmful: str = "builtin:harmful"
    eval_harmless: str = "builtin:harmless"
    evaluate: bool = True
    push: bool = False
    repo_id: str | None = None
    private: bool = False
    force: bool = False
    revision: str | None = None
    device: str = "auto"
    dtype: str | None = None
    trust_remote_code: bool = False
    template: str | None = None  # --template: a Jinja file or text, for models without a chat template
    overwrite: bool = False
    stream: bool = False
    quiet: bool = False
    tasks: object | None = None  # evaluate.tasks.TaskSettings: lm-evaluation-harness tasks in the evaluation
    search: int | None = None  # --search N: trials of the search on the loaded model; its choice is applied
    max_kl: float | None = None  # the search's choice: fewest refusals within this KL
    max_refusals: float | None = None  # ... or lowest KL within this fraction of refused prompts
    time_budget: float | None = None  # seconds for the search's trials


def default_out(model: str, adapter: bool) -> Path:
    name = model.rstrip("/").rsplit("/", 1)[-1]
    return Path(f"{name}-abliterated{'-adapter' if adapter else ''}")


def kept_path(options: RunOptions, what: str) -> Path:
    """A file kept beside the output folder when the job fails after computing it."""
    out = options.out or default_out(options.model, options.adapter)
    return out.with_name(f"{out.name}.{what}.safetensors")


def regenerate_command(options: RunOptions, model: str | None = None) -> str:
    """The command that rebuilds this output, as a reader of the card can run it: the model as `model` (the
    card's base model) when given; --direction as the file uploaded beside the weights; other local files
    by their names only (no path of the publisher's disk); no --push, no token."""
    from abliterate.edit.weights import DIRECTION_NAME

    args = [model or options.model]
    direction = DIRECTION_NAME if options.direction is not None else None
    flags = {"--revision": options.revision, "--direction": direction, "--recipe": public_path(options.recipe),
             "--harmful": public_path(options.harmful), "--harmless": public_path(options.harmless),
             "--field": options.field, "--dtype": options.dtype, "--template": public_path(options.template)}
    for flag, value in flags.items():
        if value is not None:
            args += [flag, str(value)]
    for flag, value in {"--search": options.search, "--max-kl": options.max_kl,
                        "--max-refusals": options.max_refusals, "--time-budget": options.time_budget}.items():
        if value is not None:
            args += [flag, f"{value:g}"]
    if options.adapter:
        args.append("--adapter")
    if options.trust_remote_code:
        args.append("--trust-remote-code")
    return command_line(args)


def public_model(name: str) -> str:
    """A Hub id as it is; a local folder by its name only (a card never shows the publisher's disk)."""
    from abliterate.publish.card import is_hub_id

    return name if is_hub_id(name) else Path(name.rstrip("/")).name or name


def public_path(value: str | Path | None) -> str | None:
    """A local file by its name only; prompt sources such as builtin:NAME or hf:OWNER/NAME as they are."""
    if value is None or not Path(value).exists():
        return None if value is None else str(value)
    return Path(value).name
