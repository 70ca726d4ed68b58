"""The whole job loads the model once: extraction and evaluation share it, the edit evaluated by hooks on it,
with the numbers an evaluation of the written checkpoint against a second load of the original gives."""

from __future__ import annotations

import gc
import math
import weakref
from pathlib import Path

import pytest

from abliterate.evaluate import evaluation as evaluation_module
from abliterate.measure import loading

QUICK_EVAL = "evaluate:\n  limit: 8\n  max_new_tokens: 24\n  kl_tokens: 8\n"


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory) -> dict[str, str]:
    """The toy's train and test prompt sets as text files."""
    from abliterate.demo.toy import toy_prompts

    root, prompts = tmp_path_factory.mktemp("prompts"), toy_prompts()
    for name in ("harmful_train", "harmless_train", "harmful_test", "harmless_test"):
        (root / f"{name}.txt").write_text("\n".join(getattr(prompts, name)))
    return {name: str(root / f"{name}.txt") for name in ("harmful_train", "harmless_train", "harmful_test",
                                                         "harmless_test")}


class Counted:
    """load_model calls, and (report, settings) of every evaluation, while patched in."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.calls: list[str] = []
        self.reports: list = []
        self.alive_at_load: list[int] = []  # how many models loaded before were still in memory at each load
        models: list[weakref.ref] = []
        real_load, real_evaluate = loading.load_model, evaluation_module.evaluate

        def load(source, **kwargs):
            self.calls.append(str(source))
            gc.collect()
            self.alive_at_load.append(sum(m() is not None for m in models))
            lm = real_load(source, **kwargs)
            models.append(weakref.ref(lm.model))
            return lm

        def evaluate(lm, baseline=None, settings=None, **kwargs):
            self.reports.append((real_evaluate(lm, baseline, settings, **kwargs), settings))
            return self.reports[-1][0]

        monkeypatch.setattr(loading, "load_model", load)
        monkeypatch.setattr(evaluation_module, "evaluate", evaluate)


def _job(refusing_model: Path, prompt_files: dict[str, str], out: Path, **extra):
    from abliterate.jobs.run_options import RunOptions
    from abliterate.jobs.whole_job import run

    return run(RunOptions(model=str(refusing_model), out=out, harmful=prompt_files["harmful_train"],
                          harmless=prompt_files["harmless_train"], eval_harmful=prompt_files["harmful_test"],
                          eval_harmless=prompt_files["harmless_test"], quiet=True, **extra))


@pytest.fixture(scope="module")
def extracted_job(refusing_model, prompt_files, tmp_path_factory):
    """One whole job with extraction (the paper's one-shot choice: --one-shot) and a short evaluation: (result,
    counted calls and reports)."""
    root = tmp_path_factory.mktemp("job")
    (root / "quick.yaml").write_text(QUICK_EVAL)
    with pytest.MonkeyPatch.context() as patch:
        counted = Counted(patch)
        result = _job(refusing_model, prompt_files, root / "out", recipe=root / "quick.yaml", one_shot=True)
    return result, counted


def test_whole_job_loads_the_model_once_and_its_evaluation_equals_one_of_the_written_checkpoint(
        refusing_model, extracted_job):
    result, counted = extracted_job
    assert counted.calls == [str(refusing_model)]  # extraction and evaluation on one load
    ((in_memory, settings),) = counted.reports

    # today's way: the written checkpoint and the original, each loaded
    edited, original = loading.load_model(result.out), loading.load_model(refusing_model)
    loaded = evaluation_module.evaluate(edited, original, settings, quiet=True)
    assert in_memory.refusal_rate == loaded.refusal_rate == 0.0
    assert in_memory.overrefusal_rate == loaded.overrefusal_rate
    assert in_memory.baseline_refusal_rate == loaded.baseline_refusal_rate == 1.0
    assert [r.reply for r in in_memory.per_prompt] == [r.reply for r in loaded.per_prompt]
    assert in_memory.baseline_nll == loaded.baseline_nll  # the same model, unedited: bit for bit
    for name in ("nll", "kl_first_token", "kl_continuation"):  # float32: hooks and weights round differently
        assert math.isclose(getattr(in_memory, name), getattr(loaded, name), rel_tol=1e-4, abs_tol=1e-6), name


def test_whole_job_with_an_adapter_evaluates_it_on_the_one_loaded_model(refusing_model, prompt_files,
                                                                        extracted_job, monkeypatch, tmp_path):
    (tmp_path / "quick.yaml").write_text(QUICK_EVAL)
    counted = Counted(monkeypatch)
    result = _job(refusing_model, prompt_files, tmp_path / "adapter", adapter=True, recipe=tmp_path / "quick.yaml",
                  direction=extracted_job[0].out / "refusal_direction.safetensors")
    assert counted.calls == [str(refusing_model)]
    ((report, _),) = counted.reports
    assert result.refusal_rate == 0.0 and report.baseline_refusal_rate == 1.0 and report.model.endswith("+ adapter")


def test_an_edit_hooks_cannot_compute_is_evaluated_on_the_written_checkpoint(refusing_model, prompt_files,
                                                                             extracted_job, monkeypatch, tmp_path):
    recipe = tmp_path / "targets.yaml"
    recipe.write_text(QUICK_EVAL + "apply:\n  targets: ['.*o_proj\\.weight', '.*down_proj\\.weight', "
                      "'.*embed_tokens\\.weight']\n")
    counted = Counted(monkeypatch)
    result = _job(refusing_model, prompt_files, tmp_path / "targets", recipe=recipe,
                  direction=extracted_job[0].out / "refusal_direction.safetensors")
    assert counted.calls == [str(refusing_model), str(tmp_path / "targets.abliterate-partial" / "output")]
    assert counted.alive_at_load == [0, 0]  # the job's model was measured as the baseline and released first
    assert result.refusal_rate == 0.0


def test_whole_job_records_each_stages_wall_time_and_peak_memory_in_its_result_and_card(extracted_job):
    result, _ = extracted_job
    assert [r.name for r in result.stages] == ["load", "extract", "edit", "evaluate"]
    assert all(r.seconds > 0 and r.peak_rss > 50 << 20 for r in result.stages)  # torch alone holds more
    card = (result.out / "README.md").read_text()
    rows = card.split("## Resources\n", 1)[1].split("\n## ", 1)[0].strip().splitlines()
    assert rows[0] == "| stage | wall time | peak RSS |" and [r.split("|")[1].strip() for r in rows[2:]] == [
        "load", "extract", "edit", "evaluate"]
