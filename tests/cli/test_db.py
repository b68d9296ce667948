"""CLI: db upgrade / db current."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sbora_reg import migrations
from sbora_reg.cli import main
from sbora_reg.registry.database import Database, locate


def test_current_on_empty_then_upgrade(tmp_path: Path) -> None:
    db = str(tmp_path / "r.db")
    runner = CliRunner()
    head = migrations.head_revision()
    empty = json.loads(runner.invoke(main, ["--db", db, "db", "current", "--json"]).output)
    assert (empty["current"], empty["head"], empty["up_to_date"]) == (None, head, False)
    result = runner.invoke(main, ["--db", db, "db", "upgrade"])
    assert result.exit_code == 0 and f"-> {head}" in result.output
    again = runner.invoke(main, ["--db", db, "db", "upgrade"])
    assert again.exit_code == 0 and "already at" in again.output
    now = json.loads(runner.invoke(main, ["--db", db, "db", "current", "--json"]).output)
    assert now == {"database": db, "current": head, "head": head, "up_to_date": True}
    assert "up to date" in runner.invoke(main, ["--db", db, "db", "current"]).output


def test_upgrade_from_first_revision(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    database = Database(locate(db))
    first = migrations.script_directory().get_bases()[0]
    migrations.upgrade(database, first)
    database.dispose()
    result = CliRunner().invoke(main, ["--db", str(db), "db", "upgrade"])
    assert result.exit_code == 0
    assert f"{first} -> {migrations.head_revision()}" in result.output


@pytest.mark.parametrize(
    "db",
    ["mysql://nobody@127.0.0.1/x", "postgresql://::bad", "postgresql+psycopg://u@127.0.0.1:1/x"],
)
def test_unusable_database_is_one_error_line(db: str, tmp_path: Path) -> None:
    result = CliRunner(env={"SBORA_REG_HOME": str(tmp_path)}).invoke(main, ["--db", db, "list"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1


def test_directory_as_database_is_an_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--db", str(tmp_path), "db", "current"])
    assert result.exit_code == 1 and result.output.startswith("Error: ")
