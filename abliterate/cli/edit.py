"""apply, merge, verify: the commands that read and write checkpoints (their options: options/families.ApplyOptions,
options/checkpoint_family)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from abliterate.cli.common import arch_option, given_on_command_line, parse_layers
from abliterate.options.checkpoint_family import MergeOptions, VerifyOptions
from abliterate.options.declared import click_options, from_params
from abliterate.options.families import ApplyOptions

if TYPE_CHECKING:
    from abliterate.edit.plan import EditOptions
    from abliterate.edit.verify import VerifyReport
    from abliterate.io.checkpoint import Checkpoint
    from abliterate.io.direction_file import Direction
    from abliterate.lora.export import AdapterOptions


@click.command()
@click_options(ApplyOptions)
@arch_option
def apply(**params) -> None:
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
    edited in float32 and quantised again (their own type, K-quants as llama.cpp writes them; IQ types
    as --requant), the largest quantisation errors printed. Metadata and other tensors are copied.
    With --adapter, --out receives a llama.cpp LoRA adapter GGUF of the exact edit instead
    (`llama-cli -m model.gguf --lora FILE`; --lora-scaled FILE S applies S times the edit).

    FP8 block-scaled (DeepSeek V3, Qwen3 FP8) and MXFP4 (gpt-oss) folders are edited in their own format:
    each edited tensor dequantised chunk by chunk, projected, quantised again with new block scales (the
    scale tensors rewritten), the largest quantisation errors printed.
    """
    from abliterate.edit.plan import edit_options
    from abliterate.errors import AbliterateError
    from abliterate.io.checkpoint import Checkpoint
    from abliterate.options.declared import recipe_overrides
    from abliterate.options.recipe import apply_settings

    opts = from_params(ApplyOptions, params)
    if not opts.adapter and (opts.ignore_biases or opts.base_model):
        raise AbliterateError("--ignore-biases and --base-model only apply with --adapter")
    gguf = opts.checkpoint.suffix.lower() == ".gguf"
    if gguf and (opts.targets or opts.recipe or opts.norm_preserve or opts.biproject or opts.base_model):
        raise AbliterateError("--targets, --recipe, --norm-preserve, --biproject and --base-model are not supported "
                              "for GGUF input; pass the edit's options (--scale, --layers, --components, "
                              "--layer-scales) directly")
    ckpt = None if gguf else Checkpoint.open(opts.checkpoint)
    settings = apply_settings(ckpt.config.get("model_type") if ckpt else None, opts.recipe,
                              recipe_overrides(opts, "apply"), given_on_command_line(), opts.layer_scales)
    options = edit_options(settings, add=opts.add)
    direction = Path(settings.direction) if settings.direction else None
    if ckpt is None:
        return _apply_gguf(opts.checkpoint, direction, opts.out, options, opts.requant, opts.max_memory,
                           opts.overwrite, opts.quiet, lora=opts.adapter, ignore_biases=opts.ignore_biases)
    if direction is None:
        raise AbliterateError("no direction: pass --direction FILE (or a --recipe naming apply.direction, as "
                              "`abliterate search` writes)")
    if opts.adapter:
        from abliterate.lora.export import AdapterOptions

        _apply_adapter(ckpt, direction, settings.biprojected, opts.out, options, AdapterOptions(
            ignore_biases=opts.ignore_biases, base_model=opts.base_model, max_memory=opts.max_memory,
            overwrite=opts.overwrite, quiet=opts.quiet))
    else:
        _apply_weights(ckpt, direction, settings.biprojected, opts.out, options, opts.max_memory, opts.overwrite,
                       opts.quiet)


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
    from abliterate.edit.requantise import summarise
    from abliterate.edit.weights import apply_edit

    direction = _load(ckpt, direction_path, biproject)
    result = apply_edit(ckpt, plan_edit(ckpt, options), direction, out, overwrite=overwrite, max_memory=max_memory,
                        quiet=quiet)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    summarise(result.quant_errors, click.echo)
    if result.skipped_files:
        click.echo(f"note: not copied (other weight formats or the base model card): {', '.join(result.skipped_files)}",
                   err=True)
    click.echo(f"edited {result.edited} tensors; wrote {result.out}")


def _apply_gguf(checkpoint: Path, direction_path: Path | None, out: Path, options: EditOptions, requant: str,
                max_memory: int, overwrite: bool, quiet: bool, *, lora: bool = False,
                ignore_biases: bool = False) -> None:
    """`apply` on a .gguf file (abliterate.gguf): the same edit, streamed into a new GGUF, or with --adapter
    written as a llama.cpp LoRA adapter GGUF (gguf/lora.py)."""
    from abliterate.errors import AbliterateError
    from abliterate.gguf.edit import apply_gguf, summarise
    from abliterate.gguf.format import read_gguf
    from abliterate.gguf.plan import plan_gguf
    from abliterate.io.direction_file import load_direction

    if direction_path is None:
        raise AbliterateError("no direction: pass --direction FILE (a direction file from `abliterate extract`)")
    plan = plan_gguf(read_gguf(checkpoint), options, requant)
    direction = load_direction(direction_path, hidden_size=plan.hidden_size, num_layers=plan.num_layers)
    if lora:
        from abliterate.gguf.lora import describe, write_gguf_lora

        written = write_gguf_lora(plan, direction, out, ignore_biases=ignore_biases, overwrite=overwrite,
                                  max_memory=max_memory)
        for note in written.notes:
            click.echo(f"note: {note}", err=True)
        return click.echo(describe(written))
    result = apply_gguf(plan, direction, out, overwrite=overwrite, max_memory=max_memory, quiet=quiet)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    summarise(result, click.echo)
    click.echo(f"edited {result.edited} tensors; wrote {result.out} ({result.size / 1e6:.1f} MB)")


@click.command()
@click_options(MergeOptions)
@arch_option
def merge(**params) -> None:
    """Merge a LoRA ADAPTER (any rank) into the checkpoint BASE, writing a new folder.

    Tensor by tensor within --max-memory, like `apply`: adapted tensors get W + scaling B A in float32,
    rounded once to their dtype; everything else is copied byte for byte. Merging an adapter written by
    `apply --adapter` gives the tensors `apply` writes. DoRA and other LoRA variants are refused.
    """
    from abliterate.io.checkpoint import Checkpoint
    from abliterate.lora.merge import merge_adapter

    opts = from_params(MergeOptions, params)
    result = merge_adapter(Checkpoint.open(opts.base), opts.adapter_dir, opts.out, overwrite=opts.overwrite,
                           max_memory=opts.max_memory, quiet=opts.quiet)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    from abliterate.edit.requantise import summarise

    summarise(result.quant_errors, click.echo)
    click.echo(f"merged {result.adapter_entries} adapter tensors into {result.merged} tensors; wrote {result.out}")


@click.command()
@click_options(VerifyOptions)
@arch_option
def verify(**params) -> None:
    """Check that EDITED is ORIGINAL with the direction projected out, and nothing else changed.

    Each edited tensor is recomputed in float64 from ORIGINAL: per row or column, the coefficient T it
    removed along r is estimated from the two files and every element must satisfy
    |W'_i - (W_i - r_i T)| <= rho |W'_i| + 3u |r_i T| + |r_i| D + tiny (rho: one rounding of the dtype
    plus one float32 subtraction; u = 2^-24; D: the estimate's own rounding bound), and T must be
    within s gamma_d sum_k |r_k W_k| + u |T| + D of s r^T W (gamma_d = d u / (1 - d u): summing d
    float32 products in any order). At scale 1 at most 1e-6 |W| may remain along r (float32;
    eps(dtype) |W| for 16-bit). A norm-preserving edit's factor F is estimated per vector too:
    |W'_i - F (W_i - r_i T)| <= rho_2 |W'_i| + 3u |F r_i T| + E_F |W_i - r_i T| + (F + E_F) |r_i| E_T + tiny
    (rho_2 = (2u + e) / (1 - 2u - e): two float32 roundings, e half a step of a 16-bit dtype; E_F, E_T the
    estimates' rounding bounds), T as above, and F within E_F plus one rounding of the range of
    |w| / |w - s c' r| over every c' the summation bound allows. Several directions (rank k, norm-preserving
    or not): the per-element bound in abliterate/edit/verify_span.py. Every other tensor, the index, config
    and other files must be identical. The report says how many tensors were edited, at which scale, and how many are
    identical. Exits 1 on any violation.

    With one folder, checks a download against the SHA256SUMS manifest that abliterate published with it.

    ORIGINAL and EDITED may be .gguf files: re-quantised tensors are then checked to within one
    quantisation step of the projection of the original's dequantised values. FP8 and MXFP4 tensors of a
    folder are checked the same way, and their block scales against those the expected values call for.
    """
    from abliterate.publish.card import check_checksums

    opts = from_params(VerifyOptions, params)
    if opts.edited is None:
        problems = check_checksums(opts.original)
        for problem in problems:
            click.echo(f"FAIL {problem}", err=True)
        click.echo("all files match SHA256SUMS" if not problems else f"{len(problems)} problem(s)")
        sys.exit(1 if problems else 0)

    from abliterate.edit.plan import EditOptions

    options = EditOptions(scale=opts.scale, layers=parse_layers(opts.layers), components=opts.components) \
        if opts.from_options else None
    if opts.original.suffix.lower() == ".gguf":
        from abliterate.gguf.verify import verify_gguf

        return _print_report(verify_gguf(opts.original, opts.edited, _gguf_direction(opts.edited,
                                                                                     opts.direction_path), options,
                                         max_memory=opts.max_memory))
    _print_report(_verify_folders(opts, options))


def _verify_folders(opts: VerifyOptions, options: EditOptions | None) -> VerifyReport:
    """`verify` on two safetensors folders, with the direction given or the copy `apply` wrote into EDITED."""
    from abliterate.edit.verify import verify as run_verify
    from abliterate.edit.weights import DIRECTION_NAME
    from abliterate.errors import AbliterateError
    from abliterate.io.checkpoint import Checkpoint
    from abliterate.io.direction_file import load_direction

    ckpt = Checkpoint.open(opts.original)
    if opts.direction_path is None and not (opts.edited / DIRECTION_NAME).is_file():
        raise AbliterateError(f"{opts.edited} holds no {DIRECTION_NAME} (abliterate writes one beside every edit); "
                              "pass --direction FILE with the direction the edit used")
    direction = load_direction(opts.direction_path or opts.edited / DIRECTION_NAME, hidden_size=ckpt.hidden_size,
                               num_layers=ckpt.num_layers)
    return run_verify(opts.original, opts.edited, direction, options, max_memory=opts.max_memory)


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
