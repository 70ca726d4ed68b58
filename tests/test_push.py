"""`abliterate MODEL --push`: who owns the target repo, privacy, and the token, against the local Hub.

The jobs here take a ready direction (--direction) and skip the evaluation: test_pipeline.py proves
extraction, evaluation and the downloaded weights; these tests prove the publishing rules.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import RepositoryNotFoundError

from tests.test_apply import run_cli
from tests.test_pipeline import SECRET, hub, prompt_files  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def direction(refusing_model, prompt_files, tmp_path_factory) -> Path:  # noqa: F811
    path = tmp_path_factory.mktemp("direction") / "d.safetensors"
    code, output = run_cli("extract", str(refusing_model), "--harmful", prompt_files["harmful_train"], "--harmless",
                           prompt_files["harmless_train"], "--out", str(path), "-q")
    assert code == 0, output
    return path


def push(direction: Path, out: Path, *extra: str) -> tuple[int, str]:
    return run_cli("user/toy-chat", "--direction", str(direction), "--no-eval", "-q", "--out", str(out), *extra)


def test_help_lists_the_whole_job_and_the_subcommands():
    code, output = run_cli("--help")
    assert code == 0
    assert "abliterate MODEL [--push [REPO_ID]]" in output
    listed = {line.split()[0] for line in output.split("Commands:", 1)[1].splitlines() if line.startswith("  ")}
    assert {"apply", "extract", "evaluate", "verify", "run"} <= listed  # each one a row of the commands list


def test_private_push_creates_a_repo_only_its_owner_can_see(hub, direction, tmp_path):  # noqa: F811
    code, output = push(direction, tmp_path / "out", "--push", "user/secret-model", "--private")
    assert code == 0, output
    assert HfApi().model_info("user/secret-model").private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info("user/secret-model")


def test_a_second_push_into_its_own_repo_adds_one_commit_without_force(hub, direction, tmp_path):  # noqa: F811
    assert push(direction, tmp_path / "a", "--push")[0] == 0
    code, output = push(direction, tmp_path / "b", "--push", "--recipe", str(half_scale_recipe(tmp_path)))
    assert code == 0, output
    assert len(HfApi().list_repo_commits("user/toy-chat-abliterated")) == 3  # creation + two pushes
    # the second edit is what the repo shows: the card's edit row states the recipe's half scale
    assert "| edit | W' = W - 0.5 r (r^T W) on " in ModelCard.load("user/toy-chat-abliterated").text


def half_scale_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "half.yaml"
    path.write_text("apply:\n  scale: 0.5\n")
    return path


def test_force_pushes_into_a_repo_abliterate_did_not_create(hub, direction, tmp_path):  # noqa: F811
    api = HfApi()
    api.create_repo("user/someone-else")
    api.upload_file(path_or_fileobj=b"# not ours\n", path_in_repo="README.md", repo_id="user/someone-else")
    code, output = push(direction, tmp_path / "x", "--push", "user/someone-else")
    assert code == 2 and "--force" in output
    code, output = push(direction, tmp_path / "y", "--push", "user/someone-else", "--force")
    assert code == 0, output
    assert "abliterated" in ModelCard.load("user/someone-else").data.tags


def test_a_token_the_hub_rejects_is_one_clear_error_that_never_echoes_it(hub, direction, tmp_path,  # noqa: F811
                                                                         monkeypatch, capfd):
    wrong = "hf_WRONGtokenNEVERprinted0123456789"
    monkeypatch.setenv("HF_TOKEN", wrong)
    code, output = push(direction, tmp_path / "out", "--push")
    captured = capfd.readouterr()
    assert code == 2 and "token" in output and "Traceback" not in output
    assert wrong not in output + captured.out + captured.err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_the_token_is_written_nowhere(hub, direction, tmp_path):  # noqa: F811
    """Every file under the test's folder: the output, the Hub cache, and what the local Hub stored."""
    assert push(direction, tmp_path / "out", "--push")[0] == 0
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "README.md" for p in files) and len(files) > 20
    assert not [p for p in files if SECRET.encode() in p.read_bytes()]


def test_fetch_takes_safetensors_and_metadata_never_pickles_and_code_only_when_trusted(hub, tmp_path):  # noqa: F811
    from abliterate.errors import AbliterateError
    from abliterate.io import hub as hub_side

    api = HfApi()
    files = {"config.json": b"{}", "model.safetensors": b"w" * 3000, "model.safetensors.index.json": b"{}",
             "tokenizer.json": b"{}", "chat_template.jinja": b"{{ x }}", "generation_config.json": b"{}",
             "pytorch_model.bin": b"pickle", "modeling_custom.py": b"import os", "notes/other.txt": b"x"}
    api.create_repo("user/mixed")
    for name, data in files.items():
        api.upload_file(path_or_fileobj=data, path_in_repo=name, repo_id="user/mixed")
    plain = {p.name for p in hub_side.fetch("user/mixed", tmp_path / "plain").iterdir() if p.is_file()}
    assert plain == {"config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
                     "chat_template.jinja", "generation_config.json"}
    trusted = {p.name for p in hub_side.fetch("user/mixed", tmp_path / "trusted", trust_remote_code=True).iterdir()}
    assert "modeling_custom.py" in trusted and "pytorch_model.bin" not in trusted

    api.create_repo("user/pickles-only")
    api.upload_file(path_or_fileobj=b"pickle", path_in_repo="pytorch_model.bin", repo_id="user/pickles-only")
    with pytest.raises(AbliterateError, match="pickle"):
        hub_side.fetch("user/pickles-only", tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_a_card_names_a_hub_base_model_but_never_a_local_path(tmp_path):
    from abliterate.publish.card import CardInfo, DirectionSummary, EditSummary, render_card

    def card(base: str) -> ModelCard:
        return ModelCard(render_card(CardInfo(base_model=base, adapter=False, license=None,
                                              direction=DirectionSummary.of({}, base),
                                              edit=EditSummary(1.0, None, ("attn",), 1),
                                              evaluation=None, regenerate=f"abliterate {base}")))

    hub_card = card("owner/model")
    assert hub_card.data.base_model == "owner/model" and "https://huggingface.co/owner/model" in hub_card.text
    (tmp_path / "owner").mkdir()
    local = card(str(tmp_path / "owner"))
    assert local.data.base_model is None and "huggingface.co/" + str(tmp_path) not in local.text
    assert "abliterated" in local.data.tags


def test_a_hub_that_cannot_be_reached_is_one_clear_error_and_writes_nothing(hub, direction, tmp_path):  # noqa: F811
    hub.serving = False  # the server stops: its port refuses connections, as an unreachable Hub does
    code, output = push(direction, tmp_path / "out", "--push")
    lines = output.strip().splitlines()
    assert code == 2 and len(lines) == 1, output
    assert lines[0].startswith("error: cannot reach the Hub at http://127.0.0.1:") and "HF_ENDPOINT" in lines[0]
    assert not (tmp_path / "out").exists()
