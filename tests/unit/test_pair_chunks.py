"""The pair-chunk codec (store format 3) against a plain dict of pairs, fixed seeds."""

from __future__ import annotations

import numpy as np
import pytest

from stream_mf import pair_chunks as pc
from stream_mf.store_layout import BLOCK_ROWS

BIG = 2**31 - 1  # the largest row index (int32)


class Chunks:
    """A store's pairs in memory, written like `StateStore._put_pairs`: chunks (bound -> value)
    and single pairs (key -> value), with `pair_chunks`' module sizes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kv: dict[int, bytes] = {}
        self.singles: dict[int, float] = {}

    def bounds(self) -> np.ndarray:
        return np.array(sorted(self.kv), np.int64)

    def put(self, keys: np.ndarray, vals: np.ndarray) -> None:
        bounds = self.bounds()
        sizes = np.array([len(self.kv[b]) // 16 for b in bounds.tolist()], np.int64)
        owner = pc.owners(bounds, keys)
        touched, counts, fold = pc.plan(bounds, sizes, owner)
        assert counts.sum() == keys.size
        folded = touched[fold]
        into = np.isin(owner, folded)
        self.singles.update(zip(keys[~into].tolist(), vals[~into].tolist(), strict=True))
        old = folded[np.isin(folded, bounds)]
        ends = pc.range_ends(bounds, folded)
        sk = np.array(sorted(k for k in self.singles
                             if any(a <= k < b for a, b in zip(folded, ends, strict=True))),
                      np.int64)  # fmt: skip
        sv = np.array([self.singles[k] for k in sk.tolist()], np.float64)
        layers = [(sk, sv, pc.owners(bounds, sk)), (keys[into], vals[into], owner[into])]
        out, values = pc.rewrite(old, [self.kv[b] for b in old.tolist()], layers, self.limit)
        assert set(old.tolist()) <= set(out.tolist())  # a chunk keeps its key
        self.kv.update(zip(out.tolist(), values, strict=True))
        for k in sk.tolist():
            del self.singles[k]

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        keys, vals = pc.decode(b"".join(self.kv[b] for b in sorted(self.kv)))
        s = sorted(self.singles.items())
        sk = np.array([k for k, _ in s], np.int64)
        sv = np.array([v for _, v in s], np.float64)
        return pc.newest(np.r_[keys, sk], np.r_[vals, sv])

    def check(self, ref: dict[int, float]) -> None:
        keys, vals = self.pairs()
        want = sorted(ref.items())
        assert keys.tolist() == [k for k, _ in want]  # sorted, unique, every pair
        assert vals.tolist() == [v for _, v in want]  # bit for bit, the newest value
        bounds = self.bounds()
        ends = np.r_[bounds[1:], np.iinfo(np.int64).max]
        for b, end in zip(bounds.tolist(), ends.tolist(), strict=True):
            k, _ = pc.decode(self.kv[b])
            assert 0 < k.size <= self.limit
            assert b <= k[0] and k[-1] < end  # the chunk holds [its bound, the next)
            start = int(pc.block_start(np.array([b]))[0])
            assert int(pc.block_start(k[-1:])[0]) == start  # inside one user block
            assert start in self.kv  # a block's first chunk is bound at its start


def _random_pairs(rng: np.random.Generator, n: int, users: int, items: int) -> np.ndarray:
    u = rng.integers(0, users, n, dtype=np.int64)
    i = rng.integers(0, items, n, dtype=np.int64)
    return np.unique((u << 32) | i)


@pytest.mark.parametrize(("limit", "fold"), [(4, 1), (16, 1), (16, 4), (512, 32), (512, 1)])
def test_checkpoints_of_random_pairs_match_a_dict(
    limit: int, fold: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Repeated checkpoints (repeats of pairs, new pairs, heavy users, cuts, folds of single
    pairs or none) give exactly what a dict updated pair by pair gives."""
    monkeypatch.setattr(pc, "FOLD_PAIRS", fold)
    rng = np.random.default_rng(7)
    store, ref = Chunks(limit), dict[int, float]()
    for step in range(30):
        keys = _random_pairs(rng, int(rng.integers(1, 300)), 40 if step % 3 else 3, 200)
        vals = rng.normal(size=keys.size)
        store.put(keys, vals)
        ref.update(zip(keys.tolist(), vals.tolist(), strict=True))
        store.check(ref)


def test_huge_ids_and_block_edges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys at the top of the int32 index range and at block edges (last user of a block, first
    of the next) land in their own block's chunks."""
    monkeypatch.setattr(pc, "FOLD_PAIRS", 1)
    users = np.array([0, BLOCK_ROWS - 1, BLOCK_ROWS, BIG - 1, BIG], np.int64)
    items = np.array([0, 1, BIG], np.int64)
    keys = np.sort(((users[:, None] << 32) | items[None, :]).ravel())
    store, ref = Chunks(2), dict[int, float]()
    for j, vals in enumerate((np.arange(keys.size, dtype=float), -np.ones(keys.size))):
        part = keys[j::2] if j else keys
        store.put(part, vals[: part.size])
        ref.update(zip(part.tolist(), vals[: part.size].tolist(), strict=True))
        store.check(ref)
    items_of_big = pc.user_pairs(b"".join(store.kv[b] for b in sorted(store.kv)), BIG)[0]
    assert items_of_big.tolist() == [0, 1, BIG]


def test_empty_inputs() -> None:
    none = np.empty(0, np.int64)
    assert pc.decode(b"")[0].size == 0
    assert pc.encode(none, np.empty(0)) == b""
    bounds, values = pc.rewrite(none, [], [(none, np.empty(0), none)])
    assert bounds.size == 0 and values == []
    assert pc.owners(none, none).size == 0
    assert pc.user_pairs(b"", 3)[0].size == 0
    store = Chunks(4)
    store.put(np.array([5 << 32], np.int64), np.array([1.0]))
    assert store.singles and pc.owners(store.bounds(), none).size == 0


def test_a_heavy_user_is_cut_not_rewritten_whole() -> None:
    """100k pairs of one user: chunks stay under the limit, one changed pair is not enough to
    fold a chunk, and a fold of one rewrites that one only."""
    keys = (np.int64(3) << 32) | np.arange(100_000, dtype=np.int64)
    store = Chunks(512)
    store.put(keys, np.zeros(keys.size))
    assert len(store.kv) == -(-keys.size // 256)
    owner = pc.owners(store.bounds(), keys[77_777:77_778])
    sizes = np.full(len(store.kv), 256)
    assert not pc.plan(store.bounds(), sizes, owner)[2].any()
    layer = (keys[77_777:77_778], np.ones(1), owner)
    out, values = pc.rewrite(owner, [store.kv[int(owner[0])]], [layer], 512)
    assert out.tolist() == owner.tolist() and len(values[0]) <= 512 * pc.RECORD.itemsize


def test_bound_keys_sort_like_the_pairs() -> None:
    rng = np.random.default_rng(1)
    keys = np.sort(_random_pairs(rng, 500, BIG, BIG))
    names = pc.bound_keys(keys)
    assert names == sorted(names) and names == [pc.bound_key(k) for k in keys.tolist()]
    assert pc.read_bounds(names).tolist() == keys.tolist()
