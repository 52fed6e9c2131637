"""Dense numpy twin of `als.py` for small matrices: slow, obvious, and the tests' reference.

Works on a dense `D` (alpha * decayed confidence, 0 where unobserved) plus a boolean `P` of
observed entries (an observed entry may have D = 0 when its confidence decayed to nothing: it
still has preference 1).
"""

from __future__ import annotations

import numpy as np


def dense_confidence(
    keys: np.ndarray,
    logc: np.ndarray,
    n_users: int,
    n_items: int,
    now: float,
    decay_rate: float,
    alpha: float,
    min_confidence: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(D, P): alpha * exp(logc - now * decay_rate) per (user, item), and the observed mask."""
    D = np.zeros((n_users, n_items))
    P = np.zeros((n_users, n_items), dtype=bool)
    for key, lc in zip(np.asarray(keys).tolist(), np.asarray(logc).tolist(), strict=True):
        u, i = key >> 32, key & 0xFFFFFFFF
        c = np.exp(lc - now * decay_rate)
        if c < min_confidence:
            continue
        D[u, i] = alpha * c
        P[u, i] = True
    return D, P


def normal_equations(
    d: np.ndarray, p: np.ndarray, Y: np.ndarray, reg: float
) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) of one row: (Yᵀ C Y + reg I) x = Yᵀ C p with C = 1 + d, in float64."""
    Y = Y.astype(np.float64)
    c = 1.0 + d
    A = (Y.T * c) @ Y + reg * np.eye(Y.shape[1])
    b = Y.T @ (c * p)
    return A, b


def solve_rows_reference(
    D: np.ndarray, P: np.ndarray, Y: np.ndarray, reg: float, rows: np.ndarray | None = None
) -> np.ndarray:
    """Exact solutions (float64) for `rows` (all by default); rows with nothing observed are 0."""
    rows = np.arange(D.shape[0]) if rows is None else np.asarray(rows)
    out = np.zeros((rows.size, Y.shape[1]))
    for j, u in enumerate(rows.tolist()):
        if P[u].any():
            A, b = normal_equations(D[u], P[u].astype(np.float64), Y, reg)
            out[j] = np.linalg.solve(A, b)
    return out


def als_loss_reference(
    D: np.ndarray, P: np.ndarray, X: np.ndarray, Y: np.ndarray, reg: float
) -> float:
    """Σ C (P - X Yᵀ)² + reg (|X|² + |Y|²) computed densely."""
    X = X.astype(np.float64)
    Y = Y.astype(np.float64)
    err = P - X @ Y.T
    return float(np.sum((1.0 + D) * err * err) + reg * (np.sum(X * X) + np.sum(Y * Y)))


def als_fit_reference(
    D: np.ndarray, P: np.ndarray, X: np.ndarray, Y: np.ndarray, reg: float, iterations: int
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Exact alternating solves (users, then items); returns new float64 factors and losses."""
    X = X.astype(np.float64)
    Y = Y.astype(np.float64)
    losses = []
    for _ in range(iterations):
        X = solve_rows_reference(D, P, Y, reg)
        Y = solve_rows_reference(D.T, P.T, X, reg)
        losses.append(als_loss_reference(D, P, X, Y, reg))
    return X, Y, losses
