"""Niche users after a rebuild swap: what the rebuild's catch-up sweeps and its max-norm scaling
each do, one at a time (docs/niche-ablation.md, *After a rebuild swap*).

    PYTHONPATH=. .venv/bin/python bench/bench_hybrid_niche.py [--quick]

`hybrid` (`stream_mf.evaluate.HybridLearner`, the updater's own `Rebuild` driven inline) on the
`flat-apart-pop` niche stream, as the model suite runs it (rebuild due 5k events after the last
one ended, batches of 1,000); a cell is the mean over a niche's users of their top-10 items in
their niche. "no scale" turns off `Rebuild._fit_scale` (an ablation only: the shipped rebuild
always scales). `--quick` runs the before/after rows only. Two worker processes.
"""

from __future__ import annotations

import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from common import Col, bench_args, print_table, write_results

from stream_mf.config import ModelConfig, RebuildConfig
from stream_mf.evaluate import make_learner
from stream_mf.rebuild import Rebuild
from tests.synthetic import NICHE_VARIANTS, niche_stream, niche_top10

VARIANT = "flat-apart-pop"
REFIT_EVERY = 5_000


def run(case: tuple[int, bool, int]) -> dict[str, Any]:
    sweeps, scale, every = case
    shipped = Rebuild._fit_scale
    if not scale:
        Rebuild._fit_scale = lambda self: None  # type: ignore[method-assign]
    try:
        s = niche_stream(**NICHE_VARIANTS[VARIANT], name=VARIANT)
        rcfg = RebuildConfig(catchup_sweeps=sweeps)
        hits = niche_top10(make_learner("hybrid", ModelConfig(), rcfg, refit_every=every), s)
    finally:
        Rebuild._fit_scale = shipped  # type: ignore[method-assign]
    return {
        "sweeps": sweeps,
        "scale": "yes" if scale else "no",
        "every": every,
        **{f"niche{g}": hits[g] for g in range(3)},
        "worst": min(hits.values()),
    }


def main(argv: list[str] | None = None) -> None:
    args = bench_args(__doc__, argv)
    cases = [(1, False, REFIT_EVERY), (3, True, REFIT_EVERY)]
    if not args.quick:
        cases += [(1, True, REFIT_EVERY), (2, False, REFIT_EVERY), (3, False, REFIT_EVERY)]
        cases += [(4, False, REFIT_EVERY), (2, True, REFIT_EVERY), (4, True, REFIT_EVERY)]
        cases += [
            (sw, sc, e) for e in (2_500, 10_000, 15_000) for sw, sc in ((1, False), (3, True))
        ]
    with ProcessPoolExecutor(2) as pool:
        rows = list(pool.map(run, cases))
    cols = [Col("every", "rebuild every"), Col("sweeps", "sweeps"), Col("scale", "scale")]
    cols += [Col(f"niche{g}", f"niche {g}", ".2f") for g in range(3)]
    print_table(f"hybrid on {VARIANT}: niche users' top-10 in their niche", rows, cols)
    write_results("bench_hybrid_niche", {"quick": args.quick, "variant": VARIANT, "rows": rows})


if __name__ == "__main__":
    main(sys.argv[1:])
