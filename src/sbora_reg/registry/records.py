"""Plain values the registry returns: nothing here holds a database session."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from sbora_reg.sbora.cells import cells

Shape = tuple[int, int]


def as_utc(value: datetime) -> datetime:
    """``value`` with its time zone; SQLite hands timestamps back naive (they are UTC)."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Region:
    """Where one adapter touches one module's weight, in the ``(out, in)`` frame.

    ``fa``: all rows x ``indices`` (columns); ``fb``: ``indices`` (rows) x all columns;
    ``lora``: every cell (``indices`` is empty).
    """

    variant: str
    shape: Shape
    # (count,) int64, sorted, distinct; empty for lora
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def axis(self) -> str:
        """``"cols"`` for fa, ``"rows"`` for fb, ``"all"`` for lora."""
        return {"fa": "cols", "fb": "rows"}.get(self.variant, "all")

    @property
    def cells(self) -> int:
        """Number of weight cells touched."""
        return cells(self.variant, self.shape, int(self.indices.size))


@dataclass(frozen=True)
class BaseModule:
    id: int
    name: str
    kind: str
    shape: Shape


@dataclass(frozen=True)
class BaseRecord:
    """A registered base model and its module table (names, kinds, (out, in) shapes)."""

    id: int
    name: str
    revision: str | None
    fingerprint: str
    created: datetime
    modules: dict[str, BaseModule] = field(repr=False)
    label: str | None = None  # a short name of its own (``base add --name``)
    hub_id: str | None = None  # ``owner/name`` on the Hub: model cards' ``base_model``

    @property
    def card_name(self) -> str:
        """What a model card names as ``base_model``: the Hub id, else the local path."""
        return self.hub_id or self.name

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "hub_id": self.hub_id,
            "revision": self.revision,
            "fingerprint": self.fingerprint,
            "created": self.created.isoformat(),
            "modules": len(self.modules),
        }


@dataclass(frozen=True)
class AdapterRecord:
    """One registered adapter version."""

    id: int
    name: str
    version: int
    base: str
    base_fingerprint: str
    task: str | None
    format: str
    variant: str
    rank: int
    alpha: float
    target_modules: list[str]
    sha256: str
    size: int
    created: datetime
    metadata: dict[str, Any]
    provenance: dict[str, Any]
    tags: dict[str, str]
    probe_sha256: str | None = None  # the stored probe set (held-out prompts), if any

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "ref": self.ref,
            "base": self.base,
            "base_fingerprint": self.base_fingerprint,
            "task": self.task,
            "format": self.format,
            "variant": self.variant,
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": list(self.target_modules),
            "sha256": self.sha256,
            "size": self.size,
            "created": self.created.isoformat(),
            "metadata": dict(self.metadata),
            "provenance": dict(self.provenance),
            "tags": dict(self.tags),
            "probe_sha256": self.probe_sha256,
        }


@dataclass(frozen=True)
class HubRefRecord:
    """A Hub commit an adapter version or composition was pushed to (or pulled from)."""

    direction: str  # "push" | "pull"
    repo: str
    revision: str
    commit: str
    endpoint: str
    created: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "direction": self.direction,
            "repo": self.repo,
            "revision": self.revision,
            "commit": self.commit,
            "endpoint": self.endpoint,
            "created": self.created.isoformat(),
        }


@dataclass(frozen=True)
class AdapterDetail:
    """``show``: the record, per module the region it touches, and its Hub commits."""

    record: AdapterRecord
    regions: dict[str, Region]
    hub: list[HubRefRecord] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        from sbora_reg.registry.ranges import format_ranges

        modules = {
            name: {
                "variant": r.variant,
                "axis": r.axis,
                "shape": list(r.shape),
                "count": int(r.indices.size),
                "cells": r.cells,
                "ranges": format_ranges(r.indices),
            }
            for name, r in sorted(self.regions.items())
        }
        hub = [ref.to_json() for ref in self.hub]
        return {**self.record.to_json(), "modules": modules, "hub": hub}


@dataclass(frozen=True)
class GcResult:
    """What ``gc`` freed."""

    blobs_removed: list[str]
    bytes_freed: int
    temp_removed: int


@dataclass(frozen=True)
class SchemaStatus:
    """Schema revision of a database (None: empty) and the head revision of this code."""

    current: str | None
    head: str

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head

    def to_json(self) -> dict[str, Any]:
        return {"current": self.current, "head": self.head, "up_to_date": self.up_to_date}
