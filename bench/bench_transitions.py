"""Item-to-item transitions at query time (stream_mf/transitions.py): weight and normalisation.

    PYTHONPATH=. .venv/bin/python bench/bench_transitions.py [--configs w:norm,...] [--seeds 42]
        [--planted 11] [--hybrid]

For each setting: prequential Recall@10 of the online model (`stream-mf evaluate --model sgd`,
the block evaluator, the same scorer as the query) on MovieLens-latest-small per model seed;
planted-taste accuracy (`tests/synthetic.planted_in_group`, users of 200) at each planted
seed; the niche figures of the model suite's 8 long-tail streams for `sgd` (the default
model's answer path scores alike) and, with `--hybrid`, for `hybrid` (the updater's rebuild
every 5,000 events, as the suite). Two worker processes. Results in
bench/results/bench_transitions.json.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
from common import ROOT, Col, print_table, write_results

from stream_mf.config import ModelConfig
from stream_mf.datasets import read_events
from stream_mf.evaluate import make_learner, prequential

MOVIELENS = ROOT / "data/movielens-latest-small/ratings.csv.gz"


def _cfg(weight: float, norm: str, seed: int = 42) -> ModelConfig:
    return ModelConfig(transition_weight=weight, transition_norm=norm, seed=seed)  # type: ignore[arg-type]


def ml(weight: float, norm: str, seed: int) -> float:
    ev = read_events(str(MOVIELENS)).sorted_by_time()
    r = prequential(ev, make_learner("sgd", _cfg(weight, norm, seed)), progress=False)
    return r.recall_at_k


def planted(weight: float, norm: str, pseed: int) -> int:
    sys.path.insert(0, str(ROOT))
    from tests.synthetic import planted_in_group

    return planted_in_group(make_learner("sgd", _cfg(weight, norm)), seed=pseed)


def niche(weight: float, norm: str, model: str, variant: str) -> float:
    sys.path.insert(0, str(ROOT))
    from tests.synthetic import NICHE_VARIANTS, niche_stream, niche_top10

    s = niche_stream(**NICHE_VARIANTS[variant], name=variant)
    every = 5_000 if model == "hybrid" else 15_000
    hits = niche_top10(make_learner(model, _cfg(weight, norm), refit_every=every), s)
    return float(min(hits.values()))


def speed(weight: float, norm: str, rounds: int = 3) -> dict[str, Any]:
    """`OnlineModel.learn` (SGD kernel + confidences + transitions) in batches of 10k on the
    shared 200k-event stream, transitions off and on, interleaved round by round; best of
    `rounds` each. The SGD kernel itself is unchanged (`bench_sgd.py --compare`)."""
    import time

    from common import synthetic_events

    from stream_mf.model import OnlineModel

    _, events = synthetic_events(True)
    n = len(events)
    cfgs = {"off": ModelConfig(n_negatives=4, transition_weight=0.0),
            "on": _cfg(weight, norm).model_copy(update={"n_negatives": 4})}  # fmt: skip
    OnlineModel(cfgs["on"]).learn(events.slice(0, 2_000))  # compile
    best = {k: float("inf") for k in cfgs}
    for _ in range(rounds):
        for k, c in cfgs.items():
            m = OnlineModel(c)
            t = time.perf_counter()
            for lo in range(0, n, 10_000):
                m.learn(events.slice(lo, min(lo + 10_000, n)))
            best[k] = min(best[k], time.perf_counter() - t)
    return {
        "events": n,
        "off_events_per_s": n / best["off"],
        "on_events_per_s": n / best["on"],
        "on_over_off": best["off"] / best["on"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="0:max,1:max,1.5:max,2:max,4:share,8:share")
    ap.add_argument("--seeds", default="42")
    ap.add_argument("--planted", default="11")
    ap.add_argument("--hybrid", action="store_true")
    ap.add_argument("--no-niche", action="store_true")
    ap.add_argument("--speed", default=None, help="w:norm: only time learn() off vs on")
    ap.add_argument("--out", default="bench_transitions")
    a = ap.parse_args()
    if a.speed:
        w, n = a.speed.split(":")
        got = speed(float(w), n)
        print(got)
        write_results(
            a.out, {"speed": got, "setting": a.speed}, ROOT / f"bench/results/{a.out}.json"
        )
        return
    sys.path.insert(0, str(ROOT))
    from tests.synthetic import NICHE_VARIANTS

    configs = [(float(w), n) for w, n in (c.split(":") for c in a.configs.split(","))]
    seeds = [int(s) for s in a.seeds.split(",")]
    pseeds = [int(s) for s in a.planted.split(",")]
    models = [] if a.no_niche else ["sgd", "hybrid"] if a.hybrid else ["sgd"]
    jobs: dict[tuple[Any, ...], Any] = {}
    with ProcessPoolExecutor(2) as pool:
        for w, n in configs:
            for s in seeds:
                jobs[("ml", w, n, s)] = pool.submit(ml, w, n, s)
            for p in pseeds:
                jobs[("planted", w, n, p)] = pool.submit(planted, w, n, p)
            for m in models:
                for v in NICHE_VARIANTS:
                    jobs[("niche", w, n, m, v)] = pool.submit(niche, w, n, m, v)
        got = {}
        for k, f in jobs.items():
            got[k] = f.result()
            print(*k, got[k], file=sys.stderr, flush=True)
    rows = []
    for w, n in configs:
        rec = [got[("ml", w, n, s)] for s in seeds]
        pl = [got[("planted", w, n, p)] for p in pseeds]
        row: dict[str, Any] = {
            "weight": w,
            "norm": n,
            "recall": float(np.mean(rec)),
            "recall_sd": float(np.std(rec, ddof=1)) if len(rec) > 1 else 0.0,
            "recall_per_seed": rec,
            "planted": pl,
            "planted_mean": float(np.mean(pl)),
        }
        for m in models:
            per = {v: got[("niche", w, n, m, v)] for v in NICHE_VARIANTS}
            row[f"niche_{m}"] = per
            row[f"niche_{m}_worst"] = min(per.values())
        rows.append(row)
    cols = [
        Col("weight", "weight", "g"),
        Col("norm", "norm", ""),
        Col("recall", "Recall@10", ".4f"),
        Col("recall_sd", "sd", ".4f"),
        Col("planted_mean", "planted (mean)", ".1f"),
        *[Col(f"niche_{m}_worst", f"niche worst {m}", ".2f") for m in models],
    ]
    print_table("transitions at query time: weight and normalisation", rows, cols)
    out = ROOT / "bench" / "results" / f"{a.out}.json"
    write_results(a.out, {"seeds": seeds, "planted_seeds": pseeds, "rows": rows}, out)


if __name__ == "__main__":
    main()
