"""The whole job with several directions (`abliterate MODEL --directions K`, recipe key extract.directions) and
with `--search N` when a later step fails: the extraction and the study are kept where a rerun resumes them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from abliterate.errors import AbliterateError
from abliterate.io.direction_file import load_direction
from abliterate.options.recipe import load_recipe
from tests.test_apply import run_cli
from tests.test_pipeline import job_args, prompt_files  # noqa: F401  (fixture)

SMALL = {"extract": {"n_train": 64, "n_val": 12, "finalists": 2, "positions": 1}, "evaluate": {"limit": 6}}


@pytest.fixture(scope="module")
def small_recipe(tmp_path_factory) -> Path:
    """A recipe that keeps the toy's whole job fast: fewer prompts, one position, two finalists."""
    path = tmp_path_factory.mktemp("recipe") / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    return path


def test_whole_job_directions_removes_k_directions_and_the_card_and_command_record_k(
        refusing_model, prompt_files, small_recipe, tmp_path):  # noqa: F811
    out = tmp_path / "toy-rank2"
    code, output = run_cli(str(refusing_model), "--out", str(out), "--directions", "2", "--recipe",
                           str(small_recipe), *job_args(prompt_files, evaluate=False))
    assert code == 0, output
    direction = load_direction(out / "refusal_direction.safetensors")
    assert direction.rank == 2 and direction.vectors.shape[0] == 2
    card = (out / "README.md").read_text()
    assert "rank 2" in card and "Q (Q^T W)" in card and "--directions 2" in card
    assert "the 1 leading principal directions of the per-prompt differences" in card
    assert run_cli("verify", str(out))[0] == 0  # the rank-2 span check on every edited tensor


def test_recipe_directions_is_used_unless_the_command_line_gives_it(tmp_path):
    from abliterate.jobs.extraction import with_command_line
    from abliterate.jobs.run_options import RunOptions

    path = tmp_path / "r.yaml"
    path.write_text("extract:\n  directions: 3\n")
    recipe = load_recipe(None, path)
    assert with_command_line(RunOptions(model="m"), recipe).extract.directions == 3
    assert with_command_line(RunOptions(model="m", directions=2), recipe).extract.directions == 2
    assert with_command_line(RunOptions(model="m", harmful="x.txt"), recipe).extract.harmful == "x.txt"
    path.write_text("extract:\n  directions: 0\n")
    with pytest.raises(AbliterateError, match=r"extract\.directions should be a whole number from 1 to 64"):
        load_recipe(None, path)


def test_directions_with_a_given_direction_file_is_one_clear_error(refusing_model, tmp_path):
    code, output = run_cli(str(refusing_model), "--out", str(tmp_path / "o"), "--directions", "2", "--direction",
                           str(tmp_path / "d.safetensors"))
    assert code != 0 and "--directions" in output and "nothing is extracted" in output
    assert "Traceback" not in output


def test_a_failure_after_the_search_keeps_extraction_and_study_and_a_rerun_resumes_them(
        refusing_model, prompt_files, small_recipe, tmp_path, monkeypatch):  # noqa: F811
    import optuna

    from abliterate.jobs import whole_job
    from abliterate.search import study as study_module

    out = tmp_path / "toy-searched"
    args = ["--out", str(out), "--search", "3", "--recipe", str(small_recipe),
            *job_args(prompt_files, evaluate=False, one_shot=False)]

    def fail(*_args, **_kwargs):
        raise AbliterateError("the disk is full (forced by the test)")

    with monkeypatch.context() as m:
        m.setattr(whole_job, "_edit", fail)
        code, output = run_cli(str(refusing_model), "--directions", "2", *args)
    kept_direction = tmp_path / "toy-searched.direction.safetensors"
    kept_study = tmp_path / "toy-searched.search.study.db"
    assert code == 2 and "the disk is full" in output and "Traceback" not in output
    assert str(kept_direction) in output and str(kept_study) in output and "rerun with --direction" in output
    assert not out.exists() and load_direction(kept_direction).rank == 2
    trials = optuna.load_study(study_name="abliterate-search", storage=f"sqlite:///{kept_study}").trials
    assert len([t for t in trials if t.state.name == "COMPLETE"]) == 3
    assert {t.params.get("directions", 1) for t in trials} == {1, 2}  # the search chose among k = 1 and 2

    code, output = run_cli(str(refusing_model), *args)  # no --direction: a new extraction would orphan the study
    assert code != 0 and f"--direction {kept_direction}" in output and "to resume it" in output

    scored = []
    first_token = study_module.Scorer.first_token
    monkeypatch.setattr(study_module.Scorer, "first_token", lambda self, *a: scored.append(1) or first_token(self, *a))
    code, output = run_cli(str(refusing_model), "--direction", str(kept_direction), *args)
    assert code == 0, output
    assert scored == []  # every trial came from the kept study: none was run again
    assert (out / "README.md").is_file() and "**(chosen)**" in (out / "README.md").read_text()
    recipe = yaml.safe_load((out / "abliterate-recipe.yaml").read_text())
    assert recipe["extract"] == {"directions": 2}  # the K the searched point's k was chosen among
    assert load_direction(out / "refusal_direction.safetensors").rank in (1, 2)
    assert not kept_study.exists() and kept_direction.exists()  # the user's --direction file stays
