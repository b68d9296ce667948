"""Footprints: the packed row per adapter equals its per-module regions, exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select, update
from tests.registry.registry_factory import make_adapter

from sbora_reg.errors import RegistryError
from sbora_reg.registry import Registry, footprints
from sbora_reg.registry import models as m
from sbora_reg.registry.overlap import compare
from sbora_reg.registry.overlap_queries import footprint, overlap_against_all

VARIANT_NAMES = {0: "fa", 1: "fb", 2: "lora"}


def stored_footprint(reg: Registry, adapter_id: int) -> dict[str, tuple[str, list[int]]]:
    """The footprint row of one adapter, decoded: module name -> (variant, indices)."""
    f = m.Footprint.__table__.c
    with reg.db.engine.connect() as conn:
        row = conn.execute(
            select(f.modules, f.variants, f.counts, f.width, f.indices).where(
                f.adapter_id == adapter_id
            )
        ).one()
        names = dict(conn.execute(select(m.BaseModule.id, m.BaseModule.name)).all())
    dec = footprints.decode([tuple(row)])
    starts = np.cumsum(dec.counts) - dec.counts
    return {
        names[int(mid)]: (VARIANT_NAMES[int(v)], dec.flat[s : s + c].tolist())
        for mid, v, s, c in zip(dec.module_ids, dec.variants, starts, dec.counts, strict=True)
    }


def region_view(reg: Registry, ref: str) -> dict[str, tuple[str, list[int]]]:
    return {n: (r.variant, r.indices.tolist()) for n, r in reg.regions(ref).items()}


@pytest.mark.parametrize("variant", ["fa", "fb", "lora"])
def test_footprint_equals_regions(
    registry: Registry, tiny_base: Path, tmp_path: Path, variant: str
) -> None:
    make_adapter(tmp_path / "a", tiny_base, variant, r=5, seed=3)
    rec = registry.add(tmp_path / "a", name="x")
    packed = stored_footprint(registry, rec.id)
    assert packed == region_view(registry, "x@1")
    assert len(packed) > 1 and all(v == variant for v, _ in packed.values())


def test_peft_footprints_and_cascade(registry: Registry, tiny_base: Path, tmp_path: Path) -> None:
    make_adapter(tmp_path / "fb", tiny_base, "fb", seed=4).to_peft(tmp_path / "fb-peft")
    make_adapter(tmp_path / "lo", tiny_base, "lora", seed=5).to_peft(tmp_path / "lo-peft")
    recs = [registry.add(tmp_path / d, base=str(tiny_base)) for d in ("fb-peft", "lo-peft")]
    for rec in recs:
        assert stored_footprint(registry, rec.id) == region_view(registry, rec.ref)
    registry.rm(recs[0].ref)
    with registry.db.engine.connect() as conn:
        left = conn.execute(select(m.Footprint.adapter_id)).scalars().all()
    assert left == [recs[1].id]


def test_region_table_refuses_corrupt_footprints(
    registry: Registry, tiny_base: Path, tmp_path: Path
) -> None:
    make_adapter(tmp_path / "a", tiny_base, "fa", seed=1)
    rec = registry.add(tmp_path / "a")
    with registry.write() as session:
        session.execute(update(m.Footprint).values(indices=b"\x01\x02\x03"))
    with pytest.raises(RegistryError, match="corrupt footprint"):
        registry.region_table(rec.base_fingerprint)
    with pytest.raises(RegistryError, match="corrupt footprint"):
        overlap_against_all(registry, rec.ref)


def test_against_all_matches_pairwise_compare(
    registry: Registry, tiny_base: Path, tmp_path: Path
) -> None:
    refs = []
    kinds = [("fa", 3), ("fa", 3), ("fb", 3), ("lora", 3), ("fa", 3), ("fb", 3), ("fa", 5)]
    kinds += [("fb", 2), ("fa", 3)]  # layouts: one group per (variant, rank), several rows each
    for i, (variant, rank) in enumerate(kinds):
        make_adapter(tmp_path / f"d{i}", tiny_base, variant, r=rank, seed=10 + i)
        refs.append(registry.add(tmp_path / f"d{i}", name=f"n{i}").ref)
    for ref in refs:
        report = overlap_against_all(registry, ref)
        query = footprint(registry, ref)
        expected = [compare(query, footprint(registry, other)) for other in refs if other != ref]
        assert report.compared == len(refs) - 1
        assert {p.b: p for p in report.overlaps} == {p.b: p for p in expected if p.overlaps}
        totals = [p.total for p in report.overlaps]
        assert totals == sorted(totals, reverse=True)
        assert report.totals == [(p.b, p.total) for p in report.overlaps]
        assert report.top(2) == report.overlaps[:2]


def test_encode_decode_widths() -> None:
    small = footprints.encode([(7, "fa", np.array([5, 1, 3])), (2, "lora", None)])
    big = footprints.encode([(1, "fb", np.array([70_000, 2])), (4, "fa", np.array([9]))])
    assert (small["width"], big["width"]) == (2, 4)
    fields = ("modules", "variants", "counts", "width", "indices")
    dec = footprints.decode([tuple(row[k] for k in fields) for row in (small, big)])
    np.testing.assert_array_equal(dec.module_ids, [2, 7, 1, 4])  # module-id order per row
    np.testing.assert_array_equal(dec.variants, [2, 0, 1, 0])
    np.testing.assert_array_equal(dec.counts, [0, 3, 2, 1])
    np.testing.assert_array_equal(dec.seg_row, [0, 0, 1, 1])
    np.testing.assert_array_equal(dec.flat, [1, 3, 5, 2, 70_000, 9])
    empty = footprints.decode([])
    assert empty.flat.size == 0 and empty.counts.size == 0
    with pytest.raises(RegistryError):
        footprints.decode([tuple(small[k] for k in fields[:3]) + (3, small["indices"])])


def _by_segment(dec: footprints.Decoded) -> dict[tuple[int, int], tuple[int, list[int]]]:
    starts = np.cumsum(dec.counts) - dec.counts
    return {
        (int(r), int(mid)): (int(v), dec.flat[s : s + c].tolist())
        for r, mid, v, s, c in zip(
            dec.seg_row, dec.module_ids, dec.variants, starts, dec.counts, strict=True
        )
    }


@pytest.mark.parametrize("high", [100, 70_000])  # both index widths
def test_same_layout_rows_decode_module_by_module(high: int) -> None:
    rng = np.random.default_rng(high)
    rows = []
    for _ in range(5):
        regions = [
            (
                mid,
                "fa" if mid % 2 else "fb",
                np.append(rng.choice(high - 1, 3, replace=False), high - 1),
            )
            for mid in (3, 8, 9)
        ]
        row = footprints.encode(regions)
        rows.append(tuple(row[k] for k in ("modules", "variants", "counts", "width", "indices")))
    fast = footprints.decode(rows)
    np.testing.assert_array_equal(fast.seg_row, np.tile(np.arange(5), 3))  # module-major
    assert _by_segment(fast) == _by_segment(footprints._decode_rows(rows))


def test_region_table_of_same_layout_adapters(
    registry: Registry, tiny_base: Path, tmp_path: Path
) -> None:
    from sbora_reg.registry.overlap import Footprint
    from sbora_reg.registry.region_table import RegionTable

    for i in range(4):
        make_adapter(tmp_path / f"d{i}", tiny_base, "fb", r=3, seed=20 + i)
        registry.add(tmp_path / f"d{i}", name=f"n{i}")
    base = registry.get_base(str(tiny_base))
    table = registry.region_table(base)
    regions = registry.regions_on_base(base)
    expected = RegionTable.from_footprints(
        [Footprint(ref, base.fingerprint, regions[ref]) for ref in table.names]
    )
    assert table.modules == expected.modules and table.names == sorted(regions)
    for name in ("seg_adapter", "seg_module", "seg_variant", "seg_count", "keys", "block_start"):
        np.testing.assert_array_equal(getattr(table, name), getattr(expected, name))
