"""Search speed and how much starting from the extraction's choice helps, on the toy refusing model.

Trains the toy model (abliterate.toy, ~15 s, or reuses --model), extracts its direction from the toy
train prompts (the last --n-val of each set validate), measures full ablation of the selected direction
(refusals, first-token KL), then runs the search for several seeds twice each:
  * selected: the extraction's choice, fully removed, enqueued as trial 0 (what `abliterate search` does);
  * random: no enqueued trial (`--from-random`).
With --compare dimensions, the two runs per seed both start from the selected point and differ in the
search space instead: "plain" without the norm-preserving dimension (`--no-norm-preserve`), "preserving"
with it. For each run it reports the first trial that reaches the target point: refusal count <= --target-refusals
(default: full ablation's) and KL <= --target-kl (default: --kl-fraction x full ablation's KL), counted
only for trials that got a refusal count (those on the front when they ran). Prints trials per minute.

    python benchmarks/bench_search.py [--model DIR] [--seeds 5] [--budget 60] [--kl-fraction 0.25]
                                      [--compare start|dimensions]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from abliterate.demo import toy
from abliterate.measure.extract import PromptSets, extract, save_extraction
from abliterate.measure.loading import load_model
from abliterate.search.space import direction_for, load_candidates, selected_point
from abliterate.search.study import Scorer, SearchSettings, search


def first_reaching(trials, refusals: int, kl: float) -> int | None:
    """1-based count of trials run until one reached the target, or None within the budget."""
    for i, t in enumerate(trials, 1):
        if t.refusals is not None and t.refusals <= refusals and t.kl <= kl:
            return i
    return None


def toy_extraction(model: Path | None, root: Path, n_val: int, **extract_options):
    """The toy (trained into `root` unless `model` is given) loaded in float32, and its extraction from the toy's
    train prompts, the last `n_val` of each set validating; saved as root/dir.safetensors.
    Returns (model, extraction, its seconds, harmful validation prompts, harmless validation prompts)."""
    if model is None:
        t = time.perf_counter()
        model = toy.train_toy_model(root / "toy")
        print(f"trained the toy model in {time.perf_counter() - t:.1f} s")
    lm = load_model(model, dtype="float32", device="cpu")
    p = toy.toy_prompts()
    harmful, harmless = p.harmful_train[-n_val:], p.harmless_train[-n_val:]
    t = time.perf_counter()
    extraction = extract(lm, PromptSets(p.harmful_train[:-n_val], p.harmless_train[:-n_val], harmful, harmless),
                         quiet=True, **extract_options)
    seconds = time.perf_counter() - t
    save_extraction(extraction, root / "dir.safetensors")
    return lm, extraction, seconds, harmful, harmless


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="a trained toy model folder (default: train one)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--budget", type=int, default=60, help="trials per run")
    ap.add_argument("--n-val", type=int, default=48)
    ap.add_argument("--target-refusals", type=int, default=None)
    ap.add_argument("--target-kl", type=float, default=None)
    ap.add_argument("--kl-fraction", type=float, default=0.25)
    ap.add_argument("--compare", choices=("start", "dimensions"), default="start",
                    help="start: selected vs random first trial; dimensions: without vs with norm-preserving edits")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        root = Path(tmp)
        n = args.n_val
        lm, _, _, harmful, harmless = toy_extraction(args.model, root, n)
        cands = load_candidates(root / "dir.safetensors", lm)
        start = selected_point(cands)
        scorer = Scorer(lm, harmful, harmless, SearchSettings())
        r, options = direction_for(cands, start), start.options(lm.num_layers)
        full_score, full_kl = scorer.first_token(r, options)
        full_refusals = scorer.refusals(r, options)
        target_refusals = full_refusals if args.target_refusals is None else args.target_refusals
        target_kl = args.target_kl if args.target_kl is not None else args.kl_fraction * full_kl
        print(f"selected candidate: layer {cands.selected[0]}, position {cands.selected[1]}; full ablation: "
              f"{full_refusals}/{n} refused, KL {full_kl:.4f}, refusal score {full_score:+.2f}")
        print(f"target: <= {target_refusals}/{n} refused at KL <= {target_kl:.4f}; budget {args.budget} trials/run")

        kinds = ("selected", "random") if args.compare == "start" else ("plain", "preserving")
        reached: dict[str, list[int | None]] = {kind: [] for kind in kinds}
        trials = 0
        seconds = 0.0
        print(f"{'seed':>4} {kinds[0]:>10} {kinds[1]:>10}   (trials until the target; - = not within budget)")
        for seed in range(args.seeds):
            row = []
            for kind in kinds:
                settings = SearchSettings(trials=args.budget, seed=seed, start_from_selected=kind != "random",
                                          norm_preserve=kind in ("preserving", "selected", "random"))
                result = search(lm, cands, harmful, harmless, settings, root / f"{kind}-{seed}.db", quiet=True)
                trials += result.ran
                seconds += result.seconds
                hit = first_reaching(result.trials, target_refusals, target_kl)
                reached[kind].append(hit)
                row.append("-" if hit is None else str(hit))
            print(f"{seed:>4} {row[0]:>10} {row[1]:>10}")
        print(f"speed: {trials} trials in {seconds:.1f} s = {60 * trials / seconds:.0f} trials/min "
              f"({seconds / trials:.3f} s/trial) on {lm.name}")
        for kind, hits in reached.items():
            found = [h for h in hits if h is not None]
            median = statistics.median([h if h is not None else args.budget + 1 for h in hits])
            print(f"{kind}: reached in {len(found)}/{len(hits)} runs; median trials {median:g} "
                  f"(runs that missed count as {args.budget + 1}); mean over hits "
                  f"{statistics.mean(found) if found else float('nan'):.1f}")


if __name__ == "__main__":
    main()
