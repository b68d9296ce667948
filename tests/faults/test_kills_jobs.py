"""SIGKILL at named events of the longer jobs: train --register, db upgrade, pull."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tests.faults.conftest import World
from tests.faults.faultlib import (
    assert_whole,
    cli,
    listed,
    no_finished_output,
    query,
    run_killed,
    snapshot,
    temps,
)
from tests.hub_server import HubServer

from sbora_reg import migrations
from sbora_reg.registry import Registry
from sbora_reg.registry.database import Database, locate

TOKEN = "hf_faults_token"


def _data(path: Path, n: int = 24) -> Path:
    rows = [{"prompt": f"{i % 10}+{i // 10}=", "answer": str(i % 10 + i // 10)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train_args(base: Path, data: Path, out: Path, name: str) -> list[str]:
    paths = ["--base", str(base), "--data", str(data), "--out", str(out)]
    sizes = ["--steps", "2", "--batch-size", "4", "--rank", "2", "--targets", "q_proj"]
    return ["train", *paths, *sizes, "--register", name]


# event -> (live reservations, blobs on disk not recorded, adapter folder written)
TRAIN_KILLS = {
    "db.committed#1": (1, 0, False),  # region reserved, training not started
    "out.rename": (1, 0, False),  # trained, the adapter folder about to be renamed into place
    "db.commit#2": (1, 1, True),  # adapter saved, its blob published, the record not committed
}


@pytest.mark.parametrize("event", sorted(TRAIN_KILLS))
def test_train_register_killed(tmp_path: Path, tiny_lm_dir: Path, event: str) -> None:
    db, out = tmp_path / "reg.db", tmp_path / "adapter"
    with Registry.open(db) as reg:
        reg.add_base(str(tiny_lm_dir))
    before = snapshot(db)
    args = _train_args(tiny_lm_dir, _data(tmp_path / "d.jsonl"), out, "adder")
    run_killed(db, *args, event=event)
    live_count, unrecorded, written = TRAIN_KILLS[event]
    after = snapshot(db)
    assert after["list"] == before["list"] == []
    assert query(db, "SELECT count(*) FROM reservations WHERE consumed_by_adapter_id IS NULL") == [
        (live_count,)
    ]
    assert len(list((Path(f"{db}.d") / "blobs").glob("[0-9a-f]*"))) == unrecorded
    assert out.is_dir() == written and (not written or (out / "sbora_config.json").is_file())
    if not written:
        no_finished_output(out)
    assert_whole(db, None)  # gc collects the unrecorded blob
    live = json.loads(cli(db, "reservations", "--json").stdout)
    assert len(live) == live_count
    if written:  # a complete adapter folder: register it as it is
        done = cli(db, "add", str(out), "--name", "adder", "--base", str(tiny_lm_dir))
    else:  # train again into the same --out
        done = cli(db, *args)
    assert done.exit_code == 0, done.output
    assert [r["ref"] for r in listed(db)] == ["adder@1"]
    # add consumed the reservation the adapter was trained on; a new train reserved anew
    assert len(json.loads(cli(db, "reservations", "--json").stdout)) == (0 if written else 1)
    assert temps(tmp_path) == []  # the next write beside OUT removed the dead writer's temp
    assert_whole(db, None)


def _old_registry(world: World, revision: str) -> tuple[Path, list]:
    """The world's registry migrated down to ``revision`` (rows kept), and its list at head."""
    head_list = listed(world.db)
    db = Database(locate(world.db))
    migrations.downgrade(db, revision)
    db.dispose()
    return world.db, head_list


def test_db_upgrade_killed_mid_migration_resumes(world: World) -> None:
    db, head_list = _old_registry(world, "0003")
    before = query(db, "SELECT version_num FROM alembic_version")
    assert before == [("0003",)]
    old_tables = {r[0] for r in query(db, "SELECT name FROM sqlite_master WHERE type='table'")}
    run_killed(db, "db", "upgrade", event="migrate.step#2")  # 0004 ran, 0005 ran, not committed
    assert query(db, "SELECT version_num FROM alembic_version") == before
    assert {r[0] for r in query(db, "SELECT name FROM sqlite_master WHERE type='table'")} == (
        old_tables
    )
    assert query(db, "PRAGMA integrity_check") == [("ok",)]
    done = cli(db, "db", "upgrade")
    assert done.exit_code == 0, done.output
    assert "0003 -> 0006" in done.output
    assert listed(db) == head_list
    assert_whole(db, None)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with HubServer(tmp_path / "hub", token=TOKEN) as running:
        yield running


# event -> what the pull had registered when it died
PULL_KILLS = {
    "pull.downloaded": [],  # every file downloaded and checked, nothing registered
    "db.commit#1": [],  # the adapter's record not committed (its blob published)
    "db.committed#1": ["pulled@1"],  # recorded, the Hub commit not yet noted on it
}


@pytest.mark.parametrize("event", sorted(PULL_KILLS))
def test_pull_killed(world: World, hub: HubServer, tmp_path: Path, event: str) -> None:
    pushed = cli(world.db, "push", "a", "--repo", "acme/a", "--endpoint", hub.url, "--json")
    assert pushed.exit_code == 0, pushed.output
    other = tmp_path / "other.db"
    assert cli(other, "base", "add", str(world.base)).exit_code == 0
    before = snapshot(other)
    args = ["pull", "acme/a", "--name", "pulled", "--base", str(world.base), "--endpoint", hub.url]
    run_killed(other, *args, event=event)
    assert [r["ref"] for r in listed(other)] == PULL_KILLS[event]
    if not PULL_KILLS[event]:
        assert_whole(other, before)
    again = cli(other, *args, "--json")
    assert again.exit_code == 0, again.output
    assert [r["ref"] for r in listed(other)] == ["pulled@1"]
    shown = json.loads(cli(other, "show", "pulled", "--json").stdout)
    assert [h["repo"] for h in shown["hub"]] == ["acme/a"]
    assert_whole(other, None)
    shutil.rmtree(tmp_path / "hub", ignore_errors=True)
