"""Everything that talks to the Hugging Face Hub: fetching a model's files, pushing results.

Only real huggingface_hub calls are used (the tests run them against a local server speaking the
Hub's HTTP API). Tokens come from huggingface_hub's usual sources (HF_TOKEN, `hf auth login`) and
are never printed or written by this module.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from abliterate.errors import AbliterateError, first_line
from abliterate.io.checkpoint import PICKLE_SUFFIXES

WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
METADATA_PATTERNS = (
    "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "*.model", "vocab.*", "merges.txt", "*.tiktoken", "README.md",
    "LICENSE*", "NOTICE*", "USE_POLICY*",
)
TOOL_MARKERS = ("abliterate.json", "abliterate_adapter.json")


def is_local(model: str) -> bool:
    return Path(model).exists() or model.startswith((".", "/", "~"))


NETWORK_PACKAGES = ("httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3")
NETWORK_WORDS = ("Connect", "Timeout", "Network", "Transport", "Proxy", "Protocol")


def network_problem(error: BaseException) -> str | None:
    """One line for a connection to the Hub that failed (whichever HTTP client huggingface_hub uses,
    raised as is or wrapped in one of its own errors); None for any other error."""
    seen: BaseException | None = error
    while seen is not None:
        for cls in type(seen).__mro__:
            if cls.__module__.split(".")[0] in NETWORK_PACKAGES and any(w in cls.__name__ for w in NETWORK_WORDS):
                from huggingface_hub import constants

                return (f"cannot reach the Hub at {constants.ENDPOINT} ({first_line(seen)}); check the network or "
                        "HF_ENDPOINT, or pass a local model folder")
        seen = seen.__cause__ or seen.__context__
    return None


def _hub_errors():
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    return RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError, HfHubHTTPError


def repo_files(repo_id: str, revision: str | None = None) -> list[str]:
    from huggingface_hub import HfApi

    not_found, no_revision, gated, http = _hub_errors()
    try:
        return HfApi().list_repo_files(repo_id, revision=revision)
    except gated:
        raise AbliterateError(f"{repo_id} is gated: accept its license on the Hub and log in (hf auth login)") from None
    except no_revision:
        raise AbliterateError(f"{repo_id} has no revision {revision!r}") from None
    except not_found:
        raise AbliterateError(
            f"{repo_id} is not a local folder and no such model repository was found on the Hub "
            "(private? log in with `hf auth login` or set HF_TOKEN)"
        ) from None
    except http as e:
        raise AbliterateError(f"the Hub refused to list {repo_id}: {first_line(e)}") from None


def patterns(*, weights: bool, trust_remote_code: bool) -> list[str]:
    chosen = list(METADATA_PATTERNS) + (list(WEIGHT_PATTERNS) if weights else [])
    return chosen + (["*.py"] if trust_remote_code else [])


def fetch(repo_id: str, dest: Path | None = None, *, revision: str | None = None, weights: bool = True,
          trust_remote_code: bool = False) -> Path:
    """Download what abliterate needs of a model repo: safetensors shards, index, config, tokenizer,
    chat template, generation config; never pickled weights, and Python files only with
    trust_remote_code. Returns the local folder (the Hub cache's snapshot unless `dest` is given)."""
    from huggingface_hub import snapshot_download

    files = repo_files(repo_id, revision)
    if not any(f.endswith(".safetensors") for f in files):
        pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
        what = f"only pickle weights ({', '.join(pickles[:3])})" if pickles else "no .safetensors weights"
        raise AbliterateError(
            f"{repo_id} has {what}; abliterate loads safetensors only (pickles can run code): use a safetensors "
            "release of the model"
        )
    allow = patterns(weights=weights, trust_remote_code=trust_remote_code)
    _, no_revision, _, http = _hub_errors()
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=allow,
                                 local_dir=str(dest) if dest else None)
    except no_revision:
        raise AbliterateError(f"{repo_id} has no revision {revision!r}") from None
    except http as e:
        raise AbliterateError(f"downloading {repo_id} failed: {first_line(e)}") from None
    return Path(path)


def selected(files: list[str], allow: list[str]) -> list[str]:
    return [f for f in files if any(fnmatch.fnmatch(f, p) for p in allow)]
