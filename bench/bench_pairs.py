"""Confidence pairs at checkpoints: one key a pair (format 2) against chunks (format 3) of several
sizes, on the same learned stream, interleaved in one process.

    PYTHONPATH=. .venv/bin/python bench/bench_pairs.py [--quick]

The shared planted stream (1M events, 100k users, 50k items, dim 64; `--quick`: 200k) is learned
once in micro-batches of 50k; every batch goes to one store per layout (deferred), and every
250k events (quick: 50k) each store checkpoints, in a rotating order, the same model. Per
layout: checkpoint seconds and WriteBatch bytes (the whole checkpoint: rows, pairs, counters),
the store's bytes on disk per event at the end, the time to read every pair back (a restart's
`load`; the rebuild reads the in-memory map, not the store) and one `user_items` call (live
evaluation, the rebuild's guard). Then a heavy user (100k pairs, 15 neighbours of 2k pairs in
its block) gets one new pair: the bytes that checkpoint writes show what cutting chunks buys.
Last, a **mature** store (`--mature-pairs`, 5M pairs over 100k users, Zipf-heavy, written whole)
takes checkpoints of 200k changed pairs (80% of them existing pairs of active users, 20% new):
the pairs' part of a checkpoint alone (`_put_pairs` and the write), interleaved, 3 rounds,
where a long history makes every chunk a checkpoint touches cost its whole size.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from common import Col, print_table, synthetic_events, write_results

from stream_mf import pair_chunks
from stream_mf.config import ModelConfig
from stream_mf.model import EventBatch, OnlineModel
from stream_mf.state import confidence_items
from stream_mf.store import StateStore, raw_keys

CONFIG = ModelConfig(dim=64)
BATCH = 50_000
#: name -> (CHUNK_PAIRS, FOLD_PAIRS, FOLD_SHARE), None: format 2's key a pair
Layout = tuple[int, int, int] | None
ALWAYS = (1, 1 << 40)  # fold every chunk a checkpoint touches: no single pairs
LAYOUTS: dict[str, Layout] = {
    "per-pair (2)": None,
    "512, fold 8/8": (512, 8, 8),
    "512, fold 16/4": (512, 16, 4),
    "512, fold 32/4": (512, 32, 4),
    "128, fold 8/8": (128, 8, 8),
    "4096, fold 8/8": (4096, 8, 8),
    "512, always": (512, *ALWAYS),
    "block, always": (1 << 40, *ALWAYS),
}


class PerPairStore(StateStore):
    """Format 2's pairs, for reference: a key (be32 user, be32 item) a pair in `confidence`
    (the code before format 3, verbatim), read back the way format 2 was."""

    def _legacy_pairs(self) -> bool:
        return True

    def _migrate_pairs(self) -> None:
        pass

    def _put_pairs(self, wb: Any, keys: np.ndarray, vals: np.ndarray) -> None:
        if keys.size == 0:
            return
        h = self.h["confidence"]
        put = wb.put
        kb: list[bytes] = keys.astype(">i8").view("V8").tolist()
        vb: list[bytes] = vals.astype("<f8").view("V8").tolist()
        for k, v in zip(kb, vb, strict=True):
            put(k, v, h)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextlib.contextmanager
def layout(spec: Layout) -> Iterator[None]:
    """`pair_chunks`' sizes set to `spec` meanwhile."""
    was = pair_chunks.CHUNK_PAIRS, pair_chunks.FOLD_PAIRS, pair_chunks.FOLD_SHARE
    if spec is not None:
        pair_chunks.CHUNK_PAIRS, pair_chunks.FOLD_PAIRS, pair_chunks.FOLD_SHARE = spec
    try:
        yield
    finally:
        pair_chunks.CHUNK_PAIRS, pair_chunks.FOLD_PAIRS, pair_chunks.FOLD_SHARE = was


def open_store(path: Path, spec: Layout) -> StateStore:
    return PerPairStore(path) if spec is None else StateStore(path)


def stream_run(events: EventBatch, every: int, root: Path) -> list[dict[str, Any]]:
    names = list(LAYOUTS)
    paths = {n: root / f"s{j}" for j, n in enumerate(names)}
    stores = {n: open_store(paths[n], LAYOUTS[n]) for n in names}
    rows: dict[str, dict[str, Any]] = {n: {"layout": n, "ck_s": [], "ck_bytes": []} for n in names}
    model = OnlineModel(CONFIG, stores[names[0]].load(CONFIG))
    for s in stores.values():
        s.deferred = True
    n, turn = len(events), 0
    for lo in range(0, n, BATCH):
        hi = min(lo + BATCH, n)
        delta = model.learn(events.slice(lo, hi))
        for s in stores.values():
            s.commit_batch(model.state, delta, {("interactions", 0): hi})
        if hi % every == 0 or hi == n:
            order = names[turn % len(names) :] + names[: turn % len(names)]
            turn += 1
            for name in order:
                t = time.perf_counter()
                with layout(LAYOUTS[name]):
                    info = stores[name].checkpoint(model.state)
                assert info is not None
                rows[name]["ck_s"].append(time.perf_counter() - t)
                rows[name]["ck_bytes"].append(info.bytes)
    for name in names:
        stores[name].close()
    n_pairs = len(model.state.confidence)
    rng = np.random.default_rng(3)
    users = rng.integers(0, model.state.users.n, 2000)
    keys_all, vals_all = confidence_items(model.state.confidence)
    for name in names:
        r = rows[name]
        r["disk_bytes_per_event"] = dir_bytes(paths[name]) / n
        r["ck_ms"] = 1e3 * float(np.mean(r["ck_s"]))
        r["ck_mb"] = float(np.mean(r["ck_bytes"])) / 1e6
        r["pairs"] = n_pairs
    for rep in range(3):  # interleaved reads: a restart's every pair, then user_items
        for name in names[rep:] + names[:rep]:
            with open_store(paths[name], LAYOUTS[name]) as s:
                t = time.perf_counter()
                keys, vals = s._all_confidence()
                load = time.perf_counter() - t
                assert np.array_equal(keys, keys_all) and vals.tobytes() == vals_all.tobytes()
                t = time.perf_counter()
                for u in users.tolist():
                    s.user_items(u)
                ui = (time.perf_counter() - t) / users.size
                rows[name]["chunks"] = len(s._chunk_index()[0])
                rows[name]["singles"] = sum(1 for _ in raw_keys(s.cf["confidence"]))
            r = rows[name]
            r["load_s"] = min(r.get("load_s", np.inf), load)
            r["user_items_us"] = min(r.get("user_items_us", np.inf), 1e6 * ui)
    return [rows[n] for n in names]


def heavy_user_run(root: Path) -> list[dict[str, Any]]:
    """One user with 100k pairs and 15 block neighbours with 2k each, then one new pair."""
    ids = [f"u{j:02d}" for j in range(16)]
    users = [ids[0]] * 100_000 + [u for u in ids[1:] for _ in range(2000)]
    items = [f"i{j}" for j in range(100_000)] + [f"i{j}" for _ in ids[1:] for j in range(2000)]
    n = len(users)
    first = EventBatch.build(users, items, np.ones(n), np.arange(n, dtype=float))
    one = EventBatch.build([ids[0]], ["i-new"], np.ones(1), np.array([float(n)]))
    out = []
    cfg = ModelConfig(dim=8, n_negatives=0)
    for j, (name, spec) in enumerate(LAYOUTS.items()):
        with open_store(root / f"h{j}", spec) as s:
            m = OnlineModel(cfg, s.load(cfg))
            with layout(spec):
                s.commit_batch(m.state, m.learn(first))
            d = m.learn(one)
            t = time.perf_counter()
            with layout(spec):
                s.commit_batch(m.state, d)
            out.append({"layout": name, "one_pair_bytes": s.last_write_bytes,
                        "one_pair_ms": 1e3 * (time.perf_counter() - t)})  # fmt: skip
    return out


def mature_run(root: Path, n_pairs: int, changed: int, rounds: int = 3) -> list[dict[str, Any]]:
    """The pairs' share of a checkpoint on a store that already holds a long history."""
    n_users, n_items = 100_000, 50_000
    rng = np.random.default_rng(11)
    weight = 1.0 / np.arange(1, n_users + 1) ** 0.8  # activity: a few heavy users
    weight /= weight.sum()
    users = rng.choice(n_users, n_pairs, p=weight).astype(np.int64)
    keys = np.unique((users << 32) | rng.integers(0, n_items, n_pairs))
    vals = rng.normal(size=keys.size)
    size = keys.size
    names = list(LAYOUTS)
    stores = {n: open_store(root / f"m{j}", LAYOUTS[n]) for j, n in enumerate(names)}
    for name, s in stores.items():
        for lo in range(0, keys.size, 1_000_000):
            wb = s._batch()
            with layout(LAYOUTS[name]):
                s._put_pairs(wb, keys[lo : lo + 1_000_000], vals[lo : lo + 1_000_000])
            s._write(wb)
    rows = {n: {"layout": n, "m_s": [], "m_bytes": []} for n in names}
    for r in range(rounds):
        old = rng.choice(keys, int(changed * 0.8), replace=False)
        new_u = rng.choice(n_users, changed - old.size, p=weight).astype(np.int64)
        ck = np.unique(np.r_[old, (new_u << 32) | rng.integers(0, n_items, new_u.size)])
        cv = rng.normal(size=ck.size)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            s = stores[name]
            t = time.perf_counter()
            wb = s._batch()
            with layout(LAYOUTS[name]):
                s._put_pairs(wb, ck, cv)
            s._write(wb)
            rows[name]["m_s"].append(time.perf_counter() - t)
            rows[name]["m_bytes"].append(s.last_write_bytes)
        keys, vals = pair_chunks.newest(np.r_[keys, ck], np.r_[vals, cv])
    for s in stores.values():
        got_k, got_v = s._all_confidence()  # every layout holds the same pairs
        assert np.array_equal(got_k, keys) and got_v.tobytes() == vals.tobytes()
        s.close()
    out = []
    for name in names:
        r = rows[name]
        out.append({"layout": name, "mature_pairs": size, "mature_changed": changed,
                    "mature_ms": 1e3 * float(np.median(r["m_s"])),
                    "mature_mb": float(np.median(r["m_bytes"])) / 1e6,
                    "mature_disk_mb": dir_bytes(root / f"m{names.index(name)}") / 1e6})  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="200k events, a 1M-pair mature store")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/)")
    ap.add_argument("--every", type=int, default=None, help="events between checkpoints")
    ap.add_argument("--mature-pairs", type=int, default=None, help="mature store size (5M)")
    args = ap.parse_args()
    _, events = synthetic_events(args.quick)
    every = args.every or (50_000 if args.quick else 250_000)
    mature = args.mature_pairs or (1_000_000 if args.quick else 5_000_000)
    root = Path(tempfile.mkdtemp(prefix="bench_pairs-"))
    try:
        rows = stream_run(events, every, root)
        heavy = heavy_user_run(root)
        grown = mature_run(root, mature, 200_000 if not args.quick else 50_000)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for r, h, g in zip(rows, heavy, grown, strict=True):
        r.update(h)
        r.update(g)
    table = print_table(
        f"checkpoints of {len(events):,} events every {every:,} (batches of {BATCH:,}), "
        f"{rows[0]['pairs']:,} pairs",
        rows,
        [
            Col("layout", "layout", "s"),
            Col("ck_ms", "checkpoint ms", ".0f"),
            Col("ck_mb", "checkpoint MB", ".1f"),
            Col("disk_bytes_per_event", "disk B/event", ".0f"),
            Col("chunks", "chunks", "d"),
            Col("singles", "singles", "d"),
            Col("load_s", "read all s", ".2f"),
            Col("user_items_us", "user_items us", ".0f"),
            Col("one_pair_bytes", "heavy 1-pair B", "d"),
            Col("one_pair_ms", "heavy 1-pair ms", ".1f"),
        ],
    )
    table += "\n" + print_table(
        f"a mature store of {rows[0]['mature_pairs']:,} pairs: the pairs of a checkpoint that "
        f"changes {rows[0]['mature_changed']:,} (median of 3)",
        rows,
        [
            Col("layout", "layout", "s"),
            Col("mature_ms", "pairs ms", ".0f"),
            Col("mature_mb", "pairs MB", ".1f"),
            Col("mature_disk_mb", "disk MB", ".0f"),
        ],
    )
    write_results("bench_pairs", {"quick": args.quick, "every": every, "batch": BATCH,
                                  "rows": rows, "table": table}, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
