"""Range strings round-trip any index set and reject malformed text."""

from __future__ import annotations

import numpy as np
import pytest

from sbora_reg.errors import InvalidIndicesError
from sbora_reg.registry.ranges import format_ranges, parse_ranges


@pytest.mark.parametrize(
    ("indices", "text"),
    [
        ([], ""),
        ([5], "5"),
        ([3, 4, 5, 6, 7, 12, 40, 41], "3-7,12,40-41"),
        ([41, 3, 12, 40, 7, 5, 6, 4], "3-7,12,40-41"),
        ([0, 2, 4], "0,2,4"),
    ],
)
def test_format_known_sets(indices: list[int], text: str) -> None:
    assert format_ranges(indices) == text
    assert format_ranges(np.asarray(indices, dtype=np.int64)) == text


def test_round_trip_random_sets() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 500))
        k = int(rng.integers(0, n + 1))
        idx = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
        back = parse_ranges(format_ranges(idx), size=n)
        assert back.dtype == np.int64
        np.testing.assert_array_equal(back, idx)


def test_parse_tolerates_spaces_and_order() -> None:
    np.testing.assert_array_equal(parse_ranges(" 12, 3-5 "), [3, 4, 5, 12])


@pytest.mark.parametrize("text", ["a", "3-", "-3", "5-3", "1,,2", "1-2-3", "2.5"])
def test_parse_rejects_malformed(text: str) -> None:
    with pytest.raises(InvalidIndicesError):
        parse_ranges(text)


def test_parse_rejects_repeats_and_out_of_range() -> None:
    with pytest.raises(InvalidIndicesError, match="twice"):
        parse_ranges("1-4,3")
    with pytest.raises(InvalidIndicesError, match="out of range"):
        parse_ranges("0-8", size=8)
    np.testing.assert_array_equal(parse_ranges("0-7", size=8), np.arange(8))


def test_format_rejects_negative_and_float() -> None:
    with pytest.raises(InvalidIndicesError):
        format_ranges([-1, 2])
    with pytest.raises(InvalidIndicesError):
        format_ranges(np.array([0.5]))
