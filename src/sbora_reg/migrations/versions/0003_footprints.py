"""Footprints: one packed row of all regions per adapter, for bulk overlap reads.

The upgrade fills a row for every existing adapter from its ``regions`` rows (the encoding is
written out here, not imported, so this revision keeps meaning what it meant).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

from typing import Any

import numpy as np
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_CODES = {"fa": 0, "fb": 1, "lora": 2}
_CHUNK = 500  # adapters per backfill batch: bounds memory on large registries


def upgrade() -> None:
    op.create_table(
        "footprints",
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("modules", sa.LargeBinary(), nullable=False),
        sa.Column("variants", sa.LargeBinary(), nullable=False),
        sa.Column("counts", sa.LargeBinary(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("indices", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter_id"],
            ["adapters.id"],
            name=op.f("fk_footprints_adapter_id_adapters"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("adapter_id", name=op.f("pk_footprints")),
    )
    _backfill(op.get_bind())


def _decode(blob: bytes | None, count: int) -> np.ndarray:
    if blob is None or count == 0:
        return np.zeros(0, np.int64)
    width = len(blob) // count
    return np.frombuffer(blob, dtype="<u2" if width == 2 else "<u4").astype(np.int64)


def _row(adapter_id: int, regions: list[tuple[Any, ...]]) -> dict[str, Any]:
    """Regions ``(module_id, variant, count, indices)`` in module-id order -> a footprint."""
    parts = [
        _decode(blob, count) if variant != "lora" else np.zeros(0, np.int64)
        for _mid, variant, count, blob in regions
    ]
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    width = 2 if flat.size == 0 or int(flat.max()) < 2**16 else 4
    return {
        "adapter_id": adapter_id,
        "modules": np.array([r[0] for r in regions], dtype="<i4").tobytes(),
        "variants": np.array([_CODES[r[1]] for r in regions], dtype=np.uint8).tobytes(),
        "counts": np.array([p.size for p in parts], dtype="<i4").tobytes(),
        "width": width,
        "indices": flat.astype("<u2" if width == 2 else "<u4").tobytes(),
    }


def _backfill(conn: sa.Connection) -> None:
    footprints = sa.table(
        "footprints",
        *(sa.column(c) for c in ("adapter_id", "modules", "variants", "counts", "width")),
        sa.column("indices"),
    )
    ids = [row[0] for row in conn.execute(sa.text("SELECT id FROM adapters ORDER BY id"))]
    for lo in range(0, len(ids), _CHUNK):
        chunk = ids[lo : lo + _CHUNK]
        rows = conn.execute(
            sa.text(
                "SELECT adapter_id, module_id, variant, count, indices FROM regions "
                "WHERE adapter_id >= :lo AND adapter_id <= :hi ORDER BY adapter_id, module_id"
            ),
            {"lo": chunk[0], "hi": chunk[-1]},
        ).all()
        by_adapter: dict[int, list[tuple[Any, ...]]] = {aid: [] for aid in chunk}
        for aid, *region in rows:
            by_adapter[aid].append(tuple(region))
        conn.execute(sa.insert(footprints), [_row(aid, regs) for aid, regs in by_adapter.items()])


def downgrade() -> None:
    op.drop_table("footprints")
