"""Benchmark `abliterate apply` and `verify` on FP8 block-scaled and MXFP4 checkpoints against `cp`.

Generates two synthetic checkpoints tensor by tensor, never holding one in memory: a Llama-shaped FP8 one
(every linear weight float8 e4m3 with a float32 scale per 128 x 128 block, as DeepSeek V3 and Qwen3's FP8
releases; embeddings bf16) and a gpt-oss-shaped MXFP4 one (experts as `*_blocks` / `*_scales`, the rest bf16).
Prints, on a warm page cache: the median wall time of `cp` of the folder, of the edit (every writer
dequantised per chunk of whole blocks, projected, quantised again with new scales; the rest copied) and of
`verify`, each process's peak RSS, and the edit's worst requantisation error lines.

    python benchmarks/bench_fp8.py [--workdir DIR] [--layers 8] [--repeat 3] [--max-memory 256MB]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_apply import run, settle, warm


def _write_shard(path: Path, shapes: dict[str, tuple[str, tuple[int, ...]]], fill) -> None:
    """A safetensors file written tensor by tensor: header first, then each tensor's bytes from `fill`."""
    from abliterate.io.safetensors_format import DTYPE_SIZES, encode_header

    entries = [(n, dt, sh, math.prod(sh) * DTYPE_SIZES[dt]) for n, (dt, sh) in shapes.items()]
    header = encode_header(entries, {"format": "pt"})
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        for name, dtype, shape, _ in entries:
            f.write(fill(name, dtype, shape))


def make(folder: Path, kind: str, layers: int, d: int = 2048, ff: int = 5632, experts: int = 8) -> None:
    """Run in a child process (`--generate`), so the parent's children's peak RSS is their own."""
    import numpy as np

    from abliterate.io.direction_file import save_direction

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    save_direction(folder.parent / "direction.safetensors", rng.standard_normal(d), {"model": "bench"})

    def fill(name: str, dtype: str, shape: tuple[int, ...]) -> bytes:
        n = math.prod(shape)
        if dtype == "F8_E4M3":  # codes of magnitude up to 448 (exponent < 15), random signs
            return (rng.integers(0, 0x7F, n, dtype=np.uint8) | rng.integers(0, 2, n, dtype=np.uint8) << 7).tobytes()
        if dtype == "F32":  # block scales
            return np.full(n, 0.02 / 448, np.float32).tobytes()
        if name.endswith("_scales"):  # e8m0 exponents about 2^-6
            return rng.integers(118, 124, n, dtype=np.uint8).tobytes()
        if dtype == "U8":
            return rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        values = (rng.standard_normal(n, dtype=np.float32) * 0.02).view(np.uint32)
        return (values >> 16).astype(np.uint16).tobytes()  # bf16

    shards, weight_map = [], {}
    embed = {"model.embed_tokens.weight": ("BF16", (32000, d)), "model.norm.weight": ("BF16", (d,)),
             "lm_head.weight": ("BF16", (32000, d))}
    for i in range(layers):
        p = f"model.layers.{i}"
        if kind == "fp8":
            mats = {f"{p}.self_attn.q_proj.weight": (d, d), f"{p}.self_attn.k_proj.weight": (d // 4, d),
                    f"{p}.self_attn.v_proj.weight": (d // 4, d), f"{p}.self_attn.o_proj.weight": (d, d),
                    f"{p}.mlp.gate_proj.weight": (ff, d), f"{p}.mlp.up_proj.weight": (ff, d),
                    f"{p}.mlp.down_proj.weight": (d, ff)}
            shard = {}
            for name, shape in mats.items():
                shard[name] = ("F8_E4M3", shape)
                shard[name + "_scale_inv"] = ("F32", (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)))
        else:
            shard = {f"{p}.self_attn.{x}.weight": ("BF16", (d if x in ("q_proj", "o_proj") else d // 4, d))
                     for x in ("q_proj", "k_proj", "v_proj", "o_proj")}
            shard |= {f"{p}.self_attn.o_proj.bias": ("BF16", (d,)),
                      f"{p}.mlp.experts.gate_up_proj_blocks": ("U8", (experts, 2 * d, d // 32, 16)),
                      f"{p}.mlp.experts.gate_up_proj_scales": ("U8", (experts, 2 * d, d // 32)),
                      f"{p}.mlp.experts.down_proj_blocks": ("U8", (experts, d, d // 32, 16)),
                      f"{p}.mlp.experts.down_proj_scales": ("U8", (experts, d, d // 32)),
                      f"{p}.mlp.experts.down_proj_bias": ("BF16", (experts, d)),
                      f"{p}.mlp.router.weight": ("BF16", (experts, d))}
        shard |= {f"{p}.input_layernorm.weight": ("BF16", (d,)), f"{p}.post_attention_layernorm.weight": ("BF16", (d,))}
        shards.append(shard)
    shards[0] = embed | shards[0]
    for j, shard in enumerate(shards):
        file = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(folder / file, shard, fill)
        weight_map |= {n: file for n in shard}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"model_type": "llama" if kind == "fp8" else "gpt_oss", "hidden_size": d, "num_hidden_layers": layers,
              "vocab_size": 32000, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]} if kind == "fp8" else
              {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "lm_head"]}}
    (folder / "config.json").write_text(json.dumps(config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-memory", default="256MB")
    parser.add_argument("--generate", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        return make(Path(args.generate[1]), args.generate[0], args.layers)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="abliterate-fp8-bench-"))
    cli = [sys.executable, "-m", "abliterate"]
    for kind in ("fp8", "mxfp4"):
        src = work / kind / "model"
        if not src.is_dir():
            subprocess.run([sys.executable, __file__, "--layers", str(args.layers), "--generate", kind, str(src)],
                           check=True)
        size = sum(p.stat().st_size for p in src.iterdir())
        out, copy = work / kind / "edited", work / kind / "copy"
        times: dict[str, list[float]] = {"cp": [], "apply": [], "verify": []}
        peaks: dict[str, int] = {}
        warm(src)
        for _ in range(args.repeat):
            settle(copy)
            times["cp"].append(run(["cp", "-r", str(src), str(copy)])[0])
            settle(out)
            t, peaks["apply"] = run([*cli, "apply", str(src), "--direction", str(src.parent / "direction.safetensors"),
                                     "--out", str(out), "--max-memory", args.max_memory, "--quiet"])
            times["apply"].append(t)
            t, peaks["verify"] = run([*cli, "verify", str(src), str(out)])
            times["verify"].append(t)
        print(f"{kind}: {size / 1e9:.2f} GB, {args.layers} layers, --max-memory {args.max_memory}")
        for name, values in times.items():
            peak = f", peak RSS {peaks[name] / 2**20:.0f} MiB" if name in peaks else ""
            print(f"  {name:<7} median {statistics.median(values):6.2f} s{peak}")
        errors = subprocess.run([*cli, "apply", str(src), "--direction", str(src.parent / "direction.safetensors"),
                                 "--out", str(out), "--overwrite", "--quiet"], capture_output=True, text=True).stdout
        print("  " + "\n  ".join(errors.splitlines()[:3]))
        shutil.rmtree(copy, ignore_errors=True)


if __name__ == "__main__":
    main()
