"""Engines and transactions: SQLite tuned for several writers, PostgreSQL through the same code.

SQLite: WAL journal, ``busy_timeout``, foreign keys on, and ``BEGIN IMMEDIATE`` for write
transactions (a deferred transaction that reads and then writes fails with SQLITE_BUSY at once,
ignoring the timeout). The pysqlite driver's own transaction handling is switched off so that
SQLAlchemy's ``begin`` event can emit the BEGIN itself (SQLAlchemy docs, "Serializable isolation /
Savepoints / Transactional DDL"). PostgreSQL: every write transaction first takes one
transaction-scoped advisory lock, so writers are serialised exactly as on SQLite.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs
from sqlalchemy import Engine, create_engine, event, exc, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session

from sbora_reg import faults
from sbora_reg.errors import DatabaseBusyError, RegistryError

DEFAULT_BUSY_TIMEOUT_S = 30.0
# Arbitrary 64-bit keys for pg_advisory_(xact_)lock: one for writers, one for migrations.
PG_WRITE_LOCK = 0x5B0A_0001
PG_MIGRATE_LOCK = 0x5B0A_0002
_WRITE_OPTION = "sbora_reg_write"


def home_dir() -> Path:
    """``$SBORA_REG_HOME`` or the user data directory of sbora-reg."""
    env = os.environ.get("SBORA_REG_HOME")
    return Path(env) if env else Path(platformdirs.user_data_dir("sbora-reg"))


@dataclass(frozen=True)
class Location:
    """Where a registry lives: the SQLAlchemy URL, the SQLite file (if any), the data dir."""

    url: URL
    sqlite_path: Path | None
    data_dir: Path

    @property
    def display(self) -> str:
        return str(self.sqlite_path) if self.sqlite_path else self.url.render_as_string()


def locate(url_or_path: str | os.PathLike[str] | None, data_dir: Path | None = None) -> Location:
    """Resolve ``--db``: None -> default file, a path -> SQLite file, else a SQLAlchemy URL.

    The blobs of a SQLite registry live next to its file (``<db>.d/``); a server database keeps
    them in ``data_dir`` or ``$SBORA_REG_HOME`` / the user data directory.
    """
    if url_or_path is None:
        path = home_dir() / "sbora-reg.db"
    elif "://" in str(url_or_path):
        try:
            url = make_url(str(url_or_path))
        except (exc.ArgumentError, ValueError) as err:
            raise RegistryError(f"bad database URL {str(url_or_path)!r}: {err}") from err
        if url.get_backend_name() != "sqlite":
            return Location(url, None, data_dir or home_dir())
        if not url.database or url.database == ":memory:":
            raise RegistryError("an in-memory SQLite registry cannot hold blobs: pass a file path")
        path = Path(url.database)
    else:
        path = Path(url_or_path)
    path = path.expanduser().absolute()
    url = URL.create("sqlite+pysqlite", database=str(path))
    return Location(url, path, data_dir or Path(f"{path}.d"))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _setup_sqlite(engine: Engine, busy_timeout_s: float) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        write = conn.get_execution_options().get(_WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


class Database:
    """One registry database: a read engine, a write engine, and busy-error translation."""

    def __init__(self, location: Location, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S):
        self.location = location
        self.busy_timeout_s = busy_timeout_s
        self.is_sqlite = location.sqlite_path is not None
        if location.sqlite_path is not None:
            try:
                location.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:  # a regular file where a directory must be, no permission
                blocker = next(
                    (p for p in location.sqlite_path.parents if p.exists() and not p.is_dir()),
                    location.sqlite_path.parent,
                )
                why = "is a file, not a directory" if blocker.is_file() else f": {err.strerror}"
                raise RegistryError(
                    f"cannot create the registry {location.display}: {blocker} {why}".replace(
                        " :", ":"
                    )
                ) from None
            self.engine = create_engine(location.url, connect_args={"timeout": busy_timeout_s})
            _setup_sqlite(self.engine, busy_timeout_s)
        else:
            try:
                self.engine = create_engine(location.url, pool_pre_ping=True)
            except (exc.ArgumentError, ImportError) as err:
                raise RegistryError(
                    f"cannot open the registry {location.display}: {_one_line(str(err))}; use a "
                    "SQLite path or a postgresql+psycopg:// URL"
                ) from err
        self.write_engine = self.engine.execution_options(**{_WRITE_OPTION: True})

    def dispose(self) -> None:
        self.engine.dispose()

    @contextmanager
    def translate_errors(self) -> Iterator[None]:
        """Turn driver lock/connection failures into one-line registry errors."""
        try:
            yield
        except exc.OperationalError as err:
            raise self._operational_error(err) from err

    def _operational_error(self, err: exc.OperationalError) -> RegistryError:
        msg = _one_line(str(err.orig))
        lowered = msg.lower()
        if "locked" in lowered or "busy" in lowered or "lock timeout" in lowered:
            return DatabaseBusyError(
                f"the registry {self.location.display} stayed locked by another writer for "
                f"{self.busy_timeout_s:g} s: retry when it is done"
            )
        return RegistryError(f"cannot use the registry {self.location.display}: {msg}")

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self.translate_errors(), Session(self.engine, expire_on_commit=False) as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction (BEGIN IMMEDIATE / advisory lock), committed on success."""
        with (
            self.translate_errors(),
            Session(self.write_engine, expire_on_commit=False) as session,
        ):
            with session.begin():
                if not self.is_sqlite:
                    timeout_ms = int(self.busy_timeout_s * 1000)
                    session.execute(text(f"SET LOCAL lock_timeout = {timeout_ms}"))
                    session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_WRITE_LOCK})
                yield session
                faults.point("db.commit")
            faults.point("db.committed")
