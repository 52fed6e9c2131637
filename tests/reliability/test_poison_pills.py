"""Poison pills: no message stops learning, and none is lost or sent twice on a clean restart.

- End to end (a real broker, a real updater process): invalid UTF-8 inside a JSON string (the
  Latin-1 "é" that once stopped the updater at the same offset after every restart), a 1.5 MB
  event, JSON nested far past every parser's limit and random bytes, between valid events. The
  updater stays up, applies every valid event, dead-letters every other message once with its
  reason; the 1.5 MB one arrives truncated, saying so in its headers. A SIGTERM restart re-sends
  no dead letter.
- A bug met by one message (an exception raised while learning it, injected into the real
  learner) does not stop the updater: it reloads the model from the store, isolates that
  message by halving the batch and dead-letters it `internal`; the rest is learnt bit for bit
  as if the message had never been there, and a restart halfway isolates the same message.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from confluent_kafka import Consumer, Message, Producer, TopicPartition

from consumers import kafka_io
from consumers.settings import KafkaSettings, MetricsSettings, TopicSettings, UpdaterSettings
from consumers.updater import DEAD_LETTER_HEADROOM, DEFAULT_MESSAGE_MAX_BYTES, Updater
from stream_mf.config import DEFAULT_EVENT_TYPES
from stream_mf.decode import decode_events
from stream_mf.model import EventBatch, OnlineModel
from tests.integration.conftest import Cluster, make_topics

pytestmark = pytest.mark.integration

BIG = 1_500_000  # over librdkafka's default message.max.bytes: cannot be dead-lettered whole


class _Killed(BaseException):
    """The process dies here (what kill -9 leaves on disk: nothing of this write)."""


def _event(j: int) -> bytes:
    return orjson.dumps(
        {
            "user_id": f"u{j % 13}",
            "item_id": f"i{j % 29}",
            "event_type": "view",
            "timestamp": time.time() - 3600 + j,
        }
    )


def _poison(rng: random.Random) -> list[bytes]:
    latin1 = b'{"user_id":"Jos\xe9","item_id":"i1","event_type":"view","timestamp":1700000000}'
    return [
        latin1,
        latin1.replace(b"1700000000}", b"1700000000000}"),  # ms: the model's path
        b'{"user_id":"u1","item_id":"i\xff\xfe","event_type":"view","timestamp":1700000000}',
        b'{"pad":"' + bytes(rng.randrange(97, 123) for _ in range(64)) * (BIG // 64 + 1) + b'"}',
        b"[" * 30_000 + b"]" * 30_000,  # under the 64 kB limit, 30 times orjson's depth
        b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
        bytes(rng.randrange(256) for _ in range(300)),
        b"\xc3",
        b'{"user_id":"u1","item_id":"i1","event_type":"view","timestamp":NaN}',
        b"",
    ]


def _dead_letters(kafka: str, topic: str, want: int, timeout: float = 30) -> list[Message]:
    c = Consumer(
        {
            "bootstrap.servers": kafka,
            "group.id": f"dlt-{topic}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
        }
    )
    c.assign([TopicPartition(topic, 0, 0)])
    got: list[Message] = []
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end and len(got) < want:
            got += [m for m in c.consume(100, 0.5) if m.error() is None]
        # anything more (a duplicate) has had time to arrive too
        got += [m for m in c.consume(100, 1.0) if m.error() is None]
    finally:
        c.close()
    return got


@pytest.mark.timeout(240)
def test_poison_pills_through_a_real_updater(cluster: Cluster) -> None:
    rng = random.Random(7)
    poison = _poison(rng)
    mixed: list[tuple[bytes | None, bytes]] = []
    n_good = 0
    for p in poison:
        for _ in range(rng.randrange(3, 12)):
            mixed.append((b"k", _event(n_good)))
            n_good += 1
        mixed.append((rng.choice([None, b"\xff\xfe", b"k" * 5000]), p))
    mixed += [(b"k", _event(n_good + j)) for j in range(5)]
    n_good += 5
    expect = decode_events([v for _, v in mixed], DEFAULT_EVENT_TYPES, latest=time.time() + 86400)
    assert len(expect.positions) == n_good and len(expect.rejects) == len(poison)
    reasons = Counter(r.reason for r in expect.rejects)
    assert reasons == {"malformed_json": 8, "too_large": 1, "empty": 1}, reasons

    conf: dict[str, Any] = {"message.max.bytes": 2 * BIG}
    producer = kafka_io.producer(KafkaSettings(bootstrap_servers=cluster.kafka), **conf)
    for key, value in mixed:
        producer.produce(cluster.topics.interactions, value=value, key=key)
    assert producer.flush(30) == 0
    updater = cluster.start("updater", "updater", "--max-batch-events", "7")
    cluster.wait_metric("updater", "stream_mf_events_consumed_total", len(mixed), timeout=120)
    cluster.wait_metric("updater", "stream_mf_events_applied_total", n_good, timeout=30)
    time.sleep(0.3)
    assert cluster.metric("updater", "stream_mf_events_applied_total") == n_good
    for reason, count in reasons.items():
        got = cluster.metric(
            "updater", f'stream_mf_events_dead_lettered_total{{reason="{reason}"}}'
        )
        assert got == count, (reason, got, count)
    assert updater.alive(), updater.log_tail()

    dead = _dead_letters(cluster.kafka, cluster.topics.dead_letter, len(poison))
    by_offset: dict[int, tuple[dict[str, bytes], Message]] = {}
    for m in dead:
        h = kafka_io.headers_dict(m.headers())
        off = int(h["original.offset"])
        assert off not in by_offset, f"offset {off} dead-lettered twice"
        by_offset[off] = (h, m)
    assert sorted(by_offset) == [r.position for r in expect.rejects]
    limit = DEFAULT_MESSAGE_MAX_BYTES - DEAD_LETTER_HEADROOM
    for r in expect.rejects:
        h, m = by_offset[r.position]
        key, value = mixed[r.position]
        assert h["error.reason"].decode() == r.reason
        assert h["original.topic"].decode() == cluster.topics.interactions
        assert h["original.partition"] == b"0"
        if len(value) + len(key or b"") <= limit:  # whole, byte for byte
            assert (m.value() or b"", m.key()) == (value, key)
            assert "error.truncated" not in h
        else:  # the 1.5 MB event: a prefix, and the headers say so
            assert r.reason == "too_large" and len(value) > BIG
            assert h["error.truncated"] == b"true"
            assert int(h["original.size"]) == len(value)
            prefix = m.value() or b""
            assert value.startswith(prefix) and len(prefix) + len(m.key() or b"") <= limit
            assert len(prefix) > limit - 2 * len(key or b"") - 1024
    for off in (0, 1):  # the issue's own example: the byte is named
        h, _ = by_offset[expect.rejects[off].position]
        assert b"not valid UTF-8 at byte 15 (0xe9" in h["error.message"], h["error.message"]
    assert "Traceback" not in updater.log_tail(20_000)

    # a clean restart (SIGTERM) re-sends nothing; the next bad message is sent once
    assert updater.stop() == 0
    producer.produce(cluster.topics.interactions, value=b'{"user_id":"\xe9"}', key=b"k")
    producer.produce(cluster.topics.interactions, value=_event(10_000), key=b"k")
    assert producer.flush(30) == 0
    again = cluster.start("updater", "updater2", "--max-batch-events", "7")
    cluster.wait_metric("updater2", "stream_mf_events_consumed_total", 2, timeout=60)
    dead = _dead_letters(cluster.kafka, cluster.topics.dead_letter, len(poison) + 1)
    offsets = [int(kafka_io.headers_dict(m.headers())["original.offset"]) for m in dead]
    assert sorted(offsets) == sorted([*by_offset, len(mixed)]), Counter(offsets)
    assert cluster.metric("updater2", "stream_mf_events_consumed_total") == 2
    assert again.alive(), again.log_tail()


# ---- a bug met by one message ---------------------------------------------------------------

POISON_USER = "boom"


def _fail_on_poison(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make the real learner fail, after changing the model half way, on any batch holding
    the poison user: a bug that one message meets. Returns a list counting the failures."""
    failures: list[int] = []
    learn = OnlineModel.learn

    def buggy(self: OnlineModel, batch: EventBatch, *args: Any, **kwargs: Any) -> Any:
        if POISON_USER in list(batch.user_ids):
            j = list(batch.user_ids).index(POISON_USER)
            # the state is half changed when it fails
            learn(self, batch.slice(0, j), *args, **kwargs)
            failures.append(j)
            raise ZeroDivisionError("the poison pill")
        return learn(self, batch, *args, **kwargs)

    monkeypatch.setattr(OnlineModel, "learn", buggy)
    return failures


def _settings(kafka: str, topics: TopicSettings, state: Path, batch: int) -> UpdaterSettings:
    return UpdaterSettings(
        kafka=KafkaSettings(bootstrap_servers=kafka),
        topics=topics,
        metrics=MetricsSettings(port=-1),
        state_dir=state,
        max_batch_events=batch,
        max_batch_seconds=0.3,
        live_eval_rate=0.0,
    )


def _run_until(u: Updater, consumed: int, timeout: float = 60, until: int = 0) -> None:
    """Loop turns until `consumed` messages were consumed and (`until`) the next offset of
    partition 0 is at least that (a batch failing after others since the checkpoint reads
    them again); then a checkpoint, as the loop's next idle turn would."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (u.registry.get_sample_value("stream_mf_events_consumed_total") or 0) >= consumed and (
            sum(u.offsets.values()) >= until
        ):
            u._checkpoint()
            return
        u._assign_partitions()
        msgs = u._collect(u._stop)
        if msgs:
            u.process(msgs)
    raise AssertionError(f"consumed fewer than {consumed} messages in {timeout} s")


def _fingerprint(u: Updater) -> tuple[Any, ...]:
    st = u.model.state
    n, m = st.users.n, st.items.n
    return (
        st.users.ids,
        st.items.ids,
        st.users.factors[:n].tobytes(),
        st.items.factors[:m].tobytes(),
        st.items.bias[:m].tobytes(),
        st.counters.tobytes(),
        float(st.clock[0]),
        sorted(st.confidence.items()),
    )


@pytest.mark.timeout(240)
@pytest.mark.parametrize("batch,killed", [(1000, False), (37, False), (100, True)])
def test_a_message_the_learner_fails_on_is_isolated_and_dead_lettered(
    kafka: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: int, killed: bool
) -> None:
    """`killed`: the first updater dies the moment it has found the message (halves before it
    committed, the message not yet dead-lettered); a restart, meeting the same bug, finds the
    same message and ends in the same state."""
    topics = make_topics(kafka)
    good = [_event(j) for j in range(400)]
    poison_at = 237
    poison = orjson.dumps(
        {
            "user_id": POISON_USER,
            "item_id": "i1",
            "event_type": "view",
            "timestamp": time.time() - 3600,
        }
    )
    events = [*good[:poison_at], poison, *good[poison_at:]]
    p = Producer({"bootstrap.servers": kafka})
    for e in events:
        p.produce(topics.interactions, e)
    assert p.flush(10) == 0

    failures = _fail_on_poison(monkeypatch)
    if killed:

        def die(*args: Any) -> None:
            raise _Killed

        with monkeypatch.context() as patch:
            patch.setattr(Updater, "_failed", die)
            first = Updater(_settings(kafka, topics, tmp_path / "state", batch))
            try:
                with pytest.raises(_Killed):
                    _run_until(first, len(events), until=len(events))
                part = first.store.offsets()[(topics.interactions, 0)]
                assert poison_at - batch < part <= poison_at, part  # halves before it committed
            finally:
                first.close()
        assert _dead_letters(kafka, topics.dead_letter, 1, timeout=2) == []
        events_left = len(events) - part
    else:
        events_left = len(events)
    u = Updater(_settings(kafka, topics, tmp_path / "state", batch))
    try:
        _run_until(u, events_left, until=len(events))
        assert failures, "the poison never reached the learner"
        assert u.model.state.events_applied == len(good)
        assert u.store.events_applied() == len(good)
        assert u.store.offsets() == {(topics.interactions, 0): len(events)}
        dead = u.registry.get_sample_value
        assert dead("stream_mf_events_dead_lettered_total", {"reason": "internal"}) == 1
        assert dead("stream_mf_events_dead_lettered_total", {"reason": "malformed_json"}) == 0
        got = _fingerprint(u)
    finally:
        u.close()

    letters = _dead_letters(kafka, topics.dead_letter, 1)
    assert len(letters) == 1
    h = kafka_io.headers_dict(letters[0].headers())
    assert h["error.reason"] == b"internal" and int(h["original.offset"]) == poison_at
    assert b"ZeroDivisionError: the poison pill (in buggy" in h["error.message"], h
    assert letters[0].value() == poison

    # the store, reopened, holds bit for bit what a model learns from the good events alone,
    # in one batch: the failed attempts left nothing behind, whatever the cut
    monkeypatch.undo()
    model = OnlineModel(u.model.config)
    offs = np.asarray([j if j < poison_at else j + 1 for j in range(len(good))], np.int64)
    dec = decode_events(good, DEFAULT_EVENT_TYPES)
    model.learn(EventBatch.build(dec.users, dec.items, dec.weights, dec.times, None, offs))
    reopened = Updater(_settings(kafka, topics, tmp_path / "state", batch))
    try:
        assert _fingerprint(reopened) == got
        reopened.model = model
        assert _fingerprint(reopened) == got
    finally:
        reopened.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("max_bytes", [20_000, 1000])
def test_dead_letters_fit_the_producers_configured_message_max_bytes(
    kafka: str, tmp_path: Path, max_bytes: int
) -> None:
    """The truncation bound follows message.max.bytes as configured (kafka.extra); at
    librdkafka's smallest (1000) even the headers leave less than the headroom assumed, and
    the dead letter is cut until it fits rather than stopping the updater."""
    topics = make_topics(kafka)
    big = b'{"pad":"' + b"x" * 50_000 + b'"}'  # under the 64 kB limit: missing_field
    key = b"k" * 3000
    p = Producer({"bootstrap.servers": kafka})
    p.produce(topics.interactions, _event(1), key=b"k")
    p.produce(topics.interactions, big, key=key)
    p.produce(topics.interactions, b"\xe9", key=None)
    p.produce(topics.interactions, _event(2), key=b"k")
    assert p.flush(10) == 0
    s = _settings(kafka, topics, tmp_path / "state", 100)
    s = s.model_copy(
        update={
            "kafka": KafkaSettings.model_validate(
                {"bootstrap_servers": kafka, "extra": {"message.max.bytes": str(max_bytes)}}
            )
        }
    )
    u = Updater(s)
    try:
        _run_until(u, 4)
        assert u.store.events_applied() == 2
        assert u.store.offsets() == {(topics.interactions, 0): 4}
    finally:
        u.close()
    letters = _dead_letters(kafka, topics.dead_letter, 2)
    assert len(letters) == 2
    first, second = (kafka_io.headers_dict(m.headers()) for m in letters)
    assert first["error.reason"] == b"missing_field" and first["original.offset"] == b"1"
    assert first["error.truncated"] == b"true"
    assert int(first["original.size"]) == len(big)
    assert int(first["original.key.size"]) == len(key)
    got = letters[0].value() or b""
    assert big.startswith(got) and key.startswith(letters[0].key() or b"")
    size = len(got) + len(letters[0].key() or b"")
    size += sum(len(k) + len(v) for k, v in first.items())
    assert size <= max_bytes
    if max_bytes > DEAD_LETTER_HEADROOM:
        assert len(got) + len(letters[0].key() or b"") == max_bytes - DEAD_LETTER_HEADROOM
    # a small one goes whole, with its key
    assert second["error.reason"] == b"malformed_json" and "error.truncated" not in second
    assert (letters[1].value(), letters[1].key()) == (b"\xe9", None)


@pytest.mark.timeout(120)
def test_a_restart_after_a_kill_between_ack_and_commit_resends_no_dead_letter(
    kafka: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = make_topics(kafka)
    events = [_event(j) for j in range(30)]
    bad = {5: b"{torn", 12: b"\xe9", 17: b'{"user_id":"u"}', 25: b"[]"}
    for j, raw in bad.items():
        events[j] = raw
    p = Producer({"bootstrap.servers": kafka})
    for e in events:
        p.produce(topics.interactions, e)
    assert p.flush(10) == 0
    settings = _settings(kafka, topics, tmp_path / "state", 100)

    u = Updater(settings)
    try:
        msgs: list[Message] = []
        end = time.monotonic() + 30
        while len(msgs) < len(events) and time.monotonic() < end:
            u._assign_partitions()
            msgs += u._collect(u._stop)
        u.process(msgs[:10])  # committed, with the dead letter of offset 5
        u._checkpoint()
        commit = u.store.commit_batch

        def killed(*args: Any, **kwargs: Any) -> None:
            raise _Killed

        monkeypatch.setattr(u.store, "commit_batch", killed)
        with pytest.raises(_Killed):
            u.process(msgs[10:20])  # dead letters 12 and 17 acknowledged, then the kill
        monkeypatch.setattr(u.store, "commit_batch", commit)
    finally:
        u.close()
    assert len(_dead_letters(kafka, topics.dead_letter, 3)) == 3

    again = Updater(settings)
    try:
        _run_until(again, len(events) - 10, until=len(events))
        assert again.store.offsets() == {(topics.interactions, 0): len(events)}
        assert again.store.events_applied() == len(events) - len(bad)
        sent = sum(
            again.registry.get_sample_value("stream_mf_events_dead_lettered_total", {"reason": r})
            or 0.0
            for r in ("malformed_json", "missing_field", "not_an_object")
        )
        assert sent == 1  # offset 25; 12 and 17 were on the topic already
    finally:
        again.close()
    letters = _dead_letters(kafka, topics.dead_letter, len(bad))
    offsets = [int(kafka_io.headers_dict(m.headers())["original.offset"]) for m in letters]
    assert offsets == sorted(bad), offsets
