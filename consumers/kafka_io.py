"""Thin typed wrappers over confluent-kafka: client configs, delivery checks, headers, signals.

Fetch settings matter on every broker and enormously on the embedded one (librdkafka's
defaults crawl below 10k messages/s there: docs/architecture.md), so every consumer here is
built with them.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient

from consumers.errors import UnavailableError
from consumers.settings import KafkaSettings

log = logging.getLogger(__name__)


class LogThrottle:
    """Repeated lines become one line per `interval` with a count of those left out.

    A dead broker makes librdkafka report the same failed connect from every client, about 90
    lines a second for an updater; one line per condition every 30 s says as much. Lines are
    the same when they differ only in numbers (milliseconds, counts, client ids), and the same
    condition reported through the logger and through error_cb counts once.
    """

    def __init__(self, interval: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, list[float | int]] = {}  # key -> [last shown at, left out since]

    @staticmethod
    def key(text: str) -> str:
        return _DIGITS.sub("#", _THREAD.sub("", text))

    def admit(self, text: str) -> int | None:
        """None: leave this line out; else show it, with how many were left out before it."""
        key = self.key(text)
        now = self.clock()
        with self._lock:
            entry = self._seen.get(key)
            if entry is not None and now - entry[0] < self.interval:
                entry[1] += 1
                return None
            if len(self._seen) > 1000:  # distinct lines are few; never grow without bound
                self._seen.clear()
            skipped = int(entry[1]) if entry is not None else 0
            self._seen[key] = [now, 0]
            return skipped

    def suffix(self, skipped: int) -> str:
        return f" ({skipped} more like it in the last {self.interval:.0f} s)" if skipped else ""

    def log(self, logger: logging.Logger, level: int, msg: str, *args: Any) -> None:
        """`logger.log(level, msg, *args)`, unless the same line was shown within the interval."""
        skipped = self.admit(msg % args if args else msg)
        if skipped is not None:
            logger.log(level, msg + self.suffix(skipped), *args)


_DIGITS = re.compile(r"\d+")
_THREAD = re.compile(r"^\[thrd:[^\]]*\]: ")
#: one per process: the same condition seen by every client is shown once
THROTTLE = LogThrottle()


def _log_error(err: KafkaError) -> None:
    # keyed by err.str(), the text the logger's line for the same failure carries too
    skipped = THROTTLE.admit(err.str())
    if skipped is not None:
        log.warning("kafka: %s%s", err, THROTTLE.suffix(skipped))


class CountingLogger:
    """librdkafka's log sink: forwards to `logging` (throttled, see LogThrottle), and counts
    every warning and error, because a hung broker surfaces only as request timeouts in the log,
    never through error_cb."""

    def __init__(self, count: Callable[[], None] | None):
        self.count = count

    def log(self, level: int, msg: str, *args: Any, **kwargs: Any) -> None:
        if self.count is not None and level >= logging.WARNING:
            self.count()
        # confluent-kafka calls log(level, "%s [%s] %s", facility, client name, message)
        text = str(args[-1]) if args else msg
        skipped = THROTTLE.admit(text)
        if skipped is not None:
            log.log(level, msg + THROTTLE.suffix(skipped), *args, **kwargs)


class _Silent:
    """A librdkafka log sink that drops everything: a probe's conclusion is its one line."""

    def log(self, *_args: Any, **_kwargs: Any) -> None:
        pass


def error_handler(count: Callable[[], None] | None) -> Callable[[KafkaError], None]:
    """librdkafka's error callback: log it (throttled), and count every one (a broker outage
    must show in metrics while it lasts, not only in logs)."""
    if count is None:
        return _log_error

    def handle(err: KafkaError) -> None:
        _log_error(err)
        count()

    return handle


def no_broker_message(kafka: KafkaSettings, after: float) -> str:
    """What to check when nothing answers at the bootstrap address."""
    secured = kafka.security_protocol != "PLAINTEXT"
    what = "--bootstrap-servers / KAFKA_BOOTSTRAP_SERVERS" + (
        f", the {kafka.security_protocol} settings" if secured else ""
    )
    return (
        f"no Kafka broker answers at {kafka.bootstrap_servers} after {after:g} s: "
        f"check {what} and that the broker is up"
    )


def _probe(kafka: KafkaSettings) -> AdminClient:
    conf: dict[str, Any] = {**kafka.client_config(), "logger": _Silent(), "error_cb": _ignore}
    return AdminClient(conf)


def telling_probe(kafka: KafkaSettings, on_error: Callable[[], None] | None = None) -> AdminClient:
    """A probe for a process that waits for its broker before anything else: it logs why
    nothing answers (a certificate the CA does not sign, a refused SASL login), throttled like
    every client's, and counts it, since no other client is polled yet to do either. Its
    callbacks run in `poll`."""
    conf: dict[str, Any] = {
        **kafka.client_config(),
        "logger": CountingLogger(on_error),
        "error_cb": error_handler(on_error),
    }
    return AdminClient(conf)


def broker_answers(kafka: KafkaSettings, timeout: float, admin: AdminClient | None = None) -> bool:
    """True once a broker at the bootstrap address answers a metadata request."""
    admin = admin or _probe(kafka)
    try:
        admin.list_topics(timeout=timeout)
    except KafkaException:
        return False
    return True


def _ignore(_err: KafkaError) -> None:
    pass


def require_broker(kafka: KafkaSettings, timeout: float) -> None:
    """For one-shot commands: fail in one line when no broker answers within `timeout`."""
    if not broker_answers(kafka, timeout):
        raise UnavailableError(no_broker_message(kafka, timeout))


class BrokerWatch:
    """For long-running processes: when no broker has answered `after` seconds into start-up,
    say so once, in one line naming the address and what to check, while the process keeps
    retrying (librdkafka's own lines about it are throttled); and say when one answers."""

    def __init__(self, kafka: KafkaSettings, after: float = 10.0):
        self.kafka = kafka
        self.after = after
        self.warned = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> BrokerWatch:
        self._thread = threading.Thread(target=self._run, name="broker-watch", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        t0 = time.monotonic()
        admin = _probe(self.kafka)  # one client for every probe: it keeps reconnecting itself
        while not self._stop.is_set():
            if broker_answers(self.kafka, timeout=2.0, admin=admin):
                if self.warned:
                    log.info("a Kafka broker answers at %s now", self.kafka.bootstrap_servers)
                return
            if not self.warned and time.monotonic() - t0 >= self.after:
                self.warned = True
                log.error("%s; still retrying", no_broker_message(self.kafka, self.after))
            self._stop.wait(0.5 if not self.warned else 5.0)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)


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
        # partition near 200k msgs/s; 10 ms lifts it to ~1M/s (measured: local_broker.py)
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


def position(m: Message) -> tuple[int, int]:
    """(partition, offset) of a message delivered or consumed without error. The client sets
    both then, but types them optional (an error event has neither), so this checks once."""
    p, o = m.partition(), m.offset()
    if p is None or o is None:
        raise ValueError(f"a message without a position (error: {m.error()})")
    return p, o


def payload(m: Message) -> bytes:
    """A message's value, which must be there (a tombstone or error event has none)."""
    v = m.value()
    if not isinstance(v, bytes):
        raise ValueError(f"a message without a payload (error: {m.error()})")
    return v


#: message headers as confluent-kafka types them, for producing and as consumed
HeaderList = list[tuple[str, str | bytes | None]]
Headers = HeaderList | dict[str, str | bytes | None]


def headers_dict(headers: Headers | None) -> dict[str, bytes]:
    """A consumed message's headers by name, valueless ones left out. librdkafka hands them
    over as (name, bytes) pairs; the client library types them as anything a producer may
    pass, so a str (never seen from a broker) is encoded rather than trusted."""
    pairs = headers.items() if isinstance(headers, dict) else (headers or [])
    return {k: v.encode() if isinstance(v, str) else v for k, v in pairs if v is not None}


def str_headers(values: Mapping[str, object]) -> HeaderList:
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
