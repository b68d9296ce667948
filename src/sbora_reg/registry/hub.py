"""Hugging Face Hub sync: push an adapter version (or a compose output), pull a Hub repo in.

The real ``huggingface_hub`` client does the HTTP, the retries and the progress bars. The
endpoint is the one given, else ``HF_ENDPOINT``; the token is the client's own (``HF_TOKEN``,
``hf auth login``) and is never printed, logged or stored here.

- ``push``: one commit with the native files, a PEFT view at the repo root (``PeftModel.
  from_pretrained(base, "owner/name")`` and vLLM load it) and a byte-stable model card; the
  commit is recorded on the adapter version. Unchanged content makes no commit (the client skips
  files whose Hub oid equals theirs) and ``PushResult.changed`` says so.
- ``push_dir``: a ``compose`` output as it is; its composition record gets the commit.
- ``pull``: the adapter files of one commit into the standard HF cache, each checked against
  the sha256 (LFS) or git blob id the Hub lists for it (the client checks only sizes), a bad
  file evicted from the cache; then registered with its provenance. The same commit twice is a
  no-op.

Every fault becomes one ``HubError`` line; the registry is written only after the Hub side
succeeded, so a failed push or pull leaves it as it was, and a retry succeeds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sbora_reg import faults
from sbora_reg.errors import HubError, NotFoundError, SboraRegError
from sbora_reg.registry import hub_refs
from sbora_reg.registry import models as m
from sbora_reg.registry.names import check_hub_id, check_name
from sbora_reg.registry.reading import NATIVE_FILES, PEFT_FILES, detect_format
from sbora_reg.registry.records import AdapterRecord, BaseRecord

if TYPE_CHECKING:
    from sbora_reg.registry.store import Registry
    from sbora_reg.sbora.adapter import Adapter

DEFAULT_ENDPOINT = "https://huggingface.co"
CARD = "README.md"


@dataclass(frozen=True)
class PushResult:
    """Where something was pushed, and whether that made a commit."""

    repo: str
    revision: str
    commit: str
    changed: bool  # False: the repo already held exactly these files; no commit was made
    files: list[str]
    url: str
    ref: str | None = None  # the adapter version pushed (None for push_dir)
    composition_id: int | None = None  # push_dir of a recorded compose output

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class PullResult:
    """What a pull registered (or found registered from the same commit)."""

    repo: str
    revision: str
    commit: str
    record: AdapterRecord
    new: bool  # False: this commit had been pulled before; nothing changed
    files: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "repo": self.repo,
            "revision": self.revision,
            "commit": self.commit,
            "new": self.new,
            "files": self.files,
            "adapter": self.record.to_json(),
        }


def resolve_endpoint(endpoint: str | None = None) -> str:
    """``endpoint``, else ``HF_ENDPOINT``, else the public Hub."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def parse_repo_ref(text: str) -> tuple[str, str | None]:
    """``owner/name[@revision]`` -> (repo id, revision or None)."""
    repo, _, revision = text.partition("@")
    check_hub_id(repo)
    if "@" in text and not revision:
        raise HubError(f"{text!r}: write OWNER/NAME or OWNER/NAME@REVISION")
    return repo, revision or None


@contextmanager
def hub_errors(what: str) -> Iterator[None]:
    """Turn the client's errors into one ``HubError`` line saying what failed."""
    import httpx2
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except SboraRegError:
        raise
    except RepositoryNotFoundError:
        raise HubError(
            f"{what}: the repo does not exist or is private (log in with `hf auth login` or set "
            "HF_TOKEN for a private repo)"
        ) from None
    except RevisionNotFoundError:
        raise HubError(f"{what}: no such revision on the Hub") from None
    except EntryNotFoundError as exc:
        raise HubError(f"{what}: a file is missing on the Hub ({_first_line(exc)})") from None
    except (httpx2.HTTPError, OSError, HFValidationError) as exc:
        raise HubError(f"{what}: {_first_line(exc)}; nothing was changed, try again") from None
    except RuntimeError as exc:  # an upload that failed midway: the HTTP error is its cause
        if not isinstance(exc.__cause__, httpx2.HTTPError | OSError):
            raise
        cause = _first_line(exc.__cause__)
        raise HubError(
            f"{what}: {_first_line(exc)} ({cause}); nothing was committed, try again"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def use_timeout(seconds: float) -> None:
    """Give every request of this process's Hub client a ``seconds`` timeout (it has none).

    The client shares one HTTP session per process; ``sbora-reg push``/``pull`` call this, a
    library user decides for their own process.
    """
    import httpx2
    from huggingface_hub import get_session

    get_session().timeout = httpx2.Timeout(seconds)


def _api(endpoint: str) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint)  # the token: the client's own lookup


# --------------------------------------------------------------------------- push


def adapter_card(record: AdapterRecord, base: BaseRecord, adapter: Adapter) -> str:
    """The model card of a pushed adapter version: YAML front matter, a table of its regions.

    Byte-stable (no timestamps), so pushing the same version twice makes no commit.
    """
    from huggingface_hub import ModelCardData

    from sbora_reg.registry.ranges import format_ranges

    variants = sorted({m.variant for m in adapter.modules.values()})
    tags = ["sbora", *(f"sbora-{v}" for v in variants if v in ("fa", "fb"))]
    if record.task:
        tags.append(record.task)
    meta = ModelCardData(base_model=base.card_name, library_name="peft", tags=tags).to_yaml()
    lines = ["---", meta.rstrip(), "---", "", f"# {record.ref}", ""]
    lines += [
        f"An SBoRA adapter ({record.variant}, r={record.rank}, alpha={record.alpha:g}) for "
        f"`{base.card_name}`, pushed by sbora-reg. It changes only the rows (FB) or columns (FA) "
        "listed below; every other weight of the base stays as it is.",
        "",
        "```python",
        "from peft import PeftModel",
        f'model = PeftModel.from_pretrained(base_model, "<this repo>")  # base: {base.card_name}',
        "```",
        "",
        "The native files (`sbora_config.json`, `sbora_adapter.safetensors`) load with "
        "`sbora_reg.sbora.Adapter.load`; `sbora-reg pull` registers them.",
        "",
        f"Content sha256: `{record.sha256}`",
        "",
        "| module | variant | shape (out, in) | rows / columns touched |",
        "|---|---|---|---|",
    ]
    for name, module in sorted(adapter.modules.items()):
        idx = module.indices
        where = "all (LoRA)" if idx is None else format_ranges(idx.numpy())
        lines.append(
            f"| {name} | {module.variant} | {module.shape[0]}x{module.shape[1]} | {where} |"
        )
    return "\n".join(lines) + "\n"


def adapter_files(registry: Registry, record: AdapterRecord) -> dict[str, bytes]:
    """The files a push uploads: native, the PEFT view, and the card (name -> bytes)."""
    from sbora_reg.sbora.adapter import Adapter

    blob = local_blob(registry, record)
    fmt = detect_format(blob)
    adapter = Adapter.load(blob) if fmt == "sbora" else Adapter.from_peft(blob)
    files = (
        {name: (blob / name).read_bytes() for name in NATIVE_FILES}
        if fmt == "sbora"
        else adapter.file_bytes()
    )
    if fmt == "peft":  # the PEFT view is the stored files themselves
        files.update({name: (blob / name).read_bytes() for name in PEFT_FILES})
    else:
        with tempfile.TemporaryDirectory() as tmp:
            adapter.to_peft(tmp)
            files.update({name: (Path(tmp) / name).read_bytes() for name in PEFT_FILES})
    files[CARD] = adapter_card(record, registry.get_base(record.base), adapter).encode()
    return files


def _commit(
    repo: str,
    files: dict[str, bytes],
    message: str,
    private: bool,
    revision: str | None,
    endpoint: str,
) -> tuple[str, str, bool, str]:
    """Create the repo (and branch) if needed and upload ``files`` in one commit.

    Returns (revision, commit id, whether a commit was made, repo url).
    """
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import RevisionNotFoundError

    api = _api(endpoint)
    branch = revision or "main"
    with hub_errors(f"push to {repo}"):
        url = str(api.create_repo(repo, private=private, exist_ok=True))
        if branch != "main":
            api.create_branch(repo, branch=branch, exist_ok=True)
        try:
            before = api.repo_info(repo, revision=branch).sha
        except RevisionNotFoundError:
            before = None
        operations = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=data)
            for name, data in sorted(files.items())
        ]
        info = api.create_commit(
            repo, operations=operations, commit_message=message, revision=branch
        )
    return branch, str(info.oid), info.oid != before, url


def push(
    registry: Registry,
    ref: str,
    repo: str,
    *,
    private: bool = False,
    revision: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Push the adapter version ``ref`` to the model repo ``repo`` in one commit; record it."""
    check_hub_id(repo)
    endpoint = resolve_endpoint(endpoint)
    record = registry.resolve(ref)
    files = adapter_files(registry, record)
    branch, commit, changed, url = _commit(
        repo, files, f"sbora-reg push {record.ref}", private, revision, endpoint
    )
    with registry.write() as session:
        hub_refs.record(session, "push", repo, branch, commit, endpoint, adapter_id=record.id)
    return PushResult(repo, branch, commit, changed, sorted(files), url, ref=record.ref)


def push_dir(
    registry: Registry,
    path: str | os.PathLike[str],
    repo: str,
    *,
    private: bool = False,
    revision: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Push a ``compose`` output (merged checkpoint or composed adapter) as it is, in one commit.

    When the registry recorded that output (same files, same hashes) its composition record
    gets the commit.
    """
    from sbora_reg.registry.checkpoint import file_sha256, tree_sha256

    check_hub_id(repo)
    endpoint = resolve_endpoint(endpoint)
    root = Path(path)
    if not root.is_dir():
        raise NotFoundError(f"{root} is not a directory: pass a compose output (--out)")
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    if not names:
        raise NotFoundError(f"{root} is empty: nothing to push")
    tree = tree_sha256({name: file_sha256(root / name) for name in names})
    with registry.read() as session:
        composition_id = session.scalar(_composition_query(tree))
    files = {name: (root / name).read_bytes() for name in names}
    branch, commit, changed, url = _commit(
        repo, files, f"sbora-reg push {root.name}", private, revision, endpoint
    )
    if composition_id is not None:
        with registry.write() as session:
            hub_refs.record(
                session, "push", repo, branch, commit, endpoint, composition_id=composition_id
            )
    return PushResult(repo, branch, commit, changed, names, url, composition_id=composition_id)


def _composition_query(output_sha256: str) -> Any:
    from sqlalchemy import select

    return (
        select(m.Composition.id)
        .where(m.Composition.output_sha256 == output_sha256)
        .order_by(m.Composition.id.desc())
        .limit(1)
    )


# --------------------------------------------------------------------------- pull


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _expected(sibling: Any) -> tuple[str, str]:
    """(algorithm, digest) the Hub lists for a file: LFS sha256, else the git blob sha1."""
    lfs = getattr(sibling, "lfs", None)
    sha256 = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
    if sha256:
        return "sha256", str(sha256)
    return "git-sha1", str(sibling.blob_id)


def _evict(path: Path) -> None:
    """Remove a downloaded file from the HF cache: the snapshot link and the blob it names."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)


def _download_checked(
    repo: str, commit: str, names: list[str], siblings: dict[str, Any], endpoint: str
) -> Path:
    """Download ``names`` at ``commit`` into the HF cache and check each against the Hub."""
    from huggingface_hub import hf_hub_download

    folder: Path | None = None
    for name in names:
        with hub_errors(f"pull {repo}/{name}"):
            local = Path(hf_hub_download(repo, name, revision=commit, endpoint=endpoint))
        algorithm, want = _expected(siblings[name])
        data = local.read_bytes()
        got = hashlib.sha256(data).hexdigest() if algorithm == "sha256" else _git_blob_sha1(data)
        if got != want:
            _evict(local)
            raise HubError(
                f"pull {repo}/{name} at {commit[:12]}: its {algorithm} is {got[:12]}, not the "
                f"Hub's {want[:12]}: the download was corrupted and is removed from the cache; "
                "run pull again"
            )
        folder = local.parent
    if folder is None:  # pragma: no cover - names is never empty
        raise HubError(f"pull {repo}: nothing to download")
    return folder


def local_blob(registry: Registry, record: AdapterRecord) -> Path:
    """The stored files of ``record``, fetched from the Hub when this machine lacks them.

    A registry shared by several machines (one PostgreSQL database) keeps blobs per machine; a
    version pushed anywhere records its commit, so another machine downloads the files of that
    commit (checked against the Hub's hashes, cached), stores them as the blob the database
    names (content hash checked) and goes on.
    """
    path = registry.blobs.path(record.sha256)
    if path.is_dir():
        return registry.verified_blob(record.sha256, record.ref)  # re-hashed: never a bad byte
    with registry.read() as session:
        refs = hub_refs.listed(session, adapter_id=record.id)
    if not refs:
        raise NotFoundError(
            f"the files of {record.ref} are not on this machine and it was never pushed to the "
            "Hub: add it again here, or push it from the machine that has it"
        )
    ref = refs[-1]
    names = list(NATIVE_FILES if record.format == "sbora" else PEFT_FILES)
    with hub_errors(f"fetch {record.ref} from {ref.repo}"):
        info = _api(ref.endpoint).model_info(ref.repo, revision=ref.commit, files_metadata=True)
    siblings = {s.rfilename: s for s in info.siblings or []}
    missing = [n for n in names if n not in siblings]
    if missing:
        raise HubError(f"{ref.repo}@{ref.commit[:12]} lacks {', '.join(missing)} of {record.ref}")
    folder = _download_checked(ref.repo, ref.commit, names, siblings, ref.endpoint)
    tmp, sha256, _size = registry.blobs.stage([folder / n for n in names])
    if sha256 != record.sha256:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HubError(
            f"{ref.repo}@{ref.commit[:12]} holds other files than {record.ref} (content "
            f"{sha256[:12]}, registered {record.sha256[:12]}): push it again"
        )
    return registry.blobs.publish(tmp, sha256)


def _base_for_pull(
    registry: Registry, base: str | None, card_base: str | None, repo: str
) -> BaseRecord:
    if base is not None:
        return registry.add_base(base)
    if not card_base:
        raise HubError(
            f"{repo} names no base_model in its card: pass --base (a registered base or a local "
            "model directory)"
        )
    try:
        return registry.get_base(card_base)
    except NotFoundError:
        raise HubError(
            f"{repo} was made for base_model {card_base}, which no registered base has as its "
            f"Hub id: `sbora-reg base add PATH --hub-id {card_base}`, or pass --base"
        ) from None


def pull(
    registry: Registry,
    repo_ref: str,
    *,
    name: str | None = None,
    base: str | None = None,
    endpoint: str | None = None,
) -> PullResult:
    """Download ``owner/name[@revision]``'s adapter, check every file, register it."""
    from huggingface_hub.repocard import metadata_load

    repo, revision = parse_repo_ref(repo_ref)
    name = check_name(name if name is not None else repo.split("/", 1)[1])
    endpoint = resolve_endpoint(endpoint)
    with hub_errors(f"pull {repo_ref}"):
        info = _api(endpoint).model_info(repo, revision=revision, files_metadata=True)
    commit = str(info.sha)
    siblings = {s.rfilename: s for s in info.siblings or []}
    with registry.read() as session:
        known = hub_refs.pulled_adapter(session, repo, commit)
    if known is not None:
        record = registry.by_id(known)
        return PullResult(repo, revision or "main", commit, record, False, [])
    if all(n in siblings for n in NATIVE_FILES):
        names = list(NATIVE_FILES)
    elif all(n in siblings for n in PEFT_FILES):
        names = list(PEFT_FILES)
    else:
        raise HubError(
            f"{repo} holds no adapter: expected {' + '.join(NATIVE_FILES)} (sbora-reg) or "
            f"{' + '.join(PEFT_FILES)} (PEFT)"
        )
    if CARD in siblings:
        names.append(CARD)
    folder = _download_checked(repo, commit, names, siblings, endpoint)
    faults.point("pull.downloaded")
    card = metadata_load(folder / CARD) if CARD in names else None
    card_base = (card or {}).get("base_model")
    base_rec = _base_for_pull(
        registry, base, card_base if isinstance(card_base, str) else None, repo
    )
    provenance = {"source": "hub", "repo": repo, "revision": revision or "main", "commit": commit,
                  "endpoint": endpoint}  # fmt: skip
    record = registry.add(folder, name=name, base=base_rec.name, provenance=provenance)
    with registry.write() as session:
        hub_refs.record(
            session, "pull", repo, revision or "main", commit, endpoint, adapter_id=record.id
        )
    return PullResult(repo, revision or "main", commit, record, True, names)
