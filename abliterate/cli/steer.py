"""steer: steering vectors, chat, sweep and bake (their options: options/steer_family)."""

from __future__ import annotations

import sys

import click

from abliterate.cli.common import arch_option, loaded_model, parse_layers, placement_options, plotted
from abliterate.options.declared import click_options, from_params
from abliterate.options.steer_family import (
    SteerBakeOptions,
    SteerChatOptions,
    SteerExportOptions,
    SteerSweepOptions,
    SteerVectorsOptions,
)


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


@steer.command("vectors")
@click_options(SteerVectorsOptions)
@placement_options
@arch_option
def steer_vectors(**params) -> None:
    """One steering vector per layer: mean behaviour-minus-opposite residual over the pairs.

    A/B items are read at the answer letter after the chat-formatted question; positive/negative
    pairs at the last token of the raw texts. Saved as [layers + 1, d] (row L + 1: after layer L).
    """
    from abliterate.io.direction_file import check_output_file
    from abliterate.measure.templates import load_template
    from abliterate.steer.steering import load_pairs, save_vectors, steering_vectors

    opts = from_params(SteerVectorsOptions, params)
    model_opts = opts.model_options
    check_output_file(opts.out, "vectors.safetensors")
    pairs = load_pairs(opts.pairs_path)
    lm = loaded_model(opts.model, model_opts)
    vectors = steering_vectors(lm, pairs, template=load_template(model_opts.template), batch_size=opts.batch_size,
                               quiet=opts.quiet)
    save_vectors(opts.out, vectors, lm, opts.pairs_path, pairs)
    norms = ", ".join(f"{n:.3g}" for n in vectors.norm(dim=-1).tolist()[1:])
    click.echo(f"wrote {opts.out}: {vectors.shape[0]} x {vectors.shape[1]} from {len(pairs)} pairs; norm per layer: "
               f"{norms}")


@steer.command("chat")
@click_options(SteerChatOptions)
@placement_options
@arch_option
def steer_chat(**params) -> None:
    """Greedy replies with coeff x vector added after --layer, on the assistant header and every
    generated token (not the user's message)."""
    from abliterate.errors import AbliterateError
    from abliterate.measure.templates import load_template
    from abliterate.steer.steering import generate_steered, load_vectors

    opts = from_params(SteerChatOptions, params)
    model_opts = opts.model_options
    if not opts.prompts and sys.stdin.isatty():
        click.echo("type one prompt per line; end with Ctrl-D", err=True)
    messages = list(opts.prompts) or [line.strip() for line in sys.stdin if line.strip()]
    if not messages:
        raise AbliterateError("no prompts: pass --prompt TEXT or write one prompt per line on stdin")
    lm = loaded_model(opts.model, model_opts)
    vectors = load_vectors(opts.vectors_path, hidden_size=lm.hidden_size, num_layers=lm.num_layers, cls=opts.cls)
    replies = generate_steered(lm, messages, vectors, opts.layer, opts.coeff, max_new_tokens=opts.max_new_tokens,
                               template=load_template(model_opts.template), batch_size=opts.batch_size)
    for message, reply in zip(messages, replies, strict=True):
        click.echo(f"> {message}\n{reply}\n")


@steer.command("sweep")
@click_options(SteerSweepOptions)
@placement_options
@arch_option
def steer_sweep(**params) -> None:
    """Mean P(behaviour-matching letter), normalised over A and B, per layer and coefficient."""
    from abliterate.measure.templates import load_template
    from abliterate.steer.steering import format_table, load_pairs, load_vectors, plot_table, sweep

    opts = from_params(SteerSweepOptions, params)
    model_opts = opts.model_options
    pairs = load_pairs(opts.pairs_path)
    lm = loaded_model(opts.model, model_opts)
    vectors = load_vectors(opts.vectors_path, hidden_size=lm.hidden_size, num_layers=lm.num_layers)
    parsed = parse_layers(opts.layers)
    chosen = range(lm.num_layers) if parsed is None else range(lm.num_layers)[parsed.start:parsed.stop]
    if not chosen:
        from abliterate.errors import AbliterateError

        raise AbliterateError(f"--layers {opts.layers} selects no layer of this model; it has layers 0 to "
                              f"{lm.num_layers - 1}")
    table = sweep(lm, pairs, vectors, list(chosen), list(opts.coeffs), template=load_template(model_opts.template),
                  batch_size=opts.batch_size, quiet=opts.quiet)
    click.echo(format_table(table))
    plotted(lambda path: plot_table(table, path), opts.plot_path)


@steer.command("bake")
@click_options(SteerBakeOptions)
@arch_option
def steer_bake(**params) -> None:
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

    opts = from_params(SteerBakeOptions, params)
    if opts.adapter:
        module = write_steering_adapter(opts.checkpoint, opts.vectors_path, opts.layer, opts.coeff, opts.out,
                                        cls=opts.cls, overwrite=opts.overwrite)
        click.echo(f"wrote {opts.out}: a peft adapter adding {opts.coeff:g} x vector through the bias of {module} "
                   "(load it with PeftModel.from_pretrained)")
        return
    result = bake(opts.checkpoint, opts.vectors_path, opts.layer, opts.coeff, opts.out, overwrite=opts.overwrite,
                  quiet=opts.quiet, cls=opts.cls)
    if result.config_flag:
        click.echo(f"note: set {result.config_flag}: true and added {len(result.added)} zero biases", err=True)
    if result.skipped_files:
        click.echo(f"note: not copied: {', '.join(result.skipped_files)}", err=True)
    click.echo(f"baked {opts.coeff:g} x vector into {result.bias}; wrote {result.out}")


@steer.command("export-gguf")
@click_options(SteerExportOptions)
def steer_export_gguf(**params) -> None:
    """Write VECTORS (from `steer vectors`, or a direction from `extract`) as a llama.cpp control vector.

    direction.L = coeff x the vector for layer L, for each layer of --layers: `llama-cli -m MODEL.gguf
    --control-vector FILE` then adds to the residual stream after layer L what `steer chat --layer L
    --coeff C` adds, but at every position, the prompt's included (as `steer bake` does).
    """
    from abliterate.gguf.control_vector import export_control_vector

    opts = from_params(SteerExportOptions, params)
    written = export_control_vector(opts.vectors_path, opts.coeff, parse_layers(opts.layers), opts.out,
                                    overwrite=opts.overwrite)
    norms = ", ".join(f"{n:.3g}" for n in written.norms)
    click.echo(f"wrote {written.out}: direction.{{{','.join(map(str, written.layers))}}} (norms {norms}); "
               f"run: llama-cli -m MODEL.gguf --control-vector {written.out}")
