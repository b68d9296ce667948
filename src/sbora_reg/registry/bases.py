"""Base models in the database: their rows, module tables, labels and Hub ids.

Functions on a session of ``Registry.read()`` / ``Registry.write()``; ``Registry.add_base`` and
``get_base`` orchestrate them (file reading happens before the write transaction).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from sbora_reg.errors import RegistryError
from sbora_reg.registry import models as m
from sbora_reg.registry.records import BaseModule, BaseRecord, as_utc


def record(session: Session, base_id: int) -> BaseRecord:
    """The base with database id ``base_id`` and its module table."""
    row = session.get_one(m.BaseModel, base_id)
    mods = session.execute(select(m.BaseModule).where(m.BaseModule.base_id == base_id)).scalars()
    modules = {
        mod.name: BaseModule(mod.id, mod.name, mod.kind, (mod.out_features, mod.in_features))
        for mod in mods
    }
    return BaseRecord(
        row.id, row.name, row.revision, row.fingerprint, as_utc(row.created), modules,
        label=row.label, hub_id=row.hub_id,
    )  # fmt: skip


def find(session: Session, key: str, paths: list[str]) -> int | None:
    """The first base whose name is one of ``paths``, or whose label, Hub id or fingerprint
    is ``key``."""
    return session.scalar(
        select(m.BaseModel.id)
        .where(
            m.BaseModel.name.in_(paths)
            | (m.BaseModel.label == key)
            | (m.BaseModel.hub_id == key)
            | (m.BaseModel.fingerprint == key)
        )
        .order_by(m.BaseModel.id)
        .limit(1)
    )


def by_name(session: Session, name: str) -> int | None:
    return session.scalar(select(m.BaseModel.id).where(m.BaseModel.name == name))


def all_ids(session: Session) -> list[int]:
    return list(session.scalars(select(m.BaseModel.id).order_by(m.BaseModel.name)).all())


def check_label_free(session: Session, label: str | None, base_id: int = 0) -> None:
    """``RegistryError`` when another base already has ``label``."""
    if label is None:
        return
    other = session.scalar(
        select(m.BaseModel.name).where(m.BaseModel.label == label, m.BaseModel.id != base_id)
    )
    if other is not None:
        raise RegistryError(f"the base name {label!r} is taken by {other}: choose another")


def set_labels(session: Session, base_id: int, changes: dict[str, Any]) -> None:
    check_label_free(session, changes.get("label"), base_id)
    session.execute(update(m.BaseModel).where(m.BaseModel.id == base_id).values(**changes))


def insert_or_check(
    session: Session,
    name: str,
    fingerprint: str,
    table: dict[str, tuple[str, tuple[int, int]]],
    *,
    revision: str | None,
    label: str | None,
    hub_id: str | None,
) -> int:
    """Insert the base ``name`` with its module ``table``, or check the one a racing writer
    inserted first has the same fingerprint; returns its id."""
    row = session.scalar(select(m.BaseModel).where(m.BaseModel.name == name))
    if row is not None:
        if row.fingerprint != fingerprint:
            raise RegistryError(
                f"base {name} is registered with another shape fingerprint "
                f"({row.fingerprint[:12]}, now {fingerprint[:12]}): the model changed; "
                "register the new one from another path"
            )
        return row.id
    check_label_free(session, label)
    row = m.BaseModel(
        name=name, revision=revision, fingerprint=fingerprint, label=label, hub_id=hub_id
    )
    session.add(row)
    session.flush()
    session.execute(
        insert(m.BaseModule),
        [
            {"base_id": row.id, "name": n, "kind": k, "out_features": s[0], "in_features": s[1]}
            for n, (k, s) in sorted(table.items())
        ],
    )
    return row.id
