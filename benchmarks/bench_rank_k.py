"""Several directions (rank k) on the toy refusing model: full removal of the first k directions, and the search
with and without the dimension k.

Trains the toy model (abliterate.demo.toy, ~15 s, or reuses --model), extracts with `--directions K` from the
toy train prompts (the last --n-val of each set validate), then

1. removes the first k = 1..K directions fully from every writer and prints refusals (greedy replies matched by
   the markers) and first-token KL on the harmless validation prompts: what k > 1 buys and costs by itself;
2. runs the search for several seeds twice each with the same budget: "rank 1" (the file's first direction
   only: the search as before) and "rank k" (the dimension k = 1..K added). For each run it prints the lowest
   KL among trials with a refusal count no higher than the target (default: full removal of one direction's
   count), and the first trial reaching the target point (refusals <= target, KL <= --kl-fraction x full
   removal's KL). Norm-preserving edits are left out of both (they take one direction), so the runs differ in k only.

With --proposals categories the K - 1 directions beside the chosen one are categories' differences
(`extract --proposals categories`), each toy harmful request's action being its category.

    python benchmarks/bench_rank_k.py [--model DIR] [--directions 3] [--seeds 3] [--budget 40] [--kl-fraction 0.5]
                                      [--proposals principal|categories]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from bench_search import toy_extraction

from abliterate.demo import toy
from abliterate.edit.plan import EditOptions
from abliterate.io.direction_file import load_direction
from abliterate.search.space import load_candidates
from abliterate.search.study import Scorer, SearchSettings, search


def best_kl(trials, refusals: int) -> float:
    kls = [t.kl for t in trials if t.refusals is not None and t.refusals <= refusals]
    return min(kls) if kls else float("nan")


def first_reaching(trials, refusals: int, kl: float) -> int | None:
    for i, t in enumerate(trials, 1):
        if t.refusals is not None and t.refusals <= refusals and t.kl <= kl:
            return i
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="a trained toy model folder (default: train one)")
    ap.add_argument("--directions", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget", type=int, default=40, help="trials per run")
    ap.add_argument("--n-val", type=int, default=48)
    ap.add_argument("--target-refusals", type=int, default=None)
    ap.add_argument("--kl-fraction", type=float, default=0.5)
    ap.add_argument("--proposals", choices=("principal", "categories"), default="principal")
    args = ap.parse_args()
    extra = {}
    if args.proposals == "categories":  # the toy's harmful requests labelled by their action
        train = toy.toy_prompts().harmful_train[: -args.n_val]
        extra["categories"] = [next(a for a in toy.HARMFUL_ACTIONS if a in h) for h in train]

    with tempfile.TemporaryDirectory(prefix="bench-rank-k-") as tmp:
        root = Path(tmp)
        n = args.n_val
        lm, extraction, seconds, harmful, harmless = toy_extraction(args.model, root, n, directions=args.directions,
                                                                    **extra)
        beside = f"; categories {', '.join(extraction.more_categories)}" if extraction.more_categories else ""
        print(f"extracted {args.directions} directions ({args.proposals}) in {seconds:.1f} s (layer "
              f"{extraction.best.layer}, position {extraction.best.position}{beside})")
        direction = load_direction(root / "dir.safetensors")
        scorer = Scorer(lm, harmful, harmless, SearchSettings())
        full = {}
        print(f"{'k':>3} {'refused':>9} {'KL':>8}   (first k directions removed fully from every writer)")
        for k in range(1, args.directions + 1):
            r, options = direction.leading(k), EditOptions()
            _, kl = scorer.first_token(r, options)
            full[k] = (scorer.refusals(r, options), kl)
            print(f"{k:>3} {f'{full[k][0]}/{n}':>9} {kl:>8.4f}")
        target = full[1][0] if args.target_refusals is None else args.target_refusals
        target_kl = args.kl_fraction * full[1][1]
        print(f"search target: <= {target}/{n} refused at KL <= {target_kl:.4f}; {args.budget} trials per run")

        cands = load_candidates(root / "dir.safetensors", lm)
        kinds = {"rank 1": replace(cands, more=None), "rank k": cands}
        rows: dict[str, list[tuple[float, int | None]]] = {kind: [] for kind in kinds}
        print(f"{'seed':>4} {'rank 1: best KL, trials':>24} {'rank k: best KL, trials':>24}   (best KL at <= {target} "
              "refused; trials until the target, - = not within budget)")
        for seed in range(args.seeds):
            line = []
            for kind, c in kinds.items():
                settings = SearchSettings(trials=args.budget, seed=seed, norm_preserve=False)
                result = search(lm, c, harmful, harmless, settings, root / f"{kind[-1]}-{seed}.db", quiet=True)
                hit = first_reaching(result.trials, target, target_kl)
                rows[kind].append((best_kl(result.trials, target), hit))
                ks = sorted({t.point.directions for t in result.front})
                line.append(f"{rows[kind][-1][0]:.4f}, {'-' if hit is None else hit} (front k {ks})")
            print(f"{seed:>4} {line[0]:>24} {line[1]:>24}")
        for kind, got in rows.items():
            kls = [kl for kl, _ in got]
            hits = [h for _, h in got if h is not None]
            print(f"{kind}: median best KL {statistics.median(kls):.4f}; target reached in {len(hits)}/{len(got)} "
                  f"runs, median trials {statistics.median([h or args.budget + 1 for _, h in got]):g} "
                  f"(a miss counts as {args.budget + 1})")


if __name__ == "__main__":
    main()
