"""Quality ablation of the online model on MovieLens-latest-small: each idea alone, then together.

    PYTHONPATH=. .venv/bin/python bench/bench_quality.py [--quick] [--seeds 3] [--only NAME,...]

Every row is prequential Recall@10 (test-then-learn, every rating a positive, seen items
excluded) of the online model, over `--seeds` model seeds (the seed keys the starting vectors and
every negative draw; the data are fixed), from the fast exact loop in `bench/quality_eval.py`
(its hits equal `stream_mf.evaluate.prequential`'s: checked on a prefix first, every run). Rows
that change only the model (`ModelConfig` or the experimental kernel of
`bench/quality_kernels.py`) also report planted-taste accuracy (`tests/synthetic.planted_in_group`,
users of 200) and the worst niche figure over the 8 long-tail streams of the model suite
(`tests/synthetic.NICHE_VARIANTS`, 10 = all of a niche user's top-10 in the niche). Rows with
scoring-time signals (recency at query time, item-to-item transitions) are measured here only:
serving them needs state the query path does not have. Two worker processes.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
from common import ROOT, Col, print_table, write_results
from quality_eval import Extras, fast_prequential

from stream_mf.config import ModelConfig
from stream_mf.datasets import EventColumns, read_events
from stream_mf.evaluate import make_learner, prequential

MOVIELENS = ROOT / "data/movielens-latest-small/ratings.csv.gz"
#: the defaults before this ablation (main at 4091993): no recency pull
BEFORE: dict[str, Any] = {
    "user_pull": 0.0,
    "lr_user": 2.5,
    "half_life_s": 30 * 86400.0,
    "transition_weight": 0.0,
}
#: the defaults before transitions shipped (half-life 180 days, user_pull 0.1)
HL180_PULL: dict[str, Any] = {"half_life_s": 180 * 86400.0, "user_pull": 0.1}
HL180 = 180 * 86400.0
#: (name, ModelConfig overrides on top of BEFORE, scoring/kernel extras, group)
ROWS: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("previous defaults", {}, {}, "baseline"),
    ("AdaGrad per row, eps 10", {}, {"ada_eps": 10.0}, "alone"),
    ("AdaGrad per row, eps 100", {}, {"ada_eps": 100.0}, "alone"),
    (
        "RMSProp-like per row (decay 0.99), eps 10",
        {},
        {"ada_eps": 10.0, "ada_decay": 0.99},
        "alone",
    ),
    ("16 negatives (2x the work)", {"n_negatives": 16}, {}, "alone"),
    ("6 negatives best-of-3 (same work)", {"n_negatives": 6, "n_candidates": 3}, {}, "alone"),
    ("2 SGD steps per event", {"n_steps": 2}, {}, "alone"),
    ("recency in the kernel: user_pull 0.1", {"user_pull": 0.1}, {}, "alone"),
    ("recency in the kernel: user_pull 0.3", {"user_pull": 0.3}, {}, "alone"),
    ("recency in the kernel: user_pull 1", {"user_pull": 1.0}, {}, "alone"),
    ("recency at query: + last item's vector", {}, {"recency": 1.0, "recent": 1}, "alone"),
    ("transitions at query, weight 2", {}, {"transition": 2.0}, "alone"),
    ("half-life 180 days (was 30)", {"half_life_s": HL180}, {}, "alone"),
    (
        "new defaults: half-life 180 d + user_pull 0.1",
        {"half_life_s": HL180, "user_pull": 0.1},
        {},
        "together",
    ),
    ("half-life 180 d + user_pull 0.3", {"half_life_s": HL180, "user_pull": 0.3}, {}, "together"),
    (
        "new defaults + 6 negatives best-of-3",
        {"half_life_s": HL180, "user_pull": 0.1, "n_negatives": 6, "n_candidates": 3},
        {},
        "together",
    ),
    (
        "new defaults + AdaGrad eps 100",
        {"half_life_s": HL180, "user_pull": 0.1},
        {"ada_eps": 100.0},
        "together",
    ),
    (
        "new defaults + transitions at query 2",
        {"half_life_s": HL180, "user_pull": 0.1},
        {"transition": 2.0},
        "together",
    ),
    # what ships (stream_mf/transitions.py): bounded rows of 32 successors decayed at the
    # model's half-life (the rows above: unbounded, a half-life of 20,000 events)
    (
        "ships: transitions 4 x share of the row (32 slots)",
        HL180_PULL | {"transition_weight": 4.0, "transition_norm": "share"},
        {},
        "ships",
    ),
]
_events: EventColumns | None = None


def events() -> EventColumns:
    global _events
    if _events is None:
        _events = read_events(MOVIELENS).sorted_by_time()
    return _events


def config(over: dict[str, Any], seed: int) -> ModelConfig:
    return ModelConfig(**(BEFORE | over | {"seed": seed}))


def movielens(job: tuple[str, dict[str, Any], dict[str, Any], int, int | None]) -> dict[str, Any]:
    name, over, extras, seed, limit = job
    t = time.perf_counter()
    r = fast_prequential(events(), config(over, seed), extras=Extras(**extras), limit=limit)
    return {
        "name": name,
        "seed": seed,
        "recall": r.recall,
        "ndcg": r.ndcg,
        "seconds": time.perf_counter() - t,
    }


def synthetic(job: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """Planted tastes and the niche streams, for a row that only changes `ModelConfig`."""
    from tests.synthetic import NICHE_VARIANTS, niche_stream, niche_top10, planted_in_group

    name, over = job
    cfg = config(over, 42)
    planted = planted_in_group(make_learner("sgd", cfg))
    niche = min(
        min(niche_top10(make_learner("sgd", cfg), niche_stream(**v, name=k)).values())
        for k, v in NICHE_VARIANTS.items()
    )
    return {"name": name, "planted": planted, "niche_worst": niche}


def check(limit: int) -> int:
    """The fast loop's outcomes against `prequential`'s on the first `limit` events."""
    ev = events().take(np.arange(limit))
    ref = prequential(ev, make_learner("sgd", config({}, 42)), progress=False, keep_outcomes=True)
    fast = fast_prequential(events(), config({}, 42), limit=limit)
    assert ref.outcomes is not None
    return int((ref.outcomes != fast.hits_at).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="first 20k events, one seed")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", default=None, help="comma-separated row names")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = ROWS if not a.only else [r for r in ROWS if r[0] in a.only.split(",")]
    seeds = [42] if a.quick else [42, 1, 2][: a.seeds] + list(range(3, a.seeds))
    limit = 20_000 if a.quick else None
    differ = check(5_000 if a.quick else 20_000)
    print(f"fast loop vs prequential: {differ} outcomes differ", file=sys.stderr)
    ml_jobs = [(n, o, x, s, limit) for n, o, x, _ in rows for s in seeds]
    syn_jobs = [(n, o) for n, o, x, _ in rows if not x and not a.quick]
    with ProcessPoolExecutor(a.workers) as ex:
        ml = []
        for r in ex.map(movielens, ml_jobs):
            print(
                f"{r['recall']:.4f} seed {r['seed']} {r['seconds']:.0f}s {r['name']}",
                file=sys.stderr,
                flush=True,
            )
            ml.append(r)
        syn = {r["name"]: r for r in ex.map(synthetic, syn_jobs)}
    base = np.mean([r["recall"] for r in ml if r["name"] == rows[0][0]])
    table = []
    for name, over, extras, group in rows:
        rec = np.array([r["recall"] for r in ml if r["name"] == name])
        table.append(
            {
                "idea": name,
                "group": group,
                "settings": over,
                "extras": extras,
                "recall_mean": float(rec.mean()),
                "recall_sd": float(rec.std(ddof=1)) if rec.size > 1 else 0.0,
                "recall_per_seed": rec.tolist(),
                "gain": float(rec.mean() - base),
                "planted": syn.get(name, {}).get("planted"),
                "niche_worst": syn.get(name, {}).get("niche_worst"),
            }
        )
    print_table(
        f"MovieLens-latest-small prequential Recall@10, seeds {seeds}",
        table,
        [
            Col("idea", "idea"),
            Col("recall_mean", "R@10 mean", ".4f"),
            Col("recall_sd", "sd", ".4f"),
            Col("gain", "gain", "+.4f"),
            Col("planted", "planted /200"),
            Col("niche_worst", "niche worst", ".1f"),
        ],
    )
    write_results(
        "bench_quality",
        {
            "quick": a.quick,
            "seeds": seeds,
            "limit": limit,
            "fast_vs_prequential_differ": differ,
            "rows": table,
        },
        None if a.out is None else __import__("pathlib").Path(a.out),
    )


if __name__ == "__main__":
    main()
