"""Replaying an event file into the `interactions` topic (`stream-mf publish`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

import orjson
from confluent_kafka import Producer
from tqdm import tqdm

from stream_mf.datasets import EventColumns

TimestampMode = Literal["original", "now", "shift"]


def event_payloads(
    events: EventColumns, mode: TimestampMode = "original", now: float | None = None
) -> list[tuple[bytes, bytes]]:
    """(key, value) per event. `shift` moves the whole file so its last event is now;
    `now` stamps every event with the moment it is sent (resolved at send time)."""
    shift = 0.0
    if mode == "shift" and len(events):
        shift = (now or time.time()) - float(events.times.max())
    out = []
    for u, i, t, v, et in zip(
        events.users,
        events.items,
        events.times.tolist(),
        events.values.tolist(),
        events.event_types,
        strict=True,
    ):
        doc = {"user_id": u, "item_id": i, "event_type": et, "timestamp": t + shift}
        if v == v:  # not NaN
            doc["value"] = v
        out.append((u.encode(), orjson.dumps(doc)))
    return out


def publish(
    producer: Producer,
    topic: str,
    payloads: list[tuple[bytes, bytes]],
    rate: float | None = None,
    progress: bool = True,
    stamp_now: bool = False,
    on_chunk: Callable[[int], None] | None = None,
) -> int:
    """Send every payload (rate-limited if `rate` events/s); returns how many were delivered."""
    failed = [0]

    def delivered(err: object, _msg: object) -> None:
        if err is not None:
            failed[0] += 1

    start = time.monotonic()
    bar = tqdm(total=len(payloads), disable=not progress, unit="ev", desc="publish")
    chunk = 1000
    for lo in range(0, len(payloads), chunk):
        if rate:
            ahead = lo / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        for key, value in payloads[lo : lo + chunk]:
            if stamp_now:
                doc = orjson.loads(value)
                doc["timestamp"] = time.time()
                value = orjson.dumps(doc)
            while True:
                try:
                    producer.produce(topic, value=value, key=key, on_delivery=delivered)
                    break
                except BufferError:
                    producer.poll(0.05)
        producer.poll(0)
        n = min(chunk, len(payloads) - lo)
        bar.update(n)
        if on_chunk:
            on_chunk(lo + n)
    left = producer.flush(60.0)
    bar.close()
    return len(payloads) - left - failed[0]
