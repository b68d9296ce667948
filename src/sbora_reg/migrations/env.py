"""Alembic environment: runs on the connection passed in ``config.attributes["connection"]``."""

from __future__ import annotations

from alembic import context

from sbora_reg import faults
from sbora_reg.registry.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - only the API is supported
    raise RuntimeError("run sbora-reg migrations through sbora_reg.migrations, not the alembic CLI")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,
    transactional_ddl=True,
    compare_type=True,
    on_version_apply=lambda **_kw: faults.point("migrate.step"),
)
with context.begin_transaction():
    context.run_migrations()
