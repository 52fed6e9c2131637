"""Confidence pairs grouped in chunks (store format 3): the codec and the checkpoint's plan (pure).

One RocksDB key a pair made a checkpoint of 1M events up to a million puts (a microsecond of
Python and RocksDB each). Now the pairs `user << 32 | item` are cut into **chunks**: runs of
consecutive keys inside one block of BLOCK_ROWS users, at most `CHUNK_PAIRS` pairs each. A
chunk is stored under its **lower bound** (be64): it holds the pairs from there up to the next
chunk's bound. A block's first chunk is bound at the block's first key, `(block * BLOCK_ROWS)
<< 32`, so a pair's chunk is the one with the greatest bound <= its key in its block, or a new
one at the block's start. Pairs are never deleted, so chunks only grow: one over `CHUNK_PAIRS`
is cut into pieces of about `CHUNK_PAIRS / 2` (room to grow again), each bound at its first
key. A heavy user (100k pairs) thus spans a few hundred chunks.

Rewriting a chunk costs its whole size, so a checkpoint **folds** a chunk (reads it, merges the
new pairs in, puts it back) only when it brings it at least `FOLD_PAIRS` new pairs plus
1/`FOLD_SHARE` of its size; the few pairs of any other chunk are put **single**, one key each
(be64 key -> <f8, format 2's layout, in `confidence`), and a later fold of their chunk takes
them in and deletes them. Readers overlay the singles on the chunks (a single is newer). A
young store (many new pairs a block) thus writes a key a block, a mature one with scattered
updates a key a pair as before, and no checkpoint rewrites history it did not change
(bench/bench_pairs.py: always folding rewrote a whole 1M-pair store for 50k changed pairs).

A chunk's value is its pairs in key order, interleaved `<i8 key, <f8 log-confidence` (16 bytes
a pair): the whole column family reads back with one join and one `frombuffer` (`RECORD`).
"""

from __future__ import annotations

import itertools
import struct

import numpy as np

from stream_mf.store_layout import BLOCK_ROWS

#: a chunk over this many pairs is cut (8 kB); bench/bench_pairs.py for the choice
CHUNK_PAIRS = 512
#: a checkpoint folds a chunk only when it brings at least FOLD_PAIRS + size / FOLD_SHARE new
#: pairs of it; fewer are put one key each. The costs behind it (bench/bench_pairs.py): a put
#: of a key ~0.6 us, a pair read, merged and written back in a chunk ~70 ns (1/8 of a key),
#: a chunk's own get and put ~5 us (8 keys): a fold then costs less than the keys it saves
FOLD_PAIRS = 8
FOLD_SHARE = 8
RECORD = np.dtype([("key", "<i8"), ("val", "<f8")])
BOUND = struct.Struct(">q")


def bound_key(bound: int) -> bytes:
    return BOUND.pack(bound)


def bound_keys(bounds: np.ndarray) -> list[bytes]:
    """`bound_key` of each, in one C call."""
    out: list[bytes] = bounds.astype(">i8").view("V8").tolist()
    return out


def read_bounds(keys: list[bytes]) -> np.ndarray:
    """Chunk keys back into their bounds (int64)."""
    return np.frombuffer(b"".join(keys), ">i8").astype(np.int64)


def block_start(keys: np.ndarray) -> np.ndarray:
    """The first pair key of each key's user block: a block's first chunk is bound there."""
    users = keys >> 32
    return (users - users % BLOCK_ROWS) << 32


def encode(keys: np.ndarray, vals: np.ndarray) -> bytes:
    rec = np.empty(keys.size, RECORD)
    rec["key"] = keys
    rec["val"] = vals
    return rec.tobytes()


def decode(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """A chunk's (or several chunks' joined) pairs: keys (int64), log-confidences (float64)."""
    rec = np.frombuffer(raw, RECORD)
    return rec["key"].astype(np.int64), rec["val"].astype(np.float64)


def owners(bounds: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """The bound of each key's chunk: the greatest of `bounds` (sorted) <= the key in the key's
    user block, else the block's start (a chunk to create)."""
    start = block_start(keys)
    if bounds.size == 0:
        return start
    at = np.searchsorted(bounds, keys, side="right") - 1
    got = bounds[np.maximum(at, 0)]
    return np.where((at >= 0) & (got >= start), got, start)


def cut(keys: np.ndarray, owner: np.ndarray, limit: int | None = None) -> np.ndarray:
    """Where chunks start in sorted `keys` given each key's chunk bound `owner`: at every change
    of owner and, in a chunk over `limit`, every ~limit/2 keys (pieces of equal size)."""
    limit = CHUNK_PAIRS if limit is None else limit
    if keys.size == 0:
        return np.empty(0, np.int64)
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    sizes = np.diff(np.r_[starts, keys.size])
    big = np.flatnonzero(sizes > limit)
    if big.size == 0:
        return starts
    extra: list[np.ndarray] = []
    half = max(limit // 2, 1)
    for j in big.tolist():
        n = int(sizes[j])
        pieces = -(-n // half)
        extra.append(starts[j] + (np.arange(1, pieces) * n) // pieces)
    return np.sort(np.concatenate([starts, *extra]))


def chunk(
    keys: np.ndarray, vals: np.ndarray, owner: np.ndarray, limit: int | None = None
) -> tuple[np.ndarray, list[bytes]]:
    """Sorted pairs with their chunk bounds into (bound of each chunk, value of each chunk): a
    chunk keeps its bound, a piece cut off it is bound at its first key."""
    starts = cut(keys, owner, limit)
    if starts.size == 0:
        return np.empty(0, np.int64), []
    first = np.r_[True, owner[starts[1:]] != owner[starts[:-1]]]
    bounds = np.where(first, owner[starts], keys[starts])
    buf = encode(keys, vals)
    edges = (np.r_[starts, keys.size] * RECORD.itemsize).tolist()
    return bounds, [buf[a:b] for a, b in itertools.pairwise(edges)]


def rewrite(
    old_bounds: np.ndarray,
    old_raw: list[bytes],
    layers: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    limit: int | None = None,
) -> tuple[np.ndarray, list[bytes]]:
    """The chunks a checkpoint folds: the chunks `old_bounds` (sorted; values `old_raw`) with
    `layers` of (keys, values, chunk bounds from `owners`) merged in, each newer than the one
    before (a later value of a key wins), cut where one grew over `limit`. Returns (bounds,
    values) to put; every old bound is among them (a chunk keeps its key)."""
    ok, ov = decode(b"".join(old_raw))
    sizes = np.fromiter((len(r) // RECORD.itemsize for r in old_raw), np.int64, len(old_raw))
    own = np.concatenate(
        [np.repeat(old_bounds.astype(np.int64), sizes), *(o for _, _, o in layers)]
    )
    all_k = np.concatenate([ok, *(k for k, _, _ in layers)])
    all_v = np.concatenate([ov, *(v for _, v, _ in layers)])
    order = np.argsort(all_k, kind="stable")  # an older value before a newer one of its key
    all_k, all_v, own = all_k[order], all_v[order], own[order]
    last = np.ones(all_k.size, bool)
    last[:-1] = all_k[1:] != all_k[:-1]
    return chunk(all_k[last], all_v[last], own[last], limit)


def newest(keys: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys, the last value of a repeated key winning (`keys` in age order)."""
    order = np.argsort(keys, kind="stable")
    keys, vals = keys[order], vals[order]
    last = np.ones(keys.size, bool)
    last[:-1] = keys[1:] != keys[:-1]
    return keys[last], vals[last]


def block_end(bounds: np.ndarray) -> np.ndarray:
    """The first key past each bound's user block."""
    return block_start(bounds) + (np.int64(BLOCK_ROWS) << 32)


def range_ends(bounds: np.ndarray, chunks: np.ndarray) -> np.ndarray:
    """Where the range of each of `chunks` ends: the next of `bounds` (sorted; every existing
    chunk) in its block, else the block's end (a chunk still to create has no bound yet)."""
    at = np.searchsorted(bounds, chunks, side="right")
    nxt = np.full(chunks.size, np.iinfo(np.int64).max)
    ok = at < bounds.size
    nxt[ok] = bounds[at[ok]]
    return np.minimum(nxt, block_end(chunks))


def plan(
    bounds: np.ndarray, sizes: np.ndarray, owner: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which chunks a checkpoint folds, given the chunk of each new pair (sorted by key):
    (the chunks touched, how many of the new pairs each
    gets, whether it is folded). A chunk is folded (read, merged, put back whole) when its new
    pairs are at least `FOLD_PAIRS` + 1/`FOLD_SHARE` of its size, so a fold writes at most
    ~8x the bytes of its new pairs; the others' new pairs are put one a key (`single_keys`)."""
    if owner.size == 0:
        none = np.empty(0, np.int64)
        return none, none, np.empty(0, bool)
    # `owner` is sorted (keys are, and a key's chunk grows with it): runs, not np.unique's hash
    first = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    touched, counts = owner[first], np.diff(np.r_[first, owner.size])
    at = np.searchsorted(bounds, touched)
    exists = at < bounds.size
    exists[exists] = bounds[at[exists]] == touched[exists]
    size = np.zeros(touched.size, np.int64)
    size[exists] = sizes[at[exists]]
    return touched, counts, counts >= FOLD_PAIRS + size // FOLD_SHARE


def single_keys(keys: np.ndarray) -> list[bytes]:
    """Keys of pairs stored one a key (be64 `user << 32 | item`, format 2's layout)."""
    out: list[bytes] = keys.astype(">i8").view("V8").tolist()
    return out


def single_values(vals: np.ndarray) -> list[bytes]:
    out: list[bytes] = vals.astype("<f8").view("V8").tolist()
    return out


def user_pairs(raw: bytes, user: int) -> tuple[np.ndarray, np.ndarray]:
    """One user's (items int32, log-confidences) in a chunk."""
    keys, vals = decode(raw)
    lo, hi = np.searchsorted(keys, [user << 32, (user + 1) << 32])
    return (keys[lo:hi] & 0xFFFFFFFF).astype(np.int32), vals[lo:hi]


__all__ = [
    "CHUNK_PAIRS",
    "FOLD_PAIRS",
    "FOLD_SHARE",
    "RECORD",
    "block_end",
    "block_start",
    "bound_key",
    "bound_keys",
    "chunk",
    "cut",
    "decode",
    "encode",
    "newest",
    "owners",
    "plan",
    "range_ends",
    "read_bounds",
    "rewrite",
    "single_keys",
    "single_values",
    "user_pairs",
]
