"""Registry store: records, exact regions, versions, filters, rm/gc, PEFT import, bad input."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from tests.registry.registry_factory import make_adapter, make_base

from sbora_reg.errors import (
    AdapterFormatError,
    DatabaseBusyError,
    FingerprintMismatchError,
    InvalidNameError,
    NotFoundError,
    PickleRefusedError,
    SboraRegError,
    ShapeMismatchError,
)
from sbora_reg.registry import Registry, store
from sbora_reg.sbora import dir_sha256


def snapshot(reg: Registry) -> tuple[list[dict], list[str]]:
    """Everything a failed add must leave unchanged: records and stored blobs."""
    return [r.to_json() for r in reg.list()], sorted(reg.blobs.stored())


@pytest.mark.parametrize("variant", ["fa", "fb"])
def test_add_records_exact_regions_and_blob(
    registry: Registry, tiny_base: Path, tmp_path: Path, variant: str
) -> None:
    adapter = make_adapter(tmp_path / "a", tiny_base, variant, r=5, seed=1)
    rec = registry.add(tmp_path / "a", name="math", task="arith", tags={"team": "x"})
    assert (rec.name, rec.version, rec.task, rec.tags) == ("math", 1, "arith", {"team": "x"})
    assert (rec.variant, rec.rank, rec.alpha) == (variant, 5, 10.0)
    assert rec.base_fingerprint == adapter.base_fingerprint
    assert rec.sha256 == adapter.sha256() == dir_sha256(tmp_path / "a")
    stored = registry.blob_path(rec.sha256)
    for f in (tmp_path / "a").iterdir():
        assert (stored / f.name).read_bytes() == f.read_bytes()
    assert rec.size == sum(f.stat().st_size for f in stored.iterdir())
    regions = registry.regions("math@1")
    assert set(regions) == set(adapter.modules)
    for name, mod in adapter.modules.items():
        assert regions[name].variant == variant
        assert regions[name].shape == mod.shape
        np.testing.assert_array_equal(regions[name].indices, mod.indices.numpy())
        assert regions[name].cells == mod.cells()


def test_lora_region_is_every_cell(registry: Registry, tiny_base: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tmp_path / "l", tiny_base, "lora", seed=2)
    rec = registry.add(tmp_path / "l")
    assert (rec.name, rec.variant) == ("l", "lora")
    for name, region in registry.regions(rec).items():
        out, inp = adapter.modules[name].shape
        assert region.variant == "lora" and region.indices.size == 0
        assert region.cells == out * inp


def test_versions_and_identical_content(
    registry: Registry, tiny_base: Path, tmp_path: Path
) -> None:
    make_adapter(tmp_path / "a", tiny_base, seed=1)
    make_adapter(tmp_path / "b", tiny_base, seed=2)
    first = registry.add(tmp_path / "a", name="t")
    again = registry.add(tmp_path / "a", name="t")
    assert again.ref == first.ref == "t@1" and again.id == first.id
    second = registry.add(tmp_path / "b", name="t")
    assert second.ref == "t@2"
    assert registry.resolve("t").ref == "t@2"
    assert registry.resolve("t@1").sha256 == first.sha256
    registry.rm("t@2")
    assert registry.add(tmp_path / "b", name="t").ref == "t@3"  # never reuse a version number
    other = registry.add(tmp_path / "a", name="u")  # same content, other name: shares the blob
    assert other.sha256 == first.sha256 and other.ref == "u@1"


def test_list_filters(registry: Registry, tiny_base: Path, tmp_path: Path) -> None:
    for i, (task, tag) in enumerate([("a", "x"), ("a", "y"), ("b", "x")]):
        make_adapter(tmp_path / f"d{i}", tiny_base, seed=i)
        registry.add(tmp_path / f"d{i}", name=f"n{i}", task=task, tags={"k": tag, "z": "1"})
    assert [r.ref for r in registry.list()] == ["n0@1", "n1@1", "n2@1"]
    assert [r.ref for r in registry.list(task="a")] == ["n0@1", "n1@1"]
    assert [r.ref for r in registry.list(tags={"k": "x"})] == ["n0@1", "n2@1"]
    assert [r.ref for r in registry.list(task="a", tags={"k": "x", "z": "1"})] == ["n0@1"]
    assert registry.list(tags={"k": "nope"}) == []
    base = registry.get_base(str(tiny_base))
    assert [r.ref for r in registry.list(base=base.fingerprint)] == ["n0@1", "n1@1", "n2@1"]
    assert len(registry.adapters_on_base(base)) == 3
    with pytest.raises(NotFoundError):
        registry.list(base="no-such-base")


def test_regions_on_base_matches_single_reads(
    registry: Registry, tiny_base: Path, tmp_path: Path
) -> None:
    for i, variant in enumerate(["fa", "fb", "lora"]):
        make_adapter(tmp_path / f"d{i}", tiny_base, variant, seed=i)
        registry.add(tmp_path / f"d{i}", name=f"n{i}")
    bulk = registry.regions_on_base(str(tiny_base))
    assert set(bulk) == {"n0@1", "n1@1", "n2@1"}
    for ref, regions in bulk.items():
        single = registry.regions(ref)
        assert set(single) == set(regions)
        for name, region in regions.items():
            assert (region.variant, region.shape) == (single[name].variant, single[name].shape)
            np.testing.assert_array_equal(region.indices, single[name].indices)
    some = registry.regions_on_base(str(tiny_base), modules=["model.layers.0.self_attn.q_proj"])
    assert all(set(r) == {"model.layers.0.self_attn.q_proj"} for r in some.values())


def test_resolve_errors(registry: Registry, tiny_base: Path, tmp_path: Path) -> None:
    make_adapter(tmp_path / "a", tiny_base)
    registry.add(tmp_path / "a", name="t")
    with pytest.raises(NotFoundError, match="no adapter named"):
        registry.resolve("nope")
    with pytest.raises(NotFoundError, match="versions: 1"):
        registry.resolve("t@7")
    for bad in ["t@0", "t@x", "a/b", "..", "x\x07", ""]:
        with pytest.raises(InvalidNameError):
            registry.resolve(bad)


def test_rm_then_gc_frees_only_unreferenced(
    registry: Registry, tiny_base: Path, tmp_path: Path
) -> None:
    make_adapter(tmp_path / "a", tiny_base, seed=1)
    make_adapter(tmp_path / "b", tiny_base, seed=2)
    a1 = registry.add(tmp_path / "a", name="a")
    registry.add(tmp_path / "a", name="shared")
    b1 = registry.add(tmp_path / "b", name="b")
    assert [r.ref for r in registry.rm("a")] == ["a@1"]
    assert registry.blob_path(a1.sha256).is_dir()  # rm keeps files until gc
    assert registry.gc().blobs_removed == []  # still referenced by shared@1
    registry.rm("b@1")
    result = registry.gc()
    assert result.blobs_removed == [b1.sha256] and result.bytes_freed == b1.size
    assert not registry.blobs.path(b1.sha256).exists()
    assert registry.blob_path(a1.sha256).is_dir()
    with pytest.raises(NotFoundError):
        registry.rm("b")


def test_peft_imports(registry: Registry, tiny_base: Path, tmp_path: Path) -> None:
    fa = make_adapter(tmp_path / "fa", tiny_base, "fa", seed=1)
    fa.to_peft(tmp_path / "fa-peft")
    lora = make_adapter(tmp_path / "lora", tiny_base, "lora", seed=2)
    lora.to_peft(tmp_path / "lora-peft")
    rec = registry.add(tmp_path / "fa-peft", base=str(tiny_base))
    assert (rec.format, rec.variant) == ("peft", "fa")
    for name, region in registry.regions(rec).items():
        np.testing.assert_array_equal(region.indices, fa.modules[name].indices.numpy())
    rec = registry.add(tmp_path / "lora-peft", base=str(tiny_base))
    assert (rec.format, rec.variant) == ("peft", "lora")
    assert {r.variant for r in registry.regions(rec).values()} == {"lora"}


def _truncate(d: Path) -> None:
    f = d / "sbora_adapter.safetensors"
    f.write_bytes(f.read_bytes()[:100])


def _corrupt_header(d: Path) -> None:
    f = d / "sbora_adapter.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json!!!!"
    f.write_bytes(bytes(data))


def _bad_json(d: Path) -> None:
    (d / "sbora_config.json").write_text("{not json")


def _pickle_dir(d: Path) -> None:
    shutil.rmtree(d)
    d.mkdir()
    (d / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (d / "adapter_model.bin").write_bytes(b"\x80\x04pickle")


@pytest.mark.parametrize(
    ("spoil", "error"),
    [
        (_truncate, AdapterFormatError),
        (_corrupt_header, AdapterFormatError),
        (_bad_json, AdapterFormatError),
        (_pickle_dir, PickleRefusedError),
        (lambda d: shutil.rmtree(d), AdapterFormatError),
    ],
    ids=["truncated", "corrupt-header", "bad-json", "pickle-dir", "missing"],
)
def test_bad_files_leave_registry_unchanged(
    registry: Registry, tiny_base: Path, tmp_path: Path, spoil, error
) -> None:
    make_adapter(tmp_path / "ok", tiny_base, seed=0)
    registry.add(tmp_path / "ok")
    make_adapter(tmp_path / "bad", tiny_base, seed=1)
    spoil(tmp_path / "bad")
    before = snapshot(registry)
    with pytest.raises(error):
        registry.add(tmp_path / "bad")
    assert snapshot(registry) == before
    assert not registry.blobs.stale_temps() and not list(registry.blobs.root.glob(".tmp-*"))


def test_pickle_file_refused(registry: Registry, tmp_path: Path) -> None:
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(PickleRefusedError):
        registry.add(tmp_path / "adapter_model.bin")


def test_wrong_base_refused(registry: Registry, tiny_base: Path, tmp_path: Path) -> None:
    other = make_base(tmp_path / "other", hidden=32)
    make_adapter(tmp_path / "a", tiny_base, seed=1)
    make_adapter(tmp_path / "nofp", tiny_base, seed=2, with_fingerprint=False)
    registry.add_base(str(other))
    before = snapshot(registry)
    with pytest.raises(FingerprintMismatchError):
        registry.add(tmp_path / "a", base=str(other))
    with pytest.raises(ShapeMismatchError, match="wrong --base"):
        registry.add(tmp_path / "nofp", base=str(other))
    assert snapshot(registry) == before


BAD_NAMES = [
    "a/b", "..", "x..y", "bad\nname", "tab\tname", "", " x", "a@b", "a b", "-x", ".x",
    "caf\u00e9", "\u0430dapter", "x" * 97, "x;y",  # accent, Cyrillic look-alike, too long
]  # fmt: skip


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_refused(registry: Registry, tiny_base: Path, tmp_path: Path, name: str) -> None:
    make_adapter(tmp_path / "a", tiny_base)
    with pytest.raises(InvalidNameError):
        registry.add(tmp_path / "a", name=name)
    with pytest.raises(InvalidNameError):
        registry.add(tmp_path / "a", tags={name or "": "v"})
    assert snapshot(registry) == ([], [])


def test_the_name_grammar_is_said_in_the_error_and_good_names_pass() -> None:
    from sbora_reg.registry.names import check_name

    with pytest.raises(InvalidNameError, match="letters, digits and '-', '_', '.'"):
        check_name("a b")
    for good in ("a", "A9", "my-adapter_v1.2", "x" * 96, "9lives"):
        assert check_name(good) == good


def test_bases(registry: Registry, tiny_base: Path) -> None:
    base = registry.add_base(str(tiny_base))
    assert registry.add_base(str(tiny_base)) == base
    assert registry.get_base(base.fingerprint) == base == registry.get_base(base.name)
    assert base.modules["model.layers.0.mlp.up_proj"].shape == (128, 64)
    with pytest.raises(NotFoundError):
        registry.add_base("org/not-a-local-model")


def test_sqlite_settings_and_busy_error(tiny_base: Path, tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    with Registry.open(db, busy_timeout_s=0.2) as reg:
        with reg.db.engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            assert raw is not None
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert raw.execute("PRAGMA foreign_keys").fetchone()[0] == 1
            assert raw.execute("PRAGMA busy_timeout").fetchone()[0] == 200
        make_adapter(tmp_path / "a", tiny_base)
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(DatabaseBusyError, match="locked by another writer"):
                reg.add(tmp_path / "a")
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert reg.add(tmp_path / "a").ref == "a@1"
        assert not list(reg.blobs.root.glob(".tmp-*"))


def test_no_write_lock_during_file_io(
    tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Staging, hashing and parsing run while another process could still write."""
    db = tmp_path / "r.db"
    checked: list[str] = []

    def can_write(where: str) -> None:
        other = sqlite3.connect(db, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # raises 'database is locked' if we hold the lock
            other.execute("ROLLBACK")
        finally:
            other.close()
        checked.append(where)

    def wrap(obj: object, attr: str) -> None:
        original = getattr(obj, attr)

        def wrapped(*args, **kwargs):
            can_write(attr)
            return original(*args, **kwargs)

        monkeypatch.setattr(obj, attr, wrapped)

    with Registry.open(db) as reg:
        wrap(reg.blobs, "stage")
        wrap(reg.blobs, "publish")
        wrap(store, "summarise")
        make_adapter(tmp_path / "a", tiny_base)
        reg.add(tmp_path / "a", base=str(tiny_base))
    assert checked == ["stage", "summarise", "publish"]


def test_errors_are_one_line(registry: Registry) -> None:
    with pytest.raises(SboraRegError) as info:
        registry.resolve("missing@2")
    assert "\n" not in str(info.value)


def test_region_table_matches_footprints(
    registry: Registry, tiny_base: Path, tmp_path: Path
) -> None:
    from sbora_reg.registry.overlap import Footprint
    from sbora_reg.registry.region_table import RegionTable

    for i, variant in enumerate(["fa", "fb", "lora", "fa"]):
        make_adapter(tmp_path / f"d{i}", tiny_base, variant, seed=i)
        registry.add(tmp_path / f"d{i}", name=f"n{i}")
    base = registry.get_base(str(tiny_base))
    table = registry.region_table(base)
    regions = registry.regions_on_base(base)
    assert sorted(table.names) == sorted(regions)
    expected = RegionTable.from_footprints(
        [Footprint(ref, base.fingerprint, regions[ref]) for ref in table.names]
    )
    assert table.modules == expected.modules
    for field in ("out", "inn", "seg_adapter", "seg_module", "seg_variant", "seg_count", "keys"):
        np.testing.assert_array_equal(getattr(table, field), getattr(expected, field))


def test_a_registry_path_under_a_file_is_one_error_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from sbora_reg.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = CliRunner().invoke(main, ["--db", str(blocker / "sub" / "registry.db"), "list"])
    assert res.exit_code == 1, res.output
    assert res.stderr.strip() == (
        f"Error: cannot create the registry {blocker / 'sub' / 'registry.db'}: {blocker} is a "
        "file, not a directory"
    )
    assert blocker.read_text() == "x"
