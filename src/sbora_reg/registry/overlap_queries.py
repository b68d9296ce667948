"""Overlap of registered adapters: footprints read from the registry, compared by ``overlap``
(a few adapters, per pair) or a ``RegionTable`` (one adapter against every other on its base)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sbora_reg.registry.overlap import Footprint, PairOverlap, compare_all
from sbora_reg.registry.region_table import pairs_against

if TYPE_CHECKING:
    from sbora_reg.registry.store import Registry


@dataclass(frozen=True)
class AgainstAll:
    """One adapter against every other adapter on its base: only the overlapping pairs listed."""

    query: str
    compared: int
    overlaps: list[PairOverlap]

    def to_json(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "compared": self.compared,
            "overlapping": len(self.overlaps),
            "pairs": [p.to_json() for p in self.overlaps],
        }


def footprint(registry: Registry, ref: str) -> Footprint:
    """The registered adapter ``name[@version]`` as a footprint."""
    record = registry.resolve(ref)
    return Footprint(record.ref, record.base_fingerprint, registry.regions(record))


def overlap_refs(registry: Registry, refs: Sequence[str]) -> list[PairOverlap]:
    """Every pair among registered adapters, per module (``sbora-reg overlap A B ...``)."""
    return compare_all([footprint(registry, ref) for ref in refs])


def overlap_against_all(registry: Registry, ref: str) -> AgainstAll:
    """``ref`` against every other adapter on its base, vectorised; details for the overlaps.

    Every base record with the adapter's fingerprint counts (one architecture registered twice).
    """
    query = footprint(registry, ref)
    compared, pairs = 0, []
    for base in registry.bases():
        if base.fingerprint != query.base:
            continue
        table = registry.region_table(base)
        compared += sum(1 for name in table.names if name != query.name)
        pairs += pairs_against(query, table)
    pairs.sort(key=lambda p: -p.total)
    return AgainstAll(query.name, compared, pairs)
