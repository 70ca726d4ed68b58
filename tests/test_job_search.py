"""`abliterate MODEL --search N`: the whole job searches on the model it loaded, applies the chosen point,
and its card shows the front and a recipe that rebuilds the weights byte for byte."""

from __future__ import annotations

import re
from pathlib import Path

from abliterate.search.borderline import borderline_prompts
from abliterate.search.front import TrialResult, pareto_front, pick, table
from abliterate.search.space import Point
from tests.test_apply import run_cli
from tests.test_pipeline import job_args, prompt_files  # noqa: F401  (fixture)


def test_whole_job_with_search_applies_the_chosen_point_and_its_recipe_rebuilds_it_byte_for_byte(
        refusing_model, prompt_files, tmp_path):  # noqa: F811
    out = tmp_path / "toy-searched"
    code, output = run_cli(str(refusing_model), "--out", str(out), "--search", "6", "--max-kl", "0.5",
                           *job_args(prompt_files, one_shot=False))
    assert code == 0, output
    card = (out / "README.md").read_text()
    assert "## Search" in card and "**(chosen)**" in card and "--search 6 --max-kl 0.5" in card
    assert "](search_front.png)" in card and "  search_front.png" in (out / "SHA256SUMS").read_text()
    assert (out / "search_front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # matplotlib: a dev dependency
    rows = front_rows(card)
    chosen = next(row for row in rows if row["chosen"])
    assert chosen["kl"] <= 0.5  # within --max-kl
    # the fewest refusals among the front's trials within the limit, and fewer than the unedited model's
    assert chosen["refused"] == min(row["refused"] for row in rows if row["kl"] <= 0.5)
    # fewer refusals than the unedited model (its rate on the held-out prompts, from the card's evaluation), both
    # at the chosen point on the validation prompts and with the written weights on the held-out ones
    rate, baseline = evaluated(card, "refusal rate, held-out harmful prompts")
    assert 100 * chosen["refused"] / chosen["of"] < baseline and rate < baseline
    assert evaluated(card, "KL to baseline, first reply token")[0] <= 0.5
    local = [str(tmp_path), str(refusing_model), *prompt_files.values()]
    assert not [p for p in local if p in card]  # no path of the publisher's disk anywhere in the card
    recipe = (out / "abliterate-recipe.yaml").read_text()
    assert "direction: refusal_direction.safetensors" in recipe and "layer_scales" in recipe
    code, output = run_cli("apply", str(refusing_model), "--recipe", str(out / "abliterate-recipe.yaml"),
                           "--out", str(tmp_path / "again"), "--quiet")
    assert code == 0, output
    shards = sorted(p.name for p in out.glob("*.safetensors") if p.name != "refusal_direction.safetensors")
    assert shards
    for name in shards:
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    assert run_cli("verify", str(out))[0] == 0


def front_rows(card: str) -> list[dict]:
    """The card's search table: {chosen, refused, of, kl} per trial on the front."""
    rows = []
    for line in card.split("## Search", 1)[1].split("\n## ", 1)[0].splitlines():
        m = re.match(r"\| (\d+)( \*\*\(chosen\)\*\*)? \| (\d+)/(\d+) \|.*\| ([\d.]+) \| [^|]* \|$", line)
        if m:
            rows.append({"chosen": bool(m[2]), "refused": int(m[3]), "of": int(m[4]), "kl": float(m[5])})
    assert rows, card
    return rows


def evaluated(card: str, metric: str) -> tuple[float, float]:
    """(edited, baseline) of one row of the card's evaluation table."""
    line = next(line for line in card.splitlines() if line.startswith(f"| {metric}"))
    value, baseline = re.match(r"\| [^|]* \| ([\d.]+)[^|]*?\(baseline ([\d.]+)", line).groups()  # rates carry a CI
    return float(value), float(baseline)


def test_reproduce_command_names_the_uploaded_direction_and_no_local_path(refusing_model, prompt_files,  # noqa: F811
                                                                          tmp_path):
    from abliterate.jobs.run_options import RunOptions, regenerate_command

    direction = tmp_path / "my-direction.safetensors"
    direction.write_bytes(b"")
    options = RunOptions(model=str(refusing_model), direction=direction, harmful=prompt_files["harmful_train"],
                         harmless="builtin:harmless", search=4, max_kl=0.05)
    command = regenerate_command(options, "user/toy-chat")
    assert command == ("abliterate user/toy-chat --direction refusal_direction.safetensors --harmful "
                       "harmful_train.txt --harmless builtin:harmless --search 4 --max-kl 0.05")


def test_search_limits_without_search_are_one_clear_error(refusing_model, tmp_path):
    # --one-shot: without it the job searches by default, and the limits choose its point (test_default_search)
    code, output = run_cli(str(refusing_model), "--out", str(tmp_path / "o"), "--one-shot", "--max-kl", "0.1")
    assert code != 0 and "add --search N" in output and "Traceback" not in output


def test_over_refusals_join_the_front_and_break_ties_in_the_choice():
    p = Point(1.0, -1, False, 1.0, {})
    trials = [TrialResult(0, p, 0.0, 0.02, 1, 0.1, 5), TrialResult(1, p, 0.0, 0.03, 1, 0.1, 0),
              TrialResult(2, p, 0.0, 0.04, 1, 0.1, 3)]
    front = pareto_front(trials)
    assert [t.number for t in front] == [1, 0]  # trial 2 is beaten by 1 on all three
    assert pick(front, 10).number == 1  # same refusals: fewer borderline refusals first
    assert pick(front, 10, max_kl=0.025).number == 0
    assert "borderline" in table(front, 10, front[0], borderline=8)


def test_search_borderline_prompts_leave_out_those_evaluate_reports_on():
    from abliterate.evaluate.evaluation import select
    from abliterate.prompts import builtin

    picked = borderline_prompts("builtin:overrefusal", 32)
    assert len(picked) == 32 and not set(picked) & set(select(builtin("overrefusal"), 32))
    assert borderline_prompts("none", 32) == []


def test_time_budget_stops_the_search_before_its_trials(refusing_model, tmp_path):
    from abliterate.demo import toy
    from abliterate.measure.extract import PromptSets, extract, save_extraction
    from abliterate.measure.loading import load_model
    from abliterate.search.space import load_candidates
    from abliterate.search.study import SearchSettings, search

    lm = load_model(refusing_model, dtype="float32", device="cpu")
    p = toy.toy_prompts()
    harmful, harmless = p.harmful_train[-16:], p.harmless_train[-16:]
    save_extraction(extract(lm, PromptSets(p.harmful_train[:-16], p.harmless_train[:-16], harmful, harmless),
                            positions=1, quiet=True), tmp_path / "d.safetensors")
    result = search(lm, load_candidates(Path(tmp_path / "d.safetensors"), lm), harmful, harmless,
                    SearchSettings(trials=50, time_budget=0.0), tmp_path / "s.db", quiet=True)
    assert result.ran == 0 and "--time-budget" in result.notes[-1]


def test_an_adapter_job_searches_no_norm_preserving_point_it_could_not_write():
    from abliterate.jobs.job_search import search_settings
    from abliterate.jobs.run_options import RunOptions

    assert search_settings(RunOptions(model="m", search=4, adapter=True), 8, None).norm_preserve is False
    assert search_settings(RunOptions(model="m", search=4), 8, None).norm_preserve is True
