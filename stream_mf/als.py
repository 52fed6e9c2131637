"""Implicit ALS (Hu, Koren, Volinsky 2008) on the decayed confidence map, as array functions.

The batch learner (docs/architecture.md, "Generations"): from a snapshot of the confidence map
build a user-major CSR of `alpha * c_ui` (c_ui = decayed confidence) and its item-major
transpose, then alternate exact-per-row least squares on each side. Every observed entry has
preference 1 and confidence `1 + alpha * c_ui`; every other entry preference 0 and confidence 1,
which the Gramian trick handles without touching it:

    (YᵀY + Σ_i∈row d_ui y_i y_iᵀ + reg I) x_u = Σ_i∈row (1 + d_ui) y_i        (d = alpha * c)

Two solvers share that system. `"cg"` runs `cg_steps` conjugate-gradient steps warm-started from
the current row (Takács et al. 2011; the algorithm of implicit's `least_squares_cg`), never forming
the per-row matrix: O(cg_steps (k² + nnz k)) a row. `"cholesky"` forms and factors it in float64,
O(nnz k² + k³) a row, and is exact — the one for re-solving a handful of rows. Rows are solved in
parallel with `prange` (numba's thread count is respected); rows with no entries are set to zero,
which is their exact minimiser. `als_reference.py` is the dense numpy twin the tests compare with.

Precision: factors and the CG working vectors are float32 (the CG inner loops are k×k matrix-vector
products, twice as fast in float32); Gramians, dot-product accumulators, the Cholesky system and
the loss are float64.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

#: fastmath without the no-NaN/no-inf assumptions: a diverging model must show as NaN, not UB.
_FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}
#: Rows per parallel work item: big enough to amortise scratch allocation, small enough that
#: dynamic scheduling evens out rows of very different lengths (popular items).
_CHUNK = 64
#: CG stops a row once the squared residual norm falls below this (as implicit does).
_CG_EPS = 1e-20
_GRAM_BLOCK = 1024
#: most parts YᵀY is summed from: a count set by the rows alone, so that its bits (and every
#: fit's) do not depend on the thread count (8 is what 4 per thread gave on two cores)
_GRAM_PARTS = 8

SOLVERS = ("cg", "cholesky")
Progress = Callable[[int, float, float | None], None]


class CSR(NamedTuple):
    """A compressed-sparse-row matrix as bare arrays (no scipy dependency at runtime)."""

    indptr: np.ndarray  # int64[n_rows + 1]
    indices: np.ndarray  # int32[nnz], column indices ascending within a row
    data: np.ndarray  # float32[nnz]
    n_cols: int

    @property
    def n_rows(self) -> int:
        return self.indptr.shape[0] - 1

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_rows, self.n_cols

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])


# ---- building the confidence matrices ----------------------------------------------------------


@njit(cache=True, nogil=True, error_model="numpy")
def _decayed_entries(
    keys: np.ndarray,
    logc: np.ndarray,
    shift: float,
    alpha: float,
    min_confidence: float,
    n_users: int,
    n_items: int,
    users: np.ndarray,
    items: np.ndarray,
    data: np.ndarray,
) -> int:
    """Decode and decay every entry into users/items/data; nnz kept, or -1 - j for a bad key j."""
    n = 0
    for j in range(keys.shape[0]):
        k = keys[j]
        u = k >> 32
        i = k & 0xFFFFFFFF
        if u < 0 or u >= n_users or i >= n_items:
            return -1 - j
        c = math.exp(logc[j] - shift)
        if c < min_confidence:
            continue
        users[n] = u
        items[n] = i
        data[n] = alpha * c
        n += 1
    return n


@njit(cache=True, nogil=True)
def _transpose(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n_cols: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counting-sort transpose; row indices come out ascending within each new row."""
    nnz = indices.shape[0]
    t_indptr = np.zeros(n_cols + 1, np.int64)
    for j in range(nnz):
        t_indptr[indices[j] + 1] += 1
    for c in range(n_cols):
        t_indptr[c + 1] += t_indptr[c]
    fill = t_indptr[:-1].copy()
    t_indices = np.empty(nnz, np.int32)
    t_data = np.empty(nnz, data.dtype)
    for r in range(indptr.shape[0] - 1):
        for j in range(indptr[r], indptr[r + 1]):
            c = indices[j]
            dst = fill[c]
            t_indices[dst] = r
            t_data[dst] = data[j]
            fill[c] = dst + 1
    return t_indptr, t_indices, t_data


def transpose(m: CSR) -> CSR:
    """The same matrix stored the other way round (user-major <-> item-major)."""
    indptr, indices, data = _transpose(m.indptr, m.indices, m.data, m.n_cols)
    return CSR(indptr, indices, data, m.n_rows)


def confidence_matrix(
    keys: np.ndarray,
    logc: np.ndarray,
    n_users: int,
    n_items: int,
    now: float,
    decay_rate: float,
    alpha: float,
    min_confidence: float = 0.0,
) -> tuple[CSR, CSR]:
    """(user-major, item-major) CSR of `alpha * c_ui` from the flat confidence map.

    `keys` are `user << 32 | item` (unique, any order), `logc` the log of the decayed confidence
    anchored at t=0, so `c_ui = exp(logc - now * decay_rate)`. Entries with `c_ui <
    min_confidence` are dropped: long-decayed interactions then count as unobserved rather than
    as a preference with confidence ~1 (0, the default, keeps everything).
    """
    keys = np.asarray(keys, dtype=np.int64)
    logc = np.asarray(logc, dtype=np.float64)
    if keys.shape != logc.shape or keys.ndim != 1:
        raise ValueError(f"keys {keys.shape} and logc {logc.shape} must be equal-length 1-d")
    if keys.size > 1 and not np.all(keys[1:] > keys[:-1]):
        order = np.argsort(keys, kind="stable")
        keys, logc = keys[order], logc[order]
        if np.any(keys[1:] == keys[:-1]):
            raise ValueError("duplicate (user, item) keys in the confidence map")
    n = keys.shape[0]
    users = np.empty(n, np.int32)
    items = np.empty(n, np.int32)
    data = np.empty(n, np.float32)
    got = _decayed_entries(
        keys, logc, now * decay_rate, alpha, min_confidence, n_users, n_items, users, items, data
    )
    if got < 0:
        bad = int(keys[-1 - got])
        raise ValueError(
            f"key {bad} = (user {bad >> 32}, item {bad & 0xFFFFFFFF}) outside "
            f"{n_users} users x {n_items} items"
        )
    users, items, data = users[:got], items[:got], data[:got]
    indptr = np.zeros(n_users + 1, np.int64)
    np.cumsum(np.bincount(users, minlength=n_users), out=indptr[1:])
    by_user = CSR(indptr, items, data, n_items)
    return by_user, transpose(by_user)


# ---- Gramian and validation --------------------------------------------------------------------


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=_FAST)
def _gram_parts(Y: np.ndarray, n_parts: int) -> np.ndarray:
    """Per-part YᵀY: float32 rank-4 updates over blocks of rows, blocks summed in float64."""
    n, k = Y.shape
    parts = np.zeros((n_parts, k, k), np.float64)
    per = (n + n_parts - 1) // n_parts
    for q in prange(n_parts):
        acc = np.empty((k, k), np.float32)
        lo = q * per
        hi = min(n, lo + per)
        for s in range(lo, hi, _GRAM_BLOCK):
            e = min(hi, s + _GRAM_BLOCK)
            acc[:] = 0.0
            r = s
            while r + 4 <= e:
                y0, y1, y2, y3 = Y[r], Y[r + 1], Y[r + 2], Y[r + 3]
                for g in range(k):
                    a0, a1, a2, a3 = y0[g], y1[g], y2[g], y3[g]
                    for f in range(k):
                        acc[g, f] += a0 * y0[f] + a1 * y1[f] + a2 * y2[f] + a3 * y3[f]
                r += 4
            while r < e:
                y0 = Y[r]
                for g in range(k):
                    a0 = y0[g]
                    for f in range(k):
                        acc[g, f] += a0 * y0[f]
                r += 1
            for g in range(k):
                for f in range(k):
                    parts[q, g, f] += acc[g, f]
    return parts


def gramian(Y: np.ndarray) -> np.ndarray:
    """YᵀY in float64, computed by numba rather than BLAS.

    A BLAS call between two parallel kernels makes OpenBLAS's thread pool fight numba's
    (still spinning) OpenMP workers for the cores, which on a small machine costs up to ~40x.
    The parts are set by the rows, not the threads: the float64 sum over them is then the same
    on one thread as on many, and so is every fit.
    """
    n_parts = max(1, min(_GRAM_PARTS, Y.shape[0] // _GRAM_BLOCK + 1))
    return _gram_parts(Y, n_parts).sum(axis=0)


def _check_factors(C: CSR, X: np.ndarray, Y: np.ndarray) -> None:
    for name, a in (("target", X), ("other", Y)):
        if a.dtype != np.float32 or a.ndim != 2 or not a.flags.c_contiguous:
            raise ValueError(f"{name} factors must be C-contiguous float32 2-d arrays")
    if X.shape[1] != Y.shape[1]:
        raise ValueError(f"factor dims differ: {X.shape[1]} vs {Y.shape[1]}")
    if C.n_rows != X.shape[0] or C.n_cols != Y.shape[0]:
        raise ValueError(f"matrix {C.shape} does not match factors {X.shape[0]} x {Y.shape[0]}")
    if C.indices.dtype != np.int32 or C.data.dtype != np.float32 or C.indptr.dtype != np.int64:
        raise ValueError("CSR arrays must be int64 indptr, int32 indices, float32 data")


# ---- per-row solvers ---------------------------------------------------------------------------


@njit(cache=True, inline="always", fastmath=_FAST)
def _matvec(A: np.ndarray, v: np.ndarray, out: np.ndarray, sign: np.float32) -> None:
    """out = sign * A v for a symmetric A, four columns per pass so `out` is loaded and stored
    a quarter as often (the k×k product is most of a CG step); a float32 `sign` keeps the
    products in float32."""
    k = v.shape[0]
    out[:] = 0.0
    g = 0
    while g + 4 <= k:
        v0 = sign * v[g]
        v1 = sign * v[g + 1]
        v2 = sign * v[g + 2]
        v3 = sign * v[g + 3]
        a0, a1, a2, a3 = A[g], A[g + 1], A[g + 2], A[g + 3]
        for f in range(k):
            out[f] += a0[f] * v0 + a1[f] * v1 + a2[f] * v2 + a3[f] * v3
        g += 4
    while g < k:
        v0 = sign * v[g]
        a0 = A[g]
        for f in range(k):
            out[f] += a0[f] * v0
        g += 1


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=_FAST)
def _cg_rows(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    X: np.ndarray,  # float32[n, k], updated in place (also the warm start)
    Y: np.ndarray,  # float32[m, k]
    A: np.ndarray,  # float32[k, k] = YᵀY + reg I
    rows: np.ndarray,  # int64 rows of X to solve
    cg_steps: int,
) -> None:
    k = X.shape[1]
    n = rows.shape[0]
    n_chunks = (n + _CHUNK - 1) // _CHUNK
    for c in prange(n_chunks):
        r = np.empty(k, np.float32)
        p = np.empty(k, np.float32)
        ap = np.empty(k, np.float32)
        for j in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
            u = rows[j]
            x = X[u]
            lo = indptr[u]
            hi = indptr[u + 1]
            if lo == hi:
                x[:] = 0.0
                continue
            # r = b - A_u x  with  b = Σ (1 + d) y,  A_u = A + Σ d y yᵀ
            _matvec(A, x, r, np.float32(-1.0))
            for jj in range(lo, hi):
                y = Y[indices[jj]]
                d = data[jj]
                s = 0.0
                for f in range(k):
                    s += np.float64(y[f]) * x[f]
                t = np.float32((1.0 + d) - d * s)
                for f in range(k):
                    r[f] += t * y[f]
            rsold = 0.0
            for f in range(k):
                p[f] = r[f]
                rsold += np.float64(r[f]) * r[f]
            if rsold < _CG_EPS:
                continue
            for _ in range(cg_steps):
                _matvec(A, p, ap, np.float32(1.0))
                for jj in range(lo, hi):
                    y = Y[indices[jj]]
                    s = 0.0
                    for f in range(k):
                        s += np.float64(y[f]) * p[f]
                    t = np.float32(data[jj] * s)
                    for f in range(k):
                        ap[f] += t * y[f]
                pap = 0.0
                for f in range(k):
                    pap += np.float64(p[f]) * ap[f]
                step = np.float32(rsold / pap)
                rsnew = 0.0
                for f in range(k):
                    x[f] += step * p[f]
                    r[f] -= step * ap[f]
                    rsnew += np.float64(r[f]) * r[f]
                if rsnew < _CG_EPS:
                    break
                beta = np.float32(rsnew / rsold)
                for f in range(k):
                    p[f] = r[f] + beta * p[f]
                rsold = rsnew


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=_FAST)
def _cholesky_rows(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    X: np.ndarray,  # float32[n, k], overwritten
    Y: np.ndarray,  # float32[m, k]
    A: np.ndarray,  # float64[k, k] = YᵀY + reg I
    rows: np.ndarray,  # int64
) -> None:
    k = X.shape[1]
    n = rows.shape[0]
    n_chunks = (n + _CHUNK - 1) // _CHUNK
    for c in prange(n_chunks):
        U = np.empty((k, k), np.float64)
        b = np.empty(k, np.float64)
        y = np.empty(k, np.float64)
        for j in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
            u = rows[j]
            lo = indptr[u]
            hi = indptr[u + 1]
            if lo == hi:
                X[u, :] = 0.0
                continue
            # Upper triangle of A_u = A + Σ d y yᵀ, and b = Σ (1 + d) y. Loops run over
            # zero-based slices: with `range(g, k)` numba's negative-index wraparound check stays
            # in and the loops do not vectorise (3x slower).
            U[:, :] = A
            b[:] = 0.0
            for jj in range(lo, hi):
                yi = Y[indices[jj]]
                d = np.float64(data[jj])
                for f in range(k):
                    y[f] = yi[f]
                for g in range(k):
                    b[g] += (1.0 + d) * y[g]
                    dg = d * y[g]
                    dst = U[g, g:]
                    src = y[g:]
                    for f in range(dst.shape[0]):
                        dst[f] += dg * src[f]
            # in-place A_u = UᵀU, right-looking: every inner loop is an axpy over a contiguous row
            for j in range(k):
                uj = U[j, j:]
                inv = 1.0 / math.sqrt(uj[0])
                for f in range(uj.shape[0]):
                    uj[f] *= inv
                for i in range(j + 1, k):
                    uji = U[j, i]
                    dst = U[i, i:]
                    src = U[j, i:]
                    for f in range(dst.shape[0]):
                        dst[f] -= uji * src[f]
            # Uᵀ z = b (column sweeps), then U x = z (row dot products); both in b
            for g in range(k):
                zg = b[g] / U[g, g]
                b[g] = zg
                dst = b[g + 1 :]
                src = U[g, g + 1 :]
                for f in range(dst.shape[0]):
                    dst[f] -= src[f] * zg
            for g in range(k - 1, -1, -1):
                s = b[g]
                xs = b[g + 1 :]
                src = U[g, g + 1 :]
                for f in range(xs.shape[0]):
                    s -= src[f] * xs[f]
                b[g] = s / U[g, g]
            for f in range(k):
                X[u, f] = b[f]


def _solve(
    C: CSR,
    X: np.ndarray,
    Y: np.ndarray,
    reg: float,
    rows: np.ndarray,
    solver: str,
    cg_steps: int,
    gram: np.ndarray | None,
) -> None:
    A = (gramian(Y) if gram is None else np.asarray(gram, np.float64)) + reg * np.eye(Y.shape[1])
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, not {solver!r}")
    # one chunk of _CHUNK rows per work item, handed out dynamically (set outside the kernels:
    # calling it inside would stop numba from caching them)
    old = numba.set_parallel_chunksize(1)
    try:
        if solver == "cg":
            _cg_rows(C.indptr, C.indices, C.data, X, Y, A.astype(np.float32), rows, cg_steps)
        else:
            _cholesky_rows(C.indptr, C.indices, C.data, X, Y, A, rows)
    finally:
        numba.set_parallel_chunksize(old)


def solve_rows(
    C: CSR,
    X: np.ndarray,
    Y: np.ndarray,
    reg: float,
    rows: np.ndarray | list[int] | None = None,
    solver: str = "cholesky",
    cg_steps: int = 3,
    gram: np.ndarray | None = None,
) -> None:
    """Re-solve `rows` of `X` (in place) from their full rows of `C` against fixed `Y`.

    For rows touched after an ALS snapshot and for fold-in: the same normal equations as a fit's
    half-step (pass the item-major matrix with item factors as `X` for item rows). Cholesky is the
    default because these rows may start from an unrelated (SGD-trained or fresh) vector that a
    few warm-started CG steps would not fully correct. `gram` is YᵀY (float64, no reg) when the
    caller reuses it across calls; `rows=None` solves every row.
    """
    _check_factors(C, X, Y)
    if rows is None:
        idx = np.arange(C.n_rows, dtype=np.int64)
    else:
        idx = np.asarray(rows, dtype=np.int64).ravel()
        if idx.size and (idx.min() < 0 or idx.max() >= C.n_rows):
            raise IndexError(f"rows outside [0, {C.n_rows})")
    _solve(C, X, Y, reg, idx, solver, cg_steps, gram)


# ---- loss and the fit loop ---------------------------------------------------------------------


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=_FAST)
def _observed_loss(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, X: np.ndarray, Y: np.ndarray
) -> float:
    """Σ_observed [(1 + d)(1 - s)² - s²]: the correction of the all-zero-preference loss."""
    k = X.shape[1]
    total = 0.0
    for u in prange(indptr.shape[0] - 1):
        acc = 0.0
        x = X[u]
        for jj in range(indptr[u], indptr[u + 1]):
            y = Y[indices[jj]]
            s = 0.0
            for f in range(k):
                s += np.float64(x[f]) * y[f]
            e = 1.0 - s
            acc += (1.0 + data[jj]) * e * e - s * s
        total += acc
    return total


def als_loss(C: CSR, X: np.ndarray, Y: np.ndarray, reg: float) -> float:
    """Σ_{u,i} C_ui (p_ui - x_u·y_i)² + reg (|X|² + |Y|²), in O(nnz k + (n + m) k²).

    The all-pairs part Σ (x_u·y_i)² is trace(XᵀX YᵀY); observed entries then swap their
    zero-preference term for the real one. This is exactly what each half-step minimises, so it
    must not increase from one iteration to the next.
    """
    _check_factors(C, X, Y)
    xtx = gramian(X)
    yty = gramian(Y)
    observed = _observed_loss(C.indptr, C.indices, C.data, X, Y)
    return float(np.sum(xtx * yty) + observed + reg * (np.trace(xtx) + np.trace(yty)))


def als_fit(
    Cui_user: CSR,
    Cui_item: CSR,
    user_factors: np.ndarray,
    item_factors: np.ndarray,
    reg: float,
    iterations: int,
    solver: str = "cg",
    cg_steps: int = 3,
    progress: Progress | None = None,
    compute_loss: bool = True,
) -> list[float]:
    """Alternate user and item solves `iterations` times, updating both factor arrays in place.

    Returns the loss after each iteration (empty when `compute_loss` is False: it costs about one
    CG step, and a production fit need not pay it). `progress(iteration, seconds, loss)` is called
    after each iteration. The factor arrays are the warm start, so a refit from the previous model
    converges in fewer iterations than one from random vectors.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, not {solver!r}")
    _check_factors(Cui_user, user_factors, item_factors)
    _check_factors(Cui_item, item_factors, user_factors)
    if Cui_user.nnz != Cui_item.nnz:
        raise ValueError("Cui_item must be the transpose of Cui_user")
    all_users = np.arange(Cui_user.n_rows, dtype=np.int64)
    all_items = np.arange(Cui_item.n_rows, dtype=np.int64)
    losses: list[float] = []
    for it in range(iterations):
        t0 = time.perf_counter()
        _solve(Cui_user, user_factors, item_factors, reg, all_users, solver, cg_steps, None)
        _solve(Cui_item, item_factors, user_factors, reg, all_items, solver, cg_steps, None)
        loss = None
        if compute_loss:
            loss = als_loss(Cui_user, user_factors, item_factors, reg)
            losses.append(loss)
        if progress is not None:
            progress(it, time.perf_counter() - t0, loss)
    return losses


__all__ = [
    "CSR",
    "SOLVERS",
    "als_fit",
    "als_loss",
    "confidence_matrix",
    "gramian",
    "solve_rows",
    "transpose",
]
