"""Grid search of the online SGD defaults on a prequential run (MovieLens by default).

    python bench/tune_sgd.py [--events FILE] [--json bench/results/tune_sgd.json]

Prints one row per setting, best first, and writes them all as JSON. Two worker processes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from stream_mf.config import ModelConfig
from stream_mf.datasets import read_events
from stream_mf.evaluate import LEARNERS, prequential

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_EVENTS = ROOT / "data/movielens-latest-small/ratings.csv.gz"
#: A small grid around the defaults (BPR, uniform adaptive negatives, max-norm 2, see sgd.py).
GRID: dict[str, list[Any]] = {
    "n_negatives": [8, 16],
    "lr_user": [2.0, 3.0],
    "n_candidates": [2, 3],
}
_events = None


def _run(args: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    global _events
    path, params = args
    if _events is None:
        _events = read_events(path).sorted_by_time()
    name = "popular" if params.get("model") == "popular" else "sgd"
    cfg = ModelConfig(**{k: v for k, v in params.items() if k != "model"})
    r = prequential(_events, LEARNERS[name](cfg), progress=False)
    return {"params": params, "recall_at_k": r.recall_at_k, "ndcg_at_k": r.ndcg_at_k}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", default=str(DEFAULT_EVENTS))
    ap.add_argument("--json", default="bench/results/tune_sgd.json")
    ap.add_argument("--grid", default=None, help="JSON dict overriding the grid")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    grid = json.loads(a.grid) if a.grid else GRID
    keys = list(grid)
    combos = [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*grid.values())]
    jobs = [(a.events, {"model": "popular"})] + [(a.events, c) for c in combos]
    rows = []
    with ProcessPoolExecutor(a.workers) as ex:
        for n, row in enumerate(ex.map(_run, jobs), 1):
            rows.append(row)
            print(f"[{n}/{len(jobs)}] {row['recall_at_k']:.4f} {row['params']}", file=sys.stderr)
    rows.sort(key=lambda r: -r["recall_at_k"])
    print(f"{'recall@10':>10} {'ndcg@10':>8}  params")
    for r in rows:
        print(f"{r['recall_at_k']:10.4f} {r['ndcg_at_k']:8.4f}  {r['params']}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
