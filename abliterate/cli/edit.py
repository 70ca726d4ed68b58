"""apply, merge, verify: the commands that read and write checkpoints."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from abliterate.arch.table import COMPONENTS
from abliterate.cli.common import arch_option, given_on_command_line, parse_components, parse_layers, parse_size

if TYPE_CHECKING:
    from abliterate.edit.plan import EditOptions
    from abliterate.edit.verify import VerifyReport
    from abliterate.io.checkpoint import Checkpoint
    from abliterate.io.direction_file import Direction
    from abliterate.lora.export import AdapterOptions


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--direction", default=None, type=click.Path(path_type=Path),
              help="Direction file (.safetensors with tensor 'direction', [d] or [layers+1, d]); required unless "
              "--recipe names one.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output model folder (must not exist).")
@click.option("--scale", default=1.0, show_default=True,
              help="1 removes the direction fully, 0.5 half; negative values amplify it.")
@click.option("--add", "add_direction", is_flag=True, help="Amplify the direction instead of removing it (uses "
              "-|scale|: W + |s| r r^T W), e.g. to make a model refuse more; --scale 2 is often needed.")
@click.option("--layers", default=None, callback=lambda c, p, v: parse_layers(v) and v,
              help="Decoder layers to edit, START:END (END excluded). Default: all.")
@click.option("--components", default=",".join(COMPONENTS), show_default=True,
              callback=lambda c, p, v: parse_components(v),
              help="Which writers to edit: embed (token/position embeddings), attn (attention output), mlp "
              "(MLP / MoE expert / shared expert outputs).")
@click.option("--targets", multiple=True, help="Regex (full match) of tensor names to edit instead of the "
              "architecture table; repeatable. Orientation is read from the shape ([d, in] assumed when square).")
@click.option("--keep-tied", is_flag=True, help="With tied embeddings, edit the shared matrix instead of writing "
              "an untied lm_head with the original; the output layer then also stops reading the direction.")
@click.option("--norm-preserve", is_flag=True, help="Rescale each vector an edited tensor writes into the residual "
              "stream (a column of a Linear weight, a row of an embedding, a bias) to its original norm after the "
              "projection: W' = (I - s r r^T) W D. Not with --adapter (no low-rank update expresses D).")
@click.option("--biproject", is_flag=True, help="First make the direction orthogonal to the harmless mean at its "
              "layer and position (needs the file `abliterate extract` wrote); the edited folder keeps the result.")
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
@click.option("--requant", default="Q8_0", show_default=True,
              help="GGUF input only: the type to write edited tensors whose quantisation the gguf library cannot "
              "write (K-quants, IQ types); Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, F16, BF16 or F32.")
@arch_option
def apply(checkpoint: Path, direction: Path | None, out: Path, scale: float, add_direction: bool,
          layers: str | None, components: tuple[str, ...], targets: tuple[str, ...], keep_tied: bool,
          norm_preserve: bool, biproject: bool, max_memory: int,
          overwrite: bool, quiet: bool, adapter: bool, ignore_biases: bool, base_model: str | None,
          recipe_path: Path | None, layer_scales_path: Path | None, requant: str) -> None:
    """Project a direction out of every residual-stream writer of CHECKPOINT, writing a new folder.

    Edits the token embedding, each attention output projection, each MLP output projection (every
    MoE expert and shared expert) and their biases: W' = W - s r (r^T W). Everything else is copied
    byte for byte; shards keep their names, order and dtypes. Works tensor by tensor within
    --max-memory, whatever the model size. The result is exactly the original model with the
    direction removed from the output of each edited module.

    Gemma 2, Gemma 3, OLMo 2, OLMo 3, GLM-4 and EXAONE 4 normalise attention and MLP outputs before adding them to the
    residual stream: there the edit removes the direction from those outputs before the norm, which
    is not removing it from the residual stream (the norm's gain can bring a component back).

    With tied input/output embeddings the output layer is kept as it was (an untied lm_head holding
    the original matrix is written and tie_word_embeddings set to false), unless --keep-tied.

    With --adapter, --out receives a peft LoRA adapter of the same edit instead (a few MB);
    `abliterate merge CHECKPOINT ADAPTER` turns it into the same tensors `apply` writes.

    CHECKPOINT may be a llama.cpp .gguf file (needs `pip install 'abliterate[gguf]'`); --out is then
    the output file. Float tensors are edited exactly as above; quantised ones are dequantised,
    edited in float32 and quantised again (their own type where the gguf library can write it, else
    --requant), the largest quantisation errors printed. Metadata and other tensors are copied.
    """
    from abliterate.edit.plan import edit_options
    from abliterate.errors import AbliterateError
    from abliterate.io.checkpoint import Checkpoint
    from abliterate.options.recipe import apply_settings

    if not adapter and (ignore_biases or base_model):
        raise AbliterateError("--ignore-biases and --base-model only apply with --adapter")
    gguf = checkpoint.suffix.lower() == ".gguf"
    if gguf and (adapter or targets or recipe_path or norm_preserve or biproject):
        raise AbliterateError("--adapter, --targets, --recipe, --norm-preserve and --biproject are not supported "
                              "for GGUF input; pass the edit's options (--scale, --layers, --components, "
                              "--layer-scales) directly")
    ckpt = None if gguf else Checkpoint.open(checkpoint)
    settings = apply_settings(ckpt.config.get("model_type") if ckpt else None, recipe_path, dict(
        scale=scale, layers=layers, components=components, targets=targets, keep_tied=keep_tied,
        norm_preserve=norm_preserve, direction=direction), given_on_command_line(), layer_scales_path)
    options = edit_options(settings, add=add_direction)
    direction = Path(settings.direction) if settings.direction else None
    if ckpt is None:
        return _apply_gguf(checkpoint, direction, out, options, requant, max_memory, overwrite, quiet)
    if direction is None:
        raise AbliterateError("no direction: pass --direction FILE (or a --recipe naming apply.direction, as "
                              "`abliterate search` writes)")
    if adapter:
        from abliterate.lora.export import AdapterOptions

        _apply_adapter(ckpt, direction, biproject or settings.biprojected, out, options, AdapterOptions(
            ignore_biases=ignore_biases, base_model=base_model, max_memory=max_memory, overwrite=overwrite,
            quiet=quiet))
    else:
        _apply_weights(ckpt, direction, biproject or settings.biprojected, out, options, max_memory, overwrite, quiet)


def _load(ckpt: Checkpoint, path: Path, biproject: bool) -> Direction:
    """The direction file checked against the model; with --biproject made orthogonal to the harmless mean."""
    from abliterate.io.direction_file import biproject as make_biprojected
    from abliterate.io.direction_file import load_direction

    direction = load_direction(path, hidden_size=ckpt.hidden_size, num_layers=ckpt.num_layers)
    return make_biprojected(direction) if biproject else direction


def _apply_adapter(ckpt: Checkpoint, direction_path: Path, biproject: bool, out: Path, options: EditOptions,
                   adapter_options: AdapterOptions) -> None:
    from abliterate.edit.plan import plan_edit
    from abliterate.lora.export import export_adapter

    direction = _load(ckpt, direction_path, biproject)
    exported = export_adapter(ckpt, plan_edit(ckpt, options), direction, out, adapter_options)
    for note in exported.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote a LoRA adapter of {exported.modules} modules and {exported.biases} biases "
               f"({exported.nbytes / 1e6:.1f} MB) to {exported.out}")


def _apply_weights(ckpt: Checkpoint, direction_path: Path, biproject: bool, out: Path, options: EditOptions,
                   max_memory: int, overwrite: bool, quiet: bool) -> None:
    from abliterate.edit.plan import plan_edit
    from abliterate.edit.weights import apply_edit

    direction = _load(ckpt, direction_path, biproject)
    result = apply_edit(ckpt, plan_edit(ckpt, options), direction, out, overwrite=overwrite, max_memory=max_memory,
                        quiet=quiet)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    if result.skipped_files:
        click.echo(f"note: not copied (other weight formats or the base model card): {', '.join(result.skipped_files)}",
                   err=True)
    click.echo(f"edited {result.edited} tensors; wrote {result.out}")


def _apply_gguf(checkpoint: Path, direction_path: Path | None, out: Path, options: EditOptions, requant: str,
                max_memory: int, overwrite: bool, quiet: bool) -> None:
    """`apply` on a .gguf file (abliterate.gguf): the same edit, streamed into a new GGUF."""
    from abliterate.errors import AbliterateError
    from abliterate.gguf.edit import apply_gguf, summarise
    from abliterate.gguf.format import read_gguf
    from abliterate.gguf.plan import plan_gguf
    from abliterate.io.direction_file import load_direction

    if direction_path is None:
        raise AbliterateError("no direction: pass --direction FILE (a direction file from `abliterate extract`)")
    plan = plan_gguf(read_gguf(checkpoint), options, requant)
    direction = load_direction(direction_path, hidden_size=plan.hidden_size, num_layers=plan.num_layers)
    result = apply_gguf(plan, direction, out, overwrite=overwrite, max_memory=max_memory, quiet=quiet)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    summarise(result, click.echo)
    click.echo(f"edited {result.edited} tensors; wrote {result.out} ({result.size / 1e6:.1f} MB)")


@click.command()
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("adapter_dir", metavar="ADAPTER", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output model folder (must not exist).")
@click.option("--max-memory", default="256MB", show_default=True, callback=lambda c, p, v: parse_size(v),
              help="Memory budget for tensor chunks.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (only once the new one is complete).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@arch_option
def merge(base: Path, adapter_dir: Path, out: Path, max_memory: int, overwrite: bool, quiet: bool) -> None:
    """Merge a LoRA ADAPTER (any rank) into the checkpoint BASE, writing a new folder.

    Tensor by tensor within --max-memory, like `apply`: adapted tensors get W + scaling B A in float32,
    rounded once to their dtype; everything else is copied byte for byte. Merging an adapter written by
    `apply --adapter` gives the tensors `apply` writes. DoRA and other LoRA variants are refused.
    """
    from abliterate.io.checkpoint import Checkpoint
    from abliterate.lora.merge import merge_adapter

    result = merge_adapter(Checkpoint.open(base), adapter_dir, out, overwrite=overwrite, max_memory=max_memory,
                           quiet=quiet)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"merged {result.adapter_entries} adapter tensors into {result.merged} tensors; wrote {result.out}")


@click.command()
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
@arch_option
def verify(original: Path, edited: Path | None, direction_path: Path | None, from_options: bool, scale: float,
           layers: str | None, components: tuple[str, ...], max_memory: int | None) -> None:
    """Check that EDITED is ORIGINAL with the direction projected out, and nothing else changed.

    Each edited tensor is recomputed in float64 from ORIGINAL: per row or column, the coefficient T it
    removed along r is estimated from the two files and every element must satisfy
    |W'_i - (W_i - r_i T)| <= rho |W'_i| + 3u |r_i T| + |r_i| D + tiny (rho: one rounding of the dtype
    plus one float32 subtraction; u = 2^-24; D: the estimate's own rounding bound), and T must be
    within s gamma_d sum_k |r_k W_k| + u |T| + D of s r^T W (gamma_d = d u / (1 - d u): summing d
    float32 products in any order). At scale 1 at most 1e-6 |W| may remain along r (float32;
    eps(dtype) |W| for 16-bit). Every other tensor, the index, config and other files must be
    identical. The report says how many tensors were edited, at which scale, and how many are
    identical. Exits 1 on any violation.

    With one folder, checks a download against the SHA256SUMS manifest that abliterate published with it.

    ORIGINAL and EDITED may be .gguf files: re-quantised tensors are then checked to within one
    quantisation step of the projection of the original's dequantised values.
    """
    from abliterate.publish.card import check_checksums

    if edited is None:
        problems = check_checksums(original)
        for problem in problems:
            click.echo(f"FAIL {problem}", err=True)
        click.echo("all files match SHA256SUMS" if not problems else f"{len(problems)} problem(s)")
        sys.exit(1 if problems else 0)

    from abliterate.edit.plan import EditOptions

    options = EditOptions(scale=scale, layers=parse_layers(layers), components=components) if from_options else None
    if original.suffix.lower() == ".gguf":
        from abliterate.gguf.verify import verify_gguf

        report = verify_gguf(original, edited, _gguf_direction(edited, direction_path), options, max_memory=max_memory)
        return _print_report(report)
    from abliterate.edit.verify import verify as run_verify
    from abliterate.edit.weights import DIRECTION_NAME
    from abliterate.io.checkpoint import Checkpoint
    from abliterate.io.direction_file import load_direction

    ckpt = Checkpoint.open(original)
    if direction_path is None and not (edited / DIRECTION_NAME).is_file():
        from abliterate.errors import AbliterateError

        raise AbliterateError(f"{edited} holds no {DIRECTION_NAME} (abliterate writes one beside every edit); pass "
                              "--direction FILE with the direction the edit used")
    direction = load_direction(direction_path or edited / DIRECTION_NAME, hidden_size=ckpt.hidden_size,
                               num_layers=ckpt.num_layers)
    report = run_verify(original, edited, direction, options, max_memory=max_memory)
    _print_report(report)


def _gguf_direction(edited: Path, direction_path: Path | None) -> Direction:
    from abliterate.errors import AbliterateError
    from abliterate.gguf.format import read_gguf
    from abliterate.gguf.verify import recorded_direction
    from abliterate.io.direction_file import load_direction

    path = direction_path or recorded_direction(edited)
    if path is None:
        raise AbliterateError(f"no direction: the manifest beside {edited} names none that exists; pass --direction "
                              "FILE with the direction the edit used")
    header = read_gguf(edited)
    arch = header.architecture
    return load_direction(path, hidden_size=header.int_field(f"{arch}.embedding_length"),
                          num_layers=header.int_field(f"{arch}.block_count"))


def _print_report(report: VerifyReport) -> None:
    for problem in report.problems:
        click.echo(f"FAIL {problem}", err=True)
    click.echo(f"{report.summary()}: " + ("OK" if report.ok else f"{len(report.problems)} problem(s)"))
    sys.exit(0 if report.ok else 1)
