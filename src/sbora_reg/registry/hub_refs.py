"""Hub commits recorded in the registry: which adapter version or composition is at which commit.

Functions on a session of ``Registry.read()`` / ``Registry.write()``; no token is ever stored.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from sbora_reg.errors import InternalError
from sbora_reg.registry import models as m
from sbora_reg.registry.records import HubRefRecord, as_utc


def record(
    session: Session,
    direction: str,
    repo: str,
    revision: str,
    commit: str,
    endpoint: str,
    *,
    adapter_id: int | None = None,
    composition_id: int | None = None,
) -> None:
    """Remember that an adapter version (or a composition) is at ``repo@commit`` (once)."""
    if (adapter_id is None) == (composition_id is None):
        raise InternalError("internal: a Hub ref names one adapter or one composition")
    owner = (
        m.HubRef.adapter_id == adapter_id
        if adapter_id is not None
        else m.HubRef.composition_id == composition_id
    )
    known = session.scalar(
        select(m.HubRef.id).where(
            owner, m.HubRef.direction == direction, m.HubRef.repo == repo, m.HubRef.commit == commit
        )
    )
    if known is None:
        session.add(
            m.HubRef(
                adapter_id=adapter_id, composition_id=composition_id, direction=direction,
                repo=repo, revision=revision, commit=commit, endpoint=endpoint,
            )
        )  # fmt: skip


def listed(
    session: Session, *, adapter_id: int | None = None, composition_id: int | None = None
) -> list[HubRefRecord]:
    """Hub commits of one adapter version or one composition, oldest first."""
    column = m.HubRef.adapter_id if adapter_id is not None else m.HubRef.composition_id
    key = adapter_id if adapter_id is not None else composition_id
    rows = session.scalars(select(m.HubRef).where(column == key).order_by(m.HubRef.id)).all()
    return [
        HubRefRecord(r.direction, r.repo, r.revision, r.commit, r.endpoint, as_utc(r.created))
        for r in rows
    ]


def pulled_adapter(session: Session, repo: str, commit: str) -> int | None:
    """The id of the adapter version registered from ``repo@commit``, if it was pulled before."""
    return session.scalar(
        select(m.HubRef.adapter_id)
        .where(m.HubRef.direction == "pull", m.HubRef.repo == repo, m.HubRef.commit == commit)
        .where(m.HubRef.adapter_id.is_not(None))
        .order_by(m.HubRef.id)
        .limit(1)
    )
