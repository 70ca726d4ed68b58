"""Benchmark `abliterate apply` against `cp -r` of the same folder, and its peak memory.

Generates synthetic bf16 Llama-shaped checkpoints (about 2 GB and 1 GB, several shards), then, in
one run and on a warm page cache:
  * edit wall time / `cp -r` wall time (median of --repeat runs each, alternating, each started on a
    settled filesystem);
  * peak RSS of the edit process minus that of a process that only imports torch and abliterate,
    for both sizes (the two should be within 64 MB of each other: memory does not grow with size).

    python benchmarks/bench_apply.py [--workdir DIR] [--repeat 3] [--max-memory 256MB]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_checkpoint(folder: Path, layers: int, d: int = 2048, ff: int = 5632, vocab: int = 32000,
                    shard_bytes: int = 700 << 20) -> int:
    """A Llama-shaped bf16 checkpoint in shards of about `shard_bytes`; returns its size.

    Runs in a child process (see main) so that the benchmark's own process stays small: a child's
    peak RSS counts the memory of the parent it was forked from.
    """
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    kv = d // 4
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(layers):
        p = f"model.layers.{i}."
        names += [(p + "self_attn.q_proj.weight", (d, d)), (p + "self_attn.k_proj.weight", (kv, d)),
                  (p + "self_attn.v_proj.weight", (kv, d)), (p + "self_attn.o_proj.weight", (d, d)),
                  (p + "mlp.gate_proj.weight", (ff, d)), (p + "mlp.up_proj.weight", (ff, d)),
                  (p + "mlp.down_proj.weight", (d, ff)), (p + "input_layernorm.weight", (d,)),
                  (p + "post_attention_layernorm.weight", (d,))]
    names += [("model.norm.weight", (d,)), ("lm_head.weight", (vocab, d))]
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in names:
        t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        if sum(x.numel() * 2 for x in shards[-1].values()) + t.numel() * 2 > shard_bytes and shards[-1]:
            shards.append({})
        shards[-1][name] = t
        size += t.numel() * 2
    weight_map = {}
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, folder / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=2))
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": d,
              "intermediate_size": ff, "num_hidden_layers": layers, "vocab_size": vocab,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return size


def generate(folder: Path, layers: int, direction: Path) -> int:
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from bench_apply import make_checkpoint; "
            "from abliterate.direction_file import save_direction; "
            "print(make_checkpoint(__import__('pathlib').Path(sys.argv[2]), int(sys.argv[3]))); "
            "save_direction(sys.argv[4], torch.randn(2048), {'model': 'synthetic'})")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(folder), str(layers),
                          str(direction)], check=True, capture_output=True, text=True)
    return int(out.stdout.strip())


def run(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS in bytes of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return elapsed, usage.ru_maxrss * 1024


def settle(*folders: Path) -> None:
    """Delete earlier outputs and let the filesystem finish freeing them (ext4 with `discard` frees
    blocks lazily, and a writer that races that runs up to 10x slower), so every timed run starts alike."""
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    os.sync()
    time.sleep(2)


def warm(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def bench(folder: Path, direction: Path, repeat: int, max_memory: str) -> tuple[float, float, int]:
    out, copy = folder.parent / "edited", folder.parent / "copied"
    warm(folder)
    cp_times, edit_times, rss = [], [], 0
    for _ in range(repeat):
        settle(copy, out)
        cp_times.append(run(["cp", "-r", str(folder), str(copy)])[0])
        settle(copy, out)
        t, peak = run([sys.executable, "-m", "abliterate", "apply", str(folder), "--direction", str(direction),
                       "--out", str(out), "--quiet", "--max-memory", max_memory])
        edit_times.append(t)
        rss = max(rss, peak)
    settle(copy, out)
    return statistics.median(cp_times), statistics.median(edit_times), rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="where to generate checkpoints (needs ~6 GB)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--max-memory", default="256MB")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="abliterate-bench-", dir=args.workdir))
    try:
        _, base_rss = run([sys.executable, "-c", "import torch, abliterate.cli, abliterate.edit, abliterate.plan"])
        _, own_base = run([sys.executable, "-c", "import abliterate.cli, abliterate.edit, abliterate.plan"])
        results = {}
        for label, layers in (("2GB", 20), ("1GB", 8)):
            folder = work / label / "model"
            size = generate(folder, layers, work / "direction.safetensors")
            cp_t, edit_t, rss = bench(folder, work / "direction.safetensors", args.repeat, args.max_memory)
            results[label] = (size, cp_t, edit_t, rss - base_rss)
            shutil.rmtree(work / label)
        print(f"baseline RSS: python + torch + abliterate imported {base_rss / 2**20:.0f} MB; "
              f"python + abliterate's edit path (no torch) {own_base / 2**20:.0f} MB")
        for label, (size, cp_t, edit_t, extra) in results.items():
            print(f"{label}: {size / 1e9:.2f} GB  cp -r {cp_t:.2f}s  apply {edit_t:.2f}s  "
                  f"ratio apply/cp = {edit_t / cp_t:.2f}  peak RSS {(extra + base_rss) / 2**20:.0f} MB = "
                  f"torch baseline {extra / 2**20:+.0f} MB = edit-path baseline "
                  f"{(extra + base_rss - own_base) / 2**20:+.0f} MB")
        diff = abs(results["2GB"][3] - results["1GB"][3]) / 2**20
        print(f"RSS growth from 1 GB to 2 GB checkpoint: {diff:.0f} MB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
