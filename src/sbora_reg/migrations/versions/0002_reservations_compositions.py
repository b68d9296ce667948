"""Reservations (indices handed out by allocate) and composition records.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reservations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("base_id", sa.Integer(), nullable=False),
        sa.Column("task", sa.String(length=200), nullable=True),
        sa.Column("variant", sa.String(length=8), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("consumed_by_adapter_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["base_id"], ["bases.id"], name=op.f("fk_reservations_base_id_bases")
        ),
        sa.ForeignKeyConstraint(
            ["consumed_by_adapter_id"],
            ["adapters.id"],
            name=op.f("fk_reservations_consumed_by_adapter_id_adapters"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reservations")),
    )
    with op.batch_alter_table("reservations") as batch_op:
        batch_op.create_index(batch_op.f("ix_reservations_base_id"), ["base_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_reservations_consumed_by_adapter_id"),
            ["consumed_by_adapter_id"],
            unique=False,
        )
    op.create_table(
        "reservation_regions",
        sa.Column("reservation_id", sa.Integer(), nullable=False),
        sa.Column("module_id", sa.Integer(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("indices", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["module_id"],
            ["base_modules.id"],
            name=op.f("fk_reservation_regions_module_id_base_modules"),
        ),
        sa.ForeignKeyConstraint(
            ["reservation_id"],
            ["reservations.id"],
            name=op.f("fk_reservation_regions_reservation_id_reservations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("reservation_id", "module_id", name=op.f("pk_reservation_regions")),
    )
    op.create_table(
        "compositions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("base_id", sa.Integer(), nullable=True),
        sa.Column("output_sha256", sa.String(length=64), nullable=False),
        sa.Column("output_path", sa.Text(), nullable=False),
        sa.Column("format", sa.String(length=32), nullable=False),
        sa.Column("tool_version", sa.String(length=64), nullable=False),
        sa.Column("allow_overlap", sa.Boolean(), nullable=False),
        sa.Column("command", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["base_id"], ["bases.id"], name=op.f("fk_compositions_base_id_bases")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_compositions")),
    )
    with op.batch_alter_table("compositions") as batch_op:
        batch_op.create_index(
            batch_op.f("ix_compositions_output_sha256"), ["output_sha256"], unique=False
        )
    op.create_table(
        "composition_members",
        sa.Column("composition_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=True),
        sa.Column("adapter_ref", sa.String(length=220), nullable=False),
        sa.Column("adapter_sha256", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter_id"],
            ["adapters.id"],
            name=op.f("fk_composition_members_adapter_id_adapters"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["composition_id"],
            ["compositions.id"],
            name=op.f("fk_composition_members_composition_id_compositions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("composition_id", "position", name=op.f("pk_composition_members")),
    )
    with op.batch_alter_table("composition_members") as batch_op:
        batch_op.create_index(
            batch_op.f("ix_composition_members_adapter_id"), ["adapter_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("composition_members") as batch_op:
        batch_op.drop_index(batch_op.f("ix_composition_members_adapter_id"))
    op.drop_table("composition_members")
    with op.batch_alter_table("compositions") as batch_op:
        batch_op.drop_index(batch_op.f("ix_compositions_output_sha256"))
    op.drop_table("compositions")
    op.drop_table("reservation_regions")
    with op.batch_alter_table("reservations") as batch_op:
        batch_op.drop_index(batch_op.f("ix_reservations_consumed_by_adapter_id"))
        batch_op.drop_index(batch_op.f("ix_reservations_base_id"))
    op.drop_table("reservations")
