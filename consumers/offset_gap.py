"""Stored offsets the log no longer has: detect, verify with Kafka's own answers, decide.

The updater resumes at the next offsets stored in its model store. When the topic was deleted
and recreated, the broker lost its data (the embedded broker keeps topics in memory only, so a
restart forgets them), or retention removed events not yet applied, that offset lies outside
the partition's log: beyond its end a consumer waits forever for offsets that will never come
(silently, showing lag 0), before its start the events in between are gone. Kafka says so
itself: the watermarks (ListOffsets) give the log's range and a fetch outside it fails with
OFFSET_OUT_OF_RANGE (surfaced by librdkafka as `_AUTO_OFFSET_RESET` when `auto.offset.reset`
is `error`). The embedded broker's high watermark can lag the log it holds, and it answers a
fetch beyond the end with nothing rather than an error, so "beyond the end" is confirmed by
fetching, never taken from the watermark alone.

`classify` and `resume_offset` are the decision, pure; `verified_end` does the fetching.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from confluent_kafka import Consumer, KafkaError, TopicPartition

GapKind = Literal["ahead_of_log", "before_log_start"]
OnOffsetGap = Literal["fail", "resume-from-start", "resume-from-end"]
GAP_KINDS: tuple[GapKind, ...] = ("ahead_of_log", "before_log_start")
# what a fetch outside the log returns: the broker's error, or librdkafka's with reset=error
OUT_OF_RANGE = (KafkaError.OFFSET_OUT_OF_RANGE, KafkaError._AUTO_OFFSET_RESET)
# reading toward a log's end stops after this even if records keep arriving (a busy topic's
# end moves; what was read by then is the end the policy uses)
READ_LIMIT_S = 10.0


@dataclass(frozen=True)
class OffsetGap:
    """A stored next offset outside the log [low, high] (high: one past the last record)."""

    kind: GapKind
    stored: int
    low: int
    high: int

    @property
    def lost(self) -> int:
        """Events removed before they were applied (retention or deleted records); beyond the
        end nothing is known to be lost, the log is simply another one."""
        return self.low - self.stored if self.kind == "before_log_start" else 0

    def describe(self, topic: str, partition: int) -> str:
        where = f"{topic}[{partition}]: the model store's next offset {self.stored}"
        span = (
            f"the log holds offsets {self.low}..{self.high - 1}"
            if self.high > self.low
            else f"the log is empty (start and end {self.low})"
        )
        if self.kind == "ahead_of_log":
            return (
                f"{where} is beyond the log's end ({span}): the topic was deleted and "
                "recreated, or the broker lost its data (the embedded broker forgets every "
                "topic when it restarts)"
            )
        return (
            f"{where} is before the log's start ({span}): {self.lost} event(s) were removed "
            "(retention or deleted records) before the updater applied them"
        )


def classify(stored: int, low: int, high: int) -> OffsetGap | None:
    """None when `stored` is a valid next offset of the log [low, high]: any offset from its
    start to its end inclusive (at the end the consumer waits for the next record)."""
    if stored > high:
        return OffsetGap("ahead_of_log", stored, low, high)
    if stored < low:
        return OffsetGap("before_log_start", stored, low, high)
    return None


def resume_offset(gap: OffsetGap, policy: OnOffsetGap) -> int:
    """Where a resuming policy continues: the log's first record, or its end (only events
    published from now on)."""
    if policy == "resume-from-start":
        return gap.low
    if policy == "resume-from-end":
        return gap.high
    raise ValueError(f"on_offset_gap={policy!r} does not resume")


def _fetch(
    probe: Consumer, topic: str, partition: int, offset: int, first: float, quiet: float
) -> tuple[int | None, bool]:
    """Read `topic[partition]` from `offset`: wait up to `first` seconds for a record, then
    until `quiet` seconds pass with nothing new (0: stop at the first). Returns the last
    offset delivered (None: none) and whether the broker said the offset is out of range.
    A topic that never goes quiet is read for at most `first + READ_LIMIT_S` seconds."""
    probe.assign([TopicPartition(topic, partition, offset)])
    last: int | None = None
    idle_until = time.monotonic() + first
    deadline = idle_until + READ_LIMIT_S
    try:
        while (now := time.monotonic()) < min(idle_until, deadline):
            got = probe.consume(10_000, min(0.1, idle_until - now))
            for m in got:
                err = m.error()
                at = m.offset()
                if err is None:
                    if m.partition() == partition and at is not None and at >= offset:
                        last = at if last is None else max(last, at)
                elif err.code() in OUT_OF_RANGE:
                    return last, True
            if last is not None:
                if quiet <= 0:
                    break
                if got:
                    idle_until = time.monotonic() + quiet
        return last, False
    finally:
        probe.unassign()


def verified_end(
    probe: Consumer,
    topic: str,
    partition: int,
    stored: int,
    low: int,
    high: int,
    wait: float = 2.0,
) -> int | None:
    """The log's end, confirmed by fetching, when the watermark says `stored` lies beyond it.

    A fetch of the record just before `stored` settles it: if the log has that record, the
    watermark lagged and the end is past it. Otherwise the records from the watermark on are
    read until the broker goes quiet, and the end is one past the last. None when the broker
    delivers not even a record its own watermark says it holds: no verdict (retry later)."""
    last, _ = _fetch(probe, topic, partition, stored - 1, wait, 0.0)
    if last is not None:
        return last + 1
    last, out_of_range = _fetch(probe, topic, partition, max(low, high - 1), wait, 0.5)
    if last is None:
        return high if high <= low or out_of_range else None
    return max(high, last + 1)
