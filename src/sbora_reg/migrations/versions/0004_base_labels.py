"""Bases get a short name of their own and the Hub id their model cards name.

``label`` (unique, optional) is what ``sbora-reg base add --name`` gives; ``hub_id``
(``owner/name``, optional) goes into every model card as ``base_model``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


# Plain ADD/DROP COLUMN and a unique index: no batch copy of ``bases``, which other tables
# reference (SQLite cannot drop and recreate it with foreign keys on).


def upgrade() -> None:
    op.add_column("bases", sa.Column("label", sa.String(length=200), nullable=True))
    op.add_column("bases", sa.Column("hub_id", sa.String(length=200), nullable=True))
    op.create_index(op.f("ix_bases_label"), "bases", ["label"], unique=True)


def downgrade() -> None:
    op.drop_index(op.f("ix_bases_label"), table_name="bases")
    op.drop_column("bases", "hub_id")  # ALTER TABLE DROP COLUMN: SQLite >= 3.35 and PostgreSQL
    op.drop_column("bases", "label")
