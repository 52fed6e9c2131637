"""An experimental variant of the SGD kernel, for the quality ablation only (bench/quality_eval.py).

A copy of `stream_mf.sgd._sgd_kernel` (generated from it; re-generate after a kernel change) with
per-row adaptive rates: each row keeps the decayed sum of its mean squared gradient, `acc`
(AdaGrad with `ada_decay` 1, RMSProp-like below), and steps at lr / sqrt(1 + acc / ada_eps), so a
row starts at today's rate and slows as it is updated. It lost on MovieLens (docs/quality-ablation.md),
so it stays here rather than in the shipped kernel.
"""

# ruff: noqa
# mypy: ignore-errors
from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit

from stream_mf.rng import next_uniform, stream_seed
from stream_mf.sgd import (
    _FAST,
    LOSS_LOGISTIC,
    MAX_NEG_TRIES,
    Counter,
    _clip_norm,
    draw_item,
    is_seen,
    logaddexp,
    rebuild_cdf,
    sigmoid,
)


@njit(cache=False, nogil=True, error_model="numpy", fastmath=_FAST)
def ada_kernel(
    acc_u: np.ndarray,
    acc_i: np.ndarray,
    ada_eps: float,
    ada_decay: float,
    batch: tuple[Any, ...],
    user_t: tuple[Any, ...],
    item_t: tuple[Any, ...],
    stream: tuple[Any, ...],
    p: tuple[Any, ...],
) -> None:
    """`sgd_batch` on its records as plain tuples, unpacked in their fields' order (a field
    moved in a record and not here fails numba's typing or the twin test)."""
    users, items, base_w, times, partitions, offsets, neg_out, logw_out = batch
    U, _u_bias, u_count, u_last, u_logact, _n_users = user_t
    V, bias, i_count, i_last, i_logpop, n_items = item_t
    cdf, counters, clock = stream
    (
        lr,
        reg,
        reg_bias,
        n_neg,
        neg_exponent,
        neg_weight,
        decay_rate,
        loss,
        seed,
        refresh,
        n_candidates,
        n_steps,
        lr_user,
        lr_bias,
        max_norm,
        uniform_mix,
        bias_uniform,
        user_pull,
    ) = p
    dim = U.shape[1]
    u_old = np.empty(dim, dtype=np.float32)
    grad_u = np.empty(dim, dtype=np.float32)
    gneg = np.empty(max(n_neg, 1), dtype=np.float64)
    xneg = np.empty(max(n_neg, 1), dtype=np.float64)
    # 1.0 where a slot's bias gradient counts: every slot, or (bias_uniform) uniform draws only
    bmask = np.ones(max(n_neg, 1), dtype=np.float64)
    lr_u = lr * lr_user
    lr_b = lr * lr_bias
    for e in range(users.shape[0]):
        # sampler schedule: rebuilt after 1, 2, 4, ... events, then every `refresh`
        done = counters[Counter.EVENTS]
        if done >= counters[Counter.NEXT_REFRESH]:
            counters[Counter.CDF_LEN] = rebuild_cdf(cdf, i_logpop, n_items, neg_exponent)
            counters[Counter.REBUILDS] += 1
            counters[Counter.NEXT_REFRESH] = done + min(max(done, 1), refresh)

        u = users[e]
        i = items[e]
        t = times[e]
        if t > clock[0]:
            clock[0] = t
        w = base_w[e] * math.exp(-(clock[0] - t) * decay_rate)
        lw = math.log(base_w[e]) + t * decay_rate
        logw_out[e] = lw

        # negatives, drawn before this event's own popularity is counted: each slot keeps the
        # highest-scoring of `n_candidates` draws (adaptive, WARP-like); its score is kept for
        # the first step
        for f in range(dim):
            u_old[f] = U[u, f]
        s = stream_seed(seed, partitions[e], offsets[e])
        ncdf = counters[Counter.CDF_LEN]
        can_draw = ncdf > 0 and cdf[0, ncdf - 1] > 0.0
        for j in range(n_neg):
            best = -1
            best_x = 0.0
            best_uni = False
            for _c in range(n_candidates):
                cand = -1
                uni = False
                if can_draw:
                    for _ in range(MAX_NEG_TRIES):
                        s, x = next_uniform(s)
                        uni = x < uniform_mix
                        if uni:
                            c = min(int(x / uniform_mix * ncdf), ncdf - 1)
                        else:
                            c = draw_item(cdf, ncdf, (x - uniform_mix) / (1.0 - uniform_mix))
                        if not is_seen(cdf, c):
                            continue  # not seen when the table was built
                        if c != i:
                            cand = c
                            break
                if cand < 0:
                    continue
                xc = np.float64(bias[cand])
                for f in range(dim):
                    xc += np.float64(u_old[f]) * V[cand, f]
                if best < 0 or xc > best_x:
                    best = cand
                    best_x = xc
                    best_uni = uni
            neg_out[e, j] = best
            xneg[j] = best_x
            if bias_uniform:
                bmask[j] = 1.0 if best_uni else 0.0

        u_count[u] += 1
        if t > u_last[u]:
            u_last[u] = t
        u_logact[u] = logaddexp(u_logact[u], lw)
        i_count[i] += 1
        if t > i_last[i]:
            i_last[i] = t
        i_logpop[i] = logaddexp(i_logpop[i], lw)
        counters[Counter.EVENTS] += 1

        for step in range(n_steps):
            # scores use the vectors as they were before this step
            if step > 0:
                for f in range(dim):
                    u_old[f] = U[u, f]
            x_pos = np.float64(bias[i])
            for f in range(dim):
                x_pos += np.float64(u_old[f]) * V[i, f]
            for j in range(n_neg):
                neg = neg_out[e, j]
                if step > 0 and neg >= 0:
                    x = np.float64(bias[neg])
                    for f in range(dim):
                        x += np.float64(u_old[f]) * V[neg, f]
                    xneg[j] = x
            g_pos = 0.0
            g_pos_b = 0.0  # the positive's bias gradient (bias_uniform: uniform slots only)
            if loss == LOSS_LOGISTIC:
                g_pos = w * (sigmoid(x_pos) - 1.0)
                g_pos_b = g_pos
                for f in range(dim):
                    grad_u[f] = g_pos * V[i, f]
                for j in range(n_neg):
                    neg = neg_out[e, j]
                    if neg < 0:
                        gneg[j] = 0.0
                        continue
                    g = w * neg_weight * sigmoid(xneg[j])
                    gneg[j] = g
                    for f in range(dim):
                        grad_u[f] += g * V[neg, f]
            else:
                for j in range(n_neg):
                    neg = neg_out[e, j]
                    if neg < 0:
                        gneg[j] = 0.0
                        continue
                    g = w * (sigmoid(x_pos - xneg[j]) - 1.0)
                    g_pos += g
                    if bias_uniform:
                        g_pos_b += g * bmask[j]
                    gneg[j] = -g
                if not bias_uniform:
                    g_pos_b = g_pos
                for f in range(dim):
                    grad_u[f] = g_pos * V[i, f]
                for j in range(n_neg):
                    neg = neg_out[e, j]
                    if neg >= 0:
                        g = gneg[j]
                        for f in range(dim):
                            grad_u[f] += g * V[neg, f]

            for j in range(n_neg):
                neg = neg_out[e, j]
                if neg < 0:
                    continue
                g = gneg[j]
                sq = 0.0
                gs = 0.0
                for f in range(dim):
                    gf = g * u_old[f] + reg * V[neg, f]
                    gs += gf * gf
                acc_i[neg] = ada_decay * acc_i[neg] + gs / dim
                lr_r = lr / math.sqrt(1.0 + acc_i[neg] / ada_eps)
                for f in range(dim):
                    v = V[neg, f] - lr_r * (g * u_old[f] + reg * V[neg, f])
                    V[neg, f] = v
                    sq += v * v
                gb = g * bmask[j] if bias_uniform else g
                bias[neg] -= lr_b * (gb + reg_bias * bias[neg])
                _clip_norm(V, neg, sq, max_norm)
            sq = 0.0
            gs = 0.0
            for f in range(dim):
                gf = g_pos * u_old[f] + reg * V[i, f]
                gs += gf * gf
            acc_i[i] = ada_decay * acc_i[i] + gs / dim
            lr_r = lr / math.sqrt(1.0 + acc_i[i] / ada_eps)
            for f in range(dim):
                v = V[i, f] - lr_r * (g_pos * u_old[f] + reg * V[i, f])
                V[i, f] = v
                sq += v * v
            bias[i] -= lr_b * (g_pos_b + reg_bias * bias[i])
            _clip_norm(V, i, sq, max_norm)
            sq = 0.0
            gs = 0.0
            for f in range(dim):
                gf = grad_u[f] + reg * u_old[f]
                gs += gf * gf
            acc_u[u] = ada_decay * acc_u[u] + gs / dim
            lr_r = lr_u / math.sqrt(1.0 + acc_u[u] / ada_eps)
            for f in range(dim):
                v = U[u, f] - lr_r * (grad_u[f] + reg * u_old[f])
                U[u, f] = v
                sq += v * v
            _clip_norm(U, u, sq, max_norm)

        # recency: the user vector leans toward the item just learnt (after every step, so
        # the steps' scores are the plain model's)
        if user_pull > 0.0:
            sq = 0.0
            for f in range(dim):
                v = U[u, f] + user_pull * V[i, f]
                U[u, f] = v
                sq += v * v
            _clip_norm(U, u, sq, max_norm)
