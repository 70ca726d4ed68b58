"""LocalHub is only useful if it is faithful: every test here drives it through real huggingface_hub calls
(HfApi, hf_hub_download, snapshot_download) or transformers / peft `from_pretrained`, never raw HTTP."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from tests.hub_server import DEFAULT_TOKEN, LocalHub, hub_env

AUTH = f"Bearer {DEFAULT_TOKEN}"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[LocalHub]:
    hub = hub_env(monkeypatch, tmp_path)
    yield hub
    assert hub.errors == [], hub.errors[0]
    assert hub.calls("no_route") == [], "the client hit a route LocalHub does not implement"


@pytest.fixture
def api(hub: LocalHub) -> HfApi:
    return HfApi()  # endpoint and token come from the patched environment, as in production code


def write(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def test_lifecycle_is_bound_to_monkeypatch_and_loopback_only(tmp_path: Path) -> None:
    original = constants.ENDPOINT
    with pytest.MonkeyPatch.context() as mp:
        hub = hub_env(mp, tmp_path)
        server = hub._server
        assert server is not None and server.server_address[0] == "127.0.0.1"
        assert hub.endpoint == constants.ENDPOINT == f"http://127.0.0.1:{server.server_address[1]}"
        assert HfApi().whoami()["name"] == "user"
    assert not hub.serving and server.socket.fileno() == -1  # listening socket closed at monkeypatch teardown
    assert original == constants.ENDPOINT


def test_request_bodies_are_bounded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hub = hub_env(monkeypatch, tmp_path, max_body_bytes=4096)
    api = HfApi()
    api.create_repo("user/bounded")
    with pytest.raises(ValueError, match="LFS batch API returned errors"):
        api.upload_file(path_or_fileobj=b"x" * 5000, path_in_repo="big.bin", repo_id="user/bounded")
    small = [CommitOperationAdd(f"f{i}.txt", b"y" * 1000) for i in range(4)]  # regular: ~3 KB preupload, ~6 KB commit
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit("user/bounded", small, commit_message="too big")
    assert err.value.response.status_code == 413 and hub.calls("commit")[-1].status == 413
    assert api.list_repo_files("user/bounded") == [".gitattributes"]


def test_whoami_sends_the_token_and_rejects_a_wrong_one(hub: LocalHub, api: HfApi) -> None:
    assert api.whoami()["name"] == "user"
    assert hub.calls("whoami")[-1].authorization == AUTH
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_wrong").whoami()
    assert err.value.response.status_code == 401


def test_create_exists_delete_repo(hub: LocalHub, api: HfApi) -> None:
    url = api.create_repo("user/model", private=False, exist_ok=True)
    assert url.repo_id == "user/model" and url.endpoint == hub.endpoint
    assert api.repo_exists("user/model")
    assert api.list_repo_files("user/model") == [".gitattributes"]  # the Hub's initial commit
    api.create_repo("user/model", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("user/model")
    assert err.value.response.status_code == 409
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("someone-else/model")
    assert err.value.response.status_code == 403
    api.delete_repo("user/model")
    assert not api.repo_exists("user/model")
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo("user/model")
    api.delete_repo("user/model", missing_ok=True)


def test_upload_uses_lfs_for_big_and_safetensors_files_and_inline_base64_for_small(
    hub: LocalHub, api: HfApi, tmp_path: Path
) -> None:
    files = {"config.json": b'{"a": 1}', "big.txt": b"x" * 5000, "weights.safetensors": b"tiny", "sub/note.md": b"hi"}
    api.create_repo("user/lfs")
    info = api.upload_folder(repo_id="user/lfs", folder_path=write(tmp_path / "src", files))
    assert len(info.oid) == 40 and info.commit_url == f"{hub.endpoint}/user/lfs/commit/{info.oid}"

    assert len(hub.calls("lfs_batch")) == 1 and hub.calls("lfs_batch")[0].authorization == AUTH
    puts = hub.calls("lfs_upload")
    assert len(puts) == 2 and all(p.status == 200 and p.authorization is None for p in puts)  # token stays home
    assert len(hub.calls("lfs_verify")) == 2
    tree = {f.path: f for f in api.list_repo_tree("user/lfs", recursive=True) if isinstance(f, RepoFile)}
    assert set(tree) == {*files, ".gitattributes"}
    for name in ("big.txt", "weights.safetensors"):
        assert tree[name].lfs is not None and tree[name].lfs.sha256 == hashlib.sha256(files[name]).hexdigest()
    assert tree["config.json"].lfs is None and tree["sub/note.md"].lfs is None
    assert [f.path for f in api.list_repo_tree("user/lfs")] == ["sub", ".gitattributes", "big.txt", "config.json",
                                                                "weights.safetensors"]

    model = api.model_info("user/lfs", files_metadata=True)
    assert model.sha == info.oid and model.private is False
    assert {s.rfilename: s.size for s in model.siblings} == {".gitattributes": model.siblings[0].size,
                                                             **{k: len(v) for k, v in files.items()}}
    for name, data in files.items():
        assert Path(hf_hub_download("user/lfs", name)).read_bytes() == data

    stored = [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]  # server storage and client cache
    assert not any(DEFAULT_TOKEN.encode() in data for data in stored)

    # re-uploading unchanged files: no LFS upload, no commit (the client compares the preupload oids)
    api.upload_folder(repo_id="user/lfs", folder_path=tmp_path / "src")
    assert len(hub.calls("lfs_upload")) == 2 and len(api.list_repo_commits("user/lfs")) == 2


def test_commit_to_a_branch_then_to_main(hub: LocalHub, api: HfApi) -> None:
    api.create_repo("user/branches")
    main0 = api.model_info("user/branches").sha
    api.create_branch("user/branches", branch="dev")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_branch("user/branches", branch="dev")
    assert err.value.response.status_code == 409
    dev = api.upload_file(path_or_fileobj=b"dev only", path_in_repo="dev.txt", repo_id="user/branches",
                          revision="dev", commit_message="on dev")
    refs = {b.name: b.target_commit for b in api.list_repo_refs("user/branches").branches}
    assert refs == {"main": main0, "dev": dev.oid}
    assert Path(hf_hub_download("user/branches", "dev.txt", revision="dev")).read_bytes() == b"dev only"
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("user/branches", "dev.txt")

    final = api.upload_file(path_or_fileobj=b"final", path_in_repo="final.txt", repo_id="user/branches",
                            commit_message="final", parent_commit=main0)
    with pytest.raises(HfHubHTTPError) as err:  # parent_commit no longer the head of main
        api.upload_file(path_or_fileobj=b"late", path_in_repo="late.txt", repo_id="user/branches", parent_commit=main0)
    assert err.value.response.status_code == 412
    assert [c.commit_id for c in api.list_repo_commits("user/branches")] == [final.oid, main0]
    assert [c.title for c in api.list_repo_commits("user/branches", revision="dev")] == ["on dev", "initial commit"]
    assert api.list_repo_files("user/branches") == [".gitattributes", "final.txt"]
    assert api.list_repo_files("user/branches", revision=dev.oid) == [".gitattributes", "dev.txt"]
    assert len({main0, dev.oid, final.oid}) == 3


def test_delete_operations(hub: LocalHub, api: HfApi, tmp_path: Path) -> None:
    files = {"a.txt": b"a", "b.txt": b"b", "dir/c.txt": b"c", "dir/sub/d.bin": b"d", "old/e.txt": b"e"}
    api.create_repo("user/deletes")
    api.upload_folder(repo_id="user/deletes", folder_path=write(tmp_path / "src", files))
    api.create_commit("user/deletes", commit_message="mixed", operations=[
        CommitOperationDelete("a.txt"), CommitOperationDelete("dir/"), CommitOperationAdd("new.txt", b"new")])
    assert api.list_repo_files("user/deletes") == [".gitattributes", "b.txt", "new.txt", "old/e.txt"]
    api.delete_file("b.txt", repo_id="user/deletes")
    api.delete_folder("old", repo_id="user/deletes")
    assert api.list_repo_files("user/deletes") == [".gitattributes", "new.txt"]
    with pytest.raises(EntryNotFoundError):
        api.delete_file("b.txt", repo_id="user/deletes")


def test_errors_map_to_huggingface_hub_exceptions(hub: LocalHub, api: HfApi) -> None:
    api.create_repo("user/errors")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/missing", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("user/missing")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("user/errors", "config.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("user/errors", ".gitattributes", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("user/errors", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id="user/errors", revision="nope")
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree("user/errors", path_in_repo="no/such/dir"))
    assert not api.file_exists("user/errors", "config.json") and api.file_exists("user/errors", ".gitattributes")
    assert not api.revision_exists("user/errors", "nope")


def test_private_repo_is_hidden_and_writes_need_a_token(hub: LocalHub, api: HfApi, tmp_path: Path) -> None:
    api.create_repo("user/secret", private=True)
    api.upload_file(path_or_fileobj=b"s3cret", path_in_repo="s.txt", repo_id="user/secret")
    assert api.model_info("user/secret").private is True
    assert Path(hf_hub_download("user/secret", "s.txt")).read_bytes() == b"s3cret"
    anonymous = HfApi(token=False)
    assert not anonymous.repo_exists("user/secret")
    with pytest.raises(RepositoryNotFoundError):  # fresh cache: a cached copy would be served despite the error
        hf_hub_download("user/secret", "s.txt", token=False, cache_dir=tmp_path / "anonymous-cache")
    with pytest.raises(RepositoryNotFoundError):
        anonymous.list_repo_files("user/secret")

    api.create_repo("user/public")
    with pytest.raises(HfHubHTTPError) as err:
        anonymous.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id="user/public")
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as err:
        anonymous.create_repo("user/other")
    assert err.value.response.status_code == 401
    assert Path(hf_hub_download("user/public", ".gitattributes", token=False)).exists()
    assert any(r.authorization is None for r in hub.requests) and any(r.authorization == AUTH for r in hub.requests)


def test_snapshot_download_with_allow_patterns(hub: LocalHub, api: HfApi, tmp_path: Path) -> None:
    files = {"config.json": b"{}", "model.safetensors": b"w" * 3000, "sub/x.txt": b"x", "skip.bin": b"skip"}
    api.create_repo("user/snap")
    info = api.upload_folder(repo_id="user/snap", folder_path=write(tmp_path / "src", files))
    folder = Path(snapshot_download("user/snap", allow_patterns=["*.json", "*.safetensors", "sub/*"]))
    got = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert got == {k: v for k, v in files.items() if k != "skip.bin"}
    assert folder.name == info.oid and folder.is_relative_to(constants.HF_HUB_CACHE)
    local = Path(snapshot_download("user/snap", revision=info.oid, local_dir=tmp_path / "local"))
    assert (local / "skip.bin").read_bytes() == b"skip"


def tiny_llama(folder: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A random 2-layer Llama (hidden 16, vocab 64) saved in 20 KB shards, with a word-level tokenizer."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, max_shard_size="20KB")
    vocab = {f"w{i}": i for i in range(62)} | {"[UNK]": 62, "[PAD]": 63}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def test_transformers_from_pretrained_downloads_a_sharded_model(hub: LocalHub, api: HfApi, tmp_path: Path) -> None:
    model, tokenizer = tiny_llama(tmp_path / "tiny")
    shards = sorted(p.name for p in (tmp_path / "tiny").glob("*.safetensors"))
    assert len(shards) >= 2 and (tmp_path / "tiny" / "model.safetensors.index.json").exists()
    api.create_repo("user/tiny-llama")
    api.upload_folder(repo_id="user/tiny-llama", folder_path=tmp_path / "tiny")
    assert len(hub.calls("lfs_upload")) >= len(shards)

    assert AutoConfig.from_pretrained("user/tiny-llama").hidden_size == 16
    loaded_tokenizer = AutoTokenizer.from_pretrained("user/tiny-llama")
    assert loaded_tokenizer("w1 w5 w9")["input_ids"] == tokenizer("w1 w5 w9")["input_ids"] == [1, 5, 9]
    loaded = AutoModelForCausalLM.from_pretrained("user/tiny-llama", dtype=torch.float32).eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # transformers resolves "main" to a commit sha once (model_info), then downloads /resolve/<sha>/<file>
    downloaded = {r.path.rsplit("/", 1)[-1] for r in hub.calls("resolve") if r.method == "GET"}
    assert set(shards) <= downloaded


def test_peft_adapter_roundtrip(hub: LocalHub, api: HfApi, tmp_path: Path) -> None:
    base, _ = tiny_llama(tmp_path / "base")
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapted = get_peft_model(copy.deepcopy(base), lora).eval()
    adapted.save_pretrained(tmp_path / "adapter")
    api.create_repo("user/adapter-repo")
    api.upload_folder(repo_id="user/adapter-repo", folder_path=tmp_path / "adapter")
    assert hub.calls("validate_yaml") and api.model_info("user/adapter-repo").card_data.library_name == "peft"

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), "user/adapter-repo").eval()
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = adapted(ids).logits
        assert not torch.equal(expected, base(ids).logits)
        assert torch.equal(loaded(ids).logits, expected)
