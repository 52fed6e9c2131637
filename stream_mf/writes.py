"""The store's named commits, as values: whoever decides what to write (the updater's batch
step, a rebuild) returns one of these, and the updater's loop alone hands it to
`StateStore.apply`, so every commit of a writer goes through one place in one order
(docs/architecture.md, "Commit order"). Each is one RocksDB WriteBatch."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from stream_mf.learner_snapshot import LearnerSnapshot
from stream_mf.model import BatchDelta
from stream_mf.store_layout import RowTable

_NONE = np.empty(0, np.int64)


@dataclass(frozen=True)
class CommitBatch:
    """A learned micro-batch: its changed rows and pairs, the counters, the next offsets."""

    delta: BatchDelta
    offsets: Mapping[tuple[str, int], int] = field(default_factory=dict)
    event_times: np.ndarray | None = None


@dataclass(frozen=True)
class Checkpoint:
    """Make the learned batches durable: everything the `CommitBatch`es since the last
    checkpoint changed (merged: a row changed by many batches is written once) and the next
    offsets, one WriteBatch. With checkpoints on, a `CommitBatch` is published (the model log)
    but kept in memory until this; a crash replays `interactions` from the last one."""


@dataclass(frozen=True)
class Flip:
    """A rebuild's swap: the rows it solved (and every new id's) under `generation`, which
    becomes the one readers see. `unfinished` marks rows left to apply after it."""

    generation: int
    users: np.ndarray
    items: np.ndarray
    unfinished: bool = False
    rebuilt_events: int | None = None  # a deterministic rebuild's end (`MarkRebuilt`)


@dataclass(frozen=True)
class AfterSwapStep:
    """Rows re-solved after a deferred swap, added to the live rows; `last` clears the mark."""

    users: np.ndarray
    items: np.ndarray
    last: bool = False
    rebuilt_events: int | None = None


@dataclass(frozen=True)
class ClearUnfinished:
    """A rebuild's guard judged (and rejected) a new model over the rows a mark was kept for."""

    rebuilt_events: int | None = None


@dataclass(frozen=True)
class MarkRebuilt:
    """A deterministic rebuild is over at `events` applied (a restart does not run it again).
    On its own only when the rebuild ended with no commit of its own (it failed); otherwise the
    rebuild's last commit carries the mark (`with_mark`), in the same WriteBatch: a kill between
    a flip and a separate mark would run the rebuild again on the swapped model."""

    events: int


@dataclass(frozen=True)
class Stage:
    """Blocks of a future generation's factors (zero biases), invisible until its flip: a
    rebuild's background work queues them and the updater's loop writes them."""

    kind: str  # "user" or "item"
    rows: RowTable
    generation: int
    blocks: np.ndarray


@dataclass(frozen=True)
class DropGenerations:
    """Delete model rows of other generations: `older` ones (only under `below` if given) and
    `staged` ones (an unfinished or rejected rebuild's)."""

    older: bool = True
    staged: bool = True
    below: int | None = None


@dataclass(frozen=True)
class WriteOffsets:
    """Move stored offsets on their own (the offset-gap policy)."""

    offsets: Mapping[tuple[str, int], int]


@dataclass(frozen=True)
class Restore:
    """A new store's first commit: a learner snapshot read from Kafka, whole (an updater on a
    lost disk carries on from it and replays `interactions` from its offsets)."""

    snapshot: LearnerSnapshot


Write = (
    CommitBatch
    | Checkpoint
    | Flip
    | AfterSwapStep
    | ClearUnfinished
    | MarkRebuilt
    | Stage
    | DropGenerations
    | WriteOffsets
    | Restore
)


def with_mark(write: Write | None, events: int) -> Write:
    """The last commit of a deterministic rebuild, carrying its end mark in the same batch."""
    if isinstance(write, Flip | AfterSwapStep | ClearUnfinished):
        return dataclasses.replace(write, rebuilt_events=events)
    if write is not None:
        raise TypeError(f"a rebuild does not end with {write!r}")
    return MarkRebuilt(events)


__all__ = [
    "AfterSwapStep",
    "Checkpoint",
    "ClearUnfinished",
    "CommitBatch",
    "DropGenerations",
    "Flip",
    "MarkRebuilt",
    "Restore",
    "Stage",
    "Write",
    "WriteOffsets",
    "with_mark",
]
