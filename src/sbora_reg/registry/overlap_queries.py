"""Overlap of registered adapters: footprints read from the registry, compared by ``overlap``
(a few adapters, per pair) or ``footprints.shares_against`` (one adapter against every other on
its base, straight from the packed footprint rows)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from sbora_reg.registry import footprints, postings
from sbora_reg.registry.overlap import Footprint, PairOverlap, compare_all, variant_code

if TYPE_CHECKING:
    from sbora_reg.registry.store import Registry


@dataclass(frozen=True)
class _Found:
    """One overlapping adapter: its ref, shared cells and where to read its per-module shares."""

    name: str
    total: int
    shares: footprints.RowShares
    row: int
    module_names: dict[int, str]


@dataclass
class AgainstAll:
    """One adapter against every other adapter on its base: only the overlapping ones, most
    shared cells first. ``totals`` is computed for all at once; the per-module breakdown of a
    pair (``overlaps``, ``top``, ``to_json``) is read out only when asked for."""

    query: str
    compared: int
    found: list[_Found] = field(default_factory=list)

    @property
    def totals(self) -> list[tuple[str, int]]:
        """``(ref, shared cells)`` of every overlapping adapter, most shared first."""
        return [(f.name, f.total) for f in self.found]

    def top(self, k: int | None) -> list[PairOverlap]:
        """The ``k`` pairs sharing the most cells (all with None), per module."""
        return [self._pair(f) for f in self.found[:k]]

    @cached_property
    def overlaps(self) -> list[PairOverlap]:
        return self.top(None)

    def _pair(self, f: _Found) -> PairOverlap:
        per_module = {f.module_names[mid]: cells for mid, cells in f.shares.modules(f.row).items()}
        return PairOverlap(self.query, f.name, True, dict(sorted(per_module.items())))

    def to_json(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "compared": self.compared,
            "overlapping": len(self.found),
            "pairs": [p.to_json() for p in self.overlaps],
        }


def footprint(registry: Registry, ref: str) -> Footprint:
    """The registered adapter ``name[@version]`` as a footprint."""
    record = registry.resolve(ref)
    return Footprint(record.ref, record.base_fingerprint, registry.regions(record))


def overlap_refs(registry: Registry, refs: Sequence[str]) -> list[PairOverlap]:
    """Every pair among registered adapters, per module (``sbora-reg overlap A B ...``)."""
    return compare_all([footprint(registry, ref) for ref in refs])


def overlap_against_all(
    registry: Registry, ref: str, min_rows: int = postings.MIN_ROWS
) -> AgainstAll:
    """``ref`` against every other adapter on its base, from the packed footprint rows (through
    their inverted index, ``postings``, on a base with ``min_rows`` adapters or more).

    Every base record with the adapter's fingerprint counts (one architecture registered twice).
    Adapters named like the query are left out; nothing is compared across base models.
    """
    query = footprint(registry, ref)
    report = AgainstAll(query.name, 0)
    for base in registry.bases():
        if base.fingerprint != query.base:
            continue
        by_id = {mod.id: mod for mod in base.modules.values()}
        wanted = {}
        for name, region in query.regions.items():
            mod = base.modules.get(name)
            if mod is not None and tuple(mod.shape) == tuple(region.shape):
                indices = np.asarray(region.indices, dtype=np.int64)
                wanted[mod.id] = footprints.QueryModule(
                    variant_code(region), indices, int(mod.shape[0]), int(mod.shape[1])
                )
        refs, keys = registry.footprint_keys(base)
        shapes = {i: (int(mod.shape[0]), int(mod.shape[1])) for i, mod in by_id.items()}
        sign = postings.signature(
            base.fingerprint, {i: (mod.name, *shapes[i]) for i, mod in by_id.items()}
        )
        parts = postings.against_all(
            wanted, shapes, keys, lambda ids: registry.footprint_rows(base, ids),  # noqa: B023
            registry.index_path(base), sign, min_rows,
        )  # fmt: skip
        module_names = {i: mod.name for i, mod in by_id.items()}
        report.compared += sum(1 for ref in refs.values() if ref != query.name)
        for part in parts:
            hit = np.flatnonzero(part.shares.totals)
            for i, aid in zip(hit.tolist(), part.ids[hit].tolist(), strict=True):
                other = refs.get(aid)
                if other is not None and other != query.name:
                    found = _Found(other, int(part.shares.totals[i]), part.shares, i, module_names)
                    report.found.append(found)
    report.found.sort(key=lambda f: -f.total)
    return report
