"""`stream-mf evaluate`: prequential Recall@K / NDCG@K of one or more models on an event file."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from consumers.commands.common import nonempty_path, positive_int
from consumers.errors import UserError
from consumers.flags import add_model_flags, model_config_from
from consumers.kernel_cache import ensure_cached
from consumers.settings import QuerySettings, UpdaterSettings
from stream_mf.config import ModelConfig, RebuildConfig
from stream_mf.datasets import ColumnSpec, EventColumns, EventFileError, read_events
from stream_mf.evaluate import LEARNERS, PrequentialLearner, make_learner, prequential

DEFAULT_EVENTS = Path(__file__).resolve().parents[2] / "data/movielens-latest-small/ratings.csv.gz"


def add_column_flags(p: argparse.ArgumentParser) -> None:
    d = ColumnSpec()
    g = p.add_argument_group("event file columns (defaults read MovieLens ratings.csv)")
    g.add_argument("--user-col", default=d.user_col)
    g.add_argument("--item-col", default=d.item_col)
    g.add_argument("--time-col", default=d.time_col)
    g.add_argument("--value-col", default=d.value_col, help="'' for none")
    g.add_argument("--type-col", default=None, help="column holding the event type")
    g.add_argument(
        "--event-type", default=d.event_type, help="type of every event without --type-col"
    )
    g.add_argument("--sep", default=None, help="field separator (default: by file extension)")
    g.add_argument("--min-value", type=float, default=None, help="keep events with value >= this")


def event_file(path: Path, flag: str = "--events") -> Path:
    """An event file that can be read, or one line saying what is wrong with the path."""
    if path.is_dir():
        raise UserError(
            f"{flag} {path} is a directory: give an event file (CSV, TSV or JSONL, optionally .gz)"
        )
    if not path.exists():
        raise UserError(f"{flag} {path}: no such file")
    return path


def load_events(path: Path, spec: ColumnSpec, flag: str = "--events") -> EventColumns:
    """The event file in time order; a bad file is the user's to fix (the reader's
    EventFileError names file, line and what is wrong), so it ends in one line."""
    try:
        return read_events(event_file(path, flag), spec).sorted_by_time()
    except EventFileError as exc:
        raise UserError(str(exc)) from exc


def shipped_learner(model: ModelConfig | None = None) -> tuple[PrequentialLearner, str]:
    """The model `stream-mf updater` learns and `stream-mf query` answers with, from the same
    environment (`STREAM_MF_MODEL__*`, `STREAM_MF_REBUILD__*`, `STREAM_MF_MIN_USER_EVENTS`),
    `model` (the model flags) over the updater's; and one line saying what it is."""
    updater, query = UpdaterSettings(), QuerySettings()
    rb = updater.rebuild
    when = [f"every {rb.every_events:,} events"] if rb.every_events else []
    if rb.every_seconds:
        when.append(f"every {rb.every_seconds:g} s of stream time (the updater counts wall time)")
    learner = make_learner(
        "default",
        model or updater.model,
        rb,
        min_user_events=query.min_user_events,
    )
    rebuilds = " or ".join(when) if when else "never (none scheduled)"
    return learner, (
        f"default: the updater's model, rebuilt {rebuilds}, answered as `stream-mf query` "
        f"(min_user_events {query.min_user_events})"
    )


def model_names(text: str | None) -> list[str]:
    """`--model`'s comma-separated learners, checked before any event is read (none: the
    shipped model, `default`)."""
    if text is None:
        return ["default"]
    names = [m.strip() for m in text.split(",") if m.strip()]
    choices = ", ".join(LEARNERS)
    if not names:
        raise UserError(f"--model names no model: choose from {choices}, comma-separated")
    unknown = [m for m in names if m not in LEARNERS]
    if unknown:
        raise UserError(f"--model: unknown {', '.join(unknown)}; choose from {choices}")
    return names


def column_spec(args: argparse.Namespace) -> ColumnSpec:
    return ColumnSpec(
        user_col=args.user_col,
        item_col=args.item_col,
        time_col=args.time_col,
        value_col=args.value_col or None,
        type_col=args.type_col,
        event_type=args.event_type,
        sep=args.sep,
        min_value=args.min_value,
    )


def build_args(argv: list[str]) -> argparse.Namespace:
    """Parse evaluate's flags outside the CLI (the demo reuses them)."""
    parser = argparse.ArgumentParser(prog="stream-mf evaluate")
    _configure(parser)
    return parser.parse_args(argv)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="prequential (test-then-learn) evaluation on an event file",
        description="For each event in time order: recommend top-K for its user (if seen "
        "before), score hit and NDCG, then learn the event.",
    )
    _configure(p)


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--events", type=nonempty_path, default=DEFAULT_EVENTS, help="CSV/TSV/JSONL(.gz)"
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"comma-separated, from: {', '.join(LEARNERS)} (default: default, what "
        "`stream-mf updater` and `stream-mf query` would do with the same environment and "
        "model flags: the online model, the updater's rebuild schedule counted in events or "
        "stream time, the query's answer)",
    )
    p.add_argument("-k", "--k", type=positive_int, default=10)
    p.add_argument(
        "--window", type=positive_int, default=5000, help="evaluated events per curve point"
    )
    p.add_argument(
        "--limit", type=positive_int, default=None, help="only the first N events (by time)"
    )
    p.add_argument("--json", type=Path, default=None, help="write results here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of the per-window curve")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("als and hybrid (default takes the updater's STREAM_MF_REBUILD__*)")
    d = RebuildConfig()
    g.add_argument(
        "--refit-every", type=int, default=1000, help="ALS refit / rebuild every N events"
    )
    g.add_argument("--als-alpha", type=float, default=d.alpha, help="confidence 1 + alpha * c")
    g.add_argument("--als-reg", type=float, default=d.reg)
    g.add_argument("--als-iterations", type=int, default=d.iterations)
    add_column_flags(p)
    add_model_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    names = model_names(args.model)
    # one line per rebuild (there may be thousands) would bury the table: a summary follows
    rebuild_log = logging.getLogger("stream_mf.rebuild")
    level = rebuild_log.level
    if not getattr(args, "verbose", 0):
        rebuild_log.setLevel(logging.ERROR)
    try:
        return _run(args, names)
    finally:
        rebuild_log.setLevel(level)


def _run(args: argparse.Namespace, names: list[str]) -> int:
    config = model_config_from(args, UpdaterSettings().model)
    rebuild = RebuildConfig(alpha=args.als_alpha, reg=args.als_reg, iterations=args.als_iterations)
    events = load_events(args.events, column_spec(args))
    if args.limit:
        events = events.take(__import__("numpy").arange(min(args.limit, len(events))))
    print(f"{len(events):,} events from {args.events}", file=sys.stderr)
    ensure_cached()  # the rebuilds' kernels as every updater runs them (consumers/kernel_cache.py)
    results = []
    for name in names:
        if name == "default":
            learner, what = shipped_learner(config)
            print(what, file=sys.stderr)
        else:
            learner = make_learner(name, config, rebuild, args.refit_every)
        r = prequential(
            events,
            learner,
            k=args.k,
            types=config.event_types,
            window=args.window,
            progress=not args.no_progress,
        )
        outcomes = getattr(learner, "outcomes", None)
        if isinstance(outcomes, list):
            swapped = sum(o.swapped for o in outcomes)
            unguarded = sum(o.swapped and o.unguarded for o in outcomes)
            print(
                f"{name}: {len(outcomes)} rebuilds, {swapped} swapped ({unguarded} unguarded), "
                f"{getattr(learner, 'failed', 0)} failed",
                file=sys.stderr,
            )
        r.config = (
            config.model_dump(exclude={"event_types"})
            if name != "popular"
            else {"half_life_s": config.half_life_s}
        )
        if name in ("als", "hybrid"):
            r.config["rebuild"] = {**rebuild.model_dump(), "refit_every": args.refit_every}
        if name == "default":
            r.config["rebuild"] = UpdaterSettings().rebuild.model_dump()
            r.config["min_user_events"] = QuerySettings().min_user_events
        results.append(r.to_json())
    base = results[0]["recall_at_k"] if results else 0.0
    print(
        f"{'model':<10}{'Recall@' + str(args.k):>11}{'NDCG@' + str(args.k):>10}"
        f"{'evaluated':>11}{'events/s':>11}  {'vs ' + names[0]:>10}"
    )
    for row in results:
        ratio = f"{row['recall_at_k'] / base:>9.2f}x" if base else f"{'-':>10}"
        print(
            f"{row['model']:<10}{row['recall_at_k']:>11.4f}{row['ndcg_at_k']:>10.4f}"
            f"{row['evaluated']:>11,}{row['events_per_s']:>11,.0f}  {ratio}"
        )
    out = results[0] if len(results) == 1 else {**results[-1], "models": results}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        from stream_mf.plot import plot_windows

        plot_windows(results, args.plot, title=f"Prequential evaluation: {args.events.name}")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
