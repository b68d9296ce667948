"""Probe sets (held-out prompts stored with an adapter version) and measured compositions.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("adapters", sa.Column("probe_sha256", sa.String(length=64), nullable=True))
    op.create_index(op.f("ix_adapters_probe_sha256"), "adapters", ["probe_sha256"], unique=False)
    op.add_column("compositions", sa.Column("measurements", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("compositions", "measurements")
    op.drop_index(op.f("ix_adapters_probe_sha256"), table_name="adapters")
    op.drop_column("adapters", "probe_sha256")
