"""`extract --directions K --proposals categories`: beside the chosen direction, one direction per category of
the harmful prompts (its harmful mean minus the harmless mean at the chosen layer and position), the most
different first, recorded in the file's metadata; and the prompt sources that carry categories."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from abliterate.demo import toy
from abliterate.errors import AbliterateError
from abliterate.io.direction_file import load_direction
from abliterate.measure.directions import activations_at, category_directions, check_categories
from abliterate.measure.extract import PromptSets, extract, harmful_categories, save_extraction
from abliterate.measure.loading import load_model
from abliterate.measure.templates import render
from abliterate.options.recipe import SelectionSettings
from abliterate.prompts import prompt_categories
from tests.test_apply import run_cli

K = 3
N_TRAIN, N_VAL = 96, 12


def _action(prompt: str) -> str:
    return next(a for a in toy.HARMFUL_ACTIONS if a in prompt)


def test_category_directions_take_the_most_different_category_first():
    g = torch.Generator().manual_seed(0)
    d = 8
    axes = torch.eye(d, dtype=torch.float64)
    offsets = {"a": 2 * axes[0], "b": 2 * axes[0] + 0.1 * axes[1], "c": 2 * axes[0] + 3 * axes[2]}
    labels = [c for c in "abc" for _ in range(20)]
    harmful = torch.stack([offsets[c] for c in labels]) + 0.01 * torch.randn(60, d, generator=g, dtype=torch.float64)
    harmless = 0.01 * torch.randn(40, d, generator=g, dtype=torch.float64)
    r = harmful.mean(0) - harmless.mean(0)
    rows, names = category_directions(harmful, harmless, labels, r, 2)
    assert names[0] == "c" and names[1] in "ab"  # c differs most from r (a and b lie close to it)
    assert torch.allclose(rows[0], harmful[40:].mean(0) - harmless.mean(0))
    with pytest.raises(AbliterateError, match="--directions 3 or fewer"):  # r and 3 categories span 3 dimensions
        category_directions(harmful, harmless, labels, r, 3)


def test_categories_are_checked_before_any_forward_pass():
    with pytest.raises(AbliterateError, match="needs harmful prompts with categories"):
        check_categories([None, None], 1)
    with pytest.raises(AbliterateError, match=r"needs 3 categories .* have 2"):
        check_categories(["x", "y", None], 2)
    check_categories(["x", "y", None], 1)


def test_prompt_sources_give_their_categories(tmp_path):
    builtin = prompt_categories("builtin:harmful")
    assert len(set(builtin.values())) == 16
    (tmp_path / "p.jsonl").write_text('{"prompt": " a ", "category": "x"}\n{"prompt": "b"}\n')
    assert prompt_categories(str(tmp_path / "p.jsonl")) == {"a": "x"}
    (tmp_path / "p.csv").write_text("prompt,category\nfirst,one\nsecond,two\n")
    assert prompt_categories(str(tmp_path / "p.csv")) == {"first": "one", "second": "two"}
    (tmp_path / "p.txt").write_text("a\nb\n")
    assert prompt_categories(str(tmp_path / "p.txt")) == {}
    assert harmful_categories(str(tmp_path / "p.jsonl"), ["a", "b"], None) == ["x", None]


@pytest.fixture(scope="module")
def toy_categories(refusing_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("categories")
    lm = load_model(refusing_model, dtype="float32", device="cpu")
    p = toy.toy_prompts()
    harmful_val, harmless_val = (s[N_TRAIN : N_TRAIN + N_VAL] for s in (p.harmful_train, p.harmless_train))
    harmful = p.harmful_train[:N_TRAIN]
    labels = [_action(h) for h in harmful]
    result = extract(lm, PromptSets(harmful, p.harmless_train[:N_TRAIN], harmful_val, harmless_val), quiet=True,
                     directions=K, settings=SelectionSettings(finalists=2), categories=labels)
    save_extraction(result, root / "dir.safetensors")
    return lm, result, root / "dir.safetensors", harmful, p.harmless_train[:N_TRAIN], labels


def test_toy_category_proposals_are_categories_differences_recorded_in_the_file(toy_categories):
    lm, result, path, harmful, harmless, labels = toy_categories
    with safe_open(str(path), "pt") as f:
        meta, rows = f.metadata(), f.get_tensor("direction")
    names = json.loads(meta["proposal_categories"])
    assert meta["proposals"] == "categories" and meta["rank"] == str(K) and len(names) == K - 1
    assert names == list(result.more_categories) and set(names) <= set(labels)
    stream, position = result.best.layer, result.best.position
    fmt = lambda texts: [render(lm.tokenizer, t, None, enable_thinking=False) for t in texts]  # noqa: E731
    h = activations_at(lm, fmt(harmful), stream, position, quiet=True)
    b = activations_at(lm, fmt(harmless), stream, position, quiet=True)
    for row, name in zip(rows[1:], names, strict=True):
        mine = torch.tensor([label == name for label in labels])
        want = (h[mine].mean(0) - b.mean(0)).float()
        assert torch.allclose(row, want, rtol=1e-4, atol=1e-5 * float(want.norm())), name
    direction = load_direction(path, hidden_size=lm.hidden_size, num_layers=lm.num_layers)
    q = direction.vectors.astype(np.float64)
    assert direction.rank == K and np.abs(q @ q.T - np.eye(K)).max() < 1e-6
    r = result.direction.double().numpy()
    assert np.abs(q[0] - r / np.linalg.norm(r)).max() < 1e-6  # the chosen direction first


def test_extract_cli_proposes_categories_and_refuses_unlabelled_prompts(refusing_model, tmp_path):
    p = toy.toy_prompts()
    (tmp_path / "harmful.jsonl").write_text("".join(json.dumps({"prompt": h, "category": _action(h)}) + "\n"
                                                    for h in p.harmful_train))
    (tmp_path / "harmless.txt").write_text("\n".join(p.harmless_train))
    (tmp_path / "harmful.txt").write_text("\n".join(p.harmful_train))
    common = ["extract", str(refusing_model), "--harmless", str(tmp_path / "harmless.txt"), "--n-train", "48",
              "--n-val", "12", "--finalists", "2", "--positions", "1", "--directions", "2", "-q"]
    code, out = run_cli(*common, "--harmful", str(tmp_path / "harmful.jsonl"), "--proposals", "categories",
                        "--out", str(tmp_path / "d.safetensors"))
    assert code == 0, out
    assert "then categories" in out and "2 directions" in out
    with safe_open(str(tmp_path / "d.safetensors"), "np") as f:
        assert f.metadata()["proposals"] == "categories"
        assert "--proposals categories" in f.metadata()["command"]
    code, out = run_cli(*common, "--harmful", str(tmp_path / "harmful.txt"), "--proposals", "categories",
                        "--out", str(tmp_path / "e.safetensors"))
    assert code == 2 and "needs harmful prompts with categories" in out and not (tmp_path / "e.safetensors").exists()
    code, out = run_cli("extract", str(refusing_model), "--proposals", "categories", "--out", str(tmp_path / "f.st"))
    assert code == 2 and "add --directions K" in out


def test_whole_job_takes_category_proposals_from_the_command_line(refusing_model, tmp_path):
    p = toy.toy_prompts()
    (tmp_path / "harmful.jsonl").write_text("".join(json.dumps({"prompt": h, "category": _action(h)}) + "\n"
                                                    for h in p.harmful_train))
    (tmp_path / "harmless.txt").write_text("\n".join(p.harmless_train))
    (tmp_path / "small.yaml").write_text("extract: {n_train: 48, n_val: 12, finalists: 2, positions: 1}\n")
    out = tmp_path / "toy-categories"
    code, printed = run_cli(str(refusing_model), "--out", str(out), "--harmful", str(tmp_path / "harmful.jsonl"),
                            "--harmless", str(tmp_path / "harmless.txt"), "--recipe", str(tmp_path / "small.yaml"),
                            "--directions", "3", "--proposals", "categories", "--no-eval", "-q")
    assert code == 0, printed
    with safe_open(str(out / "refusal_direction.safetensors"), "np") as f:
        meta = f.metadata()
    assert meta["proposals"] == "categories" and len(json.loads(meta["proposal_categories"])) == 2
    card = (out / "README.md").read_text()
    assert "--directions 3 --proposals categories" in card
    assert "the differences of 2 categories of the harmful prompts there" in card and "rank 3" in card


def test_card_names_where_the_further_directions_came_from():
    from abliterate.publish.card import DirectionSummary

    def said(**meta: str) -> str:
        return DirectionSummary.of({"layer": "2", "position": "-1", **meta}, "m").beside()

    assert said() == "" and said(rank="1") == ""
    assert "2 leading principal directions" in said(rank="3", proposals="principal")
    assert "categories of the harmful prompts there (drugs, fraud)" in said(
        rank="3", proposals="categories", proposal_categories='["drugs", "fraud"]')
    assert said(rank="2") == "; with 1 more directions from the file, 2 directions (rank 2)"  # a user's own file


def test_a_searched_rank_k_choice_keeps_where_its_directions_came_from():
    from abliterate.search.front import _proposals

    meta = {"proposals": "categories", "proposal_categories": '["drugs", "fraud", "theft"]'}
    assert _proposals(meta, 2) == {"proposals": "categories", "proposal_categories": '["drugs"]'}
    assert _proposals({"proposals": "principal"}, 3) == {"proposals": "principal"}
    assert _proposals({"proposal_categories": "not json"}, 2) == {}
