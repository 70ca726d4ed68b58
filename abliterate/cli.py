"""Command line: parse options, call the library, report. No logic of its own."""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

import click

from . import __version__
from .archs import COMPONENTS


def parse_size(value: str) -> int:
    """'256MB', '1G', '1048576' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", value.lower())
    if not m:
        raise click.BadParameter(f"{value!r} is not a size; write e.g. 256MB or 1GB")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def parse_layers(value: str | None) -> range | None:
    """--layers, read as plan.parse_layer_range reads it, its error reported as the option's."""
    from .errors import AbliterateError
    from .plan import parse_layer_range

    try:
        return parse_layer_range(value)
    except AbliterateError as e:
        raise click.BadParameter(str(e), param_hint="'--layers'") from None


def parse_components(value: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in value.split(",") if p.strip())
    bad = [p for p in parts if p not in COMPONENTS]
    if bad or not parts:
        raise click.BadParameter(f"{value!r}: choose from {','.join(COMPONENTS)}")
    return parts


def model_options(*, thinking: bool = True, batch_size: int | None = None):
    """The options of every command that loads a model to run it: device, dtype, template, thinking mode,
    remote code (and a batch size, where the command has a default for it)."""
    options = [click.option("--device", default="auto", show_default=True, help="cpu, cuda, mps or auto."),
               click.option("--dtype", default="auto", show_default=True,
                            help="auto (the checkpoint's), bfloat16, float16, float32."),
               click.option("--template", default=None,
                            help="Chat template (Jinja file or text) for models without one.")]
    if thinking:
        options.append(click.option("--thinking", is_flag=True, help="Keep the template's thinking mode on (default: "
                                    "enable_thinking=False is passed to templates that support it, so the first "
                                    "reply token is the answer)."))
    options.append(click.option("--trust-remote-code", is_flag=True,
                                help="Allow the model's own Python code from the Hub."))
    if batch_size is not None:
        options.append(click.option("--batch-size", default=batch_size, show_default=True,
                                    help="Prompts per forward pass; lower it if memory runs out."))

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


class Main(click.Group):
    """Turns library errors into one line on stderr and a non-zero exit, never a traceback; a first
    argument that is not a subcommand is a MODEL for `run` (so `abliterate MODEL --push` works)."""

    def resolve_command(self, ctx: click.Context, args: list[str]):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            return "run", self.commands["run"], args
        return super().resolve_command(ctx, args)

    def invoke(self, ctx: click.Context):
        from .errors import AbliterateError

        try:
            return super().invoke(ctx)
        except AbliterateError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except OSError as e:
            click.echo(f"error: {e.strerror or e} ({e.filename or 'I/O'}); no output was written", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; no output was written", err=True)
            sys.exit(130)
        except Exception as e:
            from .hub import network_problem

            message = network_problem(e)
            if message is None:
                raise
            click.echo(f"error: {message}", err=True)
            sys.exit(2)


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="abliterate")
def cli() -> None:
    """Remove (or add) the refusal direction of an open-weight chat model, exactly and on little memory.

    \b
    abliterate MODEL [--push [REPO_ID]] [--adapter] [--out DIR]
        the whole job (same as `abliterate run MODEL ...`): fetch, extract, edit, evaluate, card, push
    abliterate COMMAND ...
        one stage at a time (extract, apply, verify, evaluate, merge, search, ...)
    """


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--direction", "direction_path", default=None, type=click.Path(path_type=Path),
              help="Direction file (.safetensors with tensor 'direction', [d] or [layers+1, d]); required unless "
              "--recipe names one.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output model folder (must not exist).")
@click.option("--scale", default=1.0, show_default=True,
              help="1 removes the direction fully, 0.5 half; negative values amplify it.")
@click.option("--add", "add_direction", is_flag=True, help="Amplify the direction instead of removing it (uses "
              "-|scale|: W + |s| r r^T W), e.g. to make a model refuse more; --scale 2 is often needed.")
@click.option("--layers", default=None, help="Decoder layers to edit, START:END (END excluded). Default: all.")
@click.option("--components", default=",".join(COMPONENTS), show_default=True,
              callback=lambda c, p, v: parse_components(v),
              help="Which writers to edit: embed (token/position embeddings), attn (attention output), mlp "
              "(MLP / MoE expert / shared expert outputs).")
@click.option("--targets", multiple=True, help="Regex (full match) of tensor names to edit instead of the "
              "architecture table; repeatable. Orientation is read from the shape ([d, in] assumed when square).")
@click.option("--keep-tied", is_flag=True, help="With tied embeddings, edit the shared matrix instead of writing "
              "an untied lm_head with the original; the output layer then also stops reading the direction.")
@click.option("--max-memory", default="256MB", show_default=True, callback=lambda c, p, v: parse_size(v),
              help="Memory budget for tensor chunks.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (only once the new one is complete).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--adapter", is_flag=True, help="Write a peft LoRA adapter (rank 1 per edited module) to --out "
              "instead of a checkpoint; PeftModel(base, adapter) computes what the edited checkpoint computes.")
@click.option("--ignore-biases", is_flag=True, help="With --adapter: leave biases unedited (a pure LoRA adapter; "
              "otherwise edited biases are carried with peft's bias='lora_only').")
@click.option("--base-model", default=None, help="With --adapter: the Hub id to record as the adapter's base model "
              "(default: read from a Hub cache path, else the local path).")
@click.option("--recipe", "recipe_path", default=None, type=click.Path(path_type=Path),
              help="Take the apply settings (direction, scale, layers, components, layer_scales...) from this recipe, "
              "e.g. the one `abliterate search` wrote; options given on the command line win.")
@click.option("--layer-scales", "layer_scales_path", default=None, type=click.Path(path_type=Path),
              help="Per-layer, per-component multipliers of --scale from a YAML file (a recipe's apply.layer_scales "
              "or a bare {embed: [s], attn: [s0, s1, ...], mlp: [...]}).")
def apply(checkpoint: Path, direction_path: Path | None, out: Path, scale: float, add_direction: bool,
          layers: str | None, components: tuple[str, ...], targets: tuple[str, ...], keep_tied: bool, max_memory: int,
          overwrite: bool, quiet: bool, adapter: bool, ignore_biases: bool, base_model: str | None,
          recipe_path: Path | None, layer_scales_path: Path | None) -> None:
    """Project a direction out of every residual-stream writer of CHECKPOINT, writing a new folder.

    Edits the token embedding, each attention output projection, each MLP output projection (every
    MoE expert and shared expert) and their biases: W' = W - s r (r^T W). Everything else is copied
    byte for byte; shards keep their names, order and dtypes. Works tensor by tensor within
    --max-memory, whatever the model size. The result is exactly the original model with the
    direction removed from the output of each edited module.

    Gemma 2, Gemma 3 and OLMo 2 normalise attention and MLP outputs before adding them to the
    residual stream: there the edit removes the direction from those outputs before the norm, which
    is not removing it from the residual stream (the norm's gain can bring a component back).

    With tied input/output embeddings the output layer is kept as it was (an untied lm_head holding
    the original matrix is written and tie_word_embeddings set to false), unless --keep-tied.

    With --adapter, --out receives a peft LoRA adapter of the same edit instead (a few MB);
    `abliterate merge CHECKPOINT ADAPTER` turns it into the same tensors `apply` writes.
    """
    from .checkpoint import Checkpoint
    from .direction_file import load_direction
    from .edit import apply_edit
    from .errors import AbliterateError
    from .plan import EditOptions, plan_edit

    if not adapter and (ignore_biases or base_model):
        raise AbliterateError("--ignore-biases and --base-model only apply with --adapter")
    ckpt = Checkpoint.open(checkpoint)
    layer_scales: dict[str, tuple[float, ...]] = {}
    if recipe_path is not None:
        from .recipe import load_recipe

        ctx = click.get_current_context()
        given = lambda name: ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE  # noqa: E731
        settings = load_recipe(ckpt.config.get("model_type"), recipe_path).apply
        scale = scale if given("scale") else settings.scale
        layers = layers if given("layers") else settings.layers
        components = components if given("components") else settings.components
        targets = targets if given("targets") else settings.targets
        keep_tied = keep_tied or settings.keep_tied
        layer_scales = settings.layer_scales
        if direction_path is None and settings.direction:
            direction_path = Path(settings.direction)
    if layer_scales_path is not None:
        from .recipe import read_layer_scales

        layer_scales = read_layer_scales(layer_scales_path)
    if direction_path is None:
        raise AbliterateError("no direction: pass --direction FILE (or a --recipe naming apply.direction, as "
                              "`abliterate search` writes)")
    direction = load_direction(direction_path, hidden_size=ckpt.hidden_size, num_layers=ckpt.num_layers)
    scale = -abs(scale) if add_direction else scale
    options = EditOptions(scale=scale, layers=parse_layers(layers), components=components, targets=targets,
                          keep_tied=keep_tied, layer_scales=layer_scales)
    plan = plan_edit(ckpt, options)
    if adapter:
        from .adapter import AdapterOptions, export_adapter

        exported = export_adapter(ckpt, plan, direction, out, AdapterOptions(
            ignore_biases=ignore_biases, base_model=base_model, max_memory=max_memory, overwrite=overwrite,
            quiet=quiet))
        for note in exported.notes:
            click.echo(f"note: {note}", err=True)
        click.echo(f"wrote a LoRA adapter of {exported.modules} modules and {exported.biases} biases "
                   f"({exported.nbytes / 1e6:.1f} MB) to {exported.out}")
        return
    result = apply_edit(ckpt, plan, direction, out, overwrite=overwrite, max_memory=max_memory, quiet=quiet)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    if result.skipped_files:
        click.echo(f"note: not copied (other weight formats or the base model card): {', '.join(result.skipped_files)}",
                   err=True)
    click.echo(f"edited {result.edited} tensors; wrote {result.out}")


@cli.command()
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("adapter_dir", metavar="ADAPTER", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output model folder (must not exist).")
@click.option("--max-memory", default="256MB", show_default=True, callback=lambda c, p, v: parse_size(v),
              help="Memory budget for tensor chunks.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (only once the new one is complete).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def merge(base: Path, adapter_dir: Path, out: Path, max_memory: int, overwrite: bool, quiet: bool) -> None:
    """Merge a LoRA ADAPTER (any rank) into the checkpoint BASE, writing a new folder.

    Tensor by tensor within --max-memory, like `apply`: adapted tensors get W + scaling B A in float32,
    rounded once to their dtype; everything else is copied byte for byte. Merging an adapter written by
    `apply --adapter` gives the tensors `apply` writes. DoRA and other LoRA variants are refused.
    """
    from .checkpoint import Checkpoint
    from .merge import merge_adapter

    result = merge_adapter(Checkpoint.open(base), adapter_dir, out, overwrite=overwrite, max_memory=max_memory,
                           quiet=quiet)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"merged {result.adapter_entries} adapter tensors into {result.merged} tensors; wrote {result.out}")


@cli.command()
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("edited", type=click.Path(path_type=Path), required=False)
@click.option("--direction", "direction_path", type=click.Path(path_type=Path),
              help="Direction file. Default: the copy `apply` wrote into EDITED.")
@click.option("--from-options", is_flag=True, help="Ignore EDITED's abliterate.json; expect the edit that the "
              "options below describe (defaults: full removal from every writer).")
@click.option("--scale", default=1.0, show_default=True)
@click.option("--layers", default=None)
@click.option("--components", default=",".join(COMPONENTS), callback=lambda c, p, v: parse_components(v))
@click.option("--max-memory", default=None, callback=lambda c, p, v: v and parse_size(v),
              help="Memory budget for tensor chunks (default: the one the edit used).")
def verify(original: Path, edited: Path | None, direction_path: Path | None, from_options: bool, scale: float,
           layers: str | None, components: tuple[str, ...], max_memory: int | None) -> None:
    """Check that EDITED is ORIGINAL with the direction projected out, and nothing else changed.

    Edited tensors must match the projection recomputed from ORIGINAL (within one rounding step of
    their dtype plus the proven bound on summing r^T W in another order) and keep at most 1e-6 |W|
    along the direction (float32; eps(dtype) |W| for 16-bit);
    every other tensor, the index, config and other files must be identical. Exits 1 on any violation.

    With one folder, checks a download against the SHA256SUMS manifest that abliterate published with it.
    """
    from .card import check_checksums

    if edited is None:
        problems = check_checksums(original)
        for problem in problems:
            click.echo(f"FAIL {problem}", err=True)
        click.echo("all files match SHA256SUMS" if not problems else f"{len(problems)} problem(s)")
        sys.exit(1 if problems else 0)

    from .checkpoint import Checkpoint
    from .direction_file import load_direction
    from .edit import DIRECTION_NAME
    from .plan import EditOptions
    from .verify import verify as run_verify

    ckpt = Checkpoint.open(original)
    if direction_path is None and not (edited / DIRECTION_NAME).is_file():
        from .errors import AbliterateError

        raise AbliterateError(f"{edited} holds no {DIRECTION_NAME} (abliterate writes one beside every edit); pass "
                              "--direction FILE with the direction the edit used")
    direction = load_direction(direction_path or edited / DIRECTION_NAME, hidden_size=ckpt.hidden_size,
                               num_layers=ckpt.num_layers)
    options = EditOptions(scale=scale, layers=parse_layers(layers), components=components) if from_options else None
    report = run_verify(original, edited, direction, options, max_memory=max_memory)
    for problem in report.problems:
        click.echo(f"FAIL {problem}", err=True)
    click.echo(f"checked {report.tensors_checked} tensors ({report.edited_checked} edited; largest residual along "
               f"the direction {report.max_relative_residual:.2e} |W|): "
               + ("OK" if report.ok else f"{len(report.problems)} problem(s)"))
    sys.exit(0 if report.ok else 1)


def _command_line(ctx: click.Context) -> str:
    """The command as given, rebuilt from the parameters set on the command line: sys.argv is the
    caller's when the CLI runs in-process (tests, scripts), so it cannot be recorded as is."""
    import shlex

    args = ["abliterate", ctx.info_name or ""]
    for param in ctx.command.params:
        if ctx.get_parameter_source(param.name) != click.core.ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        if isinstance(param, click.Argument):
            args.append(str(value))
        elif isinstance(param, click.Option) and param.is_flag:
            args.append(param.opts[0] if value or not param.secondary_opts else param.secondary_opts[0])
        else:
            for v in value if isinstance(param, click.Option) and param.multiple else [value]:
                args += [param.opts[0], str(v)]
    return shlex.join(args)


@cli.command()
@click.argument("model")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Direction file to write (.safetensors).")
@click.option("--harmful", default="builtin:harmful", show_default=True,
              help="Harmful prompts: builtin:harmful, a .txt/.json/.jsonl/.csv/.parquet file, or hf:OWNER/NAME.")
@click.option("--harmless", default="builtin:harmless", show_default=True, help="Harmless prompts, same forms.")
@click.option("--field", default=None, help="Column/field holding the prompt in structured files or datasets.")
@click.option("--n-train", default=128, show_default=True, help="Prompts per set for the difference of means.")
@click.option("--n-val", default=32, show_default=True, help="Prompts per set for scoring candidates.")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--positions", type=int, default=None,
              help="Use only the last N post-instruction positions (default: all of them).")
@click.option("--kl-threshold", default=0.1, show_default=True, help="Reject candidates whose ablation moves the "
              "first-token distribution on harmless prompts by more than this KL.")
@click.option("--induce-threshold", default=0.0, show_default=True, help="Reject candidates whose addition does "
              "not raise the refusal log-odds on harmless prompts above this.")
@click.option("--prune-layers", default=0.2, show_default=True, help="Fraction of last layers never selected.")
@model_options()
@click.option("--quiet", "-q", is_flag=True)
def extract(model: str, out: Path, harmful: str, harmless: str, field: str | None, n_train: int, n_val: int,
            batch_size: int, device: str, dtype: str, template: str | None, positions: int | None,
            kl_threshold: float, induce_threshold: float, prune_layers: float, thinking: bool,
            trust_remote_code: bool, quiet: bool) -> None:
    """Find MODEL's refusal direction and save it with all candidates and their scores.

    Difference of mean residual activations between harmful and harmless instructions at every
    layer and post-instruction position; each candidate is scored on validation prompts by the
    refusal log-odds with it ablated (lower is better), the refusal log-odds with it added (must
    rise), and the first-token KL on harmless prompts (must stay small). Built-in prompt sets are
    used unless --harmful/--harmless say otherwise.
    """
    from .direction import SelectionSettings
    from .direction_file import check_output_file
    from .extract import PromptSets, save_extraction, split_prompts
    from .extract import extract as run_extract
    from .loading import load_model
    from .templates import load_template

    check_output_file(out)
    harmful_train, harmful_val = split_prompts(harmful, n_train=n_train, n_val=n_val, field=field, kind="harmful")
    harmless_train, harmless_val = split_prompts(harmless, n_train=n_train, n_val=n_val, field=field,
                                                 kind="harmless")
    lm = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    settings = SelectionSettings(prune_layers, kl_threshold, induce_threshold, batch_size)
    result = run_extract(lm, PromptSets(harmful_train, harmless_train, harmful_val, harmless_val),
                         template=load_template(template), positions=positions, settings=settings,
                         template_kwargs={} if thinking else {"enable_thinking": False}, quiet=quiet)
    save_extraction(result, out, lm, {"command": _command_line(click.get_current_context())})
    kept = sorted((s for s in result.scores if s.rejected is None), key=lambda s: s.refusal_ablated)[:10]
    click.echo(f"refusal score (log-odds) on harmful validation prompts: {result.baseline_refusal:.2f} before")
    click.echo(f"{'layer':>5} {'pos':>4} {'ablated':>8} {'added':>8} {'KL':>8}")
    for s in kept:
        mark = " <- chosen" if s == result.best else ""
        click.echo(f"{s.layer:>5} {s.position:>4} {s.refusal_ablated:>8.2f} {s.refusal_added:>8.2f} {s.kl:>8.4f}{mark}")
    rejected = sum(s.rejected is not None for s in result.scores)
    click.echo(f"{len(result.scores)} candidates scored, {rejected} rejected by the filters; wrote {out}")


@cli.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="Where to put the demo's files (default: a temporary folder, removed afterwards).")
def demo(workdir: Path | None) -> None:
    """Run the whole job on a tiny model built on the spot (no downloads, a few seconds)."""
    import tempfile

    from .demo import run_demo

    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        run_demo(workdir)
        return
    with tempfile.TemporaryDirectory(prefix="abliterate-demo-") as tmp:
        run_demo(Path(tmp))


@cli.command()
@click.argument("model")
@click.option("--baseline", default=None, help="The original model (folder or Hub id): KL and its own rates and NLL.")
@click.option("--adapter", "adapter_dir", default=None, type=click.Path(path_type=Path),
              help="A peft adapter folder to load on MODEL (e.g. from `apply --adapter`).")
@click.option("--out", default=None, type=click.Path(path_type=Path), help="Write the full report as JSON here.")
@click.option("--harmful", default="builtin:harmful", show_default=True,
              help="Harmful prompts (builtin sets: their held-out test split), a file or hf:OWNER/NAME.")
@click.option("--harmless", default="builtin:harmless", show_default=True, help="Harmless prompts for the KL.")
@click.option("--overrefusal", default="builtin:overrefusal", show_default=True,
              help="Safe prompts that look dangerous.")
@click.option("--field", default=None, help="Column/field holding the prompt in structured files or datasets.")
@click.option("--limit", default=32, show_default=True, help="Prompts per set, spread evenly over it; 0: all.")
@click.option("--max-new-tokens", default=128, show_default=True,
              help="Greedy tokens per reply; keep at least 128 for numbers you publish (refusals can come late).")
@click.option("--kl-tokens", default=16, show_default=True, help="Tokens of the baseline's continuation in the KL.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--judge", default=None, help="A chat model asked, per reply, whether it refuses (yes/no), "
              "reported next to the marker counts.")
@model_options()
@click.option("--quiet", "-q", is_flag=True)
def evaluate(model: str, baseline: str | None, adapter_dir: Path | None, out: Path | None, harmful: str,
             harmless: str, overrefusal: str, field: str | None, limit: int, max_new_tokens: int, kl_tokens: int,
             batch_size: int, judge: str | None, device: str, dtype: str, template: str | None, thinking: bool,
             trust_remote_code: bool, quiet: bool) -> None:
    """Refusal and over-refusal rates, KL to the original and general-text NLL of MODEL.

    Greedy replies to held-out harmful prompts and to safe prompts that look dangerous are matched
    against a list of refusal phrases (whole reply, reasoning blocks removed); with --baseline, the
    KL of next-token distributions on harmless prompts along the baseline's own continuation, and
    every metric for the baseline too. Prints a Markdown table for a model card.
    """
    from .errors import AbliterateError, first_line
    from .evaluate import EvalSettings
    from .evaluate import evaluate as run_evaluate
    from .loading import LoadedModel, load_model
    from .templates import load_template

    settings = EvalSettings(limit=limit or None, max_new_tokens=max_new_tokens, kl_tokens=kl_tokens,
                            batch_size=batch_size, harmful=harmful, judge=judge, harmless=harmless,
                            overrefusal=overrefusal, field=field, template=load_template(template), thinking=thinking)
    if limit < 0:
        raise AbliterateError("--limit must be 0 (every prompt) or more")
    lm = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if adapter_dir is not None:
        from peft import PeftModel

        try:
            peft_model = PeftModel.from_pretrained(lm.model, str(adapter_dir)).eval()
        except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: shapes of another model
            reason = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), first_line(e))
            raise AbliterateError(f"cannot load the adapter {adapter_dir} onto {model} ({reason}); is it the "
                                  "adapter of another model?") from None
        lm = LoadedModel(peft_model, lm.tokenizer, lm.arch, f"{model} + {adapter_dir}")
    base = load_model(baseline, dtype=dtype, device=device, trust_remote_code=trust_remote_code) if baseline else None
    report = run_evaluate(lm, base, settings, quiet=quiet, command=_command_line(click.get_current_context()))
    click.echo(report.table())
    if report.counts["reasoning_unfinished"]:
        click.echo(f"note: {report.counts['reasoning_unfinished']} replies were still reasoning when --max-new-tokens "
                   "ran out (counted as not refused); raise --max-new-tokens", err=True)
    if out is not None:
        click.echo(f"wrote {report.save_json(out)}")


@cli.command()
@click.argument("model")
@click.option("--direction", "direction_path", required=True, type=click.Path(path_type=Path),
              help="Direction file written by `abliterate extract` (its candidates are what is searched).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Recipe YAML to write for the chosen point (its direction file goes beside it).")
@click.option("--study", "study_path", default=None, type=click.Path(path_type=Path),
              help="SQLite file holding the study; rerun with it to resume. Default: OUT's name + .study.db.")
@click.option("--study-name", default="abliterate-search", show_default=True)
@click.option("--trials", default=100, show_default=True,
              help="Completed trials the study should have; a rerun with more continues it.")
@click.option("--max-kl", type=float, default=None, help="Choose the fewest refusals with KL at most this.")
@click.option("--max-refusals", type=float, default=None,
              help="Choose the lowest KL with at most this fraction of prompts refused (0.05: 5 %).")
@click.option("--seed", default=0, show_default=True)
@click.option("--startup-trials", default=10, show_default=True, help="Random trials before TPE takes over.")
@click.option("--max-strength", default=1.5, show_default=True, help="Upper bound of every strength (>= 1).")
@click.option("--from-random", is_flag=True, help="Do not start from the extraction's choice (fully removed).")
@click.option("--harmful", default="builtin:harmful", show_default=True,
              help="Harmful prompts (built-in sets: their validation split), a file or hf:OWNER/NAME.")
@click.option("--harmless", default="builtin:harmless", show_default=True, help="Harmless prompts, same forms.")
@click.option("--field", default=None, help="Column/field holding the prompt in structured files or datasets.")
@click.option("--n-val", default=32, show_default=True, help="Validation prompts per set.")
@click.option("--max-new-tokens", default=24, show_default=True,
              help="Greedy tokens per reply when counting refusals of points on the front.")
@click.option("--batch-size", default=16, show_default=True)
@model_options()
@click.option("--quiet", "-q", is_flag=True)
def search(model: str, direction_path: Path, out: Path, study_path: Path | None, study_name: str, trials: int,
           max_kl: float | None, max_refusals: float | None, seed: int, startup_trials: int, max_strength: float,
           from_random: bool, harmful: str, harmless: str, field: str | None, n_val: int, max_new_tokens: int,
           batch_size: int, device: str, dtype: str, template: str | None, thinking: bool, trust_remote_code: bool,
           quiet: bool) -> None:
    """Search edit parameters for MODEL and save the chosen trade-off as a recipe `apply --recipe` reads.

    Each trial picks a direction (any saved candidate, a blend of two neighbouring layers' candidates,
    optionally made orthogonal to the harmless mean) and per component a per-layer strength profile, and
    scores it with ablation hooks (no weights rewritten): first-token refusal log-odds on harmful and KL on
    harmless validation prompts, plus a greedy refusal count for points on the front. Prints the front of
    refusals against KL; --max-kl or --max-refusals picks the point (default: fewest refusals, then lowest KL).
    """
    from .extract import split_prompts
    from .loading import load_model
    from .search import SearchSettings, default_study_path, load_candidates, pick, save_choice, table
    from .search import search as run_search
    from .templates import load_template

    _, harmful_val = split_prompts(harmful, n_train=0, n_val=n_val, field=field, kind="harmful")
    _, harmless_val = split_prompts(harmless, n_train=0, n_val=n_val, field=field, kind="harmless")
    lm = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    cands = load_candidates(direction_path, lm)
    settings = SearchSettings(trials=trials, seed=seed, startup_trials=startup_trials, max_strength=max_strength,
                              batch_size=batch_size, max_new_tokens=max_new_tokens, start_from_selected=not from_random,
                              template=load_template(template), thinking=thinking)
    study = study_path or default_study_path(out)
    result = run_search(lm, cands, harmful_val, harmless_val, settings, study, study_name, quiet=quiet)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    choice = pick(result.front, result.prompts, max_kl=max_kl, max_refusals=max_refusals)
    click.echo(table(result.front, result.prompts, choice))
    rate = f"{result.seconds / result.ran:.2f} s/trial" if result.ran else "no new trials"
    click.echo(f"{len(result.trials)} trials in the study ({result.ran} run now, {rate}); study: {study}")
    recipe, direction = save_choice(choice, cands, lm, out, prompts=result.prompts, study=study,
                                    study_name=study_name)
    click.echo(f"wrote {recipe} and {direction}; apply it with: abliterate apply MODEL --recipe {recipe} --out DIR")


@cli.command()
@click.argument("model")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder (default: ./NAME-abliterated, or NAME-abliterated-adapter).")
@click.option("--push", "push_to", is_flag=False, flag_value="", default=None, metavar="[REPO_ID]",
              help="Push the result to the Hub (default repo: YOUR_USER/NAME-abliterated).")
@click.option("--adapter", is_flag=True, help="Write an exactly equivalent rank-1 LoRA adapter instead of weights.")
@click.option("--direction", "direction_path", type=click.Path(path_type=Path), default=None,
              help="Use this direction file instead of extracting one.")
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path), default=None,
              help="Recipe YAML overriding the family's settings (see recipes/README.md).")
@click.option("--harmful", default=None, help="Harmful prompts for extraction (default: the recipe's, built-in).")
@click.option("--harmless", default=None, help="Harmless prompts for extraction (default: the recipe's, built-in).")
@click.option("--field", default=None, help="Column/field holding the prompt in structured files or datasets.")
@click.option("--eval-harmful", default="builtin:harmful", show_default=True,
              help="Held-out harmful prompts for the evaluation.")
@click.option("--eval-harmless", default="builtin:harmless", show_default=True,
              help="Harmless prompts for the evaluation's KL.")
@click.option("--no-eval", is_flag=True, help="Skip the quick evaluation (the card then has no numbers).")
@click.option("--private", is_flag=True, help="Create the Hub repo private.")
@click.option("--force", is_flag=True, help="Push even into an existing repo abliterate did not create.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of MODEL.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, mps or auto.")
@click.option("--dtype", default=None, help="Compute dtype for extraction/evaluation (default: the recipe's).")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own Python code from the Hub.")
@click.option("--template", default=None, help="Chat template (Jinja file or text) for models without one.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--stream", is_flag=True, help="With --push and --direction: download, edit, upload and delete one "
              "shard at a time (disk for about two shards); a rerun resumes; --out is the work folder.")
@click.option("--quiet", "-q", is_flag=True)
def run(model: str, out: Path | None, push_to: str | None, adapter: bool, direction_path: Path | None,
        recipe_path: Path | None, harmful: str | None, harmless: str | None, field: str | None, eval_harmful: str,
        eval_harmless: str, no_eval: bool, private: bool, force: bool, revision: str | None, device: str,
        dtype: str | None, trust_remote_code: bool, template: str | None, overwrite: bool, stream: bool,
        quiet: bool) -> None:
    """The whole job on MODEL (a Hub id or a local folder): an abliterated checkpoint or adapter.

    Fetches only safetensors weights, config, tokenizer and chat template (never pickles; remote
    code only with --trust-remote-code); extracts and selects the refusal direction with the
    family's recipe (or takes --direction); edits every residual-stream writer (or writes a rank-1
    LoRA adapter that computes the same); evaluates quickly against the original (--no-eval skips);
    writes a model card with the numbers, the commands and a sha256 manifest; with --push, uploads
    it all in one commit. The Hub token comes from `hf auth login` or HF_TOKEN and is never printed.
    """
    from .pipeline import RunOptions
    from .pipeline import run as run_pipeline

    result = run_pipeline(RunOptions(
        model=model, out=out, adapter=adapter, direction=direction_path, recipe=recipe_path, harmful=harmful,
        harmless=harmless, field=field, eval_harmful=eval_harmful, eval_harmless=eval_harmless, evaluate=not no_eval,
        push=push_to is not None, repo_id=push_to or None, private=private, force=force, revision=revision,
        device=device, dtype=dtype, trust_remote_code=trust_remote_code, template=template, overwrite=overwrite,
        stream=stream, quiet=quiet))
    if not stream:
        click.echo(f"wrote {result.out}")
    if result.url:
        click.echo(f"pushed to {result.url}")
    elif adapter:
        click.echo(f"load it with: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({model!r}), "
                   f"{str(result.out)!r})")
    else:
        click.echo(f"load it with: AutoModelForCausalLM.from_pretrained({str(result.out)!r})")


@cli.group()
def steer() -> None:
    """Steering vectors (contrastive activation addition): build, chat with, sweep, bake in.

    \b
    abliterate steer vectors MODEL --pairs PAIRS.jsonl --out vectors.safetensors
    abliterate steer chat MODEL --vectors F --layer L --coeff C [--prompt P]
    abliterate steer sweep MODEL --vectors F --pairs HELDOUT.jsonl --layers A:B --coeffs -2,-1,0,1,2
    abliterate steer bake CHECKPOINT --vectors F --layer L --coeff C --out DIR
    """


def _parse_coeffs(value: str) -> list[float]:
    try:
        coeffs = [float(c) for c in value.split(",") if c.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: write comma-separated numbers, e.g. -2,-1,0,1,2") from None
    if not coeffs:
        raise click.BadParameter("give at least one coefficient, e.g. -2,-1,0,1,2")
    return coeffs


@steer.command("vectors")
@click.argument("model")
@click.option("--pairs", "pairs_path", required=True, type=click.Path(path_type=Path),
              help="JSONL or a JSON array: CAA A/B items (question, answer_matching_behavior, "
              "answer_not_matching_behavior) or ActAdd prompt pairs (positive, negative).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Vectors file to write (.safetensors).")
@model_options(thinking=False, batch_size=16)
@click.option("--quiet", "-q", is_flag=True)
def steer_vectors(model: str, pairs_path: Path, out: Path, device: str, dtype: str, template: str | None,
                  trust_remote_code: bool, batch_size: int, quiet: bool) -> None:
    """One steering vector per layer: mean behaviour-minus-opposite residual over the pairs.

    A/B items are read at the answer letter after the chat-formatted question; positive/negative
    pairs at the last token of the raw texts. Saved as [layers + 1, d] (row L + 1: after layer L).
    """
    from .direction_file import check_output_file
    from .loading import load_model
    from .steer import load_pairs, save_vectors, steering_vectors
    from .templates import load_template

    check_output_file(out, "vectors.safetensors")
    pairs = load_pairs(pairs_path)
    lm = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    vectors = steering_vectors(lm, pairs, template=load_template(template), batch_size=batch_size, quiet=quiet)
    save_vectors(out, vectors, lm, pairs_path, pairs)
    norms = ", ".join(f"{n:.3g}" for n in vectors.norm(dim=-1).tolist()[1:])
    click.echo(f"wrote {out}: {vectors.shape[0]} x {vectors.shape[1]} from {len(pairs)} pairs; norm per layer: {norms}")


@steer.command("chat")
@click.argument("model")
@click.option("--vectors", "vectors_path", required=True, type=click.Path(path_type=Path),
              help="Vectors file written by `abliterate steer vectors`.")
@click.option("--layer", required=True, type=int, help="Add the vector to the residual stream after this layer.")
@click.option("--coeff", required=True, type=float, help="Multiplier of the vector (negative: the opposite).")
@click.option("--prompt", "prompts", multiple=True, help="A user message (repeatable); default: one per stdin line.")
@click.option("--max-new-tokens", default=64, show_default=True, help="Greedy tokens per reply.")
@model_options(thinking=False, batch_size=16)
def steer_chat(model: str, vectors_path: Path, layer: int, coeff: float, prompts: tuple[str, ...],
               max_new_tokens: int, device: str, dtype: str, template: str | None, trust_remote_code: bool,
               batch_size: int) -> None:
    """Greedy replies with coeff x vector added after --layer, on the assistant header and every
    generated token (not the user's message)."""
    from .errors import AbliterateError
    from .loading import load_model
    from .steer import generate_steered, load_vectors
    from .templates import load_template

    if not prompts and sys.stdin.isatty():
        click.echo("type one prompt per line; end with Ctrl-D", err=True)
    messages = list(prompts) or [line.strip() for line in sys.stdin if line.strip()]
    if not messages:
        raise AbliterateError("no prompts: pass --prompt TEXT or write one prompt per line on stdin")
    lm = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    vectors = load_vectors(vectors_path, hidden_size=lm.hidden_size, num_layers=lm.num_layers)
    replies = generate_steered(lm, messages, vectors, layer, coeff, max_new_tokens=max_new_tokens,
                               template=load_template(template), batch_size=batch_size)
    for message, reply in zip(messages, replies, strict=True):
        click.echo(f"> {message}\n{reply}\n")


@steer.command("sweep")
@click.argument("model")
@click.option("--vectors", "vectors_path", required=True, type=click.Path(path_type=Path),
              help="Vectors file written by `abliterate steer vectors`.")
@click.option("--pairs", "pairs_path", required=True, type=click.Path(path_type=Path),
              help="Held-out A/B items (same format as for `steer vectors`).")
@click.option("--layers", default=None, help="Layers to steer, START:END (END excluded). Default: all.")
@click.option("--coeffs", default="-2,-1,0,1,2", show_default=True, callback=lambda c, p, v: _parse_coeffs(v),
              help="Comma-separated multipliers of the vector (negative: the opposite behaviour).")
@click.option("--plot", "plot_path", default=None, type=click.Path(path_type=Path),
              help="Also draw the table as a PNG here (needs matplotlib).")
@model_options(thinking=False, batch_size=16)
@click.option("--quiet", "-q", is_flag=True)
def steer_sweep(model: str, vectors_path: Path, pairs_path: Path, layers: str | None, coeffs: list[float],
                plot_path: Path | None, device: str, dtype: str, template: str | None, trust_remote_code: bool,
                batch_size: int, quiet: bool) -> None:
    """Mean P(behaviour-matching letter), normalised over A and B, per layer and coefficient."""
    from .loading import load_model
    from .steer import format_table, load_pairs, load_vectors, plot_table, sweep
    from .templates import load_template

    pairs = load_pairs(pairs_path)
    lm = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    vectors = load_vectors(vectors_path, hidden_size=lm.hidden_size, num_layers=lm.num_layers)
    parsed = parse_layers(layers)
    chosen = range(lm.num_layers) if parsed is None else range(lm.num_layers)[parsed.start:parsed.stop]
    if not chosen:
        from .errors import AbliterateError

        raise AbliterateError(f"--layers {layers} selects no layer of this model; it has layers 0 to "
                              f"{lm.num_layers - 1}")
    table = sweep(lm, pairs, vectors, list(chosen), coeffs, template=load_template(template), batch_size=batch_size,
                  quiet=quiet)
    click.echo(format_table(table))
    if plot_path is not None:
        if plot_table(table, plot_path):
            click.echo(f"wrote {plot_path}")
        else:
            click.echo("note: matplotlib is not installed; no plot written", err=True)


@steer.command("bake")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--vectors", "vectors_path", required=True, type=click.Path(path_type=Path),
              help="Vectors file written by `abliterate steer vectors`.")
@click.option("--layer", required=True, type=int, help="Bake the vector into this layer's MLP output bias "
              "(the residual stream after the layer, as `steer chat --layer` adds it).")
@click.option("--coeff", required=True, type=float, help="Multiplier of the vector (negative: the opposite).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output model folder (must not exist).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (only once the new one is complete).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def steer_bake(checkpoint: Path, vectors_path: Path, layer: int, coeff: float, out: Path, overwrite: bool,
               quiet: bool) -> None:
    """Write CHECKPOINT with coeff x vector baked into the bias of --layer's MLP output projection.

    The result steers without hooks, but on every position, the prompt's included (`steer chat`
    steers only from the assistant header on). Llama-style families get `mlp_bias: true` and zero
    biases on every MLP projection (the flag is global); families with an output bias change it.
    """
    from .bake import bake

    result = bake(checkpoint, vectors_path, layer, coeff, out, overwrite=overwrite, quiet=quiet)
    if result.config_flag:
        click.echo(f"note: set {result.config_flag}: true and added {len(result.added)} zero biases", err=True)
    if result.skipped_files:
        click.echo(f"note: not copied: {', '.join(result.skipped_files)}", err=True)
    click.echo(f"baked {coeff:g} x vector into {result.bias}; wrote {result.out}")


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: temporary output is removed


def main() -> None:
    import warnings

    # Deprecation notices from transformers/peft internals are for their developers, not ours to act on.
    warnings.filterwarnings("ignore", category=FutureWarning)
    signal.signal(signal.SIGTERM, _interrupt)
    cli(prog_name="abliterate")
