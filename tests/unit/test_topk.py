from __future__ import annotations

import numpy as np

from stream_mf.scoring import score_event
from stream_mf.topk import hits_at_k, top_k, top_k_reference


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


def test_hits_at_k_is_score_event_over_rows() -> None:
    """Counted hits equal `score_event`'s top-K lookup, event by event: ties at the K-th
    place, NaN and inf scores, a seen target, seen items repeated or past the row's end, rows
    shared by events with different seen items."""
    rng = np.random.default_rng(1)
    for _ in range(200):
        b, n, k = int(rng.integers(1, 6)), int(rng.integers(1, 60)), int(rng.integers(1, 12))
        s = rng.integers(0, 8, (b, n)).astype(np.float32)
        s[rng.random((b, n)) < 0.1] = np.nan
        s[rng.random((b, n)) < 0.05] = np.inf
        targets = rng.integers(-1, n + 1, b)
        seen = [rng.integers(0, n + 3, int(rng.integers(0, 6))) for _ in range(b)]
        ptr = np.concatenate([[0], np.cumsum([x.size for x in seen])]).astype(np.int64)
        flat = np.concatenate(seen).astype(np.int64)
        rows = rng.integers(0, b, b)  # events may share a row, each with its own seen items
        want = sum(
            score_event(s[rows[e]].copy(), int(targets[e]), seen[e], k).hit for e in range(b)
        )
        kept = s.copy()
        assert hits_at_k(s, rows, targets.astype(np.int64), ptr, flat, k) == want
        assert np.array_equal(s, kept, equal_nan=True)
