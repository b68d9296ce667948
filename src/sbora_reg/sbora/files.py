"""Files on disk: one content hash, atomic writes of files and folders, and their temp names.

- ``ContentDigest`` / ``files_sha256``: sha256 over ``name\\0size\\0bytes`` of each file in name
  order. An adapter's ``sha256()``, its registry blob's name and a composed output's file list
  all use it, so the hash depends on neither timestamps nor the folder's name.
- ``write_atomic`` (a file) and ``atomic_dir`` (a folder): written under a temp name beside the
  target, fsynced, renamed into place; a killed process leaves no half-written target.
- Temp folders are named ``<target>.tmp-<pid>-<random>``: ``stale_temps`` finds those whose
  writer no longer runs (and only those), for ``gc`` and the next write to the same target;
  a previous target that a killed writer had moved aside (``-old``) is put back first.
- A write that finds no room (``NO_ROOM``: full disk or quota, file-size limit) is one
  ``OutputError`` (``no_room_is_an_error``), its temp files removed.

Torch free: the registry hashes and stages files without importing torch.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from sbora_reg import faults
from sbora_reg.errors import AdapterFormatError, OutputError

TMP_MARK = ".tmp-"
# A full disk, a full quota, a file-size limit (RLIMIT_FSIZE): writing needs room, not a fix.
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class ContentDigest:
    """Incremental ``files_sha256``: ``start(name, size)`` per file (in name order), then bytes."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    def start(self, name: str, size: int) -> None:
        self._sha.update(f"{name}\0{size}\0".encode())

    def update(self, data: bytes) -> None:
        self._sha.update(data)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def files_sha256(files: Mapping[str, bytes]) -> str:
    """sha256 over ``name\\0size\\0bytes`` of each file, in name order."""
    digest = ContentDigest()
    for name in sorted(files):
        digest.start(name, len(files[name]))
        digest.update(files[name])
    return digest.hexdigest()


def fsync_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file ``path`` and fsync it."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fsync_write(Path(tmp), data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def temp_dir_for(target: Path) -> Path:
    """A new, empty folder ``<target>.tmp-<pid>-<random>`` beside ``target``."""
    tmp = target.with_name(f"{target.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    return tmp


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temps(folder: Path, stem: str = "") -> list[Path]:
    """Temp folders ``<stem>.tmp-<pid>-*`` in ``folder`` whose writing process no longer runs."""
    if not folder.is_dir():
        return []
    stale = []
    for path in folder.iterdir():
        if not path.name.startswith(stem + TMP_MARK):
            continue
        pid_text = path.name[len(stem) + len(TMP_MARK) :].split("-", 1)[0]
        if not pid_text.isdigit() or not _pid_alive(int(pid_text)):
            stale.append(path)
    return sorted(stale)


def restore_swapped(target: Path) -> bool:
    """Put back a previous ``target`` that a writer killed mid-swap left moved aside as
    ``<target>.tmp-<pid>-*-old`` (``atomic_dir(..., replace=True)``); True when it did."""
    if target.exists():
        return False
    for stale in stale_temps(target.parent, target.name):
        if stale.name.endswith("-old"):
            os.rename(stale, target)
            return True
    return False


@contextlib.contextmanager
def no_room_is_an_error(where: Path) -> Iterator[None]:
    """Turn "no space left" / "file too large" while writing ``where`` into one OutputError."""
    try:
        yield
    except OSError as err:
        if err.errno not in NO_ROOM:
            raise
        raise OutputError(
            f"no room to write {where}: {err.strerror}; free disk space (or raise the file size "
            "limit) and retry"
        ) from None


@contextlib.contextmanager
def atomic_dir(target: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``target`` that becomes ``target`` only if the block succeeds.

    On any exception the temp folder is removed, so an interrupted write never leaves a folder
    that looks finished. An existing ``target`` is an error unless ``replace`` (an empty one is
    always replaced): it is moved aside, then removed once the new one is in place. Temp
    folders that killed writers of ``target`` left beside it are removed first (a previous
    ``target`` one of them had moved aside is put back: ``restore_swapped``).
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    restore_swapped(target)
    for stale in stale_temps(target.parent, target.name):
        shutil.rmtree(stale, ignore_errors=True)
    with no_room_is_an_error(target):
        tmp = temp_dir_for(target)
        try:
            faults.point("out.staged")
            yield tmp
            faults.point("out.rename")
            old = None
            if target.is_dir() and (replace or not any(target.iterdir())):
                old = Path(f"{tmp}-old")  # a temp name too: stale_temps finds it if we are killed
                os.rename(target, old)
                faults.point("out.swap")
            os.rename(tmp, target)  # fails on an existing non-empty target: nothing is lost
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def check_shard_names(index: Path, names: Sequence[object]) -> None:
    """``AdapterFormatError`` unless every shard an index names is a plain file name in the
    index's own directory (no ``..``, no absolute or nested path: nothing is read from outside)."""
    outside = [n for n in names if not isinstance(n, str) or Path(n).name != n or n == ".."]
    if outside:
        raise AdapterFormatError(
            f"{index} names shard {outside[0]!r} outside {index.parent}: shards must be plain "
            "file names in the checkpoint directory"
        )
