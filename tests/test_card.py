"""The model card parses as a Hub card with the required metadata; SHA256SUMS catches a bad download."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from abliterate.publish.card import CardInfo, DirectionSummary, EditSummary, EvalSummary, base_license, write_card
from tests.test_apply import run_cli


def make_folder(tmp_path, adapter: bool):
    folder = tmp_path / ("adapter" if adapter else "weights")
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    (folder / "config.json").write_text("{}")
    info = CardInfo(
        base_model="someone/tiny-chat", adapter=adapter, license="apache-2.0",
        direction=DirectionSummary("someone/tiny-chat", layer="3", position="-1"),
        edit=EditSummary(scale=1.0, layers=None, components=("embed", "attn", "mlp"), edited=9,
                         untied="lm_head.weight", notes=("a note",)),
        evaluation=EvalSummary(rows=(("refusal rate", "2/32 (6%)"),),
                               command="abliterate evaluate out --baseline someone/tiny-chat"),
        regenerate="abliterate someone/tiny-chat --out out", recipe_name="llama",
    )
    write_card(folder, info)
    return folder


def test_card_has_the_hub_metadata_and_lists_every_file(tmp_path):
    for adapter in (False, True):
        folder = make_folder(tmp_path, adapter)
        card = ModelCard.load(folder / "README.md")
        data = card.data.to_dict()
        assert data["base_model"] == "someone/tiny-chat"
        assert data["base_model_relation"] == ("adapter" if adapter else "finetune")
        assert data["library_name"] == ("peft" if adapter else "transformers")
        assert "abliterated" in data["tags"] and data["license"] == "apache-2.0"
        for name in ("model.safetensors", "config.json"):
            assert name in card.text
        assert "abliterate someone/tiny-chat --out out" in card.text
        assert "abliterate evaluate out" in card.text


def test_verify_with_one_folder_checks_the_download_against_its_manifest(tmp_path):
    folder = make_folder(tmp_path, False)
    code, out = run_cli("verify", str(folder))
    assert code == 0 and "match" in out
    (folder / "model.safetensors").write_bytes(b"\1" * 64)
    code, out = run_cli("verify", str(folder))
    assert code == 1 and "model.safetensors does not match" in out


def test_base_license_is_read_from_the_base_card():
    assert base_license("---\nlicense: llama3\ntags: [x]\n---\n# card") == "llama3"
    assert base_license("# no header") is None


def test_card_says_which_selection_filter_was_relaxed_only_when_one_was(tmp_path):
    relaxed = "induction filter relaxed: adding no candidate raised the refusal log-odds above 0.0 (highest -1.12)"
    for selection, shown in (("every filter held", False), (relaxed, True)):
        folder = tmp_path / str(shown)
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        write_card(folder, CardInfo(base_model="someone/tiny-chat", adapter=False, license=None,
                                    direction=DirectionSummary.of(
                                        {"layer": "3", "position": "-1", "selection": selection}, "someone/tiny-chat"),
                                    edit=EditSummary(1.0, None, ("attn",), 1), evaluation=None,
                                    regenerate="abliterate x", recipe_name="llama"))
        text = (folder / "README.md").read_text()
        assert (f"| selection | {relaxed} |" in text) is shown and ("every filter held" in text) is False


def test_card_shows_the_search_front_with_the_chosen_trial_and_the_limits_that_chose_it():
    from abliterate.evaluate.intervals import interval_text
    from abliterate.publish.card import FrontRow, SearchSummary, render_card

    front = (FrontRow(3, "1/8", "0/4", 0.012, "layer 2"), FrontRow(5, "0/8", "1/4", 0.2, "layer 3"))
    info = CardInfo(base_model="someone/tiny-chat", adapter=False, license=None,
                    direction=DirectionSummary("someone/tiny-chat"), edit=EditSummary(1.0, None, ("attn",), 1),
                    evaluation=None, regenerate="abliterate x",
                    search=SearchSummary(6, 1.5, 3, front, max_kl=0.05, max_refusals=None, recipe_file="r.yaml"))
    text = render_card(info)
    assert f"| 3 **(chosen)** | 1/8 | {interval_text(1, 8)} | 0/4 | 0.012 | layer 2 |" in text
    assert f"| 5 | 0/8 | {interval_text(0, 8)} | 1/4 | 0.2 | layer 3 |" in text and "0.0-32.4 %" in text
    assert "Chosen by: max-kl 0.05." in text and "--recipe r.yaml" in text
    assert "layer ? , " not in text and "layer ?, post-instruction position ?" in text


def test_card_states_a_norm_preserving_edit_and_its_dora_adapter(tmp_path):
    from dataclasses import replace

    from abliterate.publish.card import render_card

    info = CardInfo(
        base_model="someone/tiny-chat", adapter=True, license=None,
        direction=DirectionSummary("someone/tiny-chat", layer="3", position="-1"),
        edit=EditSummary(scale=1.0, layers=None, components=("attn", "mlp"), edited=8, norm_preserve=True),
        evaluation=None, regenerate="abliterate someone/tiny-chat --adapter --out out")
    card = render_card(info)
    assert "rank-1 DoRA adapter (norm-preserving)" in card and "W' = (I - 1.0 r r^T) W D" in card
    plain = render_card(replace(info, edit=replace(info.edit, norm_preserve=False)))
    assert "LoRA adapter" in plain and "W' = W - 1.0 r (r^T W)" in plain and "norm-preserving" not in plain


def _searched(tmp_path, name: str) -> tuple:
    from abliterate.publish.card import FrontRow, SearchSummary
    from abliterate.publish.front_plot import TrialPoint

    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    front = (FrontRow(3, "1/8", None, 0.012, "layer 2"), FrontRow(5, "0/8", None, 0.2, "layer 3"))
    seen = (TrialPoint(0, None, 1.5, 0.3), TrialPoint(1, 4, 0.2, 0.02), TrialPoint(3, 1, -1.0, 0.012),
            TrialPoint(5, 0, -2.0, 0.2), TrialPoint(6, 2, -0.5, 0.5))
    info = CardInfo(base_model="someone/tiny-chat", adapter=False, license=None,
                    direction=DirectionSummary("someone/tiny-chat"), edit=EditSummary(1.0, None, ("attn",), 1),
                    evaluation=None, regenerate="abliterate x",
                    search=SearchSummary(7, 1.5, 3, front, max_kl=0.05, max_refusals=None, recipe_file="r.yaml",
                                         trials_seen=seen, prompts=8))
    return folder, info


def test_card_links_a_decodable_picture_of_the_front_listed_in_its_checksums(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    folder, info = _searched(tmp_path, "with")
    write_card(folder, info)
    card = (folder / "README.md").read_text()
    assert "](search_front.png)" in card and "  search_front.png" in (folder / "SHA256SUMS").read_text()
    pixels = image.imread(folder / "search_front.png")
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 600  # two panels side by side
    assert pixels[..., :3].std() > 0.05  # something is drawn
    assert not list(folder.glob(".*.tmp.png"))


def test_without_matplotlib_the_card_says_so_in_one_line_and_draws_nothing(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    folder, info = _searched(tmp_path, "without")
    write_card(folder, info)
    card = (folder / "README.md").read_text()
    assert not (folder / "search_front.png").exists() and "search_front.png" not in card
    assert card.count("matplotlib is not installed") == 1 and "abliterate[plot]" in card
