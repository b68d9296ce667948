"""Reliability under several writers and under SIGKILL in the middle of ``add``."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sqlite3
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from tests.registry.registry_factory import make_adapter

from sbora_reg.registry import Registry, blobs, store
from sbora_reg.sbora import dir_sha256

PROCESSES, PER_PROCESS = 8, 25
CTX = mp.get_context("fork")


def _add_many(db_url: str, data_dir: str, dirs: list[str], names: list[str], out: Any) -> None:
    errors = []
    try:
        with Registry.open(db_url, data_dir=data_dir) as reg:
            for d, name in zip(dirs, names, strict=True):
                try:
                    reg.add(d, name=name)
                except Exception as exc:  # reported to the parent, which fails the test
                    errors.append(f"{name}: {exc!r}")
    except Exception as exc:
        errors.append(f"open: {exc!r}")
    out.put(errors)


def _verify_store(reg: Registry) -> None:
    """Every record has its blob, and every blob on disk is complete (its hash matches)."""
    for rec in reg.list():
        assert reg.blob_path(rec.sha256).is_dir(), rec.ref
    for sha in reg.blobs.stored():
        assert dir_sha256(reg.blobs.path(sha)) == sha


def test_eight_processes_adding_at_once(db_url: str, tiny_base: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with Registry.open(db_url, data_dir=data_dir) as reg:
        reg.add_base(str(tiny_base))
    jobs: list[tuple[list[str], list[str]]] = []
    for p in range(PROCESSES):
        dirs, names = [], []
        for j in range(PER_PROCESS):
            d = tmp_path / "src" / f"p{p}-{j}"
            make_adapter(
                d, tiny_base, "fa" if j % 2 else "fb", r=2, seed=1000 * p + j, targets=("q_proj",)
            )
            dirs.append(str(d))
            names.append(f"task{j % 5}")  # shared names: versions are handed out concurrently
        jobs.append((dirs, names))
    out = CTX.Queue()
    procs = [
        CTX.Process(target=_add_many, args=(db_url, str(data_dir), d, n, out)) for d, n in jobs
    ]
    for proc in procs:
        proc.start()
    errors = [e for _ in procs for e in out.get(timeout=300)]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert errors == []
    with Registry.open(db_url, data_dir=data_dir) as reg:
        records = reg.list()
        assert len(records) == PROCESSES * PER_PROCESS
        versions: dict[str, list[int]] = defaultdict(list)
        for rec in records:
            versions[rec.name].append(rec.version)
        for name, got in versions.items():
            assert sorted(got) == list(range(1, len(got) + 1)), name
        assert len({r.sha256 for r in records}) == len(records)
        _verify_store(reg)
        if reg.db.location.sqlite_path is not None:
            check = sqlite3.connect(reg.db.location.sqlite_path)
            assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            check.close()


def _stall(ready: Any) -> None:
    ready.set()
    time.sleep(600)


def _add_and_stall_at(point: str, db: str, data_dir: str, src: str, ready: Any) -> None:
    if point == "staging":  # after the first file is copied into the temp dir
        original = blobs._copy_hashing

        def copy(*args: Any) -> int:
            size = original(*args)
            _stall(ready)
            return size

        blobs._copy_hashing = copy  # type: ignore[assignment]
    elif point == "published":  # blob renamed into place, nothing recorded yet
        Registry.register = lambda *a, **k: _stall(ready)  # type: ignore[method-assign]
    else:  # inside the write transaction, rows inserted, not committed
        original_insert = Registry._insert

        def insert(*args: Any) -> int:
            adapter_id = original_insert(*args)
            _stall(ready)
            return adapter_id

        Registry._insert = insert  # type: ignore[method-assign]
    with Registry.open(db, data_dir=data_dir) as reg:
        reg.add(src, name="victim")


@pytest.mark.parametrize("point", ["staging", "published", "transaction"])
def test_sigkill_mid_add(tiny_base: Path, tmp_path: Path, point: str) -> None:
    db, data_dir = str(tmp_path / "r.db"), str(tmp_path / "data")
    make_adapter(tmp_path / "a", tiny_base, seed=1)
    with Registry.open(db, data_dir=data_dir) as reg:
        reg.add_base(str(tiny_base))
    ready = CTX.Event()
    proc = CTX.Process(
        target=_add_and_stall_at, args=(point, db, data_dir, str(tmp_path / "a"), ready)
    )
    proc.start()
    assert ready.wait(timeout=120), "the add never reached the kill point"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=30)
    assert proc.exitcode == -signal.SIGKILL
    with Registry.open(db, data_dir=data_dir, busy_timeout_s=5) as reg:
        assert reg.list() == []  # nothing was committed
        _verify_store(reg)
        rec = reg.add(tmp_path / "a", name="victim")
        assert rec.ref == "victim@1"
        _verify_store(reg)
        result = reg.gc()
        assert result.blobs_removed == []
        assert result.temp_removed == (1 if point == "staging" else 0)
        assert not list(reg.blobs.root.glob(".tmp-*"))
    check = sqlite3.connect(db)
    assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    check.close()


def _open_only(db: str, out: Any) -> None:
    try:
        with Registry.open(db) as reg:
            out.put(reg.schema().current)
    except Exception as exc:
        out.put(repr(exc))


def test_parallel_first_open_migrates_once(tmp_path: Path) -> None:
    db = str(tmp_path / "fresh.db")
    out = CTX.Queue()
    procs = [CTX.Process(target=_open_only, args=(db, out)) for _ in range(6)]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    with Registry.open(db) as reg:
        head = reg.schema().head
    assert results == [head] * len(procs)


def test_gc_racing_add_keeps_blob(tiny_base: Path, tmp_path: Path, monkeypatch: Any) -> None:
    """A gc between publishing a blob and recording it must not leave a record without files."""
    make_adapter(tmp_path / "a", tiny_base, seed=3)
    with Registry.open(tmp_path / "r.db") as reg:
        original = store.Registry.register
        calls = []

        def register_after_gc(self: Registry, *args: Any, **kwargs: Any) -> Any:
            if not calls:
                calls.append(self.gc())  # removes the just-published, unrecorded blob
            return original(self, *args, **kwargs)

        monkeypatch.setattr(store.Registry, "register", register_after_gc)
        rec = reg.add(tmp_path / "a", base=str(tiny_base))
        assert len(calls[0].blobs_removed) == 1  # the race happened
        assert dir_sha256(reg.blob_path(rec.sha256)) == rec.sha256
