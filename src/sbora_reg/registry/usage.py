"""Usage: which weights each task touches on a base, per task (or adapter) and module.

Per module, the union of the rows (FB) and columns (FA) the group's adapters touch, the number of
weights that is and its share of all weights of the base's module table. In the ``(out, in)``
frame a task with row set ``R`` and column set ``C`` touches ``|R|·in + out·|C| - |R|·|C|`` cells
(every cell if a LoRA is among them); two tasks share

    |R1&R2|·in + |R1-R2|·|C2| + |R2-R1|·|C1| + (out - |R1|R2|)·|C1&C2|

cells (a cell is touched when its row is in R or its column is in C). ``audit_plot`` draws it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from sbora_reg.errors import ConfigError, NotFoundError
from sbora_reg.registry.overlap import RegionLike
from sbora_reg.registry.ranges import format_ranges

if TYPE_CHECKING:
    from sbora_reg.registry.store import Registry

_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class ModuleUsage:
    """Cells a group of regions touches in one module: rows R x all, all x columns C, or all."""

    shape: tuple[int, int]  # (out, in)
    rows: np.ndarray = field(default_factory=lambda: _EMPTY)  # sorted int64
    cols: np.ndarray = field(default_factory=lambda: _EMPTY)
    lora: bool = False

    @property
    def cells(self) -> int:
        out, inn = self.shape
        if self.lora:
            return out * inn
        r, c = self.rows.size, self.cols.size
        return r * inn + out * c - r * c

    def add(self, region: RegionLike) -> ModuleUsage:
        """This usage with one more region folded in."""
        idx = np.asarray(region.indices, dtype=np.int64)
        if region.variant == "lora":
            return ModuleUsage(self.shape, self.rows, self.cols, True)
        if region.variant == "fb":
            return ModuleUsage(self.shape, np.union1d(self.rows, idx), self.cols, self.lora)
        return ModuleUsage(self.shape, self.rows, np.union1d(self.cols, idx), self.lora)

    def shared(self, other: ModuleUsage) -> int:
        """Cells both usages touch (formula in the module docstring)."""
        if self.lora:
            return other.cells
        if other.lora:
            return self.cells
        out, inn = self.shape
        r1, r2, c1, c2 = self.rows, other.rows, self.cols, other.cols
        both_r = np.intersect1d(r1, r2).size
        only1, only2 = r1.size - both_r, r2.size - both_r
        neither = out - (r1.size + r2.size - both_r)
        return (
            both_r * inn
            + only1 * c2.size
            + only2 * c1.size
            + neither * (np.intersect1d(c1, c2).size)
        )

    def mask(self) -> np.ndarray:
        """Dense (out, in) boolean mask of the touched cells."""
        m = np.zeros(self.shape, dtype=bool)
        if self.lora:
            m[:] = True
        m[self.rows, :] = True
        m[:, self.cols] = True
        return m

    def to_json(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "rows": format_ranges(self.rows),
            "cols": format_ranges(self.cols),
            "lora": self.lora,
            "cells": self.cells,
        }


@dataclass(frozen=True)
class GroupUsage:
    """One task (or adapter): its adapters and, per module, what they touch together."""

    name: str
    adapters: list[str]
    modules: dict[str, ModuleUsage]
    total_weights: int

    @property
    def cells(self) -> int:
        return sum(u.cells for u in self.modules.values())

    @property
    def share(self) -> float:
        return self.cells / self.total_weights if self.total_weights else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "adapters": list(self.adapters),
            "cells": self.cells,
            "share": self.share,
            "modules": {k: u.to_json() for k, u in sorted(self.modules.items())},
        }


@dataclass(frozen=True)
class UsageReport:
    """Usage of a base by groups of adapters, and the cells each two groups share."""

    base: str
    fingerprint: str
    total_weights: int
    module_shapes: dict[str, tuple[int, int]]  # the base's module table, (out, in)
    groups: list[GroupUsage]
    overlaps: dict[tuple[str, str], dict[str, int]]  # (group a, group b) -> module -> cells

    @property
    def cells(self) -> int:
        """Weights touched by any group (each counted once)."""
        union: dict[str, ModuleUsage] = {}
        for group in self.groups:
            for name, usage in group.modules.items():
                cur = union.get(name, ModuleUsage(usage.shape))
                union[name] = ModuleUsage(
                    usage.shape,
                    np.union1d(cur.rows, usage.rows),
                    np.union1d(cur.cols, usage.cols),
                    cur.lora or usage.lora,
                )
        return sum(u.cells for u in union.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "base_fingerprint": self.fingerprint,
            "total_weights": self.total_weights,
            "cells": self.cells,
            "share": self.cells / self.total_weights if self.total_weights else 0.0,
            "groups": [g.to_json() for g in self.groups],
            "overlaps": [
                {"a": a, "b": b, "cells": sum(mods.values()), "modules": dict(mods)}
                for (a, b), mods in sorted(self.overlaps.items())
            ],
        }


def usage_from_regions(
    base: str,
    fingerprint: str,
    module_shapes: Mapping[str, tuple[int, int]],
    groups: Mapping[str, Mapping[str, Mapping[str, RegionLike]]],
) -> UsageReport:
    """Pure core of ``usage``: ``groups`` maps group name -> adapter ref -> module -> region."""
    total = sum(o * i for o, i in module_shapes.values())
    usages = []
    for gname, adapters in groups.items():
        modules: dict[str, ModuleUsage] = {}
        for regions in adapters.values():
            for module, region in regions.items():
                shape = (int(region.shape[0]), int(region.shape[1]))
                modules[module] = modules.get(module, ModuleUsage(shape)).add(region)
        usages.append(GroupUsage(gname, sorted(adapters), modules, total))
    overlaps: dict[tuple[str, str], dict[str, int]] = {}
    for i, a in enumerate(usages):
        for b in usages[i + 1 :]:
            shared = {
                m: s for m in sorted(a.modules.keys() & b.modules.keys())
                if (s := a.modules[m].shared(b.modules[m]))
            }  # fmt: skip
            if shared:
                overlaps[(a.name, b.name)] = shared
    return UsageReport(base, fingerprint, total, dict(module_shapes), usages, overlaps)


def usage(
    registry: Registry,
    base: str,
    *,
    by: str = "task",
    tasks: Sequence[str] = (),
    adapters: Sequence[str] = (),
) -> UsageReport:
    """Per task (``by="task"``; adapters without a task stand alone) or per adapter, on ``base``.

    ``tasks`` / ``adapters`` restrict the report to those tasks / adapter refs.
    """
    if by not in ("task", "adapter"):
        raise ConfigError(f"group by 'task' or 'adapter', not {by!r}")
    base_rec = registry.get_base(base)
    records = registry.adapters_on_base(base_rec)
    wanted = {registry.resolve(a).ref for a in adapters}
    if tasks and not any(r.task in tasks for r in records):
        raise NotFoundError(f"no adapter on {base_rec.name} has task {', '.join(tasks)}")
    records = [
        r for r in records if (not tasks or r.task in tasks) and (not wanted or r.ref in wanted)
    ]
    regions = registry.regions_on_base(base_rec)
    groups: dict[str, dict[str, Mapping[str, RegionLike]]] = {}
    for rec in records:
        key = rec.task if by == "task" and rec.task else rec.ref
        groups.setdefault(key, {})[rec.ref] = regions.get(rec.ref, {})
    shapes = {name: mod.shape for name, mod in base_rec.modules.items()}
    ordered = dict(sorted(groups.items()))
    return usage_from_regions(base_rec.name, base_rec.fingerprint, shapes, ordered)
