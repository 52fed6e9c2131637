from __future__ import annotations

import itertools
import math

import numba
import numpy as np
import pytest

from stream_mf.als import (
    CSR,
    als_fit,
    als_loss,
    confidence_matrix,
    gramian,
    solve_rows,
    transpose,
)
from stream_mf.als_reference import (
    als_fit_reference,
    als_loss_reference,
    dense_confidence,
    normal_equations,
    solve_rows_reference,
)
from tests.synthetic import planted_stream

N_USERS, N_ITEMS, DIM = 60, 40, 8
HALF_LIFE = 3600.0
RATE = math.log(2.0) / HALF_LIFE
NOW = 1_700_000_000.0
ALPHA = 4.0
REG = 0.1


def _entries(seed: int = 0, density: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled (key, logc) pairs as the confidence map holds them, a few users left empty."""
    rng = np.random.default_rng(seed)
    mask = rng.random((N_USERS, N_ITEMS)) < density
    mask[:3] = False  # users with nothing: solved to zero
    u, i = np.nonzero(mask)
    keys = (u.astype(np.int64) << 32) | i.astype(np.int64)
    # events up to 3 half-lives old with weights 1..8, anchored at t=0 like the live map
    age = rng.random(keys.size) * 3 * HALF_LIFE
    logc = np.log(rng.integers(1, 9, keys.size)) + (NOW - age) * RATE
    order = rng.permutation(keys.size)
    return keys[order], logc[order]


def _problem(seed: int = 0) -> tuple[CSR, CSR, np.ndarray, np.ndarray]:
    keys, logc = _entries(seed)
    Cu, Ci = confidence_matrix(keys, logc, N_USERS, N_ITEMS, NOW, RATE, ALPHA)
    D, P = dense_confidence(keys, logc, N_USERS, N_ITEMS, NOW, RATE, ALPHA)
    return Cu, Ci, D, P


def _factors(seed: int = 1, scale: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = (rng.standard_normal((N_USERS, DIM)) * scale).astype(np.float32)
    Y = (rng.standard_normal((N_ITEMS, DIM)) * scale).astype(np.float32)
    return X, Y


def _dense(m: CSR) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros(m.shape)
    mask = np.zeros(m.shape, dtype=bool)
    rows = np.repeat(np.arange(m.n_rows), np.diff(m.indptr))
    out[rows, m.indices] = m.data
    mask[rows, m.indices] = True
    return out, mask


# ---- confidence_matrix -------------------------------------------------------------------------


def test_confidence_matrix_matches_dense_construction() -> None:
    keys, _ = _entries()
    Cu, Ci, D, P = _problem()
    assert Cu.shape == (N_USERS, N_ITEMS) and Ci.shape == (N_ITEMS, N_USERS)
    assert Cu.indptr.dtype == np.int64 and Cu.indices.dtype == np.int32
    assert Cu.data.dtype == np.float32 and Cu.nnz == keys.size == Ci.nnz
    du, mu = _dense(Cu)
    di, mi = _dense(Ci)
    np.testing.assert_array_equal(mu, P)
    np.testing.assert_array_equal(mi, P.T)
    np.testing.assert_allclose(du, D, rtol=1e-6)
    np.testing.assert_allclose(di, D.T, rtol=1e-6)
    for m in (Cu, Ci):  # sorted column indices within every row
        for r in range(m.n_rows):
            assert np.all(np.diff(m.indices[m.indptr[r] : m.indptr[r + 1]]) > 0)


def test_confidence_decay_is_applied() -> None:
    """One event of weight 2 one half-life ago has confidence 1; two half-lives ago, 0.5."""
    keys = np.array([(5 << 32) | 7, (2 << 32) | 3], np.int64)
    logc = np.log(2.0) + (NOW - np.array([HALF_LIFE, 2 * HALF_LIFE])) * RATE
    Cu, Ci = confidence_matrix(keys, logc, 6, 8, NOW, RATE, alpha=10.0)
    du, _ = _dense(Cu)
    assert du[5, 7] == pytest.approx(10.0, rel=1e-6)
    assert du[2, 3] == pytest.approx(5.0, rel=1e-6)
    assert np.count_nonzero(du) == 2
    np.testing.assert_array_equal(_dense(Ci)[0], du.T)


def test_min_confidence_drops_decayed_entries() -> None:
    keys, logc = _entries()
    thr = 1.0
    Cu, Ci = confidence_matrix(keys, logc, N_USERS, N_ITEMS, NOW, RATE, ALPHA, min_confidence=thr)
    D, P = dense_confidence(keys, logc, N_USERS, N_ITEMS, NOW, RATE, ALPHA, min_confidence=thr)
    assert 0 < Cu.nnz < keys.size and Cu.nnz == int(P.sum()) == Ci.nnz
    assert Cu.data.min() >= ALPHA * thr * (1 - 1e-6)
    np.testing.assert_allclose(_dense(Cu)[0], D, rtol=1e-6)


def test_confidence_matrix_rejects_bad_keys() -> None:
    with pytest.raises(ValueError, match="outside"):
        confidence_matrix(np.array([(3 << 32) | 1]), np.zeros(1), 3, 5, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="outside"):
        confidence_matrix(np.array([(1 << 32) | 5]), np.zeros(1), 3, 5, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="duplicate"):
        confidence_matrix(np.array([9, 4, 9]), np.zeros(3), 3, 10, 0.0, 0.0, 1.0)


def test_transpose_round_trips() -> None:
    Cu, Ci, _, _ = _problem()
    back = transpose(Ci)
    for a, b in zip(back[:3], Cu[:3], strict=True):
        np.testing.assert_array_equal(a, b)


# ---- solvers against the normal equations ------------------------------------------------------


def test_gramian_and_loss_match_dense() -> None:
    Cu, _, D, P = _problem()
    X, Y = _factors()
    np.testing.assert_allclose(gramian(Y), Y.astype(np.float64).T @ Y, rtol=1e-5)
    assert als_loss(Cu, X, Y, REG) == pytest.approx(als_loss_reference(D, P, X, Y, REG), rel=1e-6)


@pytest.mark.parametrize("solver", ["cholesky", "cg"])
def test_rows_match_normal_equations(solver: str) -> None:
    """Every user row and every item row solves its own normal equations (np.linalg.solve)."""
    Cu, Ci, D, P = _problem()
    X, Y = _factors()
    steps = 4 * DIM  # CG is exact after DIM steps in exact arithmetic; float32 needs a few more
    Xs = X.copy()
    solve_rows(Cu, Xs, Y, REG, solver=solver, cg_steps=steps)
    want = solve_rows_reference(D, P, Y, REG)
    np.testing.assert_allclose(Xs, want, atol=1e-4, rtol=1e-4)
    assert not Xs[:3].any()  # users with no entries

    Ys = Y.copy()
    solve_rows(Ci, Ys, Xs, REG, solver=solver, cg_steps=steps)
    np.testing.assert_allclose(Ys, solve_rows_reference(D.T, P.T, Xs, REG), atol=1e-4, rtol=1e-4)
    # and directly: A x = b for one row
    A, b = normal_equations(D[10], P[10].astype(float), Y, REG)
    np.testing.assert_allclose(A @ Xs[10], b, rtol=1e-4, atol=1e-4)


def test_cg_three_steps_lowers_each_row_objective() -> None:
    """Warm-started CG never makes a row worse: the half-step objective must not increase."""
    Cu, _, D, P = _problem()
    X, Y = _factors()
    before = als_loss_reference(D, P, X, Y, REG)
    solve_rows(Cu, X, Y, REG, solver="cg", cg_steps=3)
    assert als_loss_reference(D, P, X, Y, REG) < before


@pytest.mark.parametrize("solver", ["cholesky", "cg"])
def test_solve_rows_equals_full_solve(solver: str) -> None:
    Cu, Ci, _, _ = _problem()
    X, Y = _factors()
    rows = np.array([40, 3, 17, 5, 59])
    full = X.copy()
    solve_rows(Cu, full, Y, REG, solver=solver)
    part = X.copy()
    solve_rows(Cu, part, Y, REG, rows=rows.tolist(), solver=solver)
    np.testing.assert_array_equal(part[rows], full[rows])
    untouched = np.setdiff1d(np.arange(N_USERS), rows)
    np.testing.assert_array_equal(part[untouched], X[untouched])
    # item rows, with a caller-supplied Gramian
    fullY = Y.copy()
    solve_rows(Ci, fullY, X, REG, solver=solver)
    partY = Y.copy()
    solve_rows(Ci, partY, X, REG, rows=np.array([0, 39]), solver=solver, gram=gramian(X))
    np.testing.assert_allclose(partY[[0, 39]], fullY[[0, 39]], rtol=1e-6, atol=1e-7)


def test_solve_rows_rejects_bad_input() -> None:
    Cu, _, _, _ = _problem()
    X, Y = _factors()
    with pytest.raises(IndexError):
        solve_rows(Cu, X, Y, REG, rows=[N_USERS])
    with pytest.raises(ValueError, match="float32"):
        solve_rows(Cu, X.astype(np.float64), Y, REG)
    with pytest.raises(ValueError, match="does not match"):
        solve_rows(Cu, X[:-1].copy(), Y, REG)
    with pytest.raises(ValueError, match="solver"):
        solve_rows(Cu, X, Y, REG, solver="lu")


# ---- fitting -----------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["cholesky", "cg"])
def test_loss_decreases_every_iteration(solver: str) -> None:
    Cu, Ci, D, P = _problem()
    X, Y = _factors(scale=0.05)
    seen: list[tuple[int, float | None]] = []
    losses = als_fit(
        Cu, Ci, X, Y, REG, 12, solver=solver, progress=lambda it, _s, loss: seen.append((it, loss))
    )
    assert len(losses) == 12 and [it for it, _ in seen] == list(range(12))
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] == pytest.approx(als_loss_reference(D, P, X, Y, REG), rel=1e-6)


def test_cholesky_fit_matches_dense_reference() -> None:
    Cu, Ci, D, P = _problem()
    X, Y = _factors(scale=0.05)
    Xr, Yr, ref_losses = als_fit_reference(D, P, X, Y, REG, 3)
    losses = als_fit(Cu, Ci, X, Y, REG, 3, solver="cholesky")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    np.testing.assert_allclose(X, Xr, atol=1e-4)
    np.testing.assert_allclose(Y, Yr, atol=1e-4)


def test_fit_does_not_depend_on_thread_count() -> None:
    Cu, Ci, _, _ = _problem()
    out = []
    before = numba.get_num_threads()
    try:
        # read from the environment at import; numba's stubs leave it out
        for n in sorted({1, numba.config.NUMBA_NUM_THREADS}):  # type: ignore[attr-defined]
            numba.set_num_threads(n)
            X, Y = _factors()
            als_fit(Cu, Ci, X, Y, REG, 2, solver="cg", compute_loss=False)
            out.append((X, Y))
    finally:
        numba.set_num_threads(before)
    for X, Y in out[1:]:
        np.testing.assert_array_equal(X, out[0][0])
        np.testing.assert_array_equal(Y, out[0][1])


def test_gramian_does_not_depend_on_thread_count() -> None:
    """Enough rows for several parts: the parts are set by the rows, so the float64 sum over
    them (and every fit on many rows) is the same on one thread as on many."""
    Y = np.random.default_rng(2).standard_normal((5_000, 16)).astype(np.float32)
    out = []
    before = numba.get_num_threads()
    try:
        for n in sorted({1, numba.config.NUMBA_NUM_THREADS}):  # type: ignore[attr-defined]
            numba.set_num_threads(n)
            out.append(gramian(Y))
    finally:
        numba.set_num_threads(before)
    for g in out[1:]:
        np.testing.assert_array_equal(g, out[0])


@pytest.mark.parametrize("solver", ["cholesky", "cg"])
def test_recovers_planted_groups(solver: str) -> None:
    """Users' top-10 unseen items come mostly from their own group (chance: 1 in 4)."""
    n_users, n_items, groups = 300, 200, 4
    s = planted_stream(6_000, n_users, n_items, n_groups=groups, in_group=0.9, seed=3)
    keys, counts = np.unique((s.users.astype(np.int64) << 32) | s.items, return_counts=True)
    Cu, Ci = confidence_matrix(keys, np.log(counts), n_users, n_items, 0.0, 0.0, alpha=2.0)
    rng = np.random.default_rng(0)
    X = rng.random((n_users, 16), dtype=np.float32) * 0.01
    Y = rng.random((n_items, 16), dtype=np.float32) * 0.01
    als_fit(Cu, Ci, X, Y, 10.0, 10, solver=solver)
    scores = X @ Y.T
    seen = _dense(Cu)[1]
    scores[seen] = -np.inf
    top = np.argsort(-scores, axis=1)[:, :10]
    active = np.diff(Cu.indptr) > 0
    in_group = s.item_group[top] == s.user_group[:, None]
    assert in_group[active].mean() > 0.85
