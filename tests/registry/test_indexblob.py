"""Index blobs: exact round trip, compact width, refusal of bad sets."""

from __future__ import annotations

import numpy as np
import pytest

from sbora_reg.errors import InvalidIndicesError
from sbora_reg.registry import indexblob


@pytest.mark.parametrize(
    ("indices", "width"),
    [([0, 5, 65535], 2), ([3, 65536], 4), ([7, 2, 4_000_000_000], 4), ([11], 2)],
)
def test_round_trip_and_width(indices: list[int], width: int) -> None:
    data = indexblob.encode(np.array(indices))
    assert len(data) == width * len(indices)
    back = indexblob.decode(data, len(indices))
    assert back.dtype == np.int64
    np.testing.assert_array_equal(back, np.sort(np.array(indices, dtype=np.int64)))


def test_empty() -> None:
    assert indexblob.encode(np.array([], dtype=np.int64)) == b""
    assert indexblob.decode(b"", 0).size == 0


@pytest.mark.parametrize("indices", [[1, 1], [-1, 2], [2**32]])
def test_bad_sets(indices: list[int]) -> None:
    with pytest.raises(InvalidIndicesError):
        indexblob.encode(np.array(indices, dtype=np.int64))


def test_corrupt_blob() -> None:
    with pytest.raises(InvalidIndicesError):
        indexblob.decode(b"\x00\x01\x02", 2)
