"""Alembic migrations of the registry, shipped in the package and run through Alembic's API.

A new database is created at head on first use; an older one is upgraded under a lock (a file
lock next to a SQLite database, ``pg_advisory_lock`` on PostgreSQL) so that processes opening it
at once do not both migrate. A database whose revision this code does not know was written by a
newer sbora-reg and is refused.

Opening a registry at head costs one query: the revisions are listed here (``REVISIONS``; a test
checks them against the scripts) and Alembic is imported only to migrate.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, inspect, text

from sbora_reg import __version__
from sbora_reg.errors import SchemaError
from sbora_reg.registry.database import PG_MIGRATE_LOCK, Database

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

log = logging.getLogger(__name__)

# Every revision of versions/, oldest first; the last is the head.
REVISIONS = ("0001", "0002", "0003", "0004", "0005", "0006")
VERSION_TABLE = "alembic_version"


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic ``Config`` built in code; ``connection`` is shared with ``env.py``."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(files("sbora_reg.migrations")))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@lru_cache(maxsize=1)
def script_directory() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    return REVISIONS[-1]


def _read_revision(conn: Connection) -> str | None:
    """The database's revision (None when empty), as Alembic stores it: one row, one column."""
    if not inspect(conn).has_table(VERSION_TABLE):
        return None
    rows = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
    if len(rows) > 1:
        raise SchemaError(f"the registry has {len(rows)} schema revisions: {', '.join(rows)}")
    return rows[0] if rows else None


def current_revision(db: Database) -> str | None:
    with db.translate_errors(), db.engine.connect() as conn:
        return _read_revision(conn)


def _check_known(db: Database, revision: str | None) -> None:
    if revision is None:
        return
    if revision not in REVISIONS:
        raise SchemaError(
            f"the registry {db.location.display} has schema revision {revision}, newer than "
            f"this sbora-reg {__version__} knows (head {head_revision()}): upgrade sbora-reg, "
            "or use another --db"
        )


@contextmanager
def _migration_lock(db: Database) -> Iterator[Connection]:
    """A write connection held under the cross-process migration lock."""
    if db.location.sqlite_path is not None:
        lock_path = Path(f"{db.location.sqlite_path}.lock")
        with open(lock_path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                with db.write_engine.connect() as conn:
                    yield conn
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    else:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": PG_MIGRATE_LOCK})
            conn.commit()
            try:
                yield conn
            finally:
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PG_MIGRATE_LOCK})
                conn.commit()


def _run(db: Database, revision: str, downgrade: bool) -> None:
    from alembic import command

    with db.translate_errors(), _migration_lock(db) as conn:
        current = _read_revision(conn)
        _check_known(db, current)
        conn.rollback()  # end the read so Alembic starts its own transaction
        cfg = alembic_config(conn)
        if downgrade:
            command.downgrade(cfg, revision)
        else:
            command.upgrade(cfg, revision)
        conn.commit()


def upgrade(db: Database, revision: str = "head") -> None:
    """Upgrade the schema (from nothing, or from an older revision) under the lock."""
    _run(db, revision, downgrade=False)


def downgrade(db: Database, revision: str) -> None:
    """Downgrade the schema (``"base"`` drops every table)."""
    _run(db, revision, downgrade=True)


def ensure_current(db: Database) -> None:
    """Migrate-on-open: refuse a newer schema, upgrade an older or empty one, else do nothing."""
    revision = current_revision(db)
    _check_known(db, revision)
    if revision == head_revision():
        return
    log.info("upgrading %s from %s to %s", db.location.display, revision, head_revision())
    upgrade(db)
