"""Past the per-batch cap, each scored event stands for the sampled ones left out."""

from __future__ import annotations

import numpy as np

from stream_mf.live_eval import LiveEvaluator, sampled
from stream_mf.model import EventBatch


def _batch(n: int, first: int = 0) -> EventBatch:
    ids = [f"u{j}" for j in range(n)]
    return EventBatch.build(ids, ids, np.ones(n), np.zeros(n), first_offset=first)


def test_sample_is_the_hash_pick_and_the_weight_what_the_cap_left_out() -> None:
    b = _batch(20_000)
    picked = np.flatnonzero(sampled(b.partitions, b.offsets, 0.1))
    uncapped = LiveEvaluator(rate=0.1, max_per_batch=100_000)
    np.testing.assert_array_equal(uncapped.sample(b), picked)
    assert uncapped.weight == 1.0
    capped = LiveEvaluator(rate=0.1, max_per_batch=100)
    kept = capped.sample(b)
    assert kept.size == 100 and np.isin(kept, picked).all()
    assert capped.weight == picked.size / 100
    # spread over the batch, not its first events
    assert kept[0] == picked[0] and kept[-1] == picked[-1]
    capped.sample(_batch(10))
    assert capped.weight == 1.0  # set per batch
    assert LiveEvaluator(rate=0.1, max_per_batch=0).sample(b).size == 0


def test_window_weights_each_scored_event() -> None:
    ev = LiveEvaluator(rate=0.1, max_per_batch=10)
    ev.recent.extend([(1.0, 1.0, 1.0), (0.0, 0.0, 3.0)])  # a hit alone, then a miss for three
    hr, ndcg = ev.window()
    assert hr == 0.25 and ndcg == 0.25
