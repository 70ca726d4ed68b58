"""Peak RSS of `abliterate extract` against the checkpoint's size on disk.

Builds a random Qwen2-shaped chat model (no downloads) of at least 1 GB, saves it in bf16 with a
word-level tokenizer and a chat template, then runs the command in a fresh process and reads its
peak RSS (ru_maxrss of the child). The fixed baseline is a process that imports torch and
transformers and loads nothing. The target: peak - baseline <= 1.3 x the checkpoint.

    python benchmarks/bench_memory.py [--layers 10] [--hidden 1536] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_extract import build


def make_checkpoint(folder: Path, layers: int, hidden: int) -> int:
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
    """Peak resident memory (bytes) of one child process running `args`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if after <= before:  # ru_maxrss of children is the largest so far: run the largest first
        raise SystemExit("run the commands in order of increasing memory")
    return after * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--keep", type=Path, default=None, help="build the checkpoint here and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp) / "model"
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) if (folder / "config.json").is_file() \
            else make_checkpoint(folder, args.layers, args.hidden)
        py = [sys.executable, "-m", "abliterate"]
        base = peak_rss([sys.executable, "-c", "import torch, transformers, abliterate.cli.main"])
        small = ["--dtype", "auto", "--device", "cpu", "-q"]
        extract = peak_rss([*py, "extract", str(folder), "--out", str(Path(tmp) / "d.safetensors"), "--n-train", "16",
                            "--n-val", "8", "--positions", "1", "--finalists", "2", *small])
        print(f"checkpoint: {size / 2**30:.2f} GiB bf16 on disk; torch + transformers baseline {base / 2**30:.2f} GiB")
        print(f"extract:  peak RSS {extract / 2**30:.2f} GiB, (peak - baseline) / checkpoint = "
              f"{(extract - base) / size:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()
