"""Pushing an output folder to the Hub: one commit, into a repo this tool created (or --force).

The token comes from huggingface_hub's usual sources (HF_TOKEN, `hf auth login`); nothing here
prints, logs or writes it. Errors name the repo and the fix, never the token.
"""

from __future__ import annotations

from pathlib import Path

from abliterate.errors import AbliterateError, first_line

OWN_TAG = "abliterate"  # every card this tool writes carries it


def _errors():
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    return RepositoryNotFoundError, HfHubHTTPError


def _user() -> str:
    from huggingface_hub import HfApi

    _, http = _errors()
    try:
        return HfApi().whoami()["name"]
    except (http, OSError) as e:
        raise AbliterateError(f"cannot push: the Hub did not accept the token ({first_line(e)}); log in with "
                              "`hf auth login` or set HF_TOKEN") from None


def target_repo(repo_id: str | None, model: str) -> str:
    """--push REPO_ID, or <your user>/<model name>-abliterated."""
    if repo_id:
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise AbliterateError(f"--push {repo_id!r} is not a repo id; write USER/NAME")
        return repo_id
    return f"{_user()}/{model.rstrip('/').rsplit('/', 1)[-1]}-abliterated"


def check_target(repo_id: str, *, force: bool) -> None:
    """Refuse a repo that exists with content this tool did not write, unless --force."""
    from huggingface_hub import HfApi, hf_hub_download

    not_found, http = _errors()
    api = HfApi()
    try:
        files = api.list_repo_files(repo_id)
    except not_found:
        return
    except http as e:
        raise AbliterateError(f"cannot check {repo_id} on the Hub: {first_line(e)}") from None
    if not [f for f in files if f != ".gitattributes"] or force:
        return
    ours = False
    if "README.md" in files:
        from huggingface_hub import ModelCard

        card = ModelCard.load(hf_hub_download(repo_id, "README.md"))
        ours = OWN_TAG in (card.data.tags or [])
    if not ours:
        raise AbliterateError(f"{repo_id} already exists and was not made by abliterate; push elsewhere "
                              "(--push USER/NAME) or pass --force to add a commit to it")


def push(folder: Path, repo_id: str, *, private: bool = False, force: bool = False) -> str:
    """Create the repo if needed and upload the folder as one commit; returns the repo URL."""
    from huggingface_hub import HfApi

    check_target(repo_id, force=force)
    api = HfApi()
    _, http = _errors()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                          commit_message="abliterate: edited checkpoint, direction, card and checksums")
    except http as e:
        raise AbliterateError(f"pushing to {repo_id} failed: {first_line(e)}; check that you may write there "
                              "(`hf auth whoami`)") from None
    return str(url)
