"""A RocksDB write that really fails: the model store's file system runs out of space.

How the failure is made: the store lives on its own small tmpfs (`mount -t tmpfs -o size=16m`),
and once the updater has committed a first batch the test fills that file system with a filler
file until `write(2)` answers ENOSPC. The next micro-batch's WriteBatch needs several pages of
write-ahead log (one factor block alone is 64 rows x 64 floats = 16 KiB), so RocksDB's WAL append
fails with "IO error: No space left on device" and `StateStore.commit` raises `StoreError`.

The tmpfs is kept well below RocksDB's WAL preallocation (about 1.1 x write_buffer_size, 70 MB):
there `fallocate` fails and is ignored, so no WAL space is reserved ahead of the filler.

Why not the alternatives: these tests run as root, and root ignores permission bits, so a
`chmod 0o500` state directory does not stop a single write; a loop device with a real file system
would work too but needs `mkfs` and a loop device for nothing a tmpfs does not already give.

What is checked: the updater stops (exit code 3, `EXIT_STORE`, with the "model store failure"
log line), the offsets in the store are exactly those of before the failure (the failing batch
was not written), Kafka's committed offset is not ahead of the store, and after the filler is
deleted a restart applies every remaining event exactly once: the final state is bit-identical
to one uninterrupted pass over the same events.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from consumers import kafka_io
from consumers.processes import ManagedProcess
from consumers.publish import publish
from consumers.settings import KafkaSettings
from consumers.updater import EXIT_STORE
from stream_mf.config import ModelConfig
from stream_mf.decode import decode_events
from stream_mf.model import EventBatch, OnlineModel
from stream_mf.store import StateStore
from tests.integration.conftest import Cluster

pytestmark = pytest.mark.integration

N_BEFORE = 400  # committed before the disk fills
N_AFTER = 600  # published once it is full: the first of these batches cannot be written
T0 = 1_700_000_000.0


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "16m") -> Iterator[Path]:
    """A private tmpfs at `path`, unmounted afterwards; skips the test where mounting is denied."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs to fill up needs root (CAP_SYS_ADMIN)")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
    try:
        yield path
    finally:
        for args in (["umount", str(path)], ["umount", "-l", str(path)]):
            if subprocess.run(args, capture_output=True, timeout=10).returncode == 0:
                break


def fill_up(fs: Path) -> Path:
    """Write a filler file until the file system has not one free byte left."""
    filler = fs / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            buf = b"\xa5" * chunk
            while True:
                try:
                    os.write(fd, buf)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    st = os.statvfs(fs)
    assert st.f_bavail == 0, f"{st.f_bavail} blocks still free on {fs}"
    return filler


def events(first: int, n: int) -> list[tuple[bytes, bytes]]:
    """Valid, distinct events; users and items keep arriving so every batch adds new rows."""
    out = []
    for j in range(first, first + n):
        user = f"u{j % 97}"
        doc = {
            "user_id": user,
            "item_id": f"i{(j * 7) % 211}",
            "event_type": "click",
            "timestamp": T0 + j,
            "event_id": f"e{j}",
        }
        out.append((user.encode(), orjson.dumps(doc)))
    return out


def send(kafka: str, topic: str, payloads: list[tuple[bytes, bytes]]) -> None:
    producer = kafka_io.producer(KafkaSettings(bootstrap_servers=kafka))
    assert publish(producer, topic, payloads, progress=False) == len(payloads)


def kafka_committed(c: Cluster) -> int:
    """The updater group's committed offset of partition 0 (-1001 if none)."""
    group = f"updater-{c.topics.interactions}"  # the Cluster fixture's group for the updater
    consumer = Consumer(
        {"bootstrap.servers": c.kafka, "group.id": group, "enable.auto.commit": False}
    )
    try:
        (tp,) = consumer.committed([TopicPartition(c.topics.interactions, 0)], timeout=10)
        return int(tp.offset)
    finally:
        consumer.close()


def wait_exit(p: ManagedProcess, timeout: float) -> int:
    assert p.proc is not None
    try:
        return p.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"the updater kept running {timeout}s on a full disk:\n{p.log_tail()}"
        ) from None


def fail_on_full_disk(c: Cluster, fs: Path) -> tuple[ManagedProcess, int, dict, Path]:
    """Commit N_BEFORE events, fill the disk, publish N_AFTER more: the updater must stop.

    Returns the stopped process, its exit code, the store's offsets just before the disk filled
    up, and the filler file."""
    c.state = fs / "state"
    send(c.kafka, c.topics.interactions, events(0, N_BEFORE))
    p = c.start("updater", "updater", "--max-batch-events", "5000")
    c.wait_metric("updater", "stream_mf_events_applied_total", N_BEFORE, timeout=45)
    end = time.monotonic() + 15  # the Kafka commit after the store commit is asynchronous
    while kafka_committed(c) != N_BEFORE and time.monotonic() < end:
        time.sleep(0.1)
    with StateStore(c.state, secondary=c.work / "secondary") as follower:
        before = follower.offsets()
        assert follower.events_applied() == N_BEFORE
    assert before == {(c.topics.interactions, 0): N_BEFORE}
    filler = fill_up(fs)
    send(c.kafka, c.topics.interactions, events(N_BEFORE, N_AFTER))
    code = wait_exit(p, 30)
    return p, code, before, filler


def reference_state(payloads: list[bytes]) -> OnlineModel:
    """One uninterrupted pass over the same bytes, in this process."""
    cfg = ModelConfig()
    dec = decode_events(payloads, cfg.event_types)
    ref = OnlineModel(cfg)
    ref.learn(
        EventBatch.build(
            dec.users,
            dec.items,
            dec.weights,
            dec.times,
            offsets=np.asarray(dec.positions, np.int64),
        )
    )
    return ref


@pytest.mark.timeout(120)
def test_full_disk_stops_the_updater_and_a_restart_loses_nothing(cluster: Cluster) -> None:
    with small_tmpfs(cluster.work / "fs") as fs:
        try:
            p, code, before, filler = fail_on_full_disk(cluster, fs)
            log = p.log_tail(20_000)
            assert code != 0, log
            assert "model store failure, stopping without committing offsets" in log, log
            assert "No space left on device" in log, log
            assert kafka_committed(cluster) <= N_BEFORE  # Kafka is never ahead of the store

            # the cause goes away; the store holds exactly what it held before the failure
            filler.unlink()
            with StateStore(cluster.state) as store:
                assert store.offsets() == before
                assert store.events_applied() == N_BEFORE

            # a restart applies every remaining event, once
            cluster.procs.remove(p)
            p2 = cluster.start("updater", "updater-2", "--max-batch-events", "5000")
            cluster.wait_metric("updater-2", "stream_mf_events_applied_total", N_AFTER, 45)
            time.sleep(0.5)  # nothing more may arrive
            assert cluster.metric("updater-2", "stream_mf_events_applied_total") == N_AFTER
            end = time.monotonic() + 15
            while kafka_committed(cluster) != N_BEFORE + N_AFTER and time.monotonic() < end:
                time.sleep(0.1)
            assert kafka_committed(cluster) == N_BEFORE + N_AFTER
            assert p2.stop() == 0, p2.log_tail()
            with StateStore(cluster.state) as store:
                state = store.load()
                assert store.offsets() == {(cluster.topics.interactions, 0): N_BEFORE + N_AFTER}
            assert state.events_applied == N_BEFORE + N_AFTER
            assert int(state.users.count[: state.users.n].sum()) == N_BEFORE + N_AFTER
            ref = reference_state([v for _, v in events(0, N_BEFORE + N_AFTER)]).state
            assert state.users.ids == ref.users.ids and state.items.ids == ref.items.ids
            for kind in ("users", "items"):
                a, b = getattr(state, kind), getattr(ref, kind)
                for arr in ("factors", "bias", "count", "last", "logpop"):
                    assert np.array_equal(getattr(a, arr)[: a.n], getattr(b, arr)[: b.n]), (
                        kind,
                        arr,
                    )
        finally:
            cluster.stop_all()  # nothing may hold the tmpfs open when it is unmounted


@pytest.mark.timeout(90)
def test_full_disk_exit_code_is_3_with_a_clear_message(cluster: Cluster) -> None:
    with small_tmpfs(cluster.work / "fs") as fs:
        try:
            p, code, _before, _filler = fail_on_full_disk(cluster, fs)
            log = p.log_tail(20_000)
            assert "model store failure, stopping without committing offsets" in log, log
            assert "Traceback" not in log, log
            assert code == EXIT_STORE, log
        finally:
            cluster.stop_all()
