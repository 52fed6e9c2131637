"""`stream-mf demo`: the main job end to end on the vendored MovieLens sample."""

from __future__ import annotations

import argparse

from consumers.demo import run_demo


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="embedded broker + updater + 2 query processes + MovieLens replay + answers",
    )
    p.add_argument("--serve", action="store_true", help="keep everything running afterwards")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return run_demo(serve=args.serve)
