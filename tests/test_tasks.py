"""Benchmarks through lm-evaluation-harness: local tasks on the toy model, its `apply` edit and its adapter."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace

import pytest
from click.testing import CliRunner

from abliterate.cli.main import cli
from abliterate.demo.toy import HELPS, REFUSALS, toy_prompts
from abliterate.errors import AbliterateError
from abliterate.evaluate.tasks import TaskSettings, compare, run_tasks
from abliterate.measure.loading import LoadedModel, load_model

pytest.importorskip("lm_eval")

MC_TASK = """task: toy_reply_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "<|user|> {{{{request}}}} <|end|> <|assistant|>"
doc_to_choice: ["{help}", "{refuse}"]
doc_to_target: 0
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
GEN_TASK = """task: toy_reply_words
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "<|user|> {{{{request}}}} <|end|> <|assistant|>"
doc_to_target: "Sure"
generation_kwargs:
  until: ["<|end|>", "!", "."]
  max_gen_toks: 8
  do_sample: false
filter_list:
  - name: first-word
    filter:
      - function: regex
        regex_pattern: "(\\\\w+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    """Two local tasks on held-out toy requests (half harmful): pick the helpful reply, start the reply with Sure."""
    folder = tmp_path_factory.mktemp("tasks")
    prompts = toy_prompts()
    docs = [{"request": r} for r in prompts.harmful_test[:8] + prompts.harmless_test[:8]]
    data = folder / "requests.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "choice.yaml").write_text(MC_TASK.format(data=data, help=HELPS[0], refuse=REFUSALS[0]))
    (folder / "words.yaml").write_text(GEN_TASK.format(data=data))
    return folder


@pytest.fixture(scope="module")
def edited(refusing_model, tmp_path_factory):
    """The toy model's direction removed by `apply`, and the same edit as an adapter."""
    from abliterate.measure.extract import PromptSets, extract, save_extraction

    root = tmp_path_factory.mktemp("edited")
    prompts = toy_prompts()
    lm = load_model(refusing_model, device="cpu")
    sets = PromptSets(prompts.harmful_train, prompts.harmless_train, prompts.harmful_train[:16],
                      prompts.harmless_train[:16])
    save_extraction(extract(lm, sets, quiet=True), root / "direction.safetensors")
    runner = CliRunner()
    for name, extra in (("model", []), ("adapter", ["--adapter"])):
        result = runner.invoke(cli, ["apply", str(refusing_model), "--direction", str(root / "direction.safetensors"),
                                     "--out", str(root / name), "-q", *extra])
        assert result.exit_code == 0, result.output
    return root


def test_adapter_scores_equal_the_edited_models_and_the_edit_moves_them(refusing_model, edited, task_folder):
    from peft import PeftModel

    settings = TaskSettings(tasks=(str(task_folder),), batch_size=8)
    original = load_model(refusing_model, device="cpu")
    baseline = run_tasks(original, settings, quiet=True, keep_samples=True)
    model = run_tasks(load_model(edited / "model", device="cpu"), settings, quiet=True, keep_samples=True)
    base = load_model(refusing_model, device="cpu")
    peft_model = PeftModel.from_pretrained(base.model, str(edited / "adapter")).eval()
    adapter = run_tasks(LoadedModel(peft_model, base.tokenizer, base.arch, "adapter"), settings, quiet=True,
                        keep_samples=True)

    assert set(model.scores) == {"toy_reply_choice", "toy_reply_words"}
    assert adapter.scores == model.scores
    for task in model.scores:  # the same log-likelihoods and generations, document by document
        for a, m in zip(adapter.raw_samples[task], model.raw_samples[task], strict=True):
            if task == "toy_reply_choice":
                assert [r[0][0] for r in a["resps"]] == pytest.approx([r[0][0] for r in m["resps"]], abs=1e-4)
            else:
                assert a["resps"] == m["resps"]
    # The original refuses the 8 harmful requests and helps with the 8 others; the edit helps with all.
    assert baseline.scores["toy_reply_choice"]["acc"].value == 0.5
    assert model.scores["toy_reply_choice"]["acc"].value == 1.0
    assert baseline.scores["toy_reply_words"]["exact_match,first-word"].value == 0.5
    assert model.scores["toy_reply_words"]["exact_match,first-word"].value == 1.0

    report = compare(model, baseline, settings)
    row = next(r for r in report.rows if r.task == "toy_reply_choice")
    assert row.n == 16 and row.n_shot == 0
    assert row.difference.value == 0.5
    assert row.difference.stderr == pytest.approx(math.hypot(row.model.stderr, row.baseline.stderr))


def test_unknown_task_is_one_line_naming_the_listing(task_folder):
    from abliterate.evaluate.tasks import check_tasks

    with pytest.raises(AbliterateError, match=r"unknown task no_such_task; `lm-eval ls tasks`"):
        check_tasks(TaskSettings(tasks=(str(task_folder), "no_such_task")))


def test_missing_harness_names_the_extra(monkeypatch, refusing_model):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    result = CliRunner().invoke(cli, ["evaluate", str(refusing_model), "--tasks", "gsm8k", "-q"])
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1] == ("error: --tasks needs lm-evaluation-harness, which is not "
                                                      "installed; pip install 'abliterate[bench]'")


def test_cli_evaluate_tasks_adds_scores_with_stderr_and_difference_to_table_and_report(refusing_model, edited,
                                                                                        task_folder, tmp_path):
    args = ["evaluate", str(edited / "model"), "--baseline", str(refusing_model), "--limit", "2",
            "--max-new-tokens", "4", "--kl-tokens", "2", "--tasks", f"{task_folder / 'choice.yaml'}",
            "--tasks-limit", "12", "--out", str(tmp_path / "report.json"), "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "| task | metric | n | shots | model | baseline | difference |" in result.output
    report = json.loads((tmp_path / "report.json").read_text())
    (row,) = report["benchmarks"]["rows"]
    assert (row["task"], row["metric"], row["n"], row["n_shot"]) == ("toy_reply_choice", "acc", 12, 0)
    assert row["model"]["value"] == 1.0 and row["baseline"]["value"] == pytest.approx(4 / 12)
    assert row["difference"]["value"] == pytest.approx(8 / 12) and row["baseline"]["stderr"] > 0
    assert f"| toy_reply_choice | acc | 12 | 0 | 1.0000 ± 0.0000 | 0.3333 ± {row['baseline']['stderr']:.4f} |" in (
        result.output)
    settings = report["benchmarks"]["settings"]
    assert settings["limit"] == 12 and settings["num_fewshot"] is None and settings["chat_template"] is False
    assert settings["lm_eval"] and "--tasks-limit 12" in report["command"]


def test_whole_job_tasks_put_the_before_after_scores_on_the_card(refusing_model, edited, task_folder, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "toy-abliterated"
    args = [str(refusing_model), "--out", str(out), "--direction", str(edited / "direction.safetensors"),
            "--tasks", str(task_folder / "choice.yaml"), "--tasks-limit", "12", "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    card = ModelCard.load(out / "README.md").text
    row = next(line for line in card.splitlines() if line.startswith("| toy_reply_choice acc"))
    assert "(n=12, 0-shot, lm-eval) | 1.0000 ± 0.0000 (baseline 0.3333 ± " in row and "difference +0.6667 ± " in row
    assert f"--tasks {task_folder / 'choice.yaml'} --tasks-limit 12" in card


def test_tasks_chat_template_renders_with_the_given_template_on_a_tokenizer_without_one(refusing_model,
                                                                                         task_folder):
    from abliterate.demo.toy import CHAT_TEMPLATE

    settings = TaskSettings(tasks=(str(task_folder / "choice.yaml"),), limit=4, chat_template=True)
    own = run_tasks(load_model(refusing_model, device="cpu"), settings, quiet=True, keep_samples=True)
    bare = load_model(refusing_model, device="cpu")
    bare.tokenizer.chat_template = None
    with pytest.raises(AbliterateError, match="no chat template; pass --template FILE"):
        run_tasks(bare, settings, quiet=True)
    given = run_tasks(bare, replace(settings, template=CHAT_TEMPLATE), quiet=True, keep_samples=True)

    prompts = [s["arguments"] for s in given.raw_samples["toy_reply_choice"]]
    assert prompts == [s["arguments"] for s in own.raw_samples["toy_reply_choice"]]
    assert "<|assistant|>" in str(prompts[0]) and given.scores == own.scores
    assert bare.tokenizer.chat_template is None  # lent for the run only
    assert replace(settings, template=CHAT_TEMPLATE).to_dict()["template"].startswith("sha256:")
