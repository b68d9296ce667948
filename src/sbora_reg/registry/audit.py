"""Checkpoint audit: proof that a merged checkpoint changed no weight outside declared regions.

Stream a merged checkpoint and its base tensor by tensor (one pair in memory), find every weight
whose bits differ, and report those that no declared region explains. Regions come from
``sbora_manifest.json`` in the checkpoint (written by ``compose``; see ``registry.manifest`` and
docs/FORMAT.md) and/or the registry's adapters on that base. A module ``M`` maps to the tensor
``M.weight``; GPT-2 ``Conv1D`` stores it as ``(in, out)``, so its region is transposed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sbora_reg.errors import AdapterFormatError, ConfigError, NotFoundError
from sbora_reg.registry.manifest import MANIFEST_NAME, DeclaredRegion, read_manifest
from sbora_reg.registry.ranges import format_ranges
from sbora_reg.registry.usage import ModuleUsage

if TYPE_CHECKING:
    from sbora_reg.registry.store import Registry

_EMPTY = np.zeros(0, dtype=np.int64)


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
