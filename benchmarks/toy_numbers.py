"""The toy and tiny-model numbers docs/steer.md states, each computed the way it describes it.

    python3 benchmarks/toy_numbers.py [sweep] [add] [bake]   (default: all three)

Trains the toy chat model (abliterate.demo.toy) twice, plain and with its A/B behaviour, and prints:
- the CAA steering sweep at layer 2 (vectors from the training items, mean p(matching letter) on held-out items);
- `apply --add` at scales 1, 1.5 and 2 (direction extracted on the training requests, as tests/test_bake.py
  does): the share of held-out harmless and harmful requests refused;
- the largest logit difference between `apply --add --scale 2 --adapter` (peft) and the edited weights;
- the largest logit difference between `steer bake` and the steering hook, on the toy and on the tiny random
  Llama, GPT-2 and GPT-NeoX models of the tests (same vectors, layers and coefficients as tests/test_bake.py),
  and between `steer bake --adapter` and the hook on tiny Qwen2, Mistral, Phi-3 and Granite.
Takes a few minutes on a CPU.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.families: the tiny random models the tests build

from abliterate.arch.table import arch_for_config  # noqa: E402
from abliterate.cli.main import cli  # noqa: E402
from abliterate.demo.toy import REFUSALS, choice_pairs, toy_prompts, train_toy_model  # noqa: E402
from abliterate.io.direction_file import save_direction  # noqa: E402
from abliterate.measure.extract import PromptSets, extract, save_extraction  # noqa: E402
from abliterate.measure.loading import load_model  # noqa: E402
from abliterate.steer.steering import steering  # noqa: E402
from tests.families import FAMILIES, build_model, save_sharded  # noqa: E402


def run(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    if result.exit_code != 0:
        sys.exit(f"abliterate {' '.join(args)} failed: {result.output}")
    return result.output


def write_jsonl(path: Path, items: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def sweep(work: Path) -> None:
    model = train_toy_model(work / "choices", choices=True)
    p = toy_prompts()
    train = write_jsonl(work / "train.jsonl", choice_pairs(p.harmful_train, True) + choice_pairs(p.harmless_train,
                                                                                                  False))
    held = write_jsonl(work / "held.jsonl", choice_pairs(p.harmful_test, True) + choice_pairs(p.harmless_test, False))
    run("steer", "vectors", str(model), "--pairs", str(train), "--out", str(work / "v.safetensors"), "--device", "cpu",
        "-q")
    out = run("steer", "sweep", str(model), "--vectors", str(work / "v.safetensors"), "--pairs", str(held),
              "--layers", "2:3", "--coeffs", "-2,-1,0,1,2", "--device", "cpu", "-q")
    print("steering sweep (abliterate steer sweep, layer 2; held-out items, half harmful):")
    print(out.rstrip())


def replies(model: torch.nn.Module, tokenizer, messages: list[str]) -> list[str]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False,
                                           add_generation_prompt=True) for m in messages]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    return [tokenizer.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in out]


def refused(texts: list[str]) -> float:
    return sum(any(t.startswith(r) for r in REFUSALS) for t in texts) / len(texts)


def add(work: Path, toy: Path) -> None:
    lm = load_model(toy, dtype="float32", device="cpu")
    p = toy_prompts()
    result = extract(lm, PromptSets(p.harmful_train, p.harmless_train, p.harmful_train[:16], p.harmless_train[:16]),
                     quiet=True)
    direction = work / "d.safetensors"
    save_extraction(result, direction)
    print(f"\napply --add (direction at layer {result.best.layer}, position {result.best.position}; held-out requests "
          f"refused, {len(p.harmless_test)} harmless, {len(p.harmful_test)} harmful):")
    base = AutoModelForCausalLM.from_pretrained(toy, dtype=torch.float32).eval()
    print(f"  unedited        harmless {100 * refused(replies(base, lm.tokenizer, p.harmless_test)):5.1f} %   "
          f"harmful {100 * refused(replies(base, lm.tokenizer, p.harmful_test)):5.1f} %")
    for scale in ("1", "1.5", "2"):
        out = work / f"add-{scale}"
        run("apply", str(toy), "--direction", str(direction), "--out", str(out), "--add", "--scale", scale, "-q")
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        print(f"  --scale {scale:<6}  harmless {100 * refused(replies(model, lm.tokenizer, p.harmless_test)):5.1f} %   "
              f"harmful {100 * refused(replies(model, lm.tokenizer, p.harmful_test)):5.1f} %")
    from peft import PeftModel

    run("apply", str(toy), "--direction", str(direction), "--out", str(work / "add-adapter"), "--add", "--scale", "2",
        "--adapter", "-q")
    ids = lm.tokenizer([f"<|user|> {m} <|end|> <|assistant|>" for m in p.harmless_test[:8]],
                       add_special_tokens=False, return_tensors="pt", padding=True)
    with torch.inference_mode():
        weights = AutoModelForCausalLM.from_pretrained(work / "add-2", dtype=torch.float32).eval()(**ids).logits
        adapted = PeftModel.from_pretrained(base, work / "add-adapter").eval()(**ids).logits
    print(f"  --scale 2 --adapter: max |adapter - weights| logit difference {difference(adapted, weights)}")


def difference(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"{(a - b).abs().max().item():.2g}"


def steered(folder: Path, vector: np.ndarray, layer: int, coeff: float, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad(), steering(model, arch_for_config(model.config.to_dict()), layer, vector, coeff):
        return model(input_ids=ids).logits


def bake(work: Path, folder: Path, label: str, vectors: np.ndarray, layer: int, coeff: float, ids: torch.Tensor,
         adapter: bool = False) -> None:
    save_direction(work / "v.safetensors", vectors, {"kind": "steering"})
    out = work / f"baked-{label.replace(' ', '-')}-{layer}"
    run("steer", "bake", str(folder), "--vectors", str(work / "v.safetensors"), "--layer", str(layer), "--coeff",
        str(coeff), "--out", str(out), "-q", *(("--adapter",) if adapter else ()))
    hooked = steered(folder, vectors[layer + 1], layer, coeff, ids)
    with torch.no_grad():
        if adapter:
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            baked = PeftModel.from_pretrained(base, out).eval()(input_ids=ids).logits
        else:
            baked = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(input_ids=ids).logits
    print(f"  {label:<22} layer {layer}  coeff {coeff:<4g} max |baked - hook| {difference(baked, hooked)}")


def random_vectors(num_layers: int, hidden: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(num_layers + 1, hidden)).astype(np.float32)


def bakes(work: Path, toy: Path) -> None:
    print("\nsteer bake against the steering hook (float32 logits, every position):")
    lm = load_model(toy, dtype="float32", device="cpu")
    texts = [lm.tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False,
                                              add_generation_prompt=True) for m in toy_prompts().harmless_test[:4]]
    ids = lm.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")["input_ids"]
    bake(work, toy, "toy", random_vectors(lm.num_layers, lm.hidden_size, seed=3), 3, 2.0, ids)
    ids = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(1))
    folders = {name: save_sharded(build_model(FAMILIES[name]), work / f"tiny-{name}")
               for name in ("llama", "gpt2", "gpt_neox", "qwen2", "mistral", "phi3", "granite")}
    for name, layer in (("llama", 0), ("llama", 1), ("gpt2", 0), ("gpt_neox", 1)):
        bake(work, folders[name], f"tiny {name}", random_vectors(2, 32), layer, 1.5, ids)
    print("steer bake --adapter against the steering hook:")
    ids = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(2))
    for name, layer in (("qwen2", 1), ("mistral", 0), ("phi3", 1), ("granite", 1)):
        bake(work, folders[name], f"tiny {name} adapter", random_vectors(2, 32, seed=5), layer, 1.5, ids, adapter=True)


def main() -> None:
    parts = set(sys.argv[1:]) or {"sweep", "add", "bake"}
    if parts - {"sweep", "add", "bake"}:
        sys.exit(__doc__)
    work = Path(tempfile.mkdtemp(prefix="toy-numbers-"))
    if "sweep" in parts:
        sweep(work)
    toy = train_toy_model(work / "toy") if parts & {"add", "bake"} else None
    if "add" in parts:
        add(work, toy)
    if "bake" in parts:
        bakes(work, toy)


if __name__ == "__main__":
    main()
