"""Niche users after a rebuild swap: what the rebuild's catch-up sweeps, its max-norm scaling and
its new-row sweeps each do, one at a time (docs/niche-ablation.md, *After a rebuild swap*).

    PYTHONPATH=. .venv/bin/python bench/bench_hybrid_niche.py [--quick] [--variant NAME ..]

`hybrid` (`stream_mf.evaluate.HybridLearner`, the updater's own `Rebuild` driven inline, stepped
every `guard_per_batch` events) on niche streams, as the model suite runs it (rebuild due 5k
events after the last one ended, batches of 1,000); a cell is the mean over a niche's users of
their top-10 items in their niche. "no scale" turns off `Rebuild._fit_scale` (an ablation only:
the shipped rebuild always scales); "new-row sweeps" is `RebuildConfig.new_row_sweeps` (0 = off).

`skewed-apart-unpop` is the stream that loses a niche without a fix today: its niche 2 (new
users and new items) forms during a rebuild's guard, and 3 sweeps + scaling without the new-row
sweeps leave it at 5.7 of 10 (9.4 with them); the rebuild before every fix (1 sweep, no scaling)
happens to keep it (9.4), and scaling alone loses it (5.0). `flat-apart-pop`, the stream the
sweeps and the scaling were first written for, keeps every niche in every row since the rebuild
is stepped every 128 events (its schedule moved); it stays as a second stream. `--quick`: the
rows without and with the new-row sweeps on `skewed-apart-unpop`. Two worker processes.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from common import Col, print_table, write_results

from stream_mf.config import ModelConfig, RebuildConfig
from stream_mf.evaluate import make_learner
from stream_mf.rebuild import Rebuild
from tests.synthetic import NICHE_VARIANTS, niche_stream, niche_top10

VARIANTS = ("skewed-apart-unpop", "flat-apart-pop")
REFIT_EVERY = 5_000
DEFAULT = RebuildConfig()
#: (catch-up sweeps, max-norm scaling, new-row sweeps, label); the first is the rebuild before
#: the fixes, the one marked default is today's
CASES: tuple[tuple[int, bool, int, str], ...] = (
    (1, False, 0, "before (1 sweep, no scale, no new-row sweeps)"),
    (1, True, 0, "scale only"),
    (3, False, 0, "3 sweeps only"),
    (DEFAULT.catchup_sweeps, True, 0, "3 sweeps + scale, no new-row sweeps"),
    (1, False, DEFAULT.new_row_sweeps, "new-row sweeps only"),
    (DEFAULT.catchup_sweeps, True, DEFAULT.new_row_sweeps, "default (3 sweeps + scale + new-row)"),
)
QUICK_CASES = (CASES[3], CASES[-1])


def run(case: tuple[str, int, bool, int, str, int]) -> dict[str, Any]:
    variant, sweeps, scale, new_rows, label, every = case
    shipped = Rebuild._fit_scale
    if not scale:
        Rebuild._fit_scale = lambda self: None  # type: ignore[method-assign]
    try:
        s = niche_stream(**NICHE_VARIANTS[variant], name=variant)
        rcfg = RebuildConfig(catchup_sweeps=sweeps, new_row_sweeps=new_rows)
        hits = niche_top10(make_learner("hybrid", ModelConfig(), rcfg, refit_every=every), s)
    finally:
        Rebuild._fit_scale = shipped  # type: ignore[method-assign]
    return {
        "variant": variant,
        "case": label,
        "sweeps": sweeps,
        "scale": "yes" if scale else "no",
        "new_row_sweeps": new_rows,
        "every": every,
        **{f"niche{g}": hits[g] for g in range(3)},
        "worst": min(hits.values()),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="without/with new-row sweeps, skewed-apart-unpop"
    )
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/)")
    ap.add_argument(
        "--variant", nargs="+", choices=sorted(NICHE_VARIANTS), default=None, help="streams"
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    variants = args.variant or (VARIANTS[:1] if args.quick else VARIANTS)
    cases = [(v, *c, REFIT_EVERY) for v in variants for c in (QUICK_CASES if args.quick else CASES)]
    with ProcessPoolExecutor(2) as pool:
        rows = list(pool.map(run, cases))
    cols = [Col("variant", "stream"), Col("case", "rebuild")]
    cols += [Col(f"niche{g}", f"niche {g}", ".2f") for g in range(3)]
    print_table("hybrid: niche users' top-10 in their niche", rows, cols)
    write_results(
        "bench_hybrid_niche",
        {"quick": args.quick, "variants": list(variants), "rows": rows},
        args.out,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
