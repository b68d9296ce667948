"""The test Hub (tests/hub_server.py) driven by the real ``huggingface_hub`` client."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import numpy as np
import pytest
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
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils.sha import git_hash
from safetensors.numpy import save_file
from tests.hub_server import HubServer

TOKEN = "hf_test_token"
REPO = "user/adapter"


@pytest.fixture(autouse=True)
def hf_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the client at temporary dirs, without Xet, telemetry or an ambient token.

    huggingface_hub reads these variables once, when ``huggingface_hub.constants`` is first
    imported, and this process has usually imported it long before (transformers does, and so
    does this module). Setting the environment is therefore not enough: the client reads
    ``constants.X`` at call time, so the module attributes are patched too (monkeypatch undoes
    both). A standalone script would instead set the variables before importing the package.
    - HF_HUB_DISABLE_XET: with hf_xet installed, uploads would otherwise go to a Xet CAS server.
    - HF_HUB_DISABLE_TELEMETRY: otherwise building the request headers calls ``detect_agent()``,
      which fetches https://huggingface.co/api/agent-harnesses (a 3 s timeout with no network).
    """
    home, cache = tmp_path / "hf_home", tmp_path / "hf_cache"
    values = {
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_ETAG_TIMEOUT": 5,
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, "1" if value is True else str(value))
        monkeypatch.setattr(constants, name, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    return cache


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    with HubServer(tmp_path / "hub", token=TOKEN) as server:
        yield server


@pytest.fixture
def api(hub: HubServer) -> HfApi:
    return HfApi(endpoint=hub.url, token=TOKEN)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A small adapter folder: a JSON config and a real .safetensors file."""
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps({"r": 4, "alpha": 8}))
    rng = np.random.default_rng(0)
    save_file({"lora_A": rng.standard_normal((4, 16)).astype(np.float32)}, out / "a.safetensors")
    return out


def _local_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def _pushed(hub: HubServer, api: HfApi, folder: Path) -> str:
    api.create_repo(REPO, exist_ok=True)
    return api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="push").oid


def test_create_repo_then_exist_ok(hub: HubServer, api: HfApi) -> None:
    url = api.create_repo(REPO)
    assert url.repo_id == REPO and url == f"{hub.url}/{REPO}"
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo(REPO)
    assert exc.value.response.status_code == 409
    info = api.repo_info(REPO)
    assert info.id == REPO and info.private is False
    # Like the Hub: a new repo has one commit holding .gitattributes.
    assert info.sha == hub.commits(REPO)[0] and len(hub.commits(REPO)) == 1
    assert list(hub.files(REPO)) == [".gitattributes"]


def test_upload_folder_regular_and_lfs(hub: HubServer, api: HfApi, folder: Path) -> None:
    oid = _pushed(hub, api, folder)
    assert len(oid) == 40 and hub.commits(REPO)[0] == oid and len(hub.commits(REPO)) == 2
    info = api.model_info(REPO, files_metadata=True)
    assert info.sha == oid
    siblings = {s.rfilename: s for s in info.siblings}
    assert siblings["adapter_config.json"].lfs is None
    lfs = siblings["a.safetensors"].lfs
    sha = hashlib.sha256((folder / "a.safetensors").read_bytes()).hexdigest()
    assert lfs is not None and lfs.sha256 == sha and lfs.size == siblings["a.safetensors"].size
    # The safetensors file went through the LFS batch API and its PUT href; the JSON inline.
    assert ("PUT", f"/_lfs/{REPO}/{sha}") in hub.requests
    assert ("POST", f"/api/models/{REPO}/commit/main") in hub.requests
    files = hub.files(REPO)
    assert {k: v for k, v in files.items() if k != ".gitattributes"} == _local_files(folder)


def test_download_and_snapshot_are_identical(
    hub: HubServer, api: HfApi, folder: Path, hf_env: Path
) -> None:
    oid = _pushed(hub, api, folder)
    local = _local_files(folder)
    path = hf_hub_download(REPO, "a.safetensors", endpoint=hub.url, token=TOKEN)
    assert Path(path).read_bytes() == local["a.safetensors"]
    assert Path(path).parent.name == oid  # cache layout: snapshots/<commit>/<file>
    snap = Path(snapshot_download(REPO, endpoint=hub.url, token=TOKEN))
    assert snap.name == oid and snap.is_relative_to(hf_env)
    got = _local_files(snap)
    assert got.pop(".gitattributes").startswith(b"*.")
    assert got == local


def test_unchanged_upload_makes_no_commit(hub: HubServer, api: HfApi, folder: Path) -> None:
    oid = _pushed(hub, api, folder)
    before = hub.commits(REPO)
    hub.requests.clear()
    again = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="again")
    # The client compares preupload's oid with its own hash of each file, drops the unchanged
    # ones and, with nothing left, skips POST /commit and returns the current head from repo_info.
    assert again.oid == oid
    assert hub.commits(REPO) == before
    methods_paths = set(hub.requests)
    assert ("POST", f"/api/models/{REPO}/commit/main") not in methods_paths
    assert not any(method == "PUT" for method, _ in methods_paths)


def test_changed_file_makes_one_commit_old_commit_stays(
    hub: HubServer, api: HfApi, folder: Path, tmp_path: Path
) -> None:
    old = _pushed(hub, api, folder)
    old_config = (folder / "adapter_config.json").read_bytes()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "alpha": 16}))
    hub.requests.clear()
    new = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="r=8").oid
    assert new != old and hub.commits(REPO)[:2] == [new, old]
    assert not any(method == "PUT" for method, _ in hub.requests)  # the LFS file is unchanged
    assert api.list_repo_commits(REPO)[0].title == "r=8"

    at_old = hf_hub_download(
        REPO, "adapter_config.json", revision=old, endpoint=hub.url, token=TOKEN
    )
    assert Path(at_old).read_bytes() == old_config
    at_main = hf_hub_download(REPO, "adapter_config.json", endpoint=hub.url, token=TOKEN)
    assert Path(at_main).read_bytes() == (folder / "adapter_config.json").read_bytes()
    snap = snapshot_download(REPO, revision=old, endpoint=hub.url, token=TOKEN)
    assert (Path(snap) / "adapter_config.json").read_bytes() == old_config
    assert api.repo_info(REPO, revision=old).sha == old
    assert hub.files(REPO, old)["adapter_config.json"] == old_config


def test_tree_reports_lfs_sha256_and_git_oids(hub: HubServer, api: HfApi, folder: Path) -> None:
    oid = _pushed(hub, api, folder)
    entries = {e.path: e for e in api.list_repo_tree(REPO, expand=True)}
    weights = (folder / "a.safetensors").read_bytes()
    lfs = entries["a.safetensors"].lfs
    assert lfs is not None and lfs.sha256 == hashlib.sha256(weights).hexdigest()
    assert lfs.size == len(weights) == entries["a.safetensors"].size
    config = (folder / "adapter_config.json").read_bytes()
    assert entries["adapter_config.json"].lfs is None
    assert entries["adapter_config.json"].blob_id == git_hash(config)
    assert entries["a.safetensors"].last_commit.oid == oid
    infos = api.get_paths_info(REPO, ["a.safetensors", "missing.bin"], revision=oid)
    assert [i.path for i in infos] == ["a.safetensors"] and infos[0].lfs.sha256 == lfs.sha256
    files = sorted(api.list_repo_files(REPO))
    assert files == [".gitattributes", "a.safetensors", "adapter_config.json"]


def test_nested_paths_and_pagination(tmp_path: Path) -> None:
    with HubServer(tmp_path / "hub", page_size=2) as hub:
        api = HfApi(endpoint=hub.url)
        api.create_repo(REPO)
        ops = [CommitOperationAdd(f"sub/dir/f{i}.txt", f"{i}".encode()) for i in range(5)]
        api.create_commit(REPO, ops, commit_message="nested")
        assert len(api.list_repo_files(REPO)) == 6
        assert sum(1 for m, p in hub.requests if p.startswith(f"/api/models/{REPO}/tree/")) > 2
        top = {(type(e).__name__, e.path) for e in api.list_repo_tree(REPO)}
        assert top == {("RepoFile", ".gitattributes"), ("RepoFolder", "sub")}
        under = [e.path for e in api.list_repo_tree(REPO, "sub/dir")]
        assert under == [f"sub/dir/f{i}.txt" for i in range(5)]
        path = hf_hub_download(REPO, "sub/dir/f3.txt", endpoint=hub.url)
        assert Path(path).read_bytes() == b"3"


def test_private_repo_needs_the_token(hub: HubServer, api: HfApi, folder: Path) -> None:
    api.create_repo(REPO, private=True)
    api.upload_folder(repo_id=REPO, folder_path=folder)
    assert api.model_info(REPO).private is True
    anonymous = HfApi(endpoint=hub.url, token=False)
    with pytest.raises(RepositoryNotFoundError) as exc:
        anonymous.model_info(REPO)
    assert exc.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(REPO, "adapter_config.json", endpoint=hub.url, token=False)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(REPO, endpoint=hub.url, token=False)
    with pytest.raises(RepositoryNotFoundError):
        anonymous.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    # A wrong token is refused as such (not disguised as a missing repo).
    with pytest.raises(HfHubHTTPError) as exc:
        HfApi(endpoint=hub.url, token="wrong").model_info(REPO)
    assert exc.value.response.status_code == 401
    assert not isinstance(exc.value, RepositoryNotFoundError)
    path = hf_hub_download(REPO, "adapter_config.json", endpoint=hub.url, token=TOKEN)
    assert Path(path).read_bytes() == (folder / "adapter_config.json").read_bytes()


def test_writes_need_the_token(hub: HubServer, api: HfApi) -> None:
    api.create_repo(REPO)
    anonymous = HfApi(endpoint=hub.url, token=False)
    with pytest.raises(HfHubHTTPError):
        anonymous.create_repo("user/other")
    with pytest.raises(RepositoryNotFoundError):
        anonymous.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    assert len(hub.commits(REPO)) == 1
    assert anonymous.model_info(REPO).sha == hub.commits(REPO)[0]  # public reads are open


def test_injected_500_on_commit_then_retry(hub: HubServer, api: HfApi) -> None:
    api.create_repo(REPO)
    before = hub.commits(REPO)
    hub.fail("POST", r"/commit/", status=500)
    ops = [CommitOperationAdd("w.safetensors", b"\x01" * 64)]
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_commit(REPO, ops, commit_message="first try")
    assert exc.value.response.status_code == 500
    assert hub.commits(REPO) == before and list(hub.files(REPO)) == [".gitattributes"]
    ops = [CommitOperationAdd("w.safetensors", b"\x01" * 64)]
    info = api.create_commit(REPO, ops, commit_message="second try")
    assert hub.commits(REPO) == [info.oid, *before]
    # The LFS object reached the server on the first try: the retry does not upload it again.
    assert sum(1 for m, _ in hub.requests if m == "PUT") == 1


def test_corrupt_keeps_size_and_reported_sha(
    hub: HubServer, api: HfApi, folder: Path, tmp_path: Path
) -> None:
    _pushed(hub, api, folder)
    good = (folder / "a.safetensors").read_bytes()
    hub.corrupt(REPO, "a.safetensors")
    path = hf_hub_download(
        REPO, "a.safetensors", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "fresh"
    )
    got = Path(path).read_bytes()
    (entry,) = api.get_paths_info(REPO, ["a.safetensors"])
    assert len(got) == len(good) == entry.size
    assert got != good
    assert hashlib.sha256(got).hexdigest() != entry.lfs.sha256 == hashlib.sha256(good).hexdigest()


def test_missing_repo_revision_and_file(hub: HubServer, api: HfApi, folder: Path) -> None:
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("user/nope")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/nope", "x.json", endpoint=hub.url, token=TOKEN)
    _pushed(hub, api, folder)
    with pytest.raises(RemoteEntryNotFoundError) as exc:
        hf_hub_download(REPO, "missing.json", endpoint=hub.url, token=TOKEN)
    assert isinstance(exc.value, EntryNotFoundError)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "adapter_config.json", revision="v9", endpoint=hub.url, token=TOKEN)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="0" * 40)
    with pytest.raises(RemoteEntryNotFoundError):
        api.delete_file("missing.json", repo_id=REPO)


def test_branches(hub: HubServer, api: HfApi) -> None:
    api.create_repo(REPO)
    main = hub.commits(REPO)
    ops = [CommitOperationAdd("dev.txt", b"dev")]
    with pytest.raises(RevisionNotFoundError):
        api.create_commit(REPO, ops, commit_message="dev", revision="dev")
    api.create_branch(REPO, branch="dev")
    api.create_branch(REPO, branch="dev", exist_ok=True)
    ops = [CommitOperationAdd("dev.txt", b"dev")]
    info = api.create_commit(REPO, ops, commit_message="dev", revision="dev")
    assert hub.commits(REPO, "dev") == [info.oid, *main] and hub.commits(REPO) == main
    path = hf_hub_download(REPO, "dev.txt", revision="dev", endpoint=hub.url, token=TOKEN)
    assert Path(path).read_bytes() == b"dev"
    assert {b.name for b in api.list_repo_refs(REPO).branches} == {"main", "dev"}


def test_delete_and_parent_commit(hub: HubServer, api: HfApi, folder: Path) -> None:
    oid = _pushed(hub, api, folder)
    info = api.create_commit(
        REPO,
        [CommitOperationDelete("adapter_config.json")],
        commit_message="rm",
        parent_commit=oid,
    )
    assert "adapter_config.json" not in hub.files(REPO) and hub.commits(REPO)[0] == info.oid
    with pytest.raises(HfHubHTTPError) as exc:  # main moved on since `oid`
        api.upload_file(
            path_or_fileobj=b"{}", path_in_repo="x.json", repo_id=REPO, parent_commit=oid
        )
    assert exc.value.response.status_code == 412


def test_default_lfs_threshold_and_readme(hub: HubServer, api: HfApi) -> None:
    api.create_repo(REPO)
    big = os.urandom(10 * 1000 * 1000)
    api.upload_file(path_or_fileobj=big, path_in_repo="big.bin", repo_id=REPO)
    api.upload_file(path_or_fileobj=b"# card\n", path_in_repo="README.md", repo_id=REPO)
    assert ("POST", "/api/validate-yaml") in hub.requests
    entries = {e.path: e for e in api.list_repo_tree(REPO)}
    assert entries["big.bin"].lfs is not None and entries["README.md"].lfs is None
    assert hub.files(REPO)["big.bin"] == big


def test_stall_triggers_client_timeout(hub: HubServer, api: HfApi) -> None:
    api.create_repo(REPO)
    hub.stall("GET", r"^/api/models/", seconds=3)
    start = time.monotonic()
    with pytest.raises(httpx2.TimeoutException):
        api.model_info(REPO, timeout=0.3)
    assert time.monotonic() - start < 2
    assert api.model_info(REPO, timeout=2).sha == hub.commits(REPO)[0]


def test_state_survives_restart(tmp_path: Path, folder: Path) -> None:
    with HubServer(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.url)
        api.create_repo(REPO)
        oid = api.upload_folder(repo_id=REPO, folder_path=folder).oid
    with HubServer(tmp_path / "hub") as hub:
        assert hub.commits(REPO)[0] == oid
        path = hf_hub_download(REPO, "a.safetensors", endpoint=hub.url, revision=oid)
        assert Path(path).read_bytes() == (folder / "a.safetensors").read_bytes()


def test_server_side_helpers(hub: HubServer, api: HfApi) -> None:
    hub.create_repo(REPO)
    first = hub.commit(REPO, {"w.safetensors": b"abc", "c.json": b"{}"}, message="seed")
    assert hub.commit(REPO, {"c.json": b"{}"}) == first  # nothing changed: no commit
    entries = {e.path: e for e in api.list_repo_tree(REPO)}
    assert entries["w.safetensors"].lfs is not None and entries["c.json"].lfs is None
    assert hub.branches(REPO) == {"main": first}


def test_malformed_requests_do_not_hang(hub: HubServer) -> None:
    with socket.create_connection(("127.0.0.1", hub.port), timeout=5) as sock:
        sock.sendall(b"NONSENSE\r\n\r\n")  # an HTTP/0.9-style line: answered, then closed
        assert sock.recv(100)
    with socket.create_connection(("127.0.0.1", hub.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/9.x\r\n\r\n")
        assert sock.recv(100)
    with socket.create_connection(("127.0.0.1", hub.port), timeout=5) as sock:
        sock.sendall(b"POST /api/repos/create HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")
    with socket.create_connection(("127.0.0.1", hub.port), timeout=5) as sock:
        sock.sendall(b"POST /api/repos/create HTTP/1.1\r\nHost: x\r\nContent-Length: 99\r\n\r\n{")
        sock.shutdown(socket.SHUT_WR)  # body cut short
        assert sock.recv(100).startswith(b"HTTP/1.1 400")
    r = httpx2.get(f"{hub.url}/api/models/user/nope/tree/main", timeout=5)
    assert r.status_code in (401, 404) and r.headers["X-Error-Code"] == "RepoNotFound"


def test_injected_failure_mid_lfs_upload(hub: HubServer, api: HfApi, folder: Path) -> None:
    api.create_repo(REPO)
    before = hub.commits(REPO)
    # 403 is not in the client's retry list: the upload fails at once, wrapped in RuntimeError.
    hub.fail("PUT", r"^/_lfs/", status=403)
    with pytest.raises(RuntimeError, match="Error while uploading") as exc:
        api.upload_folder(repo_id=REPO, folder_path=folder)
    assert isinstance(exc.value.__cause__, HfHubHTTPError)
    assert hub.commits(REPO) == before
    # A 500 is retried by the client (after a 1 s sleep), so one injected 500 goes unnoticed.
    hub.fail("PUT", r"^/_lfs/", status=500)
    oid = api.upload_folder(repo_id=REPO, folder_path=folder).oid
    assert hub.commits(REPO) == [oid, *before]
    assert sum(1 for m, p in hub.requests if m == "PUT") == 3


def test_header_only_commit_creates_nothing(hub: HubServer) -> None:
    hub.create_repo(REPO)
    head = hub.commits(REPO)[0]
    r = httpx2.post(
        f"{hub.url}/api/models/{REPO}/commit/main",
        content=b'{"key": "header", "value": {"summary": "empty"}}\n',
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-ndjson"},
    )
    assert r.status_code == 200 and r.json()["commitOid"] == head
    assert hub.commits(REPO) == [head]


def test_settings_gated_and_private(hub: HubServer, api: HfApi) -> None:
    hub.create_repo(REPO)
    hub.commit(REPO, {"c.json": b"{}"})
    anonymous = HfApi(endpoint=hub.url, token=False)
    api.update_repo_settings(REPO, gated="auto")
    assert anonymous.model_info(REPO).gated == "auto"  # metadata stays public
    with pytest.raises(GatedRepoError):
        hf_hub_download(REPO, "c.json", endpoint=hub.url, token=False)
    api.update_repo_settings(REPO, gated=False, private=True)
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info(REPO)
    assert (
        Path(hf_hub_download(REPO, "c.json", endpoint=hub.url, token=TOKEN)).read_bytes() == b"{}"
    )
