"""`abliterate MODEL [--push]`: the whole job, locally and against a local server speaking the Hub API.

The subject is the toy chat model that really refuses; the Hub is tests/hub_server.LocalHub, driven
only by real huggingface_hub / transformers / peft calls.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from transformers import AutoModelForCausalLM

from abliterate.demo.toy import toy_prompts
from tests.hub_server import hub_env
from tests.test_apply import run_cli

SECRET = "hf_pipelineSECRETtoken9f8e7d6c5b4a"


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("prompts")
    prompts = toy_prompts()
    files = {}
    for name in ("harmful_train", "harmless_train", "harmful_test", "harmless_test"):
        (root / f"{name}.txt").write_text("\n".join(getattr(prompts, name)))
        files[name] = str(root / f"{name}.txt")
    return files


def job_args(prompt_files: dict[str, str], evaluate: bool = True, one_shot: bool = True) -> list[str]:
    """The job's prompt options; --one-shot unless asked otherwise: these tests are about the job's other stages,
    and the default short search is tested in test_default_search.py (and by the first test here)."""
    args = ["--harmful", prompt_files["harmful_train"], "--harmless", prompt_files["harmless_train"], "-q",
            *(["--one-shot"] if one_shot else [])]
    if evaluate:
        return [*args, "--eval-harmful", prompt_files["harmful_test"], "--eval-harmless", prompt_files["harmless_test"]]
    return [*args, "--no-eval"]


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 20).unsqueeze(0)
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def hub(monkeypatch, tmp_path, refusing_model):
    """A local Hub holding the toy model as user/toy-chat, with a unique token."""
    server = hub_env(monkeypatch, tmp_path, token=SECRET)
    api = HfApi()
    api.create_repo("user/toy-chat")
    (tmp_path / "upload").mkdir()
    for f in refusing_model.iterdir():
        (tmp_path / "upload" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "upload" / "README.md").write_text("---\nlicense: apache-2.0\n---\n# toy chat\n")
    api.upload_folder(folder_path=str(tmp_path / "upload"), repo_id="user/toy-chat")
    return server


def none_refused_of_all(value: str) -> bool:
    """The card's refusal value: none refused with its interval, the baseline all, with its own."""
    return re.fullmatch(r"0\.0 % \(0/(\d+); 95 % CI 0\.0-[\d.]+ %\) \(baseline 100\.0 % \(\1/\1; 95 % CI "
                        r"[\d.]+-100\.0 %\)\)", value) is not None


def test_whole_job_on_a_local_folder_writes_an_edited_model_with_card_and_checksums(refusing_model, prompt_files,
                                                                                    tmp_path):
    out = tmp_path / "toy-abliterated"
    code, output = run_cli(str(refusing_model), "--out", str(out), *job_args(prompt_files, one_shot=False))
    assert code == 0, output
    assert "from_pretrained" in output and not Path(str(out) + ".abliterate-partial").exists()
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model_relation == "finetune" and "abliterated" in card.data.tags
    refusal_row = next(line for line in card.text.splitlines() if line.startswith("| refusal rate"))
    assert none_refused_of_all(refusal_row.split("|")[2].strip())
    answered_row = next(line for line in card.text.splitlines() if line.startswith("| answered, held-out"))
    assert any(line.startswith("| neither refused nor answered") for line in card.text.splitlines())
    k, n = map(int, re.match(r"[\d.]+ % \((\d+)/(\d+);", answered_row.split("|")[2].strip()).groups())
    assert k >= 0.9 * n  # the edited toy's helpful replies are answers
    assert run_cli("verify", str(out))[0] == 0  # the SHA256SUMS manifest
    assert run_cli("verify", str(refusing_model), str(out))[0] == 0  # the edit itself


def test_a_model_without_a_chat_template_runs_with_template_and_is_refused_without(refusing_model, prompt_files,
                                                                                 tmp_path):
    import json
    import shutil

    from abliterate.demo.toy import CHAT_TEMPLATE

    bare = tmp_path / "no-template"
    shutil.copytree(refusing_model, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    code, output = run_cli(str(bare), "--out", str(tmp_path / "refused"), *job_args(prompt_files))
    assert code == 2 and "no chat template" in output and "--template" in output
    assert not (tmp_path / "refused").exists()
    (tmp_path / "template.jinja").write_text(CHAT_TEMPLATE)
    out = tmp_path / "with-template"
    code, output = run_cli(str(bare), "--out", str(out), "--template", str(tmp_path / "template.jinja"),
                           *job_args(prompt_files))
    assert code == 0, output
    card = ModelCard.load(out / "README.md")
    refusal_row = next(line for line in card.text.splitlines() if line.startswith("| refusal rate"))
    assert none_refused_of_all(refusal_row.split("|")[2].strip())
    assert "--template template.jinja" in card.text  # in the regenerate and evaluate commands, by its name
    assert str(tmp_path) not in card.text  # no path of the publisher's disk


def test_push_publishes_edited_weights_that_download_to_the_same_logits_as_a_local_edit(hub, prompt_files, tmp_path,
                                                                                         refusing_model, capfd):
    code, output = run_cli("user/toy-chat", "--push", "--out", str(tmp_path / "out"), *job_args(prompt_files))
    assert code == 0, output
    assert "pushed to" in output
    files = HfApi().list_repo_files("user/toy-chat-abliterated")
    assert {"README.md", "SHA256SUMS", "refusal_direction.safetensors", "model.safetensors.index.json"} <= set(files)
    assert len(HfApi().list_repo_commits("user/toy-chat-abliterated")) == 2  # repo creation + one commit

    card = ModelCard.load("user/toy-chat-abliterated")
    assert card.data.base_model == "user/toy-chat" and card.data.base_model_relation == "finetune"
    assert card.data.library_name == "transformers" and card.data.license == "apache-2.0"
    assert "abliterated" in card.data.tags
    assert "## Evaluation" in card.text and "abliterate evaluate" in card.text and "## Reproduce" in card.text

    direction = hf_hub_download("user/toy-chat-abliterated", "refusal_direction.safetensors")
    assert run_cli("apply", str(refusing_model), "--direction", direction, "--out", str(tmp_path / "local"),
                   "-q")[0] == 0
    pushed = AutoModelForCausalLM.from_pretrained("user/toy-chat-abliterated").eval()
    local = AutoModelForCausalLM.from_pretrained(tmp_path / "local").eval()
    assert torch.equal(logits(pushed), logits(local))

    captured = capfd.readouterr()
    assert SECRET not in output + captured.out + captured.err
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_push_adapter_loads_with_peft_and_matches_the_edited_weights(hub, prompt_files, tmp_path, refusing_model):
    from peft import PeftModel

    code, output = run_cli("user/toy-chat", "--adapter", "--push", "user/toy-chat-adapter", "--out",
                           str(tmp_path / "adapter"), *job_args(prompt_files, evaluate=False))
    assert code == 0, output
    card = ModelCard.load("user/toy-chat-adapter")
    assert card.data.base_model_relation == "adapter" and card.data.library_name == "peft"

    base = AutoModelForCausalLM.from_pretrained("user/toy-chat").eval()
    adapted = PeftModel.from_pretrained(base, "user/toy-chat-adapter").eval()
    direction = hf_hub_download("user/toy-chat-adapter", "refusal_direction.safetensors")
    assert run_cli("apply", str(refusing_model), "--direction", direction, "--out", str(tmp_path / "local"),
                   "-q")[0] == 0
    local = AutoModelForCausalLM.from_pretrained(tmp_path / "local").eval()
    assert torch.allclose(logits(adapted), logits(local), atol=1e-5)
    assert not torch.allclose(logits(adapted), logits(AutoModelForCausalLM.from_pretrained("user/toy-chat")), atol=1e-3)


def test_push_refuses_a_repo_abliterate_did_not_create_unless_forced(hub, prompt_files, tmp_path):
    api = HfApi()
    api.create_repo("user/someone-else")
    api.upload_file(path_or_fileobj=b"# not ours\n", path_in_repo="README.md", repo_id="user/someone-else")
    code, output = run_cli("user/toy-chat", "--push", "user/someone-else", "--out", str(tmp_path / "x"),
                           *job_args(prompt_files, evaluate=False))
    assert code == 2 and "was not made by abliterate" in output and "--force" in output
    assert not (tmp_path / "x").exists()  # refused before any work
    assert len(api.list_repo_commits("user/someone-else")) == 2


def test_an_unknown_hub_repo_or_a_folder_without_config_is_one_clear_error(hub, tmp_path):
    code, output = run_cli("user/no-such-model", "--no-eval", "-q", "--out", str(tmp_path / "o"))
    assert code == 2 and "user/no-such-model" in output and "Traceback" not in output
    (tmp_path / "empty").mkdir()
    code, output = run_cli(str(tmp_path / "empty"), "--no-eval", "-q", "--out", str(tmp_path / "o"))
    assert code == 2 and "config.json" in output
    assert not (tmp_path / "o").exists()


def test_the_cards_measured_with_command_reproduces_the_adapter_numbers(refusing_model, prompt_files, tmp_path,
                                                                       monkeypatch):
    """With --adapter, the recorded command evaluates the base model with the adapter on it (not OUTPUT alone,
    which is an adapter folder); run as recorded, where local inputs are found by the names the card gives them,
    it prints the card's numbers."""
    import re
    import shlex

    out = tmp_path / "toy-adapter"
    code, output = run_cli(str(refusing_model), "--adapter", "--out", str(out), *job_args(prompt_files))
    assert code == 0, output
    card = (out / "README.md").read_text()
    command = re.search(r"Measured with:\n\n```bash\n(.+?)\n```", card).group(1)
    assert command.startswith(f"abliterate evaluate {refusing_model.name} --adapter OUTPUT --baseline ")
    replay = tmp_path / "replay"  # the card names local files by their names only: put them there
    replay.mkdir()
    for path in (refusing_model, *map(Path, prompt_files.values())):
        (replay / path.name).symlink_to(path)
    monkeypatch.chdir(replay)
    args = [str(out) if a == "OUTPUT" else a for a in shlex.split(command)[1:]]
    code, printed = run_cli(*args, "-q", "--device", "cpu")
    assert code == 0, printed
    card_rows = dict(re.findall(r"^\| ([a-zA-Z][^|]*?) \| ([^|]*\(baseline [^|]*\)) \|$", card, re.M))
    printed_rows = {m: f"{v} (baseline {b})" for m, v, b in
                    re.findall(r"^\| ([a-zA-Z][^|]*?) \| ([^|]+?) \| ([^|]+?) \|$", printed, re.M)}
    assert card_rows and all(printed_rows[m] == v for m, v in card_rows.items()), (card_rows, printed_rows)
