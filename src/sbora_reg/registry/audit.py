"""Audit: which weights each task touches, and proof that a merged checkpoint changed no others.

Usage (``usage``): per task (or per adapter) and per module, the union of the rows (FB) and
columns (FA) its adapters touch, the number of weights that is and its share of all weights of the
base's module table. In the ``(out, in)`` frame a task with row set ``R`` and column set ``C``
touches ``|R|·in + out·|C| - |R|·|C|`` cells (every cell if a LoRA is among them); two tasks share

    |R1&R2|·in + |R1-R2|·|C2| + |R2-R1|·|C1| + (out - |R1|R2|)·|C1&C2|

cells (a cell is touched when its row is in R or its column is in C).

Checkpoint audit (``audit_checkpoint``): stream a merged checkpoint and its base tensor by tensor
(one pair in memory), find every weight whose bits differ, and report those that no declared region
explains. Regions come from ``sbora_manifest.json`` in the checkpoint (written by ``compose``; see
docs/FORMAT.md) and/or the registry's adapters on that base. A module ``M`` maps to the tensor
``M.weight``; GPT-2 ``Conv1D`` stores it as ``(in, out)``, so its region is transposed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sbora_reg.errors import AdapterFormatError, ConfigError, NotFoundError
from sbora_reg.registry.overlap import RegionLike
from sbora_reg.registry.ranges import format_ranges, parse_ranges

if TYPE_CHECKING:
    from sbora_reg.registry.store import Registry

MANIFEST_NAME = "sbora_manifest.json"
MANIFEST_FORMAT = "sbora-manifest"
_EMPTY = np.zeros(0, dtype=np.int64)


# --------------------------------------------------------------------------- usage per task


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


def render_png(registry: Registry, base: str, path: str | Path, **filters: Any) -> Path:
    """``usage(registry, base, **filters)`` drawn as the audit picture (see ``audit_plot``)."""
    from sbora_reg.registry.audit_plot import plot_usage

    return plot_usage(usage(registry, base, **filters), path)


# --------------------------------------------------------------------------- checkpoint audit


@dataclass(frozen=True)
class DeclaredRegion:
    """A region some source declares: where it came from, the module kind, the region."""

    source: str  # "manifest:name@1" or "registry:name@1"
    kind: str | None  # "linear" | "conv1d" | None (unknown: decided from the stored shape)
    region: RegionLike


@dataclass(frozen=True)
class _ManifestRegion:
    variant: str
    shape: tuple[int, int]
    indices: np.ndarray


def read_manifest(checkpoint: str | Path) -> dict[str, list[DeclaredRegion]] | None:
    """Declared regions of ``sbora_manifest.json`` in a checkpoint (None when it has none)."""
    path = Path(checkpoint) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format", MANIFEST_FORMAT) != MANIFEST_FORMAT:
            raise ValueError(f"format is {data.get('format')!r}")
        declared: dict[str, list[DeclaredRegion]] = {}
        for member in data["members"]:
            version = member.get("version")
            ref = member["name"] if version is None else f"{member['name']}@{version}"
            for module, spec in member["regions"].items():
                shape = (int(spec["shape"][0]), int(spec["shape"][1]))
                variant = spec["variant"]
                if variant not in ("fa", "fb", "lora"):
                    raise ValueError(f"unknown variant {variant!r} for {module}")
                dim = shape[1] if variant == "fa" else shape[0]
                text = spec.get("indices")
                idx = _EMPTY if variant == "lora" or text is None else parse_ranges(text, size=dim)
                declared.setdefault(module, []).append(
                    DeclaredRegion(
                        f"manifest:{ref}", spec.get("kind"), _ManifestRegion(variant, shape, idx)
                    )
                )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterFormatError(f"cannot read {path}: {exc}") from exc
    return declared


def registry_declared(registry: Registry, base: str) -> dict[str, list[DeclaredRegion]]:
    """Regions of every adapter registered on ``base``, as declared regions."""
    base_rec = registry.get_base(base)
    kinds = {name: mod.kind for name, mod in base_rec.modules.items()}
    declared: dict[str, list[DeclaredRegion]] = {}
    for ref, regions in registry.regions_on_base(base_rec).items():
        for module, region in regions.items():
            item = DeclaredRegion(f"registry:{ref}", kinds.get(module), region)
            declared.setdefault(module, []).append(item)
    return declared


@dataclass(frozen=True)
class TensorFinding:
    """A tensor with weights no declared region explains (indices in the stored layout)."""

    tensor: str
    shape: tuple[int, ...]
    changed: int
    unexplained: int
    rows: str  # ranges of stored dim-0 indices holding unexplained changes
    cols: str  # ranges of stored dim-1 indices (empty for 1-D tensors)
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "shape": list(self.shape),
            "changed": self.changed,
            "unexplained": self.unexplained,
            "rows": self.rows,
            "cols": self.cols,
            "note": self.note or None,
        }


@dataclass(frozen=True)
class CheckpointAudit:
    """Result of diffing a checkpoint against its base."""

    checkpoint: str
    base: str
    sources: list[str]
    tensors: int
    changed_tensors: int
    changed: int
    explained: int
    findings: list[TensorFinding]

    @property
    def clean(self) -> bool:
        return not self.findings

    @property
    def unexplained(self) -> int:
        """Changed weights that no declared region explains."""
        return sum(f.unexplained for f in self.findings)

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "base": self.base,
            "sources": list(self.sources),
            "tensors": self.tensors,
            "changed_tensors": self.changed_tensors,
            "changed_weights": self.changed,
            "explained_weights": self.explained,
            "unexplained_weights": self.unexplained,
            "clean": self.clean,
            "findings": [f.to_json() for f in self.findings],
        }


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _changed_mask(base: torch.Tensor, ckpt: torch.Tensor) -> torch.Tensor:
    """Elementwise "bits differ" after casting the base to the checkpoint's dtype (NaN-safe)."""
    base = base.to(ckpt.dtype).contiguous().reshape(ckpt.shape)
    ckpt = ckpt.contiguous()
    bits = _SAME_SIZE_INT.get(ckpt.element_size())
    if bits is None or ckpt.dim() == 0:  # unusual widths: compare byte by byte
        a = base.reshape(-1).view(torch.uint8).reshape(*ckpt.shape, -1)
        b = ckpt.reshape(-1).view(torch.uint8).reshape(*ckpt.shape, -1)
        return (a != b).any(dim=-1)
    return base.view(bits) != ckpt.view(bits)


def _allowed_mask(stored: tuple[int, ...], regions: Iterable[DeclaredRegion]) -> torch.Tensor:
    """Cells of a stored ``M.weight`` that the declared regions explain, in its stored layout."""
    allowed = torch.zeros(stored, dtype=torch.bool)
    for item in regions:
        out, inn = (int(x) for x in item.region.shape)
        transposed = item.kind == "conv1d" or (
            item.kind is None and stored == (inn, out) and stored != (out, inn)
        )
        if stored != ((inn, out) if transposed else (out, inn)):
            raise AdapterFormatError(
                f"{item.source} declares shape {(out, inn)} for a weight stored as {stored}"
            )
        usage = ModuleUsage((out, inn)).add(item.region)
        mask = torch.from_numpy(usage.mask())
        allowed |= mask.T if transposed else mask
    return allowed


def _finding(name: str, changed: torch.Tensor, bad: torch.Tensor, note: str = "") -> TensorFinding:
    if bad.dim() >= 2:
        flat = bad.flatten(1)  # (dim 0, everything else)
        rows = torch.nonzero(flat.any(dim=1)).flatten().numpy()
        cols = torch.nonzero(flat.any(dim=0)).flatten().numpy()
    else:
        rows, cols = torch.nonzero(bad.reshape(-1)).flatten().numpy(), _EMPTY
    return TensorFinding(
        name,
        tuple(changed.shape),
        int(changed.sum()),
        int(bad.sum()),
        format_ranges(rows),
        format_ranges(cols),
        note,
    )


def audit_checkpoint(
    checkpoint: str | Path,
    base: str | Path,
    declared: Mapping[str, Sequence[DeclaredRegion]] | None = None,
    sources: Sequence[str] = (),
) -> CheckpointAudit:
    """Diff ``checkpoint`` against the ``base`` model directory, one tensor pair at a time.

    Every weight whose bits differ must lie in a region declared for ``<module>.weight``; any
    other change (in another tensor, a bias, a norm) is a finding, as are tensors added, removed
    or reshaped. ``declared`` defaults to the checkpoint's own ``sbora_manifest.json``.
    """
    from sbora_reg.registry.checkpoint import open_checkpoint, read_tensor

    if declared is None:
        declared = read_manifest(checkpoint)
        if declared is None:
            raise AdapterFormatError(
                f"{checkpoint} has no {MANIFEST_NAME}: pass the declared regions (or audit "
                "against the registry)"
            )
        sources = [MANIFEST_NAME]

    ckpt, ref = open_checkpoint(checkpoint), open_checkpoint(base)
    ckpt_entries = {t.name: t for t in ckpt.tensors}
    findings: list[TensorFinding] = []
    changed_tensors = changed_total = explained_total = 0
    for entry in ref.tensors:
        other = ckpt_entries.pop(entry.name, None)
        if other is None:
            findings.append(TensorFinding(entry.name, entry.shape, 0, 0, "", "", "missing"))
            continue
        if other.shape != entry.shape:
            note = f"shape {list(other.shape)} instead of {list(entry.shape)}"
            findings.append(TensorFinding(entry.name, entry.shape, 0, 0, "", "", note))
            continue
        changed = _changed_mask(read_tensor(entry), read_tensor(other))  # one pair in memory
        n_changed = int(changed.sum())
        if not n_changed:
            continue
        changed_tensors += 1
        changed_total += n_changed
        module = entry.name.removesuffix(".weight") if entry.name.endswith(".weight") else None
        regions = declared.get(module, ()) if module is not None else ()
        if regions and changed.dim() == 2:
            bad = changed & ~_allowed_mask(tuple(entry.shape), regions)
        else:
            bad = changed
        explained_total += n_changed - int(bad.sum())
        if bool(bad.any()):
            findings.append(_finding(entry.name, changed, bad))
    for name, entry in ckpt_entries.items():
        findings.append(TensorFinding(name, entry.shape, 0, 0, "", "", "not in the base"))
    return CheckpointAudit(
        str(checkpoint),
        str(base),
        list(sources),
        len(ref.tensors),
        changed_tensors,
        changed_total,
        explained_total,
        findings,
    )


def audit_merged(
    checkpoint: str | Path,
    base: str | Path,
    registry: Registry | None = None,
    source: str = "auto",
) -> CheckpointAudit:
    """``sbora-reg audit CHECKPOINT --base BASE``: regions from the manifest and/or registry.

    ``source``: ``manifest``, ``registry``, ``both``, or ``auto`` (the manifest when the checkpoint
    has one, else the registry's adapters on ``base``).
    """
    if source not in ("auto", "manifest", "registry", "both"):
        raise ConfigError(f"source must be auto, manifest, registry or both, not {source!r}")
    manifest = read_manifest(checkpoint)
    use_manifest = source in ("manifest", "both") or (source == "auto" and manifest is not None)
    use_registry = source in ("registry", "both") or (source == "auto" and manifest is None)
    if use_manifest and manifest is None:
        raise AdapterFormatError(
            f"{checkpoint} has no {MANIFEST_NAME}: audit against the registry (--source registry)"
        )
    declared: dict[str, list[DeclaredRegion]] = {}
    sources = []
    if use_manifest and manifest is not None:
        sources.append(MANIFEST_NAME)
        for module, items in manifest.items():
            declared.setdefault(module, []).extend(items)
    if use_registry:
        if registry is None:
            raise NotFoundError("no registry given to read declared regions from")
        sources.append(f"registry {registry.location}")
        for module, items in registry_declared(registry, str(base)).items():
            declared.setdefault(module, []).extend(items)
    return audit_checkpoint(checkpoint, base, declared, sources)
