"""Live quality: score a sample of incoming events test-then-learn, as the stream arrives.

The same measure as the offline prequential evaluation (the same scorer, `scoring.score_event`),
on today's traffic: a sampled event is scored (is its item in the user's top-K, excluding what the
user already has?) after every event before it and before itself is learned. The batch is learned
in pieces around the sampled events, which changes nothing else: the learner gives bit-identical
state however a batch is cut.

A cap on the events scored per batch bounds the cost of large batches; each scored event then
stands for `picked / kept` sampled events of its batch (its weight), so backlogs (large batches)
count as much as quiet stretches and the hit rate stays an unbiased estimate of the offline one.
Without the weights the cap over-represented small batches (22-24% off the offline figure on the
MovieLens replay).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

from stream_mf.model import EventBatch
from stream_mf.recommend import add_transitions
from stream_mf.scoring import score_event
from stream_mf.state import ModelState


def sampled(partitions: np.ndarray, offsets: np.ndarray, rate: float) -> np.ndarray:
    """Which events the live eval scores: a hash of (partition, offset) under `rate`, so a replay
    (or an offline run over the same topic) picks the same ones."""
    threshold = np.uint64(int(rate * 1_000_000))
    h = (np.asarray(offsets).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (
        np.asarray(partitions).astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
    )
    return (h >> np.uint64(20)) % np.uint64(1_000_000) < threshold


class LiveEvaluator:
    def __init__(
        self, rate: float = 0.01, k: int = 10, max_per_batch: int = 200, window: int = 2000
    ):
        self.rate = rate
        self.k = k
        self.max_per_batch = max_per_batch
        self.recent: deque[tuple[float, float, float]] = deque(maxlen=window)
        self.scored = 0.0  # weighted (see the module docstring), like hits and ndcg
        self.hits = 0.0
        self.ndcg = 0.0
        self.weight = 1.0  # of the events of the batch last sampled

    def sample(self, batch: EventBatch) -> np.ndarray:
        """Positions to score, chosen by a hash of (partition, offset): replays pick the same.
        Sets `weight`, what each of them stands for when the cap leaves some out."""
        self.weight = 1.0
        if self.rate <= 0 or len(batch) == 0:
            return np.empty(0, np.int64)
        picked = np.flatnonzero(sampled(batch.partitions, batch.offsets, self.rate))
        if picked.size > self.max_per_batch > 0:
            # spread over the whole batch: the first ones only would favour its oldest events
            keep = np.unique(np.linspace(0, picked.size - 1, self.max_per_batch).astype(np.int64))
            self.weight = picked.size / keep.size
            picked = picked[keep]
        elif self.max_per_batch == 0:
            picked = picked[:0]
        return picked

    def score(
        self,
        state: ModelState,
        user_id: str,
        item_id: str,
        seen: Callable[[int], np.ndarray],
    ) -> tuple[bool, float] | None:
        """Score one event against the current state (it counts `weight` times); None when it
        cannot be scored (new user, or an item the user already has)."""
        u = state.users.index.get(user_id)
        if u is None:
            return None
        item = state.items.index.get(item_id, -1)
        mine = seen(u)
        if item >= 0 and np.any(mine == item):
            return None
        items = state.items
        n = items.n
        scores = items.factors[:n] @ state.users.factors[u] + items.bias[:n]
        add_transitions(scores, state, u)  # the query's scoring rule (`recommend.recommend`)
        hit, gain = score_event(scores, item, mine, self.k)
        w = self.weight
        self.scored += w
        self.hits += w * hit
        self.ndcg += w * gain
        self.recent.append((w * hit, w * gain, w))
        return hit, gain

    def window(self) -> tuple[float, float]:
        """HR@K and NDCG@K over the most recent scored events (weighted)."""
        if not self.recent:
            return 0.0, 0.0
        arr = np.asarray(self.recent)
        total = arr[:, 2].sum()
        return float(arr[:, 0].sum() / total), float(arr[:, 1].sum() / total)
