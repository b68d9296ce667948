"""Read-side queries: adapter records and touched regions in bulk, from Core or driver rows.

ORM loading costs tens of microseconds per row; listing 10,000 adapters or loading millions of
(adapter, module) regions instead reads plain rows, parses JSON and timestamps directly, and
decodes every index blob of one width with a single ``np.frombuffer``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import numpy as np
from sqlalchemy import Connection, Select, Text, select, type_coerce, update
from sqlalchemy.orm import Session

from sbora_reg.errors import RegistryError
from sbora_reg.registry import footprints, indexblob
from sbora_reg.registry import models as m
from sbora_reg.registry.records import AdapterRecord, Region, as_utc
from sbora_reg.registry.region_table import RegionTable

_A = m.Adapter.__table__.c
_RAW_JSON = ("target_modules", "metadata", "provenance")
# Fixed order, unpacked positionally in fetch_records. JSON and timestamps come back as stored
# (type_coerce) and are parsed by _json / _timestamp.
_ADAPTER_COLUMNS = (
    _A.id,
    _A.name,
    _A.version,
    m.BaseModel.name.label("base_name"),
    m.BaseModel.fingerprint,
    _A.task,
    _A.format,
    _A.variant,
    _A.rank,
    _A.alpha,
    type_coerce(_A.target_modules, Text).label("target_modules"),
    _A.sha256,
    _A.size,
    type_coerce(_A.created, Text).label("created"),
    type_coerce(_A.metadata, Text).label("metadata"),
    type_coerce(_A.provenance, Text).label("provenance"),
    _A.probe_sha256,
)


def adapter_select() -> Select[Any]:
    """``SELECT`` of everything an ``AdapterRecord`` needs; add filters, then ``fetch_records``."""
    return select(*_ADAPTER_COLUMNS)


@lru_cache(maxsize=4096)
def _json_text(text: str) -> Any:
    return json.loads(text)


def _json(value: Any) -> Any:
    """A JSON column read raw: text on SQLite, already decoded by psycopg on PostgreSQL.

    Parsed values are cached by their text (most adapters share target lists and empty dicts)
    and copied one level deep, so no two records share a container.
    """
    parsed = _json_text(value) if isinstance(value, str) else value
    if isinstance(parsed, dict):
        return dict(parsed)
    return list(parsed) if isinstance(parsed, list) else parsed


def _timestamp(value: Any) -> datetime:
    return as_utc(datetime.fromisoformat(value) if isinstance(value, str) else value)


def fetch_records(conn: Connection, query: Select[Any]) -> list[AdapterRecord]:
    """Run an ``adapter_select()`` query; tags are fetched in one more query."""
    rows = conn.execute(query.join(m.BaseModel, m.BaseModel.id == m.Adapter.base_id)).all()
    ids = [r[0] for r in rows]
    tags: dict[int, dict[str, str]] = {}
    if ids:
        tag_query = select(m.Tag.adapter_id, m.Tag.key, m.Tag.value)
        if len(ids) < 500:  # else reading every tag is cheaper than a huge IN list
            tag_query = tag_query.where(m.Tag.adapter_id.in_(ids))
        for aid, key, value in conn.execute(tag_query).all():
            tags.setdefault(aid, {})[key] = value
    return [
        AdapterRecord(
            id=aid,
            name=name,
            version=version,
            base=base_name,
            base_fingerprint=fingerprint,
            task=task,
            format=fmt,
            variant=variant,
            rank=rank,
            alpha=alpha,
            target_modules=_json(targets),
            sha256=sha,
            size=size,
            created=_timestamp(created),
            metadata=_json(metadata),
            provenance=_json(provenance),
            tags=tags.get(aid, {}),
            probe_sha256=probe,
        )
        for (
            aid,
            name,
            version,
            base_name,
            fingerprint,
            task,
            fmt,
            variant,
            rank,
            alpha,
            targets,
            sha,
            size,
            created,
            metadata,
            provenance,
            probe,
        ) in rows
    ]


def fetch_refs(conn: Connection, base_id: int) -> dict[int, str]:
    """Adapter id -> ``name@version`` for every adapter on a base, in id order."""
    rows = conn.execute(
        select(_A.id, _A.name, _A.version).where(_A.base_id == base_id).order_by(_A.id)
    ).all()
    return {aid: f"{name}@{version}" for aid, name, version in rows}


def _raw_rows(conn: Connection, query: Select[Any]) -> list[tuple[Any, ...]]:
    """Rows straight from the driver cursor: millions of small rows without per-row wrappers.

    Only for queries whose parameters are integers and fixed strings (rendered literally).
    """
    sql = str(query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(sql)
        return [tuple(row) for row in cursor.fetchall()]
    finally:
        cursor.close()


@dataclass(frozen=True)
class Packed:
    """Regions as flat arrays: segment i covers ``flat[starts[i]:starts[i] + counts[i]]``."""

    adapter_ids: np.ndarray  # (S,) int64, non-decreasing
    module_names: list[str]  # (S,)
    variants: list[str]  # (S,)
    counts: np.ndarray  # (S,) int64 (0 for lora: every cell)
    starts: np.ndarray  # (S,) int64
    flat: np.ndarray  # (sum(counts),) int64
    shapes: dict[str, tuple[int, int]]  # module -> (out, in)


def _decode_all(counts: np.ndarray, blobs: tuple[bytes | None, ...]) -> np.ndarray:
    """Concatenated indices of every segment (``indexblob`` encoding, per-segment width)."""
    lengths = np.array([len(b) if b is not None else 0 for b in blobs], dtype=np.int64)
    bad = (counts > 0) & (lengths != 2 * counts) & (lengths != 4 * counts)
    if bad.any():
        raise RegistryError("corrupt index data in the registry: restore it from a backup")
    starts = np.cumsum(counts) - counts
    flat = np.empty(int(counts.sum()), dtype=np.int64)
    for width, dtype in ((2, "<u2"), (4, "<u4")):
        sel = np.flatnonzero((counts > 0) & (lengths == width * counts))
        if sel.size == 0:
            continue
        values = np.frombuffer(b"".join(blobs[i] for i in sel), dtype=dtype)  # type: ignore[misc]
        if sel.size == np.count_nonzero(counts):  # one width throughout: already in order
            return values.astype(np.int64)
        group_counts = counts[sel]
        group_starts = np.cumsum(group_counts) - group_counts
        flat[np.arange(values.size) + np.repeat(starts[sel] - group_starts, group_counts)] = values
    return flat


def fetch_packed(conn: Connection, cond: Any, join_adapters: bool) -> Packed:
    """Regions matching ``cond`` (over regions, and adapters when joined), in two queries."""
    r, bm = m.Region.__table__.c, m.BaseModule.__table__.c
    query: Any = select(r.adapter_id, r.module_id, r.variant, r.count, r.indices)
    if join_adapters:
        query = query.join(m.Adapter.__table__, _A.id == r.adapter_id)
    rows = _raw_rows(conn, query.where(cond).order_by(r.adapter_id, r.module_id))
    module_ids = sorted({row[1] for row in rows})
    mods = (
        conn.execute(
            select(bm.id, bm.name, bm.out_features, bm.in_features).where(bm.id.in_(module_ids))
        ).all()
        if module_ids
        else []
    )
    names = {mid: name for mid, name, _o, _i in mods}
    shapes = {name: (o, i) for _mid, name, o, i in mods}
    if not rows:
        empty = np.zeros(0, dtype=np.int64)
        return Packed(empty, [], [], empty, empty, empty, shapes)
    adapter_ids, mod_ids, variants, counts_t, blobs = zip(*rows, strict=True)
    counts = np.array(counts_t, dtype=np.int64)
    counts[np.array([b is None for b in blobs])] = 0
    return Packed(
        adapter_ids=np.array(adapter_ids, dtype=np.int64),
        module_names=[names[i] for i in mod_ids],
        variants=list(variants),
        counts=counts,
        starts=np.cumsum(counts) - counts,
        flat=_decode_all(counts, blobs),
        shapes=shapes,
    )


def packed_to_regions(packed: Packed) -> dict[int, dict[str, Region]]:
    """Adapter id -> module -> ``Region`` (indices are views into ``packed.flat``)."""
    out: dict[int, dict[str, Region]] = {}
    ends = packed.starts + packed.counts
    for i, (aid, mod, variant) in enumerate(
        zip(packed.adapter_ids.tolist(), packed.module_names, packed.variants, strict=True)
    ):
        region = Region(variant, packed.shapes[mod], packed.flat[packed.starts[i] : ends[i]])
        out.setdefault(aid, {})[mod] = region
    return out


def fetch_keys(conn: Connection, base_id: int) -> tuple[dict[int, str], dict[int, str]]:
    """Adapter id -> ``name@version`` and adapter id -> content sha256, for every adapter on a
    base, in id order (what ``postings`` keys its rows by)."""
    rows = conn.execute(
        select(_A.id, _A.name, _A.version, _A.sha256).where(_A.base_id == base_id).order_by(_A.id)
    ).all()
    refs = {aid: f"{name}@{version}" for aid, name, version, _sha in rows}
    return refs, {aid: sha for aid, _n, _v, sha in rows}


def fetch_footprint_rows(
    conn: Connection, base_id: int, ids: Sequence[int] | None = None
) -> list[Any]:
    """``(adapter id, modules, variants, counts, width, indices)`` of every adapter on a base
    (or of those ``ids`` among them), in id order (one packed row each, see ``footprints``)."""
    f = m.Footprint.__table__.c
    on_base = select(_A.id).where(_A.base_id == base_id)
    if ids is not None:
        on_base = on_base.where(_A.id.in_([int(i) for i in ids]))
    query = (
        select(f.adapter_id, f.modules, f.variants, f.counts, f.width, f.indices)
        # IN, not a join: SQLite then walks the primary key in order instead of sorting blobs
        .where(f.adapter_id.in_(on_base))
        .order_by(f.adapter_id)
    )
    return _raw_rows(conn, query)


def fetch_region_table(conn: Connection, base_id: int, fingerprint: str) -> RegionTable:
    """``overlap.RegionTable`` of every adapter on a base (names are refs), from footprints.

    One row per adapter; the segments are decoded and renumbered with whole-array numpy only.
    """
    bm = m.BaseModule.__table__.c
    refs = fetch_refs(conn, base_id)
    rows = fetch_footprint_rows(conn, base_id)
    decoded = footprints.decode([row[1:] for row in rows])
    ref_ids = np.fromiter(refs, dtype=np.int64, count=len(refs))  # increasing
    row_pos = np.searchsorted(ref_ids, np.array([row[0] for row in rows], dtype=np.int64))
    present = np.zeros(int(decoded.module_ids.max(initial=-1)) + 1, dtype=bool)
    present[decoded.module_ids] = True
    used = np.flatnonzero(present).tolist()
    mods = list(
        conn.execute(
            select(bm.id, bm.name, bm.out_features, bm.in_features).where(bm.id.in_(used))
        ).all()
        if used
        else []
    )
    if len(mods) != len(used):
        raise RegistryError("corrupt footprint data in the registry: restore it from a backup")
    mods.sort(key=lambda row: row[1])
    lookup = np.zeros(present.size, dtype=np.int64)  # module id -> position in the table
    lookup[[row[0] for row in mods]] = np.arange(len(mods))
    return RegionTable.from_arrays(
        base=fingerprint,
        names=list(refs.values()),
        modules=[row[1] for row in mods],
        out=np.array([row[2] for row in mods], dtype=np.int64),
        inn=np.array([row[3] for row in mods], dtype=np.int64),
        seg_adapter=row_pos[decoded.seg_row],
        seg_module=lookup[decoded.module_ids],
        seg_variant=decoded.variants,
        indices=(decoded.flat, decoded.counts),
    )


def consume_matching_reservation(
    session: Session,
    base_id: int,
    adapter_id: int,
    regions: Iterable[tuple[int, str, np.ndarray | None]],
) -> int | None:
    """Mark the live reservation an adapter was trained on as consumed by it.

    ``regions`` are the new adapter's ``(module_id, variant, indices)``. A reservation matches
    when, on every module it reserves, the adapter has the same variant and exactly the reserved
    indices. Call inside the write transaction that inserts the adapter. Returns the id or None.
    """
    by_module = {
        mid: (variant, None if idx is None else np.sort(np.asarray(idx, dtype=np.int64)))
        for mid, variant, idx in regions
    }
    live = session.execute(
        select(
            m.Reservation.id,
            m.Reservation.variant,
            m.ReservationRegion.module_id,
            m.ReservationRegion.count,
            m.ReservationRegion.indices,
        )
        .join(m.ReservationRegion, m.ReservationRegion.reservation_id == m.Reservation.id)
        .where(m.Reservation.base_id == base_id, m.Reservation.consumed_by_adapter_id.is_(None))
        .order_by(m.Reservation.id)
    ).tuples()
    matches: dict[int, bool] = {}
    for res_id, variant, module_id, count, blob in live:
        have = by_module.get(module_id)
        same = (
            have is not None
            and have[0] == variant
            and have[1] is not None
            and np.array_equal(have[1], indexblob.decode(blob, count))
        )
        matches[res_id] = matches.get(res_id, True) and same
    for res_id, ok in matches.items():
        if ok:
            session.execute(
                update(m.Reservation)
                .where(m.Reservation.id == res_id)
                .values(consumed_by_adapter_id=adapter_id)
            )
            return res_id
    return None
