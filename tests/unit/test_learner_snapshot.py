"""Learner snapshots (stream_mf/learner_snapshot.py): state -> chunks -> state, bit for bit; a
snapshot cut short or damaged is refused; a restored store carries on exactly like the lost one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stream_mf.learner_snapshot import (
    CHUNK_PREFIX,
    LearnerSnapshot,
    SnapshotEnd,
    SnapshotFormatError,
    assemble,
    chunk_records,
    decode,
    digest,
    encode,
    n_chunks,
)
from stream_mf.model import OnlineModel
from stream_mf.store import StateStore
from stream_mf.writes import Restore
from tests.unit.test_store import CFG, TOPIC, assert_same_state, stream


def _learnt(tmp: Path, n: int = 6000) -> tuple[StateStore, OnlineModel]:
    store = StateStore(tmp)
    model = OnlineModel(CFG, store.load(CFG))
    batch = stream(n)
    for lo in range(0, n, 700):
        delta = model.learn(batch.slice(lo, lo + 700))
        store.commit_batch(model.state, delta, {(TOPIC, 0): min(lo + 700, n)})
    return store, model


def _snapshot(store: StateStore, model: OnlineModel) -> LearnerSnapshot:
    return LearnerSnapshot(
        model.state, store.offsets(), store.generation(), store.commits(), store.rebuilt_at(),
        store.rebuild_unfinished(),
    )  # fmt: skip


def _end(raw: bytes, chunk: int, snap_id: int = 7) -> SnapshotEnd:
    return SnapshotEnd(id=snap_id, chunks=n_chunks(len(raw), chunk), size=len(raw),
                       sha256=digest(raw), begin=0)  # fmt: skip


def test_encode_decode_is_bit_identical(tmp_path: Path) -> None:
    store, model = _learnt(tmp_path / "a")
    try:
        snap = _snapshot(store, model)
        back = decode(encode(snap))
        assert_same_state(model.state, back.state)
        assert back.state.config == CFG
        assert back.state.model_version == model.state.model_version
        assert back.offsets == {(TOPIC, 0): 6000}
        assert back.commits == store.commits() and back.generation == store.generation()
    finally:
        store.close()


def test_chunks_are_bounded_and_reassemble_in_any_order(tmp_path: Path) -> None:
    store, model = _learnt(tmp_path / "a")
    try:
        raw = encode(_snapshot(store, model))
    finally:
        store.close()
    chunk = 4096
    recs = list(chunk_records(7, raw, chunk))
    assert len(recs) == n_chunks(len(raw), chunk) > 3
    assert all(len(v) <= chunk and k[:1] == CHUNK_PREFIX for k, v in recs)
    noise = [(k.replace(b"\x07", b"\x08", 1), v) for k, v in recs[:2]]  # another snapshot's
    shuffled = recs[::-1] + recs[:3] + noise  # duplicates and strangers are harmless
    assert_same_state(model.state, assemble(_end(raw, chunk), shuffled).state)


def test_a_snapshot_cut_short_or_damaged_is_refused(tmp_path: Path) -> None:
    store, model = _learnt(tmp_path / "a", 2000)
    try:
        raw = encode(_snapshot(store, model))
    finally:
        store.close()
    recs = list(chunk_records(7, raw, 1024))
    with pytest.raises(SnapshotFormatError, match="missing"):
        assemble(_end(raw, 1024), recs[:-1])
    bad = [*recs[:-1], (recs[-1][0], b"x" + recs[-1][1][1:])]
    with pytest.raises(SnapshotFormatError, match="digest"):
        assemble(_end(raw, 1024), bad)
    with pytest.raises(SnapshotFormatError):
        decode(b"not a snapshot at all")


def test_a_restored_store_carries_on_like_the_lost_one(tmp_path: Path) -> None:
    """Snapshot at 6,000 events, restore into a new store in one commit, learn the rest there:
    bit-identical to the store that learnt everything uninterrupted."""
    store, model = _learnt(tmp_path / "a", 6000)
    try:
        snap = decode(encode(_snapshot(store, model)))
        more = stream(9000)  # the same stream, further on
        rest = more.slice(6000, 9000)
        with StateStore(tmp_path / "b") as new:
            assert new.is_new
            new.apply(snap.state, Restore(snap))
            assert new.commits() == store.commits()
            assert new.offsets() == store.offsets()
            m2 = OnlineModel(CFG, new.load())
            assert_same_state(store.load(), m2.state)
            for lo in range(0, 3000, 1000):
                d = m2.learn(rest.slice(lo, lo + 1000))
                new.commit_batch(m2.state, d, {(TOPIC, 0): 7000 + lo})
            restored = new.load()
            with pytest.raises(Exception, match="already holds a model"):
                new.restore(snap)
        for lo in range(0, 3000, 1500):  # another cut of the same events
            d = model.learn(rest.slice(lo, lo + 1500))
            store.commit_batch(model.state, d, {(TOPIC, 0): 7500 + lo})
        assert_same_state(store.load(), restored)
        assert np.array_equal(store.load().items.factors[:10], restored.items.factors[:10])
    finally:
        store.close()
