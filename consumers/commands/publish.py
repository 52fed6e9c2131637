"""`stream-mf publish FILE`: replay an event file into `interactions`."""

from __future__ import annotations

import argparse

from consumers import kafka_io
from consumers.commands.common import (
    add_process_flags,
    build_settings,
    nonempty_path,
    positive_float,
    positive_int,
)
from consumers.commands.evaluate import DEFAULT_EVENTS, add_column_flags, column_spec, load_events
from consumers.publish import event_payloads, publish
from consumers.settings import ClientSettings


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("publish", help="replay a CSV/TSV/JSONL event file into interactions")
    p.add_argument("file", type=nonempty_path, nargs="?", default=DEFAULT_EVENTS)
    p.add_argument(
        "--rate", type=positive_float, default=None, help="events per second (default: max)"
    )
    p.add_argument(
        "--limit", type=positive_int, default=None, help="only the first N events by time"
    )
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=10.0,
        help="seconds to wait for a broker to answer before giving up (default 10)",
    )
    p.add_argument(
        "--timestamps",
        choices=["original", "shift", "now"],
        default="original",
        help="keep them, shift the file so its last event is now, or stamp at send time",
    )
    p.add_argument("--no-progress", action="store_true")
    add_column_flags(p)
    add_process_flags(p, state=False, metrics=False)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = build_settings(ClientSettings, args)
    events = load_events(args.file, column_spec(args), "FILE")
    if args.limit:
        events = events.take(__import__("numpy").arange(min(args.limit, len(events))))
    payloads = event_payloads(events, "shift" if args.timestamps == "shift" else "original")
    kafka_io.require_broker(settings.kafka, args.timeout)
    producer = kafka_io.ordered_producer(settings.kafka)
    sent = publish(
        producer,
        settings.topics.interactions,
        payloads,
        rate=args.rate,
        progress=not args.no_progress,
        stamp_now=args.timestamps == "now",
    )
    print(f"published {sent:,} of {len(payloads):,} events to {settings.topics.interactions}")
    return 0 if sent == len(payloads) else 1
