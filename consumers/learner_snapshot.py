"""Learner snapshots on Kafka: the updater writes them; an updater on an empty disk restores.

`SnapshotWriter` (updater) takes the state between two batches, right after a commit, encodes
it on the loop thread (a consistent copy) and writes the records on a thread of its own: the
begin record, the chunks, and only once the broker has acknowledged every chunk, the end record
that makes the snapshot complete (stream_mf/learner_snapshot.py has the format). After a newer
snapshot is complete, the chunks of the one it supersedes get tombstones, so a compacted topic
drops them; the embedded broker compacts nothing (README, "Retention").

`find_latest` reads the topic back from its end for the latest end record, then the chunks from
that snapshot's begin record on; a snapshot whose end record never came (a writer killed half
way) is never used, nor one whose chunks do not match the end record's digest.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from consumers import kafka_io
from consumers.settings import KafkaSettings, UpdaterSettings
from consumers.topics import create_topics
from stream_mf.learner_snapshot import (
    END_KEY,
    Assembler,
    LearnerSnapshot,
    SnapshotEnd,
    SnapshotFormatError,
    begin_record,
    chunk_key,
    chunk_records,
    decode,
    digest,
    encode,
    n_chunks,
)

log = logging.getLogger(__name__)

PARTITION = 0
#: newer records of a key supersede older ones; superseded snapshots' chunks get tombstones
TOPIC_CONFIG = {"cleanup.policy": "compact"}
#: the longest wait for the broker to acknowledge one step of a snapshot (begin, chunks, end)
ACK_TIMEOUT_S = 60.0
#: the longest wait for the first records of a stretch of the topic known to hold some
FIRST_FETCH_S = 10.0


def ensure_topic(kafka: KafkaSettings, topic: str) -> None:
    """Create the learner topic (one partition, compacted) if it is missing."""
    try:
        create_topics(kafka.bootstrap_servers, {topic: 1}, config=TOPIC_CONFIG,
                      client_config=kafka.client_config())  # fmt: skip
    except Exception as exc:  # no rights, or it exists already with its own settings
        log.warning("cannot create the learner topic %r (%s): create it compacted, 1 partition",
                    topic, exc)  # fmt: skip


# ---- the updater's side ---------------------------------------------------------------------


class SnapshotWriter:
    """Writes learner snapshots, one at a time, from a thread of its own."""

    def __init__(self, settings: UpdaterSettings, metrics: Any = None) -> None:
        self.settings = settings
        self.topic = settings.topics.learner
        self.metrics = metrics
        conf: dict[str, Any] = {
            # one request in flight: the end record is never ahead of a chunk
            "enable.idempotence": False,
            "max.in.flight.requests.per.connection": 1,
            "linger.ms": 5,
            "compression.type": settings.learner_snapshot_compression,
            "message.max.bytes": max(1_000_000, settings.learner_snapshot_chunk_bytes + 4096),
        }
        self.producer = kafka_io.producer(settings.kafka, None, **conf)
        self.thread: threading.Thread | None = None
        self.last: SnapshotEnd | None = None  # the latest complete one this process knows of
        self.last_commits = -1  # the store commit the latest snapshot stands for
        self.last_at = 0.0  # wall time of the state it holds
        self.written = 0
        self.failed = 0
        self._orphans: list[tuple[int, int]] = []  # (id, chunks) begun but never completed
        self._topic_ready = False
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def submit(self, snap: LearnerSnapshot) -> bool:
        """Encode `snap` now (the caller's state is consistent between two batches) and write it
        in the background; False if one is still being written."""
        if self.busy:
            return False
        t0 = time.perf_counter()
        raw = encode(snap)
        at = time.time()
        end = SnapshotEnd(
            id=random.getrandbits(63), chunks=n_chunks(len(raw), self.chunk_bytes),
            size=len(raw), sha256=digest(raw), begin=-1, commits=snap.commits,
            events=snap.events, generation=snap.generation,
            model_version=snap.state.model_version,
            offsets={f"{t}/{p}": o for (t, p), o in snap.offsets.items()}, at=at,
        )  # fmt: skip
        self.thread = threading.Thread(
            target=self._write, args=(raw, end, t0), name="learner-snapshot", daemon=True
        )
        self.thread.start()
        return True

    @property
    def chunk_bytes(self) -> int:
        return self.settings.learner_snapshot_chunk_bytes

    def wait(self, timeout: float) -> bool:
        """Wait for the snapshot in flight; True if none is left."""
        if self.thread is not None:
            self.thread.join(timeout)
        return not self.busy

    def _write(self, raw: bytes, end: SnapshotEnd, t0: float) -> None:
        try:
            self._write_records(raw, end)
        except Exception as exc:  # the broker is away, or refused a record: the next one
            self.failed += 1
            log.warning("learner snapshot not written (%s): the next one is tried at its time",
                        exc)  # fmt: skip
            if self.metrics is not None:
                self.metrics.errors.labels("learner_snapshot").inc()
            return
        took = time.perf_counter() - t0
        with self._lock:
            superseded = [(s.id, s.chunks) for s in [self.last] if s is not None]
            superseded += self._orphans
            self._orphans = []
            self.last, self.last_commits, self.last_at = end, end.commits, end.at
            self.written += 1
        self._tombstone(superseded)
        if self.metrics is not None:
            m = self.metrics
            m.learner_snapshot_bytes.set(end.size)
            m.learner_snapshot_time.set(end.at)
            m.learner_snapshot_seconds.observe(took)
        log.info("learner snapshot written: commit %d, %d events, %.1f MB in %d records, %.2f s",
                 end.commits, end.events, end.size / 1e6, end.chunks + 2, took)  # fmt: skip

    def _write_records(self, raw: bytes, end: SnapshotEnd) -> None:
        if not self._topic_ready:
            ensure_topic(self.settings.kafka, self.topic)
            self._topic_ready = True
        errors: list[str] = []
        begun: list[int] = []

        def acked(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                errors.append(str(err))

        def began(err: KafkaError | None, msg: Message) -> None:
            if err is None:
                begun.append(kafka_io.position(msg)[1])
            else:
                errors.append(str(err))

        self._produce(*begin_record(end.id, end.chunks, end.size), began)
        self._flush("its begin record", errors)
        if not begun:
            raise RuntimeError("the broker did not acknowledge the begin record")
        with self._lock:
            self._orphans.append((end.id, end.chunks))
        end.begin = begun[0]
        for k, v in chunk_records(end.id, raw, self.chunk_bytes):
            self._produce(k, v, acked)
        self._flush("its chunks", errors)
        self._produce(END_KEY, end.encode(), acked)
        self._flush("its end record", errors)
        with self._lock:
            self._orphans.remove((end.id, end.chunks))

    def _produce(
        self, key: bytes, value: bytes | None, cb: Callable[[KafkaError | None, Message], None]
    ) -> None:
        while True:
            try:
                self.producer.produce(self.topic, value=value, key=key, on_delivery=cb)
                return
            except BufferError:  # the local queue is full: let deliveries drain
                self.producer.poll(0.05)

    def _flush(self, what: str, errors: list[str]) -> None:
        left = self.producer.flush(ACK_TIMEOUT_S)
        if errors:
            raise RuntimeError(f"{len(errors)} record(s) of {what} not delivered: {errors[0]}")
        if left:
            raise RuntimeError(f"{left} record(s) of {what} not acknowledged in {ACK_TIMEOUT_S} s")

    def _tombstone(self, snaps: list[tuple[int, int]]) -> None:
        """Superseded (or never completed) snapshots' chunks: a compacted topic drops them."""
        try:
            for snap_id, chunks in snaps:
                for j in range(chunks):
                    self._produce(chunk_key(snap_id, j), None, lambda _e, _m: None)
            self.producer.flush(ACK_TIMEOUT_S)
        except (KafkaException, BufferError) as exc:
            log.warning("could not tombstone superseded learner snapshots: %s", exc)

    def close(self, timeout: float = 30.0) -> None:
        self.wait(timeout)
        kafka_io.close_producer(self.producer, 5.0)


# ---- the restoring side -----------------------------------------------------------------------


def _read(
    c: Any, topic: str, start: int, stop: int, settle: float = 0.5
) -> Iterator[tuple[int, bytes | None, bytes | None]]:
    """(offset, key, value) from `start` on, up to `stop` (the watermark read first) and on
    while more comes (the embedded broker's watermark can lag the log), until quiet."""
    c.assign([TopicPartition(topic, PARTITION, start)])
    try:
        quiet_until = time.monotonic() + (FIRST_FETCH_S if stop > start else settle)
        pos = start
        while time.monotonic() < quiet_until:
            got = c.consume(500, 0.1)
            for m in got:
                if m.error() is not None:
                    continue
                pos = m.offset() + 1
                yield m.offset(), m.key(), m.value()
            if got:
                quiet_until = time.monotonic() + (FIRST_FETCH_S if pos < stop else settle)
    finally:
        c.unassign()


def _ends(c: Any, topic: str, lo: int, hi: int) -> Iterator[tuple[int, SnapshotEnd]]:
    """End records, newest first, reading back from the end a growing window at a time."""
    window, top, start = 64, None, hi
    while True:
        start = max(lo, start - window)
        found: list[tuple[int, SnapshotEnd]] = []
        for off, k, v in _read(c, topic, start, hi if top is None else top):
            if top is not None and off >= top:
                break
            if k == END_KEY and v is not None:
                try:
                    found.append((off, SnapshotEnd.decode(v)))
                except SnapshotFormatError as exc:
                    log.warning("skipping an unreadable learner snapshot end record at %d: %s",
                                off, exc)  # fmt: skip
        yield from reversed(found)
        if start <= lo:
            return
        top = start
        window *= 8


def find_latest(
    kafka: KafkaSettings, topic: str, want: Callable[[SnapshotEnd], bool] | None = None
) -> tuple[LearnerSnapshot | None, SnapshotEnd | None, str]:
    """The latest complete learner snapshot on `topic` (and its end record), or None and why.
    `want` may pass over end records (tests: one of a given commit)."""
    c = kafka_io.consumer(kafka, f"learner-restore-{uuid.uuid4().hex[:8]}")
    try:
        meta = c.list_topics(topic, timeout=10.0).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            return None, None, f"the learner topic {topic!r} does not exist"
        lo, hi = c.get_watermark_offsets(TopicPartition(topic, PARTITION), 10.0, cached=False)
        lo, hi = max(lo, 0), max(hi, 0)
        skipped = 0
        for off, end in _ends(c, topic, lo, hi):
            if want is not None and not want(end):
                continue
            a = Assembler(end)
            for _o, k, v in _read(c, topic, max(end.begin, lo), off):
                if _o >= off:
                    break
                if k is not None:
                    a.feed(k, v)
            try:
                return decode(a.bytes()), end, ""
            except SnapshotFormatError as exc:
                skipped += 1
                log.warning("learner snapshot of commit %d (end at offset %d) cannot be used "
                            "(%s): looking for an older one", end.commits, off, exc)  # fmt: skip
        why = f"{topic!r} holds no complete learner snapshot"
        return None, None, why + (f" ({skipped} unusable)" if skipped else "")
    finally:
        c.close()
