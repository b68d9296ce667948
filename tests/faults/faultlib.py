"""What every fault case checks, and how it runs a command up to a named event.

A case runs ``sbora-reg`` in a subprocess (``python -m sbora_reg.cli``) with
``SBORA_REG_FAULT=EVENT:kill`` (or ``:stall``, see ``sbora_reg.faults``), then checks:

- a command that fails prints one line ``Error: ...`` (no traceback) and exits non-zero
  (``assert_one_error``);
- the registry is exactly as before (``snapshot``: every row of every table and ``list --json``),
  SQLite's ``integrity_check`` and ``foreign_key_check`` are clean, and every blob on disk is
  referenced or collected by the next ``gc`` (``assert_whole``);
- nothing that looks finished is left where the output goes (each case asserts its ``--out``).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from sbora_reg.cli import main
from sbora_reg.faults import DIR_ENV, ENV
from sbora_reg.registry import Registry

TIMEOUT_S = 300


def env_for(fault: str | None, fault_dir: Path | None, extra: dict[str, str] | None) -> dict:
    env = {**os.environ, **(extra or {})}
    env.pop(ENV, None)
    if fault is not None:
        env[ENV] = fault
        env[DIR_ENV] = str(fault_dir or Path.cwd())
    return env


def start(
    db: Path | str,
    *args: str,
    fault: str | None = None,
    fault_dir: Path | None = None,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.Popen[str]:
    """``sbora-reg --db DB ARGS`` in a subprocess (stdout and stderr captured)."""
    return subprocess.Popen(
        [sys.executable, "-m", "sbora_reg.cli", "--db", str(db), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_for(fault, fault_dir, env),
        preexec_fn=preexec_fn,
    )


def run(db: Path | str, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``start`` and wait for it."""
    proc = start(db, *args, **kwargs)
    out, err = proc.communicate(timeout=TIMEOUT_S)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_killed(db: Path | str, *args: str, event: str, **kwargs: Any) -> None:
    """Run a command that SIGKILLs itself when it reaches ``event``; fail if it never does."""
    done = run(db, *args, fault=f"{event}:kill", **kwargs)
    assert done.returncode == -signal.SIGKILL, (
        f"{args[0]} never reached {event} (exit {done.returncode}): {done.stderr[-2000:]}"
    )


def wait_stalled(proc: subprocess.Popen[str], fault_dir: Path, event: str) -> Path:
    """Wait until ``proc`` stands at ``event`` (its flag file exists); return the flag."""
    flag = fault_dir / event.partition("#")[0]
    deadline = time.monotonic() + TIMEOUT_S
    while not flag.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {event}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            kill(proc)
            raise AssertionError(f"never reached {event}")
        time.sleep(0.02)
    return flag


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def assert_one_error(done: subprocess.CompletedProcess[str] | Any, *needles: str) -> str:
    """A failed command: exit 1, one stderr line ``Error: ...``, no traceback; the line."""
    err = done.stderr
    assert done.returncode == 1, (done.returncode, err[-3000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err[-3000:]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def cli(db: Path | str, *args: str) -> Any:
    """A command in this process (click's runner), for the checks between fault runs."""
    return CliRunner().invoke(main, ["--db", str(db), *args])


def listed(db: Path | str) -> Any:
    result = cli(db, "list", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def tables(db: Path | str) -> dict[str, list[tuple]]:
    """Every row of every table, sorted: the registry's whole state."""
    conn = sqlite3.connect(db)
    try:
        names = [
            r[0]
            for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")
        ]
        return {
            n: sorted(map(tuple, conn.execute(f'SELECT * FROM "{n}"')), key=repr) for n in names
        }
    finally:
        conn.close()


def query(db: Path | str, sql: str) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def snapshot(db: Path | str) -> dict[str, Any]:
    """``list --json`` and every table's rows."""
    return {"list": listed(db), "tables": tables(db)}


def check_sqlite(db: Path | str) -> None:
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []  # no orphan rows
        # the packed footprint rows and the probe sets each adapter names
        assert conn.execute(
            "SELECT count(*) FROM adapters WHERE id NOT IN (SELECT adapter_id FROM footprints)"
        ).fetchone() == (0,)
        assert conn.execute(
            "SELECT count(*) FROM adapters WHERE probe_sha256 IS NOT NULL AND probe_sha256 NOT IN"
            " (SELECT sha256 FROM blobs)"
        ).fetchone() == (0,)
    finally:
        conn.close()


def temps(*folders: Path) -> list[str]:
    """Names of temp folders (``*.tmp-*``) in ``folders``: what a killed writer left."""
    return sorted(p.name for f in folders if f.is_dir() for p in f.iterdir() if ".tmp-" in p.name)


def assert_whole(db: Path | str, before: dict[str, Any] | None, *beside: Path) -> list[str]:
    """The registry as ``before`` (when given) and sound; every stored blob referenced or
    collected by ``gc``, after which no temp folder is left in the store or in ``beside``.
    Returns the temp folders that were there before the gc (what the fault left behind)."""
    if before is not None:
        assert snapshot(db) == before
    check_sqlite(db)
    with Registry.open(db) as reg:
        left = temps(reg.blobs.root, *beside)
        reg.gc()
        referenced = {r.sha256 for r in reg.list()} | {
            r.probe_sha256 for r in reg.list() if r.probe_sha256
        }
        assert set(reg.blobs.stored()) == referenced
        assert temps(reg.blobs.root, *beside) == []
        for rec in reg.list():
            reg.verified_blob(rec.sha256, rec.ref)
    check_sqlite(db)
    return left


def no_finished_output(out: Path) -> None:
    """``out`` does not exist (no half-written folder under the final name)."""
    assert not out.exists(), sorted(p.name for p in out.iterdir())


def file_hashes(folder: Path, skip: Sequence[str] = ()) -> dict[str, str]:
    import hashlib

    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name not in skip
    }
