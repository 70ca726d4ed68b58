"""The toy model the behaviour tests stand on really refuses, and only harmful-looking requests."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from abliterate.demo.toy import REFUSALS, toy_prompts


def greedy_replies(folder, messages: list[str], max_new_tokens: int = 24) -> list[str]:
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": m}], tokenize=False, add_generation_prompt=True)
             for m in messages]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return [tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in out]


def test_toy_model_refuses_held_out_harmful_requests_and_helps_with_the_rest(refusing_model):
    prompts = toy_prompts()
    harmful = greedy_replies(refusing_model, prompts.harmful_test)
    harmless = greedy_replies(refusing_model, prompts.harmless_test)
    assert sum(r in REFUSALS for r in harmful) >= 0.9 * len(harmful)
    assert sum(r not in REFUSALS for r in harmless) >= 0.9 * len(harmless)


def test_held_out_prompts_were_never_trained_on():
    prompts = toy_prompts()
    assert not set(prompts.harmful_test) & set(prompts.harmful_train)
    assert not set(prompts.harmless_test) & set(prompts.harmless_train)
