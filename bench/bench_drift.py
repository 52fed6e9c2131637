"""Drift: how many events each model takes to get back to 90% of its hit rate after tastes change.

    PYTHONPATH=. .venv/bin/python bench/bench_drift.py [--quick] [--seeds N] [--plot docs/drift.png]

The stream (`tests/synthetic.drift_stream`): 2,000 users in 5 planted groups over 2,000 items,
30,000 events (15 a user), then every user moves to another group for 30,000 more (120 days of
stream time, so the decay half-life plays its part). With 15 events a user on each side the hit rate
before the change is steady (a user has not used up the group's head), and a model must see a few
events of most users to recover: the figure counts in events what an online model saves. Each model
runs the whole stream test-then-learn (`stream_mf.evaluate.prequential`, HR@10, seen items
excluded), and `tests/synthetic.recovery` reads its outcomes: the hit rate over the last 1,000
scored events before the change, the lowest rolling rate after it, and the events after the change
until the rolling rate (1,000 scored events) is back to 90% of the rate before. A rolling window
lags: no model can score under about 1,000 scored events (~1,100 events here), so read the figures
above that floor.

Models: `popular`; `sgd` with the previous defaults (no recency pull); `default`, the online
model with today's defaults (what the updater learns; its hourly rebuild never fires within a
replay of seconds); `als`, refit every 10,000 events with fold-in between; `hybrid`, the online
model with the updater's rebuild every 10,000 events. Two worker processes.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT, Col, print_table, write_results

from stream_mf.config import ModelConfig
from stream_mf.datasets import EventColumns
from stream_mf.evaluate import make_learner, prequential
from tests.synthetic import DriftStream, drift_stream, recovery

WINDOW = 1000
REFIT_EVERY = 10_000
#: (name, learner, ModelConfig overrides)
MODELS: list[tuple[str, str, dict[str, Any]]] = [
    ("popular", "popular", {}),
    ("sgd (previous defaults)", "sgd", {"user_pull": 0.0, "half_life_s": 30 * 86400.0}),
    ("default", "sgd", {}),
    ("als", "als", {}),
    ("hybrid", "hybrid", {}),
]


def stream(seed: int, quick: bool) -> DriftStream:
    n = 10_000 if quick else 30_000
    users = 700 if quick else 2000
    return drift_stream(
        before=n, after=n, n_users=users, n_items=2000, seed=seed, span_s=120 * 86400.0
    )


def columns(s: DriftStream) -> EventColumns:
    n = s.users.size
    return EventColumns(s.user_ids(), s.item_ids(), s.times, np.full(n, np.nan), ["view"] * n)


def run(job: tuple[str, str, dict[str, Any], int, bool]) -> dict[str, Any]:
    name, kind, over, seed, quick = job
    s = stream(seed, quick)
    lrn = make_learner(kind, ModelConfig(**over), refit_every=REFIT_EVERY)
    r = prequential(columns(s), lrn, progress=False, keep_outcomes=True)
    assert r.outcomes is not None
    before, low, back = recovery(r.outcomes, s.change, WINDOW)
    dropped = low < 0.9 * before
    idx = np.flatnonzero(r.outcomes >= 0)
    hit = (r.outcomes[idx] == 1).astype(np.float64)
    csum = np.concatenate([[0.0], np.cumsum(hit)])
    rolling = (csum[WINDOW:] - csum[:-WINDOW]) / WINDOW
    ends = idx[WINDOW - 1 :]
    step = max(1, rolling.size // 400)
    return {
        "model": name,
        "seed": seed,
        "hr_before": before,
        "hr_lowest_after": low,
        "recovered_events": back,
        "dropped": dropped,
        "hr_overall": r.recall_at_k,
        "seconds": r.seconds,
        "curve": {"events": ends[::step].tolist(), "hit_rate": rolling[::step].tolist()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="10k events each side, one seed")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="PNG (default docs/drift-recovery.png, none if --quick)",
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    seeds = [0] if a.quick else list(range(a.seeds))
    jobs = [(n, k, o, s, a.quick) for s in seeds for n, k, o in MODELS]
    with ProcessPoolExecutor(a.workers) as ex:
        rows = list(ex.map(run, jobs))
    for r in rows:
        print(
            f"{r['model']:>24} seed {r['seed']}: back in {r['recovered_events']}", file=sys.stderr
        )
    table = []
    for name, _, _ in MODELS:
        mine = [r for r in rows if r["model"] == name]
        backs = [r["recovered_events"] if r["dropped"] else 0 for r in mine]
        table.append(
            {
                "model": name,
                "hr_before": float(np.mean([r["hr_before"] for r in mine])),
                "hr_lowest_after": float(np.mean([r["hr_lowest_after"] for r in mine])),
                "recovered": " / ".join(
                    "never" if b is None else "no drop" if b == 0 else f"{b:,}" for b in backs
                ),
                "recovered_median": (
                    None if None in backs else float(np.median(np.asarray(backs, float)))
                ),
                "hr_overall": float(np.mean([r["hr_overall"] for r in mine])),
            }
        )
    print_table(
        f"Drift: events after the change to get back to 90% of the HR@10 before "
        f"(rolling {WINDOW} scored events; seeds {seeds})",
        table,
        [
            Col("model", "model"),
            Col("hr_before", "HR before", ".3f"),
            Col("hr_lowest_after", "lowest after", ".3f"),
            Col("recovered", "events to 90% (per seed)"),
            Col("hr_overall", "HR overall", ".3f"),
        ],
    )
    s0 = stream(seeds[0], a.quick)
    if a.plot is None and not a.quick:
        a.plot = ROOT / "docs" / "drift-recovery.png"
    if a.plot:
        from stream_mf.plot import plot_recovery

        first = [
            dict(
                r["curve"],
                model=r["model"],
                recovered=r["recovered_events"],
                note=None if r["dropped"] else "no drop",
            )
            for r in rows
            if r["seed"] == seeds[0]
        ]
        plot_recovery(
            first, s0.change, a.plot, f"Tastes change at event {s0.change:,} (seed {seeds[0]})"
        )
        print(f"plot: {a.plot}", file=sys.stderr)
    write_results(
        "bench_drift",
        {
            "quick": a.quick,
            "window": WINDOW,
            "refit_every": REFIT_EVERY,
            "change": s0.change,
            "seeds": seeds,
            "table": table,
            "runs": rows,
        },
        a.out,
    )


if __name__ == "__main__":
    main()
