"""Implicit-ALS fit time: `stream_mf.als.als_fit` vs the `implicit` library's CPU ALS.

    PYTHONPATH=. .venv/bin/python bench/bench_als.py [--quick] [--threads N] [--repeats N]
    PYTHONPATH=. .venv/bin/python bench/bench_als.py --compare REV [--threads N] [--fits N]

Same matrix, same starting factors, factors=64, 15 iterations, regularization 0.01, on (a)
MovieLens latest-small (every rating a positive with confidence 1) and (b) the shared planted
stream (1M events, 100k users, 50k items; a repeated (user, item) pair has confidence = count).
Like for like: CG against CG with the same `cg_steps` (implicit's default solver), and on
MovieLens also Cholesky against implicit's exact solver (`use_cg=False`; not with --quick). Our
CSR holds `alpha * c` and implicit's the whole confidence `1 + alpha * c`, so both fit the same
objective; the final loss of each model (computed the same way, untimed) shows they land in the
same place.

Threads: numba's pool and implicit's `num_threads` are both set to `--threads` (default: 2, or
the cores available). BLAS is pinned to one thread, as implicit asks (its per-row BLAS calls run
inside its own OpenMP loop); our fit makes no BLAS calls. Each side is warmed up on a 1-iteration
fit (JIT compile / cache load), then fits alternate, and the best of `--repeats` is reported.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy is imported (by `common` too)

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
from common import (  # noqa: E402
    ROOT,
    STREAM_FULL,
    STREAM_QUICK,
    Col,
    compare_summary,
    in_tree,
    print_table,
    rev_label,
    round_order,
    source_tree,
    write_results,
)

from stream_mf.als import CSR, als_fit, als_loss, confidence_matrix  # noqa: E402

FACTORS, ITERATIONS, REG, CG_STEPS, ALPHA = 64, 15, 0.01, 3, 1.0
TARGET_RATIO = 1.5
MOVIELENS = ROOT / "data" / "movielens-latest-small" / "ratings.csv.gz"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller run (under ~30 s)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/)")
    ap.add_argument("--threads", type=int, default=min(2, len(os.sched_getaffinity(0))))
    ap.add_argument("--repeats", type=int, default=None, help="timed fits per side (best-of)")
    ap.add_argument(
        "--compare",
        metavar="REV",
        default=None,
        help="only: today's fit against git revision REV's, alternating child processes",
    )
    ap.add_argument(
        "--compare-tree",
        type=Path,
        default=None,
        help="with --compare: REV is checked out here (default: a temporary git archive)",
    )
    ap.add_argument("--rounds", type=int, default=4, help="--compare: child processes per side")
    ap.add_argument("--fits", type=int, default=None, help="--compare: timed fits per child (2)")
    ap.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        help="--compare: only these (movielens-small, planted-<n>k)",
    )
    return ap.parse_args()


# ---- data --------------------------------------------------------------------------------------


def movielens_matrix() -> tuple[str, CSR, CSR]:
    from stream_mf.datasets import read_events

    ev = read_events(MOVIELENS)
    _, u = np.unique(np.asarray(ev.users), return_inverse=True)
    _, i = np.unique(np.asarray(ev.items), return_inverse=True)
    keys = np.unique((u.astype(np.int64) << 32) | i.astype(np.int64))
    Cu, Ci = confidence_matrix(keys, np.zeros(keys.size), u.max() + 1, i.max() + 1, 0.0, 0.0, ALPHA)
    return "movielens-small", Cu, Ci


def synthetic_matrix(quick: bool) -> tuple[str, CSR, CSR]:
    from tests.synthetic import planted_stream

    spec = STREAM_QUICK if quick else STREAM_FULL
    s = planted_stream(
        spec["n_events"],
        n_users=spec["n_users"],
        n_items=spec["n_items"],
        n_groups=spec["n_groups"],
    )
    keys, counts = np.unique((s.users.astype(np.int64) << 32) | s.items, return_counts=True)
    Cu, Ci = confidence_matrix(
        keys, np.log(counts), spec["n_users"], spec["n_items"], 0.0, 0.0, ALPHA
    )
    return f"planted-{spec['n_events'] // 1000}k", Cu, Ci


# ---- the two fits ------------------------------------------------------------------------------


def implicit_model(threads: int, use_cg: bool, iterations: int) -> Any:
    from implicit.cpu.als import AlternatingLeastSquares

    m = AlternatingLeastSquares(
        factors=FACTORS,
        regularization=REG,
        alpha=1.0,
        iterations=iterations,
        use_cg=use_cg,
        num_threads=threads,
        random_state=0,
    )
    m.cg_steps = CG_STEPS
    return m


def time_pair(
    Cu: CSR, Ci: CSR, solver: str, threads: int, repeats: int
) -> dict[str, float | list[float]]:
    """Best-of-`repeats` seconds for each library from the same start, fits interleaved."""
    import scipy.sparse as sp
    from threadpoolctl import threadpool_limits

    # implicit's matrix holds the whole confidence 1 + alpha * c; ours alpha * c
    M = sp.csr_matrix((1.0 + Cu.data, Cu.indices, Cu.indptr), shape=Cu.shape)
    rng = np.random.default_rng(0)
    X0 = rng.random((Cu.n_rows, FACTORS), dtype=np.float32) * 0.01
    Y0 = rng.random((Ci.n_rows, FACTORS), dtype=np.float32) * 0.01
    use_cg = solver == "cg"
    final: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def ours(iterations: int) -> float:
        X, Y = X0.copy(), Y0.copy()
        t0 = time.perf_counter()
        als_fit(Cu, Ci, X, Y, REG, iterations, solver, CG_STEPS, compute_loss=False)
        dt = time.perf_counter() - t0
        final["ours"] = X, Y
        return dt

    def theirs(iterations: int) -> float:
        m = implicit_model(threads, use_cg, iterations)
        m.user_factors, m.item_factors = X0.copy(), Y0.copy()
        with threadpool_limits(1, "blas"):
            t0 = time.perf_counter()
            m.fit(M, show_progress=False)
            dt = time.perf_counter() - t0
        final["implicit"] = m.user_factors, m.item_factors
        return dt

    ours(1)  # warm-up: JIT compile or cache load, page in the arrays
    theirs(1)
    t_ours, t_theirs = [], []
    for r in range(repeats):  # alternate who goes first, so drifts in load hit both
        pair = (ours, theirs) if r % 2 == 0 else (theirs, ours)
        for fn in pair:
            (t_ours if fn is ours else t_theirs).append(fn(ITERATIONS))
    loss = {
        k: als_loss(Cu, np.ascontiguousarray(x), np.ascontiguousarray(y), REG)
        for k, (x, y) in final.items()
    }
    return {
        "ours_s": min(t_ours),
        "implicit_s": min(t_theirs),
        "ratio": min(t_ours) / min(t_theirs),
        "ours_all_s": t_ours,
        "implicit_all_s": t_theirs,
        "ours_loss": loss["ours"],
        "implicit_loss": loss["implicit"],
    }


# ---- --compare: old code against new ------------------------------------------------------------


def compare_inputs(quick: bool) -> dict[str, np.ndarray]:
    """The matrices' inputs (sorted `user << 32 | item` keys, log confidences, shape) for the
    child processes: MovieLens (every rating confidence 1) and the planted stream (log count)."""
    from stream_mf.datasets import read_events
    from tests.synthetic import planted_stream

    ev = read_events(MOVIELENS)
    _, u = np.unique(np.asarray(ev.users), return_inverse=True)
    _, i = np.unique(np.asarray(ev.items), return_inverse=True)
    keys = np.unique((u.astype(np.int64) << 32) | i.astype(np.int64))
    spec = STREAM_QUICK if quick else STREAM_FULL
    s = planted_stream(
        spec["n_events"],
        n_users=spec["n_users"],
        n_items=spec["n_items"],
        n_groups=spec["n_groups"],
    )
    pkeys, counts = np.unique((s.users.astype(np.int64) << 32) | s.items, return_counts=True)
    planted = f"planted-{spec['n_events'] // 1000}k"
    return {
        "movielens-small.keys": keys,
        "movielens-small.logc": np.zeros(keys.size),
        "movielens-small.shape": np.array([u.max() + 1, i.max() + 1]),
        f"{planted}.keys": pkeys,
        f"{planted}.logc": np.log(counts),
        f"{planted}.shape": np.array([spec["n_users"], spec["n_items"]]),
    }


def compare_main(args: argparse.Namespace) -> None:
    """`--compare REV`: `als_fit_child.py` under REV's checkout and today's, alternating (ABBA),
    `--rounds` processes each; per round the best of its fits, then medians and new/old."""
    fits = args.fits or (1 if args.quick else 2)
    rev = rev_label(args.compare)
    inputs = compare_inputs(args.quick)
    planted = next(k.split(".")[0] for k in inputs if k.startswith("planted"))
    plan = {"movielens-small": ["cg"] + ([] if args.quick else ["cholesky"]), planted: ["cg"]}
    plan = {k: v for k, v in plan.items() if not args.datasets or k in args.datasets}
    child = Path(__file__).resolve().parent / "als_fit_child.py"
    argv_tail = [str(args.threads), str(fits)] + [f"{k}:{','.join(v)}" for k, v in plan.items()]
    per: dict[str, dict[str, list[float]]] = {}
    runs: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="bench-als-cmp-") as tmp,
        source_tree(args.compare, args.compare_tree) as old_tree,
    ):
        npz = Path(tmp) / "inputs.npz"
        np.savez(npz, **inputs)  # type: ignore[arg-type]
        trees = {"old": old_tree, "new": ROOT}
        for r in range(args.rounds):
            for side in round_order(r):
                env = in_tree(dict(os.environ), trees[side])
                out = subprocess.run(
                    [sys.executable, str(child), str(npz), *argv_tail],
                    env=env,
                    cwd=trees[side],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                doc = json.loads(out.strip().splitlines()[-1])
                if not Path(doc["als_file"]).resolve().is_relative_to(trees[side].resolve()):
                    raise RuntimeError(f"{side} child imported {doc['als_file']}")
                runs.append({"round": r, "side": side, **doc})
                for name, res in doc["datasets"].items():
                    per.setdefault(f"{name} confidence", {"old": [], "new": []})[side].append(
                        res["confidence_s"]
                    )
                    for solver, f in res["fits"].items():
                        key = f"{name} {solver}"
                        per.setdefault(key, {"old": [], "new": []})[side].append(f["best_s"])
                        per.setdefault(f"{key} cpu", {"old": [], "new": []})[side].append(
                            f["best_cpu_s"]
                        )
                        per.setdefault(f"{key} loss", {"old": [], "new": []})[side].append(
                            f["loss"]
                        )
                print(
                    f"round {r} {side}: "
                    + ", ".join(
                        f"{n} {s} {f['best_s']:.3f}s"
                        for n, res in doc["datasets"].items()
                        for s, f in res["fits"].items()
                    ),
                    flush=True,
                )
    rows = []
    summaries = {}
    for key, v in per.items():
        if key.endswith(" loss"):
            continue
        c = compare_summary(v, higher_is_better=False)
        summaries[key] = c
        loss = None if key.endswith(" cpu") else per.get(f"{key} loss")
        rows.append(
            {
                "what": (
                    f"{key[:-4]} fit, CPU s (all threads)"
                    if key.endswith(" cpu")
                    else key
                    if key.endswith("confidence")
                    else f"{key} fit, wall s"
                ),
                "old": c["median_old"],
                "new": c["median_new"],
                "ratio": c["new_over_old"],
                "spread": f"{c['ratio_min']:.2f}-{c['ratio_max']:.2f}",
                "loss_old": loss["old"][0] if loss else None,
                "loss_new": loss["new"][0] if loss else None,
            }
        )
    text = print_table(
        f"ALS at {rev} (old) and {rev_label('HEAD')} (new): seconds, k={FACTORS}, {ITERATIONS} "
        f"iterations, {args.threads} threads; per round the best of {fits} fits in one child "
        f"process, median of {args.rounds} rounds per side, alternating (ABBA)",
        rows,
        [
            Col("what", "step"),
            Col("old", "old s", ".3f"),
            Col("new", "new s", ".3f"),
            Col("ratio", "new/old", ".3f"),
            Col("spread", "per round"),
            Col("loss_old", "loss old", ".6g"),
            Col("loss_new", "loss new", ".6g"),
        ],
    )
    write_results(
        "bench_als_compare",
        {
            "quick": args.quick,
            "threads": args.threads,
            "rounds": args.rounds,
            "fits_per_round": fits,
            "old_rev": rev,
            "new_rev": rev_label("HEAD"),
            "plan": plan,
            "summaries": summaries,
            "runs": runs,
            "table": text,
            "wall_s": time.perf_counter() - t_all,
        },
        args.out,
    )


def main() -> None:
    args = parse_args()
    if args.compare:
        compare_main(args)
        return
    repeats = args.repeats or (2 if args.quick else 3)
    numba.set_num_threads(args.threads)
    import implicit

    ml_solvers = ("cg",) if args.quick else ("cg", "cholesky")  # Cholesky: ~10 s more
    cases = [(movielens_matrix, ml_solvers), (lambda: synthetic_matrix(args.quick), ("cg",))]
    rows: list[dict[str, Any]] = []
    for build, solvers in cases:
        t0 = time.perf_counter()
        name, Cu, Ci = build()
        prep = time.perf_counter() - t0
        for solver in solvers:
            r = time_pair(Cu, Ci, solver, args.threads, repeats)
            row = {
                "dataset": name,
                "solver": solver if solver == "cholesky" else f"cg{CG_STEPS}",
                "users": Cu.n_rows,
                "items": Ci.n_rows,
                "nnz": Cu.nnz,
                "prep_s": prep,
                "ours_ms_per_iter": 1e3 * r["ours_s"] / ITERATIONS,  # type: ignore[operator]
                **r,
            }
            rows.append(row)
            print(
                f"{name} {row['solver']}: ours {r['ours_s']:.3f}s, implicit {r['implicit_s']:.3f}s",
                flush=True,
            )
    text = print_table(
        f"ALS fit, k={FACTORS}, {ITERATIONS} iterations, reg={REG}, {args.threads} threads, "
        f"best of {repeats} (target: ours <= {TARGET_RATIO}x implicit)",
        rows,
        [
            Col("dataset", "dataset"),
            Col("solver", "solver"),
            Col("users", "users", ","),
            Col("items", "items", ","),
            Col("nnz", "nnz", ","),
            Col("ours_s", "ours s", ".3f"),
            Col("implicit_s", "implicit s", ".3f"),
            Col("ratio", "ours/implicit", ".2f"),
            Col("ours_loss", "loss ours", ".6g"),
            Col("implicit_loss", "loss implicit", ".6g"),
        ],
    )
    write_results(
        "bench_als",
        {
            "quick": args.quick,
            "threads": args.threads,
            "repeats": repeats,
            "params": {
                "factors": FACTORS,
                "iterations": ITERATIONS,
                "regularization": REG,
                "cg_steps": CG_STEPS,
                "alpha": ALPHA,
            },
            "implicit": implicit.__version__,
            "numba_threading_layer": numba.threading_layer(),
            "target_ratio": TARGET_RATIO,
            "rows": rows,
            "table": text,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
