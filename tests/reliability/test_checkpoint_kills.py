"""Checkpointed durability under SIGKILL (issue 14): the updater writes its store every
`checkpoint_seconds` (0.5 s here) while the model log carries every batch at once, so a kill
leaves the log ahead of the store and the restart replays from the checkpoint.

One partition, deterministic ALS rebuilds every 2,500 events (each one checkpoints first), a
stream flowing at 1k events/s, 12 SIGKILLs: some just before a checkpoint is due (the most a
crash replays), some a few ms after it is due (inside or right after its write), the rest at
random. A model log reader (a query process's follower, in this process) follows throughout.
At the end: the store's offsets are the log's end, its applied count is the valid events and
its state is bit-identical to one uninterrupted pass; the reader never applied a commit twice
nor went back, skipped the replays' commits it already held, and its model equals the store's.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from consumers.model_log import ModelFollower
from consumers.processes import ManagedProcess
from consumers.settings import KafkaSettings, MetricsSettings, QuerySettings, TopicSettings
from stream_mf.model_log import Marker
from stream_mf.state import ModelState
from stream_mf.store import StateStore
from tests.integration.conftest import Cluster, make_topics
from tests.reliability.harness import StreamPublisher, event_payloads
from tests.reliability.test_poison_pills import _dead_letters
from tests.reliability.test_restore import (
    ARGS,
    DETERMINISTIC,
    _drain,
    _metric,
    _reference,
    _same,
)
from tests.synthetic import planted_stream

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_EVENTS = 24_000
RATE = 1000.0
CHECKPOINT_S = 0.5
ENV = {
    **DETERMINISTIC,
    "STREAM_MF_LEARNER_SNAPSHOT_SECONDS": "600",  # checkpoints by time, not by snapshots
    "STREAM_MF_CHECKPOINT_SECONDS": str(CHECKPOINT_S),
    # live batches (tens of events) learn on the loop's thread, replays (500) on the worker,
    # overlapped with the next batch's fetch (the pipeline): both must replay bit-identically
    "STREAM_MF_PIPELINE_MIN_EVENTS": "200",
}
#: kill -> seconds before the next checkpoint is due (negative: after it is due)
AIM = {1: 0.03, 2: -0.004, 4: 0.01, 5: -0.01, 7: 0.02, 8: -0.002, 10: 0.005}
KILLS = 12


def _at_checkpoint(c: Cluster, proc: ManagedProcess, pub: StreamPublisher, lead: float) -> bool:
    """Wait for a checkpoint, then until `lead` seconds before the next is due. False if none
    came in 20 s (the kill is then a random one)."""
    end = time.monotonic() + 20
    first = None
    while time.monotonic() < end:
        assert proc.alive(), f"the updater died on its own:\n{proc.log_tail()}"
        pub.poll()
        at = _metric(c, "updater", "stream_mf_checkpoint_timestamp_seconds")
        if at:
            if first is None:
                first = at
            elif at != first:
                while time.time() < at + CHECKPOINT_S - lead:
                    time.sleep(0.001)
                return True
        time.sleep(0.01)
    return False


class _LogReader:
    """A model log follower in this process: every marker it applies, in order."""

    def __init__(self, kafka: str, topics: TopicSettings) -> None:
        self.applied: list[Marker] = []
        settings = QuerySettings(kafka=KafkaSettings(bootstrap_servers=kafka), topics=topics,
                                 metrics=MetricsSettings(port=-1))  # fmt: skip
        self.follower = ModelFollower(settings, on_applied=lambda ms, _t: self.applied.extend(ms))

    def problems(self, key: str) -> list[str]:
        """Applied markers whose source offsets go back, or a commit of events applied twice."""
        out = []
        last = -1
        for m in self.applied:
            o = m.offsets.get(key, 0)
            if o < last or (m.count and o == last):
                out.append(f"commit {m.seq} at offset {o} after {last} (events {m.count})")
            last = max(last, o)
        return out

    def differs(self, state: ModelState, ends: dict[str, int], wait: float) -> list[str]:
        """The reader's model against the store's, once it has applied the last marker."""
        end = time.monotonic() + wait
        r = self.follower.reader
        while time.monotonic() < end:
            live = r.live
            m = live.marker if live is not None else None
            if m is not None and m.offsets == ends and m.pending_items == 0:
                break
            time.sleep(0.1)
        live = r.live
        if live is None or live.marker is None:
            return ["the reader holds no model"]
        out = [] if live.marker.offsets == ends else [f"at {live.marker.offsets}, not {ends}"]
        for kind, a, b in (("user", live.users, state.users), ("item", live.items, state.items)):
            if a.n < b.n or list(a.ids[: b.n]) != list(b.ids[: b.n]):
                out.append(f"{kind} ids differ")
                continue
            for name in ("factors", "count", "last") + (("bias",) if kind == "item" else ()):
                if getattr(a, name)[: b.n].tobytes() != getattr(b, name)[: b.n].tobytes():
                    out.append(f"{kind} {name}")
        return out


@pytest.mark.timeout(300)
def test_kills_at_checkpoints_replay_bit_identically_and_readers_never_go_back(
    kafka: str, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    topics = make_topics(kafka, partitions=1)
    c = Cluster(kafka, topics, tmp_path)
    s = planted_stream(N_EVENTS, 3000, 1500, n_groups=8, seed=17)
    payloads, valid = event_payloads(s.users.tolist(), s.items.tolist(), s.times.tolist(), 300)
    pub = StreamPublisher(kafka, topics.interactions, payloads, valid, rate=RATE).start()
    reader = _LogReader(kafka, topics)
    reader.follower.start()
    rng = np.random.default_rng(23)
    aimed = 0
    try:
        proc = c.start("updater", "updater", *ARGS, env=ENV)
        for k in range(KILLS):
            if k in AIM and _at_checkpoint(c, proc, pub, AIM[k]):
                aimed += 1
            else:
                until = time.monotonic() + float(rng.uniform(0.5, 3.0))
                while time.monotonic() < until:
                    assert proc.alive(), proc.log_tail()
                    pub.poll()
                    time.sleep(0.02)
            proc.kill()
            c.procs.remove(proc)
            proc = c.start("updater", "updater", *ARGS, env=ENV)
        ends = _drain(c, proc, pub)
        # the store may hold the end already (the killed one checkpointed it): the last updater
        # must be up before a stop request, which would otherwise just end its start-up
        end = time.monotonic() + 60
        while _metric(c, "updater", "stream_mf_events_applied_total") is None:
            assert proc.alive() and time.monotonic() < end, proc.log_tail()
            time.sleep(0.1)
        log = (tmp_path / "updater.log").read_text()
        assert proc.stop() == 0, proc.log_tail()
        c.procs.remove(proc)
        with StateStore(c.state) as store:
            state = store.load()
            assert store.offsets() == ends
        assert state.events_applied == sum(valid)
        ref = _reference([v for _, v in payloads])
        assert not _same(ref, state), _same(ref, state)
        assert aimed >= 5, aimed
        assert "replaying without publishing until past it" in log, log[-3000:]
        key = f"{topics.interactions}/0"
        assert not reader.problems(key), reader.problems(key)[:5]
        assert len(reader.applied) > 20
        differ = reader.differs(state, {f"{t}/{p}": o for (t, p), o in ends.items()}, 60)
        assert not differ, differ
        # dead letters of replayed batches were read back, not sent again
        bad = len(valid) - sum(valid)
        dlt = _dead_letters(kafka, topics.dead_letter, bad)
        origins = [dict(m.headers() or [])["original.offset"] for m in dlt]
        assert len(origins) == bad and len(set(origins)) == bad, (len(origins), bad)
        print(f"\ncheckpoint kills, 1 partition: {N_EVENTS} events, {KILLS} kills ({aimed} "
              f"aimed at a checkpoint), {log.count('replaying without publishing')} replays "
              f"held back, {reader.follower.reader.replayed} replayed commits skipped by the "
              f"reader; bit-identical; {time.monotonic() - t0:.0f} s")  # fmt: skip
    finally:
        reader.follower.close()
        pub.stop(5.0)
        c.stop_all()
