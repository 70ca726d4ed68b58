"""--device-map auto with --max-memory and --offload-folder (accelerate): a model offloaded to disk computes the
same direction, scores and evaluation as in memory, our hooks running on its offloaded modules."""

from __future__ import annotations

import pytest
import torch

from abliterate.demo.toy import toy_prompts
from abliterate.errors import AbliterateError
from abliterate.evaluate.evaluation import refusal_stats
from abliterate.evaluate.records import EvalSettings
from abliterate.measure.extract import PromptSets, extract
from abliterate.measure.loading import load_model
from abliterate.measure.placement import Placement, from_options, parse_max_memory, placed
from abliterate.options.recipe import SelectionSettings
from tests.test_apply import run_cli

pytest.importorskip("accelerate")


def _extract(model_path):
    p = toy_prompts()
    lm = load_model(model_path, device="cpu")
    prompts = PromptSets(p.harmful_train[:24], p.harmless_train[:24], p.harmful_train[-8:], p.harmless_train[-8:])
    result = extract(lm, prompts, positions=2, settings=SelectionSettings(screen_prompts=4, finalists=3), quiet=True)
    stats = refusal_stats(lm, p.harmful_test[:6], "harmful", EvalSettings(max_new_tokens=12), quiet=True)
    return lm, result, stats


def test_a_model_offloaded_to_disk_gives_the_direction_scores_and_replies_computed_in_memory(refusing_model,
                                                                                              tmp_path):
    _, in_memory, replies = _extract(refusing_model)
    with placed(Placement("auto", {"cpu": "1KB"}, tmp_path / "offload")):
        lm, offloaded, offloaded_replies = _extract(refusing_model)
    assert set(lm.model.hf_device_map.values()) == {"disk"}  # every weight read back from disk at each forward
    assert all(p.device.type == "meta" for p in lm.model.parameters())
    torch.testing.assert_close(offloaded.candidates, in_memory.candidates, rtol=1e-5, atol=1e-6)
    assert (offloaded.best.layer, offloaded.best.position) == (in_memory.best.layer, in_memory.best.position)
    for a, b in zip(offloaded.scores, in_memory.scores, strict=True):
        assert (a.layer, a.position, a.full) == (b.layer, b.position, b.full)
        for name in ("refusal_ablated", "refusal_added", "kl"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or abs(x - y) <= 1e-4 * max(1.0, abs(y)), (name, x, y)
    assert [r.reply for r in offloaded_replies.results] == [r.reply for r in replies.results]
    assert offloaded_replies.rate == replies.rate == 1.0


def test_extract_cli_with_device_map_writes_the_direction_and_bad_placements_are_one_line(refusing_model,
                                                                                        tmp_path):
    out = tmp_path / "d.safetensors"
    for name in ("harmful_train", "harmless_train"):
        (tmp_path / f"{name}.txt").write_text("\n".join(getattr(toy_prompts(), name)))
    code, output = run_cli("extract", str(refusing_model), "--out", str(out), "--device", "cpu", "--device-map",
                           "auto", "--max-memory", "cpu=1KB", "--offload-folder", str(tmp_path / "off"),
                           "--harmful", str(tmp_path / "harmful_train.txt"),
                           "--harmless", str(tmp_path / "harmless_train.txt"),
                           "--n-train", "16", "--n-val", "8", "--positions", "1", "--finalists", "2", "-q")
    assert code == 0, output
    assert out.is_file()
    code, output = run_cli("extract", str(refusing_model), "--out", str(out), "--offload-folder", str(tmp_path))
    assert code == 2 and "add --device-map auto" in output and "Traceback" not in output
    code, output = run_cli("evaluate", str(refusing_model), "--device-map", "auto", "--max-memory", "lots")
    assert code == 2 and "DEVICE=SIZE" in output and "Traceback" not in output


def test_max_memory_reads_a_budget_per_device():
    assert parse_max_memory("0=20GiB, cpu=60GiB") == {0: "20GiB", "cpu": "60GiB"}
    for bad in ("20GiB", "gpu=1GB", "cpu=much", ","):
        with pytest.raises(AbliterateError):
            parse_max_memory(bad)
    assert from_options(None, None, None) == Placement()
