"""`--biproject` with several directions: the span made orthogonal to the harmless mean at the file's layer and
position (each direction with the mean projected out, orthonormalised again), refused when that loses a
direction; the edit then leaves nothing along the biprojected span and computes what the span hooks compute;
the search's projected rank-k points are the same span."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from abliterate.arch.table import arch_for_config
from abliterate.cli.main import cli
from abliterate.io.direction_file import RankDeficientError, load_direction, normalise, project_out, save_direction
from abliterate.measure.hooks import ablate, capture_residuals
from tests.families import FAMILIES, build_model, hook_paths, save_sharded
from tests.test_rank_k import rows, span_hooks

K = 3
LAYER, POSITION = 1, -1


def _means(d: int, h: np.ndarray) -> np.ndarray:
    """A harmless-mean tensor [layers + 1, positions, d] holding h at (LAYER, POSITION), noise elsewhere."""
    means = np.random.default_rng(7).standard_normal((3, 2, d)).astype(np.float32)
    means[LAYER, POSITION] = h
    return means


def test_project_out_keeps_the_span_orthogonal_to_h_and_the_first_row_biprojected():
    q = load_rows(16)
    h = np.random.default_rng(2).standard_normal(16)
    h /= np.linalg.norm(h)
    got = project_out(q, h, "test").astype(np.float64)
    assert np.abs(got @ got.T - np.eye(K)).max() < 1e-6
    assert np.abs(got @ h).max() < 1e-6
    r0 = q[0].astype(np.float64) / np.linalg.norm(q[0])
    assert np.abs(got[0] - normalise(r0 - (r0 @ h) * h)).max() < 1e-6
    # what the span kept: every projected row lies in span(q, h)
    basis = np.linalg.qr(np.vstack([q, h]).T)[0].T
    assert np.abs(got - (got @ basis.T) @ basis).max() < 1e-6


def test_project_out_refuses_a_span_that_holds_h():
    q = load_rows(16)
    h = q[0] + 2 * q[2]
    with pytest.raises(RankDeficientError, match="rank-deficient"):
        project_out(q, h / np.linalg.norm(h), "test")


def load_rows(d: int) -> np.ndarray:
    return np.linalg.qr(rows(d).astype(np.float64).T)[0].T.astype(np.float32)


@pytest.fixture(scope="module")
def biprojected_edit(tmp_path_factory):
    family = FAMILIES["llama"]
    root = tmp_path_factory.mktemp("rank-k-biproject")
    model = build_model(family)
    original = save_sharded(model, root / "original")
    d = model.config.hidden_size
    h = np.random.default_rng(5).standard_normal(d).astype(np.float32)
    v = rows(d)
    v[1] += 3 * h  # a span with much of h in it: the biprojected one differs clearly
    save_direction(root / "dir.safetensors", v, {"model": "tiny", "rank": K, "layer": LAYER, "position": POSITION},
                   extra={"harmless_mean": _means(d, h)})
    result = CliRunner().invoke(cli, ["apply", str(original), "--direction", str(root / "dir.safetensors"),
                                      "--biproject", "--out", str(root / "edited"), "--quiet"])
    assert result.exit_code == 0, result.output
    return family, original, root / "edited", h / np.linalg.norm(h), root


def test_biprojected_rank_k_file_is_orthogonal_to_the_harmless_mean_and_recorded(biprojected_edit):
    _, _, edited, h, root = biprojected_edit
    used = load_direction(edited / "refusal_direction.safetensors")
    given = load_direction(root / "dir.safetensors")
    assert used.rank == K and used.metadata["biprojected"] == "true"
    assert np.abs(used.vectors.astype(np.float64) @ h).max() < 1e-6
    assert np.abs(given.vectors.astype(np.float64) @ h).max() > 0.1  # the file's own span holds h


def test_biprojected_rank_k_edit_leaves_nothing_along_the_span_and_equals_the_hooks(biprojected_edit):
    family, original, edited, _, _ = biprojected_edit
    q = torch.from_numpy(load_direction(edited / "refusal_direction.safetensors").vectors)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    base = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).eval()
    got_model = AutoModelForCausalLM.from_pretrained(edited, dtype=torch.float32).eval()
    streams: list[float] = []
    with torch.no_grad():
        unedited = base(ids).logits
        handles = span_hooks(base, hook_paths(family, base.config.num_hidden_layers), q)
        expected = base(ids).logits
        for handle in handles:
            handle.remove()
        with ablate(base, arch_for_config(base.config.to_dict()), load_direction(edited / "refusal_direction"
                                                                                          ".safetensors")):
            hooked = base(ids).logits
        sink = lambda _i, x: streams.append(float((x @ q.T).norm() / x.norm()))  # noqa: E731
        with capture_residuals(got_model, arch_for_config(got_model.config.to_dict()), sink):
            got = got_model(ids).logits
    assert (expected - unedited).abs().max() > 1e-3
    assert (got - expected).abs().max().item() <= 1e-4 and (hooked - expected).abs().max().item() <= 1e-4
    assert len(streams) == base.config.num_hidden_layers + 1 and max(streams) < 1e-5
    assert CliRunner().invoke(cli, ["verify", str(original), str(edited)]).exit_code == 0


def test_biproject_that_loses_a_direction_is_one_clear_error_and_writes_nothing(biprojected_edit, tmp_path):
    _, original, _, _, _ = biprojected_edit
    d = 32
    v = load_rows(d)
    save_direction(tmp_path / "d.safetensors", v, {"rank": K, "layer": LAYER, "position": POSITION},
                   extra={"harmless_mean": _means(d, v[1] - v[2])})
    result = CliRunner().invoke(cli, ["apply", str(original), "--direction", str(tmp_path / "d.safetensors"),
                                      "--biproject", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "rank-deficient" in result.output and "drop --biproject" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_search_projected_rank_k_point_removes_the_span_orthogonal_to_the_harmless_mean():
    from abliterate.edit.strengths import LAYERED, uniform
    from abliterate.search.space import CandidateSet, Point, direction_for

    g = torch.Generator().manual_seed(0)
    candidates, harmless = torch.randn(4, 2, 16, generator=g), torch.randn(4, 2, 16, generator=g)
    more = torch.randn(2, 16, generator=g)
    cands = CandidateSet(candidates, harmless, 0, 3, (2, -1), {}, "x", more)
    point = Point(2.0, -1, True, 1.0, {c: uniform(1.0) for c in LAYERED}, directions=3)
    q = direction_for(cands, point).vectors.astype(np.float64)
    h = harmless[2, 1].double().numpy() / float(harmless[2, 1].norm())
    assert q.shape == (3, 16) and np.abs(q @ h).max() < 1e-6 and np.abs(q @ q.T - np.eye(3)).max() < 1e-6
    r = candidates[2, 1].double().numpy()
    assert np.abs(q[0] - normalise(r - (r @ h) * h)).max() < 1e-6  # the rank-1 projected direction comes first
    lost = CandidateSet(candidates, harmless.clone(), 0, 3, (2, -1), {}, "x", more)
    lost.harmless_mean[2, 1] = more[0] - 0.5 * more[1] + candidates[2, 1]  # h in the span: one direction lost
    with pytest.raises(RankDeficientError):
        direction_for(lost, point)
