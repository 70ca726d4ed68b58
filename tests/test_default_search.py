"""`abliterate MODEL` with no tuning flags runs a short search and applies the lowest-KL point with at most 5 % of the
validation prompts refused, saying what it traded against the paper's one-shot point; `--one-shot` is that point."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from abliterate.jobs.job_search import DEFAULT_MAX_REFUSALS, choose_point
from abliterate.search.front import TrialResult, pareto_front
from abliterate.search.space import Point
from abliterate.search.study import SearchResult
from tests.test_apply import run_cli
from tests.test_pipeline import job_args, prompt_files  # noqa: F401  (fixture)


def _result(rows: list[tuple[int, int, float]]) -> SearchResult:
    p = Point(1.0, -1, False, 1.0, {})
    trials = [TrialResult(n, p, float(r), kl, r, 0.1) for n, r, kl in rows]
    return SearchResult(trials, pareto_front(trials), 32, len(trials), 1.0, Path("s.db"), "s")


class _Limits:
    def __init__(self, max_kl=None, max_refusals=None):
        self.max_kl, self.max_refusals = max_kl, max_refusals


def test_default_choice_is_the_lowest_kl_within_five_percent_refused_and_names_the_paper_point():
    result = _result([(0, 0, 0.21), (1, 1, 0.05), (2, 4, 0.01), (3, 0, 0.09)])
    choice, line = choose_point(result, _Limits(max_refusals=DEFAULT_MAX_REFUSALS))
    assert choice.number == 1  # 1/32 <= 5 %, KL 0.05 < 0.09 (0/32) < 0.21 (the paper's 0/32)
    assert "1/32" in line and "0.0500" in line and "trial 0, `--one-shot`): 0/32 at KL 0.2100" in line


def test_default_choice_falls_back_to_the_fewest_refusals_and_says_so():
    choice, line = choose_point(_result([(0, 9, 0.2), (1, 5, 0.03)]), _Limits(max_refusals=DEFAULT_MAX_REFUSALS))
    assert choice.number == 1 and "no point reached 5% refused" in line


def test_whole_job_without_flags_searches_and_one_shot_applies_the_extractions_choice(refusing_model, prompt_files,  # noqa: F811
                                                                                      tmp_path):
    default, one_shot = tmp_path / "default", tmp_path / "one-shot"
    code, output = run_cli(str(refusing_model), "--out", str(default), "--harmful", prompt_files["harmful_train"],
                           "--harmless", prompt_files["harmless_train"], "--no-eval")
    assert code == 0, output
    chosen = re.search(r"chose trial (\d+): (\d+)/(\d+) validation prompts refused at KL ([\d.]+)", output)
    assert chosen, output
    refused, prompts, kl = int(chosen[2]), int(chosen[3]), float(chosen[4])
    assert refused <= DEFAULT_MAX_REFUSALS * prompts  # the toy's front reaches it
    paper = re.search(r"one-shot point \(trial 0, `--one-shot`\): (\d+)/\d+ at KL ([\d.]+)", output)
    if chosen[1] != "0":  # another point than the paper's was chosen: as few refusals allowed, at a lower KL
        assert paper and (kl < float(paper[2]) or int(paper[1]) > DEFAULT_MAX_REFUSALS * prompts), output
    card = (default / "README.md").read_text()
    assert "## Search" in card and "**(chosen)**" in card
    assert (default / "abliterate-recipe.yaml").is_file()
    code, output = run_cli(str(refusing_model), "--out", str(one_shot), *job_args(prompt_files, evaluate=False))
    assert code == 0, output
    assert "## Search" not in (one_shot / "README.md").read_text()
    assert not (one_shot / "abliterate-recipe.yaml").exists()
    scales = yaml.safe_load((default / "abliterate-recipe.yaml").read_text())["apply"]["layer_scales"]
    assert scales != {} and run_cli("verify", str(default))[0] == 0


def test_one_shot_with_search_is_one_clear_error(refusing_model, tmp_path):
    code, output = run_cli(str(refusing_model), "--out", str(tmp_path / "o"), "--one-shot", "--search", "3")
    assert code != 0 and "drop --search or --one-shot" in output and "Traceback" not in output
