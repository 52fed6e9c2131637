from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from stream_mf.config import ModelConfig
from stream_mf.model import EventBatch, OnlineModel
from stream_mf.sgd import Counter
from stream_mf.state import ModelState, confidence_items
from stream_mf.store import ConfigMismatchError, StateStore, raw_keys
from stream_mf.store_layout import fill_rows
from tests.synthetic import planted_stream

CFG = ModelConfig(dim=8, n_negatives=3, sampler_refresh=500)
TOPIC = "interactions"


def stream(n: int = 6000, seed: int = 1) -> EventBatch:
    s = planted_stream(n, 400, 300, seed=seed)
    return EventBatch.build(s.user_ids(), s.item_ids(), np.ones(n), s.times)


def assert_same_state(a: ModelState, b: ModelState) -> None:
    assert a.users.ids == b.users.ids and a.items.ids == b.items.ids
    for kind in ("users", "items"):
        ta, tb = getattr(a, kind), getattr(b, kind)
        for arr in ("factors", "bias", "count", "last", "logpop"):
            assert np.array_equal(getattr(ta, arr)[: ta.n], getattr(tb, arr)[: tb.n]), (kind, arr)
    assert np.array_equal(a.counters, b.counters)
    assert np.array_equal(a.clock, b.clock)
    n = int(a.counters[Counter.CDF_LEN])
    assert np.array_equal(a.cdf[:, :n], b.cdf[:, :n])
    ka, va = confidence_items(a.confidence)
    kb, vb = confidence_items(b.confidence)
    assert np.array_equal(ka, kb) and np.array_equal(va, vb)
    ta, tb, ni, nu = a.transitions, b.transitions, a.items.n, a.users.n
    assert np.array_equal(ta.succ[:ni], tb.succ[:ni]), "transition successors"
    assert np.array_equal(ta.logw[:ni], tb.logw[:ni]), "transition counts"
    assert np.array_equal(ta.last[:nu], tb.last[:nu]), "users' last items"


def test_state_survives_close_and_reopen(tmp_path: Path) -> None:
    batch = stream()
    with StateStore(tmp_path / "db") as store:
        model = OnlineModel(CFG, store.load(CFG))
        for lo in range(0, 6000, 700):
            delta = model.learn(batch.slice(lo, lo + 700))
            store.commit_batch(model.state, delta, {(TOPIC, 0): min(lo + 700, 6000)})
    with StateStore(tmp_path / "db") as store:
        loaded = store.load()
        assert store.offsets() == {(TOPIC, 0): 6000}
        assert store.events_applied() == 6000
        assert loaded.config == CFG
    assert (loaded.transitions.succ[: loaded.items.n] >= 0).any()  # transitions persisted too
    assert_same_state(model.state, loaded)
    # and learning goes on identically from the loaded copy
    more = stream(500, seed=9)
    model.learn(more)
    OnlineModel(CFG, loaded).learn(more)
    assert_same_state(model.state, loaded)


def test_reopening_with_another_dim_is_refused(tmp_path: Path) -> None:
    with StateStore(tmp_path / "db") as store:
        m = OnlineModel(CFG, store.load(CFG))
        store.commit_batch(m.state, m.learn(stream(100)))
    with StateStore(tmp_path / "db") as store, pytest.raises(ConfigMismatchError, match="dim"):
        store.load(CFG.model_copy(update={"dim": 16}))


def test_reopening_with_another_half_life_is_refused(tmp_path: Path) -> None:
    """Popularity and confidences are anchored at the half-life's rate: changing it (the default
    did, 30 -> 180 days) would weigh old and new events by e^(t * difference)."""
    old = CFG.model_copy(update={"half_life_s": 30 * 86400.0})
    with StateStore(tmp_path / "db") as store:
        m = OnlineModel(old, store.load(old))
        store.commit_batch(m.state, m.learn(stream(100)))
    with (
        StateStore(tmp_path / "db") as store,
        pytest.raises(ConfigMismatchError, match="half_life"),
    ):
        store.load(CFG.model_copy(update={"half_life_s": 180 * 86400.0}))
    with StateStore(tmp_path / "db") as store:
        assert store.load(old).config.half_life_s == 30 * 86400.0


def test_user_items_prefix_scan(tmp_path: Path) -> None:
    batch = stream(2000)
    with StateStore(tmp_path / "db") as store:
        m = OnlineModel(CFG, store.load(CFG))
        store.commit_batch(m.state, m.learn(batch))
        u = m.state.users.index["u7"]
        items, vals = store.user_items(u)
    expect = sorted(
        {
            m.state.items.index[i]
            for uu, i in zip(batch.user_ids, batch.item_ids, strict=True)
            if uu == "u7"
        }
    )
    assert items.tolist() == expect and np.all(np.isfinite(vals))


def test_secondary_follows_primary(tmp_path: Path) -> None:
    batch = stream(3000)
    with StateStore(tmp_path / "db") as primary:
        m = OnlineModel(CFG, primary.load(CFG))
        primary.commit_batch(m.state, m.learn(batch.slice(0, 1000)), {(TOPIC, 0): 1000})
        follower = StateStore(tmp_path / "db", secondary=tmp_path / "sec")
        assert follower.events_applied() == 1000
        primary.commit_batch(m.state, m.learn(batch.slice(1000, 3000)), {(TOPIC, 0): 3000})
        assert follower.events_applied() == 1000
        follower.catch_up()
        assert follower.events_applied() == 3000
        assert_same_state(m.state, follower.load())
        follower.close()


@pytest.mark.parametrize("n_read", ["all", "fewer", "more"])
def test_item_arrays_match_the_model(tmp_path: Path, n_read: str) -> None:
    """What a query process serves is what the updater holds: full blocks copied in one piece,
    the short last block, and reads of fewer or more rows than the store has."""
    batch = stream(3000)
    with StateStore(tmp_path / "db") as primary:
        m = OnlineModel(CFG, primary.load(CFG))
        primary.commit_batch(m.state, m.learn(batch), {(TOPIC, 0): 3000})
        items = m.state.items
        assert items.n % 16, "the test needs a short last block"
        n = {"all": items.n, "fewer": items.n - 21, "more": items.n + 5}[n_read]
        factors, bias, logpop = primary.item_arrays(CFG.dim, n)
        k = min(n, items.n)
        assert np.array_equal(factors[:k], items.factors[:k])
        assert np.array_equal(bias[:k], items.bias[:k])
        assert np.array_equal(logpop[:k], items.logpop[:k])
        assert not factors[k:].any() and np.all(np.isneginf(logpop[k:]))


def test_fill_rows_handles_gaps_short_and_long_blocks() -> None:
    """The one-piece copy of full blocks and the block-by-block rest agree with a plain copy:
    a missing block in the middle, a short last block, a block past `n`, columnar blocks."""
    rng = np.random.default_rng(0)
    n, dim = 16 * 5 + 7, 3
    want = rng.standard_normal((16 * 7, dim)).astype(np.float32)

    def block(b: int) -> bytes:
        return want[b * 16 : (b + 1) * 16].tobytes()

    blocks = [
        (0, block(0)),
        (1, block(1)),
        (3, block(3)),
        (4, block(4)),
        (5, want[80:87].tobytes()),
        (6, block(6)),
    ]
    out = np.zeros((n, dim), np.float32)
    fill_rows(out, blocks)
    expect = want[:n].copy()
    expect[32:48] = 0.0  # block 2 is missing
    assert np.array_equal(out, expect)
    # columnar blocks (count, last, logpop of each row one after the other): the third column
    cols = rng.standard_normal((3, 3 * 16))
    meta = [(b, cols[:, b * 16 : (b + 1) * 16].tobytes()) for b in range(3)]
    lp = np.full(40, -np.inf)
    fill_rows(lp, meta, columns=3, column=2)
    assert np.array_equal(lp, cols[2, :40])


WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    sys.path.insert(0, {tests!r})
    from test_store import CFG, TOPIC, stream
    from stream_mf.model import OnlineModel
    from stream_mf.store import StateStore
    batch = stream(60000, seed=4)
    store = StateStore({db!r})
    model = OnlineModel(CFG, store.load(CFG))
    done = dict(store.offsets()).get((TOPIC, 0), 0)
    print("ready", flush=True)
    while done < 60000:
        hi = min(done + 101, 60000)
        store.commit_batch(model.state, model.learn(batch.slice(done, hi)), {{(TOPIC, 0): hi}})
        done = hi
        print(done, flush=True)
    print("done", flush=True)
    """
)


def test_commit_is_all_or_nothing_under_sigkill(tmp_path: Path) -> None:
    """Kill a writer mid-stream repeatedly: each restart resumes exactly where the store says."""
    db = tmp_path / "db"
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=str(Path(__file__).parent), db=str(db)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    rng = np.random.default_rng(0)
    kills = 0
    resumed_at = 0
    while kills < 5:
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env)
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == b"ready"
            target = resumed_at + int(rng.integers(1000, 8000))
            for line in proc.stdout:
                if line.strip() == b"done" or int(line) >= target:
                    break
            proc.send_signal(signal.SIGKILL)  # lands wherever the writer is by now
            kills += 1
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        with StateStore(db) as store:
            state = store.load()
            nxt = store.offsets().get((TOPIC, 0), 0)
            # the counters, the per-entity counts and the offset all come from the same batch
            assert state.events_applied == nxt >= resumed_at
            assert int(state.users.count[: state.users.n].sum()) == nxt
            assert int(state.items.count[: state.items.n].sum()) == nxt
            resumed_at = nxt
    assert kills >= 3
    # finish and compare with an uninterrupted run: bit-identical
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    reference = OnlineModel(CFG)
    batch = stream(60000, seed=4)
    for lo in range(0, 60000, 5000):
        reference.learn(batch.slice(lo, lo + 5000))
    with StateStore(db) as store:
        assert_same_state(reference.state, store.load())


def test_the_layout_docstring_lists_every_meta_key_the_registry_has() -> None:
    """One registry of meta keys; the layout the docs show is checked against it."""
    import stream_mf.store_layout as layout

    doc = layout.__doc__ or ""
    section = doc.split("Meta keys")[1].split("\n\n")[0].splitlines()[1:]
    listed = {line.split()[0]: " ".join(line.split()[1:]) for line in section if line.strip()}
    want = {k.key.decode(): k.value for k in layout.META.values()}
    assert listed == want


def test_checkpoints_store_what_the_deferred_batches_changed(tmp_path: Path) -> None:
    """Deferred batches are published at once (on_commit, counted) but written only at a
    checkpoint, merged: the store then equals the model; a crash before it loses them (the
    updater replays them), `user_items` sees them meanwhile, and any other commit writes them
    first."""
    from stream_mf.writes import MarkRebuilt

    batch = stream()
    seen: list[tuple[int, bool]] = []
    with StateStore(tmp_path / "db") as store:
        store.deferred = True
        store.on_commit = lambda info: seen.append((info.seq, info.durable))
        model = OnlineModel(CFG, store.load(CFG))
        for lo in range(0, 3500, 700):
            d = model.learn(batch.slice(lo, lo + 700))
            store.commit_batch(model.state, d, {(TOPIC, 0): lo + 700})
        assert store.pending == 5 and store.offsets() == {} and store.events_applied() == 0
        assert store.commits() == 5 and store.durable_commits() == 0
        u = int(model.state.users.lookup([batch.user_ids[0]])[0])
        items, _ = store.user_items(u)  # the pending pairs of that user, from memory
        want = sorted(k & 0xFFFFFFFF for k in confidence_items(model.state.confidence)[0]
                      if k >> 32 == u)  # fmt: skip
        assert items.tolist() == want
        info = store.checkpoint(model.state)
        assert info is not None and info.batches == 5 and info.events == 3500 and info.bytes
        assert store.pending == 0 and store.durable_commits() == 5
        assert store.checkpoint(model.state) is None
        d = model.learn(batch.slice(3500, 4000))
        store.commit_batch(model.state, d, {(TOPIC, 0): 4000})
        store.apply(model.state, MarkRebuilt(4000))  # another commit: a checkpoint first
        assert store.offsets() == {(TOPIC, 0): 4000} and store.pending == 0
        d = model.learn(batch.slice(4000, 4500))  # learned after the checkpoint: lost below
        store.commit_batch(model.state, d, {(TOPIC, 0): 4500})
        # stored pairs and pending ones together, the pending value of a pair winning: every
        # user's pairs and values are the model's own (a value off by a batch fails this)
        keys, vals = confidence_items(model.state.confidence)
        for uid in dict.fromkeys(batch.user_ids[4000:4500][:40]):
            u = int(model.state.users.lookup([uid])[0])
            mine = (keys >> 32) == u
            got_i, got_v = store.user_items(u)
            assert got_i.tolist() == (keys[mine] & 0xFFFFFFFF).tolist()
            assert got_v.tobytes() == vals[mine].tobytes()
    assert seen == [(j, False) for j in range(1, 7)] + [(7, False)]
    with StateStore(tmp_path / "db") as store:
        loaded = store.load()
        assert store.offsets() == {(TOPIC, 0): 4000} and store.commits() == 6
    ref = OnlineModel(CFG, ModelState.empty(CFG))
    for lo in range(0, 4000, 300):  # cut otherwise: the same state
        ref.learn(batch.slice(lo, min(lo + 300, 4000)))
    assert_same_state(ref.state, loaded)


def test_every_meta_key_written_is_registered(tmp_path: Path) -> None:
    """A store after batches, a flip (with a deterministic rebuild's mark), an unfinished mark,
    offsets moved back and the mark's clearing holds only meta keys the registry lists (and no
    registered key is a typo nothing writes)."""
    from stream_mf.store_layout import BATCH_LOG_PREFIX, META

    batch = stream(2000)
    with StateStore(tmp_path / "db") as store:
        m = OnlineModel(CFG, store.load(CFG))
        store.commit_batch(
            m.state, m.learn(batch.slice(0, 1000)), {(TOPIC, 0): 1000}, batch.times[:1000]
        )
        m.state.model_version += 1
        rows = np.arange(m.state.users.n)
        store.flip(m.state, 1, rows, np.arange(m.state.items.n), unfinished=True,
                   rebuilt_events=1000)  # fmt: skip
        store.write_offsets([((TOPIC, 0), 500)])  # moved back: a new offset epoch
        written = set(raw_keys(store.cf["meta"]))
        store.after_swap_step(m.state, rows[:3], rows[:0], last=True)
        assert store.rebuild_unfinished() is None and store.generation() == 1
    names = {k.decode() for k in written if not k.startswith(BATCH_LOG_PREFIX)}
    assert names == {n for n in META if not n.startswith(BATCH_LOG_PREFIX.decode())}
    assert any(k.startswith(BATCH_LOG_PREFIX) for k in written)


def test_a_default_left_alone_takes_the_stored_value(tmp_path: Path) -> None:
    """An upgrade that changes a structural default (the half-life did) opens the stores built
    before it: a setting not given on purpose takes the store's value."""
    old = ModelConfig(dim=CFG.dim, half_life_s=30 * 86400.0)
    with StateStore(tmp_path / "db") as store:
        m = OnlineModel(old, store.load(old))
        store.commit_batch(m.state, m.learn(stream(100)))
    upgraded = ModelConfig(dim=CFG.dim)  # today's default half-life, not given on purpose
    with StateStore(tmp_path / "db") as store:
        assert store.load(upgraded).config.half_life_s == 30 * 86400.0


def test_a_format_1_store_opens_with_empty_transitions(tmp_path: Path) -> None:
    """A store written before transitions (no such rows, format 1, `tests/legacy_store.py`)
    loads with an empty table (and is migrated to this format when opened)."""
    from stream_mf.store_layout import FORMAT, FORMAT_KEY
    from tests.legacy_store import to_legacy

    with StateStore(tmp_path / "db") as store:
        m = OnlineModel(CFG, store.load(CFG))
        store.commit_batch(m.state, m.learn(stream(300)))
    to_legacy(tmp_path / "db", b"1")
    with StateStore(tmp_path / "db") as store:
        st = store.load()
        assert (st.transitions.succ < 0).all() and (st.transitions.last < 0).all()
        m = OnlineModel(CFG, st)
        store.commit_batch(m.state, m.learn(stream(50, seed=3)))
        assert store.cf["meta"][FORMAT_KEY] == FORMAT
        assert store.load().transitions.last[: st.users.n].max() >= 0
