"""Thin typed wrappers over confluent-kafka: client configs, delivery checks, headers, signals.

Fetch settings matter on every broker and enormously on the embedded one (DESIGN.md: defaults
crawl below 10k messages/s), so every consumer here is built with them.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterable, Mapping
from types import FrameType
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer

from consumers.settings import KafkaSettings

log = logging.getLogger(__name__)


def _log_error(err: KafkaError) -> None:
    log.warning("kafka: %s", err)


class CountingLogger:
    """librdkafka's log sink: forwards to `logging`, and counts warnings and errors, because a
    hung broker surfaces only as request timeouts in the log, never through error_cb."""

    def __init__(self, count: Callable[[], None] | None):
        self.count = count

    def log(self, level: int, msg: str, *args: Any, **kwargs: Any) -> None:
        log.log(level, msg, *args, **kwargs)
        if self.count is not None and level >= logging.WARNING:
            self.count()


def error_handler(count: Callable[[], None] | None) -> Callable[[KafkaError], None]:
    """librdkafka's error callback: log it, and count it (a broker outage must show in
    metrics while it lasts, not only in logs)."""
    if count is None:
        return _log_error

    def handle(err: KafkaError) -> None:
        _log_error(err)
        count()

    return handle


def drain(c: Consumer, max_messages: int, timeout: float) -> list[Message]:
    """Whatever is ready now, or else wait up to `timeout` for the first message only.

    `consume(n, timeout)` waits out the whole timeout unless n messages arrive, which adds the
    timeout to every request on a quiet topic; this returns as soon as anything is there.
    """
    got = c.consume(max_messages, 0)
    if got:
        return got
    first = c.poll(timeout)
    if first is None:
        return []
    return [first, *c.consume(max_messages - 1, 0)]


def consumer(
    kafka: KafkaSettings,
    group_id: str,
    session_timeout_ms: int = 10_000,
    on_error: Callable[[], None] | None = None,
    **extra: Any,
) -> Consumer:
    conf: dict[str, Any] = {
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": 10,
        # brokers that answer a fetch with far more than asked (Tansu returns ~20 MB) push
        # librdkafka over queued.min.messages, and the default 1 s backoff then caps a
        # partition near 200k msgs/s; 10 ms lifts it to ~1M/s (measured, consumers/broker.py)
        "fetch.queue.backoff.ms": 10,
        "fetch.min.bytes": 1,
        "max.partition.fetch.bytes": 8 * 1024 * 1024,
        "queued.max.messages.kbytes": 256 * 1024,
        "session.timeout.ms": session_timeout_ms,
        "heartbeat.interval.ms": max(500, session_timeout_ms // 6),
        "max.poll.interval.ms": max(60_000, session_timeout_ms * 2),
        # notice a dead broker within seconds, not the default minute
        "socket.timeout.ms": 10_000,
        "error_cb": error_handler(on_error),
        "logger": CountingLogger(on_error),
    }
    conf.update(extra)
    conf.update(kafka.client_config())  # the user's settings (incl. `extra`) win
    return Consumer(conf)


def producer(
    kafka: KafkaSettings, on_error: Callable[[], None] | None = None, **extra: Any
) -> Producer:
    conf: dict[str, Any] = {
        "linger.ms": 20,
        "batch.size": 1_000_000,
        # lz4 where throughput matters (replays, bench); replies and dead letters override it
        # with their own setting (none by default: kafkajs reads lz4 only with a plugin)
        "compression.type": "lz4",
        "acks": "all",
        # no duplicates and no reordering on retries: a replay must arrive as it was sent
        "enable.idempotence": True,
        "error_cb": error_handler(on_error),
        "logger": CountingLogger(on_error),
    }
    conf.update(extra)
    conf.update(kafka.client_config())
    return Producer(conf)


def ordered_producer(kafka: KafkaSettings, **extra: Any) -> Producer:
    """A producer that keeps send order even across retries, whatever the broker: one request
    in flight. For replays, where order is event-time order and the learner depends on it (a
    retried batch overtaken by a later one would show the model the future)."""
    return producer(kafka, **{"max.in.flight.requests.per.connection": 1, **extra})


def close_producer(producer: Producer, timeout: float = 5.0) -> int:
    """Deliver what is queued (for up to `timeout` s), drop the rest, and close the producer's
    connections now rather than whenever the object is collected: a broker shutting down waits
    for open connections (Tansu 0.6 gives them 5 s after SIGTERM). Returns the messages
    dropped."""
    left = producer.flush(timeout)
    if left:
        producer.purge()
        producer.flush(0)
    close = getattr(producer, "close", None)  # older confluent-kafka closes on collection only
    if close is not None:
        close()
    return left


class DeliveryTracker:
    """Counts failed deliveries, so a caller can refuse to advance offsets past a lost message."""

    def __init__(self) -> None:
        self.failed = 0
        self.last_error: KafkaError | None = None

    def __call__(self, err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            self.failed += 1
            self.last_error = err


def headers_dict(headers: Iterable[tuple[str, bytes | None]] | None) -> dict[str, bytes]:
    return {k: v for k, v in (headers or []) if v is not None}


def str_headers(values: Mapping[str, str | int]) -> list[tuple[str, bytes]]:
    return [(k, str(v).encode()) for k, v in values.items()]


class StopFlag:
    """SIGTERM/SIGINT become a flag: the loop finishes its batch, commits and exits cleanly."""

    def __init__(self, event: threading.Event | None = None) -> None:
        self.event = event or threading.Event()

    def install(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)
            signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: finishing the current batch", signal.Signals(signum).name)
        self.event.set()

    def __bool__(self) -> bool:
        return self.event.is_set()
