"""Niche tastes in a long tail: how many of a niche user's top-10 lie in the user's own niche.

    PYTHONPATH=. .venv/bin/python bench/bench_niche.py [--quick] [--ablation]

Every model runs on the same niche streams (`tests/synthetic.niche_stream`, the 8 variants of
`NICHE_VARIANTS`: flat or skewed tail, niches interleaved with the tail or apart in time, niche
items globally popular or not; 3 niches of 200/120/60 users, 8 events each in 40 items, inside
10x as many background events over 20k tail items), in the same run: our `popular`, `sgd` (the
default model), `sgd` with the previous defaults, `als`, `hybrid` (both refit every 10k events)
from `stream_mf.evaluate`, and `implicit`'s ALS and BPR fitted offline on the whole stream. A
cell is the mean, over a niche's users, of their top-10 items (seen ones excluded) in their
niche, for the worst of the three niches (10 = all).

`--ablation` also runs the single-factor ablation of the online model's settings (each changed
alone from the previous defaults, then the chosen defaults): the niche figure per variant,
MovieLens-latest-small prequential Recall@10 (`stream_mf.evaluate`) and planted-taste accuracy
(users of 200 whose top-10 is mostly their group: `tests/synthetic.planted_in_group`). Two
worker processes; the MovieLens runs dominate (minutes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT, Col, print_table, write_results

from stream_mf.config import ModelConfig
from stream_mf.evaluate import make_learner
from tests.synthetic import (
    NICHE_VARIANTS,
    NicheStream,
    niche_hits,
    niche_stream,
    niche_top10,
    planted_in_group,
)

MOVIELENS = ROOT / "data/movielens-latest-small/ratings.csv.gz"
#: The online model's defaults before the niche fix (item biases at 0.2x the rate).
OLD_DEFAULTS: dict[str, Any] = {"lr_bias": 0.2, "lr_user": 2.0, "uniform_mix": 0.5}
#: One factor at a time, each from the old defaults (the issue's list, in its order), then the
#: chosen combination (today's defaults) and its first step.
ABLATION: list[tuple[str, dict[str, Any]]] = [
    ("old defaults", {}),
    ("lr_bias 0 (no item bias)", {"lr_bias": 0.0}),
    ("lr_bias 0.05", {"lr_bias": 0.05}),
    ("biases from uniform negatives only", {"bias_uniform": True}),
    ("negative_exponent 0", {"negative_exponent": 0.0}),
    ("uniform_mix 1 (all uniform)", {"uniform_mix": 1.0}),
    ("uniform_mix 0 (all popularity)", {"uniform_mix": 0.0}),
    ("n_candidates 1 (no best-of-2)", {"n_candidates": 1}),
    ("max_norm 0 (none)", {"max_norm": 0.0}),
    ("reg 0.02", {"reg": 0.02}),
    ("lr_user 1", {"lr_user": 1.0}),
    ("lr_user 3", {"lr_user": 3.0}),
    ("lr_bias 0, lr_user 2.5", {"lr_bias": 0.0, "lr_user": 2.5}),
]


def implicit_top10(stream: NicheStream, kind: str) -> dict[int, float]:
    """`implicit`'s ALS or BPR fitted offline on the whole stream (counts as confidences)."""
    from scipy.sparse import csr_matrix
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, "blas")  # as implicit asks (its own threads do the parallel work)

    n_users = int(stream.users.max()) + 1
    n_items = int(stream.items.max()) + 1
    counts = csr_matrix(
        (np.ones(stream.users.size, np.float32), (stream.users, stream.items)),
        shape=(n_users, n_items),
    )
    counts.sum_duplicates()
    if kind == "als":
        from implicit.cpu.als import AlternatingLeastSquares

        # the rebuild's settings: confidence 1 + alpha * c, alpha 10, reg 0.1, 64 factors
        model = AlternatingLeastSquares(
            factors=64, regularization=0.1, alpha=10.0, iterations=15, random_state=0
        )
    else:
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        model = BayesianPersonalizedRanking(factors=64, iterations=100, random_state=0)
    model.fit(counts, show_progress=False)
    users = stream.niche_users
    ids, _ = model.recommend(users, counts[users], N=10, filter_already_liked_items=True)
    return niche_hits({int(u): ids[j] for j, u in enumerate(users.tolist())}, stream)


def model_row(name: str, variant: str) -> dict[str, Any]:
    """One model on one stream variant: the niche figure per niche and the seconds it took."""
    s = niche_stream(**NICHE_VARIANTS[variant], name=variant)  # type: ignore[arg-type]
    t = time.perf_counter()
    if name.startswith("implicit"):
        hits = implicit_top10(s, name.split("-")[1])
    else:
        base, _, cfg = name.partition(":")
        config = ModelConfig(**(OLD_DEFAULTS if cfg == "old" else {}))
        hits = niche_top10(make_learner(base, config, refit_every=10_000), s)
    return {
        "model": name,
        "variant": variant,
        "niches": hits,
        "min": min(hits.values()),
        "seconds": time.perf_counter() - t,
    }


def ablation_row(label: str, params: dict[str, Any], movielens: bool) -> dict[str, Any]:
    """One setting: the niche figure per variant, planted accuracy, MovieLens Recall@10."""
    from stream_mf.datasets import read_events
    from stream_mf.evaluate import prequential

    cfg = ModelConfig(**params)
    niche = {}
    for v, kw in NICHE_VARIANTS.items():
        niche[v] = min(niche_top10(make_learner("sgd", cfg), niche_stream(**kw)).values())  # type: ignore[arg-type]
    row = {
        "setting": label,
        "params": params,
        "niche": niche,
        "niche_min": min(niche.values()),
        "planted": planted_in_group(make_learner("sgd", cfg)),
    }
    if movielens:
        ev = read_events(MOVIELENS).sorted_by_time()
        row["movielens_recall_at_10"] = prequential(
            ev, make_learner("sgd", cfg), progress=False
        ).recall_at_k
    return row


def _ablation_job(args: tuple[str, dict[str, Any], bool]) -> dict[str, Any]:
    return ablation_row(*args)


def _model_job(args: tuple[str, str]) -> dict[str, Any]:
    return model_row(*args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="two variants, no implicit BPR")
    ap.add_argument("--ablation", action="store_true", help="also the single-factor ablation")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    variants = list(NICHE_VARIANTS)[:: 4 if a.quick else 1]
    models = ["popular", "sgd", "sgd:old", "als", "hybrid", "implicit-als"]
    if not a.quick:
        models.append("implicit-bpr")
    jobs = [(m, v) for m in models for v in variants]
    with ProcessPoolExecutor(a.workers) as ex:
        cells = list(ex.map(_model_job, jobs))
        abl = []
        if a.ablation:
            todo = [(lbl, {**OLD_DEFAULTS, **p}, True) for lbl, p in ABLATION]
            todo.append(("chosen: today's defaults", {}, True))
            for n, row in enumerate(ex.map(_ablation_job, todo), 1):
                print(f"[{n}/{len(todo)}] {json.dumps(row)}", file=sys.stderr, flush=True)
                abl.append(row)
    rows = []
    for m in models:
        row: dict[str, Any] = {"model": m}
        for c in cells:
            if c["model"] == m:
                row[c["variant"]] = c["min"]
        rows.append(row)
    print_table(
        "niche users' top-10 in their own niche (worst niche's mean of 10), same streams",
        rows,
        [Col("model", "model")] + [Col(v, v, ".1f") for v in variants],
    )
    if abl:
        print_table(
            "single-factor ablation of the online model (from the old defaults)",
            [{**r, **r["niche"]} for r in abl],
            [
                Col("setting", "setting"),
                *(Col(v, v, ".1f") for v in variants),
                Col("planted", "planted /200"),
                Col("movielens_recall_at_10", "ML R@10", ".4f"),
            ],
        )
    write_results(
        "bench_niche",
        {"quick": a.quick, "variants": variants, "models": rows, "cells": cells, "ablation": abl},
        a.out,
    )


if __name__ == "__main__":
    main()
