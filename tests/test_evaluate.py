"""`abliterate evaluate` measures what abliteration changes: refusals drop, KL and NLL move, and only then."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

import abliterate.evaluate.evaluation as ev
from abliterate.cli.main import cli
from abliterate.demo.toy import CHAT_TEMPLATE, toy_prompts
from abliterate.evaluate.evaluation import evaluate, select
from abliterate.evaluate.judge import judge_refusals
from abliterate.evaluate.records import EvalSettings
from abliterate.measure.hooks import ablate
from abliterate.measure.loading import LoadedModel, load_model


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    prompts = toy_prompts()
    (folder / "harmful.txt").write_text("\n".join(prompts.harmful_test))
    (folder / "harmless.txt").write_text("\n".join(prompts.harmless_test))
    return folder


@pytest.fixture(scope="module")
def toy_pair(refusing_model):
    """The toy model loaded twice: a model and a separate baseline with the same weights."""
    return load_model(refusing_model, device="cpu"), load_model(refusing_model, device="cpu")


def quick(prompt_files, **kw) -> EvalSettings:
    files = {"harmful": str(prompt_files / "harmful.txt"), "harmless": str(prompt_files / "harmless.txt")}
    return EvalSettings(**{"limit": 24, "max_new_tokens": 12, "kl_tokens": 8, **files, **kw})


def test_cli_abliterated_checkpoint_refuses_far_less_than_the_original(refusing_model, prompt_files, tmp_path):
    from abliterate.measure.extract import PromptSets, extract, save_extraction

    prompts = toy_prompts()
    lm = load_model(refusing_model, device="cpu")
    sets = PromptSets(prompts.harmful_train, prompts.harmless_train, prompts.harmful_train[:16],
                      prompts.harmless_train[:16])
    save_extraction(extract(lm, sets, quiet=True), tmp_path / "direction.safetensors")
    runner = CliRunner()
    applied = runner.invoke(cli, ["apply", str(refusing_model), "--direction", str(tmp_path / "direction.safetensors"),
                                  "--out", str(tmp_path / "abliterated"), "-q"])
    assert applied.exit_code == 0, applied.output
    args = ["evaluate", str(tmp_path / "abliterated"), "--baseline", str(refusing_model), "--harmful",
            str(prompt_files / "harmful.txt"), "--harmless", str(prompt_files / "harmless.txt"), "--limit", "40",
            "--max-new-tokens", "16", "--out", str(tmp_path / "report.json"), "-q"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["baseline_refusal_rate"] >= 0.9
    assert report["refusal_rate"] <= 0.1
    assert report["counts"]["harmful_prompts"] == 40 and report["counts"]["overrefusal_prompts"] == 40
    assert report["overrefusal_rate"] is not None and report["baseline_overrefusal_rate"] is not None
    assert 0 < report["kl_first_token"] < 0.1 and report["kl_continuation"] > 0
    assert report["nll"] != report["baseline_nll"]
    refused = [p for p in report["baseline_per_prompt"] if p["refused"]]
    assert refused and all(p["marker"] and p["marker"] in p["reply"].lower().replace(" ,", ",") for p in refused)
    assert report["settings"]["max_new_tokens"] == 16 and report["settings"]["decoding"] == "greedy"
    assert report["command"].startswith("abliterate evaluate ") and not (tmp_path / ".report.json.partial").exists()
    assert "| refusal rate, held-out harmful prompts (n=40, markers) |" in result.output
    assert "| metric | model | baseline |" in result.output


def test_kl_of_a_model_against_itself_is_zero_and_nll_equal(toy_pair, prompt_files):
    lm, baseline = toy_pair
    report = evaluate(lm, baseline, quick(prompt_files), quiet=True)
    assert report.kl_first_token == 0.0 and report.kl_continuation == 0.0
    assert report.nll == report.baseline_nll
    assert report.refusal_rate == report.baseline_refusal_rate >= 0.9
    assert report.counts["kl_tokens"] > report.counts["kl_prompts"] == 24


def test_kl_grows_with_the_strength_of_an_ablated_random_direction(toy_pair, prompt_files):
    lm, baseline = toy_pair
    settings = quick(prompt_files, limit=16)
    direction = 100 * torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(0))
    kls = []
    for strength in (0.5, 1.0, 4.0):
        with ablate(lm.model, lm.arch, direction, strength=strength):
            kls.append(ev.kl_to_baseline(lm, baseline, toy_prompts().harmless_test[:16], settings, quiet=True))
    assert 0 < kls[0].first_token < kls[1].first_token < kls[2].first_token
    assert 0 < kls[0].continuation < kls[1].continuation < kls[2].continuation
    assert kls[2].first_token > 0.1


def test_without_baseline_the_table_has_no_kl_and_no_baseline_column(toy_pair, prompt_files, tmp_path):
    lm, _ = toy_pair
    report = evaluate(lm, None, quick(prompt_files, limit=8), quiet=True)
    assert report.kl_first_token is None and report.baseline_nll is None
    table = report.table()
    assert table.splitlines()[0] == "| metric | model |" and "KL" not in table
    assert report.command.startswith(f"abliterate evaluate {lm.name} --limit 8 ")
    saved = json.loads(report.save_json(tmp_path / "r.json").read_text())
    assert saved["refusal_rate"] == report.refusal_rate and len(saved["per_prompt"]) == 16


def test_limit_takes_prompts_spread_over_the_whole_set():
    prompts = [f"p{i}" for i in range(100)]
    assert select(prompts, 4) == ["p0", "p25", "p50", "p75"]
    assert select(prompts, None) == prompts and select(prompts, 500) == prompts


class KeywordJudge(torch.nn.Module):
    """Stands in for a judge model: answers 'yes' exactly when the question contains a keyword token."""

    def __init__(self, vocab_size: int, keyword: int, yes: int, no: int):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(get_text_config=lambda: SimpleNamespace(vocab_size=vocab_size))
        self.keyword, self.yes, self.no = keyword, yes, no

    def forward(self, input_ids, attention_mask, position_ids, use_cache, logits_to_keep):
        logits = torch.zeros(input_ids.shape[0], 1, self.config.get_text_config().vocab_size)
        has = (input_ids == self.keyword).any(-1)
        logits[has, 0, self.yes] = 5.0
        logits[~has, 0, self.no] = 5.0
        return SimpleNamespace(logits=logits)


def keyword_judge() -> LoadedModel:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<|end|>", "yes", "no", "cannot"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<|end|>",
                                  padding_side="left")
    tok.chat_template = CHAT_TEMPLATE
    return LoadedModel(KeywordJudge(len(vocab), vocab["cannot"], vocab["yes"], vocab["no"]), tok, None, "keyword")


def test_judge_verdicts_land_on_the_replies_they_judge():
    replies = ["I cannot", "Sure , here it is in many words so this row is longer than the others", "no cannot do",
               "ok", "cannot cannot"]
    verdicts = judge_refusals(keyword_judge(), ["q"] * len(replies), replies, batch_size=2)
    assert verdicts == ["cannot" in r.split() for r in replies]


def test_judge_rates_are_reported_next_to_marker_rates(toy_pair, prompt_files, monkeypatch):
    lm, _ = toy_pair
    monkeypatch.setattr(ev, "_load_judge", lambda source, lm: keyword_judge())
    report = evaluate(lm, None, quick(prompt_files, limit=8, judge="keyword"), quiet=True)
    assert all(p.judge_refused == ("cannot" in p.reply.split()) for p in report.per_prompt)
    harmful = [p for p in report.per_prompt if p.set == "harmful"]
    assert report.judge_refusal_rate == sum(p.judge_refused for p in harmful) / len(harmful)
    assert "refusal rate (judge keyword)" in report.table()
    # asked the answer question too (the stand-in says yes to it exactly when the reply has its keyword)
    assert all(p.judge_answered == ("cannot" in p.reply.split()) for p in report.per_prompt)
    judged = report.tallies(judge=True)["model"]["harmful"]
    assert (judged.refused, judged.answered) == (sum(p.judge_refused for p in harmful), 0)
    assert "answered (judge keyword: gives what was asked) | 0.0 % (0/" in report.table()


def test_judge_without_yes_and_no_tokens_is_a_clear_error_before_generating(refusing_model):
    result = CliRunner().invoke(cli, ["evaluate", str(refusing_model), "--judge", str(refusing_model), "-q"])
    assert result.exit_code == 2
    assert "no single tokens for 'yes' and 'no'" in result.output


@pytest.mark.parametrize("args, message", [(["--limit", "-1"], "--limit"), (["--max-new-tokens", "0"],
                                           "--max-new-tokens must be at least 1"),
                                           (["--harmful", "missing.txt"], "--harmful: missing.txt")])
def test_bad_options_are_one_line_errors(refusing_model, args, message):
    result = CliRunner().invoke(cli, ["evaluate", str(refusing_model), "-q", *args])
    assert result.exit_code == 2 and message in result.output


def test_an_adapter_of_another_model_is_one_line_naming_the_mismatch(refusing_model, tmp_path):
    import numpy as np

    from abliterate.io.direction_file import save_direction
    from tests.families import FAMILIES, build_model, save_sharded

    other = save_sharded(build_model(FAMILIES["llama"]), tmp_path / "other")  # same width as the toy, other shapes
    save_direction(tmp_path / "d.safetensors", np.ones(32, dtype=np.float32), {"model": "other"})
    made = CliRunner().invoke(cli, ["apply", str(other), "--direction", str(tmp_path / "d.safetensors"), "--out",
                                    str(tmp_path / "adapter"), "--adapter", "-q"])
    assert made.exit_code == 0, made.output
    result = CliRunner().invoke(cli, ["evaluate", str(refusing_model), "--adapter", str(tmp_path / "adapter"), "-q",
                                      "--device", "cpu"])
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: cannot load the adapter") and "size mismatch" in line and "another model" in line


def test_a_pickled_adapter_is_refused_before_anything_is_loaded(tmp_path):
    """peft would load adapter_model.bin with torch.load; evaluate refuses it, as merge does."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 1}')
    (adapter / "adapter_model.bin").write_bytes(b"not loaded")
    result = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "no-model"), "--adapter", str(adapter), "-q"])
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and "adapter_model.bin" in line and "pickle" in line


def test_a_baseline_given_as_a_loader_is_released_before_the_model_loads_and_the_report_is_the_same(
        refusing_model, toy_pair, prompt_files):
    import weakref

    settings = quick(prompt_files, limit=8)
    lm, baseline = toy_pair
    direction = 100 * torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(0))
    edited = lambda model: LoadedModel(model.model, model.tokenizer, model.arch, model.name,  # noqa: E731
                                       hooks=lambda: ablate(model.model, model.arch, direction))
    both = evaluate(edited(lm), baseline, settings, quiet=True)
    alive = []

    def load_baseline():
        loaded = load_model(refusing_model, device="cpu")
        alive.append(weakref.ref(loaded.model))
        return loaded

    def load_edited():
        assert alive and alive[0]() is None  # the baseline's weights are gone before the model loads
        return edited(load_model(refusing_model, device="cpu"))

    one_at_a_time = evaluate(load_edited, load_baseline, settings, quiet=True)
    assert both.kl_first_token > 0
    assert one_at_a_time.kl_first_token == pytest.approx(both.kl_first_token, rel=1e-4, abs=1e-6)
    assert one_at_a_time.kl_continuation == pytest.approx(both.kl_continuation, rel=1e-4, abs=1e-6)
    assert (one_at_a_time.nll, one_at_a_time.baseline_nll) == pytest.approx((both.nll, both.baseline_nll), rel=1e-5)
    assert [r.reply for r in one_at_a_time.per_prompt] == [r.reply for r in both.per_prompt]
    assert [r.reply for r in one_at_a_time.baseline_per_prompt] == [r.reply for r in both.baseline_per_prompt]


def test_a_view_s_hooks_run_once_per_forward_in_the_kl(toy_pair, prompt_files):
    lm, baseline = toy_pair
    settings = quick(prompt_files, limit=8)
    direction = 100 * torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(0))
    half = lambda: ablate(lm.model, lm.arch, direction, strength=0.5)  # noqa: E731  (twice would remove 3/4)
    view = LoadedModel(lm.model, lm.tokenizer, lm.arch, lm.name, hooks=half)
    harmless = toy_prompts().harmless_test[:8]
    with half():
        outside = ev.kl_to_baseline(lm, baseline, harmless, settings, quiet=True)
    inside = ev.kl_to_baseline(view, baseline, harmless, settings, quiet=True)
    assert inside.first_token == pytest.approx(outside.first_token, rel=1e-5) and outside.first_token > 0
    assert inside.continuation == pytest.approx(outside.continuation, rel=1e-5)
