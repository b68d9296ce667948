"""Commands racing each other: rm + gc under a running compose; four train --register at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.faults.conftest import World
from tests.faults.faultlib import (
    assert_whole,
    check_sqlite,
    cli,
    file_hashes,
    no_finished_output,
    query,
    start,
    wait_stalled,
)
from tests.faults.test_kills import compose_args

from sbora_reg.registry import Registry

WEIGHTS = ("README.md", "sbora_manifest.json")  # these two name the output path


@pytest.mark.parametrize("event", ["compose.loaded", "merge.tensor#1"])
def test_rm_and_gc_while_compose_reads_the_same_blob(world: World, event: str) -> None:
    """compose loaded its members (or is writing), then a member is removed and its blob
    collected: the compose still writes the right bytes, and records the member by ref."""
    ref = world.root / "ref"
    assert cli(world.db, *compose_args(world, ref)).exit_code == 0
    out = world.root / "out"
    proc = start(world.db, *compose_args(world, out), fault=f"{event}:stall",
                 fault_dir=world.root)  # fmt: skip
    flag = wait_stalled(proc, world.root, event)
    sha_a = json.loads(cli(world.db, "show", "a", "--json").stdout)["sha256"]
    assert cli(world.db, "rm", "a").exit_code == 0
    gc = cli(world.db, "gc")
    assert gc.exit_code == 0, gc.output
    assert not (world.blobs / sha_a).exists()  # collected under the running compose
    flag.unlink()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert file_hashes(out, WEIGHTS) == file_hashes(ref, WEIGHTS)
    # the second composition: a@1 recorded by ref and hash, its adapter row gone
    assert query(
        world.db,
        "SELECT position, adapter_id, adapter_ref FROM composition_members"
        " WHERE composition_id = 2 ORDER BY position",
    ) == [(0, None, "a@1"), (1, 2, "b@1")]
    assert_whole(world.db, None, world.root)


def test_compose_of_a_member_collected_before_it_is_read(world: World, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """rm + gc between compose resolving a member and reading its files: one error line."""
    from sbora_reg.registry import store

    original = store.Registry.verified_blob

    def collect_first(self: Registry, sha256: str, what: str):  # type: ignore[no-untyped-def]
        with Registry.open(world.db) as other:
            other.rm("a")
            other.gc()
        return original(self, sha256, what)

    monkeypatch.setattr(store.Registry, "verified_blob", collect_first)
    out = world.root / "out"
    result = cli(world.db, *compose_args(world, out))
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    no_finished_output(out)
    check_sqlite(world.db)


def _data(path: Path, n: int = 24) -> Path:
    rows = [{"prompt": f"{i % 10}+{i // 10}=", "answer": str(i % 10 + i // 10)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_four_train_register_at_once_get_disjoint_regions(
    tmp_path: Path, tiny_lm_dir: Path
) -> None:
    db = tmp_path / "reg.db"
    data = _data(tmp_path / "d.jsonl")
    procs = [
        start(db, "train", "--base", str(tiny_lm_dir), "--data", str(data), "--out",
              str(tmp_path / f"t{i}"), "--steps", "2", "--batch-size", "4", "--rank", "4",
              "--targets", "q_proj,v_proj", "--register", f"t{i}", "--json")
        for i in range(4)
    ]  # fmt: skip
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    overlap = cli(db, "overlap", "t0", "t1", "t2", "t3", "--json")
    assert overlap.exit_code == 0, overlap.output
    pairs = json.loads(overlap.stdout)["pairs"]
    assert len(pairs) == 6 and all(p["shared_cells"] == 0 for p in pairs), overlap.stdout
    consumed = query(db, "SELECT consumed_by_adapter_id FROM reservations")
    assert len(consumed) == 4 and all(c != (None,) for c in consumed)  # every one consumed
    assert_whole(db, None)


def test_a_blob_collected_while_compose_hashes_it(world: World, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """gc detaches the blob after compose found it and before it re-hashed its files."""
    from sbora_reg.registry import blobs

    original = blobs.BlobStore.content_sha256

    def collected_first(self, sha256: str) -> str:  # type: ignore[no-untyped-def]
        with Registry.open(world.db) as other:
            other.rm("a")
            other.gc()
        return original(self, sha256)

    monkeypatch.setattr(blobs.BlobStore, "content_sha256", collected_first)
    out = world.root / "out"
    result = cli(world.db, *compose_args(world, out))
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "removed while being read" in lines[0], result.output
    no_finished_output(out)
    check_sqlite(world.db)
