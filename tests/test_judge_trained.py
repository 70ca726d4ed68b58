"""The judge path on a model that really answers: a tiny chat model trained to judge the toy's replies.

The judge is trained (seconds, one thread) on the very question `abliterate evaluate --judge` asks,
rendered through its chat template, with the toy's refusals and helpful replies to the toy's training
requests: "yes" for a refusal, "no" for help. On held-out requests its verdict is therefore known
(the reply's kind), so the tests can check what the real CLI path does with it: loading it as
`--judge FOLDER`, asking it about every reply of `evaluate`, `--judge-check` on a labelled set, and
reporting where it disagrees with the markers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from abliterate.demo.toy import (
    HELPS,
    REFUSALS,
    encode_replies,
    one_thread,
    save_trained,
    toy_prompts,
    train_on_replies,
    word_tokenizer,
)
from abliterate.evaluate.judge import JUDGE_QUESTION
from tests.test_apply import run_cli

STEPS = 150


def _question(request: str, reply: str) -> str:
    return JUDGE_QUESTION.format(prompt=request, reply=reply)


def _tokenizer(texts: list[str]):
    return word_tokenizer(sorted({w for t in texts for w in t.split()} | {"yes", "no"}))


def train_judge(out: Path) -> Path:
    """A 2-layer Llama that answers the judge question with yes (toy refusal) or no (toy help), trained by the
    toy's own loop."""
    from transformers import LlamaConfig, LlamaForCausalLM

    prompts = toy_prompts()
    requests = prompts.harmful_train + prompts.harmless_train
    pairs = [(_question(r, reply), "yes" if reply in REFUSALS else "no") for r in requests
             for reply in (*REFUSALS, *HELPS)]
    tok = _tokenizer([q for q, _ in pairs] + prompts.harmful_test + prompts.harmless_test)
    chat = lambda q: tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,  # noqa: E731
                                             add_generation_prompt=True)
    encoded = encode_replies(tok, [(chat(question), answer) for question, answer in pairs])
    with one_thread():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=512, tie_word_embeddings=False))
        train_on_replies(model, encoded, steps=STEPS, batch=32, seed=0, one_cycle=False)
    return save_trained(model, tok, out)


@pytest.fixture(scope="module")
def judge(tmp_path_factory) -> Path:
    return train_judge(tmp_path_factory.mktemp("judge") / "judge")


def test_evaluate_asks_a_trained_judge_about_every_reply_and_gets_its_known_verdicts(judge, refusing_model,
                                                                                   tmp_path):
    prompts = toy_prompts()
    (tmp_path / "harmful.txt").write_text("\n".join(prompts.harmful_test))
    (tmp_path / "harmless.txt").write_text("\n".join(prompts.harmless_test))
    code, out = run_cli("evaluate", str(refusing_model), "--judge", str(judge), "--harmful",
                        str(tmp_path / "harmful.txt"), "--harmless", str(tmp_path / "harmless.txt"), "--overrefusal",
                        str(tmp_path / "harmless.txt"), "--limit", "12", "--max-new-tokens", "24", "--kl-tokens",
                        "4", "--out", str(tmp_path / "report.json"), "-q")
    assert code == 0, out
    report = json.loads((tmp_path / "report.json").read_text())
    judged = report["per_prompt"]
    assert len(judged) == 24 and {p["set"] for p in judged} == {"harmful", "overrefusal"}
    for p in judged:  # the toy replies with one of its refusals or helps; the judge was trained on which is which
        reply = p["reply"].strip()
        kind = any(full.startswith(reply) for full in REFUSALS)
        assert kind != any(full.startswith(reply) for full in HELPS), reply
        assert p["judge_refused"] is kind, p
    harmful = [p for p in judged if p["set"] == "harmful"]
    assert report["judge_refusal_rate"] == sum(p["judge_refused"] for p in harmful) / len(harmful) == 1.0
    assert "refusal rate (judge" in out and "judge and markers agree" in out


def test_judge_check_scores_the_trained_judge_and_lists_nothing_it_gets_right(judge, tmp_path):
    prompts = toy_prompts()
    items = [{"prompt": r, "reply": reply, "refusal": reply in REFUSALS}
             for r in prompts.harmful_test[:4] + prompts.harmless_test[:4] for reply in (*REFUSALS, *HELPS)]
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    code, out = run_cli("evaluate", "--judge-check", "--judge", str(judge), "--judge-set", str(tmp_path / "set.jsonl"))
    assert code == 0, out
    row = next(line for line in out.splitlines() if line.startswith("| judge"))
    assert "100.0 %" in row, out
