"""One packed row per adapter: all of its regions as flat little-endian arrays.

The ``regions`` table answers per-module questions; bulk overlap (one adapter against every
adapter on a base) instead reads one ``footprints`` row per adapter, so 10,000 adapters on a
224-module base cost 10,000 rows and a few ``np.frombuffer`` calls instead of 2.24M rows.
A row holds, in increasing module-id order (see ``models.Footprint``)::

    modules  (S,) <i4  base_modules.id        counts   (S,) <i4  indices per module (0: lora)
    variants (S,) u1   0 fa, 1 fb, 2 lora     indices  (sum(counts),) <u2 or <u4 (width 2 or 4)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sbora_reg.errors import RegistryError
from sbora_reg.sbora.cells import FA, LORA, VARIANT_CODES, touched

INDEX_DTYPES: dict[int, np.dtype[Any]] = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
_ID = np.dtype("<i4")


def encode(regions: Sequence[tuple[int, str, np.ndarray | None]]) -> dict[str, Any]:
    """``(module id, variant, sorted indices or None for lora)`` per module -> row values."""
    items = sorted(regions, key=lambda region: region[0])
    codes = np.array([VARIANT_CODES[variant] for _mid, variant, _idx in items], dtype=np.uint8)
    parts = [
        np.zeros(0, np.int64) if code == LORA or idx is None else np.sort(np.asarray(idx, np.int64))
        for code, (_mid, _v, idx) in zip(codes.tolist(), items, strict=True)
    ]
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    width = 2 if flat.size == 0 or int(flat.max()) < 2**16 else 4
    return {
        "modules": np.array([mid for mid, _v, _idx in items], dtype=_ID).tobytes(),
        "variants": codes.tobytes(),
        "counts": np.array([p.size for p in parts], dtype=_ID).tobytes(),
        "width": width,
        "indices": flat.astype(INDEX_DTYPES[width]).tobytes(),
    }


@dataclass(frozen=True)
class Decoded:
    """Footprint rows as flat arrays; segment s covers ``counts[s]`` entries of ``flat``.

    Segments come row by row, or module by module when every row has the same layout.
    """

    seg_row: np.ndarray  # (S,) int64, position of the segment's row in the input
    module_ids: np.ndarray  # (S,) int64
    variants: np.ndarray  # (S,) int8
    counts: np.ndarray  # (S,) int64
    flat: np.ndarray  # (E,) uint16 when every row has width 2, else uint32


def corrupt() -> RegistryError:
    return RegistryError("corrupt footprint data in the registry: restore it from a backup")


def decode(rows: Sequence[tuple[Any, Any, Any, Any, Any]]) -> Decoded:
    """Rows of ``(modules, variants, counts, width, indices)`` bytes -> ``Decoded``.

    Rows sharing one layout (the usual registry: same targets, variant and rank) are copied
    once each into module-major order; otherwise every field of every row is joined and read
    with one ``np.frombuffer``, and only a registry mixing index widths needs one more scatter.
    """
    mods, variants, counts_b, widths_t, blobs = zip(*rows, strict=True) if rows else ((),) * 5
    if len(rows) > 1 and all(
        len(set(field)) == 1 for field in (mods, variants, counts_b, widths_t)
    ):
        same_layout = _same_layout(rows[0], blobs)
        if same_layout is not None:
            return same_layout
    return _decode_rows(rows)


def _decode_rows(rows: Sequence[tuple[Any, Any, Any, Any, Any]]) -> Decoded:
    """``decode`` row by row: each field of every row joined and read at once."""
    mods, variants, counts_b, widths_t, blobs = zip(*rows, strict=True) if rows else ((),) * 5
    n_seg = np.array([len(b) for b in mods], dtype=np.int64) // _ID.itemsize
    widths = np.array(widths_t, dtype=np.int64)
    if (
        any(len(b) % _ID.itemsize for b in mods)
        or [len(b) for b in variants] != n_seg.tolist()
        or [len(b) for b in counts_b] != (n_seg * _ID.itemsize).tolist()
        or not np.isin(widths, (2, 4)).all()
    ):
        raise corrupt()
    module_ids = np.frombuffer(b"".join(mods), dtype=_ID).astype(np.int64)
    codes = np.frombuffer(b"".join(variants), dtype=np.uint8).astype(np.int8)
    counts = np.frombuffer(b"".join(counts_b), dtype=_ID).astype(np.int64)
    ends = np.cumsum(n_seg)
    per_row = np.concatenate(([0], np.cumsum(counts)))[np.concatenate(([0], ends))]
    row_entries = np.diff(per_row)  # (R,) indices per row
    lengths = np.array([len(b) for b in blobs], dtype=np.int64)
    if (
        (lengths != widths * row_entries).any()
        or (counts < 0).any()
        or (codes > LORA).any()
        or (counts[codes == LORA] != 0).any()
    ):
        raise corrupt()
    return Decoded(
        seg_row=np.repeat(np.arange(len(rows), dtype=np.int64), n_seg),
        module_ids=module_ids,
        variants=codes,
        counts=counts,
        flat=_flat(blobs, widths, row_entries),
    )


def _same_layout(first: tuple[Any, ...], blobs: Sequence[Any]) -> Decoded | None:
    """Rows with one layout (same modules, variants, width and rank r > 0 everywhere).

    Decoded module-major, as a region table orders them: segment ``(module j, row i)`` is
    ``j * rows + i``, and each row is copied once into its ``(modules, rows, r)`` slot instead of
    joining every row and then moving the segments.
    """
    layout = _decode_rows([first])
    width = int(first[3])
    n_mod, n_rows = layout.counts.size, len(blobs)
    if not n_mod or layout.counts[0] <= 0 or (layout.counts != layout.counts[0]).any():
        return None
    rank = int(layout.counts[0])
    if any(len(blob) != width * n_mod * rank for blob in blobs):
        raise corrupt()
    dest = np.empty((n_mod, n_rows, rank), dtype=INDEX_DTYPES[width])
    for i, blob in enumerate(blobs):
        dest[:, i, :] = np.frombuffer(blob, dtype=INDEX_DTYPES[width]).reshape(n_mod, rank)
    return Decoded(
        seg_row=np.tile(np.arange(n_rows, dtype=np.int64), n_mod),
        module_ids=np.repeat(layout.module_ids, n_rows),
        variants=np.repeat(layout.variants, n_rows),
        counts=np.full(n_mod * n_rows, rank, dtype=np.int64),
        flat=dest.reshape(-1),
    )


def _flat(blobs: Sequence[Any], widths: np.ndarray, row_entries: np.ndarray) -> np.ndarray:
    """Every row's indices in row order (uint16 if all rows are 2 bytes wide, else uint32)."""
    if widths.size == 0 or (widths == widths[0]).all():
        width = int(widths[0]) if widths.size else 2
        return np.frombuffer(b"".join(blobs), dtype=INDEX_DTYPES[width])
    flat = np.empty(int(row_entries.sum()), dtype=np.uint32)
    row_start = np.cumsum(row_entries) - row_entries
    for width, dtype in INDEX_DTYPES.items():
        sel = np.flatnonzero(widths == width)
        values = np.frombuffer(b"".join(blobs[i] for i in sel.tolist()), dtype=dtype)
        group = row_entries[sel]
        shift = np.repeat(row_start[sel] - (np.cumsum(group) - group), group)
        flat[np.arange(values.size) + shift] = values
    return flat


# --- one query against every row -----------------------------------------------------------


@dataclass(frozen=True)
class QueryModule:
    """The query's region on one base module: variant code, sorted indices, module shape."""

    code: int
    indices: np.ndarray
    out: int
    inn: int

    @property
    def cells(self) -> int:
        return int(touched(self.code, self.out, self.inn, self.indices.size))


@dataclass(frozen=True)
class RowShares:
    """Shared cells of one query with every footprint row: ``totals[i]`` for row ``i``, and per
    layout group the ``(rows, segments)`` matrix of shares with the segments' module ids."""

    totals: np.ndarray  # (R,) int64
    groups: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # (row positions, module ids, shares)

    def modules(self, row: int) -> dict[int, int]:
        """Module id -> shared cells of row ``row`` (only modules with a share)."""
        for rows, module_ids, shares in self.groups:
            at = np.searchsorted(rows, row)
            if at < rows.size and rows[at] == row:
                hit = np.flatnonzero(shares[at])
                return dict(zip(module_ids[hit].tolist(), shares[at, hit].tolist(), strict=True))
        return {}


def layout_groups(rows: Sequence[Any]) -> dict[tuple[Any, ...], list[int]]:
    """Positions of the rows of ``(modules, variants, counts, width, indices)`` per layout
    ``(modules, variants, counts, width)`` bytes: within a group every row's segment j lies
    at the same offsets of its indices (the usual registry has one group per variant and rank).
    """
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, row in enumerate(rows):
        key = (bytes(row[0]), bytes(row[1]), bytes(row[2]), int(row[3]))
        groups.setdefault(key, []).append(i)
    return groups


def layout_of(key: tuple[Any, ...], blobs: Sequence[Any]) -> Decoded:
    """The segments of a layout group (its first row), after checking every row's length."""
    mods_b, variants_b, counts_b, width = key
    entries = len(blobs[0]) // width if width in INDEX_DTYPES else -1
    layout = _decode_rows([(mods_b, variants_b, counts_b, width, blobs[0])])
    if any(len(b) != len(blobs[0]) for b in blobs) or layout.counts.sum() != entries:
        raise corrupt()
    return layout


SameAxis = Callable[[int, QueryModule, int], np.ndarray]


def group_shares(
    query: dict[int, QueryModule],
    shapes: dict[int, tuple[int, int]],
    segments: tuple[np.ndarray, np.ndarray, np.ndarray],
    n_rows: int,
    same_axis: SameAxis,
) -> np.ndarray:
    """``(rows, segments)`` cells each row of one layout group shares with ``query``.

    The numbers of ``overlap.compare``: FA/FA ``out·|C1∩C2|``, FB/FB ``|R1∩R2|·in``, FA/FB
    ``|R|·|C|``, against a LoRA the other side's cells. Only the same-axis term depends on the
    rows' indices: ``same_axis(j, q, dim)`` gives, per row, how many of ``q.indices`` segment
    j holds (a scan of the rows, or an inverted index). A module the query does not touch
    costs nothing. ``segments``: the group's module ids, variant codes and index counts per
    segment; ``shapes``: module id -> (out, in) of every module the rows use.
    """
    module_ids, variants, counts = segments
    shares = np.zeros((n_rows, counts.size), dtype=np.int64)
    for j, (mid, code, count) in enumerate(
        zip(module_ids.tolist(), variants.tolist(), counts.tolist(), strict=True)
    ):
        q = query.get(mid)
        if q is None:
            continue
        if mid not in shapes:
            raise corrupt()
        out, inn = shapes[mid]
        if q.code == LORA:  # every cell of the query: the row's own cells
            shares[:, j] = int(touched(code, out, inn, count))
        elif code == LORA:  # the row touches every cell: the query's cells
            shares[:, j] = q.cells
        elif code != q.code:  # FA x FB: |R| x |C|
            shares[:, j] = q.indices.size * count
        elif count:
            shares[:, j] = same_axis(j, q, inn if code == FA else out) * (
                out if code == FA else inn
            )
    return shares


def shares_against(
    query: dict[int, QueryModule], shapes: dict[int, tuple[int, int]], rows: Sequence[Any]
) -> RowShares:
    """Cells each row of ``(modules, variants, counts, width, indices)`` shares with ``query``
    (``group_shares`` per layout group), by scanning the rows' indices: within a group the
    same-axis term is one bitmap gather per module over all the group's rows, read in place (no
    reordering into a region table). ``postings`` answers the same from an inverted index.
    """
    totals = np.zeros(len(rows), dtype=np.int64)
    bitmaps: dict[int, np.ndarray] = {}  # per module, shared by the groups
    groups = []
    for key, members in layout_groups(rows).items():
        blobs = [rows[i][4] for i in members]
        layout = layout_of(key, blobs)
        scan = _Scan(blobs, int(key[3]), layout, bitmaps)
        segments = (layout.module_ids, layout.variants, layout.counts)
        shares = group_shares(query, shapes, segments, len(members), scan)
        positions = np.asarray(members, dtype=np.int64)
        totals[positions] = shares.sum(axis=1)
        groups.append((positions, layout.module_ids, shares))
    return RowShares(totals, groups)


class _Scan:
    """``group_shares``'s same-axis term read from one layout group's rows in place."""

    def __init__(
        self, blobs: Sequence[Any], width: int, layout: Decoded, bitmaps: dict[int, np.ndarray]
    ) -> None:
        self.blobs, self.width, self.layout, self.bitmaps = blobs, width, layout, bitmaps
        self.starts = np.concatenate(([0], np.cumsum(layout.counts)))
        self.mat: np.ndarray | None = None  # joined only if a module needs the gather

    def __call__(self, j: int, q: QueryModule, dim: int) -> np.ndarray:
        mid = int(self.layout.module_ids[j])
        bitmap = self.bitmaps.get(mid)
        if bitmap is None:
            # 16-bit rows index a 2^16 bitmap: no bounds check per block (validated when
            # stored; a stray index still reads False, never another module)
            bitmap = np.zeros(max(dim, 2**16 if self.width == 2 else dim), dtype=bool)
            bitmap[q.indices] = True
            self.bitmaps[mid] = bitmap
        if self.mat is None:
            joined = np.frombuffer(b"".join(self.blobs), dtype=INDEX_DTYPES[self.width])
            self.mat = joined.reshape(len(self.blobs), -1)
        # a contiguous copy, then take: twice as fast as fancy indexing the strided view
        block = np.ascontiguousarray(self.mat[:, self.starts[j] : self.starts[j + 1]])
        if self.width != 2 and block.size and int(block.max()) >= dim:
            raise corrupt()
        return np.count_nonzero(bitmap.take(block), axis=1)
