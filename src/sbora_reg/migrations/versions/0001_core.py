"""Core schema: bases and their modules, adapters, tags, touched regions, blobs.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "adapter_names",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("last_version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_adapter_names")),
    )
    op.create_table(
        "bases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=512), nullable=False),
        sa.Column("revision", sa.String(length=128), nullable=True),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bases")),
        sa.UniqueConstraint("name", name=op.f("uq_bases_name")),
    )
    with op.batch_alter_table("bases") as batch_op:
        batch_op.create_index(batch_op.f("ix_bases_fingerprint"), ["fingerprint"], unique=False)
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_blobs")),
    )
    op.create_table(
        "adapters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("base_id", sa.Integer(), nullable=False),
        sa.Column("task", sa.String(length=200), nullable=True),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("variant", sa.String(length=16), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("alpha", sa.Float(), nullable=False),
        sa.Column("target_modules", sa.JSON(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("provenance", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["base_id"], ["bases.id"], name=op.f("fk_adapters_base_id_bases")),
        sa.ForeignKeyConstraint(
            ["name"], ["adapter_names.name"], name=op.f("fk_adapters_name_adapter_names")
        ),
        sa.ForeignKeyConstraint(
            ["sha256"], ["blobs.sha256"], name=op.f("fk_adapters_sha256_blobs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapters")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_adapters_name_version")),
    )
    with op.batch_alter_table("adapters") as batch_op:
        batch_op.create_index(batch_op.f("ix_adapters_base_id"), ["base_id"], unique=False)
        batch_op.create_index("ix_adapters_name_sha256", ["name", "sha256"], unique=False)
        batch_op.create_index(batch_op.f("ix_adapters_sha256"), ["sha256"], unique=False)
        batch_op.create_index(batch_op.f("ix_adapters_task"), ["task"], unique=False)
    op.create_table(
        "base_modules",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("base_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=512), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("out_features", sa.Integer(), nullable=False),
        sa.Column("in_features", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["base_id"],
            ["bases.id"],
            name=op.f("fk_base_modules_base_id_bases"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_base_modules")),
        sa.UniqueConstraint("base_id", "name", name=op.f("uq_base_modules_base_id_name")),
    )
    op.create_table(
        "tags",
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter_id"],
            ["adapters.id"],
            name=op.f("fk_tags_adapter_id_adapters"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("adapter_id", "key", name=op.f("pk_tags")),
    )
    with op.batch_alter_table("tags") as batch_op:
        batch_op.create_index(batch_op.f("ix_tags_value"), ["value"], unique=False)
    op.create_table(
        "regions",
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("module_id", sa.Integer(), nullable=False),
        sa.Column("variant", sa.String(length=8), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("indices", sa.LargeBinary(), nullable=True),
        sa.ForeignKeyConstraint(
            ["adapter_id"],
            ["adapters.id"],
            name=op.f("fk_regions_adapter_id_adapters"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["module_id"], ["base_modules.id"], name=op.f("fk_regions_module_id_base_modules")
        ),
        sa.PrimaryKeyConstraint("adapter_id", "module_id", name=op.f("pk_regions")),
    )


def downgrade() -> None:
    op.drop_table("regions")
    with op.batch_alter_table("tags") as batch_op:
        batch_op.drop_index(batch_op.f("ix_tags_value"))
    op.drop_table("tags")
    op.drop_table("base_modules")
    with op.batch_alter_table("adapters") as batch_op:
        batch_op.drop_index(batch_op.f("ix_adapters_task"))
        batch_op.drop_index(batch_op.f("ix_adapters_sha256"))
        batch_op.drop_index("ix_adapters_name_sha256")
        batch_op.drop_index(batch_op.f("ix_adapters_base_id"))
    op.drop_table("adapters")
    op.drop_table("blobs")
    with op.batch_alter_table("bases") as batch_op:
        batch_op.drop_index(batch_op.f("ix_bases_fingerprint"))
    op.drop_table("bases")
    op.drop_table("adapter_names")
