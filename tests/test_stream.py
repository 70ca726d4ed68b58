"""`abliterate MODEL --push --stream`: shard by shard, invisible until complete, resumable after a kill."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from huggingface_hub import HfApi, snapshot_download
from transformers import AutoModelForCausalLM

import abliterate.jobs.hub_stream as stream
from tests.test_apply import run_cli
from tests.test_pipeline import hub, logits, prompt_files  # noqa: F401  (fixtures)
from tests.test_push import direction  # noqa: F401  (fixture: extracted once per module)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_stream_killed_after_the_first_shard_resumes_and_publishes_the_same_files_as_apply(
        hub, direction, refusing_model, tmp_path, monkeypatch):  # noqa: F811
    shards = sorted(p.name for p in refusing_model.glob("*.safetensors"))
    assert len(shards) >= 2
    work = tmp_path / "work"
    args = ["user/toy-chat", "--push", "--stream", "--direction", str(direction), "--out", str(work), "-q"]

    def killed(_shard: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(stream, "shard_uploaded", killed)
    uploads_at_start = len(hub.calls("lfs_upload"))  # the fixture's upload of the base model
    code, output = run_cli(*args)
    assert code == 130, output
    assert HfApi().list_repo_files("user/toy-chat-abliterated") == [".gitattributes"]  # nothing shown yet
    uploads_before = len(hub.calls("lfs_upload"))
    assert uploads_before - uploads_at_start == 1

    done: list[str] = []
    monkeypatch.setattr(stream, "shard_uploaded", done.append)
    code, output = run_cli(*args)
    assert code == 0, output
    assert done == shards[1:]  # the first shard was not redone
    lfs_files = {f.path for f in HfApi().list_repo_tree("user/toy-chat-abliterated") if getattr(f, "lfs", None)}
    assert set(shards) <= lfs_files
    assert len(hub.calls("lfs_upload")) - uploads_before == len(lfs_files) - 1  # all but the first shard
    assert len(HfApi().list_repo_commits("user/toy-chat-abliterated")) == 2  # creation + one final commit
    assert not work.exists()

    assert run_cli("apply", str(refusing_model), "--direction", str(direction), "--out", str(tmp_path / "local"),
                   "-q")[0] == 0
    pushed = Path(snapshot_download("user/toy-chat-abliterated"))
    for name in [*shards, "model.safetensors.index.json", "config.json", "refusal_direction.safetensors"]:
        assert sha256(pushed / name) == sha256(tmp_path / "local" / name), name
    assert run_cli("verify", str(pushed))[0] == 0  # SHA256SUMS covers every file
    model = AutoModelForCausalLM.from_pretrained("user/toy-chat-abliterated").eval()
    local = AutoModelForCausalLM.from_pretrained(tmp_path / "local").eval()
    assert torch.equal(logits(model), logits(local))


def test_stream_without_a_direction_or_push_is_refused(hub, tmp_path):  # noqa: F811
    code, output = run_cli("user/toy-chat", "--stream", "--push", "-q", "--out", str(tmp_path / "w"))
    assert code == 2 and "--direction" in output
    code, output = run_cli("user/toy-chat", "--stream", "-q", "--out", str(tmp_path / "w"))
    assert code == 2 and "--push" in output


def test_a_resumed_stream_with_another_direction_is_refused_instead_of_publishing_a_mixed_model(
        hub, direction, tmp_path, monkeypatch):  # noqa: F811
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(direction, "pt") as f:
        other = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    other["direction"] = other["direction"].flip(-1)  # same shape, another direction
    other_path = tmp_path / "other.safetensors"
    save_file(other, other_path, metadata=meta)
    work = tmp_path / "work"

    def killed(_shard: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(stream, "shard_uploaded", killed)
    args = ["user/toy-chat", "--push", "--stream", "--out", str(work), "-q", "--direction"]
    assert run_cli(*args, str(direction))[0] == 130
    monkeypatch.setattr(stream, "shard_uploaded", lambda _shard: None)
    code, output = run_cli(*args, str(other_path))
    assert code == 2 and "another direction" in output and str(work) in output
    assert HfApi().list_repo_files("user/toy-chat-abliterated") == [".gitattributes"]
    assert run_cli(*args, str(direction))[0] == 0  # the same inputs resume and finish


def test_a_huggingface_hub_without_the_commit_fields_stream_needs_is_refused_before_any_work(
        hub, direction, tmp_path, monkeypatch):  # noqa: F811
    import dataclasses

    import huggingface_hub

    @dataclasses.dataclass
    class Renamed:  # what a future huggingface_hub that renamed its private fields would have
        path_in_repo: str
        path_or_fileobj: object

    monkeypatch.setattr(huggingface_hub, "CommitOperationAdd", Renamed)
    code, output = run_cli("user/toy-chat", "--push", "--stream", "--out", str(tmp_path / "w"), "-q", "--direction",
                           str(direction))
    assert code == 2 and "huggingface_hub<3" in output and "without --stream" in output
    assert not (tmp_path / "w").exists()
    assert not HfApi().repo_exists("user/toy-chat-abliterated")
