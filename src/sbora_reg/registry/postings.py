"""An inverted index of the packed footprint rows, kept as a cache file beside the registry.

``footprints.shares_against`` answers "one adapter against every adapter on its base" by
scanning every row's indices: at 10,000 adapters on a 224-module base that is 143 MB read from
the database and 72 M lookups, whatever the query. The postings turn it around: per layout
group and segment, the row positions holding each index value, so that a query reads only the
lists of its own indices (about 32 per module, ~80 rows each) and counts them per row.

The database stays the truth; this file is derived from it and may be deleted at any time.
It covers a set of rows, each keyed by (adapter id, content sha256). A query reads those keys
from the database (milliseconds), takes the postings of every covered row still there with the
same content, scans the rows added (or whose id now holds other content) since with
``shares_against``, and leaves out covered rows that are gone. When none is on disk, it does
not parse, or too many rows are new, the query scans everything (as without an index) and then
writes a new one: to a temporary file, fsynced and renamed over the old, so a killed process
leaves the old index or the new one.

The file is a safetensors file (``safetensors.numpy``), read through a memory map so that only
the touched pages of the lists are read. Per group ``g``: ``g.ids`` (rows,) int64 adapter ids,
``g.sha`` (rows, 32) uint8 content hashes, the layout ``g.modules`` / ``g.variants`` /
``g.counts``; per segment ``j`` with indices, ``g.j.offsets`` (dim + 1,) int64 and ``g.j.rows``
(row positions sorted by index value, uint16 below 65,536 rows, else uint32).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sbora_reg.registry.footprints import (
    INDEX_DTYPES,
    QueryModule,
    RowShares,
    corrupt,
    group_shares,
    layout_groups,
    layout_of,
    shares_against,
)
from sbora_reg.sbora.cells import FA, FB
from sbora_reg.sbora.files import write_atomic

log = logging.getLogger(__name__)

FORMAT = "sbora-reg postings 1"
MIN_ROWS = 2000  # below this many rows a scan costs about what reading the index does
STALE_SHARE = 0.1  # rebuild once more than this share of the rows is not in the index

Rows = list[Any]  # (adapter id, modules, variants, counts, width, indices) per adapter
LoadRows = Callable[[Sequence[int] | None], Rows]  # those ids' rows (None: every row)


@dataclass(frozen=True)
class Part:
    """Shares of one set of rows with the query; ``ids[i]`` is row i's adapter id (-1: a row
    the index still holds whose adapter is gone or changed, to be left out)."""

    ids: np.ndarray
    shares: RowShares


def signature(fingerprint: str, modules: dict[int, tuple[str, int, int]]) -> str:
    """What an index is only valid for: the format, the base, its module ids, names, shapes."""
    text = json.dumps([FORMAT, fingerprint, sorted((i, *m) for i, m in modules.items())])
    return hashlib.sha256(text.encode()).hexdigest()


def against_all(
    query: dict[int, QueryModule],
    shapes: dict[int, tuple[int, int]],
    keys: dict[int, str],
    load: LoadRows,
    path: Path,
    sign: str,
    min_rows: int = MIN_ROWS,
) -> list[Part]:
    """``shares_against`` for every row on a base, through the index at ``path`` when the base
    has ``min_rows`` rows or more. ``keys``: adapter id -> content sha256 of every row now on
    the base; ``load(ids)``: those rows from the database; ``sign``: ``signature`` of the base.
    """
    index = _Index.read(path, sign) if len(keys) >= min_rows else None
    if index is not None:
        key_ids = np.fromiter(keys, dtype=np.int64, count=len(keys))
        order = np.argsort(key_ids)
        key_ids = key_ids[order]
        key_sha = _sha_array(list(keys.values()))[order]
        current, matched = index.match(key_ids, key_sha)
        new = key_ids[~matched].tolist()  # added, or an id that now holds other content
        if len(new) + int((~current).sum()) <= STALE_SHARE * current.size:
            try:
                parts = [index.shares(query, shapes, current)]
            except ValueError as exc:  # lists that do not fit their rows: scan, rebuild
                log.info("ignoring the overlap index %s: %s", path, exc)
            else:
                if new:
                    parts.append(_scanned(query, shapes, load(new)))
                return parts
    rows = [row for row in load(None) if row[0] in keys]  # not one added since keys were read
    part = _scanned(query, shapes, rows)
    if len(rows) >= min_rows:
        try:
            write(path, rows, shapes, keys, sign)
        except OSError as exc:  # a read-only data dir: answer without an index
            log.info("could not write the overlap index %s: %s", path, exc)
    return [part]


def _sha_array(shas: Sequence[str]) -> np.ndarray:
    """Hex sha256 strings -> (n, 32) uint8."""
    return np.frombuffer(bytes.fromhex("".join(shas)), dtype=np.uint8).reshape(len(shas), 32)


def _scanned(query: dict[int, QueryModule], shapes: dict[int, tuple[int, int]], rows: Rows) -> Part:
    ids = np.array([row[0] for row in rows], dtype=np.int64)
    return Part(ids, shares_against(query, shapes, [row[1:] for row in rows]))


# --- building ----------------------------------------------------------------------------------


def build(
    rows: Rows, shapes: dict[int, tuple[int, int]], keys: dict[int, str]
) -> dict[str, np.ndarray]:
    """The index's arrays for ``rows`` (see the module docstring); ``keys``: id -> sha256."""
    packed = [row[1:] for row in rows]
    tensors: dict[str, np.ndarray] = {}
    for g, (key, members) in enumerate(layout_groups(packed).items()):
        blobs = [packed[i][4] for i in members]
        layout = layout_of(key, blobs)
        ids = [int(rows[i][0]) for i in members]
        tensors[f"{g}.ids"] = np.array(ids, dtype=np.int64)
        tensors[f"{g}.sha"] = _sha_array([keys[i] for i in ids])
        tensors[f"{g}.modules"] = layout.module_ids
        tensors[f"{g}.variants"] = layout.variants
        tensors[f"{g}.counts"] = layout.counts
        width = int(key[3])
        mat = np.frombuffer(b"".join(blobs), dtype=INDEX_DTYPES[width]).reshape(len(blobs), -1)
        starts = np.concatenate(([0], np.cumsum(layout.counts)))
        position = np.uint16 if len(members) < 2**16 else np.uint32
        for j, (mid, code, count) in enumerate(
            zip(layout.module_ids.tolist(), layout.variants.tolist(), layout.counts.tolist(),
                strict=True)
        ):  # fmt: skip
            if code not in (FA, FB) or not count:
                continue
            if mid not in shapes:
                raise corrupt()
            dim = shapes[mid][1] if code == FA else shapes[mid][0]
            flat = np.ascontiguousarray(mat[:, starts[j] : starts[j + 1]]).reshape(-1)
            if int(flat.max()) >= dim:
                raise corrupt()
            # (value, row) packed in one word and sorted: the rows in value order, 4x faster
            # than an argsort of the values
            bits = 16 if position is np.uint16 and dim <= 2**16 else 32
            word = np.dtype(np.uint32 if bits == 16 else np.uint64)
            words = np.left_shift(flat.astype(word), np.array(bits, dtype=word))
            words |= np.floor_divide(np.arange(flat.size, dtype=word), np.array(count, dtype=word))
            words.sort()
            low = np.bitwise_and(words, np.array(2**bits - 1, dtype=word))
            tensors[f"{g}.{j}.rows"] = low.astype(position)
            per_value = np.bincount(flat, minlength=dim)
            tensors[f"{g}.{j}.offsets"] = np.concatenate(([0], np.cumsum(per_value)))
    return tensors


def write(
    path: Path, rows: Rows, shapes: dict[int, tuple[int, int]], keys: dict[int, str], sign: str
) -> None:
    """Build the index of ``rows`` and replace ``path`` with it atomically (``write_atomic``:
    a temp file beside it, fsynced, then renamed)."""
    from safetensors.numpy import save

    data = save(build(rows, shapes, keys), metadata={"format": FORMAT, "signature": sign})
    write_atomic(path, data)


# --- reading -----------------------------------------------------------------------------------

_NP = {"I64": np.int64, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32}


class _Index:
    """An index file mapped into memory; arrays are views of the map (pages read on touch)."""

    def __init__(self, data: np.memmap, header: dict[str, Any]) -> None:
        self.data, self.header = data, header
        self.groups = sorted({int(name.split(".")[0]) for name in header if name[0].isdigit()})

    @classmethod
    def read(cls, path: Path, sign: str) -> _Index | None:
        """The index at ``path`` if it is one for ``sign``; None when missing or unreadable."""
        try:
            with open(path, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                if size > os.fstat(fh.fileno()).st_size - 8:
                    raise ValueError("header longer than the file")
                header = json.loads(fh.read(size))
            meta = header.pop("__metadata__", {})
            if meta.get("format") != FORMAT or meta.get("signature") != sign:
                return None
            data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
            index = cls(data, header)
            for name in header:
                index.array(name)  # every entry in bounds, of a known type
            return index
        except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
            log.info("ignoring the overlap index %s: %s", path, exc)
            return None

    def array(self, name: str) -> np.ndarray:
        entry = self.header[name]
        dtype = np.dtype(_NP[entry["dtype"]])
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if not 0 <= begin <= end <= self.data.size or end - begin != dtype.itemsize * int(
            np.prod(shape)
        ):
            raise ValueError(f"entry {name} out of bounds")
        return self.data[begin:end].view(dtype).reshape(shape)

    def match(self, key_ids: np.ndarray, key_sha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which of the index's rows (in its order) are still on the base with the same
        content, and which of the sorted ``key_ids`` (content ``key_sha``) such a row covers."""
        ids = np.concatenate([self.array(f"{g}.ids") for g in self.groups] or [np.zeros(0, int)])
        shas = [self.array(f"{g}.sha") for g in self.groups]
        sha = np.concatenate(shas) if shas else np.zeros((0, 32), np.uint8)
        at = np.minimum(np.searchsorted(key_ids, ids), max(key_ids.size - 1, 0))
        current = np.zeros(ids.size, dtype=bool)
        if key_ids.size:
            current = (key_ids[at] == ids) & (key_sha[at] == sha).all(axis=1)
        matched = np.zeros(key_ids.size, dtype=bool)
        matched[at[current]] = True
        return current, matched

    def shares(
        self, query: dict[int, QueryModule], shapes: dict[int, tuple[int, int]], current: np.ndarray
    ) -> Part:
        """``shares_against`` for the rows the index holds, from the postings of the query's
        indices; rows not ``current`` (gone from the base, or changed: ``match``) get id -1."""
        ids_parts, groups, totals, at = [], [], [], 0
        for g in self.groups:
            ids = np.array(self.array(f"{g}.ids"))
            ids[~current[at : at + ids.size]] = -1
            module_ids = np.array(self.array(f"{g}.modules"))
            segments = (module_ids, self.array(f"{g}.variants"), self.array(f"{g}.counts"))
            shares = group_shares(query, shapes, segments, ids.size, _Lookup(self, g, ids.size))
            positions = np.arange(at, at + ids.size, dtype=np.int64)
            ids_parts.append(ids)
            groups.append((positions, module_ids, shares))
            totals.append(shares.sum(axis=1))
            at += ids.size
        all_ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
        total = np.concatenate(totals) if totals else np.zeros(0, np.int64)
        return Part(all_ids, RowShares(total, groups))


class _Lookup:
    """``group_shares``'s same-axis term from the postings: per row, how many of the query's
    indices its segment holds = how often the row appears in those indices' lists."""

    def __init__(self, index: _Index, group: int, n_rows: int) -> None:
        self.index, self.group, self.n_rows = index, group, n_rows

    def __call__(self, j: int, q: QueryModule, dim: int) -> np.ndarray:
        offsets = self.index.array(f"{self.group}.{j}.offsets")
        rows = self.index.array(f"{self.group}.{j}.rows")
        wanted = q.indices[q.indices < offsets.size - 1]
        begin, end = offsets[wanted], offsets[wanted + 1]
        lengths = end - begin
        if (lengths < 0).any() or (end > rows.size).any():
            raise ValueError("corrupt overlap index")
        at = np.repeat(begin - (np.cumsum(lengths) - lengths), lengths)
        picked = rows[at + np.arange(at.size)]
        if picked.size and int(picked.max()) >= self.n_rows:
            raise ValueError("corrupt overlap index")
        return np.bincount(picked, minlength=self.n_rows)
