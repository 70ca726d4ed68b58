"""steer: steering vectors, chat, sweep and bake."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from abliterate.cli.common import arch_option, model_options, parse_layers


@click.group()
def steer() -> None:
    """Steering vectors (contrastive activation addition): build, chat with, sweep, bake in.

    \b
    abliterate steer vectors MODEL --pairs PAIRS.jsonl --out vectors.safetensors
    abliterate steer chat MODEL --vectors F --layer L --coeff C [--prompt P]
    abliterate steer sweep MODEL --vectors F --pairs HELDOUT.jsonl --layers A:B --coeffs -2,-1,0,1,2
    abliterate steer bake CHECKPOINT --vectors F --layer L --coeff C --out DIR
    abliterate steer export-gguf VECTORS --layers A:B --coeff C --out control.gguf
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
    from abliterate.io.direction_file import check_output_file
    from abliterate.measure.loading import load_model
    from abliterate.measure.templates import load_template
    from abliterate.steer.steering import load_pairs, save_vectors, steering_vectors

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
@click.option("--class", "cls", default=None, help="With a `jailbreak vectors` file: steer with this class's vector "
              "(e.g. --coeff -1 subtracts it: hardening against that kind of jailbreak).")
@click.option("--prompt", "prompts", multiple=True, help="A user message (repeatable); default: one per stdin line.")
@click.option("--max-new-tokens", default=64, show_default=True, help="Greedy tokens per reply.")
@model_options(thinking=False, batch_size=16)
def steer_chat(model: str, vectors_path: Path, layer: int, coeff: float, cls: str | None, prompts: tuple[str, ...],
               max_new_tokens: int, device: str, dtype: str, template: str | None, trust_remote_code: bool,
               batch_size: int) -> None:
    """Greedy replies with coeff x vector added after --layer, on the assistant header and every
    generated token (not the user's message)."""
    from abliterate.errors import AbliterateError
    from abliterate.measure.loading import load_model
    from abliterate.measure.templates import load_template
    from abliterate.steer.steering import generate_steered, load_vectors

    if not prompts and sys.stdin.isatty():
        click.echo("type one prompt per line; end with Ctrl-D", err=True)
    messages = list(prompts) or [line.strip() for line in sys.stdin if line.strip()]
    if not messages:
        raise AbliterateError("no prompts: pass --prompt TEXT or write one prompt per line on stdin")
    lm = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    vectors = load_vectors(vectors_path, hidden_size=lm.hidden_size, num_layers=lm.num_layers, cls=cls)
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
    from abliterate.measure.loading import load_model
    from abliterate.measure.templates import load_template
    from abliterate.steer.steering import format_table, load_pairs, load_vectors, plot_table, sweep

    pairs = load_pairs(pairs_path)
    lm = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    vectors = load_vectors(vectors_path, hidden_size=lm.hidden_size, num_layers=lm.num_layers)
    parsed = parse_layers(layers)
    chosen = range(lm.num_layers) if parsed is None else range(lm.num_layers)[parsed.start:parsed.stop]
    if not chosen:
        from abliterate.errors import AbliterateError

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
@click.option("--class", "cls", default=None, help="With a `jailbreak vectors` file: bake this class's vector.")
@click.option("--adapter", is_flag=True, help="Write a peft LoRA adapter instead (the vector as the LoRA B bias, "
              "`lora_bias`): exact for families without an MLP output bias too (Qwen2/3, Mistral, Phi-3).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (only once the new one is complete).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@arch_option
def steer_bake(checkpoint: Path, vectors_path: Path, layer: int, coeff: float, out: Path, cls: str | None,
               adapter: bool, overwrite: bool, quiet: bool) -> None:
    """Write CHECKPOINT with coeff x vector baked into the bias of --layer's MLP output projection.

    The result steers without hooks, but on every position, the prompt's included (`steer chat`
    steers only from the assistant header on). Llama-style families get `mlp_bias: true` and zero
    biases on every MLP projection (the flag is global); families with an output bias change it.
    --adapter writes the same addition as a peft adapter, for families with neither. A direction
    file from `extract` adds its harmful-minus-harmless difference: refusal induction (use --layer
    one below the direction's layer, which counts the residual stream entering a layer).
    """
    from abliterate.steer.adapter import write_steering_adapter
    from abliterate.steer.bake import bake

    if adapter:
        module = write_steering_adapter(checkpoint, vectors_path, layer, coeff, out, cls=cls, overwrite=overwrite)
        click.echo(f"wrote {out}: a peft adapter adding {coeff:g} x vector through the bias of {module} (load it with "
                   "PeftModel.from_pretrained)")
        return
    result = bake(checkpoint, vectors_path, layer, coeff, out, overwrite=overwrite, quiet=quiet, cls=cls)
    if result.config_flag:
        click.echo(f"note: set {result.config_flag}: true and added {len(result.added)} zero biases", err=True)
    if result.skipped_files:
        click.echo(f"note: not copied: {', '.join(result.skipped_files)}", err=True)
    click.echo(f"baked {coeff:g} x vector into {result.bias}; wrote {result.out}")


@steer.command("export-gguf")
@click.argument("vectors_path", metavar="VECTORS", type=click.Path(path_type=Path))
@click.option("--layers", required=True, help="Layers whose output to steer, START:END (END excluded) or one layer, "
              "e.g. 12 (what `steer chat --layer 12` steers). llama.cpp cannot steer layer 0.")
@click.option("--coeff", required=True, type=float, help="Multiplier of the vector (negative: the opposite).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Control vector file to write (.gguf).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def steer_export_gguf(vectors_path: Path, layers: str, coeff: float, out: Path, overwrite: bool) -> None:
    """Write VECTORS (from `steer vectors`, or a direction from `extract`) as a llama.cpp control vector.

    direction.L = coeff x the vector for layer L, for each layer of --layers: `llama-cli -m MODEL.gguf
    --control-vector FILE` then adds to the residual stream after layer L what `steer chat --layer L
    --coeff C` adds, but at every position, the prompt's included (as `steer bake` does).
    """
    from abliterate.gguf.control_vector import export_control_vector

    written = export_control_vector(vectors_path, coeff, parse_layers(layers), out, overwrite=overwrite)
    norms = ", ".join(f"{n:.3g}" for n in written.norms)
    click.echo(f"wrote {written.out}: direction.{{{','.join(map(str, written.layers))}}} (norms {norms}); "
               f"run: llama-cli -m MODEL.gguf --control-vector {written.out}")
