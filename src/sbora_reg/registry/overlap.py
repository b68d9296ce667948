"""Which weights two tasks share: overlap of SBoRA regions, exact.

Per module, in the ``(out, in)`` frame, an adapter touches a set of cells: FA -> all rows x its
columns ``C``; FB -> its rows ``R`` x all columns; a plain LoRA -> every cell. Two adapters share

    FA/FA: out * |C1 & C2|      FB/FB: |R1 & R2| * in      FA/FB: |R| * |C|
    X/LoRA: cells(X)            LoRA/LoRA: out * in

cells of a module, and nothing on a module only one of them touches. Adapters made for different
base models (different shape fingerprints) are never compared: their reports say so.

Here: per-module reports for a handful of adapters (``compare``, ``compare_all``,
``check_against``). ``region_table`` does the same for thousands at once, ``overlap_queries`` for
adapters in the registry. Cells per variant are ``sbora.cells``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from sbora_reg.errors import FingerprintMismatchError, OverlapError, ShapeMismatchError
from sbora_reg.registry.records import Region
from sbora_reg.sbora.cells import FA, LORA, VARIANT_CODES, touched

__all__ = ["Footprint", "PairOverlap", "Region", "RegionLike", "compare", "compare_all"]


class RegionLike(Protocol):
    """What overlap needs of a region (the registry's ``Region`` satisfies it)."""

    @property
    def variant(self) -> str: ...  # "fa" | "fb" | "lora"

    @property
    def shape(self) -> tuple[int, int]: ...  # (out, in)

    @property
    def indices(self) -> np.ndarray: ...  # columns (fa) or rows (fb); empty for lora


@dataclass(frozen=True)
class Footprint:
    """Everything an adapter touches: its name, its base fingerprint, module -> region."""

    name: str
    base: str
    regions: Mapping[str, RegionLike]


@dataclass(frozen=True)
class PairOverlap:
    """Shared cells of two adapters, per module (only modules with a share) and in total."""

    a: str
    b: str
    comparable: bool
    modules: Mapping[str, int]
    reason: str = ""

    @property
    def total(self) -> int:
        return sum(self.modules.values())

    @property
    def overlaps(self) -> bool:
        return self.total > 0

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "comparable": self.comparable,
            "reason": self.reason or None,
            "shared_cells": self.total,
            "modules": dict(self.modules),
        }


def variant_code(region: RegionLike) -> int:
    try:
        return VARIANT_CODES[region.variant]
    except KeyError:
        raise ShapeMismatchError(f"unknown region variant {region.variant!r}") from None


def touched_cells(region: RegionLike) -> int:
    """Number of weights of its module a region touches."""
    out, inn = region.shape
    return int(touched(variant_code(region), out, inn, len(region.indices)))


def shared_cells(a: RegionLike, b: RegionLike) -> int:
    """Cells of one module that both regions touch (the semantics table above)."""
    if tuple(a.shape) != tuple(b.shape):
        raise ShapeMismatchError(f"regions of shapes {a.shape} and {b.shape} on one module")
    out, inn = a.shape
    ca, cb = variant_code(a), variant_code(b)
    if ca == LORA:
        return touched_cells(b)
    if cb == LORA:
        return touched_cells(a)
    if ca != cb:  # FA x FB: their rows x our columns
        return len(a.indices) * len(b.indices)
    common = np.intersect1d(np.asarray(a.indices), np.asarray(b.indices)).size
    return int(common) * (out if ca == FA else inn)


def compare(a: Footprint, b: Footprint) -> PairOverlap:
    """Per-module shared cells of two adapters; not comparable across base fingerprints."""
    if a.base != b.base:
        reason = f"different base models ({a.base[:12]} vs {b.base[:12]}): never compared"
        return PairOverlap(a.name, b.name, comparable=False, modules={}, reason=reason)
    modules = {}
    for module in sorted(a.regions.keys() & b.regions.keys()):
        cells = shared_cells(a.regions[module], b.regions[module])
        if cells:
            modules[module] = cells
    return PairOverlap(a.name, b.name, comparable=True, modules=modules)


def compare_all(footprints: Sequence[Footprint]) -> list[PairOverlap]:
    """Every pair among a few adapters, in order (for thousands use ``RegionTable``)."""
    return [
        compare(footprints[i], footprints[j])
        for i in range(len(footprints))
        for j in range(i + 1, len(footprints))
    ]


def check_against(candidate: Footprint, members: Sequence[Footprint]) -> list[PairOverlap]:
    """Overlaps of ``candidate`` with everything already in a set (e.g. a composition).

    Raises ``FingerprintMismatchError`` when a member is on another base: a set mixes no bases.
    """
    found = []
    for member in members:
        report = compare(candidate, member)
        if not report.comparable:
            raise FingerprintMismatchError(
                f"{candidate.name} and {member.name} are made for different base models"
            )
        if report.overlaps:
            found.append(report)
    return found


def ensure_disjoint(footprints: Sequence[Footprint]) -> None:
    """Raise ``OverlapError`` naming the first pair that shares a weight (each vs all before)."""
    for i, candidate in enumerate(footprints):
        clashes = check_against(candidate, footprints[:i])
        if clashes:
            first = clashes[0]
            module, cells = next(iter(first.modules.items()))
            raise OverlapError(
                f"{first.a} and {first.b} touch the same weights ({first.total} cells, e.g. "
                f"{cells} in {module}): allocate disjoint regions or leave one of them out"
            )
