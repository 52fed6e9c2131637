"""Prequential scoring a block of events at a time, with the per-event loop's answers.

The per-event loop (`evaluate.prequential`'s reference path) scores each event with one
matrix-vector product against every item and a top-K scan, from Python: the loop, not the math,
dominated. Here a block of events is learnt in one kernel call that records, for each event, its
user's row as it was when the event came in (its test time) and every item row the event changed
(its positive and its negatives). The block is then scored with one matrix product against the
item rows as they were when the block began, and each event's scores are corrected for the rows
that earlier events of the block changed. Each event is still scored by the model as it was just
before it learnt that event (test-then-learn), and the block's learning runs the SGD kernel event
by event on the same records, so the model ends exactly where the per-event loop leaves it.

An event's rank is counted, not sorted: the number of items (of those the model knew at its test
time, the user's seen ones left out) that `topk.top_k` would put before it: a finite higher
score, or an equal one at a lower index. A hit is a rank under K, as the loop's top-K lookup.
The block's matrix product sums in another order than the loop's matrix-vector product, so an
item tied with another to the last float bit may rank on the other side of it: the tests count
those (tests/unit/test_block_eval.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from stream_mf.model import EventBatch, OnlineModel
from stream_mf.sgd import EntityArrays, KernelBatch, SgdParams, StreamArrays, _sgd_kernel
from stream_mf.transitions import TransitionLog

NOT_SCORED = -2  # a new user's event, or an item the user already has
MISS = -1
_INF = np.inf


@njit(cache=True, nogil=True)
def _learn_recording(
    batch: tuple[Any, ...],
    user_t: tuple[Any, ...],
    item_t: tuple[Any, ...],
    stream: tuple[Any, ...],
    p: tuple[Any, ...],
    popularity: bool,
    q: np.ndarray,
    log_item: np.ndarray,
    log_row: np.ndarray,
    log_add: np.ndarray,
    log_ptr: np.ndarray,
) -> None:
    """`sgd._sgd_kernel` one event at a time (the same arithmetic as one call on the batch),
    recording each event's user row before it learns (`q`) and the item rows it changed after
    (`log_*`, event e's in [log_ptr[e], log_ptr[e + 1])): the factor row and bias, or under
    `popularity` the log-popularity of its item."""
    users, items, base_w, times, partitions, offsets, neg_out, logw_out = batch
    factors_u = user_t[0]
    factors_v, bias, logpop = item_t[0], item_t[1], item_t[4]
    dim = q.shape[1]
    n_log = 0
    for e in range(users.shape[0]):
        u = users[e]
        for f in range(dim):
            q[e, f] = factors_u[u, f]
        one = (
            users[e : e + 1],
            items[e : e + 1],
            base_w[e : e + 1],
            times[e : e + 1],
            partitions[e : e + 1],
            offsets[e : e + 1],
            neg_out[e : e + 1],
            logw_out[e : e + 1],
        )
        _sgd_kernel(one, user_t, item_t, stream, p)
        log_ptr[e] = n_log
        i = items[e]
        if popularity:
            log_item[n_log] = i
            log_add[n_log] = logpop[i]
            n_log += 1
            continue
        for j in range(-1, neg_out.shape[1]):
            c = i if j < 0 else neg_out[e, j]
            if c < 0:
                continue
            log_item[n_log] = c
            for f in range(dim):
                log_row[n_log, f] = factors_v[c, f]
            log_add[n_log] = bias[c]
            n_log += 1
    log_ptr[users.shape[0]] = n_log


@njit(cache=True, inline="always")
def _beats(x: float, j: int, st: float, t: int) -> int:
    """Whether item j (score x) ranks before the target t (score st), as `top_k` orders."""
    return 1 if (x > st and x < _INF) or (x == st and j < t) else 0


@njit(cache=True, nogil=True)
def _rank_block(
    base: np.ndarray,
    shared: bool,
    qlog: np.ndarray,
    users: np.ndarray,
    items: np.ndarray,
    n_users0: int,
    n_items0: int,
    log_item: np.ndarray,
    log_add: np.ndarray,
    log_ptr: np.ndarray,
    head: np.ndarray,
    nxt: np.ndarray,
    node_item: np.ndarray,
    n_nodes: int,
    slot_of: np.ndarray,
    ov_item: np.ndarray,
    ov_log: np.ndarray,
    pscore: np.ndarray,
    k: int,
    out: np.ndarray,
    b_ptr: np.ndarray,
    b_item: np.ndarray,
    b_val: np.ndarray,
    bon: np.ndarray,
) -> int:
    """Each event's 0-based rank if under `k`, MISS, or NOT_SCORED, into `out`.

    `base[e]` (`base[0]` if `shared`) holds every item's score against the block's starting
    rows; a row changed by earlier events of the block is re-scored from its latest log entry m
    (`ov_log`, by `slot_of`): `qlog[e, m] + log_add[m]`, `qlog` being the block's user rows
    times the logged item rows (none under `shared`: popularity is `log_add` alone). Each
    user's items are a linked list (`head`, `nxt`, `node_item`), extended here; returns the new
    node count. `slot_of` is left all -1. Transitions (`stream_mf.transitions`): event e's
    items [b_ptr[e], b_ptr[e + 1]) of `b_item` score `b_val` more (float32 sums, as the query's
    `scores[idx] += val`), spread into `bon` (all zero, left so) while e is ranked; an empty
    `b_ptr` means none."""
    use_bonus = b_ptr.shape[0] > 0
    n_slots = 0
    known_u, known_i = n_users0, n_items0
    for e in range(users.shape[0]):
        u, i = users[e], items[e]
        row = base[0] if shared else base[e]
        seen = False
        if u < known_u:
            node = head[u]
            while node >= 0:
                if node_item[node] == i:
                    seen = True
                    break
                node = nxt[node]
        if u >= known_u or seen:
            out[e] = NOT_SCORED
        else:
            t = i if i < known_i else -1
            for s in range(n_slots):
                m = ov_log[s]
                if shared:
                    pscore[s] = log_add[m]
                else:
                    pscore[s] = np.float32(qlog[e, m] + np.float32(log_add[m]))
            if use_bonus:  # --- transitions (a sparse bonus per event) ---
                for m in range(b_ptr[e], b_ptr[e + 1]):
                    bon[b_item[m]] = b_val[m]
            if t < 0:
                out[e] = MISS
            else:
                st = pscore[slot_of[t]] if slot_of[t] >= 0 else np.float64(row[t])
                if use_bonus and bon[t] != 0:
                    st = np.float64(np.float32(np.float32(st) + bon[t]))
                if not np.isfinite(st):
                    out[e] = MISS
                else:
                    c = 0
                    for j in range(t):
                        x = np.float64(row[j])
                        c += 1 if (x >= st and x < _INF) else 0
                    for j in range(t + 1, known_i):
                        x = np.float64(row[j])
                        c += 1 if (x > st and x < _INF) else 0
                    for s in range(n_slots):
                        j = ov_item[s]
                        if j != t:
                            c += _beats(pscore[s], j, st, t) - _beats(row[j], j, st, t)
                    if use_bonus:
                        for m in range(b_ptr[e], b_ptr[e + 1]):
                            j = b_item[m]
                            if j != t:
                                x = pscore[slot_of[j]] if slot_of[j] >= 0 else np.float64(row[j])
                                xb = np.float64(np.float32(np.float32(x) + bon[j]))
                                c += _beats(xb, j, st, t) - _beats(x, j, st, t)
                    node = head[u]
                    while node >= 0:
                        j = node_item[node]
                        if j != t and j < known_i:
                            x = pscore[slot_of[j]] if slot_of[j] >= 0 else np.float64(row[j])
                            if use_bonus and bon[j] != 0:
                                x = np.float64(np.float32(np.float32(x) + bon[j]))
                            c -= _beats(x, j, st, t)
                        node = nxt[node]
                    out[e] = c if c < k else MISS
            if use_bonus:
                for m in range(b_ptr[e], b_ptr[e + 1]):
                    bon[b_item[m]] = 0
        # learn: the user's items, the overlay, what the model knows from now on
        if not seen:
            node_item[n_nodes] = i
            nxt[n_nodes] = head[u]
            head[u] = n_nodes
            n_nodes += 1
        for m in range(log_ptr[e], log_ptr[e + 1]):
            j = log_item[m]
            s = slot_of[j]
            if s < 0:
                s = n_slots
                slot_of[j] = s
                ov_item[s] = j
                n_slots += 1
            ov_log[s] = m
        known_u = max(known_u, u + 1)
        known_i = max(known_i, i + 1)
    for s in range(n_slots):
        slot_of[ov_item[s]] = -1
    return n_nodes


class BlockScorer:
    """Scores blocks of one stream for one model (`popularity`: rank by decayed popularity,
    as `PopularLearner`; else by the factors and item biases, as `SGDLearner`). Holds what
    outlives a block: each user's items so far."""

    def __init__(self, model: OnlineModel, popularity: bool, k: int):
        self.model, self.popularity, self.k = model, popularity, k
        c = model.config
        self.dim = 0 if popularity else c.dim
        self.per_event = 1 if popularity else 1 + c.n_negatives
        self.head = np.full(1024, -1, np.int64)
        self.nxt = np.empty(4096, np.int64)
        self.node_item = np.empty(4096, np.int32)
        self.n_nodes = 0
        self.slot_of = np.full(1024, -1, np.int32)
        self.bon = np.zeros(1024, np.float32)  # transitions' scratch, all zero between events
        # filled by `kernel` while the block is learnt
        self._rec: dict[str, Any] = {}

    def _grow(self, n_events: int) -> None:
        st = self.model.state
        if self.head.shape[0] < st.users.capacity:
            head = np.full(st.users.capacity, -1, np.int64)
            head[: self.head.shape[0]] = self.head
            self.head = head
        if self.slot_of.shape[0] < st.items.capacity:
            self.slot_of = np.full(st.items.capacity, -1, np.int32)
        need = self.n_nodes + n_events
        if self.nxt.shape[0] < need:
            cap = max(need, 2 * self.nxt.shape[0])
            self.nxt = np.resize(self.nxt, cap)
            self.node_item = np.resize(self.node_item, cap)

    def kernel(
        self,
        batch: KernelBatch,
        user_t: EntityArrays,
        item_t: EntityArrays,
        stream: StreamArrays,
        p: SgdParams,
    ) -> None:
        """`sgd_batch`'s twin for `OnlineModel.learn`: the same learning, recorded."""
        n = batch.users.shape[0]
        n_items = item_t.n
        base: Any
        if self.popularity:
            base = item_t.logpop[:n_items].copy()
        else:
            base = (item_t.factors[:n_items].copy(), item_t.bias[:n_items].copy())
        rec = {
            "users": batch.users,
            "items": batch.items,
            "base": base,
            "q": np.empty((n, self.dim), np.float32),
            "log_item": np.empty(n * self.per_event, np.int32),
            "log_row": np.empty((n * self.per_event, self.dim), np.float32),
            "log_add": np.empty(n * self.per_event, np.float64),
            "log_ptr": np.empty(n + 1, np.int64),
        }
        _learn_recording(
            tuple(batch),
            tuple(user_t),
            tuple(item_t),
            tuple(stream),
            tuple(p),
            self.popularity,
            rec["q"],
            rec["log_item"],
            rec["log_row"],
            rec["log_add"],
            rec["log_ptr"],
        )
        self._rec = rec

    def begin(self) -> tuple[int, int]:
        """Call before learning a block: the model's user and item counts then."""
        st = self.model.state
        self._rec = {}
        if not self.popularity and st.config.transition_weight > 0:  # transitions: record
            st.transitions.recording = TransitionLog(*(np.empty(0, np.int64),) * 3)
        return st.users.n, st.items.n

    def ranks(self, start: tuple[int, int], out: np.ndarray) -> None:
        """After the block was learnt through `kernel`: its events' ranks into `out`."""
        rec = self._rec
        n = out.shape[0]
        if not n:
            return
        assert rec, "the block was not learnt through BlockScorer.kernel"
        self._grow(n)
        if self.popularity:
            base, shared = rec["base"][None, :], True
            qlog = np.empty((1, 1), np.float32)
        else:
            v0, b0 = rec["base"]
            base = rec["q"] @ v0.T
            qlog = rec["q"] @ rec["log_row"][: rec["log_ptr"][n]].T
            base += b0
            shared = False
        m = rec["log_item"].shape[0]
        tlog = self.model.state.transitions.recording  # transitions: each event's bonus
        self.model.state.transitions.recording = None
        if tlog is None or not tlog.ptr.size:
            tlog = TransitionLog(
                np.empty(0, np.int64), np.empty(0, np.int32), np.empty(0, np.float32)
            )
        if self.bon.shape[0] < self.model.state.items.capacity:
            self.bon = np.zeros(self.model.state.items.capacity, np.float32)
        self.n_nodes = _rank_block(
            base,
            shared,
            qlog,
            rec["users"],
            rec["items"],
            start[0],
            start[1],
            rec["log_item"],
            rec["log_add"],
            rec["log_ptr"],
            self.head,
            self.nxt,
            self.node_item,
            self.n_nodes,
            self.slot_of,
            np.empty(m, np.int32),
            np.empty(m, np.int64),
            np.empty(m, np.float64),
            self.k,
            out,
            tlog.ptr,
            tlog.item,
            tlog.value,
            self.bon,
        )
        self._rec = {}


def learn_block(model: OnlineModel, scorer: BlockScorer, batch: EventBatch) -> None:
    """Learn `batch` recorded, for a learner with nothing else to do per batch."""
    model.learn(batch, kernel=scorer.kernel)
