"""Several directions (rank k): the file format, the span removal formula, and edited models that keep nothing
along the span and compute what the ablation hooks compute."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM

from abliterate.arch.table import arch_for_config
from abliterate.cli.main import cli
from abliterate.edit.projection import iter_edited_chunks, project
from abliterate.errors import AbliterateError
from abliterate.io.direction_file import load_direction, normalise, save_direction
from abliterate.io.safetensors_format import read_header
from abliterate.measure.hooks import ablate, capture_residuals
from tests.families import FAMILIES, build_model, hook_paths, save_sharded

K = 3


def span_hooks(model: torch.nn.Module, paths: list[str], q: torch.Tensor) -> list:
    """Reference: remove the span of q's orthonormal rows from each named module's output."""
    def remove(_module, _inputs, output):
        if isinstance(output, tuple):
            return (remove(None, None, output[0]), *output[1:])
        return output - (output @ q.T) @ q

    modules = dict(model.named_modules())
    return [modules[p].register_forward_hook(remove) for p in paths]


def rows(d: int, k: int = K, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((k, d)).astype(np.float32)


# --- the file -----------------------------------------------------------------------------------------------

def test_rank_k_file_loads_orthonormal_rows_with_the_first_direction_unchanged(tmp_path):
    v = rows(16)
    save_direction(tmp_path / "d.safetensors", v, {"rank": K})
    direction = load_direction(tmp_path / "d.safetensors", hidden_size=16, num_layers=4)
    q = direction.vectors.astype(np.float64)
    assert direction.rank == K and not direction.per_layer and q.shape == (K, 16)
    assert np.abs(q @ q.T - np.eye(K)).max() < 1e-6
    assert np.array_equal(direction.vectors[0], normalise(v[0]))
    # same span: each original row is its own projection onto the rows
    assert np.abs(v - (v @ q.T) @ q).max() < 1e-5 * np.abs(v).max()
    assert np.array_equal(direction.leading(1).vectors, normalise(v[0])) and direction.leading(1).rank == 1


def test_per_layer_rank_k_file_gives_each_layer_its_own_rows(tmp_path):
    v = np.random.default_rng(0).standard_normal((5, K, 8)).astype(np.float32)
    save_direction(tmp_path / "d.safetensors", v, {"rank": K})
    direction = load_direction(tmp_path / "d.safetensors", hidden_size=8, num_layers=4)
    assert direction.per_layer and direction.for_layer(None).shape == (K, 8)
    assert np.array_equal(direction.for_layer(2)[0], normalise(v[3, 0]))
    with pytest.raises(AbliterateError, match="needs 4"):
        load_direction(tmp_path / "d.safetensors", hidden_size=8, num_layers=3)


def test_rank_marker_tells_k_directions_from_a_per_layer_direction(tmp_path):
    v = rows(8, k=4)
    save_direction(tmp_path / "plain.safetensors", v, {})
    assert load_direction(tmp_path / "plain.safetensors", num_layers=3).per_layer  # [layers + 1, d], rank 1
    save_direction(tmp_path / "k.safetensors", v, {"rank": 4})
    assert load_direction(tmp_path / "k.safetensors", num_layers=3).rank == 4
    save_direction(tmp_path / "one.safetensors", v[:1], {"rank": 1})
    one = load_direction(tmp_path / "one.safetensors")
    assert one.rank == 1 and np.array_equal(one.vectors, normalise(v[0]))


@pytest.mark.parametrize("shape, meta, message", [
    ((2, 3, 8), {}, "no `rank` metadata"),
    ((3, 8), {"rank": "2"}, "rank = '2'"),
    ((8,), {"rank": "1"}, "rank = '1'"),
    ((3, 8), {"rank": "x"}, "rank = 'x'"),
])
def test_inconsistent_rank_metadata_is_one_clear_error(tmp_path, shape, meta, message):
    save_file({"direction": np.ones(shape, np.float32)}, str(tmp_path / "d.safetensors"), metadata=meta)
    with pytest.raises(AbliterateError, match=message):
        load_direction(tmp_path / "d.safetensors")


def test_linearly_dependent_directions_are_refused(tmp_path):
    v = rows(8)
    v[2] = 2 * v[0] - v[1]
    save_direction(tmp_path / "d.safetensors", v, {"rank": K})
    with pytest.raises(AbliterateError, match=r"direction 2 lies .* rank-deficient"):
        load_direction(tmp_path / "d.safetensors")


# --- the formula --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("axis", [-2, -1])
@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_span_projection_equals_its_formula(axis, dtype, tmp_path):
    d, n, s = 16, 24, 0.7
    q = torch.linalg.qr(torch.randn(d, K, dtype=torch.float64))[0].T.float().numpy()
    w = torch.randn(3, d, n) if axis == -2 else torch.randn(n, d)
    w = w.to(torch.bfloat16).float() if dtype == "BF16" else w
    stored = w.to(torch.bfloat16).view(torch.uint16).numpy() if dtype == "BF16" else w.numpy()
    got = project(stored, q, axis, s, dtype)
    got = torch.from_numpy(got.view(np.int16)).view(torch.bfloat16).float() if dtype == "BF16" else got
    w64, q64 = w.double().numpy(), q.astype(np.float64)
    want = w64 - s * (q64.T @ (q64 @ w64)) if axis == -2 else w64 - s * (w64 @ q64.T) @ q64
    tol = 2.0**-7 if dtype == "BF16" else 1e-5
    assert np.abs(np.asarray(got, np.float64) - want).max() <= tol * np.abs(want).max()
    # streamed in small chunks (a [d, n] matrix in row blocks when it exceeds the budget): the same formula
    path = tmp_path / "w.safetensors"
    save_file({"w": stored}, str(path)) if dtype != "BF16" else save_file({"w": stored.view(np.float16)}, str(path))
    info = read_header(path).tensors[0]
    if dtype == "BF16":
        info = type(info)(info.name, "BF16", info.shape, info.start, info.end)
    with open(path, "rb") as f:
        parts = [v.copy() for _, v, _ in iter_edited_chunks(f.fileno(), info, q, axis, s, 4 * n * 2)]
    streamed = np.concatenate([p.reshape(-1) for p in parts]).reshape(stored.shape)
    if dtype == "BF16":
        streamed = torch.from_numpy(streamed.view(np.int16)).view(torch.bfloat16).float().numpy()
    assert np.abs(np.asarray(streamed, np.float64) - want).max() <= tol * np.abs(want).max()


# --- edited models ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["llama", "gpt2", "mixtral", "gpt_oss"])
def rank_k_edit(request, tmp_path_factory):
    family = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(f"rank-k-{request.param}")
    model = build_model(family)
    original = save_sharded(model, root / "original")
    (original / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    d = model.config.get_text_config().hidden_size
    save_direction(root / "dir.safetensors", rows(d), {"model": "tiny", "rank": K})
    for out, extra in (("edited", ()), ("adapter", ("--adapter",))):
        result = CliRunner().invoke(cli, ["apply", str(original), "--direction", str(root / "dir.safetensors"),
                                          "--out", str(root / out), "--quiet", *extra])
        assert result.exit_code == 0, result.output
    q = torch.from_numpy(load_direction(root / "dir.safetensors").vectors)
    return family, original, root / "edited", q


def test_rank_k_edit_leaves_nothing_along_the_span_in_any_residual_stream(rank_k_edit):
    _, original, edited, q = rank_k_edit
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(2))
    before: dict[int, list[float]] = {}
    streams: dict[int, list[float]] = {}  # residual stream -> |Q h| / |h| per forward
    for folder, out in ((original, before), (edited, streams)):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

        def sink(i: int, h: torch.Tensor, out: dict = out) -> None:
            out.setdefault(i, []).append(float((h @ q.T).norm() / h.norm()))

        with torch.no_grad(), capture_residuals(model, arch_for_config(model.config.to_dict()), sink):
            model(ids)
    assert min(max(v) for v in before.values()) > 1e-2, "the span should be present before the edit"
    assert len(streams) == model.config.get_text_config().num_hidden_layers + 1
    assert max(max(v) for v in streams.values()) < 1e-5


def test_rank_k_edited_logits_equal_span_ablation_hooks(rank_k_edit):
    family, original, edited, q = rank_k_edit
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    base = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).eval()
    num_layers = base.config.get_text_config().num_hidden_layers
    with torch.no_grad():
        unedited = base(ids).logits
        handles = span_hooks(base, hook_paths(family, num_layers), q)
        expected = base(ids).logits
        for h in handles:
            h.remove()
        kept = load_direction(edited / "refusal_direction.safetensors")
        with ablate(base, arch_for_config(base.config.to_dict()), kept):
            hooked = base(ids).logits
        got = AutoModelForCausalLM.from_pretrained(edited, dtype=torch.float32).eval()(ids).logits
    assert (expected - unedited).abs().max() > 1e-3
    assert (got - expected).abs().max().item() <= 1e-4
    assert (hooked - expected).abs().max().item() <= 1e-4


def test_verify_accepts_a_rank_k_edit_and_catches_a_rank_1_one(rank_k_edit, tmp_path):
    _, original, edited, q = rank_k_edit
    result = CliRunner().invoke(cli, ["verify", str(original), str(edited)])
    assert result.exit_code == 0, result.output
    # the same folder checked against only the first direction: what was removed is not that edit
    save_direction(tmp_path / "first.safetensors", q[0], {})
    result = CliRunner().invoke(cli, ["verify", str(original), str(edited), "--direction",
                                      str(tmp_path / "first.safetensors")])
    # a reported violation (verify exits 1 on one, as its --help says), not a crash: every edited tensor named
    lines = result.output.splitlines()
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    failed = [line for line in lines if line.startswith("FAIL ")]
    assert failed and all("differs from the recomputed projection" in line for line in failed), result.output
    assert lines[-1].endswith(f"{len(failed)} problem(s)") and f"{len(failed)} edited" in lines[-1], result.output


def test_rank_k_adapter_is_a_rank_k_lora_computing_what_the_edited_checkpoint_computes(rank_k_edit):
    from peft import PeftModel

    _, original, edited, _ = rank_k_edit
    adapter = edited.parent / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == K
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).eval()
        unedited = base(ids).logits
        got = PeftModel.from_pretrained(base, adapter).eval()(ids).logits
        expected = AutoModelForCausalLM.from_pretrained(edited, dtype=torch.float32).eval()(ids).logits
    assert (expected - unedited).abs().max() > 1e-3
    assert (got - expected).abs().max().item() <= 1e-4


def test_merging_the_rank_k_adapter_writes_what_apply_writes_byte_for_byte(rank_k_edit, tmp_path):
    from tests.test_merge import same_files

    _, original, edited, _ = rank_k_edit
    result = CliRunner().invoke(cli, ["merge", str(original), str(edited.parent / "adapter"), "--out",
                                      str(tmp_path / "merged"), "-q"])
    assert result.exit_code == 0, result.output
    assert same_files(edited, tmp_path / "merged") == []


def test_readers_of_one_direction_per_stream_refuse_a_rank_k_file(tmp_path):
    from abliterate.gguf.control_vector import read_vectors
    from abliterate.measure.probe import load_probe_direction
    from abliterate.steer.steering import load_vectors

    path = tmp_path / "k.safetensors"
    save_direction(path, rows(8, k=4), {"rank": 4})  # [4, d]: would pass for [layers + 1, d] with 3 layers
    for read in (lambda: load_probe_direction(path, hidden_size=8, num_layers=3), lambda: read_vectors(path),
                 lambda: load_vectors(path, hidden_size=8, num_layers=3)):
        with pytest.raises(AbliterateError, match="holds 4 directions"):
            read()
