"""How long a rebuild pauses ingestion, and what it costs, while the stream goes on.

    PYTHONPATH=. .venv/bin/python bench/bench_rebuild.py [--quick] [--rate 20000]

The updater's loop in miniature, in one process: learn + commit micro-batches of the planted
synthetic stream (100k users, 50k items), start a rebuild after the first half, keep feeding
batches while it fits, guards, catches up, swaps and finishes the rows left after the swap, and
time every `step()` call on the loop thread with the commit it returns (the flip, each
after-swap step), with events arriving at `--rate` in 0.2 s
micro-batches (users uniformly at random: the worst case for how many rows change during a
catch-up round). The pause is the longest of those steps and the snapshot (target: under 100 ms
for 100k users). For reference, the same run times a plain batch commit, and the naive
alternative of writing every row at the swap (one `write_full_state`).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Col, print_table, synthetic_events, write_results
from stream_mf.config import ModelConfig
from stream_mf.model import BatchDelta, OnlineModel
from stream_mf.rebuild import Rebuild, RebuildConfig, RebuildPhase, warm_up_rebuild
from stream_mf.store import StateStore


def _phase(rb: Rebuild) -> str:
    if rb.phase is RebuildPhase.AFTER_SWAP:
        return "after the swap"
    return "fit/guard/rounds"


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--rate", type=int, default=20_000, help="events/s while the rebuild runs")
    args = ap.parse_args()
    _stream, batch = synthetic_events(args.quick)
    n = len(batch)
    # the updater's default cadence: a micro-batch every 0.2 s, here at 20k events/s
    rate = args.rate
    step_batch = int(rate * 0.2)
    cfg = ModelConfig(dim=64, n_negatives=4)
    rcfg = RebuildConfig(iterations=5 if args.quick else 10, guard_events=500)
    warm_up_rebuild()  # as the updater does at start, on its loop thread
    with tempfile.TemporaryDirectory() as tmp:
        store = StateStore(Path(tmp) / "db")
        model = OnlineModel(cfg, store.load(cfg))
        done = 0
        commit_s: list[float] = []

        def feed() -> BatchDelta:
            nonlocal done
            piece = batch.slice(done, done + step_batch)
            delta = model.learn(piece)
            done += len(piece)
            t = time.perf_counter()
            store.commit_batch(model.state, delta, {("interactions", 0): done})
            commit_s.append(time.perf_counter() - t)
            return delta

        while done < n // 2:
            feed()
        st = model.state
        print(f"model: {st.users.n:,} users, {st.items.n:,} items, {len(st.confidence):,} pairs")
        t0 = time.perf_counter()
        start_pause = time.perf_counter()
        rb = Rebuild(st, rcfg, generation=store.generation() + 1, stage=True)
        start_pause = time.perf_counter() - start_pause
        steps: list[float] = []
        phases: list[str] = []
        load_at_swap = float("nan")
        outcome = None
        batches_during = 0
        while outcome is None:
            if done >= n:
                done = n // 2  # replay the second half again if the stream runs out
            if rb.wants_scores:
                nxt = batch.slice(done, done + step_batch)
                rb.score(
                    st,
                    st.users.lookup(nxt.user_ids).astype(np.int64),
                    st.items.lookup(nxt.item_ids).astype(np.int64),
                    lambda u: store.user_items(u)[0].astype(np.int64),
                )
            t_feed = time.perf_counter()
            rb.note(feed())
            batches_during += 1
            time.sleep(max(0.0, 0.2 - (time.perf_counter() - t_feed)))
            phase = _phase(rb)
            t = time.perf_counter()
            res = rb.step(st)
            if res.write is not None:
                store.apply(st, res.write)
            outcome = res.outcome
            steps.append(time.perf_counter() - t)
            if phase == "fit/guard/rounds" and (rb.swap_outcome is not None or outcome is not None):
                phase = "swap"  # the flip step
                load_at_swap = os.getloadavg()[0]
            phases.append(phase)
            print(f"  step {len(steps)}: {phase} {steps[-1] * 1e3:.1f} ms", flush=True)
        total = time.perf_counter() - t0
        t = time.perf_counter()
        store.drop_other_generations()
        cleanup = time.perf_counter() - t
        t = time.perf_counter()
        store.write_full_state(st)
        naive = time.perf_counter() - t
        store.close()

    def longest(phase: str) -> float:
        return max((t for p, t in zip(phases, steps, strict=True) if p == phase), default=0.0)

    rows = [
        {"what": "rebuild, snapshot to its end (background)", "ms": total * 1e3},
        {"what": "snapshot on the loop thread", "ms": start_pause * 1e3},
        {"what": "the swap step (with the flip commit)", "ms": longest("swap") * 1e3},
        {"what": "longest step after the swap", "ms": longest("after the swap") * 1e3},
        {"what": "longest step before the swap", "ms": longest("fit/guard/rounds") * 1e3},
        {"what": "median step() while the rebuild runs", "ms": float(np.median(steps)) * 1e3},
        {"what": "old generation cleanup", "ms": cleanup * 1e3},
        {
            "what": f"a normal {step_batch:,}-event commit (median)",
            "ms": float(np.median(commit_s)) * 1e3,
        },
        {"what": "naive: write every row at the swap", "ms": naive * 1e3},
    ]
    print_table(
        f"Rebuild pause at {rate:,} events/s, {st.users.n:,} users x {st.items.n:,} items, k=64 "
        f"(swapped={outcome.swapped}, rows re-solved {outcome.rows_resolved:,}, "
        f"{batches_during} batches ingested meanwhile, {outcome.swap_rows:,} rows re-solved in the "
        f"swap step, {outcome.deferred:,} after it)",
        rows,
        [Col("what", "what"), Col("ms", "ms", ".1f")],
    )
    print("swap step, ms: " + ", ".join(f"{k} {v:.1f}" for k, v in outcome.swap_parts.items()))
    pause = max(max(steps), start_pause)
    verdict = "meets" if pause < 0.1 else "MISSES"
    print(f"swap pause target < 100 ms: {verdict} ({pause * 1e3:.1f} ms)")
    write_results(
        f"bench_rebuild_{rate}",
        {
            "rate": rate,
            "quick": args.quick,
            "users": st.users.n,
            "items": st.items.n,
            "swapped": outcome.swapped,
            "rows_resolved": outcome.rows_resolved,
            "swap_rows": outcome.swap_rows,
            "deferred_rows": outcome.deferred,
            "swap_parts_ms": outcome.swap_parts,
            "load_avg_1m_at_swap": load_at_swap,
            "steps": [{"phase": p, "ms": t * 1e3} for p, t in zip(phases, steps, strict=True)],
            "batches_during": batches_during,
            "pause_ms": pause * 1e3,
            "rows": rows,
            "drift": outcome.drift,
        },
        Path(args.out) if args.out else None,
    )


if __name__ == "__main__":
    main()
