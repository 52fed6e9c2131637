"""The one test-then-learn scorer that evaluate, live evaluation and the rebuild guard share."""

from __future__ import annotations

import numpy as np
import pytest

from stream_mf.scoring import EventScore, score_event, top_unseen

SCORES = np.array([0.5, 0.9, 0.1, 0.7, 0.3])  # ranking: 1, 3, 0, 4, 2


@pytest.mark.parametrize(("item", "rank"), [(1, 0), (3, 1), (0, 2)])
def test_hit_and_ndcg_by_rank(item: int, rank: int) -> None:
    got = score_event(SCORES.copy(), item, np.empty(0, np.int64), k=3)
    assert got == EventScore(True, 1.0 / np.log2(rank + 2.0))


def test_seen_items_are_excluded_and_out_of_range_ones_ignored() -> None:
    # 1 and 3 seen (and 99, an item this model has no score for): 0 rises to the top
    assert score_event(SCORES.copy(), 0, np.array([1, 3, 99]), k=1) == EventScore(True, 1.0)
    assert not score_event(SCORES.copy(), 4, np.array([1, 3]), k=1).hit
    assert list(top_unseen(SCORES.copy(), np.array([1, 3, 99]), 2)) == [0, 4]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_are_misses(bad: float) -> None:
    scores = SCORES.copy()
    scores[2] = bad
    assert score_event(scores, 2, np.empty(0, np.int64), k=5) == EventScore(False, 0.0)
    all_nan = np.full(5, np.nan)
    assert score_event(all_nan, 1, np.empty(0, np.int64), k=5) == EventScore(False, 0.0)


@pytest.mark.parametrize("item", [-1, 5, 1000])
def test_items_the_model_does_not_know_are_misses(item: int) -> None:
    assert score_event(SCORES.copy(), item, np.empty(0, np.int64), k=5) == EventScore(False, 0.0)
