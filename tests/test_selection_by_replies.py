"""Selection can rank by generated replies and filter by the KL over the reply, when asked.

The pure part on made-up scores; the real path on the toy refuser: `extract --refusal-objective count
--kl-objective continuation` generates replies for the finalists under the ablation hooks, records the
counts and the objectives it used, and `--reselect` can rank by them again without the model.
"""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from abliterate.demo.toy import toy_prompts
from abliterate.errors import AbliterateError
from abliterate.evaluate.objectives import RefusalCount
from abliterate.measure.hooks import ablate
from abliterate.measure.selection import CandidateScore, choose, scores_from_json
from abliterate.options.recipe import SelectionSettings
from tests.test_apply import run_cli
from tests.test_extract import extracted, toy  # noqa: F401  (module-scoped fixtures)

COUNT = SelectionSettings(refusal_objective="count")


def score(layer: int, ablated: float, kl: float, refusals: int | None, kl_reply: float | None = None):
    return CandidateScore(layer, -1, ablated, 1.0, kl, None, 32, refusals, 32 if refusals is not None else 0,
                          kl_reply)


def test_counting_replies_chooses_the_fewest_refusals_over_the_better_first_token_score():
    scores = [score(1, -5.0, 0.01, 6), score(2, -1.0, 0.01, 2), score(3, -2.0, 0.01, 2), score(4, -9.0, 0.01, None)]
    assert choose(scores, SelectionSettings(), 10).best.layer == 4  # first-token score alone
    choice = choose(scores, COUNT, 10)
    assert choice.best.layer == 3  # 2 refusals, the better log-odds of the two
    assert choice.scores[3].rejected == "not among the finalists measured by generated replies"


def test_the_continuation_kl_objective_filters_by_the_kl_over_the_reply():
    scores = [score(1, -5.0, 0.01, None, kl_reply=0.5), score(2, -1.0, 0.5, None, kl_reply=0.05)]
    assert choose(scores, SelectionSettings(), 10).best.layer == 1
    choice = choose(scores, SelectionSettings(kl_objective="continuation"), 10)
    assert choice.best.layer == 2 and choice.scores[0].rejected == "continuation KL 0.500 > 0.1"


def test_counting_without_counts_or_an_unknown_objective_is_one_clear_error():
    with pytest.raises(AbliterateError, match="--refusal-objective count needs refused-reply counts"):
        choose([score(1, -5.0, 0.01, None)], COUNT, 10)
    with pytest.raises(AbliterateError, match="unknown refusal objective 'counts'; use one of score, count"):
        choose([score(1, -5.0, 0.01, 1)], SelectionSettings(refusal_objective="counts"), 10)


@pytest.fixture(scope="module")
def by_replies(refusing_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("replies")
    prompts = toy_prompts()
    (root / "harmful.txt").write_text("\n".join(prompts.harmful_train))
    (root / "harmless.txt").write_text("\n".join(prompts.harmless_train))
    path = root / "d.safetensors"
    code, out = run_cli("extract", str(refusing_model), "--harmful", str(root / "harmful.txt"), "--harmless",
                        str(root / "harmless.txt"), "--out", str(path), "--dtype", "float32", "--device", "cpu",
                        "--n-val", "12", "--finalists", "4", "--refusal-objective", "count", "--kl-objective",
                        "continuation", "--max-new-tokens", "6", "--kl-tokens", "4", "-q")
    assert code == 0, out
    with safe_open(str(path), "pt") as f:
        return path, out, f.metadata(), f.get_tensor("direction")


def test_extract_by_replies_records_the_counts_the_objectives_and_chooses_the_fewest(by_replies, toy):  # noqa: F811
    _, out, meta, direction = by_replies
    settings = json.loads(meta["selection_settings"])
    assert (settings["refusal_objective"], settings["kl_objective"]) == ("count", "continuation")
    scores = scores_from_json(meta["candidate_scores"])
    measured = [s for s in scores if s.refusals is not None]
    assert len(measured) == 4 and all(s.replies == 12 and s.kl_continuation is not None for s in measured)
    best = next(s for s in scores if (s.layer, s.position) == (int(meta["layer"]), int(meta["position"])))
    passing = [s for s in measured if s.rejected is None]
    assert best.refusals == min(s.refusals for s in passing)
    assert "refused" in out and "KL reply" in out and f"{best.refusals}/12" in out
    # the chosen direction, ablated, lowers the refused replies on held-out requests too
    held_out = toy_prompts().harmful_test[:12]
    before = RefusalCount(toy, held_out, 6)()
    with ablate(toy.model, toy.arch, direction):
        after = RefusalCount(toy, held_out, 6)()
    assert before == 12 and after < before


def test_reselect_ranks_by_the_saved_counts_and_refuses_a_file_without_them(by_replies, extracted,  # noqa: F811
                                                                            tmp_path):
    path, _, meta, _ = by_replies
    code, out = run_cli("extract", "--reselect", str(path), "--out", str(tmp_path / "a.safetensors"),
                        "--refusal-objective", "count", "--kl-objective", "continuation")
    assert code == 0, out
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert (f.metadata()["layer"], f.metadata()["position"]) == (meta["layer"], meta["position"])
    code, out = run_cli("extract", "--reselect", str(extracted.path), "--out", str(tmp_path / "b.safetensors"),
                        "--refusal-objective", "count")
    assert code != 0 and out.startswith("error: --refusal-objective count needs refused-reply counts")
    assert not (tmp_path / "b.safetensors").exists()
