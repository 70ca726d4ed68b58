"""Search objectives beyond the first token agree with what `evaluate` measures on the same edit."""

from __future__ import annotations

import math

import pytest
import torch

from abliterate.demo.toy import toy_prompts
from abliterate.edit.plan import EditOptions
from abliterate.evaluate.distance import kl_to_baseline
from abliterate.evaluate.evaluation import refusal_stats
from abliterate.evaluate.objectives import ContinuationKL, RefusalCount
from abliterate.evaluate.records import EvalSettings
from abliterate.measure.hooks import ablate
from abliterate.measure.loading import load_model
from abliterate.search.study import Scorer, SearchSettings


@pytest.fixture(scope="module")
def models(refusing_model):
    """The toy twice (one gets hooks, one stays the unedited baseline) and a direction to ablate."""
    lm, baseline = load_model(refusing_model, device="cpu"), load_model(refusing_model, device="cpu")
    prompts = toy_prompts()
    with torch.inference_mode():  # difference of mean last-token residuals after layer 2: a real refusal direction
        def mean(texts):
            ids = lm.tokenizer([lm.tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                add_generation_prompt=True) for t in texts], return_tensors="pt", padding=True)
            return lm.model(**ids, output_hidden_states=True).hidden_states[3][:, -1].mean(0)
        r = mean(prompts.harmful_train) - mean(prompts.harmless_train)
    return lm, baseline, r / r.norm(), prompts


def test_continuation_kl_is_zero_unedited_and_equals_evaluates_kl_under_the_edit(models):
    lm, baseline, r, prompts = models
    harmless = prompts.harmless_test[:8]
    objective = ContinuationKL(lm, harmless, tokens=6, batch_size=4)
    assert objective() == 0.0
    with ablate(lm.model, lm.arch, r, num_layers=lm.num_layers):
        edited = objective()
        reference = kl_to_baseline(lm, baseline, harmless, EvalSettings(kl_tokens=6, batch_size=4), quiet=True)
    assert edited > 0 and edited == pytest.approx(reference.continuation, rel=1e-5)


def test_refusal_count_is_evaluates_marker_count(models):
    lm, _, r, prompts = models
    harmful = prompts.harmful_test[:8]
    settings = EvalSettings(max_new_tokens=10, batch_size=4)
    objective = RefusalCount(lm, harmful, max_new_tokens=10, batch_size=4)
    assert objective() == refusal_stats(lm, harmful, "harmful", settings).refused == 8
    with ablate(lm.model, lm.arch, r, num_layers=lm.num_layers):
        assert objective() == refusal_stats(lm, harmful, "harmful", settings).refused < 8


def test_search_scorer_uses_the_objectives_asked_for(models):
    lm, baseline, r, prompts = models
    harmful, harmless = prompts.harmful_test[:6], prompts.harmless_test[:6]
    settings = SearchSettings(batch_size=4, max_new_tokens=10, kl_objective="continuation", kl_tokens=6,
                              refusal_objective="count")
    count, kl = Scorer(lm, harmful, harmless, settings).first_token(r, EditOptions())
    fast = Scorer(lm, harmful, harmless, SearchSettings(batch_size=4))
    fast_score, fast_kl = fast.first_token(r, EditOptions())
    unedited_odds = first_token_refusal_log_odds(lm, harmful, fast.refusal_ids)
    with ablate(lm.model, lm.arch, r, num_layers=lm.num_layers):
        expected = refusal_stats(lm, harmful, "harmful", EvalSettings(max_new_tokens=10, batch_size=4)).refused
        reference = kl_to_baseline(lm, baseline, harmless, EvalSettings(kl_tokens=6, batch_size=4), quiet=True)
        edited_odds = first_token_refusal_log_odds(lm, harmful, fast.refusal_ids)
    assert count == expected and kl == pytest.approx(reference.continuation, rel=1e-5)
    # the default objective is the mean first-token refusal log-odds under the edit, computed here one unpadded
    # prompt at a time; the edit lowers it by far more than the tolerance
    assert fast_kl == pytest.approx(reference.first_token, rel=1e-4)
    assert fast_score == pytest.approx(edited_odds, abs=1e-4) and unedited_odds - edited_odds > 1.0


def first_token_refusal_log_odds(lm, instructions, refusal_ids) -> float:
    """Mean over prompts of log(p / (1 - p)), p the next-token probability of the refusal tokens after the chat
    template's generation prompt."""
    odds = []
    for text in instructions:
        prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                  add_generation_prompt=True)
        ids = lm.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.inference_mode():
            logprobs = torch.log_softmax(lm.model(ids).logits[0, -1].double(), -1)
        p = logprobs[refusal_ids].exp().sum().item()
        odds.append(math.log(p / (1 - p)))
    return sum(odds) / len(odds)
