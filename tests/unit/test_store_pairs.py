"""Confidence pairs in chunks on disk (store format 3): every reader sees exactly the model's
pairs, in both write modes, with chunks cut small; earlier formats are migrated on open; item
rows touched by negatives are written once per checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rocksdict as rd

from stream_mf import pair_chunks
from stream_mf.model import OnlineModel
from stream_mf.state import ModelState, confidence_items
from stream_mf.store import StateStore, raw_keys
from stream_mf.store_layout import BLOCK_ROWS, FORMAT, FORMAT_KEY
from tests.legacy_store import to_legacy
from tests.unit.test_store import CFG, TOPIC, assert_same_state, stream


def assert_pairs_match(store: StateStore, state: ModelState) -> None:
    """`user_items` of every user (pending batches overlaid) and, with none pending, the
    loaded map are the model's pairs, bit for bit."""
    keys, vals = confidence_items(state.confidence)
    users = keys >> 32
    for u in range(state.users.n):
        got_i, got_v = store.user_items(u)
        mine = users == u
        assert got_i.tolist() == (keys[mine] & 0xFFFFFFFF).tolist(), u
        assert got_v.tobytes() == vals[mine].tobytes(), u
    if store.pending:
        return
    lk, lv = confidence_items(store.load().confidence)
    assert np.array_equal(lk, keys) and lv.tobytes() == vals.tobytes()


def chunk_sizes(store: StateStore) -> list[int]:
    return [len(v) // pair_chunks.RECORD.itemsize for v in store.cf["pairs"].values()]


@pytest.mark.parametrize(("deferred", "fold"), [(False, 1), (True, 1), (False, 6), (True, 6)])
def test_chunked_pairs_match_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, deferred: bool, fold: int
) -> None:
    """Batches written at once (checkpoints off) or at checkpoints, with chunks of at most 8
    pairs (so they are cut again and again), every chunk folded or only those that get 6 new
    pairs (the others' put one a key, then folded in): the store's pairs are the model's."""
    monkeypatch.setattr(pair_chunks, "CHUNK_PAIRS", 8)
    monkeypatch.setattr(pair_chunks, "FOLD_PAIRS", fold)
    monkeypatch.setattr(pair_chunks, "FOLD_SHARE", 2 if fold > 1 else 1 << 40)
    singles = 0
    batch = stream(4000)
    with StateStore(tmp_path / "db") as store:
        store.deferred = deferred
        model = OnlineModel(CFG, store.load(CFG))
        for lo in range(0, 4000, 500):
            store.commit_batch(model.state, model.learn(batch.slice(lo, lo + 500)),
                               {(TOPIC, 0): lo + 500})  # fmt: skip
            if deferred and lo % 1000:
                store.checkpoint(model.state)
            assert_pairs_match(store, model.state)
            singles = max(singles, len(list(raw_keys(store.cf["confidence"]))))
        store.checkpoint(model.state)
        sizes = chunk_sizes(store)
        assert max(sizes) <= 8 and len(sizes) > sum(sizes) / 8
        assert (singles > 0) == (fold > 1)
    with StateStore(tmp_path / "db") as store:
        assert_same_state(model.state, store.load())
        more = stream(700, seed=5)  # the chunk index is read back from the store: goes on alike
        store.commit_batch(model.state, model.learn(more))
        assert_pairs_match(store, model.state)


def test_a_heavy_user_rewrites_one_chunk(tmp_path: Path) -> None:
    """A user with 20k pairs (and 15 neighbours in its block): its chunks hold at most
    CHUNK_PAIRS, a checkpoint that changes one pair writes that one pair, and one that changes
    a chunk's worth rewrites about that chunk, not the block."""
    n = 20_000
    from stream_mf.model import EventBatch

    ids = [f"u{j % BLOCK_ROWS}" if j < 64 else "heavy" for j in range(n)]
    items = [f"i{j}" for j in range(n)]
    batch = EventBatch.build(ids, items, np.ones(n), np.arange(n, dtype=float))
    with StateStore(tmp_path / "db") as store:
        model = OnlineModel(CFG, store.load(CFG))
        store.commit_batch(model.state, model.learn(batch))
        assert max(chunk_sizes(store)) <= pair_chunks.CHUNK_PAIRS
        one = EventBatch.build(["heavy"], ["i12345"], np.ones(1), np.array([float(n)]))
        store.commit_batch(model.state, model.learn(one))
        assert store.last_write_bytes < 16_000  # the rows' blocks, the pair alone
        assert len(list(raw_keys(store.cf["confidence"]))) == 1
        assert_pairs_match(store, model.state)
        ids = ["heavy"] * 200
        more = EventBatch.build(ids, [f"i{j}" for j in range(5000, 5200)], np.ones(200),
                                np.full(200, float(n + 1)))  # fmt: skip
        before = dict(store.cf["pairs"].items())
        store.commit_batch(model.state, model.learn(more))
        after = dict(store.cf["pairs"].items())
        changed = [k for k, v in after.items() if before.get(k) != v]
        assert 1 <= len(changed) <= 3 and len(after) >= len(before)  # of ~50 chunks
        assert len(list(raw_keys(store.cf["confidence"]))) < 64  # a chunk's few stay single
        assert_pairs_match(store, model.state)


@pytest.mark.parametrize("fmt", [b"2", b"1"])
def test_an_earlier_format_is_migrated_on_open(tmp_path: Path, fmt: bytes) -> None:
    """A format-2 (or 1) store, per-pair keys and no `pairs` column family: a follower reads it
    as it is; the writer migrates it on open (format 3, `confidence` emptied) to the same pairs,
    and goes on learning as if nothing happened."""
    batch = stream(3000)
    with StateStore(tmp_path / "db") as store:
        model = OnlineModel(CFG, store.load(CFG))
        store.commit_batch(model.state, model.learn(batch.slice(0, 2000)), {(TOPIC, 0): 2000})
    n_pairs = to_legacy(tmp_path / "db", fmt)
    assert n_pairs == len(model.state.confidence)
    with StateStore(tmp_path / "db", secondary=tmp_path / "sec") as follower:
        assert follower.cf.get("pairs") is None
        assert_pairs_match(follower, model.state)
    if fmt == b"1":  # before transitions: they start empty
        model.state.transitions.succ[:] = -1
        model.state.transitions.logw[:] = -np.inf
        model.state.transitions.last[:] = -1
    with StateStore(tmp_path / "db") as store:
        assert store.cf["meta"][FORMAT_KEY] == FORMAT
        assert list(raw_keys(store.cf["confidence"])) == []
        assert sum(chunk_sizes(store)) == n_pairs
        assert_same_state(model.state, store.load())
        assert_pairs_match(store, model.state)
        store.commit_batch(model.state, model.learn(batch.slice(2000, 3000)), {(TOPIC, 0): 3000})
    with StateStore(tmp_path / "db") as store:
        assert_same_state(model.state, store.load())


def test_a_migration_cut_short_runs_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between the migration's steps leaves a format-2 store with part of `pairs`
    written (stale chunks even): the next open clears them and migrates again."""
    import stream_mf.store as store_mod

    batch = stream(2000)
    with StateStore(tmp_path / "db") as store:
        model = OnlineModel(CFG, store.load(CFG))
        store.commit_batch(model.state, model.learn(batch))
    to_legacy(tmp_path / "db")
    monkeypatch.setattr(store_mod, "MIGRATE_CHUNKS", 3)
    writes = 0

    def crash_after_two(self: StateStore, wb: rd.WriteBatch) -> None:
        nonlocal writes
        writes += 1
        if writes > 2:
            raise store_mod.StoreError("killed")
        real_write(self, wb)

    real_write = StateStore._write
    monkeypatch.setattr(StateStore, "_write", crash_after_two)
    with pytest.raises(store_mod.StoreError, match="killed"):
        StateStore(tmp_path / "db")
    monkeypatch.setattr(StateStore, "_write", real_write)
    # the dead process's store, as a follower sees it: still format 2, the chunks written so far
    with StateStore(tmp_path / "db", secondary=tmp_path / "sec") as follower:
        assert follower.cf["meta"][FORMAT_KEY] == b"2"
        assert len(list(raw_keys(follower.cf["pairs"]))) > 0
        assert_pairs_match(follower, model.state)
    with StateStore(tmp_path / "db") as store:
        assert store.cf["meta"][FORMAT_KEY] == FORMAT
        assert_same_state(model.state, store.load())
        assert_pairs_match(store, model.state)


def test_item_rows_are_written_once_per_checkpoint(tmp_path: Path) -> None:
    """Checkpointed: batches whose negatives touch most item blocks write nothing; the
    checkpoint writes each item block (factors, bias, meta) and each chunk of pairs once."""
    puts: list[tuple[int, bytes]] = []
    batch = stream(4000)
    with StateStore(tmp_path / "db") as store:
        store.deferred = True
        model = OnlineModel(CFG, store.load(CFG))
        store.commit_batch(model.state, model.learn(batch.slice(0, 1000)))
        store.checkpoint(model.state)
        seq0 = store.db.latest_sequence_number()
        per_batch: list[set[int]] = []
        for lo in range(1000, 4000, 500):
            d = model.learn(batch.slice(lo, lo + 500))
            new = range(d.new_items[0] // BLOCK_ROWS, -(-d.new_items[1] // BLOCK_ROWS))
            per_batch.append(set((d.items // BLOCK_ROWS).tolist()) | set(new))
            store.commit_batch(model.state, d, {(TOPIC, 0): lo + 500})
        assert store.db.latest_sequence_number() == seq0  # six batches, nothing written
        touched = set().union(*per_batch)
        assert sum(map(len, per_batch)) > 3 * len(touched)  # per batch: each block ~6 times

        real_batch, real_write = store._batch, store._write

        class Recording:
            def __init__(self) -> None:
                self.wb = real_batch()

            def put(self, key: bytes, value: bytes, h: rd.ColumnFamily) -> None:
                puts.append((id(h), key))
                self.wb.put(key, value, h)

            def __getattr__(self, name: str) -> object:
                return getattr(self.wb, name)

        store._batch = Recording  # type: ignore[method-assign,assignment]
        store._write = lambda wb: real_write(wb.wb)  # type: ignore[method-assign,attr-defined]
        store.checkpoint(model.state)
        assert len(puts) == len(set(puts))  # no key put twice
        per_cf = {name: sum(1 for h, _ in puts if h == id(store.h[name]))
                  for name in ("item_factors", "item_bias", "item_meta")}  # fmt: skip
        assert set(per_cf.values()) == {len(touched)}
