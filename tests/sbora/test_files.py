"""sbora.files: the one content hash, atomic folders, and temp folders of dead writers."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sbora_reg.registry.checkpoint import atomic_dir as out_dir
from sbora_reg.sbora.files import ContentDigest, atomic_dir, files_sha256, stale_temps


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_content_hash_is_name_size_bytes_in_name_order() -> None:
    files = {"b.bin": b"\x00\x01", "a.json": b"{}"}
    expected = hashlib.sha256(b"a.json\x002\x00{}" + b"b.bin\x002\x00\x00\x01").hexdigest()
    assert files_sha256(files) == expected
    digest = ContentDigest()
    for name in sorted(files):  # streamed in chunks, as blobs are copied
        digest.start(name, len(files[name]))
        for i in range(len(files[name])):
            digest.update(files[name][i : i + 1])
    assert digest.hexdigest() == expected


def test_atomic_dir_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(OSError), atomic_dir(target) as tmp:  # not replace: the old one stays
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    with atomic_dir(target, replace=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_only_dead_writers_temp_folders_are_stale_and_removed(tmp_path: Path) -> None:
    dead = tmp_path / f"out.tmp-{_dead_pid()}-abcd"
    dead_old = tmp_path / f"out.tmp-{_dead_pid()}-abcd-old"
    live = tmp_path / f"out.tmp-{os.getpid()}-beef"
    other = tmp_path / f"other.tmp-{_dead_pid()}-0000"
    for folder in (dead, dead_old, live, other):
        folder.mkdir()
    assert stale_temps(tmp_path, "out") == sorted([dead, dead_old])
    (dead_old / "previous").write_text("0")
    (tmp_path / "out").mkdir()  # the killed writer's new output was renamed into place
    with out_dir(tmp_path / "out", force=True) as tmp:
        (tmp / "x").write_text("1")
    assert not dead.exists() and not dead_old.exists()
    assert live.exists() and other.exists()  # a live writer's, and another target's


def test_a_previous_output_moved_aside_by_a_killed_writer_is_put_back(tmp_path: Path) -> None:
    """Killed between moving OUT aside (``-old``) and renaming the new one in: OUT is back
    before anything else is written to it (``restore_swapped``); the new temp is removed."""
    new = tmp_path / f"out.tmp-{_dead_pid()}-abcd"
    old = tmp_path / f"out.tmp-{_dead_pid()}-abcd-old"
    for folder, text in ((new, "new"), (old, "previous")):
        folder.mkdir()
        (folder / "x").write_text(text)
    with out_dir(tmp_path / "out", force=True) as tmp:
        assert (tmp_path / "out" / "x").read_text() == "previous"
        (tmp / "x").write_text("1")
    assert (tmp_path / "out" / "x").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
