"""Alembic migrations of the registry, shipped in the package and run through Alembic's API.

A new database is created at head on first use; an older one is upgraded under a lock (a file
lock next to a SQLite database, ``pg_advisory_lock`` on PostgreSQL) so that processes opening it
at once do not both migrate. A database whose revision this code does not know was written by a
newer sbora-reg and is refused.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

from sbora_reg import __version__
from sbora_reg.errors import SchemaError
from sbora_reg.registry.database import PG_MIGRATE_LOCK, Database

log = logging.getLogger(__name__)


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic ``Config`` built in code; ``connection`` is shared with ``env.py``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(files("sbora_reg.migrations")))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@lru_cache(maxsize=1)
def script_directory() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    heads = script_directory().get_heads()
    if len(heads) != 1:  # pragma: no cover - guarded by tests/migrations
        raise SchemaError(f"the packaged migrations have {len(heads)} heads; reinstall sbora-reg")
    return heads[0]


def current_revision(db: Database) -> str | None:
    with db.translate_errors(), db.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _check_known(db: Database, revision: str | None) -> None:
    if revision is None:
        return
    known = {s.revision for s in script_directory().walk_revisions()}
    if revision not in known:
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
    with db.translate_errors(), _migration_lock(db) as conn:
        current = MigrationContext.configure(conn).get_current_revision()
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
