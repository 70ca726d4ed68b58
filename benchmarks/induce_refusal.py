"""Refusal induction, each way: the share of held-out harmless requests refused on the toy model (or yours).

    python3 benchmarks/induce_refusal.py [--model DIR --direction FILE] [--coeff 1]

Without --model it trains the toy chat model and extracts its refusal direction. Then it adds the
harmful-minus-harmless difference the direction file holds (its `magnitude`) after the layer below
the direction's layer: by hook from the assistant header on (`steer chat`), baked as a bias on every
position (`steer bake`, where the family has one) and as a peft adapter (`steer bake --adapter`), and
prints the refusal rate (marker list) on held-out harmless requests for each.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner
from safetensors import safe_open

from abliterate.cli.main import cli
from abliterate.demo.toy import toy_prompts, train_toy_model
from abliterate.evaluate.generation import generate
from abliterate.evaluate.markers import find_refusal
from abliterate.evaluate.records import EvalSettings
from abliterate.measure.loading import load_model
from abliterate.steer.steering import generate_steered, load_vectors


def run(*args: str) -> None:
    result = CliRunner().invoke(cli, list(args))
    if result.exit_code != 0:
        sys.exit(f"abliterate {' '.join(args)} failed: {result.output}")


def rate(replies: list[str]) -> float:
    return sum(find_refusal(r) is not None for r in replies) / len(replies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="A chat model folder (default: train the toy)")
    parser.add_argument("--direction", type=Path, help="Its direction file (default: extract one)")
    parser.add_argument("--harmless", default=None, help="Held-out harmless requests, one per line (default: the "
                        "toy's test split, or builtin:harmless:test with --model)")
    parser.add_argument("--coeff", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="induce-"))
    model = args.model or train_toy_model(work / "toy")
    if args.direction is None:
        prompts = toy_prompts()
        (work / "harmful.txt").write_text("\n".join(prompts.harmful_train))
        (work / "harmless.txt").write_text("\n".join(prompts.harmless_train))
        run("extract", str(model), "--harmful", str(work / "harmful.txt"), "--harmless", str(work / "harmless.txt"),
            "--out", str(work / "d.safetensors"), "--device", "cpu", "-q")
    direction = args.direction or work / "d.safetensors"
    with safe_open(str(direction), "np") as f:
        meta = f.metadata()
    layer = int(meta["layer"]) - 1  # the direction's layer counts the residual entering it
    if args.harmless:
        harmless = Path(args.harmless).read_text().split("\n")
    elif args.model:
        from abliterate.prompts import builtin
        harmless = builtin("harmless", "test")
    else:
        harmless = toy_prompts().harmless_test
    harmless = [h for h in harmless if h.strip()]
    lm = load_model(model, dtype="float32", device="cpu")
    settings = EvalSettings(batch_size=32)
    vectors = load_vectors(direction, hidden_size=lm.hidden_size, num_layers=lm.num_layers)
    print(f"direction layer {meta['layer']} (added after decoder layer {layer}), magnitude "
          f"{meta.get('magnitude', float(np.linalg.norm(vectors[0])))}, coeff {args.coeff:g}, "
          f"{len(harmless)} held-out harmless requests")
    plain = [lm.tokenizer.decode(ids, skip_special_tokens=True) for _, ids in
             generate(lm, harmless, settings, args.max_new_tokens, quiet=True)]
    print(f"{'none':<28} {rate(plain):.3f}")
    hooked = generate_steered(lm, harmless, vectors, layer, args.coeff, max_new_tokens=args.max_new_tokens)
    print(f"{'hook (steer chat)':<28} {rate(hooked):.3f}")
    run("steer", "bake", str(model), "--vectors", str(direction), "--layer", str(layer), "--coeff", str(args.coeff),
        "--out", str(work / "baked"), "-q")
    baked = load_model(work / "baked", dtype="float32", device="cpu")
    replies = [baked.tokenizer.decode(ids, skip_special_tokens=True) for _, ids in
               generate(baked, harmless, settings, args.max_new_tokens, quiet=True)]
    print(f"{'baked bias (steer bake)':<28} {rate(replies):.3f}")
    run("steer", "bake", str(model), "--vectors", str(direction), "--layer", str(layer), "--coeff", str(args.coeff),
        "--out", str(work / "adapter"), "--adapter", "-q")
    from peft import PeftModel

    lm.model = PeftModel.from_pretrained(lm.model, work / "adapter").eval()
    with torch.inference_mode():
        replies = [lm.tokenizer.decode(ids, skip_special_tokens=True) for _, ids in
                   generate(lm, harmless, settings, args.max_new_tokens, quiet=True)]
    print(f"{'adapter (steer bake --adapter)':<28} {rate(replies):.3f}")


if __name__ == "__main__":
    main()
