"""Where the real model's refusals-vs-KL trade-off comes from: one edit parameter changed at a time.

On the real model of benchmarks/real_model.py (run its `prepare` first), extraction runs once (the whole job's
recipe and prompts; the result is cached beside the model's runs), then each named variant of the edit is scored
with ablation hooks (the scales `apply` writes, no weights rewritten): first-token KL on the 32 harmless
validation prompts, refused greedy replies (--tokens tokens) on the 32 harmful validation prompts, and the mean
first-token refusal log-odds. Variants start from the extraction's own choice removed fully from every writer
(the paper's point) and change one thing: no embedding edit, the direction projected off the harmless mean,
norm-preserving writes, attention or MLP only, other candidate layers, and a heretic-like point (projected,
norm-preserving, no embedding edit, strengths peaking in the later layers).

    python benchmarks/real_ablations.py [--cache DIR] [--tokens 32] [--variants NAME ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from real_model import cache_root, prepare

from abliterate.edit.strengths import LAYERED, Profile, uniform


def variants(selected, num_layers: int, min_layer: int, max_layer: int) -> dict:
    """Named points, each one change from the paper's (the extraction's choice, removed fully everywhere)."""
    full = {c: uniform(1.0) for c in LAYERED}
    late = Profile(peak=1.0, center=0.8 * (num_layers - 1), width=0.5 * num_layers, floor=0.3)
    out = {
        "paper": selected,
        "no-embed": replace(selected, embed=0.0),
        "projected": replace(selected, projected=True),
        "norm-preserving": replace(selected, preserve=True),
        "attn-only": replace(selected, profiles={**full, "mlp": uniform(0.0)}),
        "mlp-only": replace(selected, profiles={**full, "attn": uniform(0.0)}),
        "no-embed+projected+preserving": replace(selected, embed=0.0, projected=True, preserve=True),
        "heretic-like": replace(selected, embed=0.0, projected=True, preserve=True,
                                profiles={c: late for c in LAYERED}),
        "embed 1.5": replace(selected, embed=1.5),
    }
    for layer in range(max(min_layer, int(0.4 * num_layers)), max_layer + 1, 2):
        out[f"layer {layer}"] = replace(selected, layer=float(layer))
        out[f"layer {layer} no-embed"] = replace(selected, layer=float(layer), embed=0.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens per reply for the refusal count")
    ap.add_argument("--variants", nargs="*", default=None, help="names to score (default: all)")
    args = ap.parse_args()
    root = cache_root(args.cache)
    model = prepare(root)

    from abliterate.jobs.extraction import extract_with, job_prompts
    from abliterate.jobs.run_options import RunOptions
    from abliterate.measure.loading import load_model
    from abliterate.options.recipe import load_recipe
    from abliterate.search.space import direction_for, load_candidates, selected_point
    from abliterate.search.study import Scorer, SearchSettings

    recipe = load_recipe("qwen2", None)
    options = RunOptions(model=str(model), out=root / "runs" / "ablations-out", quiet=True)
    prompts = job_prompts(options, recipe)
    lm = load_model(model, dtype=recipe.extract.dtype, device="cpu")
    direction = root / "runs" / "extraction.safetensors"
    if not direction.is_file():
        t = time.perf_counter()
        extract_with(lm, options, recipe, prompts, direction, print)
        print(f"extraction {time.perf_counter() - t:.0f} s (load average {os.getloadavg()[0]:.1f})", flush=True)
    cands = load_candidates(direction, lm)
    scorer = Scorer(lm, prompts[2], prompts[3], SearchSettings(max_new_tokens=args.tokens))
    named = variants(selected_point(cands), lm.num_layers, cands.min_layer, cands.max_layer)
    print(f"extraction's choice: layer {cands.selected[0]}, position {cands.selected[1]}; searchable layers "
          f"{cands.min_layer}..{cands.max_layer}; {len(scorer.harmful)} harmful / {len(scorer.harmless_prompts)} "
          f"harmless validation prompts, {args.tokens} tokens per reply")
    print(f"{'variant':<32} {'refused':>8} {'KL':>8} {'score':>7}  load")
    for name, point in named.items():
        if args.variants and name not in args.variants:
            continue
        r, options_ = direction_for(cands, point), point.options(lm.num_layers)
        score, kl = scorer.first_token(r, options_)
        refused = scorer.refusals(r, options_)
        print(f"{name:<32} {f'{refused}/{len(scorer.harmful)}':>8} {kl:>8.4f} {score:>+7.2f}  "
              f"{os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
