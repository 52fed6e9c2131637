"""Crash anywhere: SIGKILL the updater and the query processes at random points, many times.

A 3-partition stream (with some hostile messages) flows at a steady rate while, for 20+ cycles,
the updater is SIGKILLed at a random moment (during start-up, mid-batch, or while a rebuild is
fitting, guarding, catching up or swapping: rebuilds run every few thousand events) and one of
two query processes is SIGKILLed at another random moment; each is restarted at once. A client
sends requests with a `deadline_ms` budget the whole time.

What must hold afterwards (the product's guarantees, README "Persistence and exactly-once"):
- the store applied every valid event exactly once: `events_applied` and the per-entity counts
  equal the valid events published, and the stored next offsets equal the log end offsets;
- the store loads, holds one complete model generation, and its factors are finite;
- the query service is at-least-once: every request with a generous deadline gets at least one
  reply; a request with a short deadline gets a reply or is dropped and counted as expired; every
  request offset ends up committed; duplicate replies (a process killed after replying but
  before its offsets were auto-committed) answer the same request for the same user.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from consumers.local_broker import kafka_bootstrap
from consumers.processes import ManagedProcess, metric_sum, scrape
from stream_mf.store import MODEL_CFS, StateStore, raw_keys
from tests.integration.conftest import Cluster, make_topics
from tests.reliability.harness import (
    RequestLoad,
    SentRequest,
    StreamPublisher,
    committed_offsets,
    event_payloads,
    log_model_mismatches,
    log_since,
    log_size,
)
from tests.synthetic import planted_stream

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

CYCLES = 20
RATE = 1500.0  # messages/s into `interactions` while the processes are being killed
REBUILD_ENV = {
    # replays (400-event batches) learn overlapped with the next fetch (the pipeline), live
    # batches on the loop's thread
    "STREAM_MF_PIPELINE_MIN_EVENTS": "200",
    "STREAM_MF_REBUILD__EVERY_EVENTS": "1500",
    "STREAM_MF_REBUILD__ITERATIONS": "3",
    "STREAM_MF_REBUILD__GUARD_EVENTS": "50",
    "STREAM_MF_REBUILD__GUARD_TIMEOUT_S": "1",
    "STREAM_MF_REBUILD__GUARD_MARGIN": "1.0",  # swap whatever the guard says: more swaps
    # periodic snapshots (on their own topic) every second or so: kills land inside them, and
    # restarted query processes and the final reader start from them
    "STREAM_MF_MODEL_LOG_SNAPSHOT_RATIO": "0.05",
    "STREAM_MF_MODEL_LOG_SNAPSHOT_MIN_SECONDS": "1",
}
UPDATER_ARGS = ("--max-batch-events", "400", "--max-batch-seconds", "0.05")
LONG_MS = 120_000  # outlives every outage in the test: such a request must be answered
SHORT_MS = 1_500  # shorter than a rebalance: such a request may expire (and be counted)


@pytest.fixture(scope="module")
def own_kafka() -> Iterator[str]:
    with kafka_bootstrap() as bootstrap:
        yield bootstrap


@dataclass
class Kill:
    cycle: int
    who: str
    phase: str
    lifetime: float


def _updater_phase(log: str) -> str:
    """Where a killed updater was, from what it had logged in this lifetime."""
    if "metrics on http" not in log:
        return "startup"
    marks = {
        "rebuild started": "rebuild:fit",
        "rebuild: fit and staged": "rebuild:guard/catch-up",
        "rebuild swapped": "rebuild:after-swap",  # rows left over are re-solved after it
        "rebuild rejected": "streaming",
        "rebuild done": "streaming",
    }
    last, where = -1, "streaming"
    for mark, phase in marks.items():
        at = log.rfind(mark)
        if at > last:
            last, where = at, phase
    return where


def _try_metric(c: Cluster, name: str, metric: str) -> float | None:
    try:
        return metric_sum(scrape(c.url(name), timeout=0.5), metric)
    except OSError:
        return None


class UpdaterLife:
    """One updater lifetime and the moment it is to be killed."""

    def __init__(self, c: Cluster, rng: np.random.Generator, mode: str) -> None:
        self.c, self.mode = c, mode
        self.log_at = log_size(c.work / "updater.log")
        self.proc = c.start("updater", "updater", *UPDATER_ARGS, env=REBUILD_ENV)
        self.started = time.monotonic()
        self.rng = rng
        self.kill_at: float | None = None
        self.up_at: float | None = None  # first time its metrics answered
        if mode == "startup":
            self.kill_at = self.started + float(rng.uniform(0.1, 1.5))
        # "batch": killed while streaming with no rebuild in flight (rebuilds come every 1,500
        # events and take most of an updater's short life, so a random delay rarely hit this)
        self.after_batches = int(rng.integers(1, 6))

    def waited_long(self, now: float) -> bool:
        """No batch or rebuild came: 8 s after the updater was up (on a loaded machine a start
        alone can take that long, so counting from the spawn would kill most lives in start-up),
        and never later than 18 s after the spawn (a cycle must end within 20 s)."""
        up = self.up_at if self.up_at is not None else float("inf")
        return now - up > 8.0 or now - self.started > 18.0

    def due(self) -> bool:
        now = time.monotonic()
        if not self.proc.alive():
            raise AssertionError(f"the updater died on its own:\n{self.proc.log_tail()}")
        if self.kill_at is None:
            running = _try_metric(self.c, "updater", "stream_mf_rebuild_running")
            if running is not None and self.up_at is None:
                self.up_at = now
            if self.mode == "batch":
                batches = _try_metric(self.c, "updater", "stream_mf_batches_total") or 0
                if (batches >= self.after_batches and running == 0) or self.waited_long(now):
                    self.kill_at = now
            elif running == 1:
                self.kill_at = now + float(self.rng.uniform(0.0, 0.8))
            elif self.waited_long(now):  # no rebuild came: kill it anyway
                self.kill_at = now
        return self.kill_at is not None and now >= self.kill_at

    def kill(self, cycle: int) -> Kill:
        self.proc.kill()
        self.c.procs.remove(self.proc)
        phase = _updater_phase(log_since(self.proc.log_path, self.log_at))
        return Kill(cycle, "updater", phase, time.monotonic() - self.started)


def _kill_query(c: Cluster, proc: ManagedProcess) -> float:
    """SIGKILL a query process; returns the requests it had counted as expired."""
    expired = _try_metric(c, proc.name, "stream_mf_requests_expired_total") or 0.0
    if not proc.alive():
        raise AssertionError(f"{proc.name} died on its own:\n{proc.log_tail()}")
    proc.kill()
    c.procs.remove(proc)
    return expired


def _request_maker(known_users: list[str], item: str) -> Any:
    def make(n: int) -> tuple[dict[str, Any], int]:
        budget = LONG_MS if n % 2 == 0 else SHORT_MS
        j = n % 8
        if j < 5:
            doc: dict[str, Any] = {"user_id": known_users[n % len(known_users)], "k": 10}
        elif j == 5:
            doc = {"user_id": f"stranger-{n}", "k": 5}
        elif j == 6:
            doc = {"kind": "popular", "k": 5}
        else:
            doc = {"kind": "similar_items", "item_id": item, "k": 5}
        return doc, budget

    return make


def test_sigkill_anywhere_loses_nothing_and_applies_nothing_twice(
    own_kafka: str, tmp_path: Path
) -> None:
    kafka = own_kafka  # a broker of its own: this test loads it hard
    t_begin = time.monotonic()
    rng = np.random.default_rng(2024)
    topics = make_topics(kafka, partitions=3)
    c = Cluster(kafka, topics, tmp_path)
    s = planted_stream(150_000, 3000, 1500, n_groups=8, seed=31)
    payloads, valid = event_payloads(
        s.users.tolist(), s.items.tolist(), s.times.tolist(), bad_every=250
    )
    pub = StreamPublisher(kafka, topics.interactions, payloads, valid, rate=RATE)
    known = [f"u{u}" for u in dict.fromkeys(s.users[:2000].tolist())][:200]
    load = RequestLoad(kafka, topics, _request_maker(known, f"i{int(s.items[0])}"), rate=40.0)
    kills: list[Kill] = []
    expired_seen = 0.0
    try:
        # the lives' modes: a fixed mix in a random order, so the kill-site coverage checked at
        # the end does not hang on the draw (rng.choice gave 2 streaming kills in 20 once)
        modes = rng.permutation(["startup"] * 4 + ["batch"] * 6 + ["rebuild"] * 10).tolist()
        life = UpdaterLife(c, rng, "batch")
        queries = {n: c.start("query", n) for n in ("query-1", "query-2")}
        q_started = {n: time.monotonic() for n in queries}
        pub.start()
        # serving before the storm starts (the first group join takes a few seconds)
        probe = load.send_one({"user_id": known[0]}, LONG_MS)
        assert not load.wait_answered(lambda r: r.rid == probe, 30), "no first answer"
        load.start_sending()
        t_storm = time.monotonic()
        for cycle in range(CYCLES):
            q_name = f"query-{cycle % 2 + 1}"
            q_at = time.monotonic() + float(rng.uniform(0.1, 3.0))
            q_done = u_done = False
            deadline = time.monotonic() + 20.0
            while not (q_done and u_done):
                assert time.monotonic() < deadline, f"cycle {cycle} did not finish"
                if not u_done and life.due():
                    kills.append(life.kill(cycle))
                    life = UpdaterLife(c, rng, str(modes[cycle]))
                    u_done = True
                if not q_done and time.monotonic() >= q_at:
                    q = queries[q_name]
                    expired_seen += _kill_query(c, q)
                    lived = time.monotonic() - q_started[q_name]
                    kills.append(Kill(cycle, q_name, "serving", lived))
                    queries[q_name] = c.start("query", q_name)
                    q_started[q_name] = time.monotonic()
                    q_done = True
                pub.poll()
                time.sleep(0.02)
        storm_s = time.monotonic() - t_storm

        # ---- the storm is over: let everything finish, then check ---------------------------
        load.stop_sending()
        assert pub.stop(60.0) == 0, "events not acknowledged by the broker"
        assert not pub.failed, pub.failed[:3]
        assert load.delivery_failures == 0
        ends = {(topics.interactions, p): o for p, o in pub.end_offsets.items()}
        with StateStore(c.state, secondary=tmp_path / "sec") as follower:
            end = time.monotonic() + 60
            while follower.offsets() != ends and time.monotonic() < end:
                assert life.proc.alive(), life.proc.log_tail()
                time.sleep(0.2)
                follower.catch_up()
        # ---- the model log: a fresh reader equals the store, bit for bit --------------------
        # (once no rebuild is in flight and coalesced item rows had their interval to go out)
        end = time.monotonic() + 60
        mismatches: list[str] = ["not compared"]
        while mismatches and time.monotonic() < end:
            if _try_metric(c, "updater", "stream_mf_rebuild_running") != 0:
                time.sleep(0.5)
                continue
            time.sleep(2.5)
            mismatches = log_model_mismatches(
                kafka, topics.model, c.state, tmp_path / f"sec-{time.monotonic_ns()}"
            )
        assert not mismatches, mismatches
        updater_log = (c.work / "updater.log").read_text()
        # restarts that found the model log and the store apart: behind it (killed between a
        # store write and the log's acknowledgement) or ahead of it (killed with batches
        # published since the last checkpoint)
        apart = updater_log.count("the model log is at commit") + updater_log.count(
            "the model log is ahead of the store"
        )
        long_missing = load.wait_answered(lambda r: r.budget_ms == LONG_MS, 45.0)
        time.sleep(1.0)  # late duplicates
        for name in queries:
            expired_seen += _try_metric(c, name, "stream_mf_requests_expired_total") or 0.0
        c.stop_all()  # SIGTERM: query processes commit their stored offsets on the way out

        # ---- the store: exactly once ----------------------------------------------------------
        with StateStore(c.state) as store:
            state = store.load()
            offsets = store.offsets()
            gen = store.generation()
            for cf in MODEL_CFS:
                gens = {k[:4] for k in raw_keys(store.cf[cf])}
                assert gens <= {gen.to_bytes(4, "big")}, (cf, gens, gen)
        n_valid = pub.delivered_valid
        assert offsets == ends, "stored next offsets differ from the log end offsets"
        assert state.events_applied == n_valid
        assert int(state.users.count[: state.users.n].sum()) == n_valid
        assert int(state.items.count[: state.items.n].sum()) == n_valid
        assert np.all(np.isfinite(state.users.factors[: state.users.n]))
        assert np.all(np.isfinite(state.items.factors[: state.items.n]))
        assert state.model_version >= 1, "no rebuild ever swapped"

        # ---- the kills landed where they should ----------------------------------------------
        phases = Counter(k.phase for k in kills if k.who == "updater")
        assert sum(phases.values()) >= CYCLES
        assert sum(k.who.startswith("query") for k in kills) >= CYCLES
        assert phases["rebuild:fit"] + phases["rebuild:guard/catch-up"] >= 3, phases
        assert phases["streaming"] >= 3, phases
        # restarts that found the model log apart from the store and mended it: the equality
        # above covers them. With checkpoints the log is behind only in the moment between a
        # checkpoint and the log's acknowledgement, which random kills rarely hit (1 CI run in
        # 6); test_log_behind_store puts an updater there on purpose.
        assert apart >= 1, "no kill left the model log apart from the store"

        # ---- the query service: at least once, or expired and counted -----------------------
        assert not long_missing, f"{len(long_missing)} long-deadline requests never answered"
        with load._lock:
            sent = dict(load.sent)
            replies = {k: list(v) for k, v in load.replies.items()}
        short_missing = [
            r for r, sr in sent.items() if sr.budget_ms == SHORT_MS and r not in replies
        ]
        assert len(short_missing) <= expired_seen, (len(short_missing), expired_seen)
        committed = committed_offsets(kafka, f"query-{topics.interactions}", topics.requests, 2)
        assert sum(committed.values()) == len(sent), (committed, len(sent))
        assert load.stray == 0
        dups = {r: v for r, v in replies.items() if len(v) > 1}
        for rid, got in replies.items():
            for rep in got:
                assert rep.response.request_id == rid
                assert rep.response.user_id == sent[rid].doc.get("user_id")
                assert rep.response.error is None, rep.response.error
                assert rep.response.items, rid
        for rid, got in dups.items():
            # a duplicate answers the same request; items may differ (the model moved on)
            assert len({(g.response.request_id, g.response.user_id) for g in got}) == 1, rid
        _report(
            t_begin,
            storm_s,
            kills,
            phases,
            sent,
            replies,
            dups,
            short_missing,
            expired_seen,
            n_valid,
            state.model_version,
        )
    finally:
        with contextlib.suppress(Exception):
            load.close()
        with contextlib.suppress(Exception):
            pub.stop(5.0)
        c.stop_all()


def _report(
    t_begin: float,
    storm_s: float,
    kills: list[Kill],
    phases: Counter[str],
    sent: dict[str, SentRequest],
    replies: dict[str, Any],
    dups: dict[str, Any],
    short_missing: list[str],
    expired_seen: float,
    n_valid: int,
    model_version: int,
) -> None:
    """One summary line per concern, shown with `pytest -s` (and kept in the captured log)."""
    identical = sum(
        len({g.response.model_dump_json(exclude={"generated_at"}) for g in got}) == 1
        for got in dups.values()
    )
    print(
        f"\ncrash-anywhere: {len(kills)} kills in {storm_s:.0f} s "
        f"(updater phases {dict(phases)}); {n_valid} valid events applied exactly once; "
        f"model_version {model_version}\n"
        f"requests: {len(sent)} sent, {len(replies)} answered, {len(dups)} answered twice or more "
        f"({identical} identical), {len(short_missing)} short-deadline unanswered, "
        f"{expired_seen:.0f} counted expired; total {time.monotonic() - t_begin:.0f} s"
    )
