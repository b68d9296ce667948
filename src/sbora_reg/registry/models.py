"""SQLAlchemy 2.0 models of the registry.

Index sets (touched regions, reservations) are stored as one little-endian blob per module
(sorted ``uint16`` when every index is below 65536, else ``uint32``; see ``indexblob``), never one
row per index. Module names are stored once per base in ``base_modules`` and referenced by id.
``footprints`` repeats each adapter's regions packed in one row for bulk overlap reads; with it a
registry of 10,000 adapters on a 224-module base (r=32) takes about 1.4x its raw int32 index data.

The Alembic migrations in ``sbora_reg.migrations`` must produce exactly this schema (a test
compares them with ``alembic.autogenerate.compare_metadata``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class BaseModel(Base):
    """A base model: name (its local path), optional short label and Hub id, shape fingerprint."""

    __tablename__ = "bases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(512), unique=True)
    label: Mapped[str | None] = mapped_column(String(200), unique=True, index=True)
    hub_id: Mapped[str | None] = mapped_column(String(200))
    revision: Mapped[str | None] = mapped_column(String(128))
    fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    modules: Mapped[list[BaseModule]] = relationship(
        back_populates="base", cascade="all, delete-orphan", passive_deletes=True
    )


class BaseModule(Base):
    """One supported layer of a base: name, kind and weight shape in the (out, in) frame."""

    __tablename__ = "base_modules"
    __table_args__ = (UniqueConstraint("base_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    base_id: Mapped[int] = mapped_column(ForeignKey("bases.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(512))
    kind: Mapped[str] = mapped_column(String(16))
    out_features: Mapped[int] = mapped_column(Integer)
    in_features: Mapped[int] = mapped_column(Integer)

    base: Mapped[BaseModel] = relationship(back_populates="modules")


class Blob(Base):
    """Adapter files stored under ``<data_dir>/blobs/<sha256>/``."""

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AdapterName(Base):
    """The last version handed out per name, so a removed version number is never reused."""

    __tablename__ = "adapter_names"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    last_version: Mapped[int] = mapped_column(Integer)


class Adapter(Base):
    """One adapter version ``name@version``."""

    __tablename__ = "adapters"
    __table_args__ = (
        UniqueConstraint("name", "version"),
        Index("ix_adapters_name_sha256", "name", "sha256"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(ForeignKey("adapter_names.name"))
    version: Mapped[int] = mapped_column(Integer)
    base_id: Mapped[int] = mapped_column(ForeignKey("bases.id"), index=True)
    task: Mapped[str | None] = mapped_column(String(200), index=True)
    format: Mapped[str] = mapped_column(String(16))
    variant: Mapped[str] = mapped_column(String(16))
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    target_modules: Mapped[list[str]] = mapped_column(JSON)
    sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)
    provenance: Mapped[dict[str, Any]] = mapped_column(JSON)
    # a blob holding probe.jsonl: held-out prompts and answers that score this version's skill
    probe_sha256: Mapped[str | None] = mapped_column(String(64), index=True)

    tags: Mapped[list[Tag]] = relationship(cascade="all, delete-orphan", passive_deletes=True)
    regions: Mapped[list[Region]] = relationship(cascade="all, delete-orphan", passive_deletes=True)


class Tag(Base):
    __tablename__ = "tags"

    adapter_id: Mapped[int] = mapped_column(
        ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[str] = mapped_column(Text, index=True)


class Region(Base):
    """The index set one adapter touches in one module (variant fa: columns, fb: rows).

    ``indices`` is NULL for a plain LoRA module, which touches every cell.
    """

    __tablename__ = "regions"

    adapter_id: Mapped[int] = mapped_column(
        ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True
    )
    module_id: Mapped[int] = mapped_column(ForeignKey("base_modules.id"), primary_key=True)
    variant: Mapped[str] = mapped_column(String(8))
    count: Mapped[int] = mapped_column(Integer)
    indices: Mapped[bytes | None] = mapped_column(LargeBinary)


class Footprint(Base):
    """Every region of one adapter in one row, so bulk overlap reads one row per adapter.

    Written in the same transaction as the adapter's ``regions`` rows and equal to them:
    ``modules`` int32 module ids in increasing order, ``variants`` one uint8 code each
    (0 fa, 1 fb, 2 lora), ``counts`` int32 index counts (0 for lora), and ``indices`` every
    module's sorted indices concatenated in that order, ``width`` bytes each (2: uint16 when
    every index is below 65536, else 4: uint32), all little-endian.
    """

    __tablename__ = "footprints"

    adapter_id: Mapped[int] = mapped_column(
        ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True
    )
    modules: Mapped[bytes] = mapped_column(LargeBinary)
    variants: Mapped[bytes] = mapped_column(LargeBinary)
    counts: Mapped[bytes] = mapped_column(LargeBinary)
    width: Mapped[int] = mapped_column(Integer)
    indices: Mapped[bytes] = mapped_column(LargeBinary)


class Reservation(Base):
    """Indices handed out by ``allocate`` to a task before its adapter exists."""

    __tablename__ = "reservations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    base_id: Mapped[int] = mapped_column(ForeignKey("bases.id"), index=True)
    task: Mapped[str | None] = mapped_column(String(200))
    variant: Mapped[str] = mapped_column(String(8))
    rank: Mapped[int] = mapped_column(Integer)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    consumed_by_adapter_id: Mapped[int | None] = mapped_column(
        ForeignKey("adapters.id", ondelete="SET NULL"), index=True
    )

    regions: Mapped[list[ReservationRegion]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True
    )


class ReservationRegion(Base):
    """Reserved indices of one module, encoded like ``Region.indices``."""

    __tablename__ = "reservation_regions"

    reservation_id: Mapped[int] = mapped_column(
        ForeignKey("reservations.id", ondelete="CASCADE"), primary_key=True
    )
    module_id: Mapped[int] = mapped_column(ForeignKey("base_modules.id"), primary_key=True)
    count: Mapped[int] = mapped_column(Integer)
    indices: Mapped[bytes] = mapped_column(LargeBinary)


class Composition(Base):
    """A merged checkpoint or adapter written by ``compose``."""

    __tablename__ = "compositions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    base_id: Mapped[int | None] = mapped_column(ForeignKey("bases.id"))
    output_sha256: Mapped[str] = mapped_column(String(64), index=True)
    output_path: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(32))
    tool_version: Mapped[str] = mapped_column(String(64))
    allow_overlap: Mapped[bool] = mapped_column(Boolean)
    command: Mapped[str] = mapped_column(Text)
    # per member scored on its probe set: base / alone / composed exact match and retention
    measurements: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)

    members: Mapped[list[CompositionMember]] = relationship(
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="CompositionMember.position",
    )


class CompositionMember(Base):
    """One adapter of a composition; ``adapter_ref`` keeps the record readable after ``rm``."""

    __tablename__ = "composition_members"

    composition_id: Mapped[int] = mapped_column(
        ForeignKey("compositions.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int | None] = mapped_column(
        ForeignKey("adapters.id", ondelete="SET NULL"), index=True
    )
    adapter_ref: Mapped[str] = mapped_column(String(220))
    adapter_sha256: Mapped[str] = mapped_column(String(64))


class HubRef(Base):
    """A commit on the Hub that an adapter version or a composition was pushed to or pulled from.

    Exactly one of ``adapter_id`` / ``composition_id`` is set. No token is ever stored.
    """

    __tablename__ = "hub_refs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int | None] = mapped_column(
        ForeignKey("adapters.id", ondelete="CASCADE"), index=True
    )
    composition_id: Mapped[int | None] = mapped_column(
        ForeignKey("compositions.id", ondelete="CASCADE"), index=True
    )
    direction: Mapped[str] = mapped_column(String(8))  # "push" | "pull"
    repo: Mapped[str] = mapped_column(String(200), index=True)
    revision: Mapped[str] = mapped_column(String(200))
    commit: Mapped[str] = mapped_column(String(64), index=True)
    endpoint: Mapped[str] = mapped_column(String(512))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
