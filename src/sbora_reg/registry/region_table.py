"""Overlap of thousands of adapters at once: their regions packed into flat numpy arrays.

A ``RegionTable`` holds every (adapter, module) region of one base as a *segment*, sorted by
(module, variant, adapter), so that ``one_vs_many`` (a bitmap gather) and
``all_pairs`` (pairs of entries sharing an index) run without Python loops over adapters or
modules. The numbers are those of ``overlap.compare`` pair by pair (tested against it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from sbora_reg.errors import FingerprintMismatchError, ShapeMismatchError
from sbora_reg.registry.overlap import Footprint, variant_code
from sbora_reg.sbora.cells import FA, FB, LORA, touched


@dataclass
class RegionTable:
    """Regions of many adapters on one base packed into flat arrays.

    Each (adapter, module) pair is a *segment*; its indices are stored as given (``local``:
    columns for FA, rows for FB, any integer dtype) and, on demand, as global keys in one index
    space per (module, axis): rows of module m at ``row_offset[m] + r``, columns at
    ``col_offset[m] + c``. Same-variant overlap is then equality of keys.
    """

    base: str
    names: list[str]
    modules: list[str]
    out: np.ndarray  # (M,) int64
    inn: np.ndarray  # (M,) int64
    seg_adapter: np.ndarray  # (S,) int64
    seg_module: np.ndarray  # (S,) int64, segments sorted by (module, variant, adapter)
    seg_variant: np.ndarray  # (S,) int8
    seg_count: np.ndarray  # (S,) int64, number of indices
    local: np.ndarray  # (E,) int, E = seg_count.sum(), segments in order, within module axis
    seg_start: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))  # (S+1,)
    # (3M+1,): segments of module m and variant v are block_start[3m+v] : block_start[3m+v+1]
    block_start: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    _keys: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def row_offset(self) -> np.ndarray:
        return np.concatenate(([0], np.cumsum(self.out + self.inn)[:-1])).astype(np.int64)

    @property
    def col_offset(self) -> np.ndarray:
        return self.row_offset + self.out

    @property
    def space_size(self) -> int:
        return int((self.out + self.inn).sum())

    @classmethod
    def from_footprints(cls, footprints: Sequence[Footprint]) -> RegionTable:
        """Pack adapters of one base (``FingerprintMismatchError`` on a mixed list)."""
        bases = {fp.base for fp in footprints}
        if len(bases) > 1:
            raise FingerprintMismatchError("a region table holds adapters of one base model only")
        shapes: dict[str, tuple[int, int]] = {}
        for fp in footprints:
            for module, region in fp.regions.items():
                shape = (int(region.shape[0]), int(region.shape[1]))
                if shapes.setdefault(module, shape) != shape:
                    raise ShapeMismatchError(f"{module} has shapes {shapes[module]} and {shape}")
        modules = sorted(shapes)
        mid = {m: i for i, m in enumerate(modules)}
        out = np.array([shapes[m][0] for m in modules], dtype=np.int64)
        inn = np.array([shapes[m][1] for m in modules], dtype=np.int64)
        seg_a, seg_m, seg_v, idx_parts = [], [], [], []
        for a, fp in enumerate(footprints):
            for module, region in fp.regions.items():
                seg_a.append(a)
                seg_m.append(mid[module])
                code = variant_code(region)
                seg_v.append(code)
                # A LoRA touches every cell; its index list (if any) is not a key set.
                idx = region.indices if code != LORA else ()
                idx_parts.append(np.asarray(idx, dtype=np.int64))
        return cls.from_arrays(
            base=bases.pop() if bases else "",
            names=[fp.name for fp in footprints],
            modules=modules,
            out=out,
            inn=inn,
            seg_adapter=np.asarray(seg_a, dtype=np.int64),
            seg_module=np.asarray(seg_m, dtype=np.int64),
            seg_variant=np.asarray(seg_v, dtype=np.int8),
            indices=idx_parts,
        )

    @classmethod
    def from_arrays(
        cls,
        *,
        base: str,
        names: list[str],
        modules: list[str],
        out: np.ndarray,
        inn: np.ndarray,
        seg_adapter: np.ndarray,
        seg_module: np.ndarray,
        seg_variant: np.ndarray,
        indices: Sequence[np.ndarray] | tuple[np.ndarray, np.ndarray],
    ) -> RegionTable:
        """Pack segments; ``indices`` is one array per segment or ``(flat, counts)``.

        Segments are sorted by (module, variant, adapter) so that one module's same-variant keys
        are contiguous; LoRA segments carry no indices.
        """
        if isinstance(indices, tuple):  # any integer dtype: uint16 stays uint16 until keyed
            flat, counts = np.asarray(indices[0]), np.asarray(indices[1], dtype=np.int64)
            if flat.dtype.kind not in "iu":
                flat = flat.astype(np.int64)
        else:
            counts = np.array([len(x) for x in indices], dtype=np.int64)
            flat = np.concatenate(list(indices)) if len(indices) else np.zeros(0, np.int64)
            flat = flat.astype(np.int64, copy=False)
        seg_adapter = np.asarray(seg_adapter, dtype=np.int64)
        seg_module = np.asarray(seg_module, dtype=np.int64)
        seg_variant = np.asarray(seg_variant, dtype=np.int8)
        if np.any(counts[seg_variant == LORA]):  # LoRA rows listed as indices: drop them
            keep = np.repeat(seg_variant != LORA, counts)
            flat, counts = flat[keep], np.where(seg_variant == LORA, 0, counts)
        block = seg_module * 3 + seg_variant
        order = _block_order(block, seg_adapter)
        if np.any(order != np.arange(order.size)):
            if counts.size and np.all(counts == counts[0]):  # one rank throughout: move rows
                flat = _take_rows(flat.reshape(counts.size, -1), order).reshape(-1)
            else:  # move each segment's run of indices to its new place, in one gather
                old_start = np.concatenate(([0], np.cumsum(counts)[:-1]))[order]
                new_start = np.concatenate(([0], np.cumsum(counts[order])[:-1]))
                flat = flat[np.repeat(old_start - new_start, counts[order]) + np.arange(flat.size)]
            counts = counts[order]
            seg_adapter, seg_module = seg_adapter[order], seg_module[order]
            seg_variant, block = seg_variant[order], block[order]
        out, inn = np.asarray(out, dtype=np.int64), np.asarray(inn, dtype=np.int64)
        table = cls(
            base=base,
            names=list(names),
            modules=list(modules),
            out=out,
            inn=inn,
            seg_adapter=seg_adapter,
            seg_module=seg_module,
            seg_variant=seg_variant,
            seg_count=counts,
            local=flat,
            seg_start=np.concatenate(([0], np.cumsum(counts))).astype(np.int64),
            block_start=np.searchsorted(block, np.arange(3 * len(modules) + 1)).astype(np.int64),
        )
        _check_bounds(table)
        return table

    @property
    def keys(self) -> np.ndarray:
        """(E,) int32/int64 global keys of ``local`` (computed once, on first use)."""
        if self._keys is None:
            self._keys = _keys(self)
        return self._keys

    def index_of(self, name: str) -> int:
        return self.names.index(name)

    def _seg_cells(self) -> np.ndarray:
        o, i = self.out[self.seg_module], self.inn[self.seg_module]
        return touched(self.seg_variant, o, i, self.seg_count)


def _blocks(table: RegionTable) -> Iterator[tuple[int, int, int, int]]:
    """(module, variant code, first entry, end entry) of every non-empty FA or FB block."""
    for block in np.flatnonzero(np.diff(table.block_start)).tolist():
        m, code = divmod(block, 3)
        if code != LORA:
            s0, s1 = table.block_start[block], table.block_start[block + 1]
            yield m, code, int(table.seg_start[s0]), int(table.seg_start[s1])


def _check_bounds(table: RegionTable) -> None:
    """``ShapeMismatchError`` unless every index lies within its module's axis."""
    signed = table.local.dtype.kind == "i"
    for m, code, e0, e1 in _blocks(table):
        part = table.local[e0:e1]
        dim = table.inn[m] if code == FA else table.out[m]
        if part.size and ((signed and part.min() < 0) or part.max() >= dim):
            raise ShapeMismatchError(f"a region index is out of range for {table.modules[m]}")


def _keys(table: RegionTable) -> np.ndarray:
    """Global keys of ``table.local``: FA keys in the module's column space, FB in its rows.

    int32 halves the memory traffic of the gathers whenever the key space allows it.
    """
    dtype = np.dtype(np.int32 if table.space_size < 2**31 else np.int64)
    keys = np.empty(table.local.size, dtype=dtype)
    row_off, col_off = table.row_offset, table.col_offset
    for m, code, e0, e1 in _blocks(table):
        offset = col_off[m] if code == FA else row_off[m]
        np.add(table.local[e0:e1], offset, out=keys[e0:e1], dtype=dtype, casting="unsafe")
    return keys


def _take_rows(rows: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``rows[order]`` for a C-contiguous (S, r) array, moving each row as few wide words."""
    nbytes = rows.shape[1] * rows.itemsize
    word = next(w for w in (8, 4, 2, 1) if nbytes % w == 0)
    words = np.ascontiguousarray(rows).view(f"<u{word}")  # (S, nbytes // word)
    return np.take(words, order, axis=0).view(rows.dtype)


def _block_order(block: np.ndarray, seg_adapter: np.ndarray) -> np.ndarray:
    """Permutation sorting segments by (block, adapter).

    Segments usually arrive adapter by adapter; then a stable sort on the block alone is enough,
    and on 16-bit keys numpy's stable sort is a radix sort (linear time).
    """
    step = np.diff(block)
    if (step >= 0).all() and (np.diff(seg_adapter)[step == 0] > 0).all():
        return np.arange(block.size)  # already in order (e.g. decoded module by module)
    if seg_adapter.size and (np.diff(seg_adapter) >= 0).all():
        small = block.size == 0 or int(block.max()) < 2**16
        return np.argsort(block.astype(np.uint16) if small else block, kind="stable")
    return np.lexsort((seg_adapter, block))


@dataclass(frozen=True)
class ManyOverlap:
    """Shared cells of one adapter with each adapter of a table (``totals[j]`` for ``names[j]``)."""

    query: str
    names: list[str]
    totals: np.ndarray  # (N,) int64
    comparable: bool
    reason: str = ""

    def overlapping(self) -> list[tuple[str, int]]:
        """``(name, shared cells)`` of the adapters that share any weight, most shared first."""
        hit = np.flatnonzero(self.totals > 0)
        hit = hit[np.argsort(-self.totals[hit], kind="stable")]
        return [(self.names[j], int(self.totals[j])) for j in hit if self.names[j] != self.query]


def _query_arrays(query: Footprint, table: RegionTable) -> tuple[np.ndarray, ...]:
    """Per module of the table: query variant code (-1 none), index count, cells; and bitmap."""
    mid = {m: i for i, m in enumerate(table.modules)}
    qv = np.full(len(table.modules), -1, dtype=np.int8)
    qc = np.zeros(len(table.modules), dtype=np.int64)
    bitmap = np.zeros(table.space_size, dtype=bool)
    row_off, col_off = table.row_offset, table.col_offset
    for module, region in query.regions.items():
        m = mid.get(module)
        if m is None:  # nobody in the table touches it
            continue
        if (table.out[m], table.inn[m]) != tuple(region.shape):
            raise ShapeMismatchError(f"{module} has shape {region.shape} in {query.name}")
        qv[m] = variant_code(region)
        qc[m] = len(region.indices)
        if qv[m] != LORA:
            offset = col_off[m] if qv[m] == FA else row_off[m]
            bitmap[offset + np.asarray(region.indices, dtype=np.int64)] = True
    qcells = np.where(qv >= 0, touched(qv, table.out, table.inn, qc), 0)
    return qv, qc, qcells, bitmap


def one_vs_many(query: Footprint, table: RegionTable) -> ManyOverlap:
    """Shared cells of ``query`` with every adapter in ``table``, vectorised over all of them.

    One bitmap of the query's keys, a gather of the same-variant keys of each module it touches,
    segmented sums, then the cross-variant and LoRA terms from per-segment counts.
    """
    n = len(table.names)
    if query.base != table.base:
        reason = "different base models: never compared"
        return ManyOverlap(query.name, table.names, np.zeros(n, np.int64), False, reason)
    shared = _segment_shares(query, table)
    totals = np.bincount(table.seg_adapter, weights=shared, minlength=n)
    return ManyOverlap(query.name, table.names, np.rint(totals).astype(np.int64), True)


def _segment_shares(query: Footprint, table: RegionTable) -> np.ndarray:
    """(S,) int64 cells each segment of ``table`` shares with ``query`` (same base assumed)."""
    qv_m, qc_m, qcells_m, bitmap = _query_arrays(query, table)
    # Per module the query touches, each (module, variant) block of segments is one contiguous
    # slice, so every term below is a slice operation; nothing runs over all segments but the sum.
    shared = np.zeros(len(table.seg_count), dtype=np.int64)
    bs, ss = table.block_start, table.seg_start
    for m in np.flatnonzero(qv_m >= 0).tolist():
        q = int(qv_m[m])
        out, inn = int(table.out[m]), int(table.inn[m])
        if q == LORA:  # every cell: the other's cells on this module, whatever its variant
            s0, s1 = int(bs[3 * m]), int(bs[3 * m + 3])
            shared[s0:s1] = _block_cells(table, s0, s1, out, inn)
            continue
        same0, same1 = int(bs[3 * m + q]), int(bs[3 * m + q + 1])
        if same0 < same1:  # FA/FA: out * |C1 & C2|; FB/FB: |R1 & R2| * in
            e0, e1 = int(ss[same0]), int(ss[same1])
            offset = int(table.col_offset[m] if q == FA else table.row_offset[m])
            query_axis = bitmap[offset : offset + (inn if q == FA else out)]  # (dim,) view
            hits = query_axis[table.local[e0:e1]]  # (entries,) does this entry hit the query
            inter = np.zeros(same1 - same0, dtype=np.int64)
            nonempty = np.flatnonzero(table.seg_count[same0:same1] > 0)
            if nonempty.size:
                starts = ss[same0:same1][nonempty] - e0
                inter[nonempty] = np.add.reduceat(hits, starts, dtype=np.int64)
            shared[same0:same1] = inter * (out if q == FA else inn)
        other = FB if q == FA else FA
        x0, x1 = int(bs[3 * m + other]), int(bs[3 * m + other + 1])
        shared[x0:x1] = int(qc_m[m]) * table.seg_count[x0:x1]  # FA x FB: |R| * |C|
        l0, l1 = int(bs[3 * m + LORA]), int(bs[3 * m + LORA + 1])
        shared[l0:l1] = int(qcells_m[m])  # vs LoRA: the query's cells
    return shared


def _block_cells(table: RegionTable, s0: int, s1: int, out: int, inn: int) -> np.ndarray:
    """Cells each segment ``s0:s1`` (all of one module) touches."""
    return touched(table.seg_variant[s0:s1], out, inn, table.seg_count[s0:s1])


def _same_axis_pairs(
    table: RegionTable, chunk: int = 4_000_000, dense_group: int = 48, dense_block: int = 4096
) -> np.ndarray:
    """(N, N) shared cells from FA/FA and FB/FB: every two entries with one key share w cells.

    Block by block (one module, one variant: a contiguous run of entries whose keys are local
    indices, so a 16-bit radix sort groups them), entries sharing an index are expanded into
    their pairs; a shared column weighs ``out`` cells, a shared row ``in``. Pair codes of blocks
    with one weight are counted together (one ``bincount`` per weight and ``chunk`` pairs).
    Indices held by more than ``dense_group`` adapters (many adapters trained with one default
    seed) go through one float64 product ``X X^T`` per ``dense_block`` of them instead, which
    costs the same whatever the group size.
    """
    n = len(table.names)
    acc = np.zeros(n * n, dtype=np.float64)
    pending: dict[int, list[np.ndarray]] = {}  # key weight -> pair codes not yet counted

    def flush(weight: int) -> None:
        codes = np.concatenate(pending.pop(weight))
        acc[:] += weight * np.bincount(codes, minlength=n * n)

    for m, code, e0, e1 in _blocks(table):
        s0, s1 = int(table.block_start[3 * m + code]), int(table.block_start[3 * m + code + 1])
        if s1 - s0 < 2:
            continue
        dim = int(table.inn[m] if code == FA else table.out[m])
        weight = int(table.out[m] if code == FA else table.inn[m])
        local = table.local[e0:e1]
        order = np.argsort(local.astype(np.uint16) if dim <= 2**16 else local, kind="stable")
        keys = local[order]
        owner = np.repeat(table.seg_adapter[s0:s1], table.seg_count[s0:s1])[order]
        new_group = np.concatenate(([True], keys[1:] != keys[:-1]))
        group_first = np.flatnonzero(new_group)
        group_size = np.diff(np.append(group_first, keys.size))
        if group_size.max() < 2:
            continue
        group_id = np.cumsum(new_group) - 1
        big = group_size > dense_group
        if big.any():
            _dense_groups(acc, n, owner, weight, group_id, np.flatnonzero(big), dense_block)
        # each entry pairs with the later entries of its group (none in a dense group)
        end = (group_first + group_size)[group_id]
        later = np.where(big[group_id], 0, end - np.arange(keys.size) - 1)
        pos = np.flatnonzero(later)
        cnt = later[pos]
        first = np.repeat(pos, cnt)
        step = np.arange(first.size) - np.repeat(np.cumsum(cnt) - cnt, cnt) + 1
        pending.setdefault(weight, []).append(owner[first] * n + owner[first + step])
        if sum(codes.size for codes in pending[weight]) >= chunk:
            flush(weight)
    for weight in list(pending):
        flush(weight)
    same = acc.reshape(n, n)
    return same + same.T


def _dense_groups(
    acc: np.ndarray,
    n: int,
    owner: np.ndarray,
    weight: int,
    group_id: np.ndarray,
    big_groups: np.ndarray,
    block: int = 4096,
) -> None:
    """Add ``weight`` x the upper-triangle pair counts of one block's big key groups into
    ``acc`` (N*N, flat)."""
    column = np.full(int(group_id[-1]) + 1, -1, dtype=np.int64)
    for lo in range(0, big_groups.size, block):
        groups = big_groups[lo : lo + block]
        column[groups] = np.arange(groups.size)
        sel = np.flatnonzero(column[group_id] >= 0)
        x = np.zeros((n, groups.size))  # (N, keys in block): adapter holds key
        x[owner[sel], column[group_id[sel]]] = 1.0
        product = x @ x.T  # (N, N) symmetric, diagonal = own keys
        acc += weight * np.triu(product, k=1).reshape(-1)
        column[groups] = -1


def all_pairs(table: RegionTable) -> np.ndarray:
    """(N, N) int64 matrix of shared cells between every two adapters (diagonal 0).

    Memory is O(N^2) for the result; same-axis shares come from pairs of entries with one key,
    cross-variant and LoRA shares from (N, M) count matrices.
    """
    n, n_mod = len(table.names), len(table.modules)
    count = {code: np.zeros((n, n_mod)) for code in (FA, FB)}
    for code, mat in count.items():
        sel = table.seg_variant == code
        mat[table.seg_adapter[sel], table.seg_module[sel]] = table.seg_count[sel]
    cross = count[FA] @ count[FB].T  # our |C| x their |R|
    total = _same_axis_pairs(table) + cross + cross.T
    sel = table.seg_variant == LORA
    if sel.any():  # a LoRA shares the other's every cell on its modules
        cells = np.zeros((n, n_mod))
        cells[table.seg_adapter, table.seg_module] = table._seg_cells()
        is_lora = np.zeros((n, n_mod))
        is_lora[table.seg_adapter[sel], table.seg_module[sel]] = 1
        full = (table.out * table.inn).astype(np.float64)
        total += is_lora @ cells.T + cells @ is_lora.T - (is_lora * full) @ is_lora.T
    np.fill_diagonal(total, 0)
    return np.rint(total).astype(np.int64)
