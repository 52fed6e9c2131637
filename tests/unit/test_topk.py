from __future__ import annotations

import numpy as np

from stream_mf.topk import top_k, top_k_reference


def test_top_k_matches_reference_with_ties_and_nans() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(0, 80))
        s = rng.integers(0, 15, n).astype(np.float32)
        s[rng.random(n) < 0.15] = np.nan
        s[rng.random(n) < 0.05] = np.inf
        k = int(rng.integers(1, 20))
        got, ref = top_k(s, k), top_k_reference(s, k)
        assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])


def test_top_k_all_nan_is_empty() -> None:
    idx, sc = top_k(np.full(10, np.nan, dtype=np.float32), 5)
    assert idx.size == 0 and sc.size == 0
