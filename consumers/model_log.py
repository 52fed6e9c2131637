"""The model log on Kafka: the updater publishes it, query processes follow it.

`ModelLogPublisher` (updater) is called after each durable commit of the store with what the
commit wrote (`CommitInfo`) and publishes those rows and a commit marker
(`stream_mf/model_log.py` has the format). User rows go out with every commit; item rows, which
sampled negatives touch by the thousand, are coalesced and go out at most every
`model_log_item_seconds`, and a row whose change is small (under `model_log_item_threshold` of
its factors, no event of its own) at the latest after `model_log_item_max_seconds` (the
staleness bound of item rows in the log). A full snapshot goes out
at the first commit, at every rebuild swap, when the records since the last snapshot outweigh
it, and on start when the log may lack what the store has (a kill between a commit and the
log's acknowledgement): the log's last marker names the store commit it stands for, and anything
but the store's own count, or rows still pending, means a snapshot.

`ModelFollower` (query) finds the last marker, seeks to the snapshot it names and materialises
the model in memory from there (`ModelReader`), applying commits as they arrive. It is ready
once it has read what the log held when it started.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import ConfigResource

from consumers import kafka_io
from consumers.settings import KafkaSettings, QuerySettings, UpdaterSettings
from consumers.topics import admin_client, create_topics
from stream_mf.arrays import unique_sorted
from stream_mf.model_log import (
    BEGIN_KEY,
    CONFIG_KEY,
    MARKER_KEY,
    LogFormatError,
    Marker,
    ModelReader,
    PendingRows,
    SeenIndex,
    begin_record,
    decode,
    filled_rows,
    item_key,
    item_records,
    sample_times,
    snapshot_records,
    trans_key,
    transition_records,
    user_key,
    user_records,
)
from stream_mf.state import ModelState, confidence_items
from stream_mf.store import CommitInfo, StateStore

log = logging.getLogger(__name__)

#: one partition: a reader applies records in the order they were written
PARTITION = 0
#: a snapshot the broker did not take is tried again this often (the loop waits this long for
#: its first record's acknowledgement)
SNAPSHOT_RETRY_S = 5.0
#: the longest wait for the first records of a stretch of the log known to hold some
FIRST_FETCH_S = 10.0
#: the broker keeps the latest record of each key
TOPIC_CONFIG = {"cleanup.policy": "compact"}
#: the snapshot topic's compaction holds back this long (ms): a record is only compacted away
#: by a later one of its key once the segment holding that one is this old. The next snapshot
#: reuses the named one's keys (`B`, `C`, every row, the marker): once a segment closed in the
#: middle of it, compaction would drop the named one's `B` and rows while the new one is still
#: being written (or never finishes: a kill, a failure), and no replica could start until
#: another is named. It must outlast a snapshot's writing and naming (slices, up to
#: `SIDE_ACK_S` for acknowledgements), one retry after `model_log_snapshot_min_seconds`, and a
#: replica's read of the named one: 15 minutes; the topic holds up to that long of snapshots
#: (at most one a `model_log_snapshot_min_seconds`, 48 MB each at 100k users x 50k items)
SNAPSHOT_COMPACTION_LAG_MS = 15 * 60 * 1000
SNAPSHOT_TOPIC_CONFIG = {**TOPIC_CONFIG, "min.compaction.lag.ms": str(SNAPSHOT_COMPACTION_LAG_MS)}


def ensure_topic(kafka: KafkaSettings, topic: str, config: dict[str, str] = TOPIC_CONFIG) -> None:
    """Create the model topic (one partition, compacted) if it is missing."""
    try:
        create_topics(
            kafka.bootstrap_servers,
            {topic: 1},
            config=config,
            client_config=kafka.client_config(),
        )
    except Exception as exc:  # no broker yet, no rights: the topic may exist anyway
        how = " ".join(f"{k}={v}" for k, v in config.items())
        log.warning("cannot create the model topic %r (%s): create it with 1 partition, %s",
                    topic, exc, how)  # fmt: skip


def check_compaction_lag(kafka: KafkaSettings, topic: str) -> None:
    """Say so when the snapshot topic holds compaction back less than it must (an existing
    topic keeps its config: the previous version created it with none)."""
    try:
        admin = admin_client(kafka.bootstrap_servers, kafka.client_config())
        res = ConfigResource("topic", topic)
        entry = admin.describe_configs([res])[res].result(timeout=10).get("min.compaction.lag.ms")
        lag = int(entry.value) if entry is not None and entry.value is not None else 0
    except Exception as exc:  # no broker yet, no rights to describe: nothing to say
        log.debug("cannot read the config of %r: %s", topic, exc)
        return
    if lag < SNAPSHOT_COMPACTION_LAG_MS:
        log.warning("the model snapshot topic %r has min.compaction.lag.ms=%d: compaction can "
                    "drop the snapshot the log names while the next is written; set it with "
                    "kafka-configs.sh --bootstrap-server <broker> --alter --entity-type topics "
                    "--entity-name %s --add-config min.compaction.lag.ms=%d", topic, lag, topic,
                    SNAPSHOT_COMPACTION_LAG_MS)  # fmt: skip


def find_last_marker(
    c: Any, topic: str, window: int = 64, settle: float = 0.3, still: bool = False
) -> tuple[Marker | None, int]:
    """(the log's last commit marker, the offset after the last record read) from the end of
    the log backwards, a growing window at a time. The embedded broker's watermark can lag the
    log, so the end is found by fetching until nothing more comes. `still`: nothing writes the
    log now (the updater's own look-up before it publishes), so it is read until nothing more
    comes even past the watermark with a marker in hand: a lagging watermark otherwise gave an
    older marker, and the replay after a crash then published commits readers already had."""
    try:
        # fresh metadata first: librdkafka answers "unknown partition" from its cache
        meta = c.list_topics(topic, timeout=5.0).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            return None, 0
        lo, hi = c.get_watermark_offsets(TopicPartition(topic, PARTITION), 5.0, cached=False)
        lo, hi = max(lo, 0), max(hi, 0)  # an unknown watermark reads as -1001
    except KafkaException as exc:
        log.debug("no watermarks for %r: %s", topic, exc)
        return None, 0
    end = hi
    start = hi
    while True:
        start = max(lo, start - window)
        found: Marker | None = None
        c.assign([TopicPartition(topic, PARTITION, start)])
        # records are known to be there: the first fetch may take seconds on a loaded broker
        # (a short wait here read a full log as empty)
        quiet_until = time.monotonic() + (FIRST_FETCH_S if hi > start else settle)
        deadline = time.monotonic() + 30.0
        try:
            # up to the watermark read at the start (a log being written to has no end to
            # wait for), or until nothing more comes (a watermark that lags the log)
            while time.monotonic() < min(quiet_until, deadline):
                got = c.consume(1000, 0.05)
                for m in got:
                    if m.error() is not None:
                        continue
                    end = max(end, m.offset() + 1)
                    if m.key() == MARKER_KEY:
                        try:
                            found = Marker.decode(m.value() or b"")
                        except LogFormatError:
                            continue
                if got:
                    quiet_until = time.monotonic() + settle
                    # past the watermark with a marker in hand; without one, read on until
                    # nothing more comes: Tansu's watermark can stand at the first record of
                    # the last batch (a snapshot produced in one batch read as 1 record)
                    if end >= hi and found is not None and not still:
                        break
        finally:
            c.unassign()
        if found is not None or start <= lo:
            return found, end
        window *= 8


# ---- the updater's side ---------------------------------------------------------------------


#: an item flush of at least this many rows is logged (how large the coalesced flushes get)
LARGE_FLUSH_ROWS = 5000


def _marked(flags: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`flags` with `rows` set, grown (doubling) to hold them."""
    if rows.size == 0:
        return flags
    need = int(rows.max()) + 1
    if need > flags.size:
        grown = np.zeros(max(need, flags.size * 2), np.bool_)
        grown[: flags.size] = flags
        flags = grown
    flags[rows] = True
    return flags


class ModelLogPublisher:
    """Publishes the model log after each durable commit (see the module docstring)."""

    def __init__(
        self,
        settings: UpdaterSettings,
        store: StateStore,
        on_error: Callable[[], None] | None = None,
        metrics: Any = None,
    ) -> None:
        self.settings = settings
        self.topic = settings.topics.model
        self.store = store
        self.metrics = metrics
        self.producer = kafka_io.producer(
            settings.kafka,
            on_error=on_error,
            **{
                # order is the format: one request in flight keeps it across retries; no
                # idempotence, whose producer id a restarted broker does not know (the dead-
                # letter producer met that); a record delivered twice is harmless here
                "enable.idempotence": False,
                "max.in.flight.requests.per.connection": 1,
                "linger.ms": 2,
                "compression.type": settings.model_log_compression,
                "queue.buffering.max.messages": 2_000_000,
            },
        )
        # periodic snapshots: a topic and a producer of their own (`_snapshot_slice`)
        self.snap_topic = settings.topics.model_snapshots
        self.side: Any = None
        self.snap_side: int | None = None  # the latest snapshot's BEGIN there, if it is there
        self.side_gens: set[int] = set()  # generations with rows there (tombstoned at a swap)
        self.seen: SeenIndex | None = None
        self.gen = store.generation()
        self.offsets: dict[str, int] = {f"{t}/{p}": o for (t, p), o in store.offsets().items()}
        self.seq = store.commits()
        self.epoch = store.offset_epoch()
        # after a crash the log holds commits the store lost (published before their
        # checkpoint): the source offsets of its last marker, which the replay must pass
        # before anything is published (readers hold that state already); then a snapshot
        self.reach: dict[str, int] = {}
        self.replayed = 0  # events learned again while behind `reach`
        self.need_snapshot = True
        self.snap_offset: int | None = None
        self.snapshot_bytes = 0
        self.snapshot_at = 0.0
        self.bytes_since = 0
        # bytes and records produced, not yet added to the metrics: a counter's inc per record
        # cost nearly as much as the produce itself (bench_ingest --profile)
        self._unreported = [0, 0]
        self.failed = 0
        self.dirty = np.zeros(1024, np.bool_)
        # transition rows changed since their last flush: one changes with nearly every event
        # (a record per event, 3.3x the user rows' bytes on MovieLens), so they are coalesced
        # and go out with the item rows, within the same `model_log_item_seconds`
        self.t_dirty = np.zeros(1024, np.bool_)
        # item rows as the log holds them: factors, event count, when sent (the threshold)
        self.pub_f = np.zeros((0, settings.model.dim), np.float32)
        self.pub_count = np.zeros(0, np.int64)
        self.pub_at = np.zeros(0, np.float64)
        self.n_published_items = 0
        self.next_items = 0.0
        self.retry_at = 0.0
        self._lookup: threading.Thread | None = None
        self._found: Marker | None = None
        self._started = False
        self._missed = False  # a commit came before the look-up ended
        # event times of commits not marked on their own yet (they go out with the next marker)
        self._times: list[np.ndarray] = []
        self._count = 0
        self.last_state: ModelState | None = None
        self.want_snapshot = False  # a periodic snapshot is due: sent a slice per loop turn
        self.chunked: _Chunked | None = None  # the periodic snapshot under way
        # `defer`: records are encoded at once (they read the model) but handed to the
        # producer later, in order, by `release` (the updater calls it while the next batch's
        # kernel learns on its worker thread: the produce calls then cost the loop nothing)
        self.defer = False
        self._held: list[tuple[bytes, bytes | None, Callable[..., None] | None, bool]] = []

    # ---- start ----------------------------------------------------------------------------

    def start(self, state: ModelState) -> None:
        """Look at the log's last marker on a thread of its own (the loop must not wait for a
        broker that is not there yet); `tick` acts on it: a snapshot unless the marker stands
        for the store's last commit with nothing pending (a kill between a commit and its
        acknowledgement leaves it behind)."""
        keys, _ = confidence_items(state.confidence)
        self.seen = SeenIndex(keys)
        self.last_state = state
        self._lookup = threading.Thread(target=self._look, name="model-log-end", daemon=True)
        self._lookup.start()

    def _look(self) -> None:
        ensure_topic(self.settings.kafka, self.topic)
        ensure_topic(self.settings.kafka, self.snap_topic, SNAPSHOT_TOPIC_CONFIG)
        check_compaction_lag(self.settings.kafka, self.snap_topic)
        c = kafka_io.consumer(self.settings.kafka, f"{self.settings.group_id}-model-log")
        try:
            self._found = find_last_marker(c, self.topic, still=True)[0]
        except Exception as exc:  # the broker is away: a snapshot once it is back
            log.warning("cannot read the model log's end (%s): a snapshot follows", exc)
            self._found = None
        finally:
            c.close()

    def _looked(self) -> bool:
        """Act on the look-up once it is done (loop thread); True from then on."""
        if self._started:
            return True
        if self._lookup is None or self._lookup.is_alive():
            return False
        self._started = True
        marker = self._found
        if marker is not None and marker.snap_topic is not None:
            if marker.snap_topic == self.snap_topic:
                # its rows there are this process's to tombstone at the next swap
                self.side_gens.add(marker.gen)
            else:  # the snapshot topic was renamed: the marker's `snap` is a tail point
                log.info("the model log names a snapshot on %r, not on %r: publishing one",
                         marker.snap_topic, self.snap_topic)  # fmt: skip
        lost = marker is not None and marker.seq > self.seq
        if lost:
            # commits the store lost (a crash before their checkpoint): the count goes on from
            # the log's, and the replay is held back until it passes the marker
            self.store.bump_commits(marker.seq if marker is not None else 0)
            self.seq = self.store.commits()
        if marker is not None and marker.epoch == self.epoch:
            self.reach = {k: o for k, o in marker.offsets.items() if o > self.offsets.get(k, 0)}
        if marker is not None and marker.epoch > self.epoch:  # a store restored from before a
            self.epoch = marker.epoch  # move back: the epoch never goes back either
        if self.reach:
            log.info("the model log is ahead of the store (%s, the store at %s): replaying "
                     "without publishing until past it, then a snapshot", self.reach,
                     self.offsets)  # fmt: skip
            self.need_snapshot = True
            return True
        if (
            marker is not None
            and not lost
            and marker.seq == self.seq
            and marker.gen == self.gen
            and marker.pending_items == 0
            and marker.snap is not None
            and marker.snap_topic in (None, self.snap_topic)
            and not self._missed
        ):
            self.need_snapshot = False
            self.snap_offset = marker.snap
            self.snap_side = marker.snap_begin if marker.snap_topic is not None else None
            self.snapshot_at = time.time()
            # the size of the log since that snapshot is not known here: the next periodic
            # one is due once `model_log_snapshot_min_seconds` passed (0 meant never, so a
            # restarted updater's readers started ever further back)
            self.snapshot_bytes = 1
            self.n_published_items = marker.n_items
            log.info("the model log is up to date with the store (commit %d)", self.seq)
        elif self.seq > 0:
            why = "empty" if marker is None else f"at commit {marker.seq}"
            log.info("the model log is %s, the store at commit %d: publishing a snapshot",
                     why, self.seq)  # fmt: skip
            self.need_snapshot = True
        return True

    def holding(self) -> bool:
        """True while a replay after a crash is behind what the log holds (`reach`): nothing
        is published then; the first commit past it publishes a snapshot."""
        if not self.reach:
            return False
        if any(self.offsets.get(k, 0) < o for k, o in self.reach.items()):
            return True
        log.info("the replay passed the model log's last marker (%d events learned again): "
                 "publishing a snapshot", self.replayed)  # fmt: skip
        self.reach = {}
        return False

    def replay_from_here(self) -> None:
        """The updater goes back to its last checkpoint (a batch failed): what follows up to
        the offsets published so far is a replay (see `holding`)."""
        self.reach = {k: o for k, o in self.offsets.items() if o > 0}
        self.replayed = 0
        self.need_snapshot = True

    def moved_offsets(self, keys: list[str], epoch: int) -> None:
        """The offset-gap policy moved stored offsets: a partition moved is not replayed up
        to where the log was, and a move back starts a new epoch (readers take what follows
        as new)."""
        for k in keys:
            self.reach.pop(k, None)
        if epoch != self.epoch:
            self.epoch = epoch
            self.reach = {}
            self.need_snapshot = True

    # ---- after each commit ----------------------------------------------------------------

    def committed(self, info: CommitInfo) -> None:
        """The store hook: never raises (the commit is durable; the log catches up)."""
        try:
            self._committed(info)
        except (KafkaException, BufferError, RuntimeError) as exc:
            log.warning("could not publish commit %d to the model log (%s): a snapshot follows",
                        info.seq, exc)  # fmt: skip
            self.need_snapshot = True
            self._count_error()
        self._report()

    def _follow_unpublished(self, info: CommitInfo) -> None:
        """A commit that goes out later (with a snapshot, or after a replay passed the log):
        its generation and seen items are followed all the same."""
        if info.generation is not None:
            self.gen = info.generation
        if self.seen is not None and not info.everything:
            self.seen.add(info.pair_keys)
        else:
            self.seen = SeenIndex(confidence_items(info.state.confidence)[0])

    def _committed(self, info: CommitInfo) -> None:
        state = info.state
        self.last_state = state
        self.seq = info.seq
        if info.event_times is not None and info.event_times.size:
            self._times.append(info.event_times)
            self._count += int(info.events)
            if len(self._times) > 64:  # many commits unmarked (no broker): a sample is enough
                self._times = [np.asarray(sample_times(np.concatenate(self._times)))]
        if not self._looked():
            # the log's end is not known yet: this commit goes out with the snapshot that the
            # look-up's outcome will call for
            self._missed = True
            self.offsets.update({f"{t}/{p}": o for (t, p), o in info.offsets.items()})
            # its events go out in that snapshot, whose marker counts none: after a crash they
            # may be a replay of events readers already applied (as while `reach` holds back)
            self._times, self._count = [], 0
            self._follow_unpublished(info)
            return
        self.offsets.update({f"{t}/{p}": o for (t, p), o in info.offsets.items()})
        replaying = bool(self.reach)
        held = self.holding()
        if replaying:
            # held, or the commit that passes the log's last marker: it holds events readers
            # applied already, so its marker (the snapshot's) counts none (none counts twice)
            self.replayed += int(info.events)
            self._times, self._count = [], 0
        if held:
            self._follow_unpublished(info)
            return
        if self.seen is None or info.everything:
            keys, _ = confidence_items(state.confidence)
            self.seen = SeenIndex(keys)
        else:
            self.seen.add(info.pair_keys)
        if info.generation is not None:
            self.gen = info.generation
            self.snapshot(state, info, replaced=True)
            return
        if info.everything or self.need_snapshot:
            self.snapshot(state, info)
            return
        rows = unique_sorted(info.users).tolist()
        t = state.transitions
        for k, v in user_records(state.users, self.gen, self.seen, rows, last=t.last):
            self._produce(k, v)
        self.t_dirty = _marked(self.t_dirty, info.trans_rows)
        self._mark_items(info.items)
        if state.items.n > self.n_published_items:
            self._flush_items(state, new_only=True)  # new ids go out at once
        # the coalesced item flush, when due, follows this marker (`tick`, the same loop turn):
        # thousands of rows a second (~10 us each to encode, megabytes for the one-in-flight
        # producer) held the commit's own marker back
        self._marker(state, info)
        if (
            self.snapshot_bytes
            and self.chunked is None
            and self.bytes_since > self.settings.model_log_snapshot_ratio * self.snapshot_bytes
            and time.time() - self.snapshot_at >= self.settings.model_log_snapshot_min_seconds
        ):
            self.want_snapshot = True

    def tick(self, state: ModelState) -> None:
        """Between batches: deliveries, coalesced item rows when due, a snapshot when due."""
        self.producer.poll(0)
        if self.side is not None:
            self.side.poll(0)
        self.last_state = state
        try:
            if not self._looked() or self.seq == 0 or self.holding():
                return
            if self.need_snapshot or self.failed:
                if time.monotonic() < self.retry_at:
                    return
                self.retry_at = time.monotonic() + SNAPSHOT_RETRY_S
                self.snapshot(state)
                return
            if self._any_dirty() and time.monotonic() >= self.next_items:
                self._flush_items(state)
                self._marker(state, None)
            if self.want_snapshot or self.chunked is not None:
                self._snapshot_slice(state)
        except (KafkaException, BufferError, RuntimeError) as exc:
            log.warning("could not publish to the model log (%s): retrying", exc)
            self.need_snapshot = True
            self._count_error()
        self._report()

    # ---- records --------------------------------------------------------------------------

    def _count_error(self) -> None:
        if self.metrics is not None:
            self.metrics.errors.labels("model_log").inc()

    def _delivered(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self.failed += 1
            log.warning("a model log record was not delivered: %s", err)

    def _produce(
        self,
        key: bytes,
        value: bytes | None,
        cb: Callable[..., None] | None = None,
        side: bool = False,
    ) -> None:
        """One record on the model topic, or (`side`) on the snapshot topic, whose bytes do
        not count towards the next periodic snapshot."""
        size = len(key) + (len(value) if value else 0)
        if not side:
            self.bytes_since += size
        self._unreported[0] += size
        self._unreported[1] += 1
        if self.defer:
            self._held.append((key, value, cb, side))
            return
        if self._held:
            self._hand_over()
        self._send(key, value, cb, side)

    def _send(
        self, key: bytes, value: bytes | None, cb: Callable[..., None] | None, side: bool
    ) -> None:
        producer, topic = (self.side, self.snap_topic) if side else (self.producer, self.topic)
        while True:
            try:
                producer.produce(topic, value, key, on_delivery=cb or self._delivered)
                break
            except BufferError:  # the local queue is full (a snapshot): let deliveries drain
                producer.poll(0.05)

    def _hand_over(self, at_most: int | None = None) -> None:
        """The held records to the producer, in the order they were made."""
        if at_most is None or at_most >= len(self._held):
            held, self._held = self._held, []
        else:
            held, self._held = self._held[:at_most], self._held[at_most:]
        send = self._send
        for key, value, cb, side in held:
            send(key, value, cb, side)

    @property
    def held(self) -> int:
        return len(self._held)

    def release(self, at_most: int | None = None) -> None:
        """Hand the held records (`at_most` of the oldest) to the producer (see `defer`);
        never raises: a record the producer refuses drops the rest, and a snapshot follows,
        as for a failed commit."""
        if not self._held:
            return
        try:
            self._hand_over(at_most)
            self.producer.poll(0)  # the delivery reports of earlier ones, meanwhile too
        except (KafkaException, BufferError, RuntimeError) as exc:
            log.warning("could not publish held model log records (%s): a snapshot follows",
                        exc)  # fmt: skip
            self._held = []
            self.need_snapshot = True
            self._count_error()

    @contextlib.contextmanager
    def _direct(self) -> Iterator[None]:
        """Records produced at once inside (after those held): a snapshot waits for its
        first record's acknowledgement, and a stop for every record."""
        deferred, self.defer = self.defer, False
        try:
            if self._held:
                self._hand_over()
            yield
        finally:
            self.defer = deferred

    def _report(self) -> None:
        nbytes, records = self._unreported
        if self.metrics is not None and records:
            self.metrics.model_log_bytes.inc(nbytes)
            self.metrics.model_log_records.inc(records)
        self._unreported = [0, 0]

    def _mark_items(self, items: np.ndarray) -> None:
        self.dirty = _marked(self.dirty, items)

    def _any_dirty(self) -> bool:
        return bool(self.dirty.any() or self.t_dirty.any())

    def _pending(self, n: int) -> int:
        """Item and transition rows the store holds and the log does not yet (coalesced)."""
        return int(self.dirty[:n].sum() + self.t_dirty[:n].sum())

    def _flush_items(self, state: ModelState, new_only: bool = False, force: bool = False) -> None:
        """Item rows changed since the last flush (or, `new_only`, the rows of ids not yet in
        the log), at their committed values. Unless `force`, a row whose only change is small
        (sampled negatives nudge thousands of rows a second by a fraction of a percent) waits,
        still marked, until its factors moved by `model_log_item_threshold` relative to what
        the log holds, an event counted for it, or it has waited `model_log_item_max_seconds`:
        the log's bytes per event and every replica's decoding are mostly such rows."""
        t0 = time.perf_counter()
        items = state.items
        n = items.n
        lo = self.n_published_items if new_only else 0
        if new_only:
            idx = np.arange(lo, n)
        else:
            idx = np.flatnonzero(self.dirty[:n])
            if not force and self.settings.model_log_item_threshold > 0 and idx.size:
                idx = idx[self._significant(items, idx)]
        for k, v in item_records(items, self.gen, idx.tolist()):
            self._produce(k, v)
        if not new_only:  # whole transition rows, at their committed values
            t = state.transitions
            rows = np.flatnonzero(self.t_dirty[:n])
            for k, v in transition_records(t.succ, t.logw, self.gen, rows.tolist()):
                self._produce(k, v)
            self.t_dirty[rows] = False
        self._published(items, idx)
        if new_only:
            self.dirty[lo:] = False
        else:
            self.dirty[idx] = False
        self.n_published_items = n
        if not new_only:
            self.next_items = time.monotonic() + self.settings.model_log_item_seconds
        if idx.size >= LARGE_FLUSH_ROWS:
            log.info("model log item flush: %d rows in %.0f ms", idx.size,
                     (time.perf_counter() - t0) * 1e3)  # fmt: skip

    def _significant(self, items: Any, idx: np.ndarray) -> np.ndarray:
        """Which of these changed item rows are worth sending now (see `_flush_items`)."""
        known = idx < self.pub_count.size
        out = ~known  # never published here: always
        k = idx[known]
        if k.size:
            f, was = items.factors[k], self.pub_f[k]
            moved = np.linalg.norm(f - was, axis=1) > self.settings.model_log_item_threshold * (
                np.maximum(np.linalg.norm(was, axis=1), 1e-6)
            )
            due = time.monotonic() - self.pub_at[k] >= self.settings.model_log_item_max_seconds
            out[known] = moved | due | (items.count[k] != self.pub_count[k])
        return out

    def _published(self, items: Any, idx: np.ndarray) -> None:
        """Note what the log now holds of these item rows (the threshold compares with it)."""
        if idx.size == 0:
            return
        need = int(idx.max()) + 1
        if need > self.pub_count.size:
            cap = max(need, self.pub_count.size * 2)
            f = np.zeros((cap, items.factors.shape[1]), np.float32)
            f[: self.pub_f.shape[0]] = self.pub_f
            c, at = np.zeros(cap, np.int64), np.zeros(cap, np.float64)
            c[: self.pub_count.size], at[: self.pub_at.size] = self.pub_count, self.pub_at
            self.pub_f, self.pub_count, self.pub_at = f, c, at
        self.pub_f[idx] = items.factors[idx]
        self.pub_count[idx] = items.count[idx]
        self.pub_at[idx] = time.monotonic()

    def _marker(
        self,
        state: ModelState,
        info: CommitInfo | None,
        snapshot: bool = False,
        on_acked: Callable[[int], None] | None = None,
    ) -> None:
        times = np.concatenate(self._times) if self._times else None
        count = self._count
        self._times, self._count = [], 0
        committed_at = time.time()
        m = Marker(
            seq=self.seq, gen=self.gen, version=state.model_version,
            events=state.events_applied, clock=float(state.clock[0]), n_users=state.users.n,
            n_items=min(state.items.n, self.n_published_items), offsets=dict(self.offsets),
            snapshot=snapshot, snap=self.snap_offset,
            snap_topic=self.snap_topic if self.snap_side is not None else None,
            snap_begin=self.snap_side,
            pending_items=self._pending(state.items.n),
            count=count,
            times=sample_times(times) if times is not None and times.size else [],
            at=committed_at,
            epoch=self.epoch,
        )  # fmt: skip

        def acked(err: KafkaError | None, msg: Message) -> None:
            self._delivered(err, msg)
            if (
                err is None
                and self.snap_offset is not None
                and kafka_io.position(msg)[1] < self.snap_offset
            ):
                # the log restarted below its own snapshot (a topic recreated, a broker that
                # lost its data): it no longer holds the model
                log.warning("the model log is shorter than its last snapshot's offset (%d < %d): "
                            "publishing a snapshot", msg.offset(), self.snap_offset)  # fmt: skip
                self.need_snapshot = True
            if err is None and self.metrics is not None:
                self.metrics.model_log_publish_lag.observe(time.time() - committed_at)
            if err is None and on_acked is not None:
                on_acked(kafka_io.position(msg)[1])

        self._produce(MARKER_KEY, m.encode(), acked)

    def snapshot(
        self, state: ModelState, info: CommitInfo | None = None, replaced: bool = False
    ) -> None:
        """Every row of the live generation, between a BEGIN record and a snapshot marker."""
        with self._direct():
            self._snapshot(state, info, replaced)

    def _snapshot(self, state: ModelState, info: CommitInfo | None, replaced: bool) -> None:
        t0 = time.perf_counter()
        if self.seen is None:
            self.seen = SeenIndex(confidence_items(state.confidence)[0])
        self.failed = 0
        self.chunked, self.want_snapshot = None, False  # this one covers it
        got: list[int] = []

        def begun(err: KafkaError | None, msg: Message) -> None:
            if err is None:
                got.append(kafka_io.position(msg)[1])
            else:
                self._delivered(err, msg)

        if self.snapshot_at:  # not the first: the topic may have gone (a broker that forgot it)
            ensure_topic(self.settings.kafka, self.topic)
        before = self.bytes_since
        self._produce(*begin_record(self.seq, self.gen, state.users.n, state.items.n), begun)
        self.producer.flush(SNAPSHOT_RETRY_S)
        if not got:
            self.need_snapshot = True
            raise RuntimeError("the broker did not acknowledge the snapshot's first record")
        for k, v in snapshot_records(state, self.gen, self.seen):
            self._produce(k, v)
        users = state.users
        self.dirty[:] = False
        self.t_dirty[:] = False
        self._published(state.items, np.arange(state.items.n))
        self.n_published_items = state.items.n
        self.next_items = time.monotonic() + self.settings.model_log_item_seconds
        self.snap_offset, self.snap_side = got[0], None
        self._marker(state, info, snapshot=True)
        if replaced and self.gen > 0:
            # the replaced generation's rows: tombstones, so compaction drops them (readers
            # built the new one from this snapshot and ignore tombstones)
            for u in range(users.n):
                self._produce(user_key(self.gen - 1, u), None)
            for i in range(state.items.n):
                self._produce(item_key(self.gen - 1, i), None)
            for i in filled_rows(state.transitions.succ, state.items.n).tolist():
                self._produce(trans_key(self.gen - 1, i), None)
            self._marker(state, None)
            self._tombstone_side(state)
        self.snapshot_bytes = self.bytes_since - before
        self.bytes_since = 0
        self.snapshot_at = time.time()
        self.need_snapshot = False
        if self.metrics is not None:
            self.metrics.model_log_snapshot_bytes.set(self.snapshot_bytes)
            self.metrics.model_log_snapshot_time.set(self.snapshot_at)
        log.info("model log snapshot: generation %d, %d users, %d items, %.1f MB in %.2f s",
                 self.gen, users.n, state.items.n, self.snapshot_bytes / 1e6,
                 time.perf_counter() - t0)  # fmt: skip

    def _snapshot_slice(self, state: ModelState) -> None:
        """The periodic snapshot, on the snapshot topic (`topics.model_snapshots`) by a
        producer of its own, a slice per loop turn (between commits). On the model topic, its
        slices (48 MB at 100k users x 50k items) were read through by every tailing reader
        and queued every commit behind them: the freshness p99 was the snapshot's.

        It begins with a marker on the model topic (the tail point) and a BEGIN record on the
        snapshot topic; each row goes out at its value when its slice is taken; a marker with
        `snapshot` true ends it there. Once that is acknowledged, a marker on the model topic
        names it (`snap_topic`, `snap_begin`) and the tail point (`snap`). A reader applies the
        snapshot, then every record from the tail point: rows are whole values, and a row a
        commit changed after the tail point has its latest value in the tail (user rows go out
        with every commit; item and transition rows stay marked, and their flushes go on as
        usual), so the last value applied of each row is the one a reader tailing all along
        holds; a row with nothing in the tail is at its snapshot value, which is the log's (or,
        for an item row still marked, the store's newer one, sent in the tail later)."""
        ch = self.chunked
        if ch is None:
            self.want_snapshot = False
            if self.side is None:
                self.side = self._side_producer()
            ch = self.chunked = _Chunked(state.users.n, min(state.items.n,
                                                            self.n_published_items))  # fmt: skip
            ch.seq, ch.version, ch.events = self.seq, state.model_version, state.events_applied
            ch.clock = float(state.clock[0])
            ch.offsets = dict(self.offsets)

            def failed(err: KafkaError | None, _msg: Message) -> None:
                if err is not None:
                    ch.failed = str(err)

            def begun(err: KafkaError | None, msg: Message) -> None:
                failed(err, msg)
                if err is None:
                    ch.begun.append(kafka_io.position(msg)[1])

            ch.on_failed = failed
            self._marker(state, None, on_acked=ch.tail.append)  # before every later commit
            self._produce(*begin_record(self.seq, self.gen, ch.n_users, ch.n_items), begun,
                          side=True)  # fmt: skip
            self._produce(CONFIG_KEY, state.config.model_dump_json().encode(), failed,
                          side=True)  # fmt: skip
            self.side_gens.add(self.gen)
            return
        if not ch.done:
            self._slices(state, ch)
            return
        if not ch.ended:

            def ended(err: KafkaError | None, msg: Message) -> None:
                ch.on_failed(err, msg)
                if err is None:
                    ch.end.append(kafka_io.position(msg)[1])

            end = Marker(
                seq=ch.seq, gen=self.gen, version=ch.version, events=ch.events, clock=ch.clock,
                n_users=ch.n_users, n_items=ch.n_items, offsets=ch.offsets,
                snapshot=True, at=time.time(), epoch=self.epoch,
            )  # fmt: skip
            self._produce(MARKER_KEY, end.encode(), ended, side=True)
            ch.ended = time.monotonic()
            return
        if ch.failed or time.monotonic() - ch.ended > SIDE_ACK_S:
            # the model topic lost nothing: its last snapshot stays the one to start from
            log.warning("a periodic model log snapshot was not taken (%s): trying again in "
                        "%.0f s", ch.failed or "not acknowledged",
                        self.settings.model_log_snapshot_min_seconds)  # fmt: skip
            self.chunked = None
            self.snapshot_at = time.time()
            self._count_error()
            return
        if not (ch.begun and ch.tail and ch.end):
            return  # acknowledgements under way
        self.chunked = None
        self.snap_offset, self.snap_side = ch.tail[0], ch.begun[0]
        self._marker(state, None)  # names it: starting readers begin there from now on
        self.snapshot_bytes = ch.bytes
        self.bytes_since = 0
        self.snapshot_at = time.time()
        if self.metrics is not None:
            self.metrics.model_log_snapshot_bytes.set(self.snapshot_bytes)
            self.metrics.model_log_snapshot_time.set(self.snapshot_at)
        log.info("model log snapshot (on %r at %d, tail from %d): generation %d, %d users, "
                 "%d items, %.1f MB over %.2f s", self.snap_topic, ch.begun[0], ch.tail[0],
                 self.gen, ch.n_users, ch.n_items, ch.bytes / 1e6,
                 time.monotonic() - ch.started)  # fmt: skip

    def _slices(self, state: ModelState, ch: _Chunked) -> None:
        """Rows of the periodic snapshot for at most `SNAPSHOT_SLICE_S` (users, items, then
        transition rows that hold any), each at its value now."""
        assert self.seen is not None
        end = time.perf_counter() + SNAPSHOT_SLICE_S
        t = state.transitions
        cb = ch.on_failed
        while time.perf_counter() < end and not ch.done:
            if ch.user < ch.n_users:
                lo = ch.user
                hi = ch.user = min(lo + SNAPSHOT_SLICE_ROWS, ch.n_users)
                records = user_records(state.users, self.gen, self.seen, range(lo, hi),
                                       last=t.last)  # fmt: skip
            elif ch.item < ch.n_items:
                lo = ch.item
                hi = ch.item = min(lo + SNAPSHOT_SLICE_ROWS, ch.n_items)
                records = item_records(state.items, self.gen, range(lo, hi))
            else:
                lo = ch.trans
                hi = ch.trans = min(lo + SNAPSHOT_SLICE_ROWS, ch.n_items)
                rows = lo + filled_rows(t.succ[lo:hi], hi - lo)
                records = transition_records(t.succ, t.logw, self.gen, rows.tolist())
            for k, v in records:
                self._produce(k, v, cb, side=True)
                ch.bytes += len(k) + len(v)

    def _side_producer(self) -> Any:
        s = self.settings
        return kafka_io.producer(
            s.kafka,
            None,
            # order is the format here too (BEGIN first, the marker last); see __init__
            **{
                "enable.idempotence": False,
                "max.in.flight.requests.per.connection": 1,
                "linger.ms": 20,
                "compression.type": s.model_log_compression,
                "queue.buffering.max.messages": 2_000_000,
            },
        )

    def _tombstone_side(self, state: ModelState) -> None:
        """Tombstones on the snapshot topic for the rows a replaced generation has there."""
        old = sorted(g for g in self.side_gens if g != self.gen)
        if not old:
            return
        if self.side is None:  # rows written before a restart
            self.side = self._side_producer()
        cb = self._side_delivered
        for g in old:
            for u in range(state.users.n):
                self._produce(user_key(g, u), None, cb, side=True)
            for i in range(state.items.n):
                self._produce(item_key(g, i), None, cb, side=True)
                self._produce(trans_key(g, i), None, cb, side=True)
            self.side_gens.discard(g)

    @staticmethod
    def _side_delivered(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:  # a row compaction keeps a while longer; nothing reads it
            log.debug("a tombstone on the model snapshot topic was not delivered: %s", err)

    def close(self) -> None:
        self.defer = False
        self.release()
        ok = self._started and not self.need_snapshot and not self.failed
        if ok and self.last_state is not None and self._any_dirty() and self.seq:
            try:
                self._flush_items(self.last_state, force=True)
                self._marker(self.last_state, None)
            except (KafkaException, BufferError) as exc:
                log.warning("could not flush the model log's item rows: %s", exc)
        self._report()
        if self.side is not None:  # a snapshot under way is not named by any marker: dropped
            kafka_io.close_producer(self.side, 5.0)
        left = kafka_io.close_producer(self.producer, 10.0)
        if left:
            log.warning("%d model log record(s) not delivered at stop: the next start "
                        "publishes a snapshot", left)  # fmt: skip


#: a periodic snapshot's slice: rows are encoded and handed to the producer for at most this
#: long per loop turn (a turn then costs the freshness of its events at most this much more)
SNAPSHOT_SLICE_S = 0.01
GRAM_WANTED_S = 60.0  # how long after a fold-in request V^T V is kept ready (`wants_gram`)
SNAPSHOT_SLICE_ROWS = 256
#: a periodic snapshot whose records are not all acknowledged this long after its last one
#: was handed over is given up (and tried again later)
SIDE_ACK_S = 60.0


class _Chunked:
    """A periodic snapshot under way: rows below `n_users` / `n_items` as of its BEGIN, the
    next of each to send (users, items, then transition rows), the commit it began at, and the
    offsets acknowledged: its tail point on the model topic, its BEGIN and its end marker on the
    snapshot topic."""

    def __init__(self, n_users: int, n_items: int) -> None:
        self.n_users, self.n_items = n_users, n_items
        self.user = self.item = self.trans = 0
        self.bytes = 0
        self.started = time.monotonic()
        self.seq = self.version = self.events = 0
        self.clock = 0.0
        # the source offsets of its tail point: its end marker carries them, so that a reader
        # starting from it applies every commit of the tail (none is behind it)
        self.offsets: dict[str, int] = {}
        self.tail: list[int] = []
        self.begun: list[int] = []
        self.end: list[int] = []
        self.ended = 0.0  # when its end marker was handed over
        self.failed = ""  # why a record of it was not delivered
        self.on_failed: Callable[[KafkaError | None, Message], None] = lambda _e, _m: None

    @property
    def done(self) -> bool:
        return (
            self.user >= self.n_users and self.item >= self.n_items and (self.trans >= self.n_items)
        )


#: a serving replica hands freed heap back to the OS at most this often: commits and requests
#: free memory in both malloc arenas that glibc otherwise keeps resident (13.6 MB of a 100k x
#: 50k replica's 176 MB anonymous, seconds after its catch-up); a trim that has little to give
#: back takes microseconds, after a catch-up ~9 ms
TRIM_S = 10.0


def trim_heap() -> None:
    """Return freed heap to the OS (glibc keeps it otherwise): after the catch-up the process
    holds the model, not the bytes it was read from."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---- the query side -------------------------------------------------------------------------


def read_snapshot(
    c: Any,
    reader: ModelReader,
    marker: Marker,
    stop: threading.Event | None = None,
) -> str:
    """Feed `reader` the snapshot a marker names on the snapshot topic, from its BEGIN to its
    own end marker and nothing after it (a later snapshot may be under way there). Returns ""
    once the reader serves it, else why not (the caller looks for the log's end again)."""
    topic, begin = marker.snap_topic, marker.snap_begin
    if topic is None or begin is None:
        return "the marker names no snapshot topic"
    c.assign([TopicPartition(topic, PARTITION, begin)])
    quiet_until = time.monotonic() + FIRST_FETCH_S
    first = True
    try:
        while time.monotonic() < quiet_until and not (stop is not None and stop.is_set()):
            msgs = kafka_io.drain(c, 5000, 0.1)
            if msgs:
                quiet_until = time.monotonic() + FIRST_FETCH_S
            for m in msgs:
                if m.error() is not None:
                    continue
                if first and (m.offset() != begin or m.key() != BEGIN_KEY):
                    # compacted or deleted: the updater's next snapshot will be named
                    return f"no snapshot at {topic!r} offset {begin} (found {m.offset()})"
                first = False
                if reader.skips_next():
                    continue
                try:
                    rec = decode(m.key(), m.value())
                except LogFormatError as exc:
                    reader.skipped += 1
                    log.warning("skipping model snapshot record at %s offset %d: %s", topic,
                                m.offset(), exc)  # fmt: skip
                    continue
                reader.feed(rec)
                if rec.kind == "marker" and rec.value.snapshot:
                    if reader.live is None or reader.building is not None:
                        return f"the snapshot at {topic!r} offset {begin} is incomplete"
                    return ""
        return f"the snapshot at {topic!r} offset {begin} ended early"
    finally:
        c.unassign()


class ModelFollower:
    """Follows the model log on a thread of its own and keeps `reader.served` current."""

    def __init__(
        self,
        settings: QuerySettings,
        metrics: Any = None,
        on_applied: Callable[[list[Marker], float], None] | None = None,
    ) -> None:
        self.settings = settings
        self.topic = settings.topics.model
        self.metrics = metrics
        self.on_applied = on_applied
        self.reader = ModelReader()
        self.ready = threading.Event()
        self.target = 0  # the log's end when the follower started: ready once read past it
        self.position = 0
        self.started = time.monotonic()
        self.started_at = time.time()  # commits published since count towards freshness
        self.idle_since: float | None = None
        self.catch_up_seconds: float | None = None
        self.trimmed = 0.0  # when the heap was last handed back (`TRIM_S`)
        self.skipped = 0
        self.first_offset: int | None = None  # the first offset read (tests: never below snap)
        self.snap: int | None = None
        self.snap_from = ""  # where the snapshot was read, when on the snapshot topic
        self.waiting = ""
        self.gram_wanted = float("-inf")  # `wants_gram`
        self._stop = threading.Event()
        self.consumer = kafka_io.consumer(
            settings.kafka,
            f"{settings.group_id}-model-{uuid.uuid4().hex[:8]}",
            on_error=(metrics.errors.labels("broker").inc if metrics is not None else None),
            # a snapshot is read as fast as it is applied: a small prefetch queue keeps the
            # process lean (the shared default holds up to 256 MB of fetched records)
            **{
                "fetch.wait.max.ms": settings.model_log_fetch_wait_ms,
                "enable.partition.eof": False,
                "queued.max.messages.kbytes": 16 * 1024,
                "max.partition.fetch.bytes": 4 << 20,
                "fetch.max.bytes": 8 << 20,
            },
        )
        self.thread = threading.Thread(target=self._run, name="model-log", daemon=True)

    @property
    def served(self) -> Any:
        return self.reader.served if self.ready.is_set() else None

    def start(self) -> ModelFollower:
        self.thread.start()
        return self

    def status(self) -> str:
        """Why no model is served yet, for the error reply."""
        if self.reader.live is None:
            return (
                f"no model yet: the model log {self.topic!r} holds no snapshot; start the "
                "updater (it publishes the model)"
            )
        return (
            f"the model is not caught up yet (read to offset {self.position} of "
            f"{self.target}): retry shortly"
        )

    def _start(self) -> int:
        """The offset on the model topic to read on from: the latest snapshot the last marker
        names, or, when that one is on the snapshot topic, its tail point once it is read."""
        while not self._stop.is_set():
            marker = self._locate()
            if marker is None or marker.snap is None:
                break
            if marker.snap_topic is None:  # on the model topic (a swap's, the first; old logs)
                return marker.snap
            why = read_snapshot(self.consumer, self.reader, marker, self._stop)
            if not why:
                self.snap_from = f"; the snapshot from {marker.snap_topic!r} at {marker.snap_begin}"
                return marker.snap
            log.warning("%s: looking for the model log's end again", why)
            self.reader = ModelReader()
            self._stop.wait(0.5)
        return 0

    def _locate(self) -> Marker | None:
        """The log's last marker, once it names a snapshot (None: stopped)."""
        while not self._stop.is_set():
            marker, end = find_last_marker(self.consumer, self.topic)
            if marker is not None and marker.snap is not None:
                self.target, self.snap = end, marker.snap
                self.waiting = ""
                return marker
            why = "holds no snapshot yet" if end == 0 or marker is None else "has no snapshot"
            if why != self.waiting:
                log.info("waiting for the model log %r: it %s; start the updater (it "
                         "publishes the model)", self.topic, why)  # fmt: skip
                self.waiting = why
            self._stop.wait(0.5)
        return None

    def _run(self) -> None:
        try:
            start = self._start()
            if self._stop.is_set():
                return
            self.consumer.assign([TopicPartition(self.topic, PARTITION, start)])
            self.position = start
            while not self._stop.is_set():
                msgs = kafka_io.drain(self.consumer, 5000, 0.1)
                if msgs:
                    self.idle_since = None
                    self._apply(msgs)
                elif not self.ready.is_set() and self.reader.served is not None:
                    # nothing more to read for a while: the watermark overstated the end
                    now = time.monotonic()
                    self.idle_since = self.idle_since or now
                    self._check_ready(force=now - self.idle_since > 2.0)
        except Exception as exc:  # never let the thread die silently: say why and stop serving
            log.exception("the model log follower stopped: %s", exc)
            if self.metrics is not None:
                self.metrics.errors.labels("model_log").inc()

    def _apply(self, msgs: list[Message]) -> None:
        t0 = time.perf_counter()
        reader = self.reader
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("model log consumer error: %s", err)
                continue
            offset = kafka_io.position(m)[1]
            if self.first_offset is None:
                self.first_offset = offset
            self.position = offset + 1
            if reader.skips_next():  # a snapshot slice of rows the served model has
                continue
            try:
                reader.feed(decode(m.key(), m.value()))
            except LogFormatError as exc:  # unreadable, or not of this model's shape
                self.skipped += 1
                log.warning("skipping model log record at offset %d: %s", m.offset(), exc)
                if self.metrics is not None:
                    self.metrics.model_log_skipped.inc()
        changed = reader.publish()
        took = time.perf_counter() - t0
        applied = reader.take_applied()
        if changed and self.on_applied is not None:
            self.on_applied(applied, took)
        self._fold_in_ready()
        self._check_ready()
        now = time.monotonic()
        if self.ready.is_set() and now - self.trimmed >= TRIM_S:
            self.trimmed = now
            trim_heap()

    def wants_gram(self) -> None:
        """A fold-in was asked (`recommend_anonymous`): for `GRAM_WANTED_S` from now V^T V is
        recomputed here after each change of item rows, not by the next such request."""
        self.gram_wanted = time.monotonic()

    def _fold_in_ready(self) -> None:
        """After item rows changed (the reader dropped V^T V), compute it on this thread while
        fold-ins are being asked: ~40 ms at 50k x 64 once a second at most (item rows go out
        every `model_log_item_seconds`), which the first fold-in after each change paid on the
        request path. Only this thread writes the rows, so it reads them safely unlocked."""
        served = self.reader.served
        if (
            served is None
            or served.view.has_gram
            or time.monotonic() - self.gram_wanted > GRAM_WANTED_S
        ):
            return
        served.view.gram  # noqa: B018 (computed and cached on the view requests read)

    def _check_ready(self, force: bool = False) -> None:
        if self.ready.is_set() or self.reader.served is None:
            return
        if self.position >= self.target or force:
            self.catch_up_seconds = time.monotonic() - self.started
            self.ready.set()
            served = self.reader.served
            log.info("model caught up in %.2f s: commit %d, generation %d, %d users, %d items; "
                     "read from offset %s (the latest snapshot, at %s) to %d%s",
                     self.catch_up_seconds, served.marker.seq, served.marker.gen,
                     served.marker.n_users, served.marker.n_items, self.first_offset, self.snap,
                     self.position, self.snap_from)  # fmt: skip
            if self.metrics is not None:
                self.metrics.model_log_catch_up.set(self.catch_up_seconds)
            # requests read the model from now on: a commit waiting for its marker stays
            # decoded (decoding it under the model's lock would hold them up) unless a backlog
            self.reader.pending.spill = PendingRows.SERVING_SPILL
            self.trimmed = time.monotonic()
            trim_heap()  # hand back what reading the snapshot used (a snapshot's bytes)

    def lag(self) -> int:
        try:
            _lo, hi = self.consumer.get_watermark_offsets(
                TopicPartition(self.topic, PARTITION), cached=True
            )
        except Exception:
            return 0
        return max(0, hi - self.position)

    def close(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(10.0)
        try:
            self.consumer.close()
        except Exception as exc:
            log.debug("model log consumer close: %s", exc)


def read_model(kafka: KafkaSettings, topic: str, settle: float = 1.0) -> tuple[ModelReader, int]:
    """A fresh reader materialised from the log as it is now (tests, benches, tools): from the
    snapshot the last marker names (on the snapshot topic, if it names one) to the end. Returns
    it and the first offset it read on the model topic."""
    c = kafka_io.consumer(kafka, f"read-model-{uuid.uuid4().hex[:8]}")
    reader = ModelReader()
    try:
        marker, end = find_last_marker(c, topic)
        if marker is None or marker.snap is None:
            return reader, -1
        if marker.snap_topic is not None:
            why = read_snapshot(c, reader, marker)
            if why:
                raise RuntimeError(f"cannot read the model log's latest snapshot: {why}")
        first = -1
        c.assign([TopicPartition(topic, PARTITION, marker.snap)])
        quiet_until = time.monotonic() + FIRST_FETCH_S
        deadline = time.monotonic() + 300.0
        pos = marker.snap
        while (pos < end or time.monotonic() < quiet_until) and time.monotonic() < deadline:
            got = c.consume(5000, 0.1)
            for m in got:
                if m.error() is not None:
                    continue
                offset = kafka_io.position(m)[1]
                first = offset if first < 0 else first
                pos = offset + 1
                if reader.skips_next():
                    continue
                try:
                    reader.feed(decode(m.key(), m.value()))
                except LogFormatError:
                    reader.skipped += 1
            if got:
                quiet_until = time.monotonic() + settle
        reader.publish()
        return reader, first
    finally:
        c.close()
