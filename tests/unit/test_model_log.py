"""The model log's format and reader (stream_mf/model_log.py): records built from a real model
as the updater builds them, read back as a query process reads them."""

from __future__ import annotations

import numpy as np
import pytest

from stream_mf.answer import StateUsers, answer
from stream_mf.config import ModelConfig
from stream_mf.messages import RecRequest
from stream_mf.model import EventBatch, OnlineModel
from stream_mf.model_log import (
    MARKER_KEY,
    LogFormatError,
    Marker,
    MixedGenerationError,
    ModelReader,
    PendingRows,
    PinnedUsers,
    SeenIndex,
    Served,
    begin_record,
    decode,
    encode_user,
    filled_rows,
    item_records,
    materialise,
    slice_record,
    snapshot_records,
    transition_records,
    user_key,
    user_records,
)
from stream_mf.recommend import ItemView
from stream_mf.state import EntityTable, ModelState, confidence_items
from tests.synthetic import planted_stream

CFG = ModelConfig(dim=8, n_negatives=3, sampler_refresh=500)


def _vec(served: Served | None, uid: str) -> np.ndarray:
    """A served user's vector (the reader has served a model, and it knows the user)."""
    assert served is not None
    rec = served.users.user(uid)
    assert rec is not None
    return rec.vector


def stream(n: int, seed: int = 1, first: int = 0) -> EventBatch:
    s = planted_stream(n, 300, 200, seed=seed)
    return EventBatch.build(s.user_ids(), s.item_ids(), np.ones(n), s.times + first)


def marker(state: ModelState, seq: int, gen: int = 0, snapshot: bool = False) -> bytes:
    return Marker(
        seq=seq, gen=gen, version=state.model_version, events=state.events_applied,
        clock=float(state.clock[0]), n_users=state.users.n, n_items=state.items.n,
        snapshot=snapshot, snap=0,
    ).encode()  # fmt: skip


def snapshot(state: ModelState, seq: int = 1, gen: int = 0) -> list[tuple[bytes, bytes | None]]:
    seen = SeenIndex(confidence_items(state.confidence)[0])
    return [
        begin_record(seq, gen),
        *snapshot_records(state, gen, seen),
        (MARKER_KEY, marker(state, seq, gen, True)),
    ]


def commit(
    state: ModelState,
    users: np.ndarray,
    items: np.ndarray,
    seq: int,
    gen: int = 0,
    trans: np.ndarray | None = None,
) -> list[tuple[bytes, bytes | None]]:
    """What the publisher sends for one commit whose item rows go out with it."""
    seen = SeenIndex(confidence_items(state.confidence)[0])
    t = state.transitions
    rows = [] if trans is None else trans.tolist()
    return [
        *user_records(state.users, gen, seen, np.unique(users).tolist(), last=t.last),
        *item_records(state.items, gen, np.unique(items).tolist()),
        *transition_records(t.succ, t.logw, gen, rows),
        (MARKER_KEY, marker(state, seq, gen)),
    ]


def assert_reader_equals(reader: ModelReader, state: ModelState) -> None:
    live = reader.live
    assert live is not None
    for a, b in ((live.users, state.users), (live.items, state.items)):
        assert a.n == b.n and list(a.ids) == list(b.ids)
        for name in ("factors", "bias", "count", "last", "logpop"):
            assert getattr(a, name)[: b.n].tobytes() == getattr(b, name)[: b.n].tobytes(), name
    want = StateUsers(state)
    served = reader.served
    assert served is not None
    for uid in state.users.ids[:50]:
        got, expect = served.users.user(uid), want.user(uid)
        assert got is not None and expect is not None and np.array_equal(got.seen, expect.seen)
        assert got.last_item == expect.last_item
    # the transition rows and users' last items (`stream_mf/transitions.py`)
    t, n = state.transitions, state.items.n
    k = min(n, live.succ.shape[0])  # rows the reader never got hold nothing
    assert np.array_equal(live.succ[:k], t.succ[:k]) and np.array_equal(live.logw[:k], t.logw[:k])
    assert (t.succ[k:n] < 0).all()
    assert np.array_equal(live.user_last[: state.users.n], t.last[: state.users.n])


def test_a_snapshot_then_commits_materialise_the_model_bit_for_bit() -> None:
    m = OnlineModel(CFG, ModelState.empty(CFG))
    m.learn(stream(3000))
    records = snapshot(m.state)
    for j in range(3):
        d = m.learn(stream(500, seed=10 + j, first=10_000 * (j + 1)))
        ext = np.arange(*d.new_users)
        records += commit(
            m.state, np.concatenate([d.users, ext]), d.items, seq=2 + j, trans=d.trans_rows
        )
    reader = materialise(records)
    assert reader.skipped == 0
    assert_reader_equals(reader, m.state)
    # and it answers exactly as the model itself does
    view = ItemView.from_state(m.state)
    served = reader.served
    assert served is not None
    for uid in m.state.users.ids[:20]:
        req = RecRequest(request_id="r", user_id=uid, k=5)
        a = answer(req, served.view, served.users)
        b = answer(req, view, StateUsers(m.state))
        assert [i.item_id for i in a.items] == [i.item_id for i in b.items]


def test_a_commit_is_applied_whole_at_its_marker_or_not_at_all() -> None:
    m = OnlineModel(CFG, ModelState.empty(CFG))
    m.learn(stream(2000))
    reader = materialise(snapshot(m.state))
    before = reader.served
    uid = m.state.users.ids[0]
    old = _vec(before, uid).copy()
    d = m.learn(stream(300, seed=5, first=50_000))
    rows = commit(m.state, d.users, d.items, seq=2, trans=d.trans_rows)
    for k, v in rows[:-1]:  # every row, no marker: a commit cut short by a crash
        reader.feed(decode(k, v))
    assert not reader.publish()
    assert reader.served is before
    assert np.array_equal(_vec(reader.served, uid), old)
    reader.feed(decode(*rows[-1]))
    assert reader.publish()
    assert_reader_equals(reader, m.state)


def test_a_big_commit_kept_as_bytes_applies_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past `SPILL` rows a commit waits for its marker as bytes in one buffer (a catch-up's
    commits of every row): applied in chunks, the model is the same, and cut short it is not
    applied at all."""
    m = OnlineModel(CFG, ModelState.empty(CFG))
    m.learn(stream(2000))
    records = snapshot(m.state)
    d = m.learn(stream(600, seed=7, first=40_000))
    ext = np.arange(*d.new_users)
    big = commit(m.state, np.concatenate([d.users, ext]), d.items, seq=2, trans=d.trans_rows)
    monkeypatch.setattr(PendingRows, "SPILL", 7)
    reader = materialise(records)
    before = reader.served
    for k, v in big[:-1]:
        reader.feed(decode(k, v))
    assert len(reader.pending) == len(big) - 1 and reader.pending.meta and not reader.pending.recs
    assert reader.pending.nbytes() >= sum(len(v or b"") for _k, v in big[:-1]) // 2
    assert not reader.publish() and reader.served is before
    reader.feed(decode(*big[-1]))
    assert reader.publish() and reader.skipped == 0 and len(reader.pending) == 0
    assert_reader_equals(reader, m.state)


def test_a_request_never_mixes_generations_through_a_swap() -> None:
    """A request holding the served model of generation 0 keeps user rows of generation 0
    while a rebuild's snapshot (generation 1) is read and swapped in; rows of another
    generation outside a snapshot are never applied; and the check inside the reader fires
    if a user row of another generation ever reached a view."""
    m = OnlineModel(CFG, ModelState.empty(CFG))
    m.learn(stream(2000))
    reader = materialise(snapshot(m.state))
    old = reader.served
    uid = m.state.users.ids[3]
    old_vec = _vec(old, uid).copy()
    m.state.users.factors[: m.state.users.n] *= -1.0  # the rebuilt model
    m.state.model_version += 1
    for k, v in snapshot(m.state, seq=2, gen=1):
        reader.feed(decode(k, v))
        assert reader.served is old  # nothing of generation 1 shows before its marker
        assert np.array_equal(_vec(old, uid), old_vec)
    assert reader.publish()
    new = reader.served
    assert new is not None and new.view.generation == 1 and new.users.generation == 1
    assert np.array_equal(_vec(new, uid), -old_vec)
    assert np.array_equal(_vec(old, uid), old_vec)  # still pinned, still gen 0
    # a stray generation-0 row after the swap is skipped, never applied
    seen = SeenIndex(confidence_items(m.state.confidence)[0])
    stray = list(user_records(m.state.users, 0, seen, [3]))
    for k, v in [*stray, (MARKER_KEY, marker(m.state, 3, gen=1))]:
        reader.feed(decode(k, v))
    reader.publish()
    assert reader.skipped == 1
    assert np.array_equal(_vec(reader.served, uid), -old_vec)
    # the assertion itself: a view of generation 0 with these (generation-1) users refuses
    mixed = PinnedUsers(new.users.model, generation=0)
    with pytest.raises(MixedGenerationError):
        mixed.user(uid)


@pytest.mark.parametrize(
    "key,value",
    [
        (None, b"x"),
        (b"zzz", b"x"),
        (MARKER_KEY, b"{not json"),
        (MARKER_KEY, b'{"seq": 1}'),
        (user_key(0, 1), b"\x01\x00"),
        (user_key(0, 1), b"\x09" + bytes(40)),
        (b"C", b"{}x"),
    ],
)
def test_a_record_that_does_not_parse_is_refused(key: bytes | None, value: bytes) -> None:
    with pytest.raises(LogFormatError):
        decode(key, value)


def test_unreadable_records_are_skipped_and_counted_never_applied() -> None:
    m = OnlineModel(CFG, ModelState.empty(CFG))
    m.learn(stream(1000))
    records = snapshot(m.state)
    records.insert(5, (user_key(0, 0), b"garbage"))
    records.insert(9, (b"??", b""))
    reader = materialise(records)
    assert reader.skipped == 2
    assert_reader_equals(reader, m.state)


def test_seen_index_follows_commits() -> None:
    m = OnlineModel(CFG, ModelState.empty(CFG))
    m.learn(stream(1000))
    idx = SeenIndex(confidence_items(m.state.confidence)[0])
    for j in range(3):
        d = m.learn(stream(400, seed=20 + j, first=10_000 * (j + 1)))
        idx.add(d.pair_keys)
    keys, _ = confidence_items(m.state.confidence)
    want = SeenIndex(keys)
    assert np.array_equal(want.users(), idx.users())
    for u in want.users().tolist():
        assert np.array_equal(idx.of(u), want.of(u))


def test_a_snapshot_in_slices_between_commits_is_applied_in_place() -> None:
    """The updater sends a periodic snapshot a slice at a time with commits in between: a
    reader already serving that generation keeps serving its model (no second model, commits
    keep coming through) and skips the slices' rows, which it has; a reader starting at the
    BEGIN has the whole model at its marker; both equal the model bit for bit."""
    m = OnlineModel(CFG, ModelState.empty(CFG))
    m.learn(stream(2000))
    tailing = materialise(snapshot(m.state))
    live = tailing.live
    st = m.state
    seen = SeenIndex(confidence_items(st.confidence)[0])
    half = st.users.n // 2
    sliced: list[tuple[bytes, bytes | None]] = [
        begin_record(2, 0, st.users.n, st.items.n),
        next(snapshot_records(st, 0, seen)),  # the config
        slice_record(half),
        *user_records(st.users, 0, seen, range(half), last=st.transitions.last),
    ]
    d = m.learn(stream(300, seed=7, first=60_000))
    users = np.concatenate([d.users, np.arange(*d.new_users)])
    sliced += commit(m.state, users, d.items, 2, trans=d.trans_rows)
    seen = SeenIndex(confidence_items(st.confidence)[0])
    t = st.transitions
    filled = filled_rows(t.succ, st.items.n)
    rest: list[tuple[bytes, bytes | None]] = [
        slice_record(st.users.n - half),
        *user_records(st.users, 0, seen, range(half, st.users.n), last=t.last),
        slice_record(st.items.n),
        *item_records(st.items, 0, range(st.items.n)),
        slice_record(filled.size),
        *transition_records(t.succ, t.logw, 0, filled.tolist()),
        (MARKER_KEY, marker(st, 3, 0, True)),
    ]
    skipped = 0

    def feed(records: list[tuple[bytes, bytes | None]]) -> None:
        nonlocal skipped
        for k, v in records:
            if tailing.skips_next():  # as the follower does: not even decoded
                skipped += 1
                continue
            tailing.feed(decode(k, v))

    feed(sliced)
    assert tailing.publish() and tailing.live is live  # the commit came through, in place
    uid = st.users.ids[int(d.users[0])]
    assert np.array_equal(_vec(tailing.served, uid), st.users.factors[int(d.users[0])])
    feed(rest)
    tailing.publish()
    assert tailing.live is live and tailing.building is None
    assert skipped == st.users.n + st.items.n + filled.size  # the served model had every one
    assert_reader_equals(tailing, st)
    fresh = materialise(sliced + rest)
    assert_reader_equals(fresh, st)


def test_a_snapshot_on_its_own_topic_then_the_tail_converges_to_the_model() -> None:
    """A periodic snapshot on the snapshot topic, taken a slice at a time while commits go
    on on the model topic, then the model topic from the tail point (a marker written before
    the snapshot's BEGIN): rows changed after their slice (their newer value is in the tail),
    before it (the snapshot has the newer value, the tail the same one again), item and
    transition rows changed but coalesced (the snapshot has the store's value, the tail the
    flush later). A fresh reader from there equals a reader that tailed the model topic from
    the first snapshot, and the model, bit for bit."""
    m = OnlineModel(CFG, ModelState.empty(CFG))
    m.learn(stream(2000))
    st = m.state
    log = snapshot(st)  # the model topic: the first snapshot, then commits
    tail = len(log)
    log.append((MARKER_KEY, marker(st, 1)))  # the tail point
    seen = SeenIndex(confidence_items(st.confidence)[0])
    n_users, n_items = st.users.n, st.items.n
    half = n_users // 2
    side: list[tuple[bytes, bytes | None]] = [  # the snapshot topic
        begin_record(1, 0, n_users, n_items),
        next(snapshot_records(st, 0, seen)),  # the config
        *user_records(st.users, 0, seen, range(half), last=st.transitions.last),
    ]
    # a commit while slices go out: its user rows now, its item and transition rows marked
    a = m.learn(stream(300, seed=7, first=60_000))
    log += commit(st, np.concatenate([a.users, np.arange(*a.new_users)]), np.arange(0), 2)
    seen = SeenIndex(confidence_items(st.confidence)[0])
    t = st.transitions
    side += [
        *user_records(st.users, 0, seen, range(half, n_users), last=t.last),
        *item_records(st.items, 0, range(n_items)),
        *transition_records(t.succ, t.logw, 0, filled_rows(t.succ, n_items).tolist()),
        (MARKER_KEY, Marker(seq=1, gen=0, version=0, events=0, clock=0.0, n_users=n_users,
                            n_items=n_items, snapshot=True).encode()),
    ]  # fmt: skip
    log.append((MARKER_KEY, marker(st, 2)))  # names it
    # the next commit, and the coalesced item and transition rows' flush
    b = m.learn(stream(300, seed=8, first=70_000))
    items = np.union1d(np.union1d(a.items, b.items), np.arange(n_items, st.items.n))
    trans = np.union1d(a.trans_rows, b.trans_rows)
    users = np.concatenate([b.users, np.arange(*b.new_users)])
    log += commit(st, users, items, 3, trans=trans)
    fresh = materialise(side + log[tail:])
    assert fresh.skipped == 0
    assert_reader_equals(fresh, st)
    assert_reader_equals(materialise(log), st)


def test_a_marker_from_before_the_snapshot_topic_still_reads() -> None:
    """Markers of older logs have no `snap_topic` / `snap_begin`: a reader starts at `snap`
    on the model topic, as it did."""
    import orjson

    old = {"seq": 3, "gen": 0, "version": 1, "events": 9, "clock": 1.0, "n_users": 2,
           "n_items": 2, "offsets": {}, "snapshot": False, "snap": 7, "pending_items": 0,
           "count": 0, "times": [], "at": 0.0}  # fmt: skip
    m = Marker.decode(orjson.dumps(old))
    assert m.snap == 7 and m.snap_topic is None and m.snap_begin is None


def test_compact_ids_and_seen_items_find_every_row() -> None:
    """The replica's id map (a sorted hash array plus a dict of the latest) and seen-item
    store (one array, compacted) against a plain dict and list."""
    from stream_mf.model_log import CompactIds, SeenStore

    ids = CompactIds()
    want: dict[str, int] = {}
    rng = np.random.default_rng(0)
    for lo in (0, 10, 6000, 6003):  # small sets stay in the dict, a large one is sorted in
        hi = lo + (5000 if lo == 10 else 3)
        ids.extend_to(hi)
        names = [f"id-{r}-é" for r in range(lo, hi)]
        ids.set_many(list(range(lo, hi)), names)
        want.update(zip(names, range(lo, hi), strict=True))
    assert len(ids) == 6006 and ids[6005] == "id-6005-é" and ids[4] == ""
    assert all(ids.get(k) == v for k, v in want.items())
    assert ids.get("id-99999-é") is None and ids.lookup.get("nope", -1) == -1
    ids.set_many([7], ["id-7-é"])  # the same id again: nothing changes
    assert ids.get("id-7-é") == 7
    seen = SeenStore()
    lists = {
        r: rng.integers(1000, size=int(rng.integers(0, 6))).astype(np.int32) for r in range(300)
    }
    for _ in range(8):  # each list replaced again and again: garbage, then compacted
        rows = np.arange(300)
        seen.set_many(rows, [lists[r].tobytes() for r in range(300)])
        lists = {r: np.append(v, r).astype(np.int32) for r, v in lists.items()}
    for r in range(300):
        assert np.array_equal(seen.of(r), lists[r][:-1])
    assert seen.of(10_000).size == 0


def test_a_request_lets_a_waiting_commit_in_first() -> None:
    """Requests hold the served model's lock while they read its arrays; one that finds the
    reader waiting to write a commit waits for that commit instead of taking the lock again."""
    import threading
    import time

    m = OnlineModel(CFG, ModelState.empty(CFG))
    m.learn(stream(500))
    reader = materialise(snapshot(m.state))
    served = reader.served
    assert served is not None and reader.live is not None
    live = reader.live
    order: list[str] = []
    live.writer_waiting = True

    def request() -> None:
        with served.reading():
            order.append("request")

    t = threading.Thread(target=request)
    t.start()
    time.sleep(0.05)
    with live.lock:  # the commit
        live.writer_waiting = False
        order.append("commit")
    t.join(5)
    assert order == ["commit", "request"]


def test_format_1_user_rows_still_read_without_a_last_item() -> None:
    """A log written before transitions (user rows of format 1, no `t` records) still serves:
    its users have no last item, so they are scored by their factors alone."""
    from stream_mf.model_log import _META, _USER_HEAD, USER_FORMAT

    m = OnlineModel(CFG, ModelState.empty(CFG))
    m.learn(stream(1000))
    st = m.state
    old = []
    for k, v in snapshot(st):
        if k[:1] == b"u" and v is not None and v[0] == USER_FORMAT:
            cut = _USER_HEAD.size + st.users.dim * 4 + _META.itemsize
            v = bytes([1]) + v[1:cut] + v[cut + 4 :]  # format 1: no last item
        if k[:1] != b"t":
            old.append((k, v))
    reader = materialise(old)
    assert reader.skipped == 0 and reader.served is not None
    uid = st.users.ids[0]
    got = reader.served.users.user(uid)
    assert got is not None and got.last_item == -1
    assert np.array_equal(got.seen, StateUsers(st).user(uid).seen)  # type: ignore[union-attr]


def test_transition_rows_of_a_replaced_generation_are_never_applied() -> None:
    """After a swap, a stray transition row of the old generation (and the old rows'
    tombstones) leave the served rows those of the new generation's snapshot."""
    from stream_mf.model_log import trans_key

    m = OnlineModel(CFG, ModelState.empty(CFG))
    m.learn(stream(2000))
    t = m.state.transitions
    reader = materialise(snapshot(m.state))
    row = int(filled_rows(t.succ, m.state.items.n)[0])
    for k, v in snapshot(m.state, seq=2, gen=1):
        reader.feed(decode(k, v))
    reader.publish()
    wrong = t.succ.copy()
    wrong[row] = np.arange(wrong.shape[1])  # what a stray old row would carry
    stray = list(transition_records(wrong, t.logw, 0, [row]))
    for k, v in [*stray, (trans_key(0, row), None), (MARKER_KEY, marker(m.state, 3, gen=1))]:
        reader.feed(decode(k, v))
    reader.publish()
    assert reader.skipped == 1
    assert reader.live is not None and reader.live.gen == 1
    assert np.array_equal(reader.live.succ[row], t.succ[row])
    assert_reader_equals(reader, m.state)


def test_seen_index_add_equals_a_plain_union_per_user() -> None:
    """The vectorised fold (one sort a commit) against sets: unsorted and repeated keys, users
    new and known, big and small rows, item ids up to 2**31 - 1."""
    rng = np.random.default_rng(7)
    want: dict[int, set[int]] = {}
    idx = SeenIndex(np.empty(0, np.int64))
    for _ in range(30):
        n = int(rng.integers(0, 400))
        users = rng.integers(0, 60, n).astype(np.int64)
        items = np.where(rng.random(n) < 0.1, 2**31 - 1, rng.integers(0, 500, n)).astype(np.int64)
        keys = (users << 32) | items
        idx.add(keys)  # any order, repeats included
        for u, i in zip(users.tolist(), items.tolist(), strict=True):
            want.setdefault(u, set()).add(i)
    assert idx.users().tolist() == sorted(want)
    for u, items_u in want.items():
        got = idx.of(u)
        assert got.dtype == np.int32 and got.flags.c_contiguous
        assert got.tolist() == sorted(items_u)
    assert idx.of(10**6).size == 0


def _with_offsets(rows: list[tuple[bytes, bytes | None]], offset: int, count: int = 1) -> list:
    """The commit's records, its marker carrying source offset `offset` of topic t/0."""
    m = Marker.decode(rows[-1][1] or b"")
    m.offsets, m.count = {"t/0": offset}, count
    return [*rows[:-1], (MARKER_KEY, m.encode())]


def test_a_replay_after_a_crash_is_skipped_and_the_reader_never_goes_back() -> None:
    """The updater replays from its last checkpoint; commits of the replay that a reader
    already applied carry source offsets short of its own, so it skips them (a snapshot
    behind it too), and applies what comes after the replay."""
    m = OnlineModel(CFG, ModelState.empty(CFG))
    m.learn(stream(2000))
    reader = materialise(_with_offsets(snapshot(m.state), 2000))
    d = m.learn(stream(300, seed=5, first=50_000))
    ahead = m.state.users.factors.copy()
    for k, v in _with_offsets(commit(m.state, d.users, d.items, seq=2, trans=d.trans_rows), 2300):
        reader.feed(decode(k, v))
    reader.publish()
    # a replay from offset 2000: an older state published again (a crash rewound the learner)
    old = OnlineModel(CFG, ModelState.empty(CFG))
    old.learn(stream(2000))
    old.learn(stream(100, seed=5, first=50_000))
    behind = _with_offsets(snapshot(old.state, seq=3), 2100)
    behind += _with_offsets(commit(old.state, np.arange(5), np.arange(5), seq=4), 2200)
    for k, v in behind:
        reader.feed(decode(k, v))
    reader.publish()
    assert reader.replayed == 2
    live = reader.live
    assert live is not None and live.marker is not None and live.marker.offsets == {"t/0": 2300}
    n = m.state.users.n
    assert live.users.factors[:n].tobytes() == ahead[:n].tobytes()
    # past the replay: applied again
    d = m.learn(stream(200, seed=6, first=90_000))
    for k, v in _with_offsets(commit(m.state, d.users, d.items, seq=5, trans=d.trans_rows), 2500):
        reader.feed(decode(k, v))
    reader.publish()
    assert_reader_equals(reader, m.state)
    # an older epoch is behind whatever its offsets; a newer one is ahead
    a = Marker(seq=1, gen=0, version=0, events=0, clock=0, n_users=0, n_items=0, offsets={"t/0": 9})
    b = Marker(seq=1, gen=0, version=0, events=0, clock=0, n_users=0, n_items=0, offsets={"t/0": 5})
    assert b.behind(a) and not a.behind(b) and not a.behind(a)
    b.epoch = 1
    assert a.behind(b) and not b.behind(a)
    # a commit of events ending where the applied one ended is a replay of them; a marker of no
    # events there (a snapshot after the replay, an item flush) is not
    again = Marker(seq=2, gen=0, version=0, events=0, clock=0, n_users=0, n_items=0,
                   offsets={"t/0": 9}, count=166)  # fmt: skip
    assert again.behind(a)
    again.count = 0
    assert not again.behind(a)


def test_user_rows_from_the_seen_index_equal_encode_user_on_sets() -> None:
    """The flat seen index and the vectorised row encoding publish exactly the bytes of
    `encode_user` over a plain set per user: random commits (fixed seed) with repeats within
    and across commits, users new and known, rows past the table's `last`, a few users with
    thousands of items, and enough commits for the index to grow and compact."""
    rng = np.random.default_rng(11)
    n_users, dim = 3000, 5
    table = EntityTable("user", dim, seed=3, init_scale=0.1)
    table.add([f"u{j}-é" * (j % 3) for j in range(n_users)])
    table.factors[:n_users] = rng.normal(size=(n_users, dim)).astype(np.float32)
    table.bias[:n_users] = rng.normal(size=n_users).astype(np.float32)
    table.count[:n_users] = rng.integers(0, 10**12, n_users)
    table.last[:n_users] = rng.normal(size=n_users) * 1e9
    table.logpop[:n_users] = rng.normal(size=n_users)
    last = rng.integers(-1, 50_000, n_users - 100).astype(np.int32)  # the last 100: none
    want: dict[int, set[int]] = {}
    idx = SeenIndex(np.empty(0, np.int64))
    big = rng.choice(n_users, 4, replace=False)
    for c in range(40):
        n = int(rng.integers(1, 3000))
        users = rng.integers(0, min(n_users, 200 + 100 * c), n).astype(np.int64)
        users[: n // 10] = rng.choice(big, n // 10)  # heavy users: long lists, many repeats
        items = rng.integers(0, 5000, n).astype(np.int64)
        items[rng.random(n) < 0.05] = 2**31 - 1
        if c % 3 == 0:  # a commit that is all repeats of pairs already held
            keys = rng.permutation(np.concatenate([idx_keys(want), (users << 32) | items]))
        else:
            keys = (users << 32) | items
        idx.add(keys)
        for k in keys.tolist():
            want.setdefault(k >> 32, set()).add(k & 0xFFFFFFFF)
        rows = np.unique(np.concatenate([users, rng.integers(0, n_users, 20)]))
        got = list(user_records(table, 7, idx, rows.tolist(), last=last))
        assert len(got) == rows.size
        for (k, v), r in zip(got, rows.tolist(), strict=True):
            seen = np.array(sorted(want.get(r, ())), np.int32)
            li = int(last[r]) if r < last.size else -1
            assert k == user_key(7, r)
            assert v == encode_user(table, r, seen, li)
    assert sum(len(s) for s in want.values()) > 20_000
    assert max(len(want[int(u)]) for u in big) > 1000
    assert idx.users().tolist() == sorted(want)


def idx_keys(want: dict[int, set[int]]) -> np.ndarray:
    """Every (user << 32 | item) pair in `want`."""
    return np.array([(u << 32) | i for u, s in want.items() for i in s], np.int64)
