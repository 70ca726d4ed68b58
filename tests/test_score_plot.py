"""`extract --plot`: every candidate's score as a layer x position heat map, the finalists and the choice marked."""

from __future__ import annotations

import math

import pytest
import torch

from abliterate.measure.extract import Extraction, save_extraction
from abliterate.measure.score_plot import score_grid
from abliterate.measure.selection import CandidateScore
from tests.test_apply import run_cli

LAYERS, POSITIONS, HIDDEN = 6, 3, 8


def scores() -> list[CandidateScore]:
    """Screened candidates at every layer but the last two (pruned), three scored in full, one of them rejected."""
    out = []
    for layer in range(LAYERS - 1):
        for position in range(-POSITIONS, 0):
            full = (layer, position) in ((2, -1), (3, -1), (3, -2))
            out.append(CandidateScore(layer, position, -0.5 * layer + 0.1 * position, 1.0 if full else None,
                                      0.02 if full else None, "KL above 0.1" if (layer, position) == (3, -2) else None,
                                      8))
    return out


def saved(tmp_path) -> object:
    """An extraction file as `extract` writes it, from made-up scores (no model): `--reselect` reads it."""
    found = scores()
    best = next(s for s in found if (s.layer, s.position) == (3, -1))
    candidates = torch.randn(LAYERS + 1, POSITIONS, HIDDEN, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "direction.safetensors"
    save_extraction(Extraction(candidates[3, -1], best, found, candidates, "", 2.0, model="toy", num_layers=LAYERS),
                    path)
    return path


def test_the_grid_places_each_score_at_its_layer_and_position_and_leaves_unscreened_cells_blank():
    layers, positions, grid = score_grid(scores())
    assert layers == list(range(LAYERS - 1)) and positions == [-3, -2, -1]
    assert grid[2][2] == pytest.approx(-1.1) and grid[0][0] == pytest.approx(-0.3)
    partial = [s for s in scores() if not (s.layer == 1 and s.position == -2)]
    assert math.isnan(score_grid(partial)[2][1][1])


def test_extract_plot_writes_a_decodable_heat_map_and_says_so(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    plot = tmp_path / "scores.png"
    code, output = run_cli("extract", "--reselect", str(saved(tmp_path)), "--out", str(tmp_path / "again.st"),
                           "--plot", str(plot))
    assert code == 0, output
    assert f"wrote {plot}" in output and not list(tmp_path.glob(".*.tmp.png"))
    pixels = image.imread(plot)
    assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100 and pixels[..., :3].std() > 0.05


def test_extract_plot_without_matplotlib_is_a_note_not_a_failure(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    plot = tmp_path / "scores.png"
    code, output = run_cli("extract", "--reselect", str(saved(tmp_path)), "--out", str(tmp_path / "again.st"),
                           "--plot", str(plot))
    assert code == 0, output
    assert "matplotlib is not installed; no plot written" in output and not plot.exists()
    assert (tmp_path / "again.st").is_file()


def test_plot_with_kind_harmfulness_is_refused(tmp_path):
    code, output = run_cli("extract", "some/model", "--kind", "harmfulness", "--out", str(tmp_path / "h.st"),
                           "--plot", str(tmp_path / "p.png"))
    assert code != 0 and "--kind harmfulness has no candidates" in output
