"""An updater on an empty or missing state dir: restore the learner from Kafka, or start fresh.

The state dir is disposable: the latest complete learner snapshot (consumers/learner_snapshot.py)
plus a replay of `interactions` from the offsets it stands for give back the model that was
lost, bit for bit (the learner is deterministic however the stream is cut). What is looked at:

- a store holding a model: nothing to restore, it is opened as always;
- a missing dir, an empty one, or a store with no commit yet (a kill before its first commit,
  or before a restore's one commit): the latest complete snapshot is restored in one commit; if
  there is none, the updater starts fresh and says so in one line;
- a dir holding data files but no store RocksDB can open (a copy or restore cut short, a
  store's files moved away): refused with a one-line error saying what to do, never guessed at.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import TopicPartition

from consumers import kafka_io
from consumers.learner_snapshot import find_latest
from consumers.model_log import find_last_marker
from consumers.settings import UpdaterSettings
from stream_mf.config import keep_structural
from stream_mf.learner_snapshot import LearnerSnapshot, SnapshotEnd
from stream_mf.model_log import Marker
from stream_mf.store import StateStore, StoreError
from stream_mf.writes import Restore

log = logging.getLogger(__name__)

#: what RocksDB (and rocksdict: its config file) writes while it creates a store, before
#: CURRENT: a kill in between leaves these, and the store is created again over them
_CREATION = ("LOCK", "IDENTITY", "LOG", "MANIFEST-", "OPTIONS-", ".log", ".dbtmp", "lost+found",
             "rocksdict-config.json")  # fmt: skip


def check_state_dir(path: Path, learner_topic: str) -> None:
    """Refuse a dir that holds data but no openable store (StoreError, one line)."""
    if not path.is_dir() or (path / "CURRENT").exists():
        return
    foreign = sorted(
        p.name
        for p in path.iterdir()
        if not any(p.name.startswith(c) or p.name.endswith(c) for c in _CREATION)
    )
    if foreign:
        raise StoreError(
            f"state dir {path} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''} "
            "but no complete model store (a copy or restore cut short?): move it aside or delete "
            f"it and start again; the updater then restores the latest learner snapshot from "
            f"{learner_topic!r} and replays the events after it"
        )


@dataclass
class Restored:
    """What a restore started from, for the replay's count of events."""

    end: SnapshotEnd
    seconds: float
    log_ends: dict[tuple[str, int], int] = field(default_factory=dict)  # at restore time
    replayed: int = 0
    done: bool = False


def restore_if_empty(
    settings: UpdaterSettings,
    store: StateStore,
    stop: kafka_io.StopFlag | None = None,
    on_error: Callable[[], None] | None = None,
) -> Restored | None:
    """Restore the latest complete learner snapshot into a store with no commit yet (waiting
    for a broker first: "none there" must come from a broker, not from its absence)."""
    if not store.is_new or not settings.restore:
        return None
    topic = settings.topics.learner
    t0 = time.monotonic()
    waited = False
    probe = kafka_io.telling_probe(settings.kafka, on_error)
    while not kafka_io.broker_answers(settings.kafka, 5.0, probe):
        probe.poll(0)  # serves its error and log callbacks: why nothing answers
        if stop:
            return None
        if not waited:
            log.warning("the state dir %s is empty: waiting for a Kafka broker at %s to look for "
                        "a learner snapshot on %r", settings.state_dir,
                        settings.kafka.bootstrap_servers, topic)  # fmt: skip
            waited = True
    snap, end, why = find_latest(settings.kafka, topic)
    if snap is None or end is None:
        log.info("no learner snapshot to restore (%s): starting a fresh model in %s", why,
                 settings.state_dir)  # fmt: skip
        return None
    want = keep_structural(snap.state.config, settings.model).structural()
    have = snap.state.config.structural()
    if want != have:
        raise StoreError(
            f"the latest learner snapshot on {topic!r} was built with {have} but the settings "
            f"ask for {want}: use the stored values, or --no-restore to start a fresh model"
        )
    # the model log may hold commits made after the snapshot: count on from past them, so the
    # commit a reader sees applied never goes back (and the log gets a snapshot of this state);
    # so may a swap (a kill after a flip, before the next learner snapshot's end): the model
    # version and generation readers saw are carried on too, never gone back to
    logged = _last_logged_marker(settings)
    if logged is not None:
        snap = _carried(snap, logged)
    store.apply(snap.state, Restore(snap))
    took = time.monotonic() - t0
    ends = _log_ends(settings, list(snap.offsets))
    behind = sum(max(0, ends.get(k, o) - o) for k, o in snap.offsets.items())
    age = time.time() - end.at
    log.info("restored the learner snapshot of commit %d (%d events, generation %d, model "
             "version %d, %.0f s old, %.1f MB) in %.2f s; replaying about %d message(s) of %r "
             "from its offsets", end.commits, end.events, end.generation, end.model_version, age,
             end.size / 1e6, took, behind, settings.topics.interactions)  # fmt: skip
    return Restored(end, took, ends)


def _carried(snap: LearnerSnapshot, logged: Marker) -> LearnerSnapshot:
    """`snap` counting on from what the model log already showed readers: its commit count,
    model version and generation never below the log's last marker's.

    Why: readers follow the log, and the log can be ahead of the latest learner snapshot (the
    updater died after a commit, a swap too, before the next snapshot was complete). The
    replay redoes those commits; with the default (background) rebuilds it may not redo the
    swap, and with deterministic ones it redoes it one version later (versions then count
    each swap readers were shown, a redone one included)."""
    if logged.seq > snap.commits:
        snap = dataclasses.replace(snap, commits=logged.seq + 1)
    if logged.gen > snap.generation:
        snap = dataclasses.replace(snap, generation=logged.gen)
    if logged.version > snap.state.model_version:
        log.info("the model log already showed model version %d (this snapshot is of version "
                 "%d): the restored model carries on from it", logged.version,
                 snap.state.model_version)  # fmt: skip
        snap.state.model_version = logged.version
    return snap


def _last_logged_marker(settings: UpdaterSettings) -> Marker | None:
    c = kafka_io.consumer(settings.kafka, f"{settings.group_id}-restore-log")
    try:
        marker, _end = find_last_marker(c, settings.topics.model, still=True)
        return marker
    except Exception as exc:  # only the commit count's continuity needs it
        log.warning("cannot read the model log's last commit (%s)", exc)
        return None
    finally:
        c.close()


def _log_ends(
    settings: UpdaterSettings, parts: list[tuple[str, int]]
) -> dict[tuple[str, int], int]:
    """High watermarks of the partitions a snapshot has offsets for (how far the replay goes)."""
    out: dict[tuple[str, int], int] = {}
    c = kafka_io.consumer(settings.kafka, f"{settings.group_id}-restore")
    try:
        for t, p in parts:
            try:
                _lo, hi = c.get_watermark_offsets(TopicPartition(t, p), 5.0, cached=False)
                out[(t, p)] = hi
            except Exception as exc:  # only the replay count needs it
                log.debug("no watermark of %s[%d]: %s", t, p, exc)
    finally:
        c.close()
    return out
