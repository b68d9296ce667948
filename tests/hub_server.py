"""A small Hugging Face Hub-compatible HTTP server for tests (standard library only).

The real ``huggingface_hub`` client (``HfApi(endpoint=hub.url)``, ``hf_hub_download``,
``snapshot_download``) talks to it on 127.0.0.1 over plain HTTP, with the legacy (non-Xet) LFS
protocol. Model repos only.

    with HubServer(tmp_path, token="hf_test") as hub:
        api = HfApi(endpoint=hub.url, token="hf_test")
        api.create_repo("user/model", exist_ok=True)
        ...
        hub.fail("POST", r"/commit/", status=500)  # next commit call answers 500
        hub.commits("user/model")                  # newest first

The client must run with Xet disabled (``huggingface_hub.constants.HF_HUB_DISABLE_XET = True``):
with ``hf_xet`` installed, uploads otherwise go to a Xet CAS server that this server does not
implement. See ``tests/test_hub_server.py`` for the environment the client needs.

Storage: file contents are kept on disk, content-addressed by sha256, under ``root/blobs``;
repos, branches and every commit (with its full file map) are kept in memory and mirrored to
``root/state.json`` after each change, so a new ``HubServer(root)`` resumes the same state.

Routes (``{repo}`` is ``namespace/name``; path segments are URL-decoded one by one, so a
revision or branch sent as ``feature%2Fx`` is the branch ``feature/x``):

    POST   /api/repos/create                            create_repo (409 + {"url"} if it exists)
    DELETE /api/repos/delete                            delete_repo
    GET    /api/whoami-v2                               whoami
    POST   /api/validate-yaml                           README.md metadata check (always valid)
    GET    /api/models/{repo}[/revision/{rev}]          model_info / repo_info (?blobs=true)
    GET    /api/models/{repo}/tree/{rev}[/{path}]       list_repo_tree / list_repo_files
    POST   /api/models/{repo}/paths-info/{rev}          get_paths_info (form or JSON body)
    POST   /api/models/{repo}/preupload/{rev}           upload modes + current oid per file
    POST   /api/models/{repo}/commit/{rev}              NDJSON commit (file/lfsFile/deleted*)
    POST   /api/models/{repo}/branch/{branch}           create_branch (DELETE: delete_branch)
    GET    /api/models/{repo}/refs                      list_repo_refs
    GET    /api/models/{repo}/commits/{rev}             list_repo_commits
    PUT    /api/models/{repo}/settings                  update_repo_settings (private, gated)
    POST   /{repo}.git/info/lfs/objects/batch           LFS batch API, basic transfer
    POST   /{repo}.git/info/lfs/objects/verify          LFS verify action
    PUT    /_lfs/{repo}/{oid}?ticket=...                LFS upload href (plays the S3 URL)
    HEAD   /{repo}/resolve/{rev}/{path}                 file metadata headers
    GET    /{repo}/resolve/{rev}/{path}                 file bytes (single Range supported)
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import json
import os
import re
import secrets
import socket
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubServer", "LFS_THRESHOLD", "git_blob_oid", "lfs_pointer"]

# Files of at least this many bytes are uploaded as LFS (the Hub's 10 MB rule).
LFS_THRESHOLD = 10 * 1000 * 1000
DEFAULT_LFS_PATTERNS = ("*.safetensors",)
MAX_BODY = 4 * 1024**3

# What the Hub writes into a new repo's first commit (abridged).
GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z",
        "*.bin",
        "*.gguf",
        "*.h5",
        "*.msgpack",
        "*.npy",
        "*.npz",
        "*.onnx",
        "*.ot",
        "*.parquet",
        "*.pickle",
        "*.pkl",
        "*.pt",
        "*.pth",
        "*.safetensors",
        "*.tar.*",
        "*.tflite",
        "*.zip",
        "*tfevents*",
    )
)

_HEX40 = re.compile(r"[0-9a-f]{40}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SHORT_SHA = re.compile(r"[0-9a-f]{7,40}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1 of ``data`` (what the Hub reports as a regular file's oid / ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file stored in git for an LFS file."""
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


def _now() -> str:
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _truthy(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _valid_path(path: Any) -> bool:
    if not isinstance(path, str) or not path or path.startswith("/") or path.endswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in path.split("/")) and "\0" not in path


class _HTTPError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        body: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.body = body


class _Response:
    def __init__(
        self,
        status: int = 200,
        body: bytes | dict | list | None = None,
        headers: dict[str, str] | None = None,
        content_length: int | None = None,
    ) -> None:
        self.status = status
        self.headers = dict(headers or {})
        if isinstance(body, dict | list):
            self.body = json.dumps(body).encode()
            self.headers.setdefault("Content-Type", "application/json")
        else:
            self.body = body or b""
        # For HEAD: the length the GET would have.
        self.content_length = len(self.body) if content_length is None else content_length


class _Rule:
    def __init__(self, method: str, pattern: str, times: int, **extra: Any) -> None:
        self.method = method.upper()
        self.regex = re.compile(pattern)
        self.times = times
        self.extra = extra

    def matches(self, method: str, path: str) -> bool:
        return (
            self.times > 0
            and (self.method in ("*", method.upper()))
            and self.regex.search(path) is not None
        )


class _Request:
    def __init__(self, method: str, raw_path: str, headers: Any, body: bytes) -> None:
        split = urlsplit(raw_path)
        self.method = method
        self.raw_path = split.path
        self.query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        self.segments = [unquote(s) for s in split.path.split("/")[1:]]
        self.path = unquote(split.path)
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _HTTPError(400, f"Invalid JSON body: {exc}") from exc


class HubServer:
    """An in-process Hub for tests; see the module docstring for the routes.

    Args:
        root: directory holding the blobs and ``state.json`` (created if missing).
        token: if set, every write needs ``Authorization: Bearer <token>``, and so does every
            read of a private repo (or a file download from a gated one). A request carrying a
            different bearer token is refused with 401 "Invalid credentials in Authorization
            header" (the client raises a plain ``HfHubHTTPError`` for that).
        user: the namespace used when ``create_repo`` gets a name without one, and whoami's name.
        page_size: entries per page of a tree listing (more pages are linked with ``Link``).
        lfs_threshold / lfs_patterns: preupload answers "lfs" for files of at least
            ``lfs_threshold`` bytes or whose path matches one of the fnmatch ``lfs_patterns``.
        gitattributes: whether ``create_repo`` makes an initial commit holding ``.gitattributes``
            (as the real Hub does); if False the first commit is empty.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        token: str | None = None,
        *,
        user: str = "user",
        page_size: int = 1000,
        lfs_threshold: int = LFS_THRESHOLD,
        lfs_patterns: tuple[str, ...] = DEFAULT_LFS_PATTERNS,
        gitattributes: bool = True,
    ) -> None:
        self.root = Path(root)
        self.token = token
        self.user = user
        self.page_size = max(1, page_size)
        self.lfs_threshold = lfs_threshold
        self.lfs_patterns = tuple(lfs_patterns)
        self.gitattributes = gitattributes
        self.requests: list[tuple[str, str]] = []

        self._lock = threading.RLock()
        self._closing = threading.Event()
        self._fail_rules: list[_Rule] = []
        self._stall_rules: list[_Rule] = []
        self._tickets: dict[str, tuple[str, str, int]] = {}
        self._connections: set[socket.socket] = set()
        self._counter = 0

        self._blob_dir = self.root / "blobs"
        self._blob_dir.mkdir(parents=True, exist_ok=True)
        self._state_path = self.root / "state.json"
        self._repos: dict[str, dict[str, Any]] = {}
        if self._state_path.exists():
            self._repos = json.loads(self._state_path.read_text())["repos"]

        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self
        self.port: int = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"HubServer:{self.port}",
            daemon=True,
        )
        self._thread.start()

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving; open connections are cut and stalled requests are woken up."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------ test helpers

    def fail(self, method: str, path_pattern: str, status: int = 500, times: int = 1) -> None:
        """Answer the next ``times`` requests matching ``method`` ("*" = any) and the regex
        ``path_pattern`` (searched in the URL-decoded path, no query) with ``status`` and a JSON
        error body, without changing anything. Note that the client retries 429/500/502/503/504
        (with 1, 2, 4, 8 s sleeps, 5 retries) on preupload, LFS batch/PUT/verify and tree pages,
        and retries a failed HEAD once; POST /commit and GET /api/models/... are not retried."""
        with self._lock:
            self._fail_rules.append(_Rule(method, path_pattern, times, status=status))

    def stall(self, method: str, path_pattern: str, seconds: float, times: int = 1) -> None:
        """Delay the next ``times`` matching requests by ``seconds`` (after reading the request
        body, before handling it). The request is still carried out afterwards, as a slow server
        would, even if the client has given up in the meantime."""
        with self._lock:
            self._stall_rules.append(_Rule(method, path_pattern, times, seconds=seconds))

    def corrupt(self, repo_id: str, filename: str, revision: str = "main") -> None:
        """Flip one byte of the stored content of ``filename`` (same size). What the server
        reports (sha256, oid, ETag, size) does not change. Content is stored by sha256, so every
        file with the same content, in any repo or commit, is corrupted with it."""
        with self._lock:
            entry = self._file_entry(repo_id, filename, revision)
            if entry["size"] == 0:
                raise ValueError(f"{filename} is empty: nothing to corrupt")
            path = self._blob_path(entry["sha256"])
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))

    def commits(self, repo_id: str, branch: str = "main") -> list[str]:
        """Commit ids reachable from ``branch`` (or a commit id), newest first."""
        with self._lock:
            repo = self._repo_or_raise(repo_id)
            cid = self._resolve(repo, branch)
            if cid is None:
                raise KeyError(f"{repo_id}: no revision {branch!r}")
            out = []
            while cid is not None:
                out.append(cid)
                cid = repo["commits"][cid]["parent"]
            return out

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Path -> bytes as stored now (corruption included) at ``revision``."""
        with self._lock:
            repo = self._repo_or_raise(repo_id)
            cid = self._resolve(repo, revision)
            if cid is None:
                raise KeyError(f"{repo_id}: no revision {revision!r}")
            entries = dict(repo["commits"][cid]["files"])
        return {p: self._blob_path(e["sha256"]).read_bytes() for p, e in sorted(entries.items())}

    def branches(self, repo_id: str) -> dict[str, str]:
        """Branch name -> head commit id."""
        with self._lock:
            return dict(self._repo_or_raise(repo_id)["branches"])

    def create_repo(self, repo_id: str, *, private: bool = False) -> None:
        """Create a repo directly (no HTTP); raises ValueError if it exists."""
        with self._lock:
            if repo_id in self._repos:
                raise ValueError(f"{repo_id} exists")
            self._create_repo(repo_id, private=private)

    def commit(
        self,
        repo_id: str,
        files: dict[str, bytes] | None = None,
        *,
        deletes: tuple[str, ...] | list[str] = (),
        branch: str = "main",
        message: str = "Server-side commit",
    ) -> str:
        """Commit directly (no HTTP), with the preupload LFS rule; returns the head commit id
        (unchanged if nothing changed)."""
        with self._lock:
            repo = self._repo_or_raise(repo_id)
            if branch not in repo["branches"]:
                raise KeyError(f"{repo_id}: no branch {branch!r}")
            new = dict(repo["commits"][repo["branches"][branch]]["files"])
            for path, data in (files or {}).items():
                if not _valid_path(path):
                    raise ValueError(f"invalid path {path!r}")
                lfs = self._upload_mode(path, len(data)) == "lfs"
                new[path] = self._store_content(data, lfs=lfs)
                if lfs:
                    self._add_lfs_object(repo, new[path]["sha256"])
            for path in deletes:
                new.pop(path)
            return self._make_commit(repo_id, repo, branch, new, message, "")

    # ------------------------------------------------------------------ storage

    def _save(self) -> None:
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"repos": self._repos}))
        os.replace(tmp, self._state_path)

    def _blob_path(self, sha256: str) -> Path:
        return self._blob_dir / sha256

    def _write_blob(self, sha256: str, data: bytes) -> None:
        path = self._blob_path(sha256)
        tmp = path.with_name(f"{sha256}.{secrets.token_hex(4)}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def _store_content(self, data: bytes, *, lfs: bool) -> dict[str, Any]:
        sha256 = hashlib.sha256(data).hexdigest()
        self._write_blob(sha256, data)
        oid = git_blob_oid(lfs_pointer(sha256, len(data)) if lfs else data)
        return {"sha256": sha256, "size": len(data), "lfs": lfs, "oid": oid}

    def _add_lfs_object(self, repo: dict[str, Any], sha256: str) -> None:
        if sha256 not in repo["lfs_objects"]:
            repo["lfs_objects"].append(sha256)

    def _upload_mode(self, path: str, size: int) -> str:
        if size == 0:
            return "regular"
        if size >= self.lfs_threshold:
            return "lfs"
        name = path.rsplit("/", 1)[-1]
        if any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(name, p) for p in self.lfs_patterns):
            return "lfs"
        return "regular"

    def _create_repo(self, repo_id: str, *, private: bool) -> dict[str, Any]:
        repo: dict[str, Any] = {
            "private": bool(private),
            "gated": False,
            "created_at": _now(),
            "branches": {},
            "commits": {},
            "lfs_objects": [],
        }
        self._repos[repo_id] = repo
        files = {}
        if self.gitattributes:
            files[".gitattributes"] = self._store_content(GITATTRIBUTES.encode(), lfs=False)
        cid = self._new_commit_id(None, files, "initial commit")
        repo["commits"][cid] = {
            "parent": None,
            "files": files,
            "title": "initial commit",
            "message": "",
            "date": _now(),
        }
        repo["branches"]["main"] = cid
        self._save()
        return repo

    def _new_commit_id(self, parent: str | None, files: dict, title: str) -> str:
        self._counter += 1
        payload = json.dumps([parent, files, title, self._counter, time.time_ns()], sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()

    def _make_commit(
        self,
        repo_id: str,
        repo: dict[str, Any],
        branch: str,
        files: dict[str, Any],
        title: str,
        message: str,
    ) -> str:
        head = repo["branches"][branch]
        if files == repo["commits"][head]["files"]:
            return head  # nothing changed: no new commit
        cid = self._new_commit_id(head, files, title)
        repo["commits"][cid] = {
            "parent": head,
            "files": files,
            "title": title,
            "message": message,
            "date": _now(),
        }
        repo["branches"][branch] = cid
        self._save()
        return cid

    def _repo_or_raise(self, repo_id: str) -> dict[str, Any]:
        try:
            return self._repos[repo_id]
        except KeyError:
            raise KeyError(f"no repo {repo_id!r}") from None

    def _file_entry(self, repo_id: str, filename: str, revision: str) -> dict[str, Any]:
        repo = self._repo_or_raise(repo_id)
        cid = self._resolve(repo, revision)
        if cid is None:
            raise KeyError(f"{repo_id}: no revision {revision!r}")
        try:
            return repo["commits"][cid]["files"][filename]
        except KeyError:
            raise KeyError(f"{repo_id}@{revision}: no file {filename!r}") from None

    @staticmethod
    def _resolve(repo: dict[str, Any], rev: str) -> str | None:
        if rev.startswith("refs/heads/"):
            rev = rev[len("refs/heads/") :]
        if rev in repo["branches"]:
            return repo["branches"][rev]
        if _SHORT_SHA.fullmatch(rev):
            matches = [cid for cid in repo["commits"] if cid.startswith(rev)]
            if len(matches) == 1:
                return matches[0]
        return None

    # ------------------------------------------------------------------ request handling

    def _handle(self, req: _Request) -> _Response:
        with self._lock:
            self.requests.append((req.method, req.path))
            stall = next((r for r in self._stall_rules if r.matches(req.method, req.path)), None)
            if stall is not None:
                stall.times -= 1
        if stall is not None:
            self._closing.wait(stall.extra["seconds"])
        with self._lock:
            fail = next((r for r in self._fail_rules if r.matches(req.method, req.path)), None)
            if fail is not None:
                fail.times -= 1
        if fail is not None:
            status = fail.extra["status"]
            return _Response(
                status,
                {"error": f"Injected failure ({status}) for {req.method} {req.path}"},
                {"X-Error-Message": "Injected failure"},
            )
        try:
            return self._route(req)
        except _HTTPError as err:
            headers = dict(err.headers)
            if err.code:
                headers["X-Error-Code"] = err.code
            headers["X-Error-Message"] = err.message
            return _Response(err.status, err.body or {"error": err.message}, headers)

    def _auth(self, req: _Request) -> str:
        """'ok' (valid token, or the server has none), 'none' (no token sent)."""
        header = req.headers.get("Authorization") or ""
        sent = header[len("Bearer ") :].strip() if header.startswith("Bearer ") else None
        if self.token is None:
            return "ok"
        if not sent:
            return "none"
        if sent == self.token:
            return "ok"
        raise _HTTPError(401, "Invalid credentials in Authorization header")

    def _read_repo(self, req: _Request, repo_id: str) -> dict[str, Any]:
        auth = self._auth(req)
        repo = self._repos.get(repo_id)
        if repo is None or (repo["private"] and auth != "ok"):
            raise _HTTPError(
                401 if auth != "ok" else 404, "Repository not found", code="RepoNotFound"
            )
        return repo

    def _write_repo(self, req: _Request, repo_id: str) -> dict[str, Any]:
        repo = self._read_repo(req, repo_id)
        if self._auth(req) != "ok":
            raise _HTTPError(401, "You must be authenticated to write to this repo", "RepoNotFound")
        return repo

    def _rev(self, repo: dict[str, Any], rev: str) -> str:
        cid = self._resolve(repo, rev)
        if cid is None:
            raise _HTTPError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        return cid

    def _route(self, req: _Request) -> _Response:
        seg, method = req.segments, req.method
        if seg[:2] == ["api", "repos"] and len(seg) == 3:
            if seg[2] == "create" and method == "POST":
                return self._api_create_repo(req)
            if seg[2] == "delete" and method == "DELETE":
                return self._api_delete_repo(req)
        if seg == ["api", "whoami-v2"] and method == "GET":
            return self._api_whoami(req)
        if seg == ["api", "validate-yaml"] and method == "POST":
            return _Response(200, {"errors": [], "warnings": []})
        if len(seg) >= 4 and seg[0] == "api" and seg[1] in ("datasets", "spaces", "kernels"):
            raise _HTTPError(404, "This test hub only serves model repos", code="RepoNotFound")
        if len(seg) >= 4 and seg[:2] == ["api", "models"]:
            repo_id, rest = f"{seg[2]}/{seg[3]}", seg[4:]
            with self._lock:
                return self._api_model(req, repo_id, rest)
        if len(seg) >= 4 and seg[0] == "_lfs" and method == "PUT":
            return self._lfs_put(req, f"{seg[1]}/{seg[2]}", seg[3])
        if len(seg) == 6 and seg[1].endswith(".git") and seg[2:5] == ["info", "lfs", "objects"]:
            repo_id = f"{seg[0]}/{seg[1][: -len('.git')]}"
            with self._lock:
                if seg[5] == "batch" and method == "POST":
                    return self._lfs_batch(req, repo_id)
                if seg[5] == "verify" and method == "POST":
                    return self._lfs_verify(req, repo_id)
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve_file(req, f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]))
        raise _HTTPError(404, f"Not found: {method} {req.path}")

    # ---- /api/repos, whoami

    def _api_create_repo(self, req: _Request) -> _Response:
        body = req.json()
        if self._auth(req) != "ok":
            raise _HTTPError(401, "Invalid username or password.")
        if body.get("type") not in (None, "model"):
            raise _HTTPError(400, "This test hub only serves model repos")
        name, org = body.get("name"), body.get("organization") or self.user
        if not all(isinstance(x, str) and _NAME.fullmatch(x) for x in (name, org)):
            raise _HTTPError(400, f"Invalid repo name: {org}/{name}")
        if "--" in name or ".." in name:
            raise _HTTPError(400, f"Invalid repo name: {org}/{name}")
        repo_id = f"{org}/{name}"
        url = f"{self.url}/{repo_id}"
        private = body.get("visibility") == "private" or _truthy(body.get("private", False))
        with self._lock:
            if repo_id in self._repos:
                raise _HTTPError(
                    409,
                    "You already created this model repo",
                    body={"error": "You already created this model repo", "url": url},
                )
            self._create_repo(repo_id, private=private)
        return _Response(200, {"url": url, "name": repo_id, "id": repo_id})

    def _api_delete_repo(self, req: _Request) -> _Response:
        body = req.json()
        repo_id = f"{body.get('organization') or self.user}/{body.get('name')}"
        with self._lock:
            self._write_repo(req, repo_id)
            del self._repos[repo_id]
            self._save()
        return _Response(200, {})

    def _api_whoami(self, req: _Request) -> _Response:
        if self._auth(req) != "ok":
            raise _HTTPError(401, "Invalid credentials in Authorization header")
        return _Response(
            200,
            {
                "type": "user",
                "name": self.user,
                "fullname": self.user,
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "test", "role": "write"},
                },
            },
        )

    # ---- /api/models/{repo}/...

    def _api_model(self, req: _Request, repo_id: str, rest: list[str]) -> _Response:
        method = req.method
        if not rest and method == "GET":
            return self._model_info(req, repo_id, "main")
        if len(rest) == 2 and rest[0] == "revision" and method == "GET":
            return self._model_info(req, repo_id, rest[1])
        if len(rest) >= 2 and rest[0] == "tree" and method == "GET":
            return self._tree(req, repo_id, rest[1], "/".join(rest[2:]).strip("/"))
        if len(rest) == 2 and rest[0] == "paths-info" and method == "POST":
            return self._paths_info(req, repo_id, rest[1])
        if len(rest) == 2 and rest[0] == "preupload" and method == "POST":
            return self._preupload(req, repo_id, rest[1])
        if len(rest) == 2 and rest[0] == "commit" and method == "POST":
            return self._commit(req, repo_id, rest[1])
        if len(rest) == 2 and rest[0] == "branch" and method in ("POST", "DELETE"):
            return self._branch(req, repo_id, rest[1])
        if rest == ["refs"] and method == "GET":
            return self._refs(req, repo_id)
        if len(rest) == 2 and rest[0] == "commits" and method == "GET":
            return self._list_commits(req, repo_id, rest[1])
        if rest == ["settings"] and method == "PUT":
            return self._settings(req, repo_id)
        raise _HTTPError(404, f"Not found: {method} {req.path}")

    def _model_info(self, req: _Request, repo_id: str, rev: str) -> _Response:
        repo = self._read_repo(req, repo_id)
        cid = self._rev(repo, rev)
        commit = repo["commits"][cid]
        blobs = _truthy(req.query.get("blobs", "false"))
        siblings = []
        for path, entry in sorted(commit["files"].items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if entry["lfs"]:
                    sibling["lfs"] = self._lfs_info(entry, key="sha256")
            siblings.append(sibling)
        namespace = repo_id.split("/", 1)[0]
        return _Response(
            200,
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": namespace,
                "sha": cid,
                "lastModified": commit["date"],
                "createdAt": repo["created_at"],
                "private": repo["private"],
                "gated": repo["gated"],
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                "usedStorage": sum(e["size"] for e in commit["files"].values()),
            },
        )

    @staticmethod
    def _lfs_info(entry: dict[str, Any], key: str) -> dict[str, Any]:
        return {
            key: entry["sha256"],
            "size": entry["size"],
            "pointerSize": len(lfs_pointer(entry["sha256"], entry["size"])),
        }

    def _last_commit(self, repo: dict[str, Any], cid: str, path: str, folder: bool) -> dict:
        def view(c: str) -> Any:
            files = repo["commits"][c]["files"]
            if not folder:
                return files.get(path)
            prefix = path + "/" if path else ""
            return {p: e for p, e in files.items() if p.startswith(prefix)}

        current = view(cid)
        while True:
            parent = repo["commits"][cid]["parent"]
            if parent is None or view(parent) != current:
                break
            cid = parent
        commit = repo["commits"][cid]
        return {"id": cid, "title": commit["title"], "date": commit["date"]}

    def _entries(
        self, repo: dict[str, Any], cid: str, paths: list[str], expand: bool
    ) -> list[dict[str, Any]]:
        files = repo["commits"][cid]["files"]
        out = []
        for path in paths:
            if path in files:
                entry = files[path]
                item: dict[str, Any] = {
                    "type": "file",
                    "oid": entry["oid"],
                    "size": entry["size"],
                    "path": path,
                }
                if entry["lfs"]:
                    item["lfs"] = self._lfs_info(entry, key="oid")
            else:
                prefix = path + "/"
                sub = sorted((p, e["oid"]) for p, e in files.items() if p.startswith(prefix))
                if not sub:
                    continue
                tree_oid = hashlib.sha1(json.dumps(sub).encode()).hexdigest()
                item = {"type": "directory", "oid": tree_oid, "size": 0, "path": path}
            if expand:
                item["lastCommit"] = self._last_commit(
                    repo, cid, path, folder=item["type"] == "directory"
                )
            out.append(item)
        return out

    def _tree(self, req: _Request, repo_id: str, rev: str, path: str) -> _Response:
        repo = self._read_repo(req, repo_id)
        cid = self._rev(repo, rev)
        files = repo["commits"][cid]["files"]
        recursive = _truthy(req.query.get("recursive", "false"))
        expand = _truthy(req.query.get("expand", "false"))
        prefix = path + "/" if path else ""
        if path and (path in files or not any(p.startswith(prefix) for p in files)):
            raise _HTTPError(
                404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": cid}
            )
        names: set[str] = set()
        for p in files:
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, min(depth, len(parts)) + 1):
                names.add(prefix + "/".join(parts[:i]))
        listing = sorted(names)
        try:
            cursor = max(0, int(req.query.get("cursor", "0")))
        except ValueError as exc:
            raise _HTTPError(400, "Invalid cursor") from exc
        page = listing[cursor : cursor + self.page_size]
        headers = {"X-Repo-Commit": cid}
        if cursor + self.page_size < len(listing):
            next_url = (
                f"{self.url}{req.raw_path}?recursive={str(recursive).lower()}"
                f"&expand={str(expand).lower()}&cursor={cursor + self.page_size}"
            )
            headers["Link"] = f'<{next_url}>; rel="next"'
        return _Response(200, self._entries(repo, cid, page, expand), headers)

    def _paths_info(self, req: _Request, repo_id: str, rev: str) -> _Response:
        repo = self._read_repo(req, repo_id)
        cid = self._rev(repo, rev)
        content_type = req.headers.get("Content-Type") or ""
        if "json" in content_type:
            body = req.json()
            paths, expand = body.get("paths", []), _truthy(body.get("expand", False))
        else:
            form = parse_qs(req.body.decode("utf-8", "replace"), keep_blank_values=True)
            paths, expand = form.get("paths", []), _truthy((form.get("expand") or ["false"])[-1])
        if isinstance(paths, str):
            paths = [paths]
        paths = [p.strip("/") for p in paths if isinstance(p, str)]
        return _Response(200, self._entries(repo, cid, paths, expand), {"X-Repo-Commit": cid})

    def _preupload(self, req: _Request, repo_id: str, rev: str) -> _Response:
        repo = self._write_repo(req, repo_id)
        cid = self._rev(repo, rev)
        body = req.json()
        files_in = body.get("files")
        if not isinstance(files_in, list):
            raise _HTTPError(400, "Expected a 'files' list")
        current = repo["commits"][cid]["files"]
        out = []
        for item in files_in:
            if not isinstance(item, dict) or not _valid_path(item.get("path")):
                raise _HTTPError(400, f"Invalid file entry: {item!r}")
            size = item.get("size")
            if not isinstance(size, int) or size < 0:
                raise _HTTPError(400, f"Invalid size for {item['path']}")
            answer: dict[str, Any] = {
                "path": item["path"],
                "uploadMode": self._upload_mode(item["path"], size),
                "shouldIgnore": False,
            }
            existing = current.get(item["path"])
            if existing is not None:
                # The client compares this to sha256(content) for LFS uploads and to
                # git_blob_oid(content) for regular ones, and skips files that match.
                answer["oid"] = existing["sha256"] if existing["lfs"] else existing["oid"]
            out.append(answer)
        return _Response(200, {"files": out, "commitOid": cid})

    def _commit(self, req: _Request, repo_id: str, rev: str) -> _Response:
        repo = self._write_repo(req, repo_id)
        if rev not in repo["branches"]:
            raise _HTTPError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        if _truthy(req.query.get("create_pr", "0")):
            raise _HTTPError(400, "Pull requests are not supported by this test hub")
        lines = []
        for raw in req.body.splitlines():
            if raw.strip():
                try:
                    item = json.loads(raw)
                except ValueError as exc:
                    raise _HTTPError(400, f"Invalid NDJSON line: {exc}") from exc
                if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
                    raise _HTTPError(400, "Each line must be {key, value}")
                lines.append(item)
        if not lines or lines[0].get("key") != "header":
            raise _HTTPError(400, "The first line must be the commit header")
        header = lines[0]["value"]
        title = header.get("summary")
        if not isinstance(title, str) or not title.strip():
            raise _HTTPError(400, "Commit summary is required")
        head = repo["branches"][rev]
        parent = header.get("parentCommit")
        if parent is not None and not (isinstance(parent, str) and head.startswith(parent)):
            raise _HTTPError(412, "A commit has happened since. Please refresh and try again.")

        new = dict(repo["commits"][head]["files"])
        for item in lines[1:]:
            key, value = item.get("key"), item["value"]
            path = value.get("path")
            if key in ("file", "lfsFile", "deletedFile") and not _valid_path(path):
                raise _HTTPError(400, f"Invalid path: {path!r}")
            if key == "file":
                content = value.get("content", "")
                if value.get("encoding", "base64") == "base64":
                    try:
                        data = base64.b64decode(content, validate=True)
                    except ValueError as exc:
                        raise _HTTPError(400, f"Invalid base64 for {path}") from exc
                else:
                    data = str(content).encode()
                new[path] = self._store_content(data, lfs=False)
            elif key == "lfsFile":
                oid = value.get("oid")
                if oid not in repo["lfs_objects"] or not self._blob_path(oid).exists():
                    raise _HTTPError(400, f"LFS object {oid} was not uploaded to {repo_id}")
                size = self._blob_path(oid).stat().st_size
                if value.get("size") not in (None, size):
                    raise _HTTPError(400, f"LFS object {oid} has size {size}")
                new[path] = {
                    "sha256": oid,
                    "size": size,
                    "lfs": True,
                    "oid": git_blob_oid(lfs_pointer(oid, size)),
                }
            elif key == "deletedFile":
                if path not in new:
                    raise _HTTPError(
                        404, f"A file with this name doesn't exist: {path}", "EntryNotFound"
                    )
                del new[path]
            elif key == "deletedFolder":
                prefix = str(path or "").strip("/")
                doomed = [p for p in new if not prefix or p.startswith(prefix + "/")]
                if not doomed:
                    raise _HTTPError(
                        404, f"A folder with this name doesn't exist: {path}", "EntryNotFound"
                    )
                for p in doomed:
                    del new[p]
            else:
                raise _HTTPError(400, f"Unknown commit operation: {key!r}")
        cid = self._make_commit(
            repo_id, repo, rev, new, title.strip(), str(header.get("description") or "")
        )
        return _Response(
            200,
            {
                "success": True,
                "commitOid": cid,
                "commitUrl": f"{self.url}/{repo_id}/commit/{cid}",
                "hookOutput": "",
                "pullRequestUrl": None,
            },
        )

    def _branch(self, req: _Request, repo_id: str, branch: str) -> _Response:
        repo = self._write_repo(req, repo_id)
        if req.method == "DELETE":
            if branch not in repo["branches"]:
                raise _HTTPError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
            if branch == "main":
                raise _HTTPError(403, "Cannot delete the main branch")
            del repo["branches"][branch]
            self._save()
            return _Response(200, {})
        if not branch or branch.startswith(("/", "refs/")) or ".." in branch or " " in branch:
            raise _HTTPError(400, f"Invalid branch name: {branch!r}")
        if branch in repo["branches"]:
            raise _HTTPError(409, f"Reference already exists: refs/heads/{branch}")
        start = req.json().get("startingPoint") or "main"
        repo["branches"][branch] = self._rev(repo, str(start))
        self._save()
        return _Response(200, {})

    def _refs(self, req: _Request, repo_id: str) -> _Response:
        repo = self._read_repo(req, repo_id)
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": cid}
            for name, cid in sorted(repo["branches"].items())
        ]
        return _Response(
            200, {"branches": branches, "converts": [], "tags": [], "pullRequests": []}
        )

    def _list_commits(self, req: _Request, repo_id: str, rev: str) -> _Response:
        repo = self._read_repo(req, repo_id)
        cid: str | None = self._rev(repo, rev)
        out = []
        while cid is not None:
            commit = repo["commits"][cid]
            out.append(
                {
                    "id": cid,
                    "title": commit["title"],
                    "message": commit["message"],
                    "authors": [{"user": self.user, "avatar": ""}],
                    "date": commit["date"],
                }
            )
            cid = commit["parent"]
        return _Response(200, out)

    def _settings(self, req: _Request, repo_id: str) -> _Response:
        repo = self._write_repo(req, repo_id)
        body = req.json()
        if "private" in body:
            repo["private"] = _truthy(body["private"])
        if "visibility" in body:
            repo["private"] = body["visibility"] == "private"
        if "gated" in body:
            repo["gated"] = body["gated"] if body["gated"] in ("auto", "manual") else False
        self._save()
        return _Response(200, {})

    # ---- LFS

    def _lfs_batch(self, req: _Request, repo_id: str) -> _Response:
        repo = self._write_repo(req, repo_id)
        body = req.json()
        if body.get("operation") != "upload":
            raise _HTTPError(400, "Only the 'upload' LFS operation is supported")
        objects = body.get("objects")
        if not isinstance(objects, list):
            raise _HTTPError(400, "Expected an 'objects' list")
        out = []
        for obj in objects:
            oid = obj.get("oid") if isinstance(obj, dict) else None
            size = obj.get("size") if isinstance(obj, dict) else None
            if not isinstance(oid, str) or not _HEX64.fullmatch(oid):
                out.append(
                    {
                        "oid": str(oid),
                        "size": size if isinstance(size, int) else 0,
                        "error": {"code": 422, "message": "Invalid oid"},
                    }
                )
                continue
            if not isinstance(size, int) or size < 0:
                out.append({"oid": oid, "size": 0, "error": {"code": 422, "message": "Bad size"}})
                continue
            path = self._blob_path(oid)
            if oid in repo["lfs_objects"] and path.exists() and path.stat().st_size == size:
                out.append({"oid": oid, "size": size})  # already there: no actions
                continue
            ticket = secrets.token_urlsafe(16)
            self._tickets[ticket] = (repo_id, oid, size)
            out.append(
                {
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {
                        "upload": {
                            "href": f"{self.url}/_lfs/{repo_id}/{oid}?ticket={ticket}",
                            "expires_in": 3600,
                        },
                        "verify": {
                            "href": f"{self.url}/{repo_id}.git/info/lfs/objects/verify",
                            "header": {},
                        },
                    },
                }
            )
        return _Response(
            200,
            {"transfer": "basic", "objects": out, "hash_algo": "sha256"},
            {"Content-Type": "application/vnd.git-lfs+json"},
        )

    def _lfs_put(self, req: _Request, repo_id: str, oid: str) -> _Response:
        # Like an S3 pre-signed URL: no Authorization header, the ticket is the credential.
        with self._lock:
            grant = self._tickets.get(req.query.get("ticket", ""))
        if grant is None or grant[:2] != (repo_id, oid):
            raise _HTTPError(403, "Invalid or expired upload ticket")
        size = grant[2]
        if len(req.body) != size:
            raise _HTTPError(400, f"Expected {size} bytes, got {len(req.body)}")
        if hashlib.sha256(req.body).hexdigest() != oid:
            raise _HTTPError(400, "sha256 of the uploaded content does not match the oid")
        self._write_blob(oid, req.body)
        with self._lock:
            repo = self._repos.get(repo_id)
            if repo is None:
                raise _HTTPError(404, "Repository not found", code="RepoNotFound")
            self._add_lfs_object(repo, oid)
            self._save()
        return _Response(200, b"", {"ETag": f'"{hashlib.md5(req.body).hexdigest()}"'})

    def _lfs_verify(self, req: _Request, repo_id: str) -> _Response:
        repo = self._write_repo(req, repo_id)
        body = req.json()
        oid, size = body.get("oid"), body.get("size")
        path = self._blob_path(str(oid))
        if oid not in repo["lfs_objects"] or not path.exists() or path.stat().st_size != size:
            raise _HTTPError(404, f"LFS object {oid} not found")
        return _Response(200, {})

    # ---- downloads

    def _resolve_file(self, req: _Request, repo_id: str, rev: str, path: str) -> _Response:
        with self._lock:
            repo = self._read_repo(req, repo_id)
            if repo["gated"] and self._auth(req) != "ok":
                raise _HTTPError(401, "Access to this gated repo is restricted", "GatedRepo")
            cid = self._rev(repo, rev)
            entry = repo["commits"][cid]["files"].get(path)
            if entry is None:
                raise _HTTPError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": cid})
            entry = dict(entry)
        size = entry["size"]
        headers = {
            "X-Repo-Commit": cid,
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
        }
        if entry["lfs"]:
            headers["ETag"] = f'"{entry["sha256"]}"'
            headers["X-Linked-Etag"] = f'"{entry["sha256"]}"'
            headers["X-Linked-Size"] = str(size)
        else:
            headers["ETag"] = f'"{entry["oid"]}"'
        start, end, status = 0, size - 1, 200
        range_header = req.headers.get("Range")
        if range_header and size > 0:
            match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", range_header)
            if match is None or match.groups() == ("", ""):
                raise _HTTPError(416, "Invalid range", headers={"Content-Range": f"bytes */{size}"})
            first, last = match.groups()
            if first:
                start, end = int(first), min(int(last), size - 1) if last else size - 1
            else:
                start, end = max(0, size - int(last)), size - 1
            if start > end or start >= size:
                raise _HTTPError(416, "Invalid range", headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(0, end - start + 1)
        if req.method == "HEAD":
            return _Response(status, b"", headers, content_length=length)
        with open(self._blob_path(entry["sha256"]), "rb") as f:
            f.seek(start)
            data = f.read(length)
        return _Response(status, data, headers)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    hub: HubServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # never print tracebacks to stderr


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "TestHub/1.0"
    timeout = 30  # seconds a connection may sit idle or mid-request
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.hub._lock:
            self.server.hub._connections.add(self.connection)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        with self.server.hub._lock:
            self.server.hub._connections.discard(self.connection)

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks, total = [], 0
            while True:
                line = self.rfile.readline(1024)
                if not line.endswith(b"\n"):
                    raise ValueError("truncated chunk header")
                n = int(line.split(b";", 1)[0].strip() or b"x", 16)
                if n == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += n
                if total > MAX_BODY:
                    raise ValueError("body too large")
                chunk = self.rfile.read(n)
                if len(chunk) != n:
                    raise ValueError("truncated chunk")
                chunks.append(chunk)
                self.rfile.readline(8)
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0 or length > MAX_BODY:
            raise ValueError("bad Content-Length")
        body = self.rfile.read(length) if length else b""
        if len(body) != length:
            raise ValueError("truncated body")
        return body

    def _dispatch(self) -> None:
        hub = self.server.hub
        try:
            body = self._read_body()
        except (ValueError, OSError):
            self.close_connection = True
            self._send(_Response(400, {"error": "Malformed request body"}))
            return
        try:
            req = _Request(self.command, self.path, self.headers, body)
            response = hub._handle(req)
        except Exception as exc:  # a bug in the test server must not hang the client
            response = _Response(500, {"error": f"Test hub error: {type(exc).__name__}: {exc}"})
        self._send(response)

    def _send(self, response: _Response) -> None:
        try:
            self.send_response(response.status)
            for key, value in response.headers.items():
                # Header values must be latin-1 and single-line: keep them plain ASCII.
                clean = str(value).encode("ascii", "replace").decode().replace("\r", " ")
                self.send_header(key, clean.replace("\n", " "))
            self.send_header("Content-Length", str(response.content_length))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD" and response.body:
                self.wfile.write(response.body)
            self.wfile.flush()
        except OSError:
            self.close_connection = True
