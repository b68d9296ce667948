"""SIGKILL at named events (``SBORA_REG_FAULT=EVENT:kill``) of compose, rm, gc and allocate.

Each case kills the command where the event says, then checks the registry is as before and
sound, records what the kill left behind, and runs the command again to success.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.faults.conftest import World
from tests.faults.faultlib import (
    assert_whole,
    cli,
    file_hashes,
    no_finished_output,
    run_killed,
    snapshot,
    tables,
)

COMPOSE_EVENTS = ["out.staged", "merge.tensor#1", "merge.tensor#9", "out.rename"]


def compose_args(world: World, out: Path, fmt: str = "merged", *extra: str) -> list[str]:
    return ["compose", "a", "b", "--base", str(world.base), "--out", str(out), "--format", fmt,
            "--calibrate", "none", *extra]  # fmt: skip


@pytest.mark.parametrize("event", COMPOSE_EVENTS)
def test_compose_merged_killed(world: World, event: str) -> None:
    out = world.root / "out"
    before = snapshot(world.db)
    run_killed(world.db, *compose_args(world, out), event=event)
    no_finished_output(out)
    left = [n for n in (p.name for p in world.root.iterdir()) if n.startswith("out.tmp-")]
    assert len(left) == 1  # the dead writer's temp folder, never under the final name
    assert snapshot(world.db) == before  # nothing recorded
    done = cli(world.db, *compose_args(world, out))
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in world.root.iterdir() if p.name.startswith("out")) == ["out"]
    assert len(tables(world.db)["compositions"]) == 1
    assert_whole(world.db, None, world.root)


@pytest.mark.parametrize(
    ("fmt", "event"),
    [("adapter", "out.staged"), ("adapter", "out.rename"), ("peft", "out.staged"),
     ("peft", "out.rename"), ("peft", "out.rename#2")],  # peft: the PEFT writer's, then compose's
)  # fmt: skip
def test_compose_adapter_formats_killed(world: World, fmt: str, event: str) -> None:
    out = world.root / "out"
    before = snapshot(world.db)
    run_killed(world.db, *compose_args(world, out, fmt), event=event)
    no_finished_output(out)
    # the dead writer's temp folder (peft: also the one to_peft writes beside it)
    assert 1 <= len([p for p in world.root.iterdir() if p.name.startswith("out.tmp-")]) <= 2
    assert assert_whole(world.db, before) == []  # no output recorded yet: gc does not look
    done = cli(world.db, *compose_args(world, out, fmt))  # removes the dead writer's temp
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in world.root.iterdir() if p.name.startswith("out")) == ["out"]


@pytest.mark.parametrize("then", ["gc", "compose"])
def test_compose_force_killed_between_moving_the_old_output_aside_and_the_new_into_place(
    world: World, then: str
) -> None:
    """The one window where OUT is absent: the old output sits in ``OUT.tmp-<pid>-*-old``;
    gc (OUT is a recorded output) or the next compose to OUT puts it back."""
    out = world.root / "out"
    assert cli(world.db, *compose_args(world, out)).exit_code == 0
    first = file_hashes(out)
    run_killed(world.db, *compose_args(world, out, "merged", "--force"), event="out.swap")
    no_finished_output(out)
    left = sorted(p.name for p in world.root.iterdir() if p.name.startswith("out."))
    assert len(left) == 2 and left[1].endswith("-old")  # the new output and the old one, whole
    assert file_hashes(world.root / left[1]) == first
    if then == "gc":
        assert_whole(world.db, None, world.root)  # restores OUT, removes the new temp
        assert file_hashes(out) == first
    else:  # a compose without --force finds OUT back in place and refuses to overwrite it
        again = cli(world.db, *compose_args(world, out))
        assert again.exit_code == 1 and "already exists" in again.stderr, again.output
        assert file_hashes(out) == first
        assert cli(world.db, *compose_args(world, out, "merged", "--force")).exit_code == 0
        assert_whole(world.db, None, world.root)
    assert sorted(p.name for p in world.root.iterdir() if p.name.startswith("out")) == ["out"]


def test_compose_killed_after_the_output_is_in_place(world: World) -> None:
    """Killed between the rename and the record: a complete output that is not recorded."""
    out = world.root / "out"
    before = snapshot(world.db)
    run_killed(world.db, *compose_args(world, out), event="compose.record")
    assert snapshot(world.db) == before
    manifest = json.loads((out / "sbora_manifest.json").read_text())
    assert [m["name"] for m in manifest["members"]] == ["a", "b"]
    done = cli(world.db, *compose_args(world, out, "merged", "--force"))
    assert done.exit_code == 0, done.output
    assert len(tables(world.db)["compositions"]) == 1


@pytest.mark.parametrize("event", ["db.commit"])
def test_rm_killed(world: World, event: str) -> None:
    before = snapshot(world.db)
    run_killed(world.db, "rm", "a", event=event)
    assert assert_whole(world.db, before) == []
    assert cli(world.db, "rm", "a").exit_code == 0


@pytest.mark.parametrize("event", ["db.commit", "gc.remove"])
def test_gc_killed(world: World, event: str) -> None:
    """Killed inside its transaction (blob moved aside, rows not deleted) or after it."""
    assert cli(world.db, "rm", "a").exit_code == 0
    before = snapshot(world.db)
    run_killed(world.db, "gc", event=event)
    after = snapshot(world.db)
    assert after["list"] == before["list"]
    if event == "db.commit":
        assert after == before  # rolled back: the unreferenced blob row is still there
    else:
        assert len(after["tables"]["blobs"]) == len(before["tables"]["blobs"]) - 1
    left = assert_whole(world.db, None)
    assert len(left) == 1 and left[0].startswith(".tmp-0-gc-")  # the detached blob


def test_allocate_killed_before_commit(world: World) -> None:
    before = snapshot(world.db)
    idx = world.root / "idx.safetensors"
    args = ["allocate", "--base", str(world.base), "--variant", "fa", "--rank", "2",
            "--targets", "up_proj", "--out", str(idx)]  # fmt: skip
    run_killed(world.db, *args, event="db.commit")
    assert not idx.exists()
    assert_whole(world.db, before)
    assert cli(world.db, *args).exit_code == 0 and idx.is_file()


def test_allocate_killed_after_commit_leaves_a_live_reservation(world: World) -> None:
    """Measured: the reservation is committed before the indices file is written, so a kill
    in between keeps its indices reserved (nothing else changes); ``reservations`` lists it and
    ``reservations --release ID`` frees it."""
    before = snapshot(world.db)
    idx = world.root / "idx.safetensors"
    args = ["allocate", "--base", str(world.base), "--variant", "fa", "--rank", "2",
            "--targets", "up_proj", "--out", str(idx)]  # fmt: skip
    run_killed(world.db, *args, event="db.committed")
    assert not idx.exists()
    rows = tables(world.db)["reservations"]
    assert len(rows) == 1 and len(before["tables"]["reservations"]) == 0
    assert_whole(world.db, None)
    live = json.loads(cli(world.db, "reservations", "--json").stdout)
    assert [(r["id"], r["variant"], r["rank"]) for r in live] == [(rows[0][0], "fa", 2)]
    released = cli(world.db, "reservations", "--release", str(live[0]["id"]), "--json")
    assert released.exit_code == 0 and json.loads(released.stdout) == [], released.output
    assert snapshot(world.db) == before
    again = cli(world.db, "reservations", "--release", str(live[0]["id"]))
    assert again.exit_code == 1 and again.stderr.startswith("Error: no reservation")
