"""The norm-preserving adapter against the norm-preserving weights, as docs/adapters.md states it.

    python3 benchmarks/preserve_adapter.py

For tiny random models of the families the tests use (tests/test_preserve_adapter.py: every head its own values,
the edit on attn and mlp, or mlp for GPT-NeoX with ReLU), saved in float32 and in bfloat16, writes
`apply --norm-preserve` as weights and as the DoRA adapter and prints, per family and dtype, the largest logit
difference between the adapter loaded with peft (`PeftModel.from_pretrained` on the base in that dtype) and the
written weights loaded in that dtype, next to how much the edit moves logits. In bfloat16 both sides are also
compared with the float32 computation of the same bfloat16 weights' edit (the weights written in float32 from the
bfloat16 original), so the adapter's difference can be read against the rounding the weights themselves carry.
Last, the largest deviation from 1 of the DoRA scale peft computes for the writers' rows (peft turns DoRA on for
every target; their magnitude is the norm of their edited rows). Takes about a minute on a CPU.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from click.testing import CliRunner
from peft import PeftModel
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests: the tiny random models and the families the tests use

from abliterate.cli.main import cli  # noqa: E402
from abliterate.io.direction_file import save_direction  # noqa: E402
from tests.families import IDS, build_model, save_sharded, written_direction  # noqa: E402
from tests.test_preserve_adapter import QUALIFYING  # noqa: E402


def run(*args: str) -> None:
    result = CliRunner().invoke(cli, list(args))
    if result.exit_code != 0:
        raise SystemExit(result.output)


SCALE_DRIFT: list[float] = []  # |m / |row| - 1| of the writers' DoRA rows, as peft computes the norm (float32)


def logits(folder: Path, dtype: torch.dtype, adapter: Path | None = None) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
        if dtype == torch.float32:
            SCALE_DRIFT.append(writer_scale_drift(model))
    with torch.no_grad():
        return model.eval()(IDS).logits.float()


def writer_scale_drift(model: PeftModel) -> float:
    """The largest |m_i / |row i of W + B A| - 1| over the adapted writers (nonzero LoRA factors), with the norm
    computed by peft's DoRA layer as its forward does: the scale those rows should keep at exactly 1."""
    worst = 0.0
    for module in model.modules():
        if not hasattr(module, "lora_magnitude_vector") or "default" not in module.lora_magnitude_vector:
            continue
        a, b = module.lora_A["default"], module.lora_B["default"]
        if not b.weight.abs().max() > 0:
            continue  # a module carrying D: its scale is D by design
        dora = module.lora_magnitude_vector["default"]
        with torch.no_grad():
            norm = dora.get_weight_norm(module.get_base_layer().weight, dora.get_lora_weight(a, b),
                                        module.scaling["default"])
            worst = max(worst, (dora.weight / norm - 1).abs().max().item())
    return worst


def measure(name: str, dtype: torch.dtype, root: Path) -> str:
    family, components = QUALIFYING[name]
    model = build_model(family)
    r = written_direction(model)
    original = save_sharded(model.to(dtype), root / "original")
    save_direction(root / "dir.safetensors", r, {"model": "tiny"})
    args = ["--direction", str(root / "dir.safetensors"), "--norm-preserve", "--components", components, "-q"]
    run("apply", str(original), *args, "--out", str(root / "weights"))
    run("apply", str(original), *args, "--adapter", "--out", str(root / "adapter"))
    weights, adapter = logits(root / "weights", dtype), logits(original, dtype, root / "adapter")
    unedited = logits(original, dtype)
    row = (f"| {name} | {str(dtype).removeprefix('torch.')} | {(adapter - weights).abs().max().item():.1e} | "
           f"{(weights - unedited).abs().max().item():.2f} |")
    if dtype == torch.float32:
        return row + " | |"
    wide = root / "original-f32"  # the same bfloat16 values, in float32: the edit computed without rounding to bf16
    AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).save_pretrained(wide)
    run("apply", str(wide), *args, "--out", str(root / "weights-f32"))
    reference = logits(root / "weights-f32", torch.float32)
    return row + f" {(adapter - reference).abs().max().item():.1e} | {(weights - reference).abs().max().item():.1e} |"


def main() -> None:
    print("| family | dtype | adapter vs weights | edit moves logits by | adapter vs float32 | weights vs float32 |")
    print("|---|---|---|---|---|---|")
    for name in sorted(QUALIFYING):
        for dtype in (torch.float32, torch.bfloat16):
            with tempfile.TemporaryDirectory() as tmp:
                print(measure(name, dtype, Path(tmp)), flush=True)
    print(f"\nlargest |scale - 1| of a writer's DoRA row (float32): {max(SCALE_DRIFT):.1e}")


if __name__ == "__main__":
    main()
