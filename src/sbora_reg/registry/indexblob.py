"""Compact, exact storage of an index set: sorted little-endian uint16 or uint32 bytes.

``uint16`` is used when every index is below 65536 (every hidden size in use today), else
``uint32``; the width is recoverable from the byte length and the count, so no tag is stored.
"""

from __future__ import annotations

import numpy as np

from sbora_reg.errors import InvalidIndicesError

_U16 = np.dtype("<u2")
_U32 = np.dtype("<u4")


def encode(indices: np.ndarray) -> bytes:
    """Sorted, distinct, non-negative indices (any int dtype) -> bytes."""
    arr = np.asarray(indices, dtype=np.int64)
    if arr.ndim != 1:
        raise InvalidIndicesError(f"indices must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return b""
    arr = np.sort(arr)
    if arr[0] < 0 or arr[-1] >= 2**32:
        raise InvalidIndicesError(f"indices out of range [0, 2^32): {arr[0]}..{arr[-1]}")
    if (arr[1:] == arr[:-1]).any():
        raise InvalidIndicesError("indices contain duplicates")
    dtype = _U16 if arr[-1] < 2**16 else _U32
    return arr.astype(dtype).tobytes()


def decode(data: bytes, count: int) -> np.ndarray:
    """Bytes from :func:`encode` and the number of indices -> sorted int64 array."""
    if count == 0:
        return np.empty(0, dtype=np.int64)
    width = len(data) // count
    if width not in (2, 4) or width * count != len(data):
        raise InvalidIndicesError(f"corrupt index blob: {len(data)} bytes for {count} indices")
    return np.frombuffer(data, dtype=_U16 if width == 2 else _U32).astype(np.int64)
