"""What `stream-mf rebuild` and `stream-mf snapshot` share: one command message on the control
topic, read by the running updater."""

from __future__ import annotations

import argparse

import orjson

from consumers import kafka_io
from consumers.commands.common import add_process_flags, build_settings, positive_float
from consumers.errors import UserError
from consumers.settings import ClientSettings
from consumers.topics import create_topics


def add_control_parser(sub: argparse._SubParsersAction, name: str, help: str) -> None:
    p = sub.add_parser(name, help=help)
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=10.0,
        help="seconds to wait for a broker to answer before giving up (default 10)",
    )
    add_process_flags(p, state=False, metrics=False)
    p.set_defaults(run=lambda args: send_command(args, name))


def send_command(args: argparse.Namespace, command: str) -> int:
    """Send `{"command": command}`; says where to watch for the updater acting on it."""
    settings = build_settings(ClientSettings, args)
    topic = settings.topics.control
    kafka = settings.kafka
    kafka_io.require_broker(kafka, args.timeout)
    try:
        create_topics(kafka.bootstrap_servers, {topic: 1}, client_config=kafka.client_config())
    except ValueError as exc:  # the topic exists with another partition count
        raise UserError(f"{exc}: the control topic must have 1 partition") from exc
    producer = kafka_io.producer(settings.kafka)
    producer.produce(topic, value=orjson.dumps({"command": command}))
    if producer.flush(10.0):
        print(f"could not send the request to {topic!r}")
        return 1
    print(f"{command} requested on {topic!r}; watch {WATCH[command]} on the updater's /metrics")
    return 0


WATCH = {
    "rebuild": "stream_mf_rebuild_*",
    "snapshot": "stream_mf_learner_snapshot_timestamp_seconds",
}
