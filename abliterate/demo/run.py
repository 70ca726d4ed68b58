"""`abliterate demo`: the whole job on a tiny chat model trained on the spot, with no downloads.

Trains the toy model (abliterate.demo.toy: a tiny Llama that refuses harmful-looking requests), extracts
its refusal direction, edits its sharded checkpoint with the streaming editor, verifies the edit,
and measures refusals on held-out prompts before and after, plus the KL to the original.
"""

from __future__ import annotations

from pathlib import Path

import click


def run_demo(workdir: Path) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    from abliterate.demo.toy import toy_prompts, train_toy_model
    from abliterate.edit.plan import EditOptions, plan_edit
    from abliterate.edit.verify import verify
    from abliterate.edit.weights import apply_edit
    from abliterate.evaluate.evaluation import evaluate
    from abliterate.evaluate.records import EvalSettings
    from abliterate.io.checkpoint import Checkpoint
    from abliterate.io.direction_file import load_direction
    from abliterate.measure.extract import PromptSets, extract, save_extraction
    from abliterate.measure.loading import load_model

    original = workdir / "toy-chat"
    click.echo("1. training a tiny chat model that refuses harmful-looking requests (about 15 s) ...")
    train_toy_model(original)
    click.echo(f"   -> {original} ({len(list(original.glob('*.safetensors')))} shards)")

    prompts = toy_prompts()
    held = len(prompts.harmful_train) // 4
    lm = load_model(original, dtype="float32", device="cpu")
    result = extract(lm, PromptSets(prompts.harmful_train[held:], prompts.harmless_train[held:],
                                    prompts.harmful_train[:held], prompts.harmless_train[:held]), quiet=True)
    direction_file = workdir / "direction.safetensors"
    save_extraction(result, direction_file)
    click.echo(f"2. extracted the refusal direction: layer {result.best.layer}, post-instruction position "
               f"{result.best.position}, chosen among {len(result.scores)} candidates -> {direction_file}")

    ckpt = Checkpoint.open(original)
    direction = load_direction(direction_file, hidden_size=ckpt.hidden_size, num_layers=ckpt.num_layers)
    edited = workdir / "toy-chat-abliterated"
    applied = apply_edit(ckpt, plan_edit(ckpt, EditOptions()), direction, edited, overwrite=True, quiet=True)
    click.echo(f"3. projected it out of {applied.edited} residual-stream writers -> {edited}")

    report = verify(original, edited, direction)
    click.echo(f"4. verify: {'OK' if report.ok else report.problems} ({report.tensors_checked} tensors; largest "
               f"residual along the direction {report.max_relative_residual:.1e} |W|)")

    held_out = workdir / "held-out-harmful.txt"
    held_out.write_text("\n".join(prompts.harmful_test) + "\n")
    harmless = workdir / "held-out-harmless.txt"
    harmless.write_text("\n".join(prompts.harmless_test) + "\n")
    settings = EvalSettings(limit=None, max_new_tokens=24, harmful=str(held_out), harmless=str(harmless))
    before = evaluate(lm, settings=settings, quiet=True)
    after = evaluate(load_model(edited, dtype="float32", device="cpu"), baseline=lm, settings=settings, quiet=True)
    n = len(prompts.harmful_test)
    click.echo(f"5. refusals on {n} held-out harmful requests: {before.refusal_rate:.0%} before, "
               f"{after.refusal_rate:.0%} after; first-token KL to the original on harmless prompts "
               f"{after.kl_first_token:.4f}")
