from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from synthetic import planted_stream

from consumers.settings import KafkaSettings, MetricsSettings, UpdaterSettings
from consumers.updater import Updater
from stream_mf.als_reference import dense_confidence, solve_rows_reference
from stream_mf.config import ModelConfig
from stream_mf.model import BatchDelta, EventBatch, OnlineModel
from stream_mf.rebuild import Rebuild, RebuildConfig, _chunks, _compact, _Pairs
from stream_mf.state import ModelState
from stream_mf.store import MODEL_CFS, StateStore, confidence_items

CFG = ModelConfig(dim=16)
TOPIC = "interactions"


def stream(n: int, seed: int = 0) -> EventBatch:
    s = planted_stream(n, 500, 400, n_groups=4, seed=seed)
    return EventBatch.build(s.user_ids(), s.item_ids(), np.ones(n), s.times)


class _Feed:
    """A store and an online model learning a synthetic stream, committing slice by slice."""

    def __init__(self, tmp_path: Path, seed: int, n: int = 30_000) -> None:
        self.batch = stream(n, seed=seed)
        self.store = StateStore(tmp_path / "db")
        self.model = OnlineModel(CFG, self.store.load(CFG))
        self.done = 0

    def learn(self, n: int) -> BatchDelta:
        delta = self.model.learn(self.batch.slice(self.done, self.done + n))
        self.done += n
        self.store.commit(self.model.state, delta, {(TOPIC, 0): self.done})
        return delta


def run_with_rebuild(tmp: Path, rcfg: RebuildConfig) -> tuple[OnlineModel, StateStore, object]:
    """The updater's loop in miniature: batches keep coming while a rebuild runs."""
    feed = _Feed(tmp, seed=0, n=60_000)
    store, model, learn = feed.store, feed.model, feed.learn
    for _ in range(20):
        learn(1000)
    rb = Rebuild(model.state, store, rcfg)
    outcome = None
    steps = 0
    while outcome is None:
        if rb.wants_scores:
            nxt = feed.batch.slice(feed.done, feed.done + 500)
            rb.score(
                model.state,
                model.state.users.lookup(nxt.user_ids).astype(np.int64),
                model.state.items.lookup(nxt.item_ids).astype(np.int64),
                lambda u: store.user_items(u)[0].astype(np.int64),
            )
        delta = learn(500)
        rb.note(delta)
        outcome = rb.step(model.state)
        steps += 1
        assert feed.done < 60_000, "rebuild never finished"
        time.sleep(0.01)
    if outcome.swapped:
        store.commit(
            model.state, BatchDelta.empty(model.state), None, generation=outcome.generation,
            extra_users=outcome.users, extra_items=outcome.items,
        )  # fmt: skip
    store.drop_other_generations()
    learn(2000)  # and the stream goes on after the swap
    return model, store, outcome


@pytest.mark.parametrize("final_rows", [2000, 100])
def test_rebuild_swaps_while_the_stream_goes_on(tmp_path: Path, final_rows: int) -> None:
    # 100: most rows touched during the last round are left for after the swap, while batches
    # keep coming (their change is added to rows SGD keeps learning)
    cfg = RebuildConfig(
        iterations=5, alpha=5.0, guard_events=300, guard_margin=0.1, final_rows=final_rows,
        max_rounds=2, swap_budget_s=60.0, after_rows=100,
    )  # fmt: skip
    model, store, outcome = run_with_rebuild(tmp_path, cfg)
    assert outcome.swapped and outcome.generation == 1
    assert (outcome.deferred > 0) == (final_rows < 1000)
    assert outcome.rows_resolved > 0 and np.isfinite(outcome.drift)
    assert outcome.scored >= 300 and outcome.hr_new >= outcome.hr_old - 0.1
    assert not outcome.unguarded
    st = model.state
    assert st.model_version == 1
    applied = st.events_applied
    assert int(st.users.count[: st.users.n].sum()) == applied
    with store:
        assert store.generation() == 1
        assert store.offsets() == {(TOPIC, 0): applied}
        # only the current generation's rows are left
        for cf in MODEL_CFS:
            gens = {k[:4] for k in store.cf[cf].keys()}  # noqa: SIM118 (Rdict iterates oddly)
            assert gens == {b"\x00\x00\x00\x01"}, cf
        loaded = store.load()
    for kind in ("users", "items"):
        a, b = getattr(st, kind), getattr(loaded, kind)
        assert np.array_equal(a.factors[: a.n], b.factors[: b.n]), kind
        assert np.array_equal(a.bias[: a.n], b.bias[: b.n]), kind
    assert loaded.model_version == 1 and loaded.events_applied == applied


def test_rebuilt_model_recovers_planted_groups(tmp_path: Path) -> None:
    cfg = RebuildConfig(iterations=8, alpha=5.0, guard_events=300, guard_margin=1.0)
    model, store, _outcome = run_with_rebuild(tmp_path, cfg)
    store.close()
    s = planted_stream(60_000, 500, 400, n_groups=4, seed=0)
    st = model.state
    good = 0
    for u in range(100):
        uix = st.users.index[f"u{u}"]
        scores = (
            st.items.factors[: st.items.n] @ st.users.factors[uix] + st.items.bias[: st.items.n]
        )
        top = np.argsort(-scores)[:10]
        groups = [s.item_group[int(st.items.ids[t][1:])] for t in top]
        good += np.mean(np.asarray(groups) == s.user_group[u]) > 0.5
    assert good >= 90


def test_guard_rejects_a_worse_model(tmp_path: Path) -> None:
    # every entry below min_confidence: the rebuilt vectors are all zero, ranking nothing
    model, store, outcome = run_with_rebuild(
        tmp_path,
        RebuildConfig(iterations=2, min_confidence=1e9, guard_events=300, guard_margin=0.0),
    )
    assert not outcome.swapped
    assert model.state.model_version == 0
    with store:
        assert store.generation() == 0
        for cf in MODEL_CFS:
            assert {k[:4] for k in store.cf[cf].keys()}  # noqa: SIM118 (Rdict iterates oddly) == {b"\x00\x00\x00\x00"}, cf


def test_a_swap_on_too_few_scored_events_says_it_was_unguarded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # no time for the guard (a quiet stream): it scores nothing, swaps, and says so
    cfg = RebuildConfig(iterations=2, guard_events=300, guard_min_events=100, guard_timeout_s=0)
    with caplog.at_level("WARNING", logger="stream_mf.rebuild"):
        _model, store, outcome = run_with_rebuild(tmp_path, cfg)
    store.close()
    assert outcome.swapped and outcome.scored < 100 and outcome.unguarded
    assert any("swapped unguarded" in r.getMessage() for r in caplog.records)


def test_unfinished_rebuild_is_discarded_on_open(tmp_path: Path) -> None:
    batch = stream(5000)
    with StateStore(tmp_path / "db") as store:
        model = OnlineModel(CFG, store.load(CFG))
        store.commit(model.state, model.learn(batch), {(TOPIC, 0): 5000})
        rb = Rebuild(model.state, store, RebuildConfig(iterations=2))
        rb.thread.join()  # fitted and staged under generation 1, never flipped: a crash here
        before = {cf: sorted(store.cf[cf].keys()) for cf in MODEL_CFS}
        assert any(k[:4] == b"\x00\x00\x00\x01" for k in before["user_factors"])
    with StateStore(tmp_path / "db") as store:
        assert store.generation() == 0
        for cf in MODEL_CFS:
            assert {k[:4] for k in store.cf[cf].keys()}  # noqa: SIM118 (Rdict iterates oddly) == {b"\x00\x00\x00\x00"}, cf
        loaded = store.load()
    np.testing.assert_array_equal(
        loaded.users.factors[: loaded.users.n], model.state.users.factors[: model.state.users.n]
    )


def test_pairs_copy_follows_the_live_map() -> None:
    """The rebuild's own copy (snapshot + noted batches) reads the same rows as the live map."""
    batch = stream(20_000, seed=3)
    model = OnlineModel(CFG, ModelState.empty(CFG))
    model.learn(batch.slice(0, 8000))
    pairs = _Pairs(*confidence_items(model.state.confidence))
    pairs.merge([])
    for lo in range(8000, 20_000, 1000):
        d = model.learn(batch.slice(lo, lo + 1000))
        pairs.note(d.pair_keys, d.pair_values)
        if lo == 13_000:
            pairs.merge(pairs.take())  # some merged, the rest still fresh
    fresh = pairs.take()
    keys, vals = confidence_items(model.state.confidence)
    rng = np.random.default_rng(0)
    users = np.unique(rng.integers(0, model.state.users.n, 40))
    items = np.unique(rng.integers(0, model.state.items.n, 40))
    got_k, got_v = pairs.rows(users, items, fresh)
    want = np.isin(keys >> 32, users) | np.isin(keys & 0xFFFFFFFF, items)
    np.testing.assert_array_equal(got_k, keys[want])
    np.testing.assert_array_equal(got_v, vals[want])
    pairs.merge(fresh)
    np.testing.assert_array_equal(pairs.keys, keys)
    np.testing.assert_array_equal(pairs.vals, vals)


def test_compact_rows_must_be_sorted() -> None:
    """New ids come first in the swap's candidates: every chunk must still be sorted, or a
    row lookup silently misses entries."""
    cand = np.concatenate([np.arange(500, 520), np.arange(0, 400, 3)])
    entries = np.r_[np.full(cand.size - 1, 10), 10_000]  # the last one alone is over budget
    chunks = _chunks(cand, entries, work=420)
    np.testing.assert_array_equal(np.sort(np.concatenate(chunks)), np.sort(cand))
    assert [c.size for c in chunks] == [10] * 15 + [3, 1]
    for chunk in chunks:
        assert np.all(chunk[1:] > chunk[:-1])
    keys = np.array([(3 << 32) | 1, (7 << 32) | 2], np.int64)
    data = np.ones(2)
    C = _compact(np.array([3, 7]), keys >> 32, keys & 0xFFFFFFFF, data, 4)
    np.testing.assert_array_equal(C.indptr, [0, 1, 2])
    with pytest.raises(ValueError, match="sorted"):
        _compact(np.array([7, 3]), keys >> 32, keys & 0xFFFFFFFF, data, 4)


@pytest.mark.parametrize(("final_rows", "budget_s"), [(30, 60.0), (1500, 0.0)])
def test_rows_left_at_the_swap_are_solved_exactly_after_it(
    tmp_path: Path, final_rows: int, budget_s: float
) -> None:
    """A swap bounded to a few rows flips at once; the rows it left are then re-solved from their
    full decayed rows against the new factors, as a dense solve does, and a crash at any point
    after the flip reloads exactly the new generation's rows in memory."""
    rcfg = RebuildConfig(
        iterations=3, alpha=5.0, solver="cholesky", guard_events=100, guard_margin=1.0,
        final_rows=final_rows, max_rounds=1, swap_budget_s=budget_s, after_rows=200,
    )  # fmt: skip
    feed = _Feed(tmp_path, seed=1)
    store, st, learn = feed.store, feed.model.state, feed.learn
    learn(1_500)  # early: new ids keep arriving during the rebuild
    rb = Rebuild(st, store, rcfg)
    n_before = st.users.n + st.items.n
    while rb.swap_outcome is None:  # batches keep coming until the flip
        if rb.wants_scores:
            nxt = feed.batch.slice(feed.done, feed.done + 500)
            rb.score(
                st, st.users.lookup(nxt.user_ids).astype(np.int64),
                st.items.lookup(nxt.item_ids).astype(np.int64),
                lambda u: store.user_items(u)[0].astype(np.int64),
            )  # fmt: skip
        rb.note(learn(500))
        assert rb.step(st) is None, "the swap should leave rows for after it"
        assert feed.done < 30_000, "rebuild never swapped"
        time.sleep(0.01)
    flip = rb.swap_outcome
    after = rb.after
    assert after is not None and flip.deferred == after.users.size + after.items.size > 0
    new_ids = st.users.n + st.items.n - n_before  # written by the flip, solved or not
    assert flip.swap_rows <= (rcfg.final_rows if budget_s else 0)
    assert flip.users.size + flip.items.size <= flip.swap_rows + new_ids
    assert store.generation() == 1 and st.model_version == 1
    assert store.rebuild_unfinished() == 1  # until the last row after the flip is committed
    V_at_flip = st.items.factors[: st.items.n].copy()
    keys, vals = confidence_items(st.confidence)
    clock = float(st.clock[0])
    outcome = None
    commits = 0
    while outcome is None:  # no batches now: the result must be the exact solve
        rb.thread.join()
        outcome = rb.step(st)
        commits += outcome is None
        assert store.rebuild_unfinished() == 1  # the steps' own commits keep the mark
    # after_rows rows a step, each step but the last committing its own
    assert commits == (flip.deferred - 1) // rcfg.after_rows
    store.commit(
        st, BatchDelta.empty(st), None, generation=outcome.generation,
        extra_users=outcome.users, extra_items=outcome.items,
    )  # fmt: skip
    assert store.rebuild_unfinished() is None
    D, P = dense_confidence(keys, vals, st.users.n, st.items.n, clock, CFG.decay_rate, rcfg.alpha)
    U = st.users.factors[: st.users.n]
    want_u = solve_rows_reference(D, P, V_at_flip, rcfg.reg, after.users)
    np.testing.assert_allclose(U[after.users], want_u, rtol=1e-3, atol=1e-4)
    want_i = solve_rows_reference(D.T, P.T, U.copy(), rcfg.reg, after.items)
    np.testing.assert_allclose(st.items.factors[after.items], want_i, rtol=1e-3, atol=1e-4)
    store.drop_other_generations()
    store.close()
    with StateStore(tmp_path / "db") as again:
        loaded = again.load()
    assert loaded.model_version == 1
    for kind in ("users", "items"):
        a, b = getattr(st, kind), getattr(loaded, kind)
        np.testing.assert_array_equal(a.factors[: a.n], b.factors[: b.n])


def test_crash_after_the_flip_reloads_the_new_model(tmp_path: Path) -> None:
    """Killed between the flip and the last row applied after it: the new generation, exactly
    as committed, never a mix."""
    rcfg = RebuildConfig(
        iterations=3, alpha=5.0, guard_events=0, guard_margin=1.0, final_rows=20, max_rounds=1,
        swap_budget_s=60.0, after_rows=20,
    )  # fmt: skip
    feed = _Feed(tmp_path, seed=2)
    store, st, learn = feed.store, feed.model.state, feed.learn
    learn(10_000)
    rb = Rebuild(st, store, rcfg)
    while rb.after is None or rb.after.done == 0:  # the flip, then one step of rows after it
        rb.note(learn(500))
        assert rb.step(st) is None
        assert feed.done < 30_000, "rebuild never swapped"
        time.sleep(0.01)
    rb.thread.join()
    store.close()  # the process dies here: nothing else reaches the disk
    with StateStore(tmp_path / "db") as again:
        assert again.generation() == 1
        assert again.rebuild_unfinished() == 1  # a restart knows rows still wait for a re-solve
        loaded = again.load()
    assert loaded.model_version == 1 and loaded.events_applied == st.events_applied
    for kind in ("users", "items"):
        a, b = getattr(st, kind), getattr(loaded, kind)
        np.testing.assert_array_equal(a.factors[: a.n], b.factors[: b.n])
    # the restarted updater starts a new rebuild at once, to re-solve the rows left over
    settings = UpdaterSettings(
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9"),  # never contacted here
        metrics=MetricsSettings(port=-1),
        state_dir=tmp_path / "db",
        model=CFG,
    )
    updater = Updater(settings)
    try:
        assert updater._rebuild_due()
        updater.store.clear_rebuild_unfinished()  # what a rejected rebuild does
        assert updater.store.rebuild_unfinished() is None
    finally:
        updater.close()


def test_the_replaced_model_stays_readable_for_a_while(tmp_path: Path) -> None:
    """After a swap, query processes may still answer from a view of the old model (users
    pinned to its generation) until their next refresh: its rows go later, not with the swap."""
    feed = _Feed(tmp_path, seed=3)
    feed.learn(5_000)
    feed.store.close()
    settings = UpdaterSettings(
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9"),  # never contacted here
        metrics=MetricsSettings(port=-1),
        state_dir=tmp_path / "db",
        model=CFG,
        rebuild=RebuildConfig(iterations=2, guard_events=0, guard_margin=1.0, max_rounds=1),
    )
    updater = Updater(settings)

    def generations() -> set[int]:
        store = updater.store
        return {int.from_bytes(k[:4], "big") for cf in MODEL_CFS for k in store.cf[cf].keys()}  # noqa: SIM118

    def rebuild() -> None:
        updater._rebuild_requested = True
        updater._drive_rebuild()
        end = time.monotonic() + 300  # a hang guard: a cold numba cache compiles here
        while updater.rebuild is not None:
            assert time.monotonic() < end, "the rebuild never ended"
            time.sleep(0.01)
            updater._drive_rebuild()

    try:
        rebuild()
        assert updater.store.generation() == 1
        assert generations() == {0, 1}  # the old model is still there for readers
        updater._drive_rebuild()
        assert generations() == {0, 1}  # and stays through the grace period
        rebuild()  # another rebuild right away (a `stream-mf rebuild` sent during the first)
        assert updater.store.generation() == 2
        assert generations() == {0, 1, 2}  # each replaced model keeps its own grace period
        assert len(updater._drops) == 2
        updater._drops[0] = (0.0, updater._drops[0][1])  # the first grace period is over
        updater._drive_rebuild()
        assert generations() == {1, 2}
        updater._drops = [(0.0, gen) for _when, gen in updater._drops]  # and the second
        updater._drive_rebuild()
        assert generations() == {2}
    finally:
        updater.close()
