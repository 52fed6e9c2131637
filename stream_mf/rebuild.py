"""Full implicit-ALS rebuilds that reconcile online drift while the stream goes on.

A rebuild runs in the updater's process, in a background thread (the numba kernels release the
GIL), in three steps:

1. **fit**: from a snapshot of the confidence map taken between two batches, build the decayed
   confidence matrix `1 + alpha * c_ui` and fit implicit ALS, warm-started from the live factors;
   then stage the new factors in the store under the next generation (invisible to readers).
2. **guard**: the next incoming events are scored test-then-learn against both the live model
   and the new one (before either has learned them), until `guard_events` are scored or
   `guard_timeout_s` passes; the swap goes ahead unless the new model's HR@10 is lower by more
   than `guard_margin`.
3. **catch up** (repeated while many rows changed): rows whose data changed since the previous
   snapshot (users and items with new events, new ids) are re-solved against the new factors
   from their full decayed rows, and their blocks re-staged.
4. **swap**, on the updater's thread between batches: re-solve the few rows touched since the
   last round, copy the new factors into the live arrays, and let the caller commit them with the
   generation flip in one WriteBatch. Ingestion pauses only for this step.

A crash before the flip leaves the old generation (the staged one is deleted on open); after it,
the new one. Nothing learned meanwhile is lost: every event since the snapshot is in the
confidence map the catch-up reads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numba import njit
from pydantic import BaseModel, ConfigDict, Field

from stream_mf.als import CSR, als_fit, confidence_matrix, solve_rows
from stream_mf.model import BatchDelta
from stream_mf.state import ModelState
from stream_mf.store import BLOCK_ROWS, StateStore, confidence_items
from stream_mf.topk import top_k

log = logging.getLogger(__name__)


class RebuildConfig(BaseModel):
    """When and how to rebuild. Defaults fit MovieLens-sized data (README)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    every_events: int | None = Field(default=None, ge=1, description="rebuild after N events")
    every_seconds: float | None = Field(default=None, gt=0, description="rebuild every T s")
    alpha: float = Field(default=10.0, gt=0, description="confidence = 1 + alpha * c_ui")
    reg: float = Field(default=0.1, ge=0)
    iterations: int = Field(default=10, ge=1)
    solver: Literal["cg", "cholesky"] = "cg"
    cg_steps: int = Field(default=3, ge=1)
    min_confidence: float = Field(default=0.0, ge=0)
    max_rounds: int = Field(default=10, ge=1, description="catch-up rounds before the swap")
    final_rows: int = Field(
        default=2000, ge=0, description="catch up in the background until fewer rows remain"
    )
    guard_events: int = Field(
        default=1000, ge=0, description="incoming events the guard scores against both models"
    )
    guard_per_batch: int = Field(default=128, ge=1)
    guard_timeout_s: float = Field(
        default=30.0, ge=0, description="swap on what was scored by then (low traffic)"
    )
    guard_margin: float = Field(
        default=0.05,
        ge=0,
        description="swap unless the new HR@10 is lower by more than this (absolute; with 1000 "
        "events the paired noise is about 0.02)",
    )
    stage_blocks: int = Field(default=256, ge=1, description="blocks per staging WriteBatch")


@njit(cache=True)
def _select_pairs(conf, user_mask, item_mask):  # type: ignore[no-untyped-def]
    """Entries of the confidence map whose user or item is flagged."""
    n = 0
    for key in conf:
        if user_mask[key >> 32] or item_mask[key & 0xFFFFFFFF]:
            n += 1
    keys = np.empty(n, np.int64)
    vals = np.empty(n, np.float64)
    j = 0
    for key, v in conf.items():
        if user_mask[key >> 32] or item_mask[key & 0xFFFFFFFF]:
            keys[j] = key
            vals[j] = v
            j += 1
    return keys, vals


@dataclass
class Outcome:
    swapped: bool
    generation: int
    users: np.ndarray  # rows whose blocks the flip commit must write
    items: np.ndarray
    seconds: float
    rows_resolved: int
    drift: float  # mean cosine between old and new vectors of the same rows
    hr_old: float
    hr_new: float
    scored: int = 0


@dataclass
class _Touched:
    users: list[np.ndarray] = field(default_factory=list)
    items: list[np.ndarray] = field(default_factory=list)

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        u = np.unique(np.concatenate(self.users)) if self.users else np.empty(0, np.int64)
        i = np.unique(np.concatenate(self.items)) if self.items else np.empty(0, np.int64)
        self.users, self.items = [], []
        return u.astype(np.int64), i.astype(np.int64)


class Rebuild:
    """One rebuild in flight. Drive it from the updater's loop: `note` every batch's delta,
    `step` between batches until it returns an `Outcome`."""

    def __init__(self, state: ModelState, store: StateStore, cfg: RebuildConfig):
        self.cfg, self.store = cfg, store
        self.started = time.monotonic()
        self.generation = store.generation() + 1
        self.decay_rate = state.config.decay_rate
        self.touched = _Touched()
        self.rounds = 0
        self.rows_resolved = 0
        self.error: BaseException | None = None
        self.fitted_at: float | None = None
        self.finite = True
        self.scored = 0
        self.hits_old = 0
        self.hits_new = 0
        keys, vals = confidence_items(state.confidence)
        nu, ni = state.users.n, state.items.n
        self.U = state.users.factors[:nu].copy()
        self.V = state.items.factors[:ni].copy()
        self.clock = float(state.clock[0])
        self.thread = threading.Thread(
            target=self._guarded, args=(self._fit, keys, vals, nu, ni), daemon=True
        )
        self.thread.start()
        log.info("rebuild started: %d users, %d items, %d entries", nu, ni, keys.size)

    # ---- loop-thread API --------------------------------------------------------------------

    def note(self, delta: BatchDelta) -> None:
        if delta.pair_keys.size:
            self.touched.users.append(delta.pair_keys >> 32)
            self.touched.items.append(delta.pair_keys & 0xFFFFFFFF)

    @property
    def wants_scores(self) -> bool:
        """True while the guard is collecting: call `score` before learning each batch."""
        return (
            self.fitted_at is not None
            and not self.thread.is_alive()
            and self.rounds == 0
            and self.scored < self.cfg.guard_events
        )

    def score(
        self,
        state: ModelState,
        users: np.ndarray,
        items: np.ndarray,
        seen: Callable[[int], np.ndarray],
        k: int = 10,
    ) -> None:
        """Test-then-learn on incoming events, for the live and the new model alike."""
        ok = np.flatnonzero((users >= 0) & (users < self.U.shape[0]) & (items >= 0))
        ok = ok[items[ok] < self.V.shape[0]][: self.cfg.guard_per_batch]
        ni = self.V.shape[0]
        live_v, live_b = state.items.factors[:ni], state.items.bias[:ni]
        for j in ok.tolist():
            u, i = int(users[j]), int(items[j])
            mine = seen(u)
            mine = mine[mine < ni]
            if np.any(mine == i):
                continue
            old = live_v @ state.users.factors[u] + live_b
            new = self.V @ self.U[u]
            old[mine] = -np.inf
            new[mine] = -np.inf
            self.hits_old += int(np.any(top_k(old, k)[0] == i))
            self.hits_new += int(np.any(top_k(new, k)[0] == i))
            self.scored += 1

    def step(self, state: ModelState) -> Outcome | None:
        """Advance if the background work is done; an `Outcome` when the rebuild is over."""
        if self.thread.is_alive():
            return None
        if self.error is not None:
            raise RuntimeError(f"rebuild failed: {self.error}") from self.error
        if self.fitted_at is None:
            self.fitted_at = time.monotonic()
        guarding = self.rounds == 0 and self.scored < self.cfg.guard_events
        if guarding and time.monotonic() - self.fitted_at < self.cfg.guard_timeout_s:
            return None
        users, items = self.touched.take()
        remaining = users.size + items.size
        if self.rounds < self.cfg.max_rounds and (
            remaining > self.cfg.final_rows or not self.rounds
        ):
            self._start_round(state, users, items)
            return None
        return self._swap(state, users, items)

    # ---- background work --------------------------------------------------------------------

    def _guarded(self, fn, *args) -> None:  # type: ignore[no-untyped-def]
        try:
            fn(*args)
        except BaseException as exc:  # reported on the loop thread by step()
            self.error = exc

    def _matrices(self, keys: np.ndarray, vals: np.ndarray, nu: int, ni: int) -> tuple[CSR, CSR]:
        c = self.cfg
        return confidence_matrix(
            keys, vals, nu, ni, self.clock, self.decay_rate, c.alpha, c.min_confidence
        )

    def _fit(self, keys: np.ndarray, vals: np.ndarray, nu: int, ni: int) -> None:
        t0 = time.perf_counter()
        by_user, by_item = self._matrices(keys, vals, nu, ni)
        c = self.cfg

        def progress(it: int, seconds: float, loss: float | None) -> None:
            log.info("rebuild: ALS iteration %d/%d (%.2fs)", it + 1, c.iterations, seconds)

        als_fit(
            by_user, by_item, self.U, self.V, c.reg, c.iterations, c.solver, c.cg_steps,
            progress=progress, compute_loss=False,
        )  # fmt: skip
        self._stage(np.arange(nu), np.arange(ni))
        log.info("rebuild: fit and staged in %.1fs", time.perf_counter() - t0)

    def _catch_up_inputs(
        self, state: ModelState, users: np.ndarray, items: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Grow the new factors to the live size (new ids start from their online vectors) and
        take the full decayed rows of the changed users and items."""
        nu, ni = state.users.n, state.items.n
        if nu > self.U.shape[0]:
            self.U = np.concatenate([self.U, state.users.factors[self.U.shape[0] : nu]])
        if ni > self.V.shape[0]:
            self.V = np.concatenate([self.V, state.items.factors[self.V.shape[0] : ni]])
        self.clock = float(state.clock[0])
        if users.size == 0 and items.size == 0:
            return np.empty(0, np.int64), np.empty(0, np.float64), nu, ni
        umask = np.zeros(nu, np.bool_)
        imask = np.zeros(ni, np.bool_)
        umask[users] = True
        imask[items] = True
        keys, vals = _select_pairs(state.confidence, umask, imask)
        return keys, vals, nu, ni

    def _start_round(self, state: ModelState, users: np.ndarray, items: np.ndarray) -> None:
        """Re-solve changed rows in the background."""
        keys, vals, nu, ni = self._catch_up_inputs(state, users, items)
        self.rounds += 1
        self.thread = threading.Thread(
            target=self._guarded,
            args=(self._round, keys, vals, nu, ni, users, items),
            daemon=True,
        )
        self.thread.start()

    def _round(
        self,
        keys: np.ndarray,
        vals: np.ndarray,
        nu: int,
        ni: int,
        users: np.ndarray,
        items: np.ndarray,
    ) -> None:
        self._resolve(keys, vals, nu, ni, users, items)
        self._stage(users, items)

    def _resolve(
        self, keys: np.ndarray, vals: np.ndarray, nu: int, ni: int,
        users: np.ndarray, items: np.ndarray, solver: str | None = None,
    ) -> None:  # fmt: skip
        if users.size == 0 and items.size == 0:
            return
        by_user, by_item = self._matrices(keys, vals, nu, ni)
        c = self.cfg
        how = solver or c.solver
        steps = max(c.cg_steps, 6)  # new rows start far from their solution
        if users.size:
            solve_rows(by_user, self.U, self.V, c.reg, users, how, steps)
        if items.size:
            solve_rows(by_item, self.V, self.U, c.reg, items, how, steps)
        self.rows_resolved += int(users.size + items.size)

    def _stage(self, users: np.ndarray, items: np.ndarray) -> None:
        self.finite = self.finite and bool(
            np.all(np.isfinite(self.U[users])) and np.all(np.isfinite(self.V[items]))
        )
        for kind, rows, arr in (("user", users, self.U), ("item", items, self.V)):
            blocks = np.unique(np.asarray(rows, np.int64) // BLOCK_ROWS)
            view = _Rows(arr)
            for lo in range(0, blocks.size, self.cfg.stage_blocks):
                self.store.stage_model(
                    kind, view, self.generation, blocks[lo : lo + self.cfg.stage_blocks]
                )

    # ---- the swap (loop thread) ----------------------------------------------------------------

    def _swap(self, state: ModelState, users: np.ndarray, items: np.ndarray) -> Outcome:
        t0 = time.perf_counter()
        keys, vals, nu, ni = self._catch_up_inputs(state, users, items)
        if users.size or items.size:
            self._resolve(keys, vals, nu, ni, users, items)
        hr_old = self.hits_old / self.scored if self.scored else 0.0
        hr_new = self.hits_new / self.scored if self.scored else 0.0
        # the background work checked every row it wrote; only the rows just re-solved remain
        ok = self.finite and bool(
            np.all(np.isfinite(self.U[users])) and np.all(np.isfinite(self.V[items]))
        )
        ok = ok and hr_new >= hr_old - self.cfg.guard_margin
        sample = np.arange(0, nu, max(1, nu // 10_000))
        drift = _mean_cosine(state.users.factors[sample], self.U[sample])
        if ok:
            state.users.factors[:nu] = self.U
            state.items.factors[:ni] = self.V
            state.items.bias[:ni] = 0.0
            state.model_version += 1
        seconds = time.perf_counter() - t0
        log.info(
            "rebuild %s: generation %d, HR@10 on %d new events: old %.3f new %.3f, drift %.3f, "
            "swap step %.0f ms",
            "swapped" if ok else "rejected", self.generation, self.scored, hr_old, hr_new, drift,
            seconds * 1e3,
        )  # fmt: skip
        return Outcome(
            swapped=ok, generation=self.generation, users=users, items=items, seconds=seconds,
            rows_resolved=self.rows_resolved, drift=drift, hr_old=hr_old, hr_new=hr_new,
            scored=self.scored,
        )  # fmt: skip


class _Rows:
    """The part of an EntityTable that staging reads: factors, zero biases, row count."""

    def __init__(self, factors: np.ndarray):
        self.factors = factors
        self.bias = np.zeros(factors.shape[0], np.float32)
        self.n = factors.shape[0]


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    ok = (na > 0) & (nb > 0)
    if not ok.any():
        return 0.0
    cos = np.einsum("ij,ij->i", a[ok], b[ok]) / (na[ok] * nb[ok])
    return float(np.mean(cos))


def warm_up_rebuild() -> None:
    """Compile (or load from numba's cache) what the loop thread calls during a swap."""
    from stream_mf.state import new_confidence_map

    _select_pairs(new_confidence_map(), np.zeros(1, np.bool_), np.zeros(1, np.bool_))
