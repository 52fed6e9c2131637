"""The broker hangs while a batch waits for its dead letters to be acknowledged.

The updater cannot commit a batch before its dead letters are delivered (a bad message must not
be skipped), so it waits; while it waits its loop serves no consumer callbacks, and a broker
outage used to show nowhere (CI once caught the updater silent for a whole 30 s outage). These
tests hold the updater exactly there: a real embedded broker of their own (pausing it disturbs
no other test) and a real updater in this process, given a consumed batch with bad messages in
it just as the broker is frozen (SIGSTOP).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Message, Producer

from consumers.local_broker import EmbeddedBroker
from consumers.settings import KafkaSettings, MetricsSettings, UpdaterSettings
from consumers.updater import (
    STALL_REPORT_S,
    STOP_GRACE_S,
    DeadLetterError,
    StoppedBeforeCommitError,
    Updater,
)
from stream_mf.model import EventBatch, OnlineModel
from tests.integration.conftest import make_topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

GOOD = 40
BAD = [b"{not json", b'{"user_id": "u1"}', b""]


def _updater(broker: EmbeddedBroker, work: Path, timeout_s: float) -> Updater:
    topics = make_topics(broker.bootstrap_servers)
    p = Producer({"bootstrap.servers": broker.bootstrap_servers})
    for j in range(GOOD):
        doc = {
            "user_id": f"u{j % 7}",
            "item_id": f"i{j % 11}",
            "event_type": "view",
            "timestamp": 1.7e9 + j,
        }
        p.produce(topics.interactions, orjson.dumps(doc))
        if j % 13 == 0:
            p.produce(topics.interactions, BAD[(j // 13) % len(BAD)])
    assert p.flush(10) == 0
    settings = UpdaterSettings(
        kafka=KafkaSettings(bootstrap_servers=broker.bootstrap_servers),
        topics=topics,
        metrics=MetricsSettings(port=-1),
        state_dir=work / "state",
        dead_letter_timeout_seconds=timeout_s,
        max_batch_seconds=0.2,
    )
    u = Updater(settings)
    # the kernels compiled (or loaded) now, on a throwaway model: a batch is learnt before its
    # dead letters are sent, and a cold compile must not eat the time the tests watch
    OnlineModel(u.model.config).learn(EventBatch.build(["u"], ["i"], [1.0], [1.7e9]))
    return u


def _consume_all(u: Updater) -> list[Message]:
    total = GOOD + len(range(0, GOOD, 13))
    msgs: list[Message] = []
    end = time.monotonic() + 30
    while len(msgs) < total and time.monotonic() < end:
        u._assign_partitions()
        msgs += u._collect(u._stop)
    assert len(msgs) == total, f"read {len(msgs)} of {total} messages"
    return msgs


def _broker_errors(u: Updater) -> float:
    return u.registry.get_sample_value("stream_mf_errors_total", {"kind": "broker"}) or 0.0


class _Batch(threading.Thread):
    """`Updater.process` on a thread, so the test can watch the wait from outside."""

    def __init__(self, u: Updater, msgs: list[Message]):
        super().__init__(daemon=True)
        self.u, self.msgs = u, msgs
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.u.process(self.msgs)
        except BaseException as exc:  # handed to the test
            self.error = exc


def test_outage_while_dead_lettering_is_counted_and_ridden_out(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    u = _updater(broker, tmp_path, timeout_s=120.0)
    try:
        msgs = _consume_all(u)
        before = _broker_errors(u)
        broker.pause()
        try:
            batch = _Batch(u, msgs)
            batch.start()
            end = time.monotonic() + STALL_REPORT_S + 6
            while _broker_errors(u) == before and time.monotonic() < end:
                time.sleep(0.1)
            assert _broker_errors(u) > before, "the wait for dead letters showed no broker error"
            assert batch.is_alive(), f"the batch did not wait for the broker: {batch.error!r}"
            # learnt in memory (the batch is learnt before it is dead-lettered), not committed
            assert u.store.events_applied() == 0 and u.store.offsets() == {}
        finally:
            broker.resume()
        batch.join(120)
        assert not batch.is_alive() and batch.error is None, batch.error
        assert u.model.state.events_applied == GOOD
        u._checkpoint()  # the loop's next turn, or its stop, writes the batch
        assert sum(u.store.offsets().values()) == len(msgs)
        dead = u.registry.get_sample_value
        assert (
            sum(
                dead("stream_mf_events_dead_lettered_total", {"reason": r}) or 0.0
                for r in ("malformed_json", "missing_field", "empty")
            )
            == len(msgs) - GOOD
        )
    finally:
        u.close()


@pytest.mark.parametrize("how", ["timeout", "stop"])
def test_undelivered_dead_letters_stop_the_batch_uncommitted(
    broker: EmbeddedBroker, tmp_path: Path, how: str
) -> None:
    """Past `dead_letter_timeout_seconds`, or `STOP_GRACE_S` after a stop request, the batch
    gives up: nothing of it is committed, so a restart reads it again."""
    u = _updater(broker, tmp_path, timeout_s=3.0 if how == "timeout" else 120.0)
    try:
        msgs = _consume_all(u)
        broker.pause()
        try:
            t0 = time.monotonic()
            batch = _Batch(u, msgs)
            batch.start()
            if how == "stop":
                time.sleep(1.0)
                u._stop.event.set()
            batch.join(STOP_GRACE_S + 15)
            waited = time.monotonic() - t0
        finally:
            broker.resume()
        assert not batch.is_alive()
        want = DeadLetterError if how == "timeout" else StoppedBeforeCommitError
        assert isinstance(batch.error, want), batch.error
        assert "not committed" in str(batch.error)
        if how == "timeout":
            assert 2.5 < waited < 9, waited
        else:  # the grace period runs from the stop request
            assert 1 + STOP_GRACE_S - 0.5 < waited < 1 + STOP_GRACE_S + 6, waited
        assert u.store.events_applied() == 0 and u.store.offsets() == {}  # nothing committed
    finally:
        u.close()


def test_a_stop_request_still_commits_when_the_broker_answers_in_time(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """A slow broker is no reason to drop the batch at a stop: within the grace period the
    dead letters are acknowledged and the batch is committed as usual."""
    u = _updater(broker, tmp_path, timeout_s=120.0)
    try:
        msgs = _consume_all(u)
        broker.pause()
        try:
            batch = _Batch(u, msgs)
            batch.start()
            time.sleep(1.0)
            u._stop.event.set()
            time.sleep(2.0)
            assert batch.is_alive(), batch.error
        finally:
            broker.resume()
        batch.join(60)
        assert not batch.is_alive() and batch.error is None, batch.error
        assert u.model.state.events_applied == GOOD
        u._checkpoint()  # the loop's next turn, or its stop, writes the batch
        assert sum(u.store.offsets().values()) == len(msgs)
    finally:
        u.close()
