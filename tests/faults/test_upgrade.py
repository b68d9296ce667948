"""A registry made at the previous schema head (0005, ``fixtures/registry_0005.db``) opens,
migrates and keeps every record, region, tag, reservation, composition and Hub ref; a migration
killed halfway leaves it at 0005, and the next open finishes it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tests.faults.faultlib import assert_whole, cli, query, run_killed, tables

from sbora_reg import migrations

FIXTURE = Path(__file__).parent / "fixtures" / "registry_0005.db"
EXPECTED = json.loads(FIXTURE.with_suffix(".json").read_text())


@pytest.fixture
def old_db(tmp_path: Path) -> Path:
    db = tmp_path / "registry.db"
    shutil.copy(FIXTURE, db)
    shutil.copytree(f"{FIXTURE}.d", f"{db}.d")
    assert query(db, "SELECT version_num FROM alembic_version") == [("0005",)]
    return db


def _rows_kept(db: Path, before: dict[str, list[tuple]]) -> None:
    """Every table of 0005 holds the same rows; columns 0006 added are NULL in them."""
    after = tables(db)
    for name, rows in before.items():
        if name == "alembic_version":
            continue
        width = len(rows[0]) if rows else 0
        assert [r[:width] for r in after[name]] == rows, name
        assert all(value is None for r in after[name] for value in r[width:]), name


def _same_records(db: Path) -> None:
    listed = cli(db, "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.stdout) == EXPECTED["list"]
    for ref, shown in EXPECTED["show"].items():
        assert json.loads(cli(db, "show", ref, "--json").stdout) == shown
    verified = cli(db, "verify", "--all", "--json")
    assert verified.exit_code == 0, verified.output


def test_a_registry_from_the_previous_schema_opens_and_keeps_everything(old_db: Path) -> None:
    before = tables(old_db)
    _same_records(old_db)  # the first command migrates on open
    assert query(old_db, "SELECT version_num FROM alembic_version") == [
        (migrations.head_revision(),)
    ]
    _rows_kept(old_db, before)
    overlap = cli(old_db, "overlap", "adder@1", "sorter", "--json")
    assert overlap.exit_code == 0, overlap.output
    assert_whole(old_db, None)


def test_an_upgrade_killed_halfway_resumes(old_db: Path) -> None:
    before = tables(old_db)
    run_killed(old_db, "db", "upgrade", event="migrate.step#1")  # 0006 ran, not committed
    assert tables(old_db) == before
    assert query(old_db, "PRAGMA integrity_check") == [("ok",)]
    done = cli(old_db, "db", "upgrade")
    assert done.exit_code == 0 and "0005 -> 0006" in done.output, done.output
    _rows_kept(old_db, before)
    _same_records(old_db)
    assert_whole(old_db, None)
