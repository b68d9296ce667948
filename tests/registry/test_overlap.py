"""Overlap semantics case by case, and the vectorised paths against a dense cell-mask reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests import tiny
from transformers import GPT2LMHeadModel

from sbora_reg.errors import FingerprintMismatchError, OverlapError, ShapeMismatchError
from sbora_reg.registry import footprints
from sbora_reg.registry.overlap import (
    Footprint,
    Region,
    check_against,
    compare,
    compare_all,
    ensure_disjoint,
    shared_cells,
    touched_cells,
    variant_code,
)
from sbora_reg.registry.region_table import RegionTable, all_pairs, one_vs_many
from sbora_reg.sbora.fingerprint import module_table

SHAPE = (6, 10)  # (out, in): not square, so rows and columns cannot be confused


def reg(variant: str, idx: list[int] | None = None, shape: tuple[int, int] = SHAPE) -> Region:
    return Region(variant, shape, np.asarray(idx or [], dtype=np.int64))


def mask(region: Region) -> np.ndarray:
    """Dense reference: the (out, in) cells a region touches."""
    m = np.zeros(region.shape, dtype=bool)
    if region.variant == "fa":
        m[:, region.indices] = True
    elif region.variant == "fb":
        m[region.indices, :] = True
    else:
        m[:] = True
    return m


CASES = [
    (reg("fa", [1, 3, 5]), reg("fa", [5, 7])),  # FA/FA intersecting columns
    (reg("fa", [1, 3]), reg("fa", [2, 4])),  # FA/FA disjoint
    (reg("fb", [0, 2, 4]), reg("fb", [4, 5])),  # FB/FB intersecting rows
    (reg("fb", [0, 1]), reg("fb", [2, 3])),  # FB/FB disjoint
    (reg("fa", [1, 3]), reg("fb", [0, 5, 2])),  # FA/FB always |R|*|C|
    (reg("fb", [4]), reg("fa", [9, 0])),
    (reg("fa", [2, 8]), reg("lora")),  # anything vs lora: the other's cells
    (reg("lora"), reg("fb", [1])),
    (reg("lora"), reg("lora")),  # every cell
]


@pytest.mark.parametrize(("a", "b"), CASES)
def test_shared_cells_match_dense_masks(a: Region, b: Region) -> None:
    expected = int((mask(a) & mask(b)).sum())
    assert shared_cells(a, b) == expected
    assert shared_cells(b, a) == expected
    assert touched_cells(a) == int(mask(a).sum())


def test_semantics_table_values() -> None:
    out, inn = SHAPE
    assert shared_cells(reg("fa", [1, 3, 5]), reg("fa", [5, 7])) == out * 1
    assert shared_cells(reg("fb", [0, 2, 4]), reg("fb", [2, 4])) == 2 * inn
    assert shared_cells(reg("fa", [1, 3]), reg("fb", [0, 5, 2])) == 3 * 2
    assert shared_cells(reg("fa", [1, 3]), reg("fa", [2, 4])) == 0
    assert shared_cells(reg("lora"), reg("lora")) == out * inn


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ShapeMismatchError):
        shared_cells(reg("fa", [1]), reg("fa", [1], shape=(10, 6)))


def test_modules_touched_by_one_adapter_do_not_overlap() -> None:
    a = Footprint("a", "base", {"l0.q": reg("lora")})
    b = Footprint("b", "base", {"l0.v": reg("lora")})
    report = compare(a, b)
    assert report.comparable and not report.overlaps and report.total == 0


def test_different_bases_are_never_compared() -> None:
    a = Footprint("a", "base1", {"m": reg("lora")})
    b = Footprint("b", "base2", {"m": reg("lora")})
    report = compare(a, b)
    assert not report.comparable and "different base" in report.reason
    assert report.total == 0
    with pytest.raises(FingerprintMismatchError):
        check_against(a, [b])
    table = RegionTable.from_footprints([b])
    many = one_vs_many(a, table)
    assert not many.comparable and many.totals.tolist() == [0]
    with pytest.raises(FingerprintMismatchError):
        RegionTable.from_footprints([a, b])


def test_pair_report_per_module_and_total() -> None:
    a = Footprint("a", "b0", {"q": reg("fa", [1, 2]), "v": reg("fb", [0]), "k": reg("fa", [0])})
    b = Footprint("b", "b0", {"q": reg("fa", [2, 9]), "v": reg("fa", [4])})
    report = compare(a, b)
    out, _ = SHAPE
    assert dict(report.modules) == {"q": out * 1, "v": 1 * 1}
    assert report.total == out + 1
    assert [(p.a, p.b) for p in compare_all([a, b, a])] == [("a", "b"), ("a", "a"), ("b", "a")]


def test_check_against_and_ensure_disjoint() -> None:
    a = Footprint("a", "b0", {"q": reg("fa", [1, 2])})
    b = Footprint("b", "b0", {"q": reg("fa", [3, 4])})
    c = Footprint("c", "b0", {"q": reg("fa", [4, 5])})
    assert check_against(c, [a]) == []
    assert [r.b for r in check_against(c, [a, b])] == ["b"]
    ensure_disjoint([a, b])
    with pytest.raises(OverlapError, match="b and c|c and b"):
        ensure_disjoint([a, b, c])


def test_conv1d_regions_compare_in_out_in_frame() -> None:
    """GPT-2 c_attn is Conv1D, weight stored (in, out) = (16, 48); regions live in (48, 16)."""
    model = GPT2LMHeadModel(tiny.gpt2("g16"))
    kind, shape = module_table(model)["transformer.h.0.attn.c_attn"]
    assert kind == "conv1d" and shape == (48, 16)
    assert tuple(model.transformer.h[0].attn.c_attn.weight.shape) == (16, 48)
    fa = Region("fa", shape, np.array([0, 15]))  # columns < in = 16
    fb = Region("fb", shape, np.array([0, 47]))  # rows < out = 48
    # Dense check on the stored (in, out) weight: FA touches stored rows, FB stored columns.
    stored = torch.zeros(16, 48, dtype=torch.bool)
    stored_fb = stored.clone()
    stored[fa.indices, :] = True
    stored_fb[:, fb.indices] = True
    assert shared_cells(fa, fb) == int((stored & stored_fb).sum()) == 4
    assert shared_cells(fa, Region("fa", shape, np.array([15]))) == 48
    with pytest.raises(ShapeMismatchError):
        RegionTable.from_footprints(
            [Footprint("x", "g", {"c": Region("fa", shape, np.array([16]))})]
        )


def _random_footprints(rng: np.random.Generator, n: int, modules: dict) -> list[Footprint]:
    fps = []
    for k in range(n):
        regions = {}
        for name, shape in modules.items():
            variant = str(rng.choice(["fa", "fb", "lora", "none"], p=[0.4, 0.3, 0.1, 0.2]))
            if variant == "none":
                continue
            dim = shape[1] if variant == "fa" else shape[0]
            r = int(rng.integers(1, 4))
            idx = np.sort(rng.choice(dim, size=r, replace=False)) if variant != "lora" else []
            regions[name] = Region(variant, shape, np.asarray(idx, dtype=np.int64))
        fps.append(Footprint(f"t{k}", "base", regions))
    return fps


def test_vectorised_paths_match_pairwise_reference() -> None:
    rng = np.random.default_rng(7)
    modules = {"l0.q": (6, 10), "l0.v": (4, 10), "l1.q": (6, 10), "l1.o": (10, 5)}
    fps = _random_footprints(rng, 25, modules)
    table = RegionTable.from_footprints(fps)
    ref = np.array([[compare(a, b).total if a is not b else 0 for b in fps] for a in fps])
    assert ref.sum() > 0 and (ref == 0).sum() > len(fps)  # both outcomes occur
    np.testing.assert_array_equal(all_pairs(table), ref)
    for j, fp in enumerate(fps):
        many = one_vs_many(fp, table)
        expected = ref[j].copy()
        expected[j] = sum(touched_cells(r) for r in fp.regions.values())
        np.testing.assert_array_equal(many.totals, expected)
    names = [n for n, _ in one_vs_many(fps[0], table).overlapping()]
    assert "t0" not in names and set(names) == {fps[k].name for k in np.flatnonzero(ref[0])}


def test_all_pairs_small_chunks_and_unsorted_segments() -> None:
    rng = np.random.default_rng(3)
    modules = {"a": (8, 12), "b": (12, 8)}
    fps = _random_footprints(rng, 12, modules)
    ref = np.array([[compare(a, b).total if a is not b else 0 for b in fps] for a in fps])
    table = RegionTable.from_footprints(fps)
    from sbora_reg.registry import region_table

    same_small = region_table._same_axis_pairs(table, chunk=3)
    np.testing.assert_array_equal(
        np.rint(same_small), np.rint(region_table._same_axis_pairs(table))
    )
    # The same segments handed over in reverse order pack to the same answers.
    rev = np.arange(len(table.seg_count))[::-1]
    starts = np.concatenate(([0], np.cumsum(table.seg_count)[:-1]))
    local = table.keys - np.where(
        table.seg_variant == region_table.FA,
        table.col_offset[table.seg_module],
        table.row_offset[table.seg_module],
    ).repeat(table.seg_count)
    shuffled = RegionTable.from_arrays(
        base="base",
        names=table.names,
        modules=table.modules,
        out=table.out,
        inn=table.inn,
        seg_adapter=table.seg_adapter[rev],
        seg_module=table.seg_module[rev],
        seg_variant=table.seg_variant[rev],
        indices=[local[s : s + c] for s, c in zip(starts[rev], table.seg_count[rev], strict=True)],
    )
    np.testing.assert_array_equal(all_pairs(shuffled), ref)


def test_lora_regions_listing_all_rows_are_still_every_cell() -> None:
    """The registry may list a LoRA's rows as indices: they must not act as FB rows."""
    out, _ = SHAPE
    lora_rows = Region("lora", SHAPE, np.arange(out))
    fps = [
        Footprint("l", "b", {"m": lora_rows}),
        Footprint("fb", "b", {"m": reg("fb", [1, 2])}),
        Footprint("l2", "b", {"m": lora_rows}),
    ]
    ref = np.array([[compare(a, b).total if a is not b else 0 for b in fps] for a in fps])
    table = RegionTable.from_footprints(fps)
    np.testing.assert_array_equal(all_pairs(table), ref)
    flat = RegionTable.from_arrays(
        base="b",
        names=["l", "fb", "l2"],
        modules=["m"],
        out=np.array([SHAPE[0]]),
        inn=np.array([SHAPE[1]]),
        seg_adapter=np.array([0, 1, 2]),
        seg_module=np.array([0, 0, 0]),
        seg_variant=np.array([2, 1, 2]),
        indices=[np.arange(out), np.array([1, 2]), np.arange(out)],
    )
    np.testing.assert_array_equal(all_pairs(flat), ref)
    np.testing.assert_array_equal(one_vs_many(fps[1], flat).totals, [2 * SHAPE[1]] * 3)


def test_all_pairs_dense_path_for_keys_many_adapters_share() -> None:
    """Identical index sets (same default seed) take the dense path; answers do not change."""
    from sbora_reg.registry import region_table

    rng = np.random.default_rng(5)
    modules = {"a": (8, 12), "b": (12, 8)}
    fps = _random_footprints(rng, 10, modules)
    same = {"a": reg("fa", [0, 3, 5], shape=(8, 12)), "b": reg("fb", [1, 2], shape=(12, 8))}
    fps += [Footprint(f"seed0-{k}", "base", same) for k in range(6)]
    ref = np.array([[compare(a, b).total if a is not b else 0 for b in fps] for a in fps])
    table = RegionTable.from_footprints(fps)
    np.testing.assert_array_equal(all_pairs(table), ref)
    for dense_group, block in [(1, 1), (1, 3), (4, 4096)]:
        got = region_table._same_axis_pairs(table, dense_group=dense_group, dense_block=block)
        np.testing.assert_array_equal(np.rint(got), np.rint(region_table._same_axis_pairs(table)))
    from unittest import mock

    with mock.patch.object(region_table, "_dense_groups", wraps=region_table._dense_groups) as spy:
        region_table._same_axis_pairs(table, dense_group=2)
    assert spy.called


def test_from_arrays_reorders_fixed_rank_segments() -> None:
    rng = np.random.default_rng(11)
    shapes = {"a": (8, 12), "b": (12, 8)}
    fps = []
    for k in range(9):
        regions = {}
        for name, shape in shapes.items():
            variant = "fa" if (k + len(name)) % 2 else "fb"
            dim = shape[1] if variant == "fa" else shape[0]
            regions[name] = Region(variant, shape, np.sort(rng.choice(dim, 3, replace=False)))
        fps.append(Footprint(f"f{k}", "base", regions))
    ref = np.array([[compare(a, b).total if a is not b else 0 for b in fps] for a in fps])
    segs = [(a, m, fp.regions[name]) for a, fp in enumerate(fps) for m, name in enumerate(shapes)]
    segs = segs[::-1]  # adapter order reversed: the packer must move rows of indices
    table = RegionTable.from_arrays(
        base="base",
        names=[fp.name for fp in fps],
        modules=list(shapes),
        out=np.array([8, 12]),
        inn=np.array([12, 8]),
        seg_adapter=np.array([a for a, _, _ in segs]),
        seg_module=np.array([m for _, m, _ in segs]),
        seg_variant=np.array([0 if r.variant == "fa" else 1 for _, _, r in segs]),
        indices=(np.concatenate([r.indices for _, _, r in segs]), np.full(len(segs), 3)),
    )
    np.testing.assert_array_equal(all_pairs(table), ref)
    for j, fp in enumerate(fps):
        expected = ref[j].copy()
        expected[j] = sum(touched_cells(r) for r in fp.regions.values())
        np.testing.assert_array_equal(one_vs_many(fp, table).totals, expected)


def test_shares_against_rows_match_pairwise_reports() -> None:
    """``footprints.shares_against`` on packed rows (mixed variants, ranks and LoRA) gives every
    pair's per-module shares exactly as ``compare``."""
    rng = np.random.default_rng(5)
    modules = {"l0.q": (6, 10), "l0.v": (4, 10), "l1.q": (6, 10), "l1.o": (10, 5)}
    fps = _random_footprints(rng, 20, modules)
    ids = {name: 10 + i for i, name in enumerate(sorted(modules))}
    shapes = {ids[n]: s for n, s in modules.items()}
    fields = ("modules", "variants", "counts", "width", "indices")
    rows = []
    for fp in fps:
        packed = footprints.encode(
            [(ids[n], r.variant, None if r.variant == "lora" else r.indices)
             for n, r in fp.regions.items()]
        )  # fmt: skip
        rows.append(tuple(packed[k] for k in fields))
    names = {i: n for n, i in ids.items()}
    for query in fps[:6]:
        wanted = {
            ids[n]: footprints.QueryModule(variant_code(r), np.asarray(r.indices), *r.shape)
            for n, r in query.regions.items()
        }
        shares = footprints.shares_against(wanted, shapes, rows)
        for i, other in enumerate(fps):
            if other is query:
                continue
            expected = compare(query, other)
            assert shares.totals[i] == expected.total, other.name
            got = {names[mid]: cells for mid, cells in shares.modules(i).items()}
            assert got == dict(expected.modules)


@pytest.mark.parametrize("rank", [3, 4])  # rows of 6 and 8 bytes: both word sizes of the mover
def test_from_arrays_takes_unsigned_indices_in_adapter_order(rank: int) -> None:
    rng = np.random.default_rng(rank)
    shapes = {"a": (8, 12), "b": (12, 8), "c": (5, 5)}
    fps = []
    for k in range(7):
        regions = {}
        for name, shape in shapes.items():
            variant = "fa" if (k + ord(name)) % 3 else "fb"
            dim = shape[1] if variant == "fa" else shape[0]
            regions[name] = Region(variant, shape, np.sort(rng.choice(dim, rank, replace=False)))
        fps.append(Footprint(f"f{k}", "base", regions))
    expected = RegionTable.from_footprints(fps)
    segs = [(a, m, fp.regions[name]) for a, fp in enumerate(fps) for m, name in enumerate(shapes)]
    table = RegionTable.from_arrays(
        base="base",
        names=[fp.name for fp in fps],
        modules=list(shapes),
        out=np.array([s[0] for s in shapes.values()]),
        inn=np.array([s[1] for s in shapes.values()]),
        seg_adapter=np.array([a for a, _, _ in segs]),
        seg_module=np.array([m for _, m, _ in segs]),
        seg_variant=np.array([0 if r.variant == "fa" else 1 for _, _, r in segs]),
        indices=(
            np.concatenate([r.indices for _, _, r in segs]).astype(np.uint16),
            np.full(len(segs), rank),
        ),
    )
    for name in ("seg_adapter", "seg_module", "seg_variant", "seg_count", "keys", "block_start"):
        np.testing.assert_array_equal(getattr(table, name), getattr(expected, name))
