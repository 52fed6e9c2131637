"""Plain numpy/Python twin of `sgd.sgd_batch`: slow, obvious, and the tests' reference."""

from __future__ import annotations

import math

import numpy as np

from stream_mf.rng import py_next_uniform, py_stream_seed
from stream_mf.sgd import (
    LOSS_LOGISTIC,
    MAX_NEG_TRIES,
    Counter,
    EntityArrays,
    KernelBatch,
    SgdParams,
    StreamArrays,
)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _rebuild_cdf(table: np.ndarray, logpop: np.ndarray, n_items: int, exponent: float) -> int:
    lp = logpop[:n_items]
    seen = np.isfinite(lp)
    weights = np.zeros(n_items)
    if seen.any():
        top = lp[seen].max()
        weights[seen] = [math.exp(exponent * (v - top)) for v in lp[seen].tolist()]
    table[0, :n_items] = np.cumsum(weights)
    length = int(np.flatnonzero(seen)[-1]) + 1 if seen.any() else 0
    if length and table[0, length - 1] > 0:
        _build_alias(table, length)
    return length


def _build_alias(table: np.ndarray, n: int) -> None:
    """Vose's alias method, step for step as in `sgd.build_alias`."""
    total = table[0, n - 1]
    cum = table[0, :n]
    w = np.diff(cum, prepend=0.0)
    scaled = [float(x) * n / total for x in w.tolist()]
    small = [i for i in range(n) if scaled[i] < 1.0]
    large = [i for i in range(n) if scaled[i] >= 1.0]
    while small and large:
        lo, hi = small.pop(), large.pop()
        table[1, lo] = scaled[lo]
        table[2, lo] = hi
        scaled[hi] = (scaled[hi] + scaled[lo]) - 1.0
        (small if scaled[hi] < 1.0 else large).append(hi)
    for i in large + small:
        table[1, i] = 1.0
        table[2, i] = i


def _draw(table: np.ndarray, n: int, u: float) -> int:
    y = u * n
    c = min(int(y), n - 1)
    return int(table[2, c]) if y - c >= table[1, c] else c


def _seen(table: np.ndarray, c: int) -> bool:
    return bool(table[0, c] != (table[0, c - 1] if c > 0 else 0.0))


def _clip(A: np.ndarray, r: int, max_norm: float) -> None:
    norm = float(np.linalg.norm(A[r].astype(np.float64)))
    if max_norm > 0 and norm > max_norm:
        A[r] *= max_norm / norm


def sgd_batch_reference(
    batch: KernelBatch,
    user_t: EntityArrays,
    item_t: EntityArrays,
    stream: StreamArrays,
    p: SgdParams,
) -> None:
    """Same records and effects as `sgd_batch`."""
    users, items, base_w, times, partitions, offsets, neg_out, logw_out = batch
    U, u_count, u_last, u_logact = user_t.factors, user_t.events, user_t.last, user_t.logpop
    V, bias, i_count, i_last, i_logpop = (
        item_t.factors,
        item_t.bias,
        item_t.events,
        item_t.last,
        item_t.logpop,
    )
    cdf, counters, clock = stream
    lr, reg, reg_bias, n_neg = p.lr, p.reg, p.reg_bias, p.n_neg
    uniform_mix, bias_uniform, max_norm = p.uniform_mix, p.bias_uniform, p.max_norm
    for e in range(len(users)):
        done = int(counters[Counter.EVENTS])
        if done >= counters[Counter.NEXT_REFRESH]:
            counters[Counter.CDF_LEN] = _rebuild_cdf(cdf, i_logpop, item_t.n, p.neg_exponent)
            counters[Counter.REBUILDS] += 1
            counters[Counter.NEXT_REFRESH] = done + min(max(done, 1), p.refresh)
        u, i, t = int(users[e]), int(items[e]), float(times[e])
        clock[0] = max(clock[0], t)
        w = base_w[e] * math.exp(-(clock[0] - t) * p.decay_rate)
        lw = math.log(base_w[e]) + t * p.decay_rate
        logw_out[e] = lw

        s = py_stream_seed(p.seed, int(partitions[e]), int(offsets[e]))
        ncdf = int(counters[Counter.CDF_LEN])
        u_old = U[u].astype(np.float64)
        x_negs = np.zeros(n_neg)
        bmask = np.ones(n_neg)
        for j in range(n_neg):
            best, best_x, best_uni = -1, 0.0, False
            for _ in range(p.n_candidates):
                cand, uni = -1, False
                if ncdf > 0 and cdf[0, ncdf - 1] > 0:
                    for _ in range(MAX_NEG_TRIES):
                        s, x = py_next_uniform(s)
                        uni = x < uniform_mix
                        if uni:
                            c = min(int(x / uniform_mix * ncdf), ncdf - 1)
                        else:
                            c = _draw(cdf, ncdf, (x - uniform_mix) / (1.0 - uniform_mix))
                        if not _seen(cdf, c):
                            continue
                        if c != i:
                            cand = c
                            break
                if cand >= 0:
                    xc = float(bias[cand]) + float(u_old @ V[cand])
                    if best < 0 or xc > best_x:
                        best, best_x, best_uni = cand, xc, uni
            neg_out[e, j] = best
            x_negs[j] = best_x
            if bias_uniform:
                bmask[j] = 1.0 if best_uni else 0.0

        u_count[u] += 1
        u_last[u] = max(u_last[u], t)
        u_logact[u] = np.logaddexp(u_logact[u], lw)
        i_count[i] += 1
        i_last[i] = max(i_last[i], t)
        i_logpop[i] = np.logaddexp(i_logpop[i], lw)
        counters[Counter.EVENTS] += 1

        negs = [(j, int(n)) for j, n in enumerate(neg_out[e]) if n >= 0]
        for step in range(p.n_steps):
            u_old = U[u].astype(np.float64)
            x_pos = float(bias[i]) + float(u_old @ V[i])
            if step > 0:
                for j, neg in negs:
                    x_negs[j] = float(bias[neg]) + float(u_old @ V[neg])
            if p.loss == LOSS_LOGISTIC:
                g_pos = w * (_sigmoid(x_pos) - 1.0)
                g_negs = [w * p.neg_weight * _sigmoid(x_negs[j]) for j, _ in negs]
                g_pos_b = g_pos
            else:
                g_negs = [-w * (_sigmoid(x_pos - x_negs[j]) - 1.0) for j, _ in negs]
                g_pos = -sum(g_negs)
                g_pos_b = -sum(g * bmask[j] for (j, _), g in zip(negs, g_negs, strict=True))
            grad_u = g_pos * V[i].astype(np.float64)
            for (_, neg), g in zip(negs, g_negs, strict=True):
                grad_u += g * V[neg]
            for (j, neg), g in zip(negs, g_negs, strict=True):
                V[neg] -= lr * (g * u_old + reg * V[neg])
                bias[neg] -= lr * p.lr_bias * (g * bmask[j] + reg_bias * bias[neg])
                _clip(V, neg, max_norm)
            V[i] -= lr * (g_pos * u_old + reg * V[i])
            bias[i] -= lr * p.lr_bias * (g_pos_b + reg_bias * bias[i])
            _clip(V, i, max_norm)
            U[u] -= lr * p.lr_user * (grad_u + reg * u_old)
            _clip(U, u, max_norm)
        if p.user_pull > 0:
            U[u] += p.user_pull * V[i]
            _clip(U, u, max_norm)
