"""Test-then-learn scoring of one event: the one HR@K and NDCG@K definition.

The offline prequential evaluation (`evaluate.py`), live evaluation (`live_eval.py`) and the
rebuild guard (`rebuild.py`) all ask the same question before a model learns an event: is the
event's item in the user's top-K among all items, the user's seen items excluded, and at which
rank? Answering it in one place keeps their figures comparable.

A non-finite score never ranks (`topk.top_k` skips it), so a diverged model scores misses rather
than looking good. An item the model does not know yet (-1, or past the end of `scores`) is a
miss. Callers skip an event whose item the user has already seen: excluding seen items would make
it a certain miss.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from stream_mf.topk import top_k


class EventScore(NamedTuple):
    hit: bool  # the item is in the top-K
    ndcg: float  # 1 / log2(rank + 2) for a hit at 0-based `rank`, else 0


def top_unseen(scores: np.ndarray, seen: np.ndarray, k: int) -> np.ndarray:
    """The top-k item indices with `seen` excluded. Overwrites `scores` at `seen` (callers pass
    a fresh score vector); seen indices past its end (items the model has not sized for) are
    ignored."""
    seen = np.asarray(seen)
    scores[seen[(seen >= 0) & (seen < scores.shape[0])]] = -np.inf
    return top_k(scores, k)[0]


def ndcg_of(rank: int) -> float:
    """NDCG@K of the one relevant item at 0-based `rank` of the top-K."""
    return float(1.0 / np.log2(rank + 2.0))


def event_rank(scores: np.ndarray, item: int, seen: np.ndarray, k: int = 10) -> int:
    """`item`'s 0-based rank in the top-k of `scores` with `seen` excluded, -1 if not there
    (overwrites `scores` at `seen`, as `top_unseen`)."""
    recs = top_unseen(scores, seen, k)
    if item < 0:
        return -1
    where = np.flatnonzero(recs == item)
    return int(where[0]) if where.size else -1


def score_event(scores: np.ndarray, item: int, seen: np.ndarray, k: int = 10) -> EventScore:
    """Rank `item` among `scores` (one per item, for one user) with `seen` excluded.

    >>> score_event(np.array([0.1, 0.9, 0.5, np.nan]), 2, np.array([1]), k=2)
    EventScore(hit=True, ndcg=1.0)
    >>> score_event(np.array([0.1, 0.9, 0.5, np.nan]), 3, np.array([1]), k=3).hit
    False
    """
    rank = event_rank(scores, item, seen, k)
    return EventScore(False, 0.0) if rank < 0 else EventScore(True, ndcg_of(rank))
