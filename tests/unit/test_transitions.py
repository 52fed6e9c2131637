"""Item-to-item transitions (stream_mf/transitions.py) against their plain-Python twin."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stream_mf.config import ModelConfig
from stream_mf.evaluate import SGDLearner
from stream_mf.model import EventBatch, OnlineModel
from stream_mf.transitions import (
    TransitionLog,
    Transitions,
    add_bonus,
    bonus,
    bonus_reference,
    update,
    update_reference,
)

RATE = math.log(2.0) / 50.0


def stream(n: int, n_users: int, n_items: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n).astype(np.int32)
    # a skewed catalogue so rows fill up and evict
    items = np.minimum(rng.zipf(1.3, n) - 1, n_items - 1).astype(np.int32)
    times = np.cumsum(rng.exponential(1.0, n))
    return users, items, times


@pytest.mark.parametrize("slots", [1, 4, 32])
@pytest.mark.parametrize("seed", [0, 1])
def test_update_matches_the_reference_however_cut(slots: int, seed: int) -> None:
    users, items, times = stream(3_000, 40, 200, seed)
    ref = Transitions.empty(slots, 40, 200)
    update_reference(ref.succ, ref.logw, ref.last, users, items, times, RATE)
    t = Transitions.empty(slots, 40, 200)
    changed = []
    for lo in range(0, 3_000, 257):  # batches of any length give the same table
        changed.append(
            update(t, users[lo : lo + 257], items[lo : lo + 257], times[lo : lo + 257], RATE)
        )
    assert np.array_equal(t.succ, ref.succ)
    np.testing.assert_allclose(t.logw, ref.logw, rtol=1e-12)
    assert np.array_equal(t.last, ref.last)
    # the rows reported changed are exactly the rows that differ from empty (each was touched)
    touched = np.unique(np.concatenate(changed))
    assert np.array_equal(touched, np.flatnonzero((ref.succ >= 0).any(axis=1)))
    if slots < 32:
        assert (t.succ >= 0).all(axis=1).any()  # some row was full: eviction exercised


def test_eviction_replaces_the_weakest_slot() -> None:
    t = Transitions.empty(2, 1, 10)
    u = np.zeros(5, np.int32)
    # 0 -> 1, 1 -> 0 (row 1), 0 -> 2, 2 -> 0, 0 -> 3: row 0 holds 1 (t=1) and 2 (t=3); 3 evicts 1
    update(t, u, np.array([0, 1, 0, 2, 0], np.int32), np.arange(5.0), RATE)
    update(t, u[:1], np.array([3], np.int32), np.array([5.0]), RATE)
    assert sorted(t.succ[0].tolist()) == [2, 3]
    assert t.last[0] == 3


@pytest.mark.parametrize("share", [False, True])
def test_bonus_matches_the_reference_and_normalises(share: bool) -> None:
    users, items, times = stream(2_000, 30, 100, 3)
    t = Transitions.empty(8, 30, 100)
    update(t, users, items, times, RATE)
    now = float(times[-1])
    for row in range(20):
        idx, val = bonus(t.succ, t.logw, row, now, RATE, 2.0, 100, share)
        ref = bonus_reference(t.succ, t.logw, row, now, RATE, 2.0, share)
        assert dict(zip(idx.tolist(), val.tolist(), strict=True)) == pytest.approx(ref, rel=1e-6)
        if ref:  # the largest is the weight, or the shares add up to it
            total = sum(ref.values()) if share else max(ref.values())
            assert total == pytest.approx(2.0, rel=1e-5)
    scores = np.zeros(100, np.float32)
    add_bonus(scores, t.succ, t.logw, int(items[-1]), now, RATE, 2.0)
    assert scores.dtype == np.float32 and scores.max() == pytest.approx(2.0)
    # unknown items (past the scores' end), no row, a zero weight: nothing added
    assert bonus(t.succ, t.logw, -1, now, RATE, 2.0, 100)[0].size == 0
    assert bonus(t.succ, t.logw, 5, now, RATE, 0.0, 100)[0].size == 0
    assert (bonus(t.succ, t.logw, 5, now, RATE, 2.0, 3)[0] < 3).all()


def test_recording_gives_each_events_bonus_at_its_test_time() -> None:
    users, items, times = stream(600, 20, 50, 4)
    a = Transitions.empty(8, 20, 50)
    update(a, users[:300], items[:300], times[:300], RATE)
    b = Transitions.empty(8, 20, 50)
    update(b, users[:300], items[:300], times[:300], RATE)
    b.recording = TransitionLog(np.empty(0, np.int64), np.empty(0, np.int32), np.empty(0))
    clock0 = float(times[299])
    update(b, users[300:], items[300:], times[300:], RATE, clock0=clock0, weight=2.0, n_items0=50)
    log = b.recording
    assert log is not None and log.ptr.shape[0] == 301
    clock = clock0
    for e in range(300, 600):
        want = bonus(a.succ, a.logw, int(a.last[users[e]]), clock, RATE, 2.0, 50)
        lo, hi = log.ptr[e - 300], log.ptr[e - 299]
        assert np.array_equal(log.item[lo:hi], want[0]) and np.array_equal(
            log.value[lo:hi], want[1]
        )
        update(a, users[e : e + 1], items[e : e + 1], times[e : e + 1], RATE)
        clock = max(clock, float(times[e]))


def test_model_learns_transitions_and_scores_with_them() -> None:
    m = OnlineModel(ModelConfig(dim=4, n_negatives=1, transition_weight=3.0))
    d = m.learn(EventBatch.build(["a", "a", "b"], ["x", "y", "x"], [1.0] * 3, [1.0, 2.0, 3.0]))
    st = m.state
    x, y = st.items.index["x"], st.items.index["y"]
    assert d.trans_rows.tolist() == [x] and st.transitions.last[st.users.index["b"]] == x
    lrn = SGDLearner(m.config)
    lrn.model = m
    b = st.users.index["b"]
    plain = st.items.factors[:2] @ st.users.factors[b]
    assert lrn.scores(b)[y] == pytest.approx(plain[y] + 3.0)  # b's last item x was followed by y
    off = OnlineModel(ModelConfig(dim=4, n_negatives=1, transition_weight=0.0))
    off.learn(EventBatch.build(["a", "a"], ["x", "y"], [1.0] * 2, [1.0, 2.0]))
    assert (off.state.transitions.succ < 0).all()


def test_the_query_scores_as_evaluate_does() -> None:
    """`answer` (the query's path) and the evaluator's learner rank by the same scores."""
    from stream_mf.answer import StateUsers, answer
    from stream_mf.evaluate import ShippedLearner
    from stream_mf.messages import RecRequest
    from stream_mf.recommend import ItemView
    from tests.synthetic import planted_stream

    s = planted_stream(3000, 60, 150, n_groups=3, seed=2)
    lrn = ShippedLearner(ModelConfig(dim=8, n_negatives=2))
    lrn.learn(EventBatch.build(s.user_ids(), s.item_ids(), np.ones(3000), s.times))
    st = lrn.model.state
    view, users = ItemView.from_state(st), StateUsers(st)
    moved = 0
    for uid in st.users.ids[:40]:
        rec = users.user(uid)
        assert rec is not None and rec.last_item == st.transitions.last[rec.index] >= 0
        got = answer(RecRequest(request_id="r", user_id=uid, k=10), view, users)
        want = lrn.recommend(rec.index, 10, rec.seen)
        assert [it.item_id for it in got.items] == [st.items.ids[j] for j in want]
        plain = view.factors @ rec.vector
        plain[rec.seen] = -np.inf
        moved += int(set(np.argsort(-plain)[:10].tolist()) != set(want.tolist()))
    assert moved > 0  # the transitions changed some lists


def test_a_share_does_not_vanish_for_an_old_row() -> None:
    """Shares do not depend on `now`: a row 2,000 half-lives old (an hour's half-life, three
    months on) still adds its whole weight, as it did when it was fresh (the decayed counts
    themselves underflow to 0 long before)."""
    t = Transitions.empty(4, 2, 10)
    update(t, np.zeros(4, np.int32), np.array([0, 1, 0, 2], np.int32), np.arange(4.0), RATE)
    fresh = bonus(t.succ, t.logw, 0, 4.0, RATE, 2.0, 10, True)
    old = bonus(t.succ, t.logw, 0, 4.0 + 2_000 * 50.0, RATE, 2.0, 10, True)
    assert fresh[0].tolist() == old[0].tolist() == [1, 2]
    np.testing.assert_allclose(old[1], fresh[1], rtol=1e-6)
    assert float(old[1].sum()) == pytest.approx(2.0)
    # the max normalisation decays by design: log1p of a vanishing count adds nothing
    assert bonus(t.succ, t.logw, 0, 4.0 + 2_000 * 50.0, RATE, 2.0, 10, False)[0].size == 0
