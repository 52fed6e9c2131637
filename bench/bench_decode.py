"""Per-event cost of the updater's Python steps before the kernel: decode and id resolution.

    PYTHONPATH=. .venv/bin/python bench/bench_decode.py [--quick] [--compare REV] [--rounds N]

Decodes the shared planted stream's JSON payloads (as `bench_ingest.py` publishes them) in
batches of 5k with `decode_events` (with a per-payload future bound, as the updater passes), and
resolves the decoded user and item ids against tables that know them (the steady state) and
against fresh tables (every id new). Figures are thread CPU time per event, the median over
interleaved rounds; `--compare REV` also decodes with `stream_mf/decode.py` as it was at git
revision REV, round by round against today's, and reports new/old.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from bench_ingest import payloads_of
from common import ROOT, Col, print_table, synthetic_events, write_results

from stream_mf.config import ModelConfig
from stream_mf.decode import decode_events
from stream_mf.state import EntityTable

BATCH = 5_000
TYPES = ModelConfig().event_types


def decode_at(rev: str) -> Callable[..., Any]:
    """`decode_events` as it was at git revision `rev` (its source loaded as a temp module)."""
    src = subprocess.run(
        ["git", "show", f"{rev}:stream_mf/decode.py"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="decode_at_")) / "decode_at.py"
    path.write_bytes(src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # msgspec resolves the structs' annotations in it
    spec.loader.exec_module(mod)
    return mod.decode_events  # type: ignore[no-any-return]


def cpu_per_event(fn: Callable[[int, int], object], n: int) -> float:
    """Thread CPU seconds per event of `fn(lo, hi)` over [0, n) in BATCH pieces."""
    c0 = time.thread_time()
    for lo in range(0, n, BATCH):
        fn(lo, min(lo + BATCH, n))
    return (time.thread_time() - c0) / n


def resolve_run(users: Sequence[str], items: Sequence[str], known: bool) -> float:
    cfg = ModelConfig()
    tabs = [EntityTable(k, cfg.dim, cfg.seed, cfg.init_scale) for k in ("user", "item")]
    if known:
        tabs[0].resolve(users)
        tabs[1].resolve(items)

    def step(lo: int, hi: int) -> None:
        tabs[0].resolve(users[lo:hi])
        tabs[1].resolve(items[lo:hi])

    return cpu_per_event(step, len(users))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200k events (default 1M)")
    ap.add_argument("--compare", metavar="REV", default=None)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    s, _ = synthetic_events(args.quick)
    payloads = [v for _, v in payloads_of(s)]
    n = len(payloads)
    latest = np.full(n, np.inf)
    sides: dict[str, Callable[..., Any]] = {"new": decode_events}
    if args.compare:
        sides["old"] = decode_at(args.compare)
    cpu: dict[str, list[float]] = {k: [] for k in (*sides, "resolve_known", "resolve_fresh")}
    dec = decode_events(payloads, TYPES, 64 * 1024, latest)
    for r in range(args.rounds):
        names = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for name in names:
            fn = sides[name]
            cpu[name].append(
                cpu_per_event(
                    lambda lo, hi, f=fn: f(payloads[lo:hi], TYPES, 65536, latest[lo:hi]), n
                )
            )
        cpu["resolve_known"].append(resolve_run(dec.users, dec.items, known=True))
        cpu["resolve_fresh"].append(resolve_run(dec.users, dec.items, known=False))
    med = {k: float(np.median(v)) for k, v in cpu.items()}
    rows = [
        {"step": "decode_events (today)", "us": med["new"] * 1e6},
        {"step": "resolve users+items, known ids", "us": med["resolve_known"] * 1e6},
        {"step": "resolve users+items, every id new", "us": med["resolve_fresh"] * 1e6},
    ]
    if "old" in med:
        rows.insert(1, {"step": f"decode_events at {args.compare}", "us": med["old"] * 1e6})
    print_table(
        f"{n:,} events in {BATCH:,}-event batches, thread CPU us per event (median of "
        f"{args.rounds} interleaved rounds)",
        rows,
        [Col("step", "step"), Col("us", "us/event", ".3f")],
    )
    ratio = med["old"] / med["new"] if "old" in med else None
    if ratio is not None:
        print(f"decode new/old speed: {ratio:.3f}")
    write_results(
        "bench_decode",
        {
            "quick": args.quick,
            "events": n,
            "batch": BATCH,
            "compare": args.compare,
            "median_cpu_s_per_event": med,
            "decode_new_over_old": ratio,
            "cpu_s_per_event_runs": cpu,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
