"""A small, faithful stand-in for the Hugging Face Hub HTTP API, so tests can push and pull without a network.

It serves the model-repo routes huggingface_hub 2.4.0 (and transformers / peft through it) really call, with the
payloads, headers and error codes read from the installed client source: whoami, repos, info, tree, refs,
commits, branches, preupload + LFS batch/PUT/verify + NDJSON commit, and HEAD/GET `/resolve`. Standard
library only (pyyaml, a project dependency, fills `cardData` if present); 127.0.0.1 only, one daemon thread.
Use `hub_env(monkeypatch, tmp_path)` in a test: it starts a server, points huggingface_hub at it, stops it after.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import shutil
import socket
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

if TYPE_CHECKING:
    import pytest

DEFAULT_TOKEN = "hf_localhubTESTtoken0123456789abcdef"
DEFAULT_USER = "user"
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.onnx", "*.msgpack", "*.h5")
_REPO = r"(?P<repo>[\w.-]+/[\w.-]+?)"  # namespace/name; the Hub's ids never contain '/' otherwise
_LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"


def _git_oid(data: bytes) -> str:
    """Git blob id, which the Hub reports as a regular file's `oid` and `ETag`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    """Timestamp in the one format huggingface_hub's `parse_datetime` accepts."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class Blob:
    """One file version: regular (stored under its git oid) or LFS (stored under its sha256)."""

    oid: str  # git blob id of the content, or of the LFS pointer for LFS files
    size: int
    sha256: str | None = None

    @property
    def key(self) -> str:
        return self.sha256 or self.oid

    def lfs_info(self) -> dict[str, Any] | None:
        if self.sha256 is None:
            return None
        pointer_size = len(_LFS_POINTER.format(oid=self.sha256, size=self.size))
        return {"oid": self.sha256, "sha256": self.sha256, "size": self.size, "pointerSize": pointer_size}

    def entry(self, path: str) -> dict[str, Any]:
        """A `/tree` entry (parsed by `RepoFile`, which reads `lfs.oid`); `lfs` only for LFS files, as on the Hub."""
        out = {"type": "file", "oid": self.oid, "size": self.size, "path": path, "lfs": self.lfs_info()}
        return {k: v for k, v in out.items() if v is not None}

    def sibling_metadata(self) -> dict[str, Any]:
        """`model_info(files_metadata=True)` sibling fields (parsed by `RepoSibling`, which reads `lfs.sha256`)."""
        out = {"size": self.size, "blobId": self.oid, "lfs": self.lfs_info()}
        return {k: v for k, v in out.items() if v is not None}


@dataclass
class Commit:
    sha: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs: dict[str, int] = field(default_factory=dict)  # sha256 -> size of the LFS objects uploaded to this repo

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]


@dataclass(frozen=True)
class RecordedRequest:
    """What tests assert on: the route hit, its status, and the Authorization header exactly as sent."""

    method: str
    path: str
    route: str
    status: int
    authorization: str | None


@dataclass
class Request:
    method: str
    args: dict[str, str]  # URL-decoded route groups
    query: dict[str, list[str]]
    body: bytes
    user: str | None

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err

    def flag(self, name: str) -> bool:
        return self.query.get(name, [""])[0].lower() in ("1", "true")


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json(data: Any, status: int = 200) -> Reply:
    return Reply(status, json.dumps(data).encode(), {"Content-Type": "application/json"})


class HubError(Exception):
    """An error reply; `code` goes to `X-Error-Code`, which huggingface_hub maps to its exception types."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}

    def reply(self) -> Reply:
        reply = _json({"error": self.message}, self.status)
        reply.headers.update({"X-Error-Message": self.message, **self.headers})
        if self.code:
            reply.headers["X-Error-Code"] = self.code
        return reply


class LocalHub:
    """Hub for model repos: metadata in memory, file contents under `storage_dir`. Preupload answers "lfs" for files
    over `lfs_threshold` bytes (the Hub: 10 MB; tiny here so tests exercise LFS) or matching `lfs_patterns`."""

    def __init__(self, storage_dir: str | Path | None = None, *, token: str = DEFAULT_TOKEN, user: str = DEFAULT_USER,
                 lfs_threshold: int = 1024, lfs_patterns: tuple[str, ...] = LFS_PATTERNS,
                 max_body_bytes: int = 256 * 2**20, request_timeout: float = 10.0) -> None:
        self._own_dir = storage_dir is None
        self.storage_dir = Path(storage_dir or tempfile.mkdtemp(prefix="localhub-"))
        self.token, self.user = token, user
        self.lfs_threshold, self.lfs_patterns = lfs_threshold, lfs_patterns
        self.max_body_bytes, self.request_timeout = max_body_bytes, request_timeout
        self.repos: dict[str, Repo] = {}
        self.requests: list[RecordedRequest] = []
        self.errors: list[str] = []  # tracebacks of server bugs (replied as 500)
        self._tickets: dict[str, tuple[str, str, int]] = {}  # LFS upload ticket -> (repo_id, oid, size)
        self._lock = threading.RLock()
        self._conns: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalHub is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def serving(self) -> bool:
        return self._server is not None

    @serving.setter
    def serving(self, value: bool) -> None:
        """Lets `monkeypatch.setattr(hub, "serving", True)` start it and monkeypatch's teardown stop it."""
        if value and not self.serving:
            self.start()
        elif not value and self.serving:
            self.stop()

    def start(self) -> LocalHub:
        if self._server is not None:
            return self
        (self.storage_dir / "objects").mkdir(parents=True, exist_ok=True)
        handler = type("LocalHubHandler", (_Handler,), {"hub": self, "timeout": self.request_timeout})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), name="LocalHub", daemon=True).start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        for conn in list(self._conns):  # wake handler threads parked on idle keep-alive connections
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if self._own_dir:
            shutil.rmtree(self.storage_dir, ignore_errors=True)

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def calls(self, route: str) -> list[RecordedRequest]:
        """Requests that hit the handler named `route` (e.g. "lfs_batch", "lfs_upload", "commit")."""
        return [r for r in self.requests if r.route == route]

    def _dispatch(self, h: BaseHTTPRequestHandler) -> None:
        raw_path, _, query = h.path.partition("?")
        func, args = self._route(h.command, raw_path)
        name = func.__name__.lstrip("_") if func else "no_route"
        try:
            body = self._read_body(h)  # first, whatever happens next: keeps the keep-alive stream in sync
            if func is None:
                raise HubError(404, f"LocalHub has no route for {h.command} {raw_path}")
            req = Request(h.command, args, parse_qs(query), body, self._user(h.headers.get("Authorization")))
            with self._lock:
                reply = func(self, req)
        except HubError as err:
            reply = err.reply()
        except Exception:
            self.errors.append(traceback.format_exc())
            reply = HubError(500, "LocalHub internal error").reply()
        self.requests.append(RecordedRequest(h.command, h.path, name, reply.status, h.headers.get("Authorization")))
        h.send_response(reply.status)
        for key, value in reply.headers.items():
            h.send_header(key, value)
        if "Content-Length" not in reply.headers:
            h.send_header("Content-Length", str(len(reply.body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(reply.body)

    def _read_body(self, h: BaseHTTPRequestHandler) -> bytes:
        """Bounded read. huggingface_hub always sends Content-Length (file uploads too), never chunked bodies."""
        if "chunked" in h.headers.get("Transfer-Encoding", ""):
            h.close_connection = True
            raise HubError(411, "Send a Content-Length")
        length = int(h.headers.get("Content-Length") or 0)
        if length > self.max_body_bytes:  # drain it (bounded memory), so the client gets the 413, not a broken pipe
            while length > 0 and (chunk := h.rfile.read(min(length, 2**20))):
                length -= len(chunk)
            raise HubError(413, f"Request body over {self.max_body_bytes} bytes")
        return h.rfile.read(length) if length else b""

    def _route(self, method: str, raw_path: str) -> tuple[Callable[[LocalHub, Request], Reply] | None, dict[str, str]]:
        """Match the raw path (quoted: the client sends revisions and tree paths with '/' as %2F), then unquote."""
        for verb, pattern, func in _ROUTES:
            match = pattern.fullmatch(raw_path)
            if match and (method == verb or (verb == "GET" and method == "HEAD")):
                return func, {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
        return None, {}

    def _user(self, authorization: str | None) -> str | None:
        if not authorization:
            return None
        if authorization != f"Bearer {self.token}":
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.user

    def _can_write(self, user: str | None, namespace: str) -> None:
        if user is None:
            raise HubError(401, "You must be authenticated to write to the Hub")
        if namespace != user:
            raise HubError(403, f"You don't have the rights to write to the '{namespace}' namespace")

    def _repo(self, req: Request, write: bool = False) -> Repo:
        repo = self.repos.get(req.args["repo"])
        if repo is None or (repo.private and repo.namespace != req.user):
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write:
            self._can_write(req.user, repo.namespace)
        return repo

    def _resolve_rev(self, repo: Repo, rev: str) -> Commit:
        """Resolve a branch name, a full commit sha, or a unique sha prefix (>= 7 hex)."""
        sha = repo.branches.get(rev)
        if sha is None and re.fullmatch(r"[0-9a-f]{7,40}", rev):
            found = [s for s in repo.commits if s.startswith(rev)]
            sha = found[0] if len(found) == 1 else None
        if sha is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.commits[sha]

    def _store(self, key: str, data: bytes) -> None:
        (self.storage_dir / "objects" / key).write_bytes(data)  # content-addressed; callers hold the lock

    def _read(self, blob: Blob) -> bytes:
        return (self.storage_dir / "objects" / blob.key).read_bytes()

    def _new_commit(self, repo: Repo, branch: str, files: dict[str, Blob], title: str, message: str = "") -> Commit:
        parent = repo.branches.get(branch)
        seed = f"{repo.repo_id}\0{parent}\0{title}\0{time.time_ns()}\0{uuid.uuid4()}\0{sorted(files.items())}"
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, title, message, _now(), files)
        repo.commits[commit.sha] = commit
        repo.branches[branch] = commit.sha
        return commit

    def _upload_mode(self, path: str, size: int) -> str:
        name = path.rsplit("/", 1)[-1]
        is_lfs = size > self.lfs_threshold or any(fnmatch(name, p) for p in self.lfs_patterns)
        return "lfs" if is_lfs else "regular"

    def _whoami(self, req: Request) -> Reply:
        if req.user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return _json({"type": "user", "name": req.user, "fullname": req.user, "isPro": False, "orgs": [],
                      "auth": {"type": "access_token", "accessToken": {"displayName": "localhub", "role": "write"}}})

    def _create_repo(self, req: Request) -> Reply:
        body = req.json()
        if body.get("type", "model") != "model" or not body.get("name"):
            raise HubError(400, "LocalHub only hosts model repos, and needs a name")
        namespace = body.get("organization") or req.user
        self._can_write(req.user, namespace or "")
        repo_id = f"{namespace}/{body['name']}"
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            return _json({"error": "You already created this model repo", "url": url}, 409)
        private = body.get("visibility", "private" if body.get("private") else "public") == "private"
        repo = self.repos[repo_id] = Repo(repo_id, private, _now())
        attributes = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in self.lfs_patterns).encode()
        self._store(_git_oid(attributes), attributes)
        self._new_commit(repo, "main", {".gitattributes": Blob(_git_oid(attributes), len(attributes))},
                         "initial commit")
        return _json({"url": url, "name": repo_id, "id": uuid.uuid4().hex[:24]})

    def _delete_repo(self, req: Request) -> Reply:
        body = req.json()
        req.args["repo"] = f"{body.get('organization') or req.user}/{body.get('name')}"
        del self.repos[self._repo(req, write=True).repo_id]
        return _json({})

    def _validate_yaml(self, req: Request) -> Reply:
        return _json({"errors": [], "warnings": []})

    def _model_info(self, req: Request) -> Reply:
        repo = self._repo(req)
        commit = self._resolve_rev(repo, req.args.get("rev", "main"))
        siblings = [{"rfilename": path, **(blob.sibling_metadata() if req.flag("blobs") else {})}
                    for path, blob in sorted(commit.files.items())]
        info: dict[str, Any] = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id, "modelId": repo.repo_id,
            "author": repo.namespace, "sha": commit.sha, "lastModified": commit.date, "createdAt": repo.created_at,
            "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
            "siblings": siblings, "usedStorage": sum(b.size for b in commit.files.values()),
        }
        if "README.md" in commit.files and (card := _card_data(self._read(commit.files["README.md"]))):
            info.update(cardData=card, tags=card.get("tags") or [], library_name=card.get("library_name"))
        return _json(info)

    def _tree(self, req: Request) -> Reply:
        commit = self._resolve_rev(self._repo(req), req.args["rev"])
        files, base = commit.files, req.args.get("path", "").strip("/")
        if base and base not in _folders(files):
            raise HubError(404, f"{base} does not exist on {req.args['rev']}", "EntryNotFound")
        prefix = f"{base}/" if base else ""
        listed = [p for p in [*sorted(_folders(files)), *sorted(files)] if p.startswith(prefix)]
        listed = [p for p in listed if req.flag("recursive") or "/" not in p[len(prefix):]]  # folders first
        return _json([files[p].entry(p) if p in files else _folder_entry(p, files) for p in listed])

    def _refs(self, req: Request) -> Reply:
        repo = self._repo(req)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in sorted(repo.branches.items())]
        out: dict[str, Any] = {"branches": branches, "converts": [], "tags": []}
        if req.flag("include_prs"):
            out["pullRequests"] = []
        return _json(out)

    def _commits(self, req: Request) -> Reply:
        repo = self._repo(req)
        commit: Commit | None = self._resolve_rev(repo, req.args["rev"])
        out = []
        while commit is not None:
            out.append({"id": commit.sha, "title": commit.title, "message": commit.message, "date": commit.date,
                        "authors": [{"user": repo.namespace}]})
            commit = repo.commits.get(commit.parent) if commit.parent else None
        return _json(out)

    def _create_branch(self, req: Request) -> Reply:
        repo = self._repo(req, write=True)
        if req.args["branch"] in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{req.args['branch']}")
        start = self._resolve_rev(repo, req.json().get("startingPoint") or "main")
        repo.branches[req.args["branch"]] = start.sha
        return _json({})

    def _preupload(self, req: Request) -> Reply:
        repo = self._repo(req, write=True)
        commit = self._resolve_rev(repo, req.args["rev"])
        files = []
        for item in req.json().get("files", []):
            mode = self._upload_mode(item["path"], int(item["size"]))
            current = commit.files.get(item["path"])
            # the client compares `oid` to its own: sha256 for LFS files, git blob id for regular ones
            oid = None if current is None else (current.sha256 if mode == "lfs" else current.oid)
            files.append({"path": item["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return _json({"files": files, "commitOid": commit.sha})

    def _lfs_batch(self, req: Request) -> Reply:
        repo = self._repo(req, write=True)
        body = req.json()
        if body.get("operation") != "upload":
            raise HubError(400, "LocalHub only supports the LFS 'upload' operation")
        objects = []
        for obj in body.get("objects", []):
            oid, size = str(obj.get("oid")), int(obj.get("size", -1))
            if not re.fullmatch(r"[0-9a-f]{64}", oid) or not 0 <= size <= self.max_body_bytes:
                objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "Invalid object"}})
            elif oid in repo.lfs:
                objects.append({"oid": oid, "size": size})  # already there: no actions => client skips upload
            else:
                ticket = uuid.uuid4().hex
                self._tickets[ticket] = (repo.repo_id, oid, size)
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                    "upload": {"href": f"{self.endpoint}/lfs-upload/{ticket}"},
                    "verify": {"href": f"{self.endpoint}/{repo.repo_id}.git/info/lfs/objects/verify"},
                }})
        return _json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_upload(self, req: Request) -> Reply:
        """The 'basic' transfer PUT. It carries no token (as with the Hub's signed URLs): the ticket is the key."""
        repo_id, oid, size = self._tickets.get(req.args["ticket"]) or ("", "", -1)
        if repo_id not in self.repos:
            raise HubError(403, "Unknown or expired upload ticket")
        if len(req.body) != size or hashlib.sha256(req.body).hexdigest() != oid:
            raise HubError(400, "Uploaded content does not match the announced sha256 and size")
        self._store(oid, req.body)
        self.repos[repo_id].lfs[oid] = size
        del self._tickets[req.args["ticket"]]
        return Reply(200, headers={"ETag": f'"{oid}"'})

    def _lfs_verify(self, req: Request) -> Reply:
        repo = self._repo(req)
        if req.json().get("oid") not in repo.lfs:
            raise HubError(404, "Object not found")
        return _json({"success": True})

    def _commit(self, req: Request) -> Reply:
        repo = self._repo(req, write=True)
        if req.flag("create_pr"):
            raise HubError(400, "LocalHub does not support create_pr")
        branch = req.args["rev"]
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        try:
            lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        except ValueError as err:
            raise HubError(400, f"Invalid NDJSON commit payload: {err}") from err
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first NDJSON line must be the commit header")
        header = lines[0].get("value") or {}
        parent = header.get("parentCommit")
        if parent and not repo.branches[branch].startswith(parent):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[repo.branches[branch]].files)
        for line in lines[1:]:
            if (apply := _APPLY.get(line.get("key"))) is None:
                raise HubError(400, f"Unsupported commit operation: {line.get('key')}")
            apply(self, repo, files, line.get("value") or {})
        commit = self._new_commit(repo, branch, files, header.get("summary") or "", header.get("description") or "")
        return _json({"success": True, "commitOid": commit.sha, "commitUrl": f"{self.endpoint}/{repo.repo_id}/commit/"
                      f"{commit.sha}", "hookOutput": ""})

    def _op_file(self, repo: Repo, files: dict[str, Blob], value: dict[str, Any]) -> None:
        if value.get("encoding") != "base64":
            raise HubError(400, "Only base64-encoded regular files are supported")
        data = base64.b64decode(value["content"])
        self._store(_git_oid(data), data)
        files[value["path"]] = Blob(_git_oid(data), len(data))

    def _op_lfs_file(self, repo: Repo, files: dict[str, Blob], value: dict[str, Any]) -> None:
        oid, size = value.get("oid", ""), repo.lfs.get(value.get("oid", ""), -1)
        if value.get("algo", "sha256") != "sha256" or size < 0 or value.get("size", size) != size:
            raise HubError(400, f"LFS pointer to an object never uploaded (or of another size): {value.get('path')}")
        files[value["path"]] = Blob(_git_oid(_LFS_POINTER.format(oid=oid, size=size).encode()), size, oid)

    def _op_delete_file(self, repo: Repo, files: dict[str, Blob], value: dict[str, Any]) -> None:
        if files.pop(value.get("path", ""), None) is None:
            raise HubError(404, f"A file with this name doesn't exist: {value.get('path')}", "EntryNotFound")

    def _op_delete_folder(self, repo: Repo, files: dict[str, Blob], value: dict[str, Any]) -> None:
        prefix = value.get("path", "").strip("/") + "/"
        doomed = [p for p in files if p.startswith(prefix) or prefix == "/"]
        if not doomed:
            raise HubError(404, f"A folder with this name doesn't exist: {value.get('path')}", "EntryNotFound")
        for path in doomed:
            del files[path]

    def _resolve(self, req: Request) -> Reply:
        commit = self._resolve_rev(self._repo(req), req.args["rev"])
        blob = commit.files.get(req.args["path"])
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        headers = {"Content-Type": "application/octet-stream", "ETag": f'"{blob.key}"', "X-Repo-Commit": commit.sha}
        if blob.sha256:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
        if req.method == "HEAD":
            return Reply(200, headers={**headers, "Content-Length": str(blob.size)})
        return Reply(200, self._read(blob), headers)  # Range is ignored: http_get then restarts from byte 0


_APPLY = {"file": LocalHub._op_file, "lfsFile": LocalHub._op_lfs_file,
          "deletedFile": LocalHub._op_delete_file, "deletedFolder": LocalHub._op_delete_folder}

_ROUTES: list[tuple[str, re.Pattern[str], Callable[[LocalHub, Request], Reply]]] = [
    (verb, re.compile(pattern), func) for verb, pattern, func in [
        ("GET", r"/api/whoami-v2", LocalHub._whoami),
        ("POST", r"/api/repos/create", LocalHub._create_repo),
        ("DELETE", r"/api/repos/delete", LocalHub._delete_repo),
        ("POST", r"/api/validate-yaml", LocalHub._validate_yaml),
        ("GET", rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", LocalHub._model_info),
        ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", LocalHub._tree),
        ("GET", rf"/api/models/{_REPO}/refs", LocalHub._refs),
        ("GET", rf"/api/models/{_REPO}/commits/(?P<rev>[^/]+)", LocalHub._commits),
        ("POST", rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", LocalHub._create_branch),
        ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", LocalHub._preupload),
        ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", LocalHub._commit),
        ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", LocalHub._lfs_batch),
        ("POST", rf"/{_REPO}\.git/info/lfs/objects/verify", LocalHub._lfs_verify),
        ("PUT", r"/lfs-upload/(?P<ticket>[0-9a-f]{32})", LocalHub._lfs_upload),
        ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", LocalHub._resolve),
    ]
]


def _folders(files: dict[str, Blob]) -> set[str]:
    return {path.rsplit("/", i)[0] for path in files for i in range(1, path.count("/") + 1)}


def _folder_entry(path: str, files: dict[str, Blob]) -> dict[str, Any]:
    listing = "".join(f"{p}\0{b.oid}\0" for p, b in sorted(files.items()) if p.startswith(f"{path}/"))
    return {"type": "directory", "oid": hashlib.sha1(listing.encode()).hexdigest(), "size": 0, "path": path}


def _card_data(readme: bytes) -> dict[str, Any] | None:
    """YAML front matter of a README, as the Hub's `cardData`; None without pyyaml or front matter."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", readme.decode("utf-8", "replace"), re.DOTALL)
    try:
        import yaml
    except ImportError:
        return None
    data = yaml.safe_load(match.group(1)) if match else None
    return data if isinstance(data, dict) else None


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive handler (huggingface_hub reuses connections); `hub` and `timeout` set per server."""

    protocol_version = "HTTP/1.1"
    hub: LocalHub

    def setup(self) -> None:
        super().setup()
        # headers and body go out in two writes: without NODELAY each request stalls ~40 ms (Nagle + delayed ACK)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.hub._conns.add(self.connection)

    def finish(self) -> None:
        self.hub._conns.discard(self.connection)
        super().finish()

    def do_GET(self) -> None:
        self.hub._dispatch(self)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: nothing the server sees (tokens included) is written to stderr or log files."""


def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **hub_kwargs: Any) -> LocalHub:
    """Start a LocalHub for this test and point huggingface_hub (so transformers and peft too) at it.

    Setting HF_ENDPOINT in a test is not enough: huggingface_hub copies its env vars into module globals at import.
    So, through `monkeypatch` (everything undone at teardown), this sets the env vars (HF_ENDPOINT, HF_TOKEN = the
    server's fake token, HF_HOME / HF_HUB_CACHE under tmp_path, HF_HUB_OFFLINE=0, HF_HUB_DISABLE_XET=1 since hf-xet
    is installed and would take over transfers, HF_HUB_DISABLE_TELEMETRY=1) for code reading them later and for
    subprocesses, and patches what was already read:
    - `huggingface_hub.constants`: ENDPOINT (read by every HfApi() built later and by the download helpers),
      HUGGINGFACE_CO_URL_TEMPLATE (the /resolve URL, built from ENDPOINT at import), HF_URL_HOSTS (+127.0.0.1),
      HF_HUB_OFFLINE, HF_HUB_DISABLE_XET, the cache paths, HF_TOKEN_PATH / HF_STORED_TOKENS_PATH (a real login on
      this machine is never read) and HF_HUB_DISABLE_TELEMETRY (else the user agent fetches /api/agent-harnesses);
    - `huggingface_hub.hf_api.api.endpoint`: the module-level HfApi behind `huggingface_hub.create_repo`,
      `file_exists` (used by peft), ... was built at import; `utils._cache_manager.HF_HUB_CACHE` (copied at import);
    - `transformers.utils.hub._hf_api`, transformers' cached HfApi, reset if transformers is imported;
    and closes huggingface_hub's shared HTTP client so no pooled connection to an earlier server is reused.
    `utils._http._HUB_ORIGINS` is left alone: it only vets cross-origin redirects, and this server never redirects.
    Lifetime: `monkeypatch.setattr(hub, "serving", True)` starts the server; monkeypatch's teardown sets `serving`
    back to False, which stops it.
    """
    import sys

    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _cache_manager, close_session

    hub = LocalHub(tmp_path / "localhub-storage", **hub_kwargs)
    monkeypatch.setattr(hub, "serving", True)  # first in, so undone last: the server outlives the other patches
    home = tmp_path / "hf-home"
    cache = str(home / "hub")
    env = {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": hub.token, "HF_HOME": str(home), "HF_HUB_CACHE": cache,
           "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_TOKEN_PATH", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(key, raising=False)
    patches = {
        "ENDPOINT": hub.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_XET": True, "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HOME": str(home), "HF_HUB_CACHE": cache, "HUGGINGFACE_HUB_CACHE": cache,
        "HF_ASSETS_CACHE": str(home / "assets"), "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
    }
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", hub.endpoint)
    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", cache)
    if (transformers_hub := sys.modules.get("transformers.utils.hub")) is not None:
        monkeypatch.setattr(transformers_hub, "_hf_api", None)
    close_session()
    return hub
