"""The store's named commits, as values: whoever decides what to write (the updater's batch
step, a rebuild) returns one of these, and the updater's loop alone hands it to
`StateStore.apply`, so every commit of a writer goes through one place in one order
(docs/architecture.md, "Commit order"). Each is one RocksDB WriteBatch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from stream_mf.learner_snapshot import LearnerSnapshot
from stream_mf.model import BatchDelta

_NONE = np.empty(0, np.int64)


@dataclass(frozen=True)
class CommitBatch:
    """A learned micro-batch: its changed rows and pairs, the counters, the next offsets."""

    delta: BatchDelta
    offsets: Mapping[tuple[str, int], int] = field(default_factory=dict)
    event_times: np.ndarray | None = None


@dataclass(frozen=True)
class Flip:
    """A rebuild's swap: the rows it solved (and every new id's) under `generation`, which
    becomes the one readers see. `unfinished` marks rows left to apply after it."""

    generation: int
    users: np.ndarray
    items: np.ndarray
    unfinished: bool = False


@dataclass(frozen=True)
class AfterSwapStep:
    """Rows re-solved after a deferred swap, added to the live rows; `last` clears the mark."""

    users: np.ndarray
    items: np.ndarray
    last: bool = False


@dataclass(frozen=True)
class ClearUnfinished:
    """A rebuild's guard judged (and rejected) a new model over the rows a mark was kept for."""


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
    CommitBatch | Flip | AfterSwapStep | ClearUnfinished | DropGenerations | WriteOffsets | Restore
)

__all__ = [
    "AfterSwapStep",
    "ClearUnfinished",
    "CommitBatch",
    "DropGenerations",
    "Flip",
    "Restore",
    "Write",
    "WriteOffsets",
]
