"""Out of GPU memory in a batched loop halves the batch (one note) instead of a traceback, computes what the
smaller batches compute, and the size that fitted is cached per model; --batch-size auto reads as 0.
OOM is simulated on CPU: a pre-hook raises torch.cuda.OutOfMemoryError for batches above a size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from abliterate.errors import AbliterateError
from abliterate.evaluate.generation import generate
from abliterate.evaluate.records import EvalSettings
from abliterate.measure import batching
from abliterate.measure.activations import mean_residuals
from abliterate.measure.directions import activations_at
from abliterate.measure.loading import load_model
from abliterate.measure.scores import first_token_logprobs
from abliterate.measure.templates import render
from abliterate.options.values import parse_batch_size


@pytest.fixture
def small_gpu(refusing_model, monkeypatch, tmp_path):
    """The toy model whose forward runs out of memory above 3 prompts; the batch-size cache under tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    lm = load_model(refusing_model, device="cpu")
    seen: list[int] = []

    def limit(_module, args, kwargs):
        rows = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[0]
        seen.append(rows)
        if rows > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    lm.model.get_decoder().register_forward_pre_hook(limit, with_kwargs=True)
    return lm, seen


def test_out_of_memory_halves_the_batch_and_computes_what_smaller_batches_do(small_gpu, refusing_model, capfd):
    from abliterate.demo.toy import toy_prompts

    lm, seen = small_gpu
    reference = load_model(refusing_model, device="cpu")
    texts = [render(lm.tokenizer, t) for t in toy_prompts().harmful_train[:13]]
    torch.testing.assert_close(mean_residuals(lm, texts, 2, batch_size=8, quiet=True),
                               mean_residuals(reference, texts, 2, batch_size=2, quiet=True), rtol=1e-5, atol=1e-6)
    assert seen[:2] == [8, 4] and max(seen[2:]) == 2  # tries at 8 and 4 fail; then never above what fits
    torch.testing.assert_close(activations_at(lm, texts, 2, -1, batch_size=8, quiet=True),  # --directions K
                               activations_at(reference, texts, 2, -1, batch_size=2, quiet=True), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first_token_logprobs(lm, texts, 16), first_token_logprobs(reference, texts, 2),
                               rtol=1e-5, atol=1e-5)
    settings = EvalSettings(max_new_tokens=8)
    prompts = toy_prompts().harmful_test[:7]
    assert generate(lm, prompts, settings, 8, quiet=True) == generate(reference, prompts, settings, 8, quiet=True)
    err = capfd.readouterr().err
    assert "note: out of GPU memory at batch size 8; continuing at 4" in err and "Traceback" not in err
    cache = json.loads(batching.cache_file().read_text())
    assert list(cache.values()) == [3]  # the last halving: generation's batch of 7 failed, 3 fit


def test_one_prompt_that_does_not_fit_is_one_clear_error(refusing_model, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    lm = load_model(refusing_model, device="cpu")

    def never(*_args, **_kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    lm.model.get_decoder().register_forward_pre_hook(never, with_kwargs=True)
    with pytest.raises(AbliterateError, match="--device-map auto"):
        mean_residuals(lm, ["a b c", "d e"], 1, batch_size=4, quiet=True)


def test_batch_size_reads_auto_and_positive_numbers(refusing_model):
    assert parse_batch_size("auto") == parse_batch_size("0") == 0 and parse_batch_size("12") == 12
    for bad in ("-1", "many", "1.5"):
        with pytest.raises(AbliterateError):
            parse_batch_size(bad)
    lm = load_model(refusing_model, device="cpu")
    assert batching.resolve(lm, 0) == batching.CPU_DEFAULT and batching.resolve(lm, 5) == 5


def test_evaluate_with_batch_size_auto_halves_on_out_of_memory_and_reports_what_small_batches_do(small_gpu,
                                                                                                  refusing_model):
    from abliterate.demo.toy import toy_prompts
    from abliterate.evaluate.evaluation import evaluate

    lm, seen = small_gpu
    prompts = toy_prompts()
    files = tmp = batching.cache_file().parent.parent
    (tmp / "harmful.txt").write_text("\n".join(prompts.harmful_test))
    (tmp / "harmless.txt").write_text("\n".join(prompts.harmless_test))
    settings = EvalSettings(limit=6, max_new_tokens=6, kl_tokens=4, batch_size=0, nll_window=64,
                            harmful=str(files / "harmful.txt"), harmless=str(files / "harmless.txt"))
    reference = load_model(refusing_model, device="cpu")
    fitted = evaluate(lm, lm, settings, quiet=True)
    small = evaluate(reference, reference, EvalSettings(**{**settings.__dict__, "batch_size": 2}), quiet=True)
    assert max(seen) > 3 and fitted.counts == small.counts  # tried above what fits, then halved
    assert [r.reply for r in fitted.per_prompt] == [r.reply for r in small.per_prompt]
    assert fitted.nll == pytest.approx(small.nll, rel=1e-5)
    assert (fitted.kl_first_token, fitted.kl_continuation) == (0.0, 0.0)


def test_evaluate_takes_batch_size_auto_on_the_command_line(refusing_model, monkeypatch, tmp_path):
    from click.testing import CliRunner

    from abliterate.cli.main import cli

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    result = CliRunner().invoke(cli, ["evaluate", str(refusing_model), "--batch-size", "auto", "--limit", "2",
                                      "--max-new-tokens", "2", "-q", "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["batch_size"] == 0


def test_search_and_steer_measures_with_batch_size_auto_halve_on_out_of_memory_and_match_small_batches(
        small_gpu, refusing_model):
    from abliterate.demo.toy import choice_pairs, toy_prompts
    from abliterate.evaluate.objectives import ContinuationKL
    from abliterate.measure.hooks import ablate
    from abliterate.steer.steering import Pair, matching_probability

    lm, seen = small_gpu
    reference = load_model(refusing_model, device="cpu")
    prompts = toy_prompts()
    direction = 50 * torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(0))
    kls = []
    for model, size in ((lm, 0), (reference, 2)):
        kl = ContinuationKL(model, prompts.harmless_test[:7], tokens=4, batch_size=size)
        with ablate(model.model, model.arch, direction):
            kls.append(kl.measure())
    assert kls[0].continuation == pytest.approx(kls[1].continuation, rel=1e-4) and kls[0].continuation > 0
    pairs = [Pair(question=p["question"], matching=p["answer_matching_behavior"],
                  not_matching=p["answer_not_matching_behavior"])
             for p in choice_pairs(prompts.harmful_test[:4], True) + choice_pairs(prompts.harmless_test[:3], False)]
    vectors = np.zeros((lm.num_layers + 1, lm.hidden_size), dtype=np.float32)
    vectors[2] = direction.numpy() / 10
    fitted, small = (matching_probability(model, pairs, vectors, 1, 1.0, batch_size=size)
                     for model, size in ((lm, 0), (reference, 2)))
    assert fitted == pytest.approx(small, rel=1e-5) and max(seen) > 3


def test_probe_with_batch_size_auto_halves_on_out_of_memory_and_projects_what_small_batches_do(small_gpu,
                                                                                                refusing_model):
    from abliterate.demo.toy import toy_prompts
    from abliterate.measure.probe import project

    lm, seen = small_gpu
    reference = load_model(refusing_model, device="cpu")
    units = np.random.default_rng(0).standard_normal((lm.num_layers + 1, lm.hidden_size)).astype(np.float32)
    prompts = toy_prompts().harmful_test[:7]
    fitted, small = (project(model, prompts, units, batch_size=size, quiet=True)
                     for model, size in ((lm, 0), (reference, 2)))
    assert max(seen) > 3
    np.testing.assert_allclose(fitted.values, small.values, rtol=1e-5, atol=1e-5)
