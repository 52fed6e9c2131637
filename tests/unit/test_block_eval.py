"""The block evaluator scores every event as the per-event loop does (stream_mf/block_eval.py).

Both are test-then-learn; the block one learns a block in one recorded kernel call and scores it
with one matrix product. Hits must be the loop's, event for event, except where a float tie at
the K-th place falls the other way (the product sums in another order): such events are counted
and must be rare (none so far on these seeds).
"""

from __future__ import annotations

import numpy as np
import pytest

from stream_mf.config import ModelConfig, RebuildConfig
from stream_mf.datasets import EventColumns
from stream_mf.evaluate import (
    PrequentialResult,
    SGDLearner,
    block_mode,
    make_learner,
    prequential,
)
from tests.synthetic import planted_stream

#: events whose hit may differ through a float tie, of every scored one
MAX_TIES = 0.002


def columns(n: int, seed: int, n_users: int = 300, n_items: int = 500) -> EventColumns:
    s = planted_stream(n, n_users, n_items, n_groups=4, seed=seed)
    # repeats of a user's item, new users and new items all along: every path is exercised
    return EventColumns(s.user_ids(), s.item_ids(), s.times, np.full(n, np.nan), ["view"] * n)


def both(model: str, ev: EventColumns, block: int = 64, **kw: object) -> list[PrequentialResult]:
    out = []
    for b in (None, block):
        lrn = make_learner(model, ModelConfig(dim=16, **kw), refit_every=3_000)  # type: ignore[arg-type]
        out.append(prequential(ev, lrn, progress=False, keep_outcomes=True, block=b))
    return out


def assert_same(loop: PrequentialResult, fast: PrequentialResult) -> None:
    assert loop.outcomes is not None and fast.outcomes is not None
    assert np.array_equal(loop.outcomes == -1, fast.outcomes == -1)  # the same events scored
    differ = int(np.sum(loop.outcomes != fast.outcomes))
    assert differ <= MAX_TIES * loop.evaluated, f"{differ} of {loop.evaluated} events differ"
    assert abs(loop.hits - fast.hits) <= differ
    if differ == 0:
        assert loop.hits == fast.hits and loop.ndcg_sum == pytest.approx(fast.ndcg_sum, rel=1e-12)


@pytest.mark.parametrize("model", ["popular", "sgd", "hybrid"])
@pytest.mark.parametrize("seed", [1, 2])
def test_block_scores_what_the_loop_scores(model: str, seed: int) -> None:
    ev = columns(8_000, seed)
    loop, fast = both(model, ev)
    assert loop.evaluated == fast.evaluated > 3_000
    assert_same(loop, fast)


def test_block_size_does_not_matter() -> None:
    ev = columns(5_000, 3)
    runs = [
        prequential(ev, make_learner("sgd", ModelConfig(dim=8)), progress=False, block=b)
        for b in (1, 7, 64, 500)
    ]
    assert len({(r.evaluated, r.hits) for r in runs}) == 1


def test_logistic_loss_biases_and_many_negatives() -> None:
    """Item biases and more negatives change more rows per event: still the loop's hits."""
    ev = columns(5_000, 4)
    loop, fast = both("sgd", ev, loss="logistic", lr_bias=1.0, n_negatives=16)
    assert_same(loop, fast)


def test_shipped_model_with_rebuilds_in_events() -> None:
    ev = columns(6_000, 5)
    rcfg = RebuildConfig(every_events=2_000, iterations=2, guard_events=200, final_rows=100)
    res = []
    for b in (None, 64):
        lrn = make_learner("default", ModelConfig(dim=8), rcfg)
        res.append(prequential(ev, lrn, progress=False, keep_outcomes=True, block=b))
        assert len(lrn.outcomes) >= 2  # type: ignore[attr-defined]
    assert_same(*res)


def test_a_learner_with_its_own_scores_takes_the_loop() -> None:
    class Odd(SGDLearner):
        def scores(self, user: int) -> np.ndarray:
            return -super().scores(user)

    assert block_mode(SGDLearner(ModelConfig(dim=4))) == "factors"
    assert block_mode(Odd(ModelConfig(dim=4))) is None
    assert block_mode(make_learner("als", ModelConfig(dim=4))) is None
    assert block_mode(make_learner("default", ModelConfig(dim=4), min_user_events=3)) is None


def test_hybrid_guard_decides_as_in_the_loop() -> None:
    """`hybrid`'s rebuild guard scores each step's events in one call however the stream is
    cut: the loop and blocks of two sizes give the same guard counts, the same swaps and
    rejections, and the same hits."""
    ev = columns(7_000, 6)
    # a weak confidence and no margin: one of the three rebuilds is rejected
    rcfg = RebuildConfig(
        iterations=2, guard_events=300, guard_per_batch=50, guard_margin=0.0, alpha=0.1
    )
    runs = []
    for b in (None, 64, 37):
        lrn = make_learner("hybrid", ModelConfig(dim=8), rcfg, refit_every=1_500)
        res = prequential(ev, lrn, progress=False, keep_outcomes=True, block=b)
        guard = [(o.swapped, o.scored, o.hr_old, o.hr_new) for o in lrn.outcomes]  # type: ignore[attr-defined]
        runs.append((res, guard))
    (loop, guard), *rest = runs
    assert len(guard) >= 3 and sum(g[1] for g in guard) > 300
    assert {g[0] for g in guard} == {True, False}  # swaps and a rejection
    for fast, g in rest:
        assert g == guard
        assert_same(loop, fast)


@pytest.mark.parametrize(("weight", "norm"), [(0.0, "share"), (2.0, "max"), (8.0, "share")])
def test_block_adds_the_transitions_as_the_loop_does(weight: float, norm: str) -> None:
    """The per-event bonus of the user's last item's successors (stream_mf/transitions.py),
    recorded while the block is learnt, ranks as `SGDLearner.scores` does: off, and at two
    strengths of either normalisation."""
    ev = columns(6_000, 5)
    loop, fast = both("sgd", ev, transition_weight=weight, transition_norm=norm)
    assert loop.evaluated == fast.evaluated > 2_000
    assert_same(loop, fast)
