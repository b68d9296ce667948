"""Hand out disjoint regions to new tasks: reservations of rows or columns on a base model.

``allocate`` reserves, for every target module of a registered base, ``rank`` indices on the
variant's axis (FA: input columns, FB: output rows) that no registered adapter and no live
reservation of the same variant on that base uses, drawn seeded-at-random among the free ones.
The read of what is taken and the insert of the reservation happen in ONE write transaction
(``BEGIN IMMEDIATE`` on SQLite, an advisory lock on PostgreSQL), so two allocations running at
once never receive the same index.

What allocation can guarantee across variants: only same-variant disjointness. An FA region (all
rows x C) and an FB region (R x all columns) always share ``|R|·|C|`` cells, and a plain LoRA
shares every cell with anything. So when a target module already carries an adapter or live
reservation of the other variant, or a LoRA, the allocation is refused (``AllocationError``)
unless ``allow_cross_variant=True``, in which case it proceeds and lists those conflicts in
``Allocation.warnings``.

An adapter trained on a reservation consumes it when it is registered: ``Registry.register``
calls ``queries.consume_matching_reservation`` inside its write transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from sbora_reg.errors import AllocationError, ConfigError, NoMatchingModulesError, NotFoundError
from sbora_reg.registry import indexblob
from sbora_reg.registry import models as m
from sbora_reg.registry.ranges import format_ranges
from sbora_reg.registry.records import BaseRecord
from sbora_reg.sbora.config import SBoRAConfig

if TYPE_CHECKING:
    from sbora_reg.registry.store import Registry

log = logging.getLogger(__name__)

ALLOCATABLE_KINDS = ("linear", "conv1d")


@dataclass(frozen=True)
class Allocation:
    """One reservation: per module the reserved indices (sorted int64), and where they went."""

    reservation_id: int
    base: str
    base_fingerprint: str
    variant: str
    rank: int
    task: str | None
    indices: dict[str, np.ndarray] = field(repr=False)
    path: Path | None = None
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "reservation": self.reservation_id,
            "base": self.base,
            "base_fingerprint": self.base_fingerprint,
            "variant": self.variant,
            "rank": self.rank,
            "task": self.task,
            "path": str(self.path) if self.path else None,
            "modules": {k: format_ranges(v) for k, v in sorted(self.indices.items())},
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class _Taken:
    """What already occupies one module: same-axis indices and other-variant/LoRA users."""

    used: set[int] = field(default_factory=set)
    crossing: list[str] = field(default_factory=list)


def target_modules(base: BaseRecord, variant: str, rank: int, targets: Sequence[str]) -> list[str]:
    """Modules of ``base`` matched by ``targets`` (``SBoRAConfig`` suffix rule), sorted."""
    config = SBoRAConfig(variant=variant, r=rank, target_modules=tuple(targets))
    names = sorted(
        name
        for name, mod in base.modules.items()
        if mod.kind in ALLOCATABLE_KINDS and config.matches(name)
    )
    if not names:
        raise NoMatchingModulesError(
            f"--targets {','.join(targets)} matches no linear layer of {base.name}: use module "
            "names such as q_proj,v_proj"
        )
    return names


def _taken(
    session: Session, base: BaseRecord, variant: str, module_ids: Mapping[int, str]
) -> dict[str, _Taken]:
    """Per target module: indices on ``variant``'s axis in use, and who crosses that axis."""
    taken = {name: _Taken() for name in module_ids.values()}
    ids = list(module_ids)
    adapters = session.execute(
        select(
            m.Region.module_id,
            m.Region.variant,
            m.Region.count,
            m.Region.indices,
            m.Adapter.name,
            m.Adapter.version,
        )
        .join(m.Adapter, m.Adapter.id == m.Region.adapter_id)
        .where(m.Adapter.base_id == base.id, m.Region.module_id.in_(ids))
    ).tuples()
    for module_id, r_variant, count, blob, name, version in adapters:
        slot = taken[module_ids[module_id]]
        if r_variant == variant and blob is not None:
            slot.used.update(indexblob.decode(blob, count).tolist())
        else:
            slot.crossing.append(f"{name}@{version} ({r_variant})")
    reservations = session.execute(
        select(
            m.ReservationRegion.module_id,
            m.Reservation.variant,
            m.ReservationRegion.count,
            m.ReservationRegion.indices,
            m.Reservation.id,
        )
        .join(m.Reservation, m.Reservation.id == m.ReservationRegion.reservation_id)
        .where(
            m.Reservation.base_id == base.id,
            m.Reservation.consumed_by_adapter_id.is_(None),
            m.ReservationRegion.module_id.in_(ids),
        )
    ).tuples()
    for module_id, r_variant, count, blob, res_id in reservations:
        slot = taken[module_ids[module_id]]
        if r_variant == variant:
            slot.used.update(indexblob.decode(blob, count).tolist())
        else:
            slot.crossing.append(f"reservation {res_id} ({r_variant})")
    return taken


def _draw(
    taken: Mapping[str, _Taken], base: BaseRecord, variant: str, rank: int, seed: int | None
) -> dict[str, np.ndarray]:
    """``rank`` free indices per module, seeded; AllocationError naming a module that is full."""
    rng = np.random.default_rng(seed)
    chosen: dict[str, np.ndarray] = {}
    for name in sorted(taken):
        out, inn = base.modules[name].shape
        dim = inn if variant == "fa" else out
        free_mask = np.ones(dim, dtype=bool)
        free_mask[np.fromiter(taken[name].used, dtype=np.int64)] = False
        free = np.flatnonzero(free_mask)
        if free.size < rank:
            axis = "columns" if variant == "fa" else "rows"
            raise AllocationError(
                f"{name} has only {free.size} free {axis} of {dim} on {base.name} (rank {rank} "
                f"asked): lower --rank, or remove adapters / release reservations on that base"
            )
        chosen[name] = np.sort(rng.choice(free, size=rank, replace=False)).astype(np.int64)
    return chosen


def reserve(
    session: Session,
    base: BaseRecord,
    *,
    variant: str,
    rank: int,
    targets: Sequence[str],
    task: str | None = None,
    seed: int | None = None,
    allow_cross_variant: bool = False,
) -> tuple[int, dict[str, np.ndarray], list[str]]:
    """Inside an open write transaction: draw and record a reservation.

    Returns ``(reservation id, module -> indices, warnings)``.
    """
    names = target_modules(base, variant, rank, targets)
    module_ids = {base.modules[n].id: n for n in names}
    taken = _taken(session, base, variant, module_ids)
    warnings = [
        f"{name}: {', '.join(slot.crossing)} touch every {'column' if variant == 'fa' else 'row'}"
        f" there, so a {variant} region cannot be disjoint from them"
        for name, slot in sorted(taken.items())
        if slot.crossing
    ]
    if warnings and not allow_cross_variant:
        raise AllocationError(
            f"{len(warnings)} target module(s) already carry other-variant or LoRA adapters, "
            f"e.g. {warnings[0]}: allocate --variant {'fb' if variant == 'fa' else 'fa'}, pick "
            "other targets, or pass --allow-cross-variant to reserve same-variant-disjoint "
            "indices anyway"
        )
    chosen = _draw(taken, base, variant, rank, seed)
    row = m.Reservation(base_id=base.id, task=task, variant=variant, rank=rank)
    session.add(row)
    session.flush()
    session.add_all(
        m.ReservationRegion(
            reservation_id=row.id,
            module_id=base.modules[name].id,
            count=int(idx.size),
            indices=indexblob.encode(idx),
        )
        for name, idx in chosen.items()
    )
    return row.id, chosen, warnings


def allocate(
    registry: Registry,
    base: str,
    *,
    variant: str,
    rank: int,
    targets: Sequence[str],
    task: str | None = None,
    seed: int | None = None,
    out: str | Path | None = None,
    allow_cross_variant: bool = False,
) -> Allocation:
    """Reserve disjoint indices for a new task on ``base`` and write the indices file ``out``.

    The indices file (docs/FORMAT.md) is written after the transaction commits, so the write
    lock is never held during file I/O; if writing it fails the reservation is released again.
    """
    if variant not in ("fa", "fb"):
        raise ConfigError(f"variant must be 'fa' or 'fb', not {variant!r}")
    base_rec = registry.add_base(base)  # a local model directory is registered on the way
    with registry.write() as session:
        res_id, chosen, warnings = reserve(
            session,
            base_rec,
            variant=variant,
            rank=rank,
            targets=targets,
            task=task,
            seed=seed,
            allow_cross_variant=allow_cross_variant,
        )
    for warning in warnings:
        log.warning("allocation %d: %s", res_id, warning)
    path = None
    if out is not None:
        try:
            path = write_indices_file(out, chosen, variant, base_rec.fingerprint, res_id)
        except BaseException:
            release(registry, res_id)
            raise
    return Allocation(
        res_id, base_rec.name, base_rec.fingerprint, variant, rank, task, chosen, path, warnings
    )


def write_indices_file(
    path: str | Path,
    indices: Mapping[str, np.ndarray],
    variant: str,
    base_fingerprint: str,
    reservation: int,
) -> Path:
    """The indices file ``sbora.inject(..., indices=path)`` and ``sbora-reg train`` accept."""
    import torch

    from sbora_reg.sbora.indices import save_indices

    tensors = {k: torch.from_numpy(np.asarray(v, dtype=np.int64)) for k, v in indices.items()}
    return save_indices(path, tensors, variant, base_fingerprint, reservation)


def release(registry: Registry, reservation_id: int) -> None:
    """Delete a live reservation so its indices are free again (consumed ones are history)."""
    with registry.write() as session:
        row = session.get(m.Reservation, reservation_id)
        if row is None:
            raise NotFoundError(f"no reservation {reservation_id}")
        if row.consumed_by_adapter_id is not None:
            raise AllocationError(
                f"reservation {reservation_id} is already used by an adapter: remove the adapter "
                "instead"
            )
        session.execute(
            delete(m.ReservationRegion).where(m.ReservationRegion.reservation_id == reservation_id)
        )
        session.delete(row)


def live_reservations(registry: Registry) -> list[dict[str, Any]]:
    """Reservations no adapter has used yet, oldest first (a killed ``allocate`` or ``train``
    leaves one holding its indices until ``release``)."""
    query = (
        select(m.Reservation, m.BaseModel.name)
        .join(m.BaseModel, m.Reservation.base_id == m.BaseModel.id)
        .where(m.Reservation.consumed_by_adapter_id.is_(None))
        .order_by(m.Reservation.id)
    )
    with registry.read() as session:
        rows = session.execute(query).all()
    return [
        {"id": r.id, "base": base, "task": r.task, "variant": r.variant, "rank": r.rank,
         "created": r.created.isoformat()}
        for r, base in rows
    ]  # fmt: skip
