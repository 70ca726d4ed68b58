"""Extraction and candidate-scoring throughput against a plain batched transformers forward, in one run.

Builds a small random Llama (no downloads) with a chat template, formats the built-in harmful and
harmless prompts, and times over the same prompts and batch size:
  * plain: `model(**batch)` on left-padded batches in the prompts' order (what a user would write);
  * abliterate: `activations.mean_residuals` (hooks keep the post-instruction positions of every
    layer's residual stream as running float64 sums).
Then candidate scoring, per prompt, on the model as `load_model` prepares it (weights not requiring
grad, LM head fed contiguous inputs): the first-token forward a user would write
(`model(**batch, logits_to_keep=1)` on a freshly loaded model), against `scores.Scorer.ablated`
(a candidate removed by hooks from every residual writer), and the same without the contiguous head
(what scoring cost before; in bf16 it is the 2.5-5x the issue measured).
Prints prompts/s and the ratios (>= 0.9 is the target), and the activation memory held.

    python benchmarks/bench_extract.py [--hidden 512] [--layers 8] [--vocab 32000] [--dtype bfloat16]
                                       [--batch-size 16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from abliterate.arch.table import arch_for_config
from abliterate.measure.activations import mean_residuals
from abliterate.measure.loading import LoadedModel, contiguous_head
from abliterate.measure.scores import Scorer, refusal_token_ids
from abliterate.measure.templates import render
from abliterate.prompts import builtin

TEMPLATE = ("{% for m in messages %}<|user|> {{ m['content'] }} <|end|>{% endfor %}"
            "{% if add_generation_prompt %} <|assistant|>{% endif %}")


def build(hidden: int, layers: int, vocab_size: int | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    texts = builtin("harmful") + builtin("harmless")
    vocab = {"<pad>": 0, "<unk>": 1, "<|user|>": 2, "<|end|>": 3, "<|assistant|>": 4, "<eos>": 5}
    for t in texts:
        for w in t.split():
            vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                  padding_side="left")
    tok.chat_template = TEMPLATE
    config = LlamaConfig(vocab_size=max(vocab_size or 0, len(vocab)), hidden_size=hidden, intermediate_size=hidden * 3,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return LoadedModel(model, tok, arch_for_config(config.to_dict()), "random-llama")


def plain_forward(lm: LoadedModel, prompts: list[str], batch_size: int) -> None:
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            enc = lm.tokenizer(prompts[i : i + batch_size], add_special_tokens=False, padding=True,
                               return_tensors="pt")
            lm.model(**enc)


def first_token_forward(lm: LoadedModel, prompts: list[str], batch_size: int) -> None:
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            enc = lm.tokenizer(prompts[i : i + batch_size], add_special_tokens=False, padding=True,
                               return_tensors="pt")
            lm.model(**enc, logits_to_keep=1)


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size (the LM head's rows)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    lm = build(args.hidden, args.layers, args.vocab, getattr(torch, args.dtype))
    prompts = [render(lm.tokenizer, p) for p in builtin("harmful") + builtin("harmless")]
    n = len(prompts)
    plain = best_of(lambda: plain_forward(lm, prompts, args.batch_size), args.repeat)
    first = best_of(lambda: first_token_forward(lm, prompts, args.batch_size), args.repeat)
    lm.model.requires_grad_(False)  # as load_model leaves it
    ours = best_of(lambda: mean_residuals(lm, prompts, 4, batch_size=args.batch_size, quiet=True), args.repeat)
    ids = refusal_token_ids(lm.tokenizer, ["I"])
    scorer = Scorer(lm, prompts, prompts[:2], ids, args.batch_size)
    vector, every = torch.randn(args.hidden), list(range(n))
    unhooked = best_of(lambda: scorer.ablated(vector, every), 1)
    contiguous_head(lm.model)
    scoring = best_of(lambda: scorer.ablated(vector, every), args.repeat)
    held = (args.layers + 1) * 4 * args.hidden * 8  # float64 sums: the only activations kept across batches
    print(f"{n} prompts, batch size {args.batch_size}, hidden {args.hidden}, {args.layers} layers, vocab "
          f"{args.vocab}, {args.dtype}, {torch.get_num_threads()} threads")
    print(f"plain transformers forward:      {n / plain:.1f} prompts/s")
    print(f"abliterate extraction:           {n / ours:.1f} prompts/s  ratio = {plain / ours:.2f} (target >= 0.9)")
    print(f"plain first-token forward:       {n / first:.1f} prompts/s")
    print(f"abliterate candidate scoring:    {n / scoring:.1f} prompts/s  ratio = {first / scoring:.2f} "
          "(target >= 0.9)")
    print(f"  without the contiguous LM head: {n / unhooked:.1f} prompts/s  ratio = {first / unhooked:.2f}")
    print(f"activations kept across batches: {held / 1024:.0f} KiB (one batch's hidden states are freed per layer)")


if __name__ == "__main__":
    main()
