"""No room to write, and a base shard that cannot be read to its end.

"No room" is ``RLIMIT_FSIZE`` set in the child (writes past it fail with EFBIG, as a full disk
fails with ENOSPC; Python ignores SIGXFSZ), and, when this runs as root, also a small tmpfs
mounted for the test (else the same cases run under the file-size limit, so nothing skips).
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.faults.conftest import World
from tests.faults.faultlib import (
    assert_one_error,
    assert_whole,
    cli,
    no_finished_output,
    run,
    snapshot,
    start,
    temps,
    wait_stalled,
)
from tests.faults.test_kills import compose_args
from tests.registry.registry_factory import make_adapter, make_base

from sbora_reg.registry import Registry

LIMIT = 64 * 1024  # bytes a child may write into one file


def file_size_limit(limit: int = LIMIT) -> Callable[[], None]:
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return set_limit


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path | None]:
    """A 1 MiB tmpfs when we may mount one (root), else None."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = os.geteuid() == 0 and shutil.which("mount") is not None
    if mounted:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                              capture_output=True)  # fmt: skip
        mounted = done.returncode == 0
    try:
        yield mnt if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def big_adapter(tmp_path: Path) -> tuple[Path, Path]:
    """A base config and an adapter for it above the 1 MiB tmpfs (about 1.2 MB)."""
    base = make_base(tmp_path / "big-base", hidden=256)
    targets = ("q_proj", "v_proj", "up_proj", "down_proj")
    make_adapter(tmp_path / "big", base, "fa", r=128, targets=targets)
    assert (tmp_path / "big" / "sbora_adapter.safetensors").stat().st_size > 1024 * 1024
    return base, tmp_path / "big"


def test_add_with_no_room_for_the_blob(world: World, tmp_path: Path) -> None:
    base, adapter = big_adapter(tmp_path)
    assert cli(world.db, "base", "add", str(base)).exit_code == 0
    before = snapshot(world.db)
    done = run(world.db, "add", str(adapter), "--name", "big", "--base", str(base),
               preexec_fn=file_size_limit())  # fmt: skip
    assert_one_error(done, "no room")
    assert assert_whole(world.db, before) == []  # the staging folder is gone too


def test_add_on_a_full_file_system(tmp_path: Path, small_fs: Path | None) -> None:
    base, adapter = big_adapter(tmp_path)
    where = small_fs or tmp_path
    db = where / "reg.db"
    with Registry.open(db) as reg:
        reg.add_base(str(base))
    before = snapshot(db)
    limit = None if small_fs else file_size_limit(512 * 1024)
    done = run(db, "add", str(adapter), "--name", "big", preexec_fn=limit)
    assert_one_error(done, "no room")
    assert assert_whole(db, before) == []


def test_compose_with_no_room_for_the_output(world: World) -> None:
    """One output file above the limit (the base's own shards are below it)."""
    out = world.root / "out"
    before = snapshot(world.db)
    args = compose_args(world, out, "merged", "--shard-size", "10MB")
    done = run(world.db, *args, preexec_fn=file_size_limit())
    assert_one_error(done, "no room")
    no_finished_output(out)
    assert temps(world.root) == []
    assert assert_whole(world.db, before) == []


def test_compose_onto_a_full_file_system(world: World, small_fs: Path | None) -> None:
    """Refused before writing (free space is checked first) or while writing."""
    out = (small_fs or world.root) / "out"
    if small_fs:
        (small_fs / "filler").write_bytes(b"\0" * (1024 * 1024 - 96 * 1024))
    before = snapshot(world.db)
    limit = None if small_fs else file_size_limit()
    done = run(world.db, *compose_args(world, out), preexec_fn=limit)
    assert_one_error(done)
    no_finished_output(out)
    assert temps(out.parent) == []
    assert_whole(world.db, before)


def test_a_base_shard_truncated_before_compose(world: World, tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(world.base, base)
    shard = sorted(base.glob("model-*.safetensors"))[-1]
    os.truncate(shard, shard.stat().st_size - 100)
    before = snapshot(world.db)
    out = tmp_path / "out"
    done = cli(world.db, *compose_args(world, out)[:3], "--base", str(base), "--out", str(out))
    assert done.exit_code == 1 and done.stderr.startswith("Error: "), done.output
    assert "truncated" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    no_finished_output(out)
    assert_whole(world.db, before)


def test_a_base_shard_cut_short_while_compose_reads_it(world: World, tmp_path: Path) -> None:
    """The shard shrinks after its header was checked: the read ends early mid-tensor."""
    base = tmp_path / "base"
    shutil.copytree(world.base, base)
    out = tmp_path / "out"
    before = snapshot(world.db)
    args = ["compose", "a", "b", "--base", str(base), "--out", str(out), "--calibrate", "none"]
    proc = start(world.db, *args, fault="merge.tensor#1:stall", fault_dir=tmp_path)
    flag = wait_stalled(proc, tmp_path, "merge.tensor")
    for shard in base.glob("model-*.safetensors"):
        os.truncate(shard, shard.stat().st_size // 2)
    flag.unlink()
    out_text, err = proc.communicate(timeout=300)
    assert_one_error(subprocess.CompletedProcess(proc.args, proc.returncode, out_text, err),
                     "ended early")  # fmt: skip
    no_finished_output(out)
    assert temps(tmp_path) == []
    assert_whole(world.db, before)
