"""Prequential evaluation speed on MovieLens-latest-small: the block evaluator vs the loop.

    PYTHONPATH=. .venv/bin/python bench/bench_evaluate.py [--quick] [--repeats N]

For `popular`, `sgd` and `hybrid` (ALS rebuild every 1,000 events, as the README's quality
table), three paths over the same events, interleaved model by model so that noise from other
processes hits them alike:

- `before`: `stream_mf/evaluate.py` as it was before the block evaluator (read from git at
  BEFORE_COMMIT; skipped, and said so, where git or that commit is missing);
- `loop`: today's per-event loop (`prequential(..., block=None)`), the exactness reference;
- `block`: the block evaluator (`stream_mf.block_eval`), the default.

`loop` and `block` must give the same hits (printed; tests/unit/test_block_eval.py checks it on
fixed seeds). `before` and today differ for `hybrid` only: its rebuild now steps every
`guard_per_batch` events instead of after every event (so that batching does not move it).
Today's evaluator runs numba's kernels (hybrid's ALS) on one thread; `before` ran them on all
cores, so `hybrid` also gets a `before, 1 thread` row: the gain from the evaluator alone.
river's `progressive_val_score` (FunkMF predicting the rating: a different task, one
prediction per event instead of ranking every item, so a reference for the per-event overhead,
not for quality) is timed once. numba kernels are loaded on a small slice first (untimed).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy is imported: every path on one core

import numba  # noqa: E402
import numpy as np  # noqa: E402
from common import ROOT, Col, fmt_rate, print_table, write_results  # noqa: E402

from consumers.catalog import DEFAULT_CATALOG  # noqa: E402
from stream_mf import evaluate  # noqa: E402
from stream_mf.config import ModelConfig  # noqa: E402
from stream_mf.datasets import ColumnSpec, EventColumns, read_events  # noqa: E402

#: the last commit before the block evaluator (main at the time)
BEFORE_COMMIT = "4091993"
MODELS = ("popular", "sgd", "hybrid")
REFIT_EVERY = 1000
#: `before` with numba's kernels on one thread, as today's evaluator runs them (for `hybrid`,
#: the one model with parallel kernels, its rebuilds' ALS): how much of the gain is that alone
BEFORE_1T = "before, 1 thread"


def load_before() -> ModuleType | None:
    """`stream_mf/evaluate.py` at BEFORE_COMMIT, as a module, or None."""
    try:
        src = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{BEFORE_COMMIT}:stream_mf/evaluate.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"no 'before' column: git show {BEFORE_COMMIT} failed ({exc})", file=sys.stderr)
        return None
    path = Path(tempfile.mkdtemp()) / "evaluate_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("evaluate_before", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["evaluate_before"] = mod
    spec.loader.exec_module(mod)
    return mod


def run(path: str, mod: Any, name: str, ev: EventColumns) -> dict[str, Any]:
    learner = mod.make_learner(name, ModelConfig(), refit_every=REFIT_EVERY)
    kw = {"block": None} if path == "loop" else {}
    threads = numba.get_num_threads()
    if path == BEFORE_1T:
        numba.set_num_threads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        r = mod.prequential(ev, learner, progress=False, keep_outcomes=True, **kw)
    finally:
        numba.set_num_threads(threads)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "model": name,
        "path": path,
        "seconds": secs,
        "cpu_seconds": cpu,
        "events_per_s": len(ev) / secs,
        "events_per_cpu_s": len(ev) / cpu,
        "evaluated": r.evaluated,
        "hits": r.hits,
        "recall_at_k": r.recall_at_k,
        "outcomes": r.outcomes,
    }


def river_row(ev: EventColumns) -> dict[str, Any]:
    """river's progressive_val_score on the same events (FunkMF on the rating, MAE)."""
    try:
        from river import evaluate as river_evaluate
        from river import metrics, optim, reco
        from river.base import Regressor
    except ImportError as exc:
        return {"model": "river FunkMF", "note": f"river not installed ({exc})"}

    class Adapter(Regressor):  # type: ignore[misc]
        """progressive_val_score feeds (x, y); river's reco models take (user, item, y)."""

        def __init__(self) -> None:
            self.mf = reco.FunkMF(
                n_factors=64,
                optimizer=optim.SGD(0.05),
                initializer=optim.initializers.Normal(mu=0.0, sigma=0.1, seed=42),
            )

        def learn_one(self, x: dict[str, Any], y: float) -> None:
            self.mf.learn_one(x["user"], x["item"], y)

        def predict_one(self, x: dict[str, Any]) -> float:
            return float(self.mf.predict_one(x["user"], x["item"]))

    values = ev.values.tolist()
    stream = (
        ({"user": u, "item": i}, v) for u, i, v in zip(ev.users, ev.items, values, strict=True)
    )
    t0, c0 = time.perf_counter(), time.process_time()
    mae = river_evaluate.progressive_val_score(stream, Adapter(), metrics.MAE())
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "model": "river FunkMF",
        "path": "progressive_val_score",
        "seconds": secs,
        "cpu_seconds": cpu,
        "events_per_s": len(ev) / secs,
        "events_per_cpu_s": len(ev) / cpu,
        "note": f"rating MAE {mae.get():.3f}: predicts one rating an event, ranks nothing",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the first 20k events, no river")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved rounds (best kept)")
    ap.add_argument(
        "--no-loop", action="store_true", help="leave out the per-event loop (the slowest path)"
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    events = read_events(DEFAULT_CATALOG.parent / "ratings.csv.gz", ColumnSpec()).sorted_by_time()
    if args.quick:
        events = events.take(np.arange(20_000))
    before = load_before()
    paths: list[tuple[str, Any]] = [("block", evaluate)]
    if not args.no_loop:
        paths.insert(0, ("loop", evaluate))
    if before is not None:
        paths.insert(0, ("before", before))
    warm = events.take(np.arange(2_000))

    def paths_of(name: str) -> list[tuple[str, Any]]:
        if name != "hybrid" or before is None:
            return paths
        return [paths[0], (BEFORE_1T, before), *paths[1:]]

    for name in MODELS:
        for path, mod in paths_of(name):
            run(path, mod, name, warm)
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for _ in range(max(1, args.repeats)):
        for name in MODELS:
            for path, mod in paths_of(name):
                row = run(path, mod, name, events)
                key = (name, path)
                if key not in best or row["cpu_seconds"] < best[key]["cpu_seconds"]:
                    best[key] = row
    rows = []
    for name in MODELS:
        block = best[(name, "block")]
        loop = best.get((name, "loop"))
        ref = best.get((name, "before"), loop or block)
        for path, _ in paths_of(name):
            row = dict(best[(name, path)])
            row["speedup"] = row["events_per_cpu_s"] / ref["events_per_cpu_s"]
            row["speedup_wall"] = row["events_per_s"] / ref["events_per_s"]
            if path == "block" and loop is not None:
                row["same_hits_as_loop"] = bool(np.array_equal(loop["outcomes"], block["outcomes"]))
                row["events_differing"] = int(np.sum(loop["outcomes"] != block["outcomes"]))
            rows.append(row)
    if not args.quick:
        rows.append(river_row(events))
    for r in rows:
        r.pop("outcomes", None)
    title = (
        f"Prequential Recall@10 on MovieLens-latest-small, {len(events):,} events "
        f"(best of {max(1, args.repeats)}, interleaved, one BLAS thread; events per CPU second, "
        f"which preemption on a shared machine does not move; speed-up vs "
        f"{'before' if before is not None else 'loop'})"
    )
    print_table(
        title,
        rows,
        [
            Col("model", "model"),
            Col("path", "path"),
            Col("events_per_cpu_s", "events/CPU-s", fmt_rate),
            Col("speedup", "speed-up", lambda x: f"{x:.2f}x"),
            Col("events_per_s", "events/wall-s", fmt_rate),
            Col("recall_at_k", "Recall@10", ".4f"),
            Col("hits", "hits"),
            Col("same_hits_as_loop", "= loop"),
        ],
    )
    for r in rows:
        if r.get("note"):
            print(f"{r['model']}: {r['note']}")
    write_results(
        "bench_evaluate",
        {"quick": args.quick, "events": len(events), "before_commit": BEFORE_COMMIT, "rows": rows},
        args.out,
    )


if __name__ == "__main__":
    main()
