"""`abliterate probe`: projections read at the right positions, and one-line errors for bad input.

The separation of harmful from harmless prompts by the extracted refusal direction is proven in
tests/test_extract.py, where the extraction already runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from abliterate.demo.toy import toy_prompts
from abliterate.errors import AbliterateError
from abliterate.io.direction_file import save_direction
from abliterate.measure.activations import format_prompts, mean_residuals
from abliterate.measure.loading import load_model
from abliterate.measure.probe import load_probe_direction, project, separation
from tests.test_apply import run_cli


@pytest.fixture(scope="module")
def toy(refusing_model):
    return load_model(refusing_model, dtype="float32", device="cpu")


def test_projections_are_the_mean_residuals_at_the_instruction_end_and_post_instruction_tokens(toy, tmp_path):
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((toy.num_layers + 1, toy.hidden_size)).astype(np.float32)
    rows[0] = 0  # a zero row (as a vector measured at the same tokens has) projects to 0, not NaN
    save_direction(tmp_path / "v.safetensors", rows, {"model": "toy"})
    units = load_probe_direction(tmp_path / "v.safetensors", hidden_size=toy.hidden_size, num_layers=toy.num_layers)
    prompts = toy_prompts().harmful_test[:10]
    result = project(toy, prompts, units, quiet=True, batch_size=3)
    k = result.values.shape[2] - 1
    assert k == 2  # the toy template adds "<|end|> <|assistant|>" after the message
    means = mean_residuals(toy, format_prompts(toy, prompts), k + 1, batch_size=4)  # [layers + 1, k + 1, d]
    expected = torch.einsum("lpd,ld->lp", means, torch.from_numpy(units)).numpy()
    np.testing.assert_allclose(result.mean, expected, atol=1e-5)
    assert (result.values[:, 0] == 0).all()
    assert result.values[:, 1:].std() > 0


def test_separation_is_the_share_of_pairs_in_order():
    assert separation(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert separation(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    assert separation(np.array([1.0, 3.0]), np.array([2.0, 2.0])) == 0.5


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "harmful.txt"
    path.write_text("\n".join(toy_prompts().harmful_test[:4]))
    return path


def test_probe_refuses_a_direction_of_another_model_in_one_line(refusing_model, tmp_path, prompt_file):
    save_direction(tmp_path / "other.safetensors", np.ones(48, dtype=np.float32), {"model": "some/other-model"})
    code, out = run_cli("probe", str(refusing_model), "--direction", str(tmp_path / "other.safetensors"),
                        "--prompts", str(prompt_file), "--device", "cpu")
    assert code == 2
    assert out.strip().splitlines() == [out.strip()]
    assert "shape [48]" in out and "[32]" in out and "some/other-model" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--prompts", "missing.txt"], "--prompts missing.txt"),
    (["--prompts", "builtin:nothing"], "unknown built-in prompt set"),
    (["--prompts", "builtin:harmful", "--prompts", "builtin:harmful"], "same set"),
    (["--prompts", "builtin:harmful", "--class", "roleplay"], "no class 'roleplay'"),
    (["--prompts", "builtin:harmful", "--limit", "-1"], "--limit -1"),
])
def test_probe_bad_input_is_one_line_naming_the_problem(refusing_model, tmp_path, args, message):
    save_direction(tmp_path / "d.safetensors", np.ones(32, dtype=np.float32), {"model": "toy"})
    code, out = run_cli("probe", str(refusing_model), "--direction", str(tmp_path / "d.safetensors"), *args,
                        "--device", "cpu")
    assert code == 2, out
    assert out.startswith("error: ") and message in out and "Traceback" not in out


def test_a_zero_direction_is_refused(toy, tmp_path):
    save_direction(tmp_path / "z.safetensors", np.zeros(32, dtype=np.float32), {})
    with pytest.raises(AbliterateError, match="zero everywhere"):
        load_probe_direction(tmp_path / "z.safetensors", hidden_size=32, num_layers=toy.num_layers)


def test_probe_help_explains_every_option():
    code, out = run_cli("probe", "--help")
    assert code == 0
    for option in ("--direction", "--class", "--prompts", "--limit", "--plot", "--out", "--batch-size"):
        assert option in out
    assert "instruction's last token" in out
