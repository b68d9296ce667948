"""Registry fixtures: a tiny base, and a fresh registry on SQLite and (when configured) PostgreSQL.

PostgreSQL tests run when ``SBORA_REG_TEST_PG_URL`` names a server (``bash .ci/postgres.sh``
starts one); each test gets a database of its own, dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

# registry_factory sits beside this file; make it importable under any --import-mode.
from tests.registry.registry_factory import make_base

from sbora_reg.registry import Registry  # noqa: E402

PG_URL = os.environ.get("SBORA_REG_TEST_PG_URL")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(tmp_path_factory.mktemp("base") / "tiny-llama")


def _pg_admin():
    return create_engine(PG_URL, isolation_level="AUTOCOMMIT")


def _pg_database_url(name: str) -> str:
    return make_url(PG_URL).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A database migrated to head once per session; tests get copies (CREATE ... TEMPLATE)."""
    if not PG_URL:
        pytest.skip("SBORA_REG_TEST_PG_URL is not set (bash .ci/postgres.sh starts a server)")
    name = f"sbora_tmpl_{uuid.uuid4().hex[:12]}"
    admin = _pg_admin()
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        Registry.open(_pg_database_url(name), data_dir="/nonexistent").close()
        yield name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def pg_url(pg_template: str) -> Iterator[str]:
    """A fresh PostgreSQL database at head for one test, dropped afterwards."""
    name = f"sbora_test_{uuid.uuid4().hex[:12]}"
    admin = _pg_admin()
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"'))
    try:
        yield _pg_database_url(name)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A registry location on each backend: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "registry.db")
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def registry(db_url: str, tmp_path: Path) -> Iterator[Registry]:
    with Registry.open(db_url, data_dir=tmp_path / "data") as reg:
        yield reg
