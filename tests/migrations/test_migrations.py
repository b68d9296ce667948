"""Migrations: empty -> head, models match migrations, single head, downgrade, data kept."""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from sbora_reg import migrations
from sbora_reg.errors import SchemaError
from sbora_reg.registry import Registry, indexblob
from sbora_reg.registry.database import Database, locate
from sbora_reg.registry.models import Base

PG_URL = os.environ.get("SBORA_REG_TEST_PG_URL")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """An empty database on each backend (PostgreSQL: a fresh one, dropped afterwards)."""
    if request.param == "sqlite":
        database = Database(locate(tmp_path / "m.db"))
        yield database
        database.dispose()
        return
    if not PG_URL:
        pytest.skip("SBORA_REG_TEST_PG_URL is not set (bash .ci/postgres.sh starts a server)")
    name = f"sbora_mig_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    database = Database(locate(make_url(PG_URL).set(database=name).render_as_string(False)))
    try:
        yield database
    finally:
        database.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def tables(db: Database) -> set[str]:
    return set(inspect(db.engine).get_table_names())


def test_single_linear_head() -> None:
    script = migrations.script_directory()
    assert len(script.get_heads()) == 1
    revisions = list(script.walk_revisions())
    assert len(script.get_bases()) == 1
    assert all(len(r.nextrev) <= 1 for r in revisions)  # no branches
    assert migrations.head_revision() == script.get_current_head()
    # the list that opening a registry reads instead of Alembic's scripts
    assert tuple(r.revision for r in reversed(revisions)) == migrations.REVISIONS


def test_empty_to_head_matches_models(db: Database) -> None:
    assert migrations.current_revision(db) is None
    migrations.ensure_current(db)
    assert migrations.current_revision(db) == migrations.head_revision()
    assert tables(db) == set(Base.metadata.tables) | {"alembic_version"}
    with db.engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
        )
    assert diff == []


def test_downgrade_to_base_and_back(db: Database) -> None:
    migrations.upgrade(db)
    migrations.downgrade(db, "base")
    assert migrations.current_revision(db) is None
    assert tables(db) <= {"alembic_version"}
    migrations.upgrade(db)
    assert migrations.current_revision(db) == migrations.head_revision()


def test_step_by_step_downgrade(db: Database) -> None:
    revisions = [r.revision for r in migrations.script_directory().walk_revisions()]
    migrations.upgrade(db)
    for rev in revisions[1:]:  # newest first: step down one revision at a time
        migrations.downgrade(db, rev)
        assert migrations.current_revision(db) == rev


def test_first_revision_data_survives_upgrade(db: Database, tmp_path: Path) -> None:
    first = migrations.script_directory().get_bases()[0]
    migrations.upgrade(db, first)
    assert "reservations" not in tables(db)
    idx = np.array([3, 9, 17, 60], dtype=np.int64)
    with db.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO bases (id, name, fingerprint, created) "
                "VALUES (1, 'base', :fp, '2026-01-01 00:00:00')"
            ),
            {"fp": "f" * 64},
        )
        conn.execute(
            text(
                "INSERT INTO base_modules (id, base_id, name, kind, out_features, in_features) "
                "VALUES (1, 1, 'layers.0.q_proj', 'linear', 64, 64)"
            )
        )
        conn.execute(
            text("INSERT INTO blobs (sha256, size, created) VALUES (:s, 10, '2026-01-01')"),
            {"s": "a" * 64},
        )
        conn.execute(text("INSERT INTO adapter_names (name, last_version) VALUES ('old', 1)"))
        conn.execute(
            text(
                "INSERT INTO adapters (id, name, version, base_id, task, format, variant, rank, "
                "alpha, target_modules, sha256, size, created, metadata, provenance) VALUES "
                "(1, 'old', 1, 1, 'math', 'sbora', 'fa', 4, 8.0, '[\"q_proj\"]', :s, 10, "
                "'2026-01-01 00:00:00', '{\"k\": \"v\"}', '{}')"
            ),
            {"s": "a" * 64},
        )
        conn.execute(text("INSERT INTO tags (adapter_id, key, value) VALUES (1, 'team', 'x')"))
        conn.execute(
            text(
                "INSERT INTO regions (adapter_id, module_id, variant, count, indices) "
                "VALUES (1, 1, 'fa', 4, :b)"
            ),
            {"b": indexblob.encode(idx)},
        )
    url = db.location.sqlite_path or db.location.url.render_as_string(hide_password=False)
    with Registry.open(url, data_dir=tmp_path / "data") as reg:
        assert reg.schema().up_to_date
        rec = reg.resolve("old")
        assert (rec.ref, rec.task, rec.tags, rec.metadata) == (
            "old@1",
            "math",
            {"team": "x"},
            {"k": "v"},
        )
        region = reg.regions(rec)["layers.0.q_proj"]
        np.testing.assert_array_equal(region.indices, idx)
    assert "reservations" in tables(db)


def test_newer_schema_refused(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    Registry.open(db).close()
    con = sqlite3.connect(db)
    con.execute("UPDATE alembic_version SET version_num = 'ffff_from_the_future'")
    con.commit()
    con.close()
    with pytest.raises(SchemaError, match="newer than this sbora-reg"):
        Registry.open(db)
    with pytest.raises(SchemaError):
        Registry.open(db, migrate=False).upgrade()


def test_footprints_backfilled_from_0002(db: Database, tmp_path: Path) -> None:
    """Adapters registered before 0003 get footprints equal to their regions (both widths)."""
    migrations.upgrade(db, "0002")
    fa_idx, fb_idx = np.array([2, 7, 40]), np.array([1, 65_540, 69_999])
    with db.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO bases (id, name, fingerprint, created) "
                "VALUES (1, 'base', :fp, '2026-01-01 00:00:00')"
            ),
            {"fp": "f" * 64},
        )
        for mid, (out, inn) in enumerate([(64, 64), (70_000, 64), (64, 64)], start=1):
            conn.execute(
                text(
                    "INSERT INTO base_modules (id, base_id, name, kind, out_features, in_features)"
                    " VALUES (:i, 1, :n, 'linear', :o, :in_)"
                ),
                {"i": mid, "n": f"m{mid}", "o": out, "in_": inn},
            )
        conn.execute(
            text("INSERT INTO blobs (sha256, size, created) VALUES (:s, 10, '2026-01-01')"),
            {"s": "a" * 64},
        )
        conn.execute(text("INSERT INTO adapter_names (name, last_version) VALUES ('old', 3)"))
        for aid in (1, 2, 3):
            conn.execute(
                text(
                    "INSERT INTO adapters (id, name, version, base_id, task, format, variant, "
                    "rank, alpha, target_modules, sha256, size, created, metadata, provenance) "
                    "VALUES (:i, 'old', :i, 1, NULL, 'sbora', 'fa', 3, 6.0, '[]', :s, 10, "
                    "'2026-01-01 00:00:00', '{}', '{}')"
                ),
                {"i": aid, "s": "a" * 64},
            )
        regions = [
            (1, 1, "fa", fa_idx),
            (1, 3, "lora", None),
            (2, 2, "fb", fb_idx),  # uint32: a row index above 65535
            (2, 1, "fa", fa_idx + 1),
        ]  # adapter 3 has no regions at all
        for aid, mid, variant, idx in regions:
            conn.execute(
                text(
                    "INSERT INTO regions (adapter_id, module_id, variant, count, indices) "
                    "VALUES (:a, :m, :v, :c, :b)"
                ),
                {
                    "a": aid,
                    "m": mid,
                    "v": variant,
                    "c": 0 if idx is None else idx.size,
                    "b": None if idx is None else indexblob.encode(idx),
                },
            )
    migrations.upgrade(db)
    url = db.location.sqlite_path or db.location.url.render_as_string(hide_password=False)
    with Registry.open(url, data_dir=tmp_path / "data") as reg:
        table = reg.region_table("base")
        by_ref = reg.regions_on_base("base")
    assert table.names == ["old@1", "old@2", "old@3"]
    starts = np.concatenate(([0], np.cumsum(table.seg_count)))
    offsets = {"fa": table.col_offset, "fb": table.row_offset}
    packed: dict[str, dict[str, tuple[str, list[int]]]] = {}
    for s in range(table.seg_count.size):
        variant = ("fa", "fb", "lora")[int(table.seg_variant[s])]
        mod = int(table.seg_module[s])
        keys = table.keys[starts[s] : starts[s + 1]].astype(np.int64)
        local = keys - offsets[variant][mod] if variant != "lora" else keys
        name = table.names[int(table.seg_adapter[s])]
        packed.setdefault(name, {})[table.modules[mod]] = (variant, local.tolist())
    expected = {
        ref: {n: (r.variant, r.indices.tolist()) for n, r in regs.items()}
        for ref, regs in by_ref.items()
    }
    assert packed == expected
    assert packed["old@2"]["m2"] == ("fb", fb_idx.tolist())
    assert packed["old@1"]["m3"] == ("lora", [])
    migrations.downgrade(db, "0002")
    assert "footprints" not in tables(db)
