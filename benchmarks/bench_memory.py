"""Peak RSS of `abliterate extract`, `evaluate` and `search` against the checkpoint's size on disk.

Builds a random Qwen2-shaped chat model (no downloads) of at least 1 GB, saves it in bf16 with a
word-level tokenizer and a chat template, then runs each command in a fresh process that reports its
own peak RSS (VmHWM, or ru_maxrss off Linux) when the command ends. The fixed baseline is such a
process that imports torch, transformers and the CLI and runs nothing. The target:
peak - baseline <= 1.3 x the checkpoint. Each command runs with small prompt counts: memory, not
time, is measured here (the weights dominate; activations of a few prompts are small).

    python benchmarks/bench_memory.py [--layers 10] [--hidden 1536] [--keep DIR] [--dtype auto] [--only evaluate]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# run in the child: the CLI in-process, then its own peak RSS on stderr (whatever the exit code)
CHILD = """
import resource, sys
def peak():
    try:
        for line in open('/proc/self/status'):
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == 'darwin' else rss * 1024
import torch, transformers
from abliterate.cli.main import cli
code = 0
if len(sys.argv) > 1:
    try:
        cli(sys.argv[1:], prog_name='abliterate')
    except SystemExit as e:
        code = e.code or 0
print(f'PEAK_RSS {peak()}', file=sys.stderr)
sys.exit(code)
"""


def make_checkpoint(folder: Path, layers: int, hidden: int) -> int:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from benchmarks.bench_extract import build

    tokenizer = build(64, 1).tokenizer
    config = Qwen2Config(vocab_size=151936, hidden_size=hidden, intermediate_size=hidden * 35 // 6,
                         num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=2,
                         tie_word_embeddings=True, dtype="bfloat16")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def peak_rss(args: list[str]) -> int:
    """Peak resident memory (bytes) of a fresh process running `abliterate ARGS` (no ARGS: the baseline)."""
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    line = next((x for x in proc.stderr.splitlines() if x.startswith("PEAK_RSS ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"abliterate {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return int(line.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--dtype", default="auto", help="the commands' --dtype (auto: the checkpoint's bf16 "
                        "where the CPU computes it natively)")
    parser.add_argument("--keep", type=Path, default=None, help="build the checkpoint here and keep it")
    parser.add_argument("--only", default=None, help="comma-separated commands to run (default: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp) / "model"
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) if (folder / "config.json").is_file() \
            else make_checkpoint(folder, args.layers, args.hidden)
        direction = Path(tmp) / "d.safetensors"
        common = ["--device", "cpu", "--dtype", args.dtype]
        base = peak_rss([])
        runs = {
            "extract": ["extract", str(folder), "--out", str(direction), "--n-train", "16", "--n-val", "8",
                        "--positions", "1", "--finalists", "2", *common, "-q"],
            "evaluate": ["evaluate", str(folder), "--limit", "4", "--max-new-tokens", "8", "--kl-tokens", "4",
                         *common],
            "evaluate --baseline": ["evaluate", str(folder), "--baseline", str(folder), "--limit", "4",
                                    "--max-new-tokens", "8", "--kl-tokens", "4", *common],
            "search": ["search", str(folder), "--direction", str(direction), "--out", str(Path(tmp) / "s.yaml"),
                       "--trials", "2", "--n-val", "4", "--max-new-tokens", "8", "--overrefusal", "none",
                       *common, "-q"],
        }
        print(f"checkpoint: {size / 2**30:.2f} GiB bf16 on disk; torch + transformers + CLI baseline "
              f"{base / 2**30:.2f} GiB; load average {os.getloadavg()[0]:.1f}")
        chosen = [c.strip() for c in args.only.split(",")] if args.only else list(runs)
        if any(c.startswith("search") for c in chosen) and not direction.is_file():
            chosen = ["extract", *[c for c in chosen if c != "extract"]]  # search needs extract's direction
        for name, cmd in ((c, runs[c]) for c in chosen):
            peak = peak_rss(cmd)
            print(f"{name:<20} peak RSS {peak / 2**30:.2f} GiB, (peak - baseline) / checkpoint = "
                  f"{(peak - base) / size:.2f} (target <= 1.3)", flush=True)


if __name__ == "__main__":
    main()
