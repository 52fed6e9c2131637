"""Load generators and probes shared by the reliability tests (not a test module).

Imported as `tests.reliability.harness` (the repository root is on `sys.path` through pytest's
`pythonpath` setting). Everything here runs in background threads that a test starts and stops
explicitly; every thread is bounded in time and every Kafka client is closed in `stop()`.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from consumers import kafka_io
from consumers.settings import KafkaSettings, TopicSettings
from stream_mf.messages import RecResponse

BAD_PAYLOADS: tuple[bytes, ...] = (
    b"{not json",
    b"",
    orjson.dumps({"user_id": "u1"}),
    b'{"user_id": 1}',
    orjson.dumps({"user_id": "u1", "item_id": "i1", "event_type": "teleport", "timestamp": 1.7e9}),
)


def event_payloads(
    users: list[int], items: list[int], times: list[float], bad_every: int = 0
) -> tuple[list[tuple[bytes, bytes]], list[bool]]:
    """(key, value) per message and whether each is a valid event; every `bad_every`-th
    message (0 = none) is followed by a hostile one that must go to the dead-letter topic."""
    out: list[tuple[bytes, bytes]] = []
    valid: list[bool] = []
    for j, (u, i, t) in enumerate(zip(users, items, times, strict=True)):
        doc = {"user_id": f"u{u}", "item_id": f"i{i}", "event_type": "view", "timestamp": t}
        out.append((f"u{u}".encode(), orjson.dumps(doc)))
        valid.append(True)
        if bad_every and j % bad_every == bad_every - 1:
            out.append((b"bad", BAD_PAYLOADS[(j // bad_every) % len(BAD_PAYLOADS)]))
            valid.append(False)
    return out, valid


class StreamPublisher:
    """Publishes payloads at `rate` msgs/s from a thread until done or stopped.

    Delivery reports give the log's true end offsets (Tansu's ListOffsets is off by a batch,
    consumers/local_broker.py) and how many valid events really reached the topic.
    """

    def __init__(
        self,
        kafka: str,
        topic: str,
        payloads: list[tuple[bytes, bytes]],
        valid: list[bool],
        rate: float,
        **producer_conf: Any,
    ) -> None:
        self.topic, self.payloads, self.valid, self.rate = topic, payloads, valid, rate
        self.producer = kafka_io.producer(KafkaSettings(bootstrap_servers=kafka), **producer_conf)
        self.produced = 0  # handed to the producer (queued)
        self.delivered = 0
        self.delivered_valid = 0
        self.failed: list[str] = []
        self.end_offsets: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> StreamPublisher:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            start = time.monotonic()
            for j, (key, value) in enumerate(self.payloads):
                if self._stop.is_set():
                    break
                if j % 100 == 0:
                    ahead = j / self.rate - (time.monotonic() - start)
                    if ahead > 0:
                        time.sleep(ahead)
                    self.producer.poll(0)
                while True:
                    try:
                        self.producer.produce(
                            self.topic, value=value, key=key, on_delivery=self._deliver_cb(j)
                        )
                        break
                    except BufferError:
                        self.producer.poll(0.05)
                self.produced += 1
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def _deliver_cb(self, j: int) -> Callable[[KafkaError | None, Message], None]:
        def cb(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                self.failed.append(str(err))
                return
            self.delivered += 1
            p, o = kafka_io.position(msg)
            if o + 1 > self.end_offsets.get(p, 0):
                self.end_offsets[p] = o + 1
            if self.valid[j]:
                self.delivered_valid += 1

        return cb

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def poll(self) -> None:
        """Serve delivery reports from the caller's thread too (the publisher may be done)."""
        self.producer.poll(0)

    def finish(self, timeout: float = 60.0) -> int:
        """Publish everything, then wait for the deliveries; returns how many remain."""
        self._thread.join(timeout)
        return self.stop(timeout)

    def stop(self, flush_timeout: float = 60.0) -> int:
        """Stop producing, wait for every queued message's delivery; returns how many remain."""
        self._stop.set()
        self._thread.join(30.0)
        left = int(self.producer.flush(flush_timeout))
        if self.error is not None:
            raise AssertionError(f"publisher thread failed: {self.error!r}") from self.error
        return left


@dataclass
class SentRequest:
    rid: str
    budget_ms: int
    sent_at: float  # epoch seconds, as the client saw it
    doc: dict[str, Any]


@dataclass
class Reply:
    at: float  # epoch seconds when the client read it
    raw: bytes
    _parsed: RecResponse | None = None

    @property
    def response(self) -> RecResponse:
        """Parsed on first use: the reader thread must keep up with a flood of replies."""
        if self._parsed is None:
            self._parsed = RecResponse.model_validate_json(self.raw)
        return self._parsed


@dataclass
class RequestLoad:
    """Sends requests (header `deadline_ms` = a budget in ms) at `rate` per second from one
    thread and reads every reply on the reply topic from another, keeping duplicates."""

    kafka: str
    topics: TopicSettings
    make_request: Callable[[int], tuple[dict[str, Any], int]]  # n -> (request doc, budget ms)
    rate: float
    sent: dict[str, SentRequest] = field(default_factory=dict)
    replies: dict[str, list[Reply]] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)
    stray: int = 0  # replies whose correlation id we never sent
    delivery_failures: int = 0  # requests the broker never acknowledged
    linger_ms: int = 0  # >0 batches requests: a broker slow per produce request keeps up

    def __post_init__(self) -> None:
        ks = KafkaSettings(bootstrap_servers=self.kafka)
        conf: dict[str, Any] = {"linger.ms": self.linger_ms}
        self.producer = kafka_io.producer(ks, **conf)
        self.consumer: Consumer = kafka_io.consumer(
            ks, f"reliability-client-{uuid.uuid4().hex[:8]}"
        )
        meta = self.consumer.list_topics(self.topics.responses, timeout=10)
        parts = sorted(meta.topics[self.topics.responses].partitions)
        # the reply topic is private to the test: read it all, so no reply can be missed
        self.consumer.assign(
            [TopicPartition(self.topics.responses, p, OFFSET_BEGINNING) for p in parts]
        )
        self._lock = threading.Lock()
        self._sending = threading.Event()
        self._reading = threading.Event()
        self._sender: threading.Thread | None = None
        self._reader = threading.Thread(target=self._read, name="replies", daemon=True)
        self._reading.set()
        self._reader.start()

    # ---- sending ------------------------------------------------------------------------

    def send_one(self, doc: dict[str, Any], budget_ms: int | None) -> str:
        rid = str(doc.setdefault("request_id", uuid.uuid4().hex))
        now = time.time()
        doc.setdefault("sent_at", now)
        headers: kafka_io.HeaderList = [("reply_to", self.topics.responses.encode())]
        if budget_ms is not None:
            headers.append(("deadline_ms", str(budget_ms).encode()))
        with self._lock:
            self.sent[rid] = SentRequest(rid, budget_ms or 0, now, doc)
        key = str(doc.get("user_id") or "").encode()
        while True:
            try:
                self.producer.produce(
                    self.topics.requests,
                    value=orjson.dumps(doc),
                    key=key,
                    headers=headers,
                    on_delivery=self._delivered,
                )
                break
            except BufferError:
                self.producer.poll(0.01)
        self.producer.poll(0)
        return rid

    def _delivered(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self.delivery_failures += 1

    def start_sending(self, rate: float | None = None, duration: float | None = None) -> None:
        if rate is not None:
            self.rate = rate
        self._sending.set()
        self._sender = threading.Thread(
            target=self._send_loop, args=(duration,), name="requests", daemon=True
        )
        self._sender.start()

    def _send_loop(self, duration: float | None) -> None:
        try:
            start = time.monotonic()
            n = 0
            while self._sending.is_set():
                elapsed = time.monotonic() - start
                if duration is not None and elapsed >= duration:
                    break
                due = int(elapsed * self.rate) + 1
                while n < due and self._sending.is_set():
                    doc, budget = self.make_request(n)
                    self.send_one(doc, budget)
                    n += 1
                time.sleep(min(0.005, 1.0 / self.rate))
            self.producer.flush(10.0)
        except BaseException as exc:
            self.errors.append(exc)

    def stop_sending(self) -> None:
        self._sending.clear()
        if self._sender is not None:
            self._sender.join(30.0)
        self.producer.flush(10.0)

    def sending_done(self) -> bool:
        return self._sender is None or not self._sender.is_alive()

    # ---- replies -------------------------------------------------------------------------

    def _read(self) -> None:
        try:
            while self._reading.is_set():
                for m in kafka_io.drain(self.consumer, 1000, 0.05):
                    if m.error() is not None:
                        continue
                    at = time.time()
                    cid = kafka_io.headers_dict(m.headers()).get("correlation_id", b"").decode()
                    with self._lock:
                        if cid in self.sent:
                            self.replies.setdefault(cid, []).append(Reply(at, m.value() or b""))
                        else:
                            self.stray += 1
        except BaseException as exc:
            self.errors.append(exc)

    def unanswered(self, only: Callable[[SentRequest], bool] | None = None) -> list[str]:
        with self._lock:
            return [
                rid
                for rid, s in self.sent.items()
                if rid not in self.replies and (only is None or only(s))
            ]

    def wait_answered(
        self, only: Callable[[SentRequest], bool] | None, timeout: float
    ) -> list[str]:
        """Wait until every (selected) request has a reply; returns the ones still without."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            left = self.unanswered(only)
            if not left:
                return []
            time.sleep(0.1)
        return self.unanswered(only)

    def latency(self, rid: str) -> float | None:
        """Seconds from send to the first reply, as the client saw them."""
        with self._lock:
            got = self.replies.get(rid)
            return None if not got else got[0].at - self.sent[rid].sent_at

    def close(self) -> None:
        self._sending.clear()
        if self._sender is not None:
            self._sender.join(30.0)
        self._reading.clear()
        self._reader.join(10.0)
        self.producer.flush(5.0)
        self.consumer.close()
        if self.errors:
            raise AssertionError(f"request load thread failed: {self.errors[0]!r}")


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def committed_offsets(kafka: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """A group's committed offsets (OffsetFetch; no need to join the group)."""
    c = Consumer({"bootstrap.servers": kafka, "group.id": group, "enable.auto.commit": False})
    try:
        got = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: tp.offset for tp in got}
    finally:
        c.close()


def log_since(path: Path, offset: int) -> str:
    """What a process appended to its log after byte `offset`."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def log_model_mismatches(kafka: str, topic: str, state_dir: Path, sec_dir: Path) -> list[str]:
    """A fresh reader materialised from the model log against the store's live generation,
    bit for bit: ids, factors, item biases, counts, last-seen times, popularity and each user's
    seen items. Returns what differs (empty: equal)."""
    import numpy as np

    from consumers.model_log import read_model
    from consumers.settings import KafkaSettings
    from stream_mf.store import StateStore

    reader, _first = read_model(KafkaSettings(bootstrap_servers=kafka), topic)
    with StateStore(state_dir, secondary=sec_dir) as st:
        st.catch_up()
        state = st.load()
        gen = st.generation()
        seen = [st.user_items(u)[0] for u in range(state.users.n)]
    live = reader.live
    if live is None or reader.building is not None:
        return ["the log holds no complete model"]
    out: list[str] = []
    if live.gen != gen:
        out.append(f"generation {live.gen} in the log, {gen} in the store")
    if live.marker is not None and live.marker.version != state.model_version:
        out.append(f"model_version {live.marker.version} vs {state.model_version}")
    for kind, a, b in (("user", live.users, state.users), ("item", live.items, state.items)):
        n = b.n
        if a.n != n:
            out.append(f"{kind}s: {a.n} in the log, {n} in the store")
            continue
        if list(a.ids[:n]) != list(b.ids[:n]):
            out.append(f"{kind} ids differ")
        names = ["factors", "count", "last", "logpop"] + (["bias"] if kind == "item" else [])
        for name in names:
            x, y = getattr(a, name)[:n], getattr(b, name)[:n]
            if x.tobytes() != y.tobytes():
                rows = np.flatnonzero(np.any((x != y).reshape(n, -1), axis=1))
                out.append(f"{kind} {name}: {rows.size} rows differ, e.g. {rows[:5].tolist()}")
        gens = live.user_gen if kind == "user" else live.item_gen
        if not np.all(gens[:n] == gen):
            out.append(f"{kind} rows of another generation than {gen}")
    for u in range(min(live.users.n, state.users.n)):
        if not np.array_equal(np.frombuffer(live.seen[u], "<i4"), seen[u]):
            out.append(f"user {u}: seen items differ")
            break
    return out
