"""Selection always gives a result: relaxed filters say which and why, saved candidates can be re-chosen.

The pure part (which candidate wins under which filters) is tested on made-up scores; the CLI part on
the toy refuser: the choice by successive halving equals the exhaustive one, `--reselect` chooses
again from the saved file without the model, and a failed choice keeps every candidate on disk.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

from abliterate.errors import AbliterateError
from abliterate.measure.selection import CandidateScore, choose, scores_from_json, scores_json
from abliterate.options.recipe import SelectionSettings
from tests.test_apply import run_cli
from tests.test_extract import extracted  # noqa: F401  (module-scoped fixture: the exhaustive extraction)

SETTINGS = SelectionSettings(prune_layers=0.2, kl_threshold=0.1, induce_threshold=0.0)


def score(layer: int, ablated: float, added: float | None, kl: float | None, prompts: int = 32) -> CandidateScore:
    return CandidateScore(layer, -1, ablated, added, kl, None, prompts)


def test_the_lowest_ablation_score_passing_every_filter_wins():
    scores = [score(1, -3.0, 2.0, 0.5), score(2, -2.0, -1.0, 0.01), score(3, -1.0, 1.0, 0.05), score(4, 0.0, 1.0, 0.0)]
    choice = choose(scores, SETTINGS, num_layers=10)
    assert (choice.best.layer, choice.relaxed) == (3, None)
    assert [s.rejected is None for s in choice.scores] == [False, False, True, True]


def test_when_no_candidate_induces_refusal_the_best_within_the_kl_limit_is_chosen_and_the_reason_given():
    scores = [score(1, -3.0, 2.75, 0.5), score(2, -2.0, -1.5, 0.02), score(3, -1.0, -1.12, 0.05)]
    choice = choose(scores, SETTINGS, num_layers=10)
    assert choice.best.layer == 2
    assert choice.relaxed.startswith("induction filter relaxed: adding no candidate within KL 0.1 raised")
    # the highest addition score among the candidates it speaks of, not layer 1's (which exceeds the KL limit)
    assert "(highest -1.12)" in choice.relaxed and "among those 2" in choice.relaxed
    assert "\n" not in choice.relaxed


def test_when_no_candidate_stays_within_the_kl_limit_it_is_raised_to_twice_the_lowest():
    scores = [score(1, -3.0, 1.0, 0.9), score(2, -2.0, 1.0, 0.35), score(3, -1.0, 1.0, 0.2), score(4, -5.0, -1.0, 0.21)]
    choice = choose(scores, SETTINGS, num_layers=10)
    assert choice.best.layer == 2  # among the inducing ones within 0.4; layer 4 does not induce
    assert choice.relaxed.startswith("KL limit relaxed") and "0.400" in choice.relaxed


def test_candidates_pruned_by_screening_or_in_the_last_layers_are_never_chosen():
    scores = [score(1, -9.0, None, None, prompts=8), score(9, -8.0, 1.0, 0.01), score(2, -1.0, 1.0, 0.01)]
    choice = choose(scores, SETTINGS, num_layers=10)
    assert choice.best.layer == 2
    assert "pruned after screening" in choice.scores[0].rejected and "last 20%" in choice.scores[1].rejected


def test_nothing_usable_is_one_clear_error():
    with pytest.raises(AbliterateError, match="none of the 2 candidates"):
        choose([score(1, float("nan"), 1.0, 0.0), score(2, -1.0, None, None)], SETTINGS, num_layers=10)


def test_scores_survive_their_json_form_and_older_files_without_prompt_counts():
    scores = [score(1, -1.5, None, None, 8), score(2, -2.5, 0.5, 0.01)]
    assert scores_from_json(scores_json(scores)) == scores
    old = json.dumps([{"layer": 1, "position": -1, "refusal_ablated": -1.0, "refusal_added": 1.0, "kl": 0.1,
                       "rejected": None}])
    assert scores_from_json(old)[0].prompts == 0


def test_successive_halving_on_the_toy_chooses_what_the_exhaustive_selection_chooses(extracted, refusing_model,  # noqa: F811
                                                                                     tmp_path):
    out = tmp_path / "halved.safetensors"
    code, output = run_cli("extract", str(refusing_model), "--harmful", str(extracted.harmful_file), "--harmless",
                           str(extracted.harmful_file.with_name("harmless.txt")), "--out", str(out), "--dtype",
                           "float32", "--device", "cpu", "-q", "--finalists", "1", "--screen-prompts", "2")
    assert code == 0, output
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    scores = scores_from_json(meta["candidate_scores"])
    assert (meta["layer"], meta["position"]) == (extracted.metadata["layer"], extracted.metadata["position"])
    assert sum(s.full for s in scores) == 1 < len(scores)  # only the finalist got all three scores
    assert {s.prompts for s in scores} >= {2}  # the others were screened on 2 prompts
    assert len(scores) == len(json.loads(extracted.metadata["candidate_scores"]))  # every candidate is saved
    assert not out.with_name("halved.candidates.safetensors").exists()  # the pending file is gone once chosen


def test_reselect_chooses_again_from_the_saved_file_without_the_model(extracted, tmp_path):  # noqa: F811
    out = tmp_path / "again.safetensors"
    code, output = run_cli("extract", "--reselect", str(extracted.path), "--out", str(out), "--induce-threshold",
                           "1000")
    assert code == 0, output
    assert "note: induction filter relaxed" in output
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("candidates").shape == extracted.candidates.shape
    assert meta["selection"].startswith("induction filter relaxed")
    assert meta["extract_command"] == extracted.metadata["command"]
    assert json.loads(meta["selection_settings"])["induce_threshold"] == 1000
    code, output = run_cli("extract", "--reselect", str(extracted.path), "--out", str(tmp_path / "same.safetensors"))
    with safe_open(str(tmp_path / "same.safetensors"), "pt") as f:
        assert (f.metadata()["layer"], f.metadata()["position"]) == (extracted.metadata["layer"],
                                                                     extracted.metadata["position"])


def test_a_failed_choice_keeps_every_candidate_on_disk_and_says_how_to_choose_again(extracted, refusing_model,  # noqa: F811
                                                                                    tmp_path):
    out = tmp_path / "d.safetensors"
    code, output = run_cli("extract", str(refusing_model), "--harmful", str(extracted.harmful_file), "--harmless",
                           str(extracted.harmful_file.with_name("harmless.txt")), "--out", str(out), "--dtype",
                           "float32", "--device", "cpu", "-q", "--prune-layers", "1")
    assert code != 0 and output.startswith("error: ") and len(output.strip().splitlines()) == 1, output
    kept = tmp_path / "d.candidates.safetensors"
    assert f"--reselect {kept}" in output and not out.exists()
    with safe_open(str(kept), "pt") as f:
        assert f.get_tensor("candidates").shape == extracted.candidates.shape
        assert f.metadata()["status"] == "scoring"
    code, output = run_cli("apply", str(refusing_model), "--direction", str(kept), "--out", str(tmp_path / "e"))
    assert code != 0 and "no chosen direction" in output and "--reselect" in output


def test_reselect_without_candidates_or_with_a_model_too_is_refused(extracted, tmp_path):  # noqa: F811
    (tmp_path / "x.safetensors").write_bytes(b"junk")
    code, output = run_cli("extract", "--reselect", str(tmp_path / "x.safetensors"), "--out", str(tmp_path / "o"))
    assert code != 0 and output.startswith("error: ") and "x.safetensors" in output
    code, output = run_cli("extract", "some/model", "--reselect", str(extracted.path), "--out", str(tmp_path / "o"))
    assert code != 0 and "not both" in output


class TableScorer:
    """A stand-in for measure.scores.Scorer: candidate i (vector [i, ...]) has the scores of row i, and the
    forward sets each score would cost are counted."""

    def __init__(self, ablated: list[float], added: list[float], kl: list[float], prompts: int = 4) -> None:
        self.table, self.harmful, self.order = (ablated, added, kl), [[0]] * prompts, list(range(prompts))
        self.calls = {"added": [], "kl": []}

    def ablated(self, vector, todo):
        return torch.full((len(todo),), self.table[0][int(vector[0])])

    def ablated_many(self, jobs, progress=None):
        return [self.ablated(vector, todo) for vector, todo in jobs]

    def added(self, _layer, vector):
        self.calls["added"].append(int(vector[0]))
        return self.table[1][int(vector[0])]

    def kl(self, vector):
        self.calls["kl"].append(int(vector[0]))
        return self.table[2][int(vector[0])]

    def added_and_kl(self, layer, vector):
        return self.added(layer, vector), self.kl(vector)


def halved(added: list[float], kl: list[float]) -> tuple[list[CandidateScore], TableScorer]:
    """Eight candidates (layers 0-7 of 10), ablation score better the lower the layer; two finalists."""
    from types import SimpleNamespace

    from abliterate.measure.scores import score_candidates

    candidates = torch.zeros(11, 1, 3)
    candidates[:, 0, 0], candidates[:, 0, 1] = torch.arange(11.0), 1.0
    scorer = TableScorer([-10.0 + i for i in range(11)], added, kl)
    settings = SelectionSettings(prune_layers=0.2, finalists=2, screen_prompts=4)
    return score_candidates(SimpleNamespace(num_layers=10), candidates, scorer, settings, quiet=True), scorer


def fully_scored(scores: list[CandidateScore], added: list[float], kl: list[float]) -> list[CandidateScore]:
    return [replace(s, refusal_added=added[s.layer], kl=kl[s.layer]) if s.refusal_added is not None else s
            for s in scores]


def test_fallback_candidates_that_do_not_induce_refusal_skip_their_kl_and_the_choice_is_unchanged():
    added, kl = [-1.0] * 11, [0.01] * 11  # nothing induces: the fallback pair (layers 2, 3) is scored too
    scores, scorer = halved(added, kl)
    assert scorer.calls == {"added": [0, 1, 2, 3], "kl": [0, 1]}
    by_layer = {s.layer: s for s in scores}
    assert by_layer[2].kl is None and "KL not measured" in choose(scores, SETTINGS, 10).scores[2].rejected
    lazy, full = choose(scores, SETTINGS, 10), choose(fully_scored(scores, added, kl), SETTINGS, 10)
    assert lazy.best.layer == full.best.layer == 0 and lazy.relaxed.startswith("induction filter relaxed")


def test_fallback_kls_are_measured_when_no_finalist_is_within_the_kl_limit():
    added, kl = [-1.0] * 11, [5.0, 5.0] + [0.01] * 9
    scores, scorer = halved(added, kl)
    assert sorted(scorer.calls["kl"]) == [0, 1, 2, 3]
    lazy, full = choose(scores, SETTINGS, 10), choose(fully_scored(scores, added, kl), SETTINGS, 10)
    assert lazy.best.layer == full.best.layer == 2


def test_a_fallback_candidate_that_induces_refusal_gets_its_kl_and_wins():
    added, kl = [-1.0, -1.0, -1.0, 2.0] + [-1.0] * 7, [0.01] * 11
    scores, scorer = halved(added, kl)
    assert scorer.calls["kl"] == [0, 1, 3]
    choice = choose(scores, SETTINGS, 10)
    assert choice.best.layer == 3 and choice.relaxed is None


def test_candidates_scored_together_row_by_row_get_the_scores_each_gets_alone(refusing_model):
    from abliterate.demo.toy import toy_prompts
    from abliterate.measure.loading import load_model
    from abliterate.measure.scores import REFUSAL_PREFIXES, Scorer, refusal_token_ids
    from abliterate.measure.templates import render

    lm = load_model(refusing_model, device="cpu", dtype="float32")
    texts = [render(lm.tokenizer, t) for t in toy_prompts().harmful_train[:9]]
    scorer = Scorer(lm, texts, texts[:2], refusal_token_ids(lm.tokenizer, REFUSAL_PREFIXES), 4)
    torch.manual_seed(0)
    jobs = [(torch.randn(lm.hidden_size), [0, 3, 5]), (torch.randn(lm.hidden_size), list(range(9))),
            (torch.randn(lm.hidden_size), [8])]
    together = scorer.ablated_many(jobs)
    for (vector, todo), scores in zip(jobs, together, strict=True):
        torch.testing.assert_close(scores, scorer.ablated(vector, todo), rtol=1e-4, atol=1e-4)
