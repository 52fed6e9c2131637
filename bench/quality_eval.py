"""A fast exact prequential loop for the online model, for quality sweeps (bench only).

`stream_mf.evaluate.prequential` asks a learner through Python objects per event (~3k events/s
here today). For the online model alone, the same test-then-learn is cheaper: ids are resolved
once up front in first-seen order (the rows, seeded starts and sampler tables are then exactly
what one event at a time builds: see `rebuild_cdf`), each event is scored with one mat-vec
against the items known before it, its rank counted with the user's seen items excluded, and the
kernel is called on that one event. `check_against_prequential` checks the hits equal
`prequential`'s on a prefix (float ties aside). Optional scoring-time signals (recency of the
user's own last items, a decayed item-to-item transition count) are added here only, to measure
them before building them into the query path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stream_mf.config import ModelConfig
from stream_mf.datasets import EventColumns
from stream_mf.evaluate import base_weights
from stream_mf.sgd import EntityArrays, SgdParams, StreamArrays, _sgd_kernel
from stream_mf.state import ModelState
from stream_mf.transitions import Transitions, add_bonus
from stream_mf.transitions import update as update_transitions


@dataclass
class Extras:
    """Scoring-time signals on top of u.v (+ bias); all off by default."""

    recency: float = 0.0  # weight of the mean of the user's last `recent` item vectors
    recent: int = 3
    transition: float = 0.0  # weight of log1p(decayed count last-item -> item), normalised
    transition_half_life: float = 20_000.0  # in events
    pull: float = 0.0  # after learning, U[u] += pull * V[i] (kernel-side recency, no new state)
    pull_convex: bool = False  # U[u] = (1 - pull) U[u] + pull * V[i] instead
    # the experimental kernel (bench/quality_kernels.py): per-row adaptive rates, in-kernel pull
    ada_eps: float = 0.0  # 0: off; else lr / sqrt(1 + acc / ada_eps)
    ada_decay: float = 1.0  # 1: AdaGrad; < 1: the accumulator decays per update of its row

    @property
    def experimental(self) -> bool:
        return self.ada_eps > 0


@dataclass
class Run:
    recall: float
    ndcg: float
    evaluated: int
    hits_at: np.ndarray = field(repr=False)  # per event: -1 not scored, 0 miss, 1 hit
    model: Any = field(repr=False, default=None)


def fast_prequential(
    events: EventColumns,
    cfg: ModelConfig,
    k: int = 10,
    extras: Extras | None = None,
    limit: int | None = None,
) -> Run:
    x = extras or Extras()
    n = len(events) if limit is None else min(limit, len(events))
    st = ModelState.empty(cfg)
    users = st.users.resolve(events.users[:n])
    items = st.items.resolve(events.items[:n])
    st.sync_capacity()
    w = base_weights(events, cfg.event_types)[:n]
    times = np.ascontiguousarray(events.times[:n], np.float64)
    parts = np.zeros(n, np.int32)
    offs = np.arange(n, dtype=np.int64)
    neg = np.empty((n, cfg.n_negatives), np.int32)
    logw = np.empty(n)
    p = tuple(SgdParams.from_config(cfg))
    ut = tuple(EntityArrays.of(st.users))
    it = tuple(EntityArrays.of(st.items))
    stt = tuple(StreamArrays(st.cdf, st.counters, st.clock))
    V, b, U = st.items.factors, st.items.bias, st.users.factors
    out = np.full(n, -1, np.int8)
    ada = x.experimental
    acc_u = np.zeros(st.users.capacity)
    acc_i = np.zeros(st.items.capacity)
    if ada:
        from quality_kernels import ada_kernel
    # the shipped transitions (stream_mf/transitions.py, `ModelConfig.transition_weight`),
    # unless the experimental ones of `Extras` are asked for
    shipped = cfg.transition_weight > 0 and not x.transition
    tr = Transitions.empty(cfg.transition_slots, st.users.capacity, st.items.capacity)
    share = cfg.transition_norm == "share"
    seen: dict[int, set[int]] = {}
    seen_list: dict[int, list[int]] = {}
    recent: dict[int, list[int]] = {}
    trans: dict[int, dict[int, float]] = {}  # last item -> item -> log decayed count
    rate = math.log(2.0) / x.transition_half_life
    nk = 0  # items known before this event (first-seen order: new item index == nk)
    nu = 0
    hits = 0
    ev = 0
    ndcg = 0.0
    ul, il = users.tolist(), items.tolist()
    for e in range(n):
        u, i = ul[e], il[e]
        if u < nu:
            mine = seen[u]
            if i not in mine:
                ev += 1
                hit = False
                if i < nk:
                    q = U[u]
                    if x.recency and recent.get(u):
                        q = q + x.recency * V[recent[u]].mean(axis=0)
                    s = V[:nk] @ q + b[:nk]
                    if shipped:
                        add_bonus(s, tr.succ, tr.logw, int(tr.last[u]), float(st.clock[0]),
                                  cfg.decay_rate, cfg.transition_weight, share)  # fmt: skip
                    if x.transition and recent.get(u):
                        row = trans.get(recent[u][-1])
                        if row:
                            ks = np.fromiter(row.keys(), np.int64, len(row))
                            vs = np.fromiter(row.values(), np.float64, len(row))
                            vs = np.log1p(np.exp(vs - e * rate))
                            s[ks] += (x.transition * vs / vs.max()).astype(s.dtype)
                    si = s[i]
                    s[seen_list[u]] = -np.inf
                    r = int(np.count_nonzero(s > si))
                    if math.isfinite(si) and r < k:
                        hit = True
                        hits += 1
                        ndcg += 1.0 / math.log2(r + 2.0)
                out[e] = 1 if hit else 0
        kargs = (
            (
                users[e : e + 1],
                items[e : e + 1],
                w[e : e + 1],
                times[e : e + 1],
                parts[e : e + 1],
                offs[e : e + 1],
                neg[e : e + 1],
                logw[e : e + 1],
            ),
            ut,
            it,
            stt,
            p,
        )
        if ada:
            ada_kernel(acc_u, acc_i, x.ada_eps, x.ada_decay, *kargs)
        else:
            _sgd_kernel(*kargs)
        if shipped:
            update_transitions(tr, users[e : e + 1], items[e : e + 1], times[e : e + 1],
                               cfg.decay_rate)  # fmt: skip
        if x.pull:
            if x.pull_convex:
                U[u] = (1.0 - x.pull) * U[u] + x.pull * V[i]
            else:
                U[u] += x.pull * V[i]
            nrm = float(np.sqrt(U[u] @ U[u]))
            if cfg.max_norm and nrm > cfg.max_norm:
                U[u] *= cfg.max_norm / nrm
        if x.transition and recent.get(u):
            last = recent[u][-1]
            if last != i:
                row = trans.setdefault(last, {})
                old = row.get(i)
                lw = e * rate
                row[i] = lw if old is None else max(old, lw) + math.log1p(math.exp(-abs(old - lw)))
        if u >= nu:
            nu = u + 1
            seen[u] = set()
            seen_list[u] = []
        if i >= nk:
            nk = i + 1
        if i not in seen[u]:
            seen[u].add(i)
            seen_list[u].append(i)
        r_u = recent.setdefault(u, [])
        r_u.append(i)
        if len(r_u) > x.recent:
            del r_u[0]
    return Run(hits / max(ev, 1), ndcg / max(ev, 1), ev, out, st)
