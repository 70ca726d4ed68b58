"""Benchmark `abliterate apply` on a GGUF file against `cp` of the same file, and `verify` of the result.

Generates a synthetic Llama-shaped GGUF (0.88 GB by default) whose matrices are random Q8_0 blocks
(norms F32), written tensor by tensor, and prints, on a warm page cache: the median wall time of `cp`,
of the edit (every token_embd, attn_output and ffn_down tensor dequantised, projected and quantised
again; the rest copied) and of `verify`, each process's peak RSS, and the edit's per-tensor error line.

    python benchmarks/bench_gguf.py [--workdir DIR] [--layers 17] [--repeat 3] [--max-memory 256MB]

`--gguf FILE` times an existing GGUF instead (e.g. the real Qwen2.5-Coder-0.5B-Instruct file, a mix of
Q5_0, Q4_K, Q6_K and Q8_0 tensors, which benchmarks/real_model.py assembles from PyPI packages), with
a random direction of its hidden size; the load average is printed with the times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported by the generating child only
    import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_apply import run


def random_q8_0(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Valid Q8_0 bytes: random int8 codes with a float16 scale per block of 32 (values about 0.02)."""
    import numpy as np

    blocks = int(np.prod(shape)) // 32
    raw = np.empty((blocks, 34), np.uint8)
    raw[:, :2] = np.full((blocks, 1), 0.02 / 127, np.float16).view(np.uint8)
    raw[:, 2:] = rng.integers(-127, 128, (blocks, 32), dtype=np.int8).view(np.uint8)
    return raw.reshape(*shape[:-1], shape[-1] // 32 * 34)


def make_gguf(path: Path, layers: int, d: int = 2048, ff: int = 5632, vocab: int = 32000) -> None:
    """Run in a child process (`--generate`): the parent stays small, so its children's peak RSS is theirs."""
    import gguf
    import numpy as np

    from abliterate.io.direction_file import save_direction

    save_direction(path.with_name("direction.safetensors"), np.random.default_rng(1).standard_normal(d), {"model": "b"})
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab, d)}
    for i in range(layers):
        shapes |= {f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.attn_q.weight": (d, d),
                   f"blk.{i}.attn_k.weight": (d // 4, d), f"blk.{i}.attn_v.weight": (d // 4, d),
                   f"blk.{i}.attn_output.weight": (d, d), f"blk.{i}.ffn_norm.weight": (d,),
                   f"blk.{i}.ffn_gate.weight": (ff, d), f"blk.{i}.ffn_up.weight": (ff, d),
                   f"blk.{i}.ffn_down.weight": (d, ff)}
    shapes["output_norm.weight"] = (d,)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(layers)
    writer.add_embedding_length(d)
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, shape in shapes.items():
        if len(shape) == 1:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * shape[0])
        else:
            writer.add_tensor_info(name, shape, np.dtype(np.float16), int(np.prod(shape)) // 32 * 34, raw_dtype=q8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for shape in shapes.values():
        data = np.ones(shape, np.float32) if len(shape) == 1 else random_q8_0(shape, rng)
        writer.write_tensor_data(data)
    writer.close()


def random_direction(out: Path, gguf_path: Path) -> None:
    """A random unit direction of the GGUF's hidden size (child process, as make_gguf)."""
    import numpy as np

    from abliterate.gguf.format import read_gguf
    from abliterate.io.direction_file import save_direction

    src = read_gguf(gguf_path)
    d = src.int_field(f"{src.architecture}.embedding_length")
    save_direction(out, np.random.default_rng(1).standard_normal(d), {"model": "bench"})


def types(path: Path) -> str:
    """The edited tensors' types, counted (what the edit re-quantises)."""
    from collections import Counter

    from abliterate.gguf.archs import match_writer
    from abliterate.gguf.format import read_gguf

    count = Counter(t.type_name for t in read_gguf(path).tensors if match_writer(t.name))
    return "edited: " + ", ".join(f"{n} {name}" for name, n in count.most_common())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--layers", type=int, default=17, help="17 layers of a 2048-wide Llama: 0.88 GB in Q8_0")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-memory", default="256MB")
    parser.add_argument("--gguf", type=Path, default=None, help="time this GGUF instead of a generated one")
    parser.add_argument("--generate", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--random-direction", type=Path, nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        return make_gguf(args.generate, args.layers)
    if args.random_direction:
        return random_direction(*args.random_direction)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        src, direction = root / "model-Q8_0.gguf", root / "direction.safetensors"
        if args.gguf:
            src = args.gguf
            subprocess.run([sys.executable, __file__, "--random-direction", str(direction), str(src)], check=True)
        else:
            subprocess.run([sys.executable, __file__, "--generate", str(src), "--layers", str(args.layers)],
                           check=True)
        with open(src, "rb") as f:
            while f.read(64 << 20):
                pass
        out, copy = root / "edited.gguf", root / "copied.gguf"
        apply = [sys.executable, "-m", "abliterate", "apply", str(src), "--direction", str(direction),
                 "--out", str(out), "--quiet", "--overwrite", "--max-memory", args.max_memory]
        times: dict[str, list[float]] = {"cp": [], "apply": [], "verify": []}
        peaks = dict.fromkeys(times, 0)
        for _ in range(args.repeat):
            for name, cmd in (("cp", ["cp", str(src), str(copy)]), ("apply", apply),
                              ("verify", [sys.executable, "-m", "abliterate", "verify", str(src), str(out)])):
                os.sync()
                time.sleep(1)
                elapsed, rss = run(cmd)
                times[name].append(elapsed)
                peaks[name] = max(peaks[name], rss)
            copy.unlink()
        size = src.stat().st_size
        what = f"{src.name}, {types(src)}" if args.gguf else f"{args.layers} layers, Q8_0"
        print(f"GGUF {size / 1e9:.2f} GB ({what}), --max-memory {args.max_memory}, median of {args.repeat}, "
              f"load average {os.getloadavg()[0]:.1f}:")
        for name in times:
            t = statistics.median(times[name])
            print(f"  {name:7s} {t:7.2f} s  ({t / statistics.median(times['cp']):5.1f} x cp)  "
                  f"peak RSS {peaks[name] / 2**20:6.0f} MiB")
        summary = subprocess.run(apply, capture_output=True, text=True, check=True).stdout.splitlines()
        print("  apply printed: " + " | ".join(summary[:3]))


if __name__ == "__main__":
    main()
