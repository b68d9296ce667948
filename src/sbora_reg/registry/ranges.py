"""Index sets as compact range strings: ``[3, 4, 5, 6, 7, 12, 40, 41]`` <-> ``"3-7,12,40-41"``.

The registry shows and stores the rows/columns an adapter touches in this form; a rank-32 index
set drawn at random is 32 numbers, an allocated or contiguous one is a single range. The empty set
is the empty string. Parsing is strict: indices are non-negative integers, ranges ascend, and a
set never lists an index twice (SBoRA indices are distinct by definition).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from sbora_reg.errors import InvalidIndicesError


def format_ranges(indices: Iterable[int] | np.ndarray) -> str:
    """Compress distinct non-negative integers (any order) to ``"a-b,c,..."``, ascending."""
    arr = np.unique(np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices))
    if arr.size == 0:
        return ""
    if not np.issubdtype(arr.dtype, np.integer):
        raise InvalidIndicesError(f"indices must be integers, got dtype {arr.dtype}")
    if arr[0] < 0:
        raise InvalidIndicesError(f"indices must be non-negative, got {int(arr[0])}")
    # A run ends where the next value is not the successor: (n_runs,) start and end positions.
    breaks = np.flatnonzero(np.diff(arr) != 1)
    starts = np.concatenate(([0], breaks + 1))
    ends = np.concatenate((breaks, [arr.size - 1]))
    parts = []
    for s, e in zip(arr[starts].tolist(), arr[ends].tolist(), strict=True):
        parts.append(str(s) if s == e else f"{s}-{e}")
    return ",".join(parts)


def parse_ranges(text: str, *, size: int | None = None) -> np.ndarray:
    """Parse ``"3-7,12"`` into a sorted int64 array; ``size`` bounds every index (< size).

    Raises ``InvalidIndicesError`` on malformed parts, descending ranges, repeated indices or
    indices out of ``[0, size)``.
    """
    text = text.strip()
    if not text:
        return np.zeros(0, dtype=np.int64)
    chunks: list[np.ndarray] = []
    for part in text.split(","):
        part = part.strip()
        lo_text, sep, hi_text = part.partition("-")
        try:
            lo = int(lo_text)
            hi = int(hi_text) if sep else lo
        except ValueError:
            raise InvalidIndicesError(
                f"bad index range {part!r} in {text!r}: write ranges like '3-7,12'"
            ) from None
        if lo < 0 or hi < lo:
            raise InvalidIndicesError(f"bad index range {part!r}: expected 0 <= start <= end")
        chunks.append(np.arange(lo, hi + 1, dtype=np.int64))
    out = np.concatenate(chunks)
    out.sort()
    if out.size > 1 and bool(np.any(out[1:] == out[:-1])):
        dup = int(out[1:][out[1:] == out[:-1]][0])
        raise InvalidIndicesError(f"index {dup} is listed twice in {text!r}")
    if size is not None and out.size and out[-1] >= size:
        raise InvalidIndicesError(f"index {int(out[-1])} is out of range for a dimension of {size}")
    return out
