"""Run every benchmark, then print one summary against the targets.

    make bench                                   # full run (a few minutes)
    PYTHONPATH=. .venv/bin/python bench/run_all.py [--quick]

Each bench runs in its own process: a fresh interpreter per bench keeps one's memory and JIT
state from colouring the next, and lets bench_topk pin the BLAS pools before numpy loads. The
summary is read back from the JSON files they write (summary.json sits next to them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from common import ROOT, Col, bench_args, fmt_rate, print_table, results_path, write_results

BENCHES = ("bench_sgd", "bench_store", "bench_topk")


def run(name: str, quick: bool) -> dict[str, Any]:
    """Run bench/<name>.py in a child process and load the JSON it wrote."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(ROOT / "bench" / f"{name}.py"), *(["--quick"] if quick else [])]
    print(f"=== {name} {'(quick)' if quick else ''}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    print(f"=== {name} done in {time.perf_counter() - t0:.0f} s\n", flush=True)
    return json.loads(results_path(name, quick).read_text())


def summary_rows(res: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per headline figure: measured, target, verdict, and the in-run ratio."""
    sgd, store, topk = res["bench_sgd"], res["bench_store"], res["bench_topk"]
    best_sgd = max(sgd["rows"], key=lambda r: r["kernel_events_per_s"])
    best_learn = max(sgd["rows"], key=lambda r: r["learn_events_per_s"])
    best_store = max(store["rows"], key=lambda r: r["both_events_per_s"])
    rec = next(
        r for r in topk["rows"] if r["scenario"] == "plain" and r["impl"].startswith("recommend")
    )
    ref = sgd["reference"]
    return [
        {
            "what": f"SGD kernel, batch {best_sgd['batch']:,}",
            "measured": f"{fmt_rate(best_sgd['kernel_events_per_s'])} ev/s",
            "target": ">= 1.00M ev/s",
            "ok": "yes" if sgd["meets_target"] else "NO",
            "ratio": f"{ref['speedup']:.0f}x numpy reference (same 5k slice)",
        },
        {
            "what": f"OnlineModel.learn, batch {best_learn['batch']:,}",
            "measured": f"{fmt_rate(best_learn['learn_events_per_s'])} ev/s",
            "target": "-",
            "ok": "-",
            "ratio": f"kernel is {best_learn['kernel_share']:.0%} of learn",
        },
        {
            "what": f"learn + commit, batch {best_store['batch']:,}",
            "measured": f"{fmt_rate(best_store['both_events_per_s'])} ev/s",
            "target": ">= 150k ev/s",
            "ok": "yes" if store["meets_target"] else "NO",
            "ratio": f"{best_store['vs_naive']:.1f}x naive per-row get/put "
            f"({fmt_rate(store['naive']['events_per_s'])} ev/s)",
        },
        {
            "what": "top-10 recommend, 50k x 64",
            "measured": f"p50 {rec['p50_ms']:.3f} / p99 {rec['p99_ms']:.3f} ms "
            f"(CPU p99 {rec['cpu_p99_ms']:.3f})",
            "target": "p99 < 1 ms",
            "ok": "yes" if topk["meets_target"] else "NO",
            "ratio": f"numpy argpartition p50 / this p50 = {rec['ref_p50_over_p50']:.2f}",
        },
    ]


def main() -> None:
    args = bench_args(__doc__.splitlines()[0])
    t0 = time.perf_counter()
    res = {name: run(name, args.quick) for name in BENCHES}
    rows = summary_rows(res)
    print_table(
        f"Summary ({'quick' if args.quick else 'full'} run, {time.perf_counter() - t0:.0f} s; "
        "ratios are within one run)",
        rows,
        [
            Col("what", "benchmark"),
            Col("measured", "measured"),
            Col("target", "target"),
            Col("ok", "met"),
            Col("ratio", "vs reference (same run)"),
        ],
    )
    write_results("summary", {"quick": args.quick, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
