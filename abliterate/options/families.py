"""Command families' options, declared once (abliterate.options.declared): the lm-evaluation-harness task
options `evaluate` and the whole job share, the model options of every model-running command, `extract`'s and
`apply`'s. The whole job's are
jobs/run_options.RunOptions (its record rules name the job's output files)."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import click

from abliterate.options.declared import group, option
from abliterate.options.recipe import KL_OBJECTIVES, PROPOSALS, REFUSAL_OBJECTIVES, SelectionSettings
from abliterate.options.values import checked_layers, parse_batch_size, parse_components, parse_size


@dataclass(frozen=True)
class TaskOptions:
    """--tasks and its settings as given; evaluate.tasks.task_settings checks them and makes TaskSettings."""

    tasks: str | None = option("--tasks", help="lm-evaluation-harness tasks to run on the model and the baseline, "
                               "comma-separated: registered names (gsm8k,mmlu,arc_easy,piqa) or local task "
                               "folders/YAML files in the harness's format. Needs `pip install 'abliterate[bench]'`.")
    tasks_limit: int | None = option("--tasks-limit", type=int, help="Documents per task (default: all).")
    tasks_fewshot: int | None = option("--tasks-fewshot", type=int,
                                       help="Few-shot examples per prompt (default: each task's own, as the harness "
                                       "does).")
    tasks_chat_template: bool = option("--tasks-chat-template", is_flag=True,
                                       help="Render task prompts with the model's chat template, few-shot examples "
                                       "as turns (the harness's --apply_chat_template; default off, as there); "
                                       "--template, when given, is the template used.")


@dataclass(frozen=True)
class ModelOptions:
    """The options of every command that loads a model to run it, held by its family as a group (commands that
    never apply a chat template's thinking switch exclude `thinking`); --batch-size is batch_size_option's."""

    device: str = option("--device", default="auto", show_default=True, help="cpu, cuda, mps or auto.")
    dtype: str = option("--dtype", default="auto", show_default=True,
                        help="auto (the checkpoint's), bfloat16, float16, float32.")
    template: str | None = option("--template", record="path",
                                  help="Chat template (Jinja file or text) for models without one.")
    thinking: bool = option("--thinking", is_flag=True, help="Keep the template's thinking mode on (default: "
                            "enable_thinking=False is passed to templates that support it, so the first reply token "
                            "is the answer).")
    trust_remote_code: bool = option("--trust-remote-code", is_flag=True,
                                     help="Allow the model's own Python code from the Hub.")


def batch_size_option(default: int | None = None, *, recipe: str | None = None) -> Any:
    """--batch-size of a model-running command: its own default, or (extract, evaluate) its recipe key's."""
    where = {"recipe": recipe} if recipe else {"default": default}
    return option("--batch-size", **where, show_default=True, parse=parse_batch_size, type=str,
                  help="Prompts per forward pass, or auto: on CUDA the largest that fits (found once by halving on "
                  "out-of-memory, cached per model); out of memory at any size halves it, with a note.")


@dataclass(frozen=True)
class ExtractOptions:
    """`abliterate extract`'s options (the model options as a group); those backed by
    the recipe's extract section take its defaults."""

    model: str | None = option(help="", required=False)  # the argument: absent with --reselect
    out: Path = option("--out", required=True, type=click.Path(path_type=Path),
                       help="Direction file to write (.safetensors).")
    reselect: Path | None = option("--reselect", type=click.Path(path_type=Path),
                                   help="Choose again among the candidates and scores saved in this file (a "
                                   "direction file, or the OUT.candidates.safetensors an interrupted or failed run "
                                   "kept) with the thresholds given here; no model is loaded.")
    harmful: str = option("--harmful", recipe="extract.harmful", show_default=True, help="Harmful prompts: "
                          "builtin:harmful, a .txt/.json/.jsonl/.csv/.parquet file, or hf:OWNER/NAME.")
    harmless: str = option("--harmless", recipe="extract.harmless", show_default=True,
                           help="Harmless prompts, same forms.")
    field: str | None = option("--field", help="Column/field holding the prompt in structured files or datasets.")
    kind: str = option("--kind", type=click.Choice(["refusal", "harmfulness"]), default="refusal", show_default=True,
                       help="refusal: one direction read at the post-instruction tokens, selected by its effect. "
                       "harmfulness: harmful minus harmless at the instruction's last token, at every layer "
                       "([layers + 1, d], no selection), with its cosine similarity to the refusal difference per "
                       "layer in the metadata.")
    n_train: int = option("--n-train", recipe="extract.n_train", show_default=True,
                          help="Prompts per set for the difference of means.")
    n_val: int = option("--n-val", recipe="extract.n_val", show_default=True,
                        help="Prompts per set for scoring candidates.")
    batch_size: int = batch_size_option(recipe="extract.batch_size")
    positions: int | None = option("--positions", recipe="extract.positions", type=int,
                                   help="Use only the last N post-instruction positions (default: all of them).")
    screen_prompts: int = option("--screen-prompts", recipe="extract.screen_prompts", show_default=True,
                                 help="Harmful validation prompts (those the model refuses most) on which every "
                                 "candidate's ablation score is measured first.")
    finalists: int = option("--finalists", recipe="extract.finalists", show_default=True,
                            help="Candidates, best by ablation score, that get all three scores; 0 scores every "
                            "candidate fully (slow; what pruning could miss, it cannot).")
    kl_threshold: float = option("--kl-threshold", recipe="extract.kl_threshold", show_default=True,
                                 help="Reject candidates whose ablation moves the first-token distribution on "
                                 "harmless prompts by more than this KL.")
    induce_threshold: float = option("--induce-threshold", recipe="extract.induce_threshold", show_default=True,
                                     help="Reject candidates whose addition does not raise the refusal log-odds on "
                                     "harmless prompts above this.")
    prune_layers: float = option("--prune-layers", recipe="extract.prune_layers", show_default=True,
                                 help="Fraction of last layers never selected.")
    refusal_objective: str = option("--refusal-objective", recipe="extract.refusal_objective",
                                    type=click.Choice(REFUSAL_OBJECTIVES), show_default=True,
                                    help="Rank the finalists by the first-token refusal log-odds (fast), or by how "
                                    "many greedy replies of --max-new-tokens to the harmful validation prompts the "
                                    "refusal markers count as refusals (generation per finalist; the log-odds break "
                                    "ties).")
    kl_objective: str = option("--kl-objective", recipe="extract.kl_objective", type=click.Choice(KL_OBJECTIVES),
                               show_default=True, help="The KL the --kl-threshold filter reads: at the first reply "
                               "token (fast), or averaged over the first --kl-tokens tokens of the unedited model's "
                               "greedy replies.")
    max_new_tokens: int = option("--max-new-tokens", recipe="extract.max_new_tokens", show_default=True,
                                 help="Reply tokens with --refusal-objective count.")
    kl_tokens: int = option("--kl-tokens", recipe="extract.kl_tokens", show_default=True,
                            help="Reply tokens with --kl-objective continuation.")
    directions: int = option("--directions", recipe="extract.directions", type=click.IntRange(1, 64),
                             show_default=True,
                             help="Extract K directions ([K, d], metadata rank = K): the chosen one first, then the "
                             "K - 1 leading principal directions of the per-prompt harmful-minus-harmless differences "
                             "at its layer and position (one more pass over the training prompts). An edit removes "
                             "their span; a search (`search`, the whole job's --search) tries the first k = 1..K of "
                             "them and keeps the k it chose.")
    proposals: str = option("--proposals", recipe="extract.proposals", type=click.Choice(PROPOSALS),
                            show_default=True,
                            help="With --directions K: where the K - 1 directions beside the chosen one come from: "
                            "principal (the leading principal directions of the per-prompt differences) or "
                            "categories (one per category of the harmful prompts: its harmful mean minus the harmless "
                            "mean at the chosen layer and position, the most different first; needs labelled prompts "
                            "such as builtin:harmful or a file with a `category` field, and K at most their number). "
                            "The file's metadata records which.")
    plot_path: Path | None = option("--plot", type=click.Path(path_type=Path), record="never",
                                    help="Also draw every candidate's score (refusal log-odds with it ablated) as a "
                                    "layer x position heat map PNG here, the finalists and the choice marked (needs "
                                    "matplotlib).")
    model_options: ModelOptions = group(ModelOptions)
    quiet: bool = option("--quiet", "-q", is_flag=True, record="never", help="No progress bars.")

    def selection(self) -> SelectionSettings:
        """The selection settings given (the recipe schema's SelectionSettings fields)."""
        return SelectionSettings(**{f.name: getattr(self, f.name) for f in fields(SelectionSettings)})


@dataclass(frozen=True, kw_only=True)
class ApplyOptions:
    """`abliterate apply`'s options; those backed by the recipe's apply section take its defaults and, with
    --recipe, override it only where given (options.recipe.apply_settings)."""

    checkpoint: Path = option(help="", type=click.Path(path_type=Path), default=MISSING)
    direction: Path | None = option("--direction", recipe="apply.direction", type=click.Path(path_type=Path),
                                    help="Direction file (.safetensors with tensor 'direction', [d] or [layers+1, "
                                    "d]; with metadata rank = k, [k, d] or [layers+1, k, d], whose span is removed); "
                                    "required unless --recipe names one.")
    out: Path = option("--out", required=True, type=click.Path(path_type=Path), default=MISSING,
                       help="Output model folder (must not exist).")
    scale: float = option("--scale", recipe="apply.scale", show_default=True,
                          help="1 removes the direction fully, 0.5 half; negative values amplify it.")
    add: bool = option("--add", is_flag=True, help="Amplify the direction instead of removing it "
                       "(uses -|scale|: W + |s| r r^T W), e.g. to make a model refuse more; --scale 2 is often needed.")
    layers: str | None = option("--layers", recipe="apply.layers", parse=checked_layers,
                                help="Decoder layers to edit, START:END (END excluded). Default: all.")
    components: tuple[str, ...] = option("--components", recipe="apply.components", parse=parse_components,
                                         show_default=True, help="Which writers to edit: embed (token/position "
                                         "embeddings), attn (attention output), mlp (MLP / MoE expert / shared "
                                         "expert outputs).")
    targets: tuple[str, ...] = option("--targets", recipe="apply.targets", multiple=True, help="Regex (full "
                                      "match) of tensor names to edit instead of the architecture table; "
                                      "repeatable. Orientation is read from the shape ([d, in] assumed when square).")
    keep_tied: bool = option("--keep-tied", recipe="apply.keep_tied", is_flag=True, help="With tied embeddings, "
                             "edit the shared matrix instead of writing an untied lm_head with the original; the "
                             "output layer then also stops reading the direction.")
    norm_preserve: bool = option("--norm-preserve", recipe="apply.norm_preserve", is_flag=True,
                                 help="Rescale each vector an edited tensor writes into the residual stream (a column "
                                 "of a Linear weight, a row of an embedding, a bias) to its original norm after the "
                                 "projection: W' = (I - s r r^T) W D. With --adapter: a peft DoRA adapter, where the "
                                 "family and config let one carry D exactly (else refused, naming --components).")
    biproject: bool = option("--biproject", recipe="apply.biprojected", is_flag=True, help="First make the "
                             "direction orthogonal to the harmless mean at its layer and position (needs the file "
                             "`abliterate extract` wrote); the edited folder keeps the result.")
    max_memory: int = option("--max-memory", default=256 << 20, parse=parse_size, type=str, metavar="SIZE",
                             show_default="256MB",
                             help="Memory budget for tensor chunks.")
    overwrite: bool = option("--overwrite", is_flag=True, record="never",
                             help="Replace --out if it exists (only once the new one is complete).")
    quiet: bool = option("--quiet", "-q", is_flag=True, record="never", help="No progress bar.")
    adapter: bool = option("--adapter", is_flag=True, help="Write a peft LoRA adapter (rank 1 per "
                           "edited module) to --out instead of a checkpoint; PeftModel(base, adapter) computes what "
                           "the edited checkpoint computes. For a .gguf model: a llama.cpp LoRA adapter GGUF "
                           "(llama-cli --lora FILE).")
    ignore_biases: bool = option("--ignore-biases", is_flag=True, help="With --adapter: leave biases "
                                 "unedited (a pure LoRA adapter; otherwise edited biases are carried with peft's "
                                 "bias='lora_only').")
    base_model: str | None = option("--base-model", help="With --adapter: the Hub id to record as the adapter's "
                                    "base model (default: read from a Hub cache path, else the local path).")
    recipe: Path | None = option("--recipe", type=click.Path(path_type=Path), help="Take the apply settings "
                                 "(direction, scale, layers, components, layer_scales...) from this recipe, e.g. the "
                                 "one `abliterate search` wrote; options given on the command line win.")
    layer_scales: Path | None = option("--layer-scales", type=click.Path(path_type=Path), help="Per-layer, "
                                       "per-component multipliers of --scale from a YAML file (a recipe's "
                                       "apply.layer_scales or a bare {embed: [s], attn: [s0, s1, ...], mlp: [...]}).")
    requant: str = option("--requant", default="auto", show_default=True, help="GGUF input only: the type to write "
                          "edited tensors whose own type cannot be written (the IQ types; K-quants and Q8_0 ... Q4_0 "
                          "are written as they came): auto (the nearest K-quant: IQ4_XS as Q4_K, IQ3 as Q3_K, IQ2 "
                          "and IQ1 as Q2_K, IQ4_NL as Q4_1, others Q8_0), Q8_0, Q6_K ... Q2_K, Q5_1, Q5_0, Q4_1, "
                          "Q4_0, F16, BF16 or F32.")


@dataclass(frozen=True)
class EvaluateOptions:
    """`abliterate evaluate`'s options; the whole job writes the command that measured its card's numbers from
    them. Those backed by the recipe's evaluate section take its defaults."""

    model: str | None = option(help="", required=False)  # the argument: absent with --judge-check
    adapter: Path | None = option("--adapter", type=click.Path(path_type=Path),
                                  help="A peft adapter folder to load on MODEL (e.g. from `apply --adapter`).")
    baseline: str | None = option("--baseline",
                                  help="The original model (folder or Hub id): KL and its own rates and NLL.")
    out: Path | None = option("--out", type=click.Path(path_type=Path), record="never",
                              help="Write the full report as JSON here.")
    harmful: str = option("--harmful", default="builtin:harmful", show_default=True, record="path",
                          help="Harmful prompts (builtin sets: their held-out test split), a file or hf:OWNER/NAME.")
    harmless: str = option("--harmless", default="builtin:harmless", show_default=True, record="path",
                           help="Harmless prompts for the KL.")
    overrefusal: str = option("--overrefusal", default="builtin:overrefusal", show_default=True, record="path",
                              help="Safe prompts that look dangerous.")
    field: str | None = option("--field", help="Column/field holding the prompt in structured files or datasets.")
    limit: int = option("--limit", recipe="evaluate.limit", show_default=True,
                        help="Prompts per set, spread evenly over it; 0: all.")
    max_new_tokens: int = option("--max-new-tokens", recipe="evaluate.max_new_tokens", show_default=True,
                                 help="Greedy tokens per reply; keep at least 128 for numbers you publish (refusals "
                                 "can come late).")
    kl_tokens: int = option("--kl-tokens", recipe="evaluate.kl_tokens", show_default=True,
                            help="Tokens of the baseline's continuation in the KL.")
    batch_size: int = batch_size_option(recipe="evaluate.batch_size")
    judge: str | None = option("--judge", help="A chat model asked, per reply, whether it refuses (yes/no), reported "
                               "next to the marker counts, with the replies where the two disagree.")
    judge_check: bool = option("--judge-check", is_flag=True, help="Instead of evaluating MODEL: print the markers' "
                               "and --judge's accuracy on labelled replies (the built-in set, or --judge-set).")
    judge_set: Path | None = option("--judge-set", type=click.Path(path_type=Path), help="With --judge-check: a JSONL "
                                    "file of {prompt, reply, refusal: true/false, kind} to score on.")
    tasks: TaskOptions = group(TaskOptions)
    model_options: ModelOptions = group(ModelOptions)
    quiet: bool = option("--quiet", "-q", is_flag=True, record="never", help="No progress bars.")


@dataclass(frozen=True)
class DemoOptions:
    """`abliterate demo`'s option."""

    workdir: Path | None = option("--workdir", type=click.Path(path_type=Path), record="never", help="Where to put "
                                  "the demo's files (default: a temporary folder, removed afterwards).")
