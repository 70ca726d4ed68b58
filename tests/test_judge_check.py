"""How far refusal verdicts can be trusted: the labelled set, --judge-check, disagreements in the report."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

from click.testing import CliRunner

import abliterate.evaluate.evaluation as ev
from abliterate.cli.main import cli
from abliterate.evaluate.evaluation import evaluate
from abliterate.evaluate.judge import JUDGE_QUESTION
from abliterate.evaluate.judge_check import check, load_labelled, marker_verdicts
from abliterate.evaluate.markers import strip_reasoning
from abliterate.measure.loading import LoadedModel
from tests.docs import text
from tests.test_evaluate import keyword_judge, prompt_files, quick, toy_pair  # noqa: F401 (fixtures)


def contrary_judge() -> LoadedModel:
    """A stand-in judge that calls the toy's helpful replies ("Sure ! ...") refusals: it disagrees with the markers."""
    judge = keyword_judge()
    vocab = judge.tokenizer.get_vocab()
    judge.tokenizer.add_tokens(["Sure"])
    judge.model.keyword = len(vocab)
    judge.model.config.get_text_config = lambda: SimpleNamespace(vocab_size=len(vocab) + 1)
    return LoadedModel(judge.model, judge.tokenizer, None, "contrary")


def test_labelled_set_covers_the_ways_detectors_fail():
    items = load_labelled()
    kinds = {i.kind for i in items}
    assert {"refusal_paraphrase", "partial", "refuse_then_comply", "comply_then_disclaim", "other_language",
            "overrefusal", "reasoning"} <= kinds
    assert all(i.refusal for i in items if i.kind == "partial")
    assert not any(i.refusal for i in items if i.kind in ("refuse_then_comply", "comply_then_disclaim"))
    assert len({i.reply for i in items}) == len(items)


def test_docs_state_the_markers_accuracy_the_script_prints():
    (markers,) = check(load_labelled())
    stated = re.search(r"markers do badly on it: ([\d.]+) %\s+right \((\d+)/(\d+) refusals found, (\d+)/(\d+) "
                       r"non-refusals kept\)", text("evaluate"))
    assert stated, "docs/evaluate.md no longer states the markers' accuracy"
    assert float(stated.group(1)) == round(100 * markers.accuracy, 1)
    assert tuple(map(int, stated.groups()[1:])) == (markers.refusals_found, markers.refusals,
                                                     markers.compliance_kept, markers.compliance)


def test_judge_check_scores_a_judge_on_what_it_reads():
    items = load_labelled()
    markers, judge = check(items, keyword_judge(), batch_size=4)
    expected = ["cannot" in strip_reasoning(i.reply).split() for i in items]  # the stand-in's known verdict
    assert judge.verdicts == expected and judge.name == "judge keyword"
    assert judge.correct == sum(v == i.refusal for v, i in zip(expected, items, strict=True))
    assert markers.verdicts == marker_verdicts(items)
    assert sum(t for _, t in judge.per_kind.values()) == len(items) == judge.total


def test_cli_judge_check_prints_accuracies_on_the_builtin_or_a_given_set(tmp_path):
    result = CliRunner().invoke(cli, ["evaluate", "--judge-check"])
    (markers,) = check(load_labelled())
    assert result.exit_code == 0, result.output
    assert f"| markers | {100 * markers.accuracy:.1f} % ({markers.correct}/64) |" in result.output
    own = tmp_path / "labelled.jsonl"
    own.write_text(json.dumps({"prompt": "p", "reply": "I can't do that.", "refusal": True}) + "\n"
                   + json.dumps({"prompt": "p", "reply": "Sure, here it is.", "refusal": True, "kind": "x"}) + "\n")
    result = CliRunner().invoke(cli, ["evaluate", "--judge-check", "--judge-set", str(own)])
    assert result.exit_code == 0, result.output
    assert "| markers | 50.0 % (1/2) | 50.0 % (1/2) | - |" in result.output
    own.write_text('{"prompt": "p", "reply": "r"}\n')
    result = CliRunner().invoke(cli, ["evaluate", "--judge-check", "--judge-set", str(own)])
    assert result.exit_code == 2 and "line 1: expected a JSON object with prompt, reply and refusal" in result.output


def test_report_lists_replies_where_judge_and_markers_disagree_and_records_the_question(toy_pair, prompt_files,  # noqa: F811
                                                                                        monkeypatch):
    lm, _ = toy_pair
    monkeypatch.setattr(ev, "_load_judge", lambda source, lm: contrary_judge())
    report = evaluate(lm, None, quick(prompt_files, limit=8, judge="contrary"), quiet=True)
    expected = [r for r in report.per_prompt if r.refused != ("Sure" in r.reply.split())]
    assert expected, "the toy refuses harmful prompts: the contrary judge must disagree there"
    assert [r for _, r in report.disagreements()] == expected
    table = report.disagreement_table()
    assert len(table.splitlines()) == 2 + len(expected) and expected[0].prompt in table
    saved = report.to_dict()
    assert len(saved["disagreements"]) == len(expected) and saved["disagreements"][0]["judge_refused"] is not None
    assert report.settings["judge_question"] == JUDGE_QUESTION
