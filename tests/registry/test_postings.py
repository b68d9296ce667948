"""The overlap index (``postings``): the same shares as the scan, kept in step with the registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tests.registry.registry_factory import make_adapter

from sbora_reg.registry import Registry, footprints, postings
from sbora_reg.registry.overlap import compare
from sbora_reg.registry.overlap_queries import footprint, overlap_against_all

FIELDS = ("modules", "variants", "counts", "width", "indices")
KINDS = [("fa", 3), ("fa", 3), ("fb", 3), ("lora", 3), ("fa", 3), ("fb", 3), ("fa", 5)]
KINDS += [("fb", 2), ("fa", 3), ("fa", 3), ("fb", 3), ("fa", 3)]


def _register(registry: Registry, tiny_base: Path, tmp_path: Path, kinds, start: int = 0):
    refs = []
    for i, (variant, rank) in enumerate(kinds, start):
        make_adapter(tmp_path / f"d{i}", tiny_base, variant, r=rank, seed=10 + i)
        refs.append(registry.add(tmp_path / f"d{i}", name=f"n{i}").ref)
    return refs


def _assert_pairwise(
    registry: Registry, refs: list[str], min_rows: int, queries: list[str] | None = None
) -> None:
    """Every adapter (of ``queries``) against all the others equals ``compare`` pair by pair."""
    for ref in refs if queries is None else queries:
        report = overlap_against_all(registry, ref, min_rows)
        query = footprint(registry, ref)
        expected = [compare(query, footprint(registry, other)) for other in refs if other != ref]
        assert report.compared == len(refs) - 1
        assert {p.b: p for p in report.overlaps} == {p.b: p for p in expected if p.overlaps}


def _index(registry: Registry, ref: str) -> Path:
    return registry.index_path(registry.get_base(registry.resolve(ref).base_fingerprint))


def test_index_answers_as_the_scan_and_alone(
    registry: Registry, tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refs = _register(registry, tiny_base, tmp_path, KINDS)
    path = _index(registry, refs[0])
    overlap_against_all(registry, refs[0], min_rows=10**6)
    assert not path.exists()  # a small registry: no index
    overlap_against_all(registry, refs[0], min_rows=1)  # builds it
    assert path.is_file()

    def no_scan(*_a: object) -> None:
        raise AssertionError("scanned the rows although the index covers them")

    monkeypatch.setattr(postings, "shares_against", no_scan)
    _assert_pairwise(registry, refs, min_rows=1)


def test_index_follows_adds_removals_and_reused_ids(
    registry: Registry, tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows added since the index was built are scanned, removed ones left out, an id that now
    holds another adapter's content is both; past ``STALE_SHARE`` the index is rebuilt."""
    monkeypatch.setattr(postings, "STALE_SHARE", 0.5)
    refs = _register(registry, tiny_base, tmp_path, KINDS)
    overlap_against_all(registry, refs[0], min_rows=1)
    path = _index(registry, refs[0])
    built = path.stat().st_mtime_ns
    refs += _register(registry, tiny_base, tmp_path, [("fa", 3), ("fb", 2)], start=len(KINDS))
    registry.rm(refs[-1])  # the last id: SQLite may hand it to the next adapter
    refs.pop()
    refs += _register(registry, tiny_base, tmp_path, [("fa", 4)], start=len(KINDS) + 2)
    registry.rm(refs[2])
    refs.pop(2)
    _assert_pairwise(registry, refs, min_rows=1)
    assert path.stat().st_mtime_ns == built  # answered from the index + a scan of the rest
    monkeypatch.setattr(postings, "STALE_SHARE", 0.0)
    _assert_pairwise(registry, refs, min_rows=1, queries=refs[:1])
    assert path.stat().st_mtime_ns != built  # rebuilt
    monkeypatch.setattr(
        postings, "shares_against", lambda *a: (_ for _ in ()).throw(AssertionError)
    )
    _assert_pairwise(registry, refs, min_rows=1)  # now the index holds every row


@pytest.mark.parametrize("damage", ["truncate", "garbage", "lists"])
def test_a_damaged_index_is_ignored_and_rebuilt(
    registry: Registry, tiny_base: Path, tmp_path: Path, damage: str
) -> None:
    refs = _register(registry, tiny_base, tmp_path, KINDS)
    overlap_against_all(registry, refs[0], min_rows=1)
    path = _index(registry, refs[0])
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data[:8] = b"\xff" * 8
    else:  # a valid file whose row lists point past the rows: caught while reading them
        header = postings._Index.read(path, _sign(registry, refs[0]))
        assert header is not None
        name = next(n for n in header.header if n.endswith(".rows"))
        begin, end = header.header[name]["data_offsets"]
        start = len(data) - header.data.size + begin
        dtype = np.dtype(header.header[name]["dtype"].lower().replace("u", "uint"))
        data[start : start + (end - begin)] = np.full(
            (end - begin) // dtype.itemsize, 60_000, dtype
        ).tobytes()
    path.write_bytes(bytes(data))
    _assert_pairwise(registry, refs, min_rows=1)
    assert postings._Index.read(path, _sign(registry, refs[0])) is not None


def _sign(registry: Registry, ref: str) -> str:
    base = registry.get_base(registry.resolve(ref).base_fingerprint)
    shapes = {mod.id: (mod.name, *map(int, mod.shape)) for mod in base.modules.values()}
    return postings.signature(base.fingerprint, shapes)


@pytest.mark.parametrize("high", [100, 70_000])  # 16- and 32-bit indices
def test_postings_shares_equal_the_scan_on_packed_rows(tmp_path: Path, high: int) -> None:
    """Unit level, both index widths, several layouts, LoRA rows: every row's per-module shares
    from the postings equal ``shares_against``'s."""
    rng = np.random.default_rng(high)
    shapes = {3: (high, high), 8: (50, high), 9: (high, 40)}
    rows = []
    for k in range(40):
        variant = ["fa", "fb", "lora"][k % 3] if k % 5 else "fa"
        rank = 4 if k % 2 else 6
        regions = []
        for mid, (out, inn) in shapes.items():
            dim = inn if variant == "fa" else out
            idx = None if variant == "lora" else rng.choice(min(dim, 200), rank, replace=False)
            regions.append((mid, variant, idx))
        row = footprints.encode(regions)
        rows.append((100 + k, *(row[f] for f in FIELDS)))
    keys = {100 + k: f"{k:064x}" for k in range(40)}
    path = tmp_path / "index.safetensors"
    postings.write(path, rows, shapes, keys, "sig")
    index = postings._Index.read(path, "sig")
    assert index is not None and postings._Index.read(path, "other") is None
    ids = np.array(sorted(keys), dtype=np.int64)
    current, matched = index.match(ids, postings._sha_array([keys[i] for i in ids]))
    assert current.all() and matched.all()
    changed = postings._sha_array([f"{1:064x}" if i == 105 else keys[i] for i in ids[1:]])
    current, matched = index.match(ids[1:], changed)  # id 100 gone, 105 changed
    held = np.concatenate([index.array(f"{g}.ids") for g in index.groups])
    assert set(held[~current].tolist()) == {100, 105}
    assert ids[1:][~matched].tolist() == [105]
    current = np.ones(held.size, dtype=bool)
    for code, variant in ((0, "fa"), (1, "fb"), (2, "lora")):
        query = {
            mid: footprints.QueryModule(code, np.sort(rng.choice(200, 5, replace=False)), *shape)
            for mid, shape in shapes.items()
        }
        scan = footprints.shares_against(query, shapes, [row[1:] for row in rows])
        part = index.shares(query, shapes, current)
        by_id = {int(aid): i for i, aid in enumerate(part.ids)}
        assert sorted(by_id) == sorted(keys), variant
        for i, row in enumerate(rows):
            j = by_id[row[0]]
            assert part.shares.totals[j] == scan.totals[i]
            assert part.shares.modules(j) == scan.modules(i)
        assert scan.totals.sum() > 0
