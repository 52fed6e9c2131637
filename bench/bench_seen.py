"""The model log publisher's seen index (issue 14): the flat index against the dict it replaced.

The updater folds every commit's (user, item) pairs into `SeenIndex` and encodes the commit's
user rows with their whole seen lists (`user_records`). This times both, per event, for the
index of `stream_mf/model_log.py` and for the one before it (a dict of an array per user and a
per-row encoder, copied below as `DictSeenIndex` / `dict_user_records`), in the same process,
alternating which goes first on each commit (ABBA). Both start from the same pairs (the shared
bench stream: 100k users, 50k items, zipf items; its first events up to 1M distinct pairs) and
take the same 50k-event commits after them; the first commit's records are checked equal byte
for byte.

Run: PYTHONPATH=. .venv/bin/python bench/bench_seen.py [--quick] [--commits 12]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from common import Col, print_table, write_results

from stream_mf.arrays import unique_sorted
from stream_mf.model_log import (
    _META,
    _ROW_ARRAYS,
    _USER_HEAD,
    USER_FORMAT,
    SeenIndex,
    user_records,
)
from stream_mf.state import EntityTable
from tests.synthetic import planted_stream

_NONE = np.empty(0, np.int32)
_LOW32 = np.int64(0xFFFFFFFF)


class DictSeenIndex:
    """`SeenIndex` as of 395a6da: a dict of a sorted int32 array per user."""

    def __init__(self, pair_keys: np.ndarray) -> None:
        self.rows: dict[int, np.ndarray] = {}
        self.add(np.sort(pair_keys))

    def add(self, pair_keys: np.ndarray) -> None:
        if pair_keys.size == 0:
            return
        keys = unique_sorted(np.asarray(pair_keys, np.int64))
        users = keys >> 32
        first = np.flatnonzero(np.concatenate([[True], users[1:] != users[:-1]]))
        touched = users[first].tolist()
        rows = self.rows
        old = [rows.get(u, _NONE) for u in touched]
        n_old = np.fromiter((a.size for a in old), np.int64, len(old))
        place = np.arange(len(touched), dtype=np.int64)
        both = np.concatenate([
            (np.repeat(place, n_old) << 32) | np.concatenate([*old, _NONE]).astype(np.int64),
            (np.repeat(place, np.diff(np.append(first, keys.size))) << 32) | (keys & _LOW32),
        ])  # fmt: skip
        both = unique_sorted(both)
        items = (both & _LOW32).astype(np.int32)
        bounds = np.searchsorted(both >> 32, np.arange(len(touched) + 1)).tolist()
        for j, u in enumerate(touched):
            rows[u] = items[bounds[j] : bounds[j + 1]].copy()

    def of(self, user: int) -> np.ndarray:
        got = self.rows.get(user)
        return got if got is not None else _NONE


def dict_user_records(
    table: EntityTable, gen: int, seen: DictSeenIndex, rows: Iterable[int], last: np.ndarray
) -> Iterator[tuple[bytes, bytes]]:
    """`user_records` as of 395a6da (user rows only)."""
    idx = np.fromiter(rows, np.int64)
    if idx.size == 0:
        return
    li = np.full(idx.size, -1, "<i4")
    ok = idx < last.shape[0]
    li[ok] = last[idx[ok]]
    lb = li.view("V4").tolist()
    dim = table.dim
    fb = np.ascontiguousarray(table.factors[idx], "<f4").view(f"V{dim * 4}").ravel().tolist()
    meta = np.empty(idx.size, _META)
    for name, _dt in _ROW_ARRAYS:
        meta[name] = getattr(table, name)[idx]
    mb = meta.view(f"V{_META.itemsize}").tolist()
    keys = np.empty((idx.size, 3), ">u4")
    keys[:, 0] = 0
    keys[:, 1] = gen
    keys[:, 2] = idx
    kb = keys.view("V12").ravel().tolist()
    head, ids = _USER_HEAD.pack, table.ids
    for j, u in enumerate(idx.tolist()):
        s = seen.of(u)
        parts = (head(USER_FORMAT, dim, s.size), fb[j], mb[j], lb[j], s.tobytes())
        yield b"u" + kb[j][4:], b"".join((*parts, ids[u].encode()))


def _encode(recs: Iterator[tuple[bytes, bytes]]) -> int:
    """Bytes of the records (what the publisher hands the producer)."""
    return sum(len(k) + len(v) for k, v in recs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200k pairs, 4 commits")
    ap.add_argument("--commits", type=int, default=12, help="50k-event commits timed")
    ap.add_argument("--commit-events", type=int, default=50_000)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    n_users, n_items, dim = 100_000, 50_000, 64
    n_pairs = 200_000 if args.quick else 1_000_000
    commits = 4 if args.quick else args.commits
    ce = args.commit_events
    s = planted_stream(3 * n_pairs + commits * ce, n_users=n_users, n_items=n_items, n_groups=20)
    keys = (s.users.astype(np.int64) << 32) | s.items.astype(np.int64)
    # the first events that hold n_pairs distinct pairs
    _, first_at = np.unique(keys, return_index=True)
    cut = int(np.sort(first_at)[n_pairs - 1]) + 1
    base, rest = keys[:cut], keys[cut:]
    table = EntityTable("user", dim, seed=1, init_scale=0.1)
    table.add([f"user-{j}" for j in range(n_users)])
    last = np.random.default_rng(2).integers(0, n_items, n_users).astype(np.int32)

    t0 = time.perf_counter()
    sides: dict[str, Any] = {"dict": DictSeenIndex(base)}
    build = {"dict": time.perf_counter() - t0}
    t0 = time.perf_counter()
    sides["flat"] = SeenIndex(base)
    build["flat"] = time.perf_counter() - t0

    def encode(name: str, idx: Any, rows: list[int]) -> Iterator[tuple[bytes, bytes]]:
        if name == "dict":
            return dict_user_records(table, 0, idx, rows, last)
        return user_records(table, 0, idx, rows, last=last)

    add_s: dict[str, list[float]] = {"dict": [], "flat": []}
    enc_s: dict[str, list[float]] = {"dict": [], "flat": []}
    touched: list[int] = []
    for c in range(commits):
        batch = rest[c * ce : (c + 1) * ce]
        rows = unique_sorted(batch >> 32).tolist()
        touched.append(len(rows))
        order = ("dict", "flat") if c % 2 == 0 else ("flat", "dict")
        for name in order:
            idx = sides[name]
            t0 = time.perf_counter()
            idx.add(batch)
            t1 = time.perf_counter()
            _encode(encode(name, idx, rows))
            t2 = time.perf_counter()
            add_s[name].append(t1 - t0)
            enc_s[name].append(t2 - t1)
        if c == 0:
            a = list(encode("dict", sides["dict"], rows))
            b = list(encode("flat", sides["flat"], rows))
            assert a == b, "the flat index's user rows differ from the dict's"

    def us(xs: list[float]) -> float:
        return float(np.median(xs)) / ce * 1e6

    table_rows = []
    for name in ("dict", "flat"):
        table_rows.append({
            "index": name,
            "add_us": us(add_s[name]),
            "enc_us": us(enc_s[name]),
            "both_us": us([a + e for a, e in zip(add_s[name], enc_s[name], strict=True)]),
            "build_s": build[name],
        })  # fmt: skip
    ratio = {
        k: table_rows[1][k] / table_rows[0][k] for k in ("add_us", "enc_us", "both_us")
    }  # flat / dict
    per_commit = {
        k: [f / d for f, d in zip(v["flat"], v["dict"], strict=True)]
        for k, v in (("add", add_s), ("encode", enc_s))
    }
    table_rows.append({"index": "flat/dict", **ratio})
    print_table(
        f"seen index, {n_users // 1000}k users, {n_pairs / 1e6:g}M pairs to start, "
        f"{commits} commits of {ce // 1000}k events (~{int(np.mean(touched))} users each), "
        "median us per event",
        table_rows,
        [
            Col("index", "index", ""),
            Col("add_us", "add", ".3f"),
            Col("enc_us", "user rows", ".3f"),
            Col("both_us", "add + rows", ".3f"),
            Col("build_s", "build s", ".2f"),
        ],
    )
    pairs_end = int(sum(a.size for a in sides["dict"].rows.values()))
    write_results(
        "bench_seen",
        {
            "quick": args.quick,
            "n_users": n_users,
            "pairs_start": n_pairs,
            "pairs_end": pairs_end,
            "commit_events": ce,
            "commits": commits,
            "users_per_commit": touched,
            "us_per_event": table_rows,
            "per_commit_flat_over_dict": {k: [min(v), max(v)] for k, v in per_commit.items()},
            "seconds": {"add": add_s, "encode": enc_s},
        },
        args.out,
    )


if __name__ == "__main__":
    main()
