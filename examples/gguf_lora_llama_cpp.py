"""Run `abliterate apply model.gguf --adapter`'s llama.cpp LoRA in llama.cpp itself: base + LoRA against the
edited GGUF, logits at every position.

Needs llama-cpp-python (it compiles llama.cpp; `pip install llama-cpp-python` in a virtual environment made
with --system-site-packages, so torch and abliterate stay the system's); the test suite does not. It builds
the tiny random Llama of examples/gguf_llama_cpp.py, writes it as F32 and Q8_0 GGUFs, writes the edited
GGUF (`apply`) and the adapter (`apply --adapter`) of one random direction, and prints, for each, max |logit
difference| over every position of a random sequence between llama.cpp with `--lora` (scale 1) on the
original and llama.cpp on the edited file, with how far the edit moves the logits, and where
`--lora-scaled 0.5` lands.

    python examples/gguf_lora_llama_cpp.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from gguf_llama_cpp import VOCAB, D, tiny_llama, write_gguf

from abliterate.io.direction_file import save_direction


def logits(model: Path, tokens: list[int], lora: Path | None = None, scale: float = 1.0) -> np.ndarray:
    from llama_cpp import Llama

    extra = {"lora_path": str(lora), "lora_scale": scale} if lora else {}
    llm = Llama(model_path=str(model), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=1, **extra)
    llm.eval(tokens)
    out = np.array(llm.scores[: len(tokens)], np.float32)
    llm.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    model = tiny_llama()
    tokens = [int(t) for t in torch.randint(0, VOCAB, (16,), generator=torch.Generator().manual_seed(1))]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        direction = root / "direction.safetensors"
        save_direction(direction, torch.randn(D, generator=torch.Generator().manual_seed(2)), {"model": "tiny"})
        print(f"tiny random Llama (d={D}), 16 tokens; max |logit difference| over every position:")
        for kind in ("F32", "Q8_0"):
            base, edited, lora = root / f"{kind}.gguf", root / f"{kind}-edited.gguf", root / f"{kind}-lora.gguf"
            write_gguf(model, base, quantised=kind == "Q8_0")
            for out, extra in ((edited, []), (lora, ["--adapter"])):
                subprocess.run([sys.executable, "-m", "abliterate", "apply", str(base), "--direction", str(direction),
                                "--out", str(out), "--quiet", *extra], check=True, stdout=subprocess.DEVNULL)
            plain, want = logits(base, tokens), logits(edited, tokens)
            got, half = logits(base, tokens, lora), logits(base, tokens, lora, 0.5)
            print(f"  {kind}: llama.cpp original + LoRA vs llama.cpp edited file: {np.abs(got - want).max():.2e}  "
                  f"(the edit moves logits by {np.abs(want - plain).max():.2e}; --lora-scaled 0.5 by "
                  f"{np.abs(half - plain).max():.2e})")


if __name__ == "__main__":
    main()
