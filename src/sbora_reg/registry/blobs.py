"""Content-addressed adapter files under ``<data_dir>/blobs/<sha256>/``.

The content hash of an adapter is ``sbora.files.files_sha256`` of its stored files, so a native
adapter's blob is named by its ``Adapter.sha256()`` and the hash depends on neither timestamps
nor the directory name. Files are copied into ``blobs/.tmp-<pid>-<random>/`` on the same
filesystem while being hashed (``ContentDigest``), fsynced, then renamed into place in one
``os.rename``: a blob directory is complete or absent. Staging dirs of dead processes are found
by ``sbora.files.stale_temps``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from sbora_reg.errors import AdapterFormatError
from sbora_reg.sbora.files import TMP_MARK, ContentDigest, no_room_is_an_error, stale_temps

_CHUNK = 1 << 20


def _copy_hashing(src: Path, dst: Path, digest: ContentDigest) -> int:
    """Copy ``src`` to ``dst`` (fsynced) while feeding it to ``digest``."""
    size = src.stat().st_size
    digest.start(src.name, size)
    copied = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            digest.update(chunk)
            fout.write(chunk)
            copied += len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    if copied != size:
        raise AdapterFormatError(f"{src} changed while it was being read: add it again")
    return size


class BlobStore:
    """The ``blobs/`` directory of one registry."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    def stage(self, files: list[Path]) -> tuple[Path, str, int]:
        """Copy ``files`` into a new temp dir; return (temp dir, content sha256, total bytes)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with no_room_is_an_error(self.root):
            tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_MARK}{os.getpid()}-", dir=self.root))
            try:
                digest = ContentDigest()
                size = sum(_copy_hashing(f, tmp / f.name, digest) for f in sorted(files))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return tmp, digest.hexdigest(), size

    def publish(self, tmp: Path, sha256: str) -> Path:
        """Move a staged dir to ``blobs/<sha256>`` (drop it if that blob already exists)."""
        final = self.path(sha256)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # same content is already stored
        return final

    def stored(self) -> list[str]:
        """sha256 of every complete blob directory on disk."""
        if not self.root.is_dir():
            return []
        return [p.name for p in self.root.iterdir() if not p.name.startswith(".")]

    def content_sha256(self, sha256: str) -> str:
        """The content hash of blob ``sha256``'s files as they are on disk now (streamed)."""
        folder = self.path(sha256)
        digest = ContentDigest()
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            digest.start(path.name, path.stat().st_size)
            with open(path, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    digest.update(chunk)
        return digest.hexdigest()

    def stale_temps(self) -> list[Path]:
        """Staging dirs whose writing process no longer runs (killed mid-add)."""
        return stale_temps(self.root)

    def detach(self, sha256: str) -> Path | None:
        """Atomically move a blob out of the store (to a staging name) so it can be deleted."""
        src = self.path(sha256)
        dst = self.root / f"{TMP_MARK}0-gc-{sha256}"
        shutil.rmtree(dst, ignore_errors=True)  # left by a gc that was killed
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            return None
        return dst


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
