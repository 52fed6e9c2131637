from __future__ import annotations

import math

import numpy as np
import pytest
from numba import njit

import stream_mf.model as model_mod
from stream_mf.config import ModelConfig
from stream_mf.model import EventBatch, OnlineModel
from stream_mf.sgd import (
    Counter,
    EntityArrays,
    KernelBatch,
    SgdParams,
    StreamArrays,
    draw_item,
    draw_mixed,
    rebuild_cdf,
    sgd_batch,
    sigmoid,
)
from stream_mf.sgd_reference import sgd_batch_reference
from tests.synthetic import planted_stream


def _batch(n: int, seed: int = 1, n_users: int = 120, n_items: int = 90) -> EventBatch:
    s = planted_stream(n, n_users, n_items, seed=seed)
    w = np.where(np.arange(n) % 3 == 0, 2.0, 1.0)
    # some late, out-of-order events so that time decay of the update weight is exercised
    times = s.times.copy()
    times[::7] -= 3600.0
    return EventBatch.build(s.user_ids(), s.item_ids(), w, times)


def _arrays(m: OnlineModel) -> dict[str, np.ndarray]:
    st = m.state
    nu, ni = st.users.n, st.items.n
    return {
        "U": st.users.factors[:nu],
        "V": st.items.factors[:ni],
        "b": st.items.bias[:ni],
        "u_logact": st.users.logpop[:nu],
        "i_logpop": st.items.logpop[:ni],
        "i_count": st.items.count[:ni],
        "cdf": st.cdf[:, : st.counters[Counter.CDF_LEN]],
        "counters": st.counters,
        "clock": st.clock,
    }


@pytest.mark.parametrize(
    ("loss", "biases"),
    [
        ("logistic", {}),
        ("bpr", {}),
        # item biases learnt (they are off by default), from every negative or uniform ones only
        ("logistic", {"lr_bias": 0.2, "bias_uniform": True}),
        ("bpr", {"lr_bias": 0.2}),
        ("bpr", {"lr_bias": 0.2, "bias_uniform": True}),
        # the recency pull toward each event's item (on by default), off and stronger
        ("bpr", {"user_pull": 0.0}),
        ("logistic", {"user_pull": 1.5}),
    ],
)
def test_kernel_matches_numpy_reference(
    loss: str, biases: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = ModelConfig.model_validate(
        {"dim": 16, "n_negatives": 4, "loss": loss, "sampler_refresh": 300, "half_life_s": 7200.0}
        | biases
    )
    batch = _batch(2500)
    fast = OnlineModel(cfg)
    fast.learn(batch)
    monkeypatch.setattr(model_mod, "sgd_batch", sgd_batch_reference)
    slow = OnlineModel(cfg)
    slow.learn(batch)
    a, b = _arrays(fast), _arrays(slow)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-5, err_msg=name)
    # the models actually learned something (not a trivially equal no-op)
    assert np.abs(a["V"]).max() > 0.05
    if "lr_bias" in biases:
        assert np.abs(a["b"]).max() > 0.01


@pytest.mark.parametrize("biases", [{}, {"lr_bias": 0.2, "bias_uniform": True}])
def test_same_events_any_batching_bit_identical(biases: dict[str, object]) -> None:
    cfg = ModelConfig.model_validate({"dim": 8, "n_negatives": 3, "sampler_refresh": 200} | biases)
    batch = _batch(3000, seed=7)
    whole = OnlineModel(cfg)
    whole.learn(batch)
    rng = np.random.default_rng(3)
    cuts = np.sort(rng.choice(np.arange(1, 3000), size=40, replace=False))
    pieces = OnlineModel(cfg)
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, 3000], strict=True):
        pieces.learn(batch.slice(int(lo), int(hi)))
    singles = OnlineModel(cfg)
    for j in range(400):
        singles.learn(batch.slice(j, j + 1))
    singles.learn(batch.slice(400, 3000))
    for other in (pieces, singles):
        a, b = _arrays(whole), _arrays(other)
        for name in a:
            assert np.array_equal(a[name], b[name]), name


@njit(cache=True)
def _two_sided_sigmoid(x: float) -> float:
    """The kernel's former sigmoid, compiled like it (numba's exp, not numpy's)."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def test_branch_free_draw_and_sigmoid_match_the_plain_forms() -> None:
    """The kernel's selects give the very item and bits the branchy forms (the twin's) give."""
    rng = np.random.default_rng(5)
    n = 300
    logpop = np.where(rng.random(n) < 0.2, -np.inf, rng.normal(0.0, 2.0, n))
    cdf = np.zeros((3, n))
    ncdf = rebuild_cdf(cdf, logpop, n, 0.75)
    xs = np.r_[rng.random(20_000), 0.0, np.nextafter(1.0, 0.0)]
    for mix in (0.4, 0.5, 1e-9, 1.0 - 1e-9):
        xs_m = np.r_[xs, mix, np.nextafter(mix, 0.0)]
        got = [draw_mixed(cdf, ncdf, float(x), mix) for x in xs_m]
        want = [
            min(int(x / mix * ncdf), ncdf - 1)
            if x < mix
            else draw_item(cdf, ncdf, (x - mix) / (1.0 - mix))
            for x in xs_m.tolist()
        ]
        assert got == want, mix
    for x in np.r_[rng.normal(0.0, 8.0, 2000), 0.0, -0.0, 40.0, -40.0, 800.0, -800.0].tolist():
        assert sigmoid(x) == _two_sided_sigmoid(x), x


def test_randomness_depends_on_partition_and_offset() -> None:
    cfg = ModelConfig(dim=8, n_negatives=3)
    batch = _batch(500)
    m1, m2 = OnlineModel(cfg), OnlineModel(cfg)
    m1.learn(batch)
    shifted = EventBatch.build(
        batch.user_ids, batch.item_ids, batch.weights, batch.times, first_offset=1000
    )
    m2.learn(shifted)
    assert not np.array_equal(m1.state.items.factors, m2.state.items.factors)


def test_negatives_never_the_positive_and_follow_popularity() -> None:
    cfg = ModelConfig(dim=4, n_negatives=8, negative_exponent=1.0, sampler_refresh=50)
    m = OnlineModel(cfg)
    batch = _batch(4000, n_items=50)
    m.learn(batch.slice(0, 3000))
    # draw negatives for the tail and check the positive is never among them
    st = m.state
    neg = np.empty((1000, 8), np.int32)
    logw = np.empty(1000)
    tail = batch.slice(3000, 4000)
    users = st.users.resolve(tail.user_ids)
    items = st.items.resolve(tail.item_ids)
    # the plain algorithm: one draw per slot, all from the popularity table, no norm cap
    plain = SgdParams.from_config(cfg)._replace(
        n_candidates=1,
        n_steps=1,
        lr_user=1.0,
        lr_bias=1.0,
        max_norm=0.0,
        uniform_mix=0.0,
        bias_uniform=False,
        user_pull=0.0,
    )
    sgd_batch(
        KernelBatch(
            users, items, tail.weights, tail.times, tail.partitions, tail.offsets, neg, logw
        ),
        EntityArrays.of(st.users),
        EntityArrays.of(st.items),
        StreamArrays(st.cdf, st.counters, st.clock),
        plain,
    )
    assert not (neg == items[:, None]).any()
    delta_items = neg.ravel()
    counts = np.bincount(delta_items[delta_items >= 0], minlength=st.items.n)
    pop = st.items.count[: st.items.n]
    top, bottom = np.argsort(-pop)[:5], np.argsort(pop)[:5]
    assert counts[top].sum() > 5 * counts[bottom].sum()


def test_learns_planted_taste() -> None:
    s = planted_stream(60_000, 300, 200, n_groups=4, seed=5)
    m = OnlineModel(ModelConfig(dim=16))
    m.learn(EventBatch.build(s.user_ids(), s.item_ids(), np.ones(60_000), s.times))
    st = m.state
    hits = 0
    for u in range(300):
        uix = st.users.index[f"u{u}"]
        scores = (
            st.items.factors[: st.items.n] @ st.users.factors[uix] + st.items.bias[: st.items.n]
        )
        top = np.argsort(-scores)[:10]
        groups = [s.item_group[int(st.items.ids[t][1:])] for t in top]
        hits += np.mean(np.asarray(groups) == s.user_group[u]) >= 0.7
    assert hits >= 0.9 * 300


def test_counter_slots_keep_the_stored_layout() -> None:
    """The counters are persisted as raw int64s: a slot may be appended, never renumbered."""
    assert {c.name: c.value for c in Counter} == {
        "EVENTS": 0,
        "NEXT_REFRESH": 1,
        "CDF_LEN": 2,
        "REBUILDS": 3,
    }
