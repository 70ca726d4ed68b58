"""Benchmark `abliterate apply --adapter` and `abliterate merge` against `cp -r` (and `apply`) of the same folder.

Uses bench_apply's synthetic bf16 Llama-shaped checkpoints (about 1 GB by default, several shards) and, in one
run on a warm page cache, prints:
  * adapter export wall time / `cp -r` wall time (the export only reads the target tensors: target <= 0.5);
  * merge wall time / `cp -r` wall time (it writes a whole checkpoint: compare it with `apply`, run alongside);
  * peak RSS of each process, against a process that only imports abliterate's modules.

    python benchmarks/bench_adapter.py [--workdir DIR] [--repeat 3] [--sizes 1GB 2GB] [--max-memory 256MB]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_apply import generate, run, settle, warm

LAYERS = {"1GB": 8, "2GB": 20}


def bench(folder: Path, direction: Path, repeat: int, max_memory: str) -> tuple[dict[str, tuple[float, int]], int]:
    """Median wall seconds and peak RSS of cp -r, the adapter export and the merge (alternating runs), and the
    adapter's size in bytes."""
    adapter, merged, copy = folder.parent / "adapter", folder.parent / "merged", folder.parent / "copied"
    edited = folder.parent / "edited"
    warm(folder)
    times: dict[str, list[float]] = {"cp": [], "adapter": [], "merge": [], "apply": []}
    peaks = dict.fromkeys(times, 0)
    commands = {
        "cp": ["cp", "-r", str(folder), str(copy)],
        "adapter": [sys.executable, "-m", "abliterate", "apply", str(folder), "--direction", str(direction), "--out",
                    str(adapter), "--adapter", "--quiet", "--max-memory", max_memory],
        "merge": [sys.executable, "-m", "abliterate", "merge", str(folder), str(adapter), "--out", str(merged),
                  "--quiet", "--max-memory", max_memory],
        "apply": [sys.executable, "-m", "abliterate", "apply", str(folder), "--direction", str(direction), "--out",
                  str(edited), "--quiet", "--max-memory", max_memory],
    }
    for _ in range(repeat):
        for label, cmd in commands.items():
            settle(copy, merged, edited, *([adapter] if label == "adapter" else []))
            t, peak = run(cmd)
            times[label].append(t)
            peaks[label] = max(peaks[label], peak)
    adapter_bytes = sum(p.stat().st_size for p in adapter.iterdir())
    settle(copy, merged, edited, adapter)
    return {label: (statistics.median(times[label]), peaks[label]) for label in times}, adapter_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="where to generate checkpoints")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", default=["1GB"], choices=sorted(LAYERS))
    parser.add_argument("--max-memory", default="256MB")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="abliterate-bench-adapter-", dir=args.workdir))
    try:
        _, own_base = run([sys.executable, "-c", "import abliterate.cli, abliterate.adapter, abliterate.merge"])
        print(f"baseline RSS: python + abliterate's adapter and merge modules imported {own_base / 2**20:.0f} MB")
        for label in args.sizes:
            folder = work / label / "model"
            size = generate(folder, LAYERS[label], work / "direction.safetensors")
            results, adapter_bytes = bench(folder, work / "direction.safetensors", args.repeat, args.max_memory)
            cp_t = results["cp"][0]
            print(f"{label}: {size / 1e9:.2f} GB in {len(list(folder.glob('*.safetensors')))} shards, "
                  f"cp -r {cp_t:.2f}s, adapter folder {adapter_bytes / 1e6:.2f} MB")
            for what in ("adapter", "merge", "apply"):
                t, peak = results[what]
                print(f"  {what:7s} {t:.2f}s  ratio {what}/cp = {t / cp_t:.2f}  peak RSS {peak / 2**20:.0f} MB "
                      f"(baseline {(peak - own_base) / 2**20:+.0f} MB)")
            shutil.rmtree(work / label)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
