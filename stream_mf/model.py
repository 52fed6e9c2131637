"""The online learner: folds micro-batches of events into the state and reports what changed.

`learn` returns a `BatchDelta` naming every row it touched, which is exactly what the store must
persist (and nothing more): that keeps a RocksDB commit proportional to the batch, not the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from stream_mf.arrays import unique_rows, unique_sorted
from stream_mf.config import ModelConfig
from stream_mf.sgd import (
    NEG_INF,
    Counter,
    EntityArrays,
    KernelBatch,
    SgdParams,
    StreamArrays,
    logaddexp,
    sgd_batch,
)
from stream_mf.state import ModelState
from stream_mf.transitions import update as update_transitions

#: what `OnlineModel.learn` runs on a batch's records: `sgd_batch` or a twin of it
Kernel = Callable[[KernelBatch, EntityArrays, EntityArrays, StreamArrays, SgdParams], None]


@dataclass
class EventBatch:
    """Validated events as columns; `weights` are base weights (type weight x value)."""

    user_ids: Sequence[str]
    item_ids: Sequence[str]
    weights: np.ndarray  # float64
    times: np.ndarray  # float64 epoch seconds
    partitions: np.ndarray  # int32
    offsets: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.user_ids)

    @classmethod
    def build(
        cls,
        user_ids: Sequence[str],
        item_ids: Sequence[str],
        weights: Sequence[float] | np.ndarray,
        times: Sequence[float] | np.ndarray,
        partitions: Sequence[int] | np.ndarray | None = None,
        offsets: Sequence[int] | np.ndarray | None = None,
        first_offset: int = 0,
    ) -> EventBatch:
        n = len(user_ids)
        return cls(
            user_ids=user_ids,
            item_ids=item_ids,
            weights=np.asarray(weights, dtype=np.float64),
            times=np.asarray(times, dtype=np.float64),
            partitions=(
                np.zeros(n, np.int32) if partitions is None else np.asarray(partitions, np.int32)
            ),
            offsets=(
                np.arange(first_offset, first_offset + n, dtype=np.int64)
                if offsets is None
                else np.asarray(offsets, np.int64)
            ),
        )

    def slice(self, start: int, stop: int) -> EventBatch:
        return EventBatch(
            self.user_ids[start:stop],
            self.item_ids[start:stop],
            self.weights[start:stop],
            self.times[start:stop],
            self.partitions[start:stop],
            self.offsets[start:stop],
        )


@dataclass
class BatchDelta:
    """Rows a batch changed: the store writes exactly these."""

    users: np.ndarray  # int32, unique
    items: np.ndarray  # int32, unique (positives and sampled negatives)
    new_users: tuple[int, int]  # [start, stop) of ids registered by this batch
    new_items: tuple[int, int]
    pair_keys: np.ndarray  # int64 (user << 32 | item), unique
    pair_values: np.ndarray  # float64 log-confidence after the batch
    sampler_rebuilt: bool
    events: int
    #: transition rows (predecessor items) the batch changed, unique; users' last items
    #: change for every user in `users`
    trans_rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))

    @classmethod
    def empty(cls, state: ModelState) -> BatchDelta:
        """No change: for commits that only carry offsets or a rebuild's rows."""
        none = np.empty(0, np.int32)
        return cls(
            users=none,
            items=none,
            new_users=(state.users.n, state.users.n),
            new_items=(state.items.n, state.items.n),
            pair_keys=np.empty(0, np.int64),
            pair_values=np.empty(0),
            sampler_rebuilt=False,
            events=0,
        )


@njit(cache=True, nogil=True)
def accumulate_confidence(conf, keys, order, logw, ukeys, values) -> int:
    """Fold each event's log-weight into its pair, visiting `keys` in `order` (a stable sort,
    so each pair adds its events in event order, as one at a time would); writes the distinct
    keys and their new values and returns how many. One map read and write per pair."""
    m = -1
    prev = np.int64(-1)
    v = NEG_INF
    for j in range(order.shape[0]):
        e = order[j]
        key = keys[e]
        if key != prev:
            if m >= 0:
                conf[prev] = v
                values[m] = v
            m += 1
            ukeys[m] = key
            prev = key
            v = conf.get(key, NEG_INF)
        v = logaddexp(v, logw[e])
    if m >= 0:
        conf[prev] = v
        values[m] = v
    return m + 1


@njit(cache=True, nogil=True)
def lookup_confidence(conf, keys, out) -> None:
    for j in range(keys.shape[0]):
        out[j] = conf.get(keys[j], NEG_INF)


class OnlineModel:
    """Online implicit-feedback MF.

    >>> m = OnlineModel(ModelConfig(dim=8, n_negatives=2))
    >>> d = m.learn(EventBatch.build(["u1", "u2"], ["i1", "i1"], [1.0, 2.0], [10.0, 11.0]))
    >>> (d.events, m.state.users.n, m.state.items.n)
    (2, 2, 1)
    """

    def __init__(self, config: ModelConfig | None = None, state: ModelState | None = None):
        self.config = config or (state.config if state else ModelConfig())
        self.state = state or ModelState.empty(self.config)
        self._params = SgdParams.from_config(self.config)
        self._params_of = self.config

    @property
    def params(self) -> SgdParams:
        """The kernel's hyper-parameters, rebuilt only if `config` was replaced."""
        if self._params_of is not self.config:
            self._params, self._params_of = SgdParams.from_config(self.config), self.config
        return self._params

    def learn(self, batch: EventBatch, kernel: Kernel | None = None) -> BatchDelta:
        """Fold `batch` in. `kernel` replaces `sgd_batch` (same records, same effects): the
        fast evaluator's records each event's user row on the way (`stream_mf.evaluate`)."""
        st, c = self.state, self.config
        n = len(batch)
        u0, i0 = st.users.n, st.items.n
        users = st.users.resolve(batch.user_ids)
        items = st.items.resolve(batch.item_ids)
        st.sync_capacity()
        neg = np.empty((n, c.n_negatives), dtype=np.int32)
        logw = np.empty(n, dtype=np.float64)
        rebuilds = int(st.counters[Counter.REBUILDS])
        clock0 = float(st.clock[0])
        if n:
            (kernel or sgd_batch)(
                KernelBatch(
                    users,
                    items,
                    batch.weights,
                    batch.times,
                    batch.partitions,
                    batch.offsets,
                    neg,
                    logw,
                ),
                EntityArrays.of(st.users),
                EntityArrays.of(st.items),
                StreamArrays(st.cdf, st.counters, st.clock),
                self.params,
            )
        keys = (users.astype(np.int64) << 32) | items.astype(np.int64)
        ukeys = np.empty(n, dtype=np.int64)
        values = np.empty(n, dtype=np.float64)
        m = accumulate_confidence(
            st.confidence, keys, np.argsort(keys, kind="stable"), logw, ukeys, values
        )
        touched = np.concatenate([items, neg[neg >= 0].ravel()])
        trans_rows = np.empty(0, np.int32)
        if c.transition_weight > 0 and n:
            trans_rows = update_transitions(
                st.transitions,
                users,
                items,
                batch.times,
                c.decay_rate,
                clock0=clock0,
                weight=c.transition_weight,
                n_items0=i0,
                share=c.transition_norm == "share",
            )
        return BatchDelta(
            users=unique_rows(users, st.users.n),
            items=unique_rows(touched, st.items.n),
            new_users=(u0, st.users.n),
            new_items=(i0, st.items.n),
            pair_keys=ukeys[:m],
            pair_values=values[:m],
            sampler_rebuilt=int(st.counters[Counter.REBUILDS]) != rebuilds,
            events=n,
            trans_rows=trans_rows,
        )


def merge_deltas(deltas: list[BatchDelta], state: ModelState) -> BatchDelta:
    """One delta for consecutive batches (a batch learned in pieces commits as one)."""
    if len(deltas) == 1:
        return deltas[0]
    keys = unique_sorted(np.concatenate([d.pair_keys for d in deltas]))
    values = np.empty(keys.shape[0], dtype=np.float64)
    lookup_confidence(state.confidence, keys, values)
    return BatchDelta(
        users=unique_rows(np.concatenate([d.users for d in deltas]), state.users.n),
        items=unique_rows(np.concatenate([d.items for d in deltas]), state.items.n),
        new_users=(deltas[0].new_users[0], deltas[-1].new_users[1]),
        new_items=(deltas[0].new_items[0], deltas[-1].new_items[1]),
        pair_keys=keys,
        pair_values=values,
        sampler_rebuilt=any(d.sampler_rebuilt for d in deltas),
        events=sum(d.events for d in deltas),
        trans_rows=unique_sorted(np.concatenate([d.trans_rows for d in deltas])).astype(np.int32),
    )
