"""The hot path's unique helpers equal numpy's."""

from __future__ import annotations

import numpy as np
import pytest

from stream_mf.arrays import unique_rows, unique_sorted


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("size", [0, 1, 7, 10_000])
def test_unique_sorted_equals_numpy(dtype: type, size: int) -> None:
    a: np.ndarray = np.random.default_rng(size).integers(0, 1 << 20, size).astype(dtype)
    got = unique_sorted(a)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, np.unique(a))


def test_unique_rows_equals_numpy() -> None:
    a = np.random.default_rng(1).integers(0, 500, 2000).astype(np.int32)
    got = unique_rows(a, 500)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.unique(a))
    assert unique_rows(np.empty(0, np.int32), 0).size == 0
