"""`stream-mf updater`: learn from `interactions` into the model store."""

from __future__ import annotations

import argparse
import logging
from typing import get_args

from consumers import kafka_io
from consumers.commands.common import add_process_flags, build_settings
from consumers.flags import add_model_flags, model_config_from
from consumers.kafka_io import StopFlag
from consumers.settings import Compression, UpdaterSettings
from consumers.updater import Updater

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("updater", help="consume interactions, learn, persist (one per store)")
    add_process_flags(p)
    p.add_argument("--max-batch-events", type=int, default=None)
    p.add_argument("--max-batch-seconds", type=float, default=None)
    p.add_argument("--sync-writes", action="store_true", default=None, help="fsync each checkpoint")
    p.add_argument(
        "--checkpoint-seconds",
        type=float,
        default=None,
        help="write the learned state and next offsets to the store at least this often "
        "(default 30; a crash replays from the last checkpoint; 0 and --checkpoint-events 0: "
        "every batch)",
    )
    p.add_argument(
        "--checkpoint-events",
        type=int,
        default=None,
        help="... or after this many events (default 1000000; 0: no bound by count)",
    )
    p.add_argument(
        "--max-future-seconds",
        type=float,
        default=None,
        help="dead-letter events timed more than this after their message's Kafka timestamp "
        "(or this host's clock, if earlier; default 86400; inf accepts any)",
    )
    p.add_argument(
        "--dead-letter-timeout-seconds",
        type=float,
        default=None,
        help="how long a batch waits for its dead letters to be acknowledged, riding out a "
        "broker outage, before the updater stops without committing it (default 300)",
    )
    p.add_argument(
        "--dead-letter-compression",
        choices=get_args(Compression),
        default=None,
        help="compression of dead letters (default none: any client reads them without a codec)",
    )
    p.add_argument(
        "--on-offset-gap",
        choices=("fail", "resume-from-start", "resume-from-end"),
        default=None,
        help="when the store's next offset lies outside the partition's log (topic recreated, "
        "broker data lost, retention): stop with exit code 6 (fail, the default), apply the "
        "log from its start, or apply only events published from now on (env "
        "STREAM_MF_ON_OFFSET_GAP)",
    )
    p.add_argument(
        "--no-restore",
        dest="restore",
        action="store_false",
        default=None,
        help="on an empty state dir start a fresh model instead of restoring the latest learner "
        "snapshot from Kafka (env STREAM_MF_RESTORE=false)",
    )
    add_model_flags(p)
    p.set_defaults(run=run)


_FLAGS = (
    "max_batch_events",
    "max_batch_seconds",
    "sync_writes",
    "checkpoint_seconds",
    "checkpoint_events",
    "max_future_seconds",
    "dead_letter_timeout_seconds",
    "dead_letter_compression",
    "on_offset_gap",
    "restore",
)


def run(args: argparse.Namespace) -> int:
    # flags go through the settings' validation (a model_copy update would skip it)
    base = build_settings(UpdaterSettings, args, **{k: getattr(args, k) for k in _FLAGS})
    settings = base.model_copy(update={"model": model_config_from(args, base.model)})
    # one line if no broker answers in time; the process keeps retrying (an empty state dir
    # waits for one already: it looks for a learner snapshot to restore)
    watch = kafka_io.BrokerWatch(settings.kafka, settings.no_broker_warning_seconds).start()
    # a stop request during start-up (opening the store, a restore) ends it cleanly as well
    stop = StopFlag().install()
    try:
        updater = Updater(settings)  # a store that cannot be opened: one line (StoreError)
        log.info("updater settings: %s", settings.model_dump_json(exclude={"model"}))
        return updater.run(stop)
    finally:
        watch.stop()
