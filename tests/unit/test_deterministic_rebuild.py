"""Deterministic (inline) rebuilds, and every store write made by the driver's loop thread.

The driver below is the updater's deterministic mode in miniature (consumers/updater.py):
batches cut where `every_events` are due, the rebuild run there to completion with
`run_inline`, the schedule's origin read back from the store after a kill. No Kafka.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from stream_mf.config import ModelConfig, RebuildConfig
from stream_mf.model import EventBatch, OnlineModel
from stream_mf.rebuild import Rebuild, run_inline
from stream_mf.rebuild_scheduler import RebuildScheduler
from stream_mf.state import ModelState, confidence_items
from stream_mf.store import StateStore, StoreError
from stream_mf.writes import (
    ClearUnfinished,
    CommitBatch,
    DropGenerations,
    Flip,
    MarkRebuilt,
    Stage,
    Write,
    with_mark,
)
from tests.synthetic import planted_stream

CFG = ModelConfig(dim=16)
TOPIC = "interactions"
N = 9000
EVERY = 2000
RCFG = RebuildConfig(every_events=EVERY, iterations=3, alpha=5.0, deterministic=True)


def _stream(n: int = N, seed: int = 3) -> EventBatch:
    s = planted_stream(n, 400, 300, n_groups=4, seed=seed)
    return EventBatch.build(s.user_ids(), s.item_ids(), np.ones(n), s.times)


class _KilledError(Exception):
    """The process died before this write."""


def _run(
    tmp: Path | None, seed: int, kill_on: frozenset[tuple[str, int]] = frozenset()
) -> tuple[ModelState, dict[str, int], int]:
    """Learn the stream in random pieces with deterministic rebuilds; with a store at `tmp`,
    die before the n-th write of a kind for each (kind, n) of `kill_on` (redone writes count
    again) and start again from the store. The final state, writes by kind, the kills."""
    batch = _stream()
    rng = np.random.default_rng(seed)
    kinds: dict[str, int] = {}
    kills = 0
    while True:
        store = StateStore(tmp / "db") if tmp is not None else None
        model = OnlineModel(CFG, store.load(CFG) if store is not None else None)
        st = model.state
        origin = (store.rebuilt_events() if store is not None else None) or 0
        sch = RebuildScheduler(EVERY, None, events_at_last=origin, time_at_last=0.0)
        done = store.offsets().get((TOPIC, 0), 0) if store is not None else 0

        def commit(w: Write, store: StateStore | None = store, st: ModelState = st) -> None:
            kind = type(w).__name__
            kinds[kind] = kinds.get(kind, 0) + 1
            if (kind, kinds[kind]) in kill_on:
                raise _KilledError
            if store is not None:
                store.apply(st, w)

        try:
            while True:
                if sch.due(st.events_applied, st.users.n, st.items.n, 0.0):
                    at = st.events_applied
                    sch.started()
                    gen = (store.generation() if store is not None else 0) + 1
                    rb = Rebuild(st, RCFG.inline(), generation=gen, stage=True, inline=True)
                    run_inline(rb, st, at, commit)
                    commit(DropGenerations(older=False))
                    sch.ended(st.events_applied, 0.0, None, False)
                if done >= N:
                    break
                n = int(rng.integers(1, 1500))
                left = sch.events_until_due(st.events_applied)
                piece = batch.slice(done, done + (n if left is None else min(n, left)))
                delta = model.learn(piece)
                done += len(piece)
                commit(CommitBatch(delta, {(TOPIC, 0): done}))
        except _KilledError:
            kills += 1
            assert store is not None
            store.close()  # what was in memory is lost; the store has every commit before
            continue
        if store is not None:
            loaded = store.load()
            store.close()
            assert not _differ(st, loaded), "the store differs from the model in memory"
        return st, kinds, kills


def _differ(a: ModelState, b: ModelState) -> list[str]:
    out = []
    for kind in ("users", "items"):
        ta, tb = getattr(a, kind), getattr(b, kind)
        if ta.ids != tb.ids:
            out.append(f"{kind} ids")
        for arr in ("factors", "bias", "count", "last", "logpop"):
            if getattr(ta, arr)[: ta.n].tobytes() != getattr(tb, arr)[: tb.n].tobytes():
                out.append(f"{kind} {arr}")
    if a.counters.tobytes() != b.counters.tobytes() or a.model_version != b.model_version:
        out.append("counters/version")
    ka, va = confidence_items(a.confidence)
    kb, vb = confidence_items(b.confidence)
    if ka.tobytes() != kb.tobytes() or va.tobytes() != vb.tobytes():
        out.append("confidences")
    return out


def test_deterministic_rebuilds_are_a_function_of_the_stream(tmp_path: Path) -> None:
    ref, kinds, _ = _run(None, seed=0)  # no store, its own cuts
    assert ref.model_version == N // EVERY  # a rebuild at 2000, 4000, 6000 and 8000, swapped
    cut, kinds, _ = _run(tmp_path / "a", seed=1)
    assert not _differ(ref, cut), _differ(ref, cut)
    assert kinds["Flip"] == N // EVERY and kinds["Stage"] >= 2 * kinds["Flip"]
    # kills before and after each kind of a rebuild's commits: between its staged chunks, at
    # its flip (before it: the rebuild runs again; after it, before the next write: never
    # again), and batches before and after rebuilds
    kill_on = frozenset(
        {("Stage", 2), ("Flip", 1), ("DropGenerations", 2), ("Stage", 7), ("Flip", 4),
         ("CommitBatch", 9), ("DropGenerations", 4), ("CommitBatch", 14)}
    )  # fmt: skip
    killed, kinds, kills = _run(tmp_path / "b", seed=2, kill_on=kill_on)
    assert kills == len(kill_on), kinds
    assert not _differ(ref, killed), _differ(ref, killed)


def test_the_last_commit_of_an_inline_rebuild_carries_its_mark() -> None:
    none = np.empty(0, np.int64)
    assert with_mark(Flip(3, none, none), 4000) == Flip(3, none, none, rebuilt_events=4000)
    assert with_mark(ClearUnfinished(), 7) == ClearUnfinished(rebuilt_events=7)
    assert with_mark(None, 7) == MarkRebuilt(7)  # it failed: marked on its own
    with pytest.raises(TypeError):
        with_mark(DropGenerations(), 7)


def test_marks_persist_through_every_commit_kind(tmp_path: Path) -> None:
    model = OnlineModel(CFG)
    with StateStore(tmp_path / "db") as store:
        store.commit_batch(model.state, model.learn(_stream(500)), {(TOPIC, 0): 500})
        assert store.rebuilt_events() is None
        store.apply(model.state, MarkRebuilt(500))
        assert store.rebuilt_events() == 500
        store.apply(model.state, ClearUnfinished(rebuilt_events=600))
        assert store.rebuilt_events() == 600
        none = np.empty(0, np.int64)
        store.apply(model.state, Flip(1, none, none, rebuilt_events=700))
        assert store.rebuilt_events() == 700 and store.generation() == 1


def test_the_schedule_says_how_many_events_are_left_before_a_rebuild() -> None:
    s = RebuildScheduler(every_events=1000, every_seconds=None, events_at_last=0, time_at_last=0)
    assert s.events_until_due(0) == 1000 and s.events_until_due(999) == 1
    assert s.events_until_due(1000) == 0 and s.events_until_due(1500) == 0
    s.started()
    assert s.events_until_due(1000) is None  # one runs
    s.ended(1000, 0.0, None, False)
    assert s.events_until_due(1200) == 800
    assert RebuildScheduler(None, 30.0, 0, 0.0).events_until_due(5) is None


def test_deterministic_mode_needs_an_event_schedule() -> None:
    with pytest.raises(ValueError, match="every_events"):
        RebuildConfig(deterministic=True)
    with pytest.raises(ValueError, match="every_seconds"):
        RebuildConfig(deterministic=True, every_events=10, every_seconds=60.0)
    inline = RCFG.inline()
    assert inline.swap_budget_s == float("inf") and inline.guard_events == 0


def test_store_writes_of_a_background_rebuild_come_from_the_loop_thread(tmp_path: Path) -> None:
    """Issue 11: every named store write is made by the driver's loop, staging included (the
    background thread queues what it staged)."""
    batch = _stream(20_000, seed=5)
    store = StateStore(tmp_path / "db")
    model = OnlineModel(CFG, store.load(CFG))
    st = model.state
    writers: list[int] = []
    write = store._write

    def recording(wb: object) -> None:
        writers.append(threading.get_ident())
        write(wb)  # type: ignore[arg-type]

    store._write = recording  # type: ignore[method-assign]
    done = 0

    def learn(n: int) -> None:
        nonlocal done
        delta = model.learn(batch.slice(done, done + n))
        done += n
        store.apply(st, CommitBatch(delta, {(TOPIC, 0): done}))
        if rb is not None:
            rb.note(delta)

    rb: Rebuild | None = None
    learn(6000)
    cfg = RebuildConfig(iterations=3, guard_events=100, guard_margin=1.0, stage_blocks=4)
    rb = Rebuild(st, cfg, generation=1, stage=True)  # background: a thread of its own
    stages = 0
    outcome = None
    while outcome is None:
        assert done < 20_000, "the rebuild never finished"
        if rb.wants_scores:
            nxt = batch.slice(done, done + 300)
            rb.score(st, st.users.lookup(nxt.user_ids).astype(np.int64),
                     st.items.lookup(nxt.item_ids).astype(np.int64),
                     lambda u: store.user_items(u)[0].astype(np.int64))  # fmt: skip
        learn(300)
        res = rb.step(st)
        stages += isinstance(res.write, Stage)
        if res.write is not None:
            store.apply(st, res.write)
        outcome = res.outcome
        time.sleep(0.005)
    assert outcome.swapped and stages > 2
    assert set(writers) == {threading.get_ident()}, "a store write from another thread"
    loaded = store.load()
    store.close()
    assert not _differ(st, loaded)


def test_a_failed_commit_does_not_mark_the_inline_rebuild_done(tmp_path: Path) -> None:
    """A store write that fails inside an inline rebuild stops the driver unmarked: the next
    start runs the rebuild again (a mark would skip it for good, off the one-pass model)."""
    model = OnlineModel(CFG)
    with StateStore(tmp_path / "db") as store:
        st = model.state
        store.commit_batch(st, model.learn(_stream(EVERY)), {(TOPIC, 0): EVERY})
        stages = 0

        def commit(w: Write) -> None:
            nonlocal stages
            if isinstance(w, Stage):
                stages += 1
                if stages == 2:  # a large WriteBatch fails (a full disk); small ones may not
                    raise StoreError("writing to the model store failed: disk full")
            store.apply(st, w)

        rb = Rebuild(st, RCFG.inline(), generation=1, stage=True, inline=True)
        with pytest.raises(StoreError):
            run_inline(rb, st, EVERY, commit)
        assert store.rebuilt_events() is None and store.generation() == 0


class _EndsWhenAsked:
    """A background round that ends just as the loop asks whether it runs: its last act is to
    queue a staged chunk (the interleaving the GIL allows between two looks at the queue)."""

    def __init__(self, rb: Rebuild) -> None:
        self.rb = rb

    def is_alive(self) -> bool:
        self.rb.staged.append(("user", np.zeros(1, np.int64)))
        return False

    def join(self) -> None:
        pass


def test_a_chunk_queued_as_the_work_ends_is_written_before_the_next_phase() -> None:
    """The queue is looked at after the work is seen to have ended: a chunk queued in between
    is handed out first, not left behind the guard, the swap and the end of the rebuild."""
    model = OnlineModel(CFG)
    st = model.state
    model.learn(_stream(3000))
    rb = Rebuild(st, RebuildConfig(iterations=2), generation=1, stage=True)
    rb.wait()
    while rb.staged:  # the fit's own chunks
        assert isinstance(rb.step(st).write, Stage)
    rb.thread = _EndsWhenAsked(rb)  # type: ignore[assignment]
    res = rb.step(st)
    assert isinstance(res.write, Stage), res
    assert not rb.staged
