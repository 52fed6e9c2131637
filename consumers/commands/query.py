"""`stream-mf query`: answer recommendation requests (run as many as you like)."""

from __future__ import annotations

import argparse
import logging
from typing import get_args

from consumers.commands.common import add_process_flags, build_settings
from consumers.errors import UserError
from consumers.kafka_io import BrokerWatch, StopFlag
from consumers.query import QueryService, limit_malloc_arenas
from consumers.settings import Compression, QuerySettings

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "query", help="serve rec-requests from the model log (needs only the broker)"
    )
    add_process_flags(p, state=False)
    p.add_argument("--state-dir", default=None, help=argparse.SUPPRESS)  # gone: says so
    p.add_argument(
        "--reply-compression",
        choices=get_args(Compression),
        default=None,
        help="compression of replies (default none: every client reads them without a codec)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.state_dir is not None:
        raise UserError(
            "--state-dir is gone: a query process follows the model log on Kafka (topic "
            "'model', STREAM_MF_TOPICS__MODEL) and needs only --bootstrap-servers; drop the flag"
        )
    settings = build_settings(
        QuerySettings,
        args,
        reply_compression=args.reply_compression,
    )
    log.info("query settings: %s", settings.model_dump_json())
    # before the first thread that allocates (the broker watch's client starts librdkafka's):
    # arenas made before the cap stay (a replica had 6, one holding 21 MB it had freed)
    limit_malloc_arenas()
    # one line if no broker answers in time; the process keeps retrying
    watch = BrokerWatch(settings.kafka, settings.no_broker_warning_seconds).start()
    try:
        return QueryService(settings).run(StopFlag().install())
    finally:
        watch.stop()
