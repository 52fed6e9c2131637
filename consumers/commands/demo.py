"""`stream-mf demo`: the main job end to end on the vendored MovieLens sample."""

from __future__ import annotations

import argparse
from pathlib import Path

from consumers.commands import evaluate

OUT = Path("out")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the demo on the vendored MovieLens sample")
    p.add_argument("--out", type=Path, default=OUT, help="where plots and JSON go")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    ev = evaluate.build_args(
        ["--json", str(args.out / "prequential.json"), "--plot", str(args.out / "prequential.png")]
    )
    return evaluate.run(ev)
