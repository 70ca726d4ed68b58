"""`extract` with the defaults: its total time against the difference-of-means pass alone, candidate-scoring
throughput against the plain batched forward, and (on the toy) the chosen direction's held-out refusal rate
against the exhaustive selection's (--finalists 0). All in one run, on one loaded model.

    python benchmarks/bench_extract.py toy          # the toy chat model that really refuses (abliterate.demo.toy)
    python benchmarks/bench_extract.py qwen2-0.5b   # random weights in Qwen2-0.5B's shape, bf16, saved locally

The model is saved as a folder and loaded with `load_model`, as the CLI does (the checkpoint's dtype where
the CPU computes it natively). Prompts are split as `extract` splits them (toy: its train sets as files; the
random model: the built-in sets). The load average is printed with each timing (timings on a shared
machine vary with it; the ratio of token positions the decoder runs does not). Times:
  * extract: `measure.extract.extract` with the default settings (successive-halving selection), the
    difference-of-means pass timed inside it (its two `mean_residuals` calls): target total <= 10x the pass;
  * scoring: `Scorer.ablated` (a candidate removed by hooks from every residual writer, first reply token)
    against the first-token forward a user would write (`model(**batch, logits_to_keep=1)`), on the same
    prompts and batch size: target >= 0.9x; and `Scorer.ablated_many` with four candidates on a quarter of the
    prompts each, batched together as the screening rounds run them (a direction per row);
  * toy only: the same extraction with `finalists=0` (every candidate scored fully), and both chosen
    directions' refusal rates on the toy's held-out harmful prompts (greedy replies, markers).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from abliterate.arch.table import arch_for_config
from abliterate.measure import extract as extract_module
from abliterate.measure.activations import decoder
from abliterate.measure.extract import PromptSets, extract, split_prompts
from abliterate.measure.loading import LoadedModel, load_model
from abliterate.measure.scores import REFUSAL_PREFIXES, Scorer, refusal_token_ids
from abliterate.measure.templates import render
from abliterate.options.recipe import SelectionSettings
from abliterate.prompts import builtin

TEMPLATE = ("{% for m in messages %}<|user|> {{ m['content'] }} <|end|>{% endfor %}"
            "{% if add_generation_prompt %} <|assistant|>{% endif %}")
QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                 max_position_embeddings=32768, rope_theta=1000000.0)


def build(hidden: int, layers: int, vocab_size: int | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A small random Llama with a word-level tokenizer covering the built-in prompts (bench_memory's tokenizer)."""
    tok = word_tokenizer()
    config = LlamaConfig(vocab_size=max(vocab_size or 0, len(tok)), hidden_size=hidden, intermediate_size=hidden * 3,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return LoadedModel(model, tok, arch_for_config(config.to_dict()), "random-llama")


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<unk>": 1, "<|user|>": 2, "<|end|>": 3, "<|assistant|>": 4, "<eos>": 5}
    for text in builtin("harmful", split="all") + builtin("harmless", split="all"):
        for w in text.split():
            vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                  padding_side="left")
    tok.chat_template = TEMPLATE
    return tok


def random_qwen(folder: Path) -> None:
    """Qwen2-0.5B's shape with random weights, saved in bf16 with the word-level tokenizer."""
    config = Qwen2Config(**QWEN2_05B, dtype="bfloat16")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)


def first_token_forward(lm: LoadedModel, prompts: list[str], batch_size: int) -> None:
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            enc = lm.tokenizer(prompts[i: i + batch_size], add_special_tokens=False, padding=True, return_tensors="pt")
            lm.model(**enc, logits_to_keep=1)


def best_of(fns, repeat: int) -> list[float]:
    """The best time of each function over `repeat` rounds, run in turn (a load change hits all of them)."""
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, spent in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [min(t) for t in times]


class Work:
    """Token positions the decoder runs (padding included): the forward work, whatever the machine's load."""

    def __init__(self, lm: LoadedModel) -> None:
        self.tokens = 0
        self.handle = decoder(lm).register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, _module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.tokens += ids.numel() if ids is not None else 0


def timed_extract(lm: LoadedModel, prompts: PromptSets, settings: SelectionSettings):
    """extract() with the defaults; (result, total seconds, seconds of the difference-of-means pass, total tokens
    run, tokens of the pass)."""
    spent, pass_tokens = [0.0], [0]
    real = extract_module.mean_residuals
    work = Work(lm)

    def means(*args, **kwargs):
        start, before = time.perf_counter(), work.tokens
        try:
            return real(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start
            pass_tokens[0] += work.tokens - before

    extract_module.mean_residuals = means
    try:
        start = time.perf_counter()
        result = extract(lm, prompts, settings=settings, template_kwargs={"enable_thinking": False}, quiet=True)
        return result, time.perf_counter() - start, spent[0], work.tokens, pass_tokens[0]
    finally:
        extract_module.mean_residuals = real
        work.handle.remove()


def held_out_refusal(lm: LoadedModel, direction: torch.Tensor, prompts: list[str]) -> float:
    from abliterate.evaluate.evaluation import refusal_stats
    from abliterate.evaluate.records import EvalSettings
    from abliterate.measure.hooks import ablate

    view = replace(lm, hooks=lambda: ablate(lm.model, lm.arch, direction))
    return refusal_stats(view, prompts, "harmful", EvalSettings(max_new_tokens=24), quiet=True).rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["toy", "qwen2-0.5b"])
    parser.add_argument("--repeat", type=int, default=3, help="best of N for the throughput timings")
    args = parser.parse_args()
    settings = SelectionSettings()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        if args.model == "toy":
            from abliterate.demo.toy import toy_prompts, train_toy_model

            train_toy_model(folder)
            toy = toy_prompts()
            for name in ("harmful_train", "harmless_train"):
                (Path(tmp) / f"{name}.txt").write_text("\n".join(getattr(toy, name)))
            sources = (str(Path(tmp) / "harmful_train.txt"), str(Path(tmp) / "harmless_train.txt"))
        else:
            random_qwen(folder)
            sources = ("builtin:harmful", "builtin:harmless")
        harmful_train, harmful_val = split_prompts(sources[0], n_train=128, n_val=32, field=None, kind="harmful")
        harmless_train, harmless_val = split_prompts(sources[1], n_train=128, n_val=32, field=None, kind="harmless")
        prompts = PromptSets(harmful_train, harmless_train, harmful_val, harmless_val)
        lm = load_model(folder, device="cpu")
        dtype = next(lm.model.parameters()).dtype
        print(f"{args.model}: {sum(p.numel() for p in lm.model.parameters()) / 1e6:.0f}M parameters, {dtype}, "
              f"{lm.num_layers} layers, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")

        result, total, means, tokens, pass_tokens = timed_extract(lm, prompts, settings)
        scored = sum(s.full for s in result.scores)
        induced = sum(s.refusal_added is not None and s.kl is None for s in result.scores)
        print(f"extract (defaults): {total:.1f} s, of which the difference-of-means pass over "
              f"{len(harmful_train) + len(harmless_train)} prompts {means:.1f} s: total / pass = {total / means:.1f}x "
              f"(target <= 10x); token positions run: total / pass = {tokens / pass_tokens:.1f}x; "
              f"{len(result.scores)} candidates, {scored} fully scored, {induced} by induction only; chose layer "
              f"{result.best.layer} position {result.best.position}; load average {os.getloadavg()[0]:.1f}")

        rendered = [render(lm.tokenizer, p, enable_thinking=False) for p in harmful_train + harmless_train]
        bs = settings.batch_size
        scorer = Scorer(lm, rendered, rendered[:2], refusal_token_ids(lm.tokenizer, REFUSAL_PREFIXES), bs)
        every = list(range(len(rendered)))
        quarters = [(result.candidates[1 + q, -1], every[q::4]) for q in range(4)]  # screening: candidates batched
        plain, scoring, packed = best_of([lambda: first_token_forward(lm, rendered, bs),
                                          lambda: scorer.ablated(result.direction, every),
                                          lambda: scorer.ablated_many(quarters)], args.repeat)
        n = len(rendered)
        print(f"first-token forward: plain {n / plain:.1f} prompts/s, candidate scoring {n / scoring:.1f} prompts/s: "
              f"scoring / plain = {plain / scoring:.2f} (target >= 0.9); four candidates batched together (as "
              f"screening runs them) {n / packed:.1f} prompts/s: {plain / packed:.2f}; batch size {bs}; load average "
              f"{os.getloadavg()[0]:.1f}")

        if args.model == "toy":
            exhaustive, ex_total, *_ = timed_extract(lm, prompts, replace(settings, finalists=0))
            held_out = toy_prompts().harmful_test
            from abliterate.evaluate.evaluation import refusal_stats
            from abliterate.evaluate.records import EvalSettings

            unedited = refusal_stats(lm, held_out, "harmful", EvalSettings(max_new_tokens=24), quiet=True).rate
            ours = held_out_refusal(lm, result.direction, held_out)
            theirs = held_out_refusal(lm, exhaustive.direction, held_out)
            print(f"exhaustive selection (--finalists 0): {ex_total:.1f} s, chose layer {exhaustive.best.layer} "
                  f"position {exhaustive.best.position}")
            print(f"held-out refusal rate ({len(held_out)} harmful prompts, direction removed): default selection "
                  f"{ours:.1%}, exhaustive {theirs:.1%} (target: default <= exhaustive); unedited {unedited:.1%}")


if __name__ == "__main__":
    main()
