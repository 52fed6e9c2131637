"""Tastes that change mid-stream: the online model must follow them within a few thousand events.

The heavy version, every model and three seeds, is `bench/bench_drift.py`
(docs/quality-ablation.md). Here: 100 users in 4 planted groups, 5,000 events, then every user
moves to another group for 5,000 more; prequential HR@10 (seen items excluded) of the default
online model over a rolling window of 300 scored events.
"""

from __future__ import annotations

import numpy as np
import pytest

from stream_mf.config import ModelConfig
from stream_mf.datasets import EventColumns
from stream_mf.evaluate import make_learner, prequential
from tests.synthetic import drift_stream, recovery

WINDOW = 300


def test_recovery_reads_a_plain_series() -> None:
    out = np.array([1, 0] * 500 + [0] * 400 + [1, 0] * 300 + [-1] * 10, np.int8)
    before, low, back = recovery(out, 1000, window=100)
    assert before == 0.5 and low == 0.0
    # back to 0.45 once 89 of the last 100 scored events alternate (45 hits)
    assert back is not None and 400 + 89 <= back <= 400 + 100
    with pytest.raises(ValueError, match="scored events before the change"):
        recovery(out, 50, window=100)


@pytest.mark.parametrize("weight", [0.0, ModelConfig().transition_weight])
def test_online_model_recovers_after_tastes_change(weight: float) -> None:
    """The factors alone (transition weight 0) must lose at least a quarter of their hit rate
    at the change (else the test could not fail) and recover; with the default transitions,
    which follow a user's new taste from its first event in it, the drop is smaller (about a
    quarter on this seed) and the recovery must be as fast."""
    s = drift_stream(
        before=5000, after=5000, n_users=100, n_items=500, n_groups=4, seed=3, span_s=40 * 86400.0
    )
    n = s.users.size
    ev = EventColumns(s.user_ids(), s.item_ids(), s.times, np.full(n, np.nan), ["view"] * n)
    cfg = ModelConfig(transition_weight=weight)
    r = prequential(ev, make_learner("sgd", cfg), progress=False, keep_outcomes=True)
    assert r.outcomes is not None
    before, low, back = recovery(r.outcomes, s.change, WINDOW)
    assert before > 0.15, before  # it had learnt the tastes (popularity scores ~0.07 here)
    if weight == 0:
        assert low < 0.75 * before, (before, low)  # the change did hurt: the test can fail
    assert back is not None and back <= 1500, (before, low, back)
