"""What following the store costs a query process's requests while the updater writes.

    PYTHONPATH=. .venv/bin/python bench/bench_follower.py [--quick]

A query process refreshes its model every `refresh_seconds` (`consumers/query.py`):
`StoreFollower.refresh` replays the writer's WAL (`catch_up`) and, when the model moved on, loads
the item side anew. On the request thread (the service until 2026-12-03) no request was answered
meanwhile; on a thread of its own (the service now) requests go on, slowed by the interpreter
lock the two threads share.

For each catalogue size, a store is filled the way the updater fills it (`OnlineModel.learn` +
`StateStore.commit`, k=64, one event per item so every item has a vector, then a planted stream);
then, in this process, a writer commits batches of 2,000 events (what a quiet-to-busy updater
commits every 0.1 s) and a RocksDB secondary instance follows each commit, as the query process
does. Rounds alternate two ways of refreshing. On the request thread: the whole refresh (its WAL
replay reported apart), a stall for every request behind it; the reference, in the same run and
on the same view, is one `recommend` request (view, pinned user read, V·u + b over every item,
top-10), and the stall is reported as a multiple of it. On a thread of its own: requests are
answered back to back on this thread while it runs, each timed.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import Col, bench_args, print_table, write_results

from stream_mf.config import ModelConfig
from stream_mf.follower import StoreFollower
from stream_mf.model import EventBatch, OnlineModel
from stream_mf.recommend import recommend
from stream_mf.store import StateStore
from tests.synthetic import planted_stream

TOPIC = "interactions"


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def _timed_refresh(follower: StoreFollower, out: list[float]) -> None:
    a = time.perf_counter()
    assert follower.refresh(), "the follower did not see the commit"
    out.append((time.perf_counter() - a) * 1e3)


def run_size(n_items: int, n_users: int, batch: int, rounds: int, work: Path) -> dict[str, Any]:
    cfg = ModelConfig(dim=64)
    path = work / f"store-{n_items}"
    store = StateStore(path)
    model = OnlineModel(cfg, store.load(cfg))
    t0 = 1.7e9
    done = 0

    def commit(b: EventBatch) -> None:
        nonlocal done
        delta = model.learn(b)
        done += len(b)
        store.commit_batch(model.state, delta, {(TOPIC, 0): done}, event_times=b.times)

    every = [f"i{j}" for j in range(n_items)]
    users = [f"u{j % n_users}" for j in range(n_items)]
    for lo in range(0, n_items, 100_000):  # every item gets a vector
        hi = min(n_items, lo + 100_000)
        times = t0 + np.arange(lo, hi, dtype=np.float64)
        commit(EventBatch.build(users[lo:hi], every[lo:hi], np.ones(hi - lo), times))
    s = planted_stream(batch * (rounds + 2), n_users, n_items, seed=5, t0=t0 + n_items)
    stream = EventBatch.build(s.user_ids(), s.item_ids(), np.ones(len(s.users)), s.times)

    follower = StoreFollower(path, secondary_dir=str(work / f"sec-{n_items}"))
    assert follower.refresh() and follower.view is not None
    replay, reload, total, score, during, bg_total = [], [], [], [], [], []

    def serve_one() -> float:
        """One recommend request as the service answers it: view, pinned user, scoring."""
        a = time.perf_counter()
        view = follower.view
        assert view is not None
        rec = follower.users_for(view).user("u1")
        assert rec is not None
        recommend(view, rec.vector, 10, exclude=rec.seen)
        return (time.perf_counter() - a) * 1e3

    for r in range(rounds):
        commit(stream.slice(r * batch, (r + 1) * batch))
        if r % 2 == 0:  # on the request thread, as before: the stall
            a = time.perf_counter()
            changed = follower.refresh()
            took = time.perf_counter() - a
            assert changed, "the follower did not see the commit"
            replay.append(follower.catch_up_seconds * 1e3)
            reload.append((took - follower.catch_up_seconds) * 1e3)
            total.append(took * 1e3)
            score.append(serve_one())
            continue
        # on a thread of its own, as the service does now: requests go on meanwhile
        th = threading.Thread(target=_timed_refresh, args=(follower, bg_total))
        th.start()
        while th.is_alive():
            during.append(serve_one())
        th.join()
    follower.close()
    store.close()
    shutil.rmtree(path, ignore_errors=True)
    p50_score = _pct(score, 50)
    return {
        "items": n_items,
        "users": n_users,
        "batch": batch,
        "refreshes": rounds,
        "replay_p50_ms": _pct(replay, 50),
        "reload_p50_ms": _pct(reload, 50),
        "refresh_p50_ms": _pct(total, 50),
        "refresh_p99_ms": _pct(total, 99),
        "refresh_max_ms": max(total),
        "score_p50_ms": p50_score,
        "refresh_vs_score": _pct(total, 50) / p50_score,
        "bg_refresh_p50_ms": _pct(bg_total, 50),
        "during_n": len(during),
        "during_p50_ms": _pct(during, 50),
        "during_p99_ms": _pct(during, 99),
        "during_max_ms": max(during) if during else float("nan"),
    }


def main() -> None:
    ap_args = bench_args(__doc__)
    quick = ap_args.quick
    sizes = [(20_000, 5_000)] if quick else [(50_000, 20_000), (200_000, 50_000)]
    rounds = 10 if quick else 60
    batch = 2000
    work = Path(tempfile.mkdtemp(prefix="bench-follower-"))
    rows = []
    try:
        for n_items, n_users in sizes:
            print(
                f"{n_items} items: filling the store, then {rounds} commits + refreshes ...",
                flush=True,
            )
            rows.append(run_size(n_items, n_users, batch, rounds, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(
        f"Follower refresh per commit of {batch} events (k=64), the query loop's stall",
        rows,
        [
            Col("items", "items", ","),
            Col("replay_p50_ms", "WAL replay p50 ms", ".2f"),
            Col("reload_p50_ms", "reload p50 ms", ".1f"),
            Col("refresh_p50_ms", "refresh p50 ms", ".1f"),
            Col("refresh_p99_ms", "p99 ms", ".1f"),
            Col("refresh_max_ms", "max ms", ".1f"),
            Col("score_p50_ms", "1 request's scoring p50 ms", ".2f"),
            Col("refresh_vs_score", "refresh / scoring", ".0f"),
        ],
    )
    print_table(
        "Requests answered while the refresh runs on its own thread (the service's way)",
        rows,
        [
            Col("items", "items", ","),
            Col("bg_refresh_p50_ms", "refresh p50 ms", ".1f"),
            Col("during_n", "requests during", ","),
            Col("during_p50_ms", "request p50 ms", ".2f"),
            Col("during_p99_ms", "p99 ms", ".1f"),
            Col("during_max_ms", "max ms", ".1f"),
            Col("refresh_p50_ms", "vs. stall p50 ms", ".1f"),
        ],
    )
    write_results("bench_follower", {"quick": quick, "batch": batch, "rows": rows}, ap_args.out)


if __name__ == "__main__":
    main()
