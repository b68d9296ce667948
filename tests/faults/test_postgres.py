"""The same faults on a PostgreSQL registry: a kill inside a write transaction, and rm + gc under
a running compose (the database enforces the composition's foreign keys too)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from tests.faults.conftest import World
from tests.faults.faultlib import cli, listed, run_killed, start, wait_stalled
from tests.faults.test_kills import compose_args

from sbora_reg.registry import Registry

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_world(world: World, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    """The world's two adapters in a fresh PostgreSQL registry (blobs in SBORA_REG_HOME)."""
    monkeypatch.setenv("SBORA_REG_HOME", str(tmp_path / "home"))
    with Registry.open(pg_url) as reg:
        reg.add_base(str(world.base))
        for name in ("a", "b"):
            reg.add(world.root / "src" / name, name=name, base=str(world.base))
    return World(world.root, pg_url, world.base)  # type: ignore[arg-type]


def test_rm_killed_before_its_commit_on_postgres(pg_world: World) -> None:
    before = listed(pg_world.db)
    run_killed(pg_world.db, "rm", "a", event="db.commit")
    assert listed(pg_world.db) == before
    assert cli(pg_world.db, "rm", "a").exit_code == 0


def test_rm_and_gc_under_a_running_compose_on_postgres(pg_world: World) -> None:
    out = pg_world.root / "out"
    proc = start(pg_world.db, *compose_args(pg_world, out), fault="compose.loaded:stall",
                 fault_dir=pg_world.root)  # fmt: skip
    flag = wait_stalled(proc, pg_world.root, "compose.loaded")
    assert cli(pg_world.db, "rm", "a").exit_code == 0
    assert cli(pg_world.db, "gc").exit_code == 0
    flag.unlink()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert json.loads((out / "sbora_manifest.json").read_text())["members"][0]["name"] == "a"
    engine = create_engine(str(pg_world.db))
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT position, adapter_id, adapter_ref FROM composition_members ORDER BY 1")
        ).all()
    engine.dispose()
    assert [(r[0], r[1], r[2]) for r in rows] == [(0, None, "a@1"), (1, 2, "b@1")]
