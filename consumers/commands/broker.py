"""`stream-mf broker`: the embedded Kafka-protocol broker (Tansu) with the product's topics."""

from __future__ import annotations

import argparse
import logging
import socket
import time

from consumers.commands.common import port, positive_int
from consumers.errors import UserError
from consumers.kafka_io import StopFlag
from consumers.local_broker import EmbeddedBroker
from consumers.topics import create_topics, product_topics

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("broker", help="run the embedded broker on loopback and create the topics")
    p.add_argument("--port", type=port, default=9092, help="0 picks a free port")
    p.add_argument(
        "--partitions", type=positive_int, default=1, help="partitions of each main topic"
    )
    p.set_defaults(run=run)


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a listener could bind `port` now (a broker started on a taken port panics)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as a listener binds: a port left in TIME_WAIT is free, one with a listener is not
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def run(args: argparse.Namespace) -> int:
    if args.port and not port_free(args.port):
        raise UserError(
            f"port {args.port} on 127.0.0.1 is in use (another broker?): "
            "pick another with --port, or --port 0 for a free one"
        )
    stop = StopFlag().install()
    with EmbeddedBroker(args.port or None) as broker:
        create_topics(broker.bootstrap_servers, product_topics(args.partitions))
        print(f"broker ready: --bootstrap-servers {broker.bootstrap_servers} (pid {broker.pid})")
        print("memory storage: topics vanish when it stops. Ctrl-C to stop.", flush=True)
        while not stop and broker.is_running():
            time.sleep(0.2)
    return 0
