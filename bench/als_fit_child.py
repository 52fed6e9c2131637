"""One process of `bench_als.py --compare`: ALS fits with whichever `stream_mf` PYTHONPATH names.

    PYTHONPATH=<checkout> .venv/bin/python bench/als_fit_child.py IN.npz THREADS FITS NAME:SOLVERS

Imports nothing from the bench (its `common` would put today's checkout first on sys.path), so
the parent can point PYTHONPATH at an old one. For each NAME in IN.npz (`<name>.keys`,
`<name>.logc`, `<name>.shape`) and each of its comma-separated SOLVERS: builds the confidence
CSRs (timed), warms the fit up with one iteration (numba compile or cache load), then times FITS
fits of 15 iterations from the same seeded start; prints one JSON document on stdout.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy is imported

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402

import stream_mf.als as als  # noqa: E402

FACTORS, ITERATIONS, REG, CG_STEPS, ALPHA = 64, 15, 0.01, 3, 1.0


def main(argv: list[str]) -> int:
    path, threads, fits = argv[0], int(argv[1]), int(argv[2])
    plan = {a.split(":")[0]: a.split(":")[1].split(",") for a in argv[3:]}
    numba.set_num_threads(threads)
    data = np.load(path)
    out: dict[str, Any] = {"als_file": als.__file__, "datasets": {}}
    for name, solvers in plan.items():
        keys, logc = data[f"{name}.keys"], data[f"{name}.logc"]
        n_users, n_items = (int(x) for x in data[f"{name}.shape"])
        als.confidence_matrix(keys[:1000], logc[:1000], n_users, n_items, 0.0, 0.0, ALPHA)
        t0 = time.perf_counter()
        Cu, Ci = als.confidence_matrix(keys, logc, n_users, n_items, 0.0, 0.0, ALPHA)
        conf_s = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        X0 = rng.random((n_users, FACTORS), dtype=np.float32) * 0.01
        Y0 = rng.random((n_items, FACTORS), dtype=np.float32) * 0.01
        res: dict[str, Any] = {"confidence_s": conf_s, "nnz": int(Cu.nnz), "fits": {}}
        for solver in solvers:
            X, Y = X0.copy(), Y0.copy()
            als.als_fit(Cu, Ci, X, Y, REG, 1, solver, CG_STEPS, compute_loss=False)  # warm-up
            times, cpu = [], []
            for _ in range(fits):
                X, Y = X0.copy(), Y0.copy()
                c0, t0 = time.process_time(), time.perf_counter()
                als.als_fit(Cu, Ci, X, Y, REG, ITERATIONS, solver, CG_STEPS, compute_loss=False)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)  # all threads: less moved by preemption
            loss = als.als_loss(Cu, X, Y, REG)
            res["fits"][solver] = {
                "seconds": times,
                "best_s": min(times),
                "cpu_s": cpu,
                "best_cpu_s": min(cpu),
                "loss": loss,
            }
        out["datasets"][name] = res
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
