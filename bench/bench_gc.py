"""What CPython's cyclic collector costs the updater, timed directly rather than inferred.

    PYTHONPATH=. .venv/bin/python bench/bench_gc.py [--quick] [--rounds 2]

End-to-end ingest rates on this shared host move by +-30% between runs of the same code, more
than the collector's share, so this measures the collector itself: the real `Updater` runs in
this process over a pre-published topic (k=64, 4 negatives; 600k events in 200k-event batches,
`--quick` 200k in 50k batches), and `gc.callbacks` add up the time spent inside collections.
Runs alternate between CPython's default collector and `pause_gc` (default, paused, paused,
default, ...), each on its own topic and fresh state dir; the published payloads are dropped
before the first run so the harness adds no tracked objects of its own.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench_ingest import bootstrap_servers, payloads_of, prepublish
from common import Col, fmt_rate, print_table, write_results

from consumers.kafka_io import StopFlag
from consumers.settings import KafkaSettings, MetricsSettings, TopicSettings, UpdaterSettings
from consumers.topics import create_topics
from consumers.updater import Updater
from tests.synthetic import planted_stream


class GcTimer:
    """Wall time inside collections, and how many were full (generation 2)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.full = 0
        self._t = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t = time.perf_counter()
            return
        self.seconds += time.perf_counter() - self._t
        self.full += info["generation"] == 2


def run_once(boot: str, topic: str, n: int, batch: int, pause: bool, work: Path) -> dict[str, Any]:
    settings = UpdaterSettings(
        kafka=KafkaSettings(bootstrap_servers=boot),
        topics=TopicSettings(interactions=topic, dead_letter=f"{topic}.DLT"),
        metrics=MetricsSettings(port=0),
        state_dir=Path(tempfile.mkdtemp(dir=work)) / "state",
        pause_gc=pause,
        max_batch_events=batch,
        model={"dim": 64, "n_negatives": 4},
    )
    updater = Updater(settings)
    stop = StopFlag()

    def until_applied() -> None:
        while updater.model.state.events_applied < n and not stop:
            time.sleep(0.02)
        stop.event.set()

    timer = GcTimer()
    gc.enable()
    gc.callbacks.append(timer)
    threading.Thread(target=until_applied, daemon=True).start()
    t0 = time.perf_counter()
    try:
        code = updater.run(stop)
    finally:
        gc.callbacks.remove(timer)
        gc.unfreeze()
        gc.enable()
    wall = time.perf_counter() - t0
    if code != 0 or updater.model.state.events_applied != n:
        raise RuntimeError(f"updater exited {code} after {updater.model.state.events_applied}")
    return {
        "gc": "paused" if pause else "CPython default",
        "events": n,
        "wall_s": wall,
        "events_per_s": n / wall,
        "gc_s": timer.seconds,
        "gc_us_per_event": timer.seconds / n * 1e6,
        "gc_share": timer.seconds / wall,
        "full_collections": timer.full,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="200k events, one round")
    ap.add_argument("--rounds", type=int, default=None, help="default/paused pairs (default 2)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    n, batch = (200_000, 50_000) if args.quick else (600_000, 200_000)
    rounds = args.rounds or (1 if args.quick else 2)
    order = [p for r in range(rounds) for p in ((False, True) if r % 2 == 0 else (True, False))]
    s = planted_stream(n, n_users=100_000, n_items=50_000, n_groups=20)
    payloads = payloads_of(s)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-gc-") as tmp, bootstrap_servers() as (boot, _):
        topics = []
        for _ in order:  # publish everything first, then drop the payloads
            topic = f"bench-gc-{uuid.uuid4().hex[:8]}"
            create_topics(boot, {topic: 1, f"{topic}.DLT": 1})
            prepublish(boot, topic, payloads)
            topics.append(topic)
        del payloads, s
        gc.collect()
        for pause, topic in zip(order, topics, strict=True):
            row = run_once(boot, topic, n, batch, pause, Path(tmp))
            print(
                f"{row['gc']:>15}: {fmt_rate(row['events_per_s'])}/s, "
                f"{row['gc_s']:.2f} s in the collector",
                flush=True,
            )
            rows.append(row)
    print_table(
        f"The updater in-process, {n:,} events, {batch:,}-event batches: time inside collections",
        rows,
        [
            Col("gc", "collector"),
            Col("events_per_s", "events/s", fmt_rate),
            Col("wall_s", "wall s", ".2f"),
            Col("gc_s", "in gc s", ".2f"),
            Col("gc_us_per_event", "gc µs/event", ".2f"),
            Col("gc_share", "share of wall", ".1%"),
            Col("full_collections", "full collections", "d"),
        ],
    )
    payload = {"quick": args.quick, "events": n, "batch": batch, "runs": rows}
    write_results("bench_gc", payload, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
