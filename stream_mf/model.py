"""The online learner: folds micro-batches of events into the state and reports what changed.

`learn` returns a `BatchDelta` naming every row it touched, which is exactly what the store must
persist (and nothing more): that keeps a RocksDB commit proportional to the batch, not the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numba import njit

from stream_mf.config import ModelConfig
from stream_mf.sgd import NEG_INF, REBUILDS, logaddexp, sgd_batch
from stream_mf.state import ModelState


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

    @classmethod
    def empty(cls, state: ModelState) -> BatchDelta:
        """No change: for commits that only carry offsets or a rebuild's rows."""
        none = np.empty(0, np.int32)
        return cls(
            users=none, items=none, new_users=(state.users.n, state.users.n),
            new_items=(state.items.n, state.items.n), pair_keys=np.empty(0, np.int64),
            pair_values=np.empty(0), sampler_rebuilt=False, events=0,
        )  # fmt: skip


@njit(cache=True, nogil=True)
def accumulate_confidence(conf, users, items, logw, keys_out) -> None:  # type: ignore[no-untyped-def]
    for e in range(users.shape[0]):
        key = (np.int64(users[e]) << 32) | np.int64(items[e])
        conf[key] = logaddexp(conf.get(key, NEG_INF), logw[e])
        keys_out[e] = key


@njit(cache=True, nogil=True)
def lookup_confidence(conf, keys, out) -> None:  # type: ignore[no-untyped-def]
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

    def learn(self, batch: EventBatch) -> BatchDelta:
        st, c = self.state, self.config
        n = len(batch)
        u0, i0 = st.users.n, st.items.n
        users = st.users.resolve(batch.user_ids)
        items = st.items.resolve(batch.item_ids)
        st.sync_capacity()
        neg = np.empty((n, c.n_negatives), dtype=np.int32)
        logw = np.empty(n, dtype=np.float64)
        rebuilds = int(st.counters[REBUILDS])
        if n:
            sgd_batch(
                users, items, batch.weights, batch.times, batch.partitions, batch.offsets,
                st.users.factors, st.items.factors, st.items.bias,
                st.users.count, st.users.last, st.users.logpop,
                st.items.count, st.items.last, st.items.logpop,
                st.cdf, st.counters, st.clock, st.items.n, neg, logw,
                c.learning_rate, c.reg, c.reg_bias, c.n_negatives, c.negative_exponent,
                c.negative_weight, c.decay_rate, c.loss_code, c.seed, c.sampler_refresh,
                c.n_candidates, c.n_steps, c.lr_user, c.lr_bias, c.max_norm, c.uniform_mix,
            )  # fmt: skip
        keys = np.empty(n, dtype=np.int64)
        accumulate_confidence(st.confidence, users, items, logw, keys)
        ukeys = np.unique(keys)
        values = np.empty(ukeys.shape[0], dtype=np.float64)
        lookup_confidence(st.confidence, ukeys, values)
        touched = np.concatenate([items, neg[neg >= 0].ravel()])
        return BatchDelta(
            users=np.unique(users),
            items=np.unique(touched),
            new_users=(u0, st.users.n),
            new_items=(i0, st.items.n),
            pair_keys=ukeys,
            pair_values=values,
            sampler_rebuilt=int(st.counters[REBUILDS]) != rebuilds,
            events=n,
        )


def merge_deltas(deltas: list[BatchDelta], state: ModelState) -> BatchDelta:
    """One delta for consecutive batches (a batch learned in pieces commits as one)."""
    if len(deltas) == 1:
        return deltas[0]
    keys = np.unique(np.concatenate([d.pair_keys for d in deltas]))
    values = np.empty(keys.shape[0], dtype=np.float64)
    lookup_confidence(state.confidence, keys, values)
    return BatchDelta(
        users=np.unique(np.concatenate([d.users for d in deltas])),
        items=np.unique(np.concatenate([d.items for d in deltas])),
        new_users=(deltas[0].new_users[0], deltas[-1].new_users[1]),
        new_items=(deltas[0].new_items[0], deltas[-1].new_items[1]),
        pair_keys=keys,
        pair_values=values,
        sampler_rebuilt=any(d.sampler_rebuilt for d in deltas),
        events=sum(d.events for d in deltas),
    )
