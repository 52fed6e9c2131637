"""`stream-mf snapshot`: ask the running updater for a learner snapshot now (before a planned
move of its disk, or to shorten the replay a lost disk would need)."""

from __future__ import annotations

import argparse

import orjson

from consumers import kafka_io
from consumers.commands.common import add_process_flags, build_settings, positive_float
from consumers.errors import UserError
from consumers.settings import ClientSettings
from consumers.topics import create_topics


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "snapshot",
        help="ask the running updater to write a learner snapshot to Kafka now",
    )
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=10.0,
        help="seconds to wait for a broker to answer before giving up (default 10)",
    )
    add_process_flags(p, state=False, metrics=False)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = build_settings(ClientSettings, args)
    topic = settings.topics.control
    kafka = settings.kafka
    kafka_io.require_broker(kafka, args.timeout)
    try:
        create_topics(kafka.bootstrap_servers, {topic: 1}, client_config=kafka.client_config())
    except ValueError as exc:  # the topic exists with another partition count
        raise UserError(f"{exc}: the control topic must have 1 partition") from exc
    producer = kafka_io.producer(settings.kafka)
    producer.produce(topic, value=orjson.dumps({"command": "snapshot"}))
    if producer.flush(10.0):
        print(f"could not send the request to {topic!r}")
        return 1
    print(
        f"learner snapshot requested on {topic!r}; watch "
        "stream_mf_learner_snapshot_timestamp_seconds on the updater's /metrics"
    )
    return 0
