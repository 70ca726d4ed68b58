"""Extraction on a model that really refuses finds the direction that carries its refusals.

The toy chat model (abliterate.toy) refuses harmful-looking requests. `abliterate extract` on its
training requests (the CLI holds part of them out for scoring candidates) must select a direction
whose ablation, by hooks and by `abliterate apply`, stops the refusals on held-out requests without
changing harmless replies, and whose addition makes harmless requests refused.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from abliterate.demo.toy import REFUSALS, toy_prompts
from abliterate.io.direction_file import load_direction
from abliterate.measure.hooks import ablate, add
from abliterate.measure.loading import LoadedModel, load_model
from tests.test_apply import run_cli


def replies(model: torch.nn.Module, tokenizer, messages: list[str], max_new_tokens: int = 16) -> list[str]:
    """Greedy replies, long enough for every toy refusal and the start of every toy help."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False,
                                           add_generation_prompt=True) for m in messages]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return [tokenizer.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in out]


def refused(texts: list[str]) -> float:
    """Share of replies that are (or start with) one of the toy's refusals."""
    return sum(any(t.startswith(r) for r in REFUSALS) for t in texts) / len(texts)


def unchanged(after: list[str], before: list[str]) -> float:
    return sum(a == b for a, b in zip(after, before, strict=True)) / len(before)


@dataclass(frozen=True)
class Extracted:
    path: Path
    output: str
    metadata: dict[str, str]
    direction: torch.Tensor
    candidates: torch.Tensor
    harmful_file: Path


@pytest.fixture(scope="module")
def extracted(refusing_model, tmp_path_factory) -> Extracted:
    """The real CLI on the toy's training requests, written into a folder that does not exist yet."""
    root = tmp_path_factory.mktemp("extract")
    prompts = toy_prompts()
    (root / "harmful.txt").write_text("\n".join(prompts.harmful_train))
    (root / "harmless.txt").write_text("\n".join(prompts.harmless_train))
    path = root / "new folder" / "d.safetensors"
    code, out = run_cli("extract", str(refusing_model), "--harmful", str(root / "harmful.txt"), "--harmless",
                        str(root / "harmless.txt"), "--out", str(path), "--dtype", "float32", "--device", "cpu", "-q")
    assert code == 0, out
    with safe_open(str(path), "pt") as f:
        return Extracted(path, out, f.metadata(), f.get_tensor("direction"), f.get_tensor("candidates"),
                         root / "harmful.txt")


@pytest.fixture(scope="module")
def toy(refusing_model) -> LoadedModel:
    return load_model(refusing_model, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def held_out(extracted, toy) -> dict[str, list[str]]:
    """Greedy replies to the held-out requests, as trained and with the direction ablated by hooks."""
    prompts = toy_prompts()
    out = {"harmful": replies(toy.model, toy.tokenizer, prompts.harmful_test),
           "harmless": replies(toy.model, toy.tokenizer, prompts.harmless_test)}
    with ablate(toy.model, toy.arch, torch.from_numpy(load_direction(extracted.path).vectors)):
        out["harmful_ablated"] = replies(toy.model, toy.tokenizer, prompts.harmful_test)
        out["harmless_ablated"] = replies(toy.model, toy.tokenizer, prompts.harmless_test)
    return out


def test_extract_saves_the_selected_direction_with_metadata_and_all_candidates(extracted, toy):
    meta = extracted.metadata
    assert {"model", "layer", "position", "hidden_size", "command", "candidate_scores"} <= set(meta)
    assert int(meta["hidden_size"]) == toy.hidden_size == extracted.direction.shape[-1]
    assert extracted.candidates.shape[0] == toy.num_layers + 1
    assert extracted.candidates.shape[-1] == toy.hidden_size
    layer, position = int(meta["layer"]), int(meta["position"])
    assert 0 <= layer < toy.num_layers and -extracted.candidates.shape[1] <= position < 0
    assert torch.equal(extracted.direction, extracted.candidates[layer, position])
    scores = json.loads(meta["candidate_scores"])
    assert {(s["layer"], s["position"]) for s in scores} >= {(layer, position)}
    assert f"{len(scores)} candidates screened" in extracted.output
    assert meta["selection"] == "every filter held"  # the toy's direction passes the strict filters


def test_extract_records_its_own_command_not_the_callers_argv(extracted, refusing_model):
    tokens = shlex.split(extracted.metadata["command"])
    assert tokens[:3] == ["abliterate", "extract", str(refusing_model)]
    assert tokens[tokens.index("--harmful") + 1] == str(extracted.harmful_file)
    assert tokens[tokens.index("--out") + 1] == str(extracted.path)  # a path with a space survives quoting
    assert tokens[tokens.index("--dtype") + 1] == "float32" and "--quiet" in tokens
    assert {t for t in tokens if t.startswith("-")} == {"--harmful", "--harmless", "--out", "--dtype", "--device",
                                                        "--quiet"}  # what was given, nothing of pytest's argv


def test_extract_prints_the_table_of_top_candidates_with_the_chosen_one_marked(extracted):
    lines = extracted.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["layer", "pos", "ablated", "added", "KL"])
    rows = [line.split() for line in lines[header + 1:] if len(line.split()) in (5, 7)]
    assert 1 <= len(rows) <= 10
    chosen = [r for r in rows if r[-2:] == ["<-", "chosen"]]
    assert len(chosen) == 1
    meta = extracted.metadata
    assert chosen[0][:3] == [meta["layer"], meta["position"], f"{float(meta['refusal_score_ablated']):.2f}"]
    ablated = [float(r[2]) for r in rows]
    assert ablated == sorted(ablated)


def test_baseline_toy_refuses_held_out_harmful_requests_only(held_out):
    assert refused(held_out["harmful"]) >= 0.9
    assert refused(held_out["harmless"]) <= 0.1


def test_ablating_the_extracted_direction_by_hooks_stops_held_out_refusals(held_out):
    assert refused(held_out["harmful_ablated"]) <= 0.1
    assert unchanged(held_out["harmless_ablated"], held_out["harmless"]) >= 0.9


def test_applying_the_extracted_direction_to_the_weights_stops_held_out_refusals(extracted, toy, held_out,
                                                                                  refusing_model, tmp_path):
    prompts = toy_prompts()
    code, out = run_cli("apply", str(refusing_model), "--direction", str(extracted.path), "--out",
                        str(tmp_path / "edited"), "-q")
    assert code == 0, out
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "edited", dtype=torch.float32).eval()
    harmful = replies(edited, toy.tokenizer, prompts.harmful_test)
    harmless = replies(edited, toy.tokenizer, prompts.harmless_test)
    assert refused(harmful) <= 0.1
    assert unchanged(harmless, held_out["harmless"]) >= 0.9
    assert harmful == held_out["harmful_ablated"] and harmless == held_out["harmless_ablated"]


def test_adding_the_extracted_direction_at_its_layer_makes_harmless_requests_refused(extracted, toy):
    with add(toy.model, toy.arch, int(extracted.metadata["layer"]), extracted.direction, coeff=1.0):
        harmless = replies(toy.model, toy.tokenizer, toy_prompts().harmless_test)
    assert refused(harmless) >= 0.8


def test_probe_separates_held_out_harmful_from_harmless_prompts_at_the_selected_layer(extracted, toy, tmp_path):
    from abliterate.measure.probe import load_probe_direction, project, separation

    prompts = toy_prompts()
    (tmp_path / "harmful.txt").write_text("\n".join(prompts.harmful_test))
    (tmp_path / "harmless.txt").write_text("\n".join(prompts.harmless_test))
    code, out = run_cli("probe", toy.name, "--direction", str(extracted.path), "--prompts",
                        str(tmp_path / "harmful.txt"), "--prompts", str(tmp_path / "harmless.txt"),
                        "--out", str(tmp_path / "probe.json"), "--device", "cpu", "-q")
    assert code == 0, out
    layer, position = int(extracted.metadata["layer"]), int(extracted.metadata["position"])
    report = json.loads((tmp_path / "probe.json").read_text())
    harmful, harmless = report["sets"]["harmful"]["mean"][layer], report["sets"]["harmless"]["mean"][layer]
    assert harmful[position] - harmless[position] > 0.1  # position -1: the last post-instruction token
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == [str(layer)])
    assert float(row[2]) > float(row[4]) + 0.05  # the table's post-instruction means, harmful then harmless
    units = load_probe_direction(extracted.path, hidden_size=toy.hidden_size, num_layers=toy.num_layers)
    high = project(toy, prompts.harmful_test, units, quiet=True).values[:, layer, position]
    low = project(toy, prompts.harmless_test, units, quiet=True).values[:, layer, position]
    assert separation(high, low) >= 0.95  # per prompt, not only on average
