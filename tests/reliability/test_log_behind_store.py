"""The model log behind the store, made to happen (issue 12, crash consistency).

A SIGKILL between a store write and the model log's acknowledgement of it must not leave the
log behind the store for good. With checkpoints that window is short (the log is normally
*ahead* of the store), so a random kill rarely lands in it; this test puts the updater there
on purpose:

1. a backlog is published, the updater starts on it, and its consumer prefetches far ahead;
2. the broker is paused (SIGSTOP: connections stay open, nothing is acknowledged); the updater
   learns what it had prefetched, queues each batch's model-log records in its producer, and,
   once it has nothing left to read, checkpoints: the store now holds commits the log lacks;
3. the updater is SIGKILLed (its producer's queue dies with it) and the broker resumed.

The restarted updater must find the log behind (it logs the commit the log is at and the
store's), publish a snapshot, and read on; at the end a fresh reader of the log equals the
store bit for bit and the store applied every valid event exactly once.
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path

import pytest

from consumers.local_broker import EmbeddedBroker
from consumers.processes import metric_sum, scrape
from stream_mf.store import StateStore
from tests.integration.conftest import Cluster, make_topics
from tests.reliability.harness import StreamPublisher, event_payloads, log_model_mismatches
from tests.synthetic import planted_stream

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

BACKLOG = 300_000
AFTER = 6_000  # published once the broker is back: the restarted updater reads on
# small batches: the prefetched backlog takes many commits to learn, each one queued in the
# log's producer while the broker is paused
ARGS = ("--max-batch-events", "2000", "--max-batch-seconds", "0.05")
BEHIND = re.compile(r"the model log is (?:empty|at commit (\d+)), the store at commit (\d+)")


def _metric(c: Cluster, name: str) -> float | None:
    try:
        return metric_sum(scrape(c.url("updater"), timeout=0.5), name)
    except OSError:
        return None


def test_kill_with_the_log_behind_the_store_republishes(tmp_path: Path) -> None:
    t0 = time.monotonic()
    broker = EmbeddedBroker().start()
    c: Cluster | None = None
    pubs: list[StreamPublisher] = []
    try:
        kafka = broker.bootstrap_servers
        topics = make_topics(kafka, partitions=1)
        c = Cluster(kafka, topics, tmp_path)
        s = planted_stream(BACKLOG + AFTER, 2000, 800, n_groups=6, seed=53)
        # no hostile records: a batch with dead letters waits for their acknowledgement, which
        # a paused broker never gives (test_poison_pills covers them)
        payloads, valid = event_payloads(s.users.tolist(), s.items.tolist(), s.times.tolist())
        first = StreamPublisher(
            kafka, topics.interactions, payloads[:BACKLOG], valid[:BACKLOG], rate=1e9
        )
        pubs.append(first.start())
        assert first.finish(60.0) == 0, "the backlog was not acknowledged"

        proc = c.start("updater", "updater", *ARGS)
        end = time.monotonic() + 90
        # paused once the first snapshot is acknowledged (a fresh updater publishes one when
        # its look-up of the log finds it empty, and waits for it) and learning is under way
        while (_metric(c, "stream_mf_events_applied_total") or 0) < 4_000 or not _metric(
            c, "stream_mf_model_log_snapshot_timestamp_seconds"
        ):
            assert proc.alive(), proc.log_tail()
            assert time.monotonic() < end, "the updater never started on the backlog"
            time.sleep(0.01)

        broker.pause()
        try:
            paused = time.monotonic()
            applied_at_pause = _metric(c, "stream_mf_events_applied_total") or 0.0
            checkpoints_at_pause = _metric(c, "stream_mf_checkpoints_total") or 0.0
            # learning goes on from the consumer's prefetched queue; once it runs dry the loop
            # idles, and an idle turn checkpoints
            last, still_since = applied_at_pause, time.monotonic()
            while True:
                assert proc.alive(), proc.log_tail()
                assert time.monotonic() - paused < 25, "no checkpoint while the broker was paused"
                applied = _metric(c, "stream_mf_events_applied_total") or 0.0
                if applied != last:
                    last, still_since = applied, time.monotonic()
                checkpoints = _metric(c, "stream_mf_checkpoints_total") or 0.0
                if checkpoints > checkpoints_at_pause and time.monotonic() - still_since > 0.5:
                    break
                time.sleep(0.05)
            learned_while_paused = last - applied_at_pause
            assert learned_while_paused >= 4 * 2000, (
                f"only {learned_while_paused:.0f} events learned while paused: the consumer "
                "had not prefetched enough to put the store ahead of the log"
            )
            proc.kill()
            c.procs.remove(proc)
        finally:
            broker.resume()

        log_at = (tmp_path / "updater.log").stat().st_size
        proc = c.start("updater", "updater", *ARGS)
        rest = StreamPublisher(
            kafka, topics.interactions, payloads[BACKLOG:], valid[BACKLOG:], rate=2000.0
        )
        pubs.append(rest.start())
        assert rest.finish(60.0) == 0
        ends = {(topics.interactions, 0): BACKLOG + AFTER}
        assert rest.end_offsets == {0: BACKLOG + AFTER}
        n_valid = first.delivered_valid + rest.delivered_valid

        with StateStore(c.state, secondary=tmp_path / "sec") as follower:
            end = time.monotonic() + 90
            while follower.offsets() != ends:
                assert proc.alive(), proc.log_tail()
                assert time.monotonic() < end, "the restarted updater did not catch up"
                time.sleep(0.2)
                follower.catch_up()
        restart_log = (tmp_path / "updater.log").read_text()[log_at:]
        found = BEHIND.search(restart_log)
        assert found is not None, restart_log[-3000:]
        log_commit, store_commit = int(found.group(1) or 0), int(found.group(2))
        assert log_commit < store_commit, found.group(0)

        # a fresh reader of the log equals the store (coalesced item rows go out within their
        # interval: compare until they have)
        deadline = time.monotonic() + 30
        mismatches = ["not compared"]
        while mismatches and time.monotonic() < deadline:
            time.sleep(1.5)
            mismatches = log_model_mismatches(
                kafka, topics.model, c.state, tmp_path / f"sec-{time.monotonic_ns()}"
            )
        assert not mismatches, mismatches
        assert proc.stop() == 0, proc.log_tail()
        c.procs.remove(proc)
        with StateStore(c.state) as store:
            state = store.load()
            assert store.offsets() == ends
        assert state.events_applied == n_valid
        assert int(state.users.count[: state.users.n].sum()) == n_valid
        print(
            f"\nlog behind the store: {learned_while_paused:.0f} events learned while the "
            f"broker was paused; the log at commit {log_commit}, the store at {store_commit}; "
            f"{time.monotonic() - t0:.0f} s"
        )
    finally:
        for p in pubs:
            with contextlib.suppress(Exception):
                p.stop(5.0)
        if c is not None:
            c.stop_all()
        broker.stop()
