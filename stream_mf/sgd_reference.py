"""Plain numpy/Python twin of `sgd.sgd_batch`: slow, obvious, and the tests' reference."""

from __future__ import annotations

import math

import numpy as np

from stream_mf.rng import py_next_uniform, py_stream_seed
from stream_mf.sgd import CDF_LEN, EVENTS, LOSS_LOGISTIC, MAX_NEG_TRIES, NEXT_REFRESH, REBUILDS


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _rebuild_cdf(logpop: np.ndarray, n_items: int, exponent: float) -> np.ndarray:
    lp = logpop[:n_items]
    seen = np.isfinite(lp)
    weights = np.zeros(n_items)
    if seen.any():
        weights[seen] = np.exp(exponent * (lp[seen] - lp[seen].max()))
    return np.cumsum(weights)


def sgd_batch_reference(
    users: np.ndarray,
    items: np.ndarray,
    base_w: np.ndarray,
    times: np.ndarray,
    partitions: np.ndarray,
    offsets: np.ndarray,
    U: np.ndarray,
    V: np.ndarray,
    bias: np.ndarray,
    u_count: np.ndarray,
    u_last: np.ndarray,
    u_logact: np.ndarray,
    i_count: np.ndarray,
    i_last: np.ndarray,
    i_logpop: np.ndarray,
    cdf: np.ndarray,
    counters: np.ndarray,
    clock: np.ndarray,
    n_items: int,
    neg_out: np.ndarray,
    logw_out: np.ndarray,
    lr: float,
    reg: float,
    reg_bias: float,
    n_neg: int,
    neg_exponent: float,
    neg_weight: float,
    decay_rate: float,
    loss: int,
    seed: int,
    refresh: int,
) -> None:
    """Same signature and effects as `sgd_batch`."""
    for e in range(len(users)):
        done = int(counters[EVENTS])
        if done >= counters[NEXT_REFRESH]:
            cdf[:n_items] = _rebuild_cdf(i_logpop, n_items, neg_exponent)
            counters[CDF_LEN] = n_items
            counters[REBUILDS] += 1
            counters[NEXT_REFRESH] = done + min(max(done, 1), refresh)
        u, i, t = int(users[e]), int(items[e]), float(times[e])
        clock[0] = max(clock[0], t)
        w = base_w[e] * math.exp(-(clock[0] - t) * decay_rate)
        lw = math.log(base_w[e]) + t * decay_rate
        logw_out[e] = lw

        s = py_stream_seed(seed, int(partitions[e]), int(offsets[e]))
        ncdf = int(counters[CDF_LEN])
        for j in range(n_neg):
            neg = -1
            if ncdf > 0 and cdf[ncdf - 1] > 0:
                for _ in range(MAX_NEG_TRIES):
                    s, x = py_next_uniform(s)
                    cand = int(np.searchsorted(cdf[:ncdf], x * cdf[ncdf - 1], side="right"))
                    if cand != i:
                        neg = cand
                        break
            neg_out[e, j] = neg

        u_count[u] += 1
        u_last[u] = max(u_last[u], t)
        u_logact[u] = np.logaddexp(u_logact[u], lw)
        i_count[i] += 1
        i_last[i] = max(i_last[i], t)
        i_logpop[i] = np.logaddexp(i_logpop[i], lw)
        counters[EVENTS] += 1

        u_old = U[u].astype(np.float64)
        x_pos = float(bias[i]) + float(u_old @ V[i])
        negs = [int(n) for n in neg_out[e] if n >= 0]
        g_negs = []
        if loss == LOSS_LOGISTIC:
            g_pos = w * (_sigmoid(x_pos) - 1.0)
            grad_u = g_pos * V[i].astype(np.float64)
            for neg in negs:
                g = w * neg_weight * _sigmoid(float(bias[neg]) + float(u_old @ V[neg]))
                g_negs.append(g)
                grad_u += g * V[neg]
        else:
            g_pos = 0.0
            grad_u = np.zeros_like(u_old)
            for neg in negs:
                x_neg = float(bias[neg]) + float(u_old @ V[neg])
                g = w * (_sigmoid(x_pos - x_neg) - 1.0)
                g_pos += g
                g_negs.append(-g)
                grad_u += g * (V[i] - V[neg])
        for neg, g in zip(negs, g_negs, strict=True):
            V[neg] -= lr * (g * u_old + reg * V[neg])
            bias[neg] -= lr * (g + reg_bias * bias[neg])
        V[i] -= lr * (g_pos * u_old + reg * V[i])
        bias[i] -= lr * (g_pos + reg_bias * bias[i])
        U[u] -= lr * (grad_u + reg * u_old)
