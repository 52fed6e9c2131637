"""Full implicit-ALS rebuilds that reconcile online drift while the stream goes on.

A rebuild runs in the updater's process, in a background thread (the numba kernels release the
GIL), in steps the updater's loop drives between batches (`step`), each short. Its phase is a
`RebuildPhase` (the numbers below: fitting, guarding, catching_up, swapping, after_swap; then
done, rejected or failed), each step declares the phase it runs in (`runs_in`) and moves on
explicitly (`TRANSITIONS`). A rebuild never writes the store itself: a step returns the commit
to make (`stream_mf.writes`: a staged chunk, the flip, an after-swap step, clearing the
unfinished mark) and its driver's loop makes it. Staging (invisible rows of the next generation)
is decided in the background, which queues the blocks it finished; each step hands one queued
chunk to the loop before anything else, and the swap waits until the queue is empty. A block is
read from the new factors when the loop writes it, so a row a later round changes meanwhile may
be written half-changed, but that round queues its block again: the last write of every block
follows the last change of its rows. When one is due is `stream_mf.rebuild_scheduler`'s
business; `run_to_completion` drives one inline (the updater's deterministic mode, evaluation).

1. **fit**: from a snapshot of the confidence map taken between two batches, build the decayed
   confidence matrix `1 + alpha * c_ui` and fit implicit ALS, warm-started from the live factors;
   rescale it to U*s, V/s (the same scores) so that its rows fit SGD's max-norm ball; then stage
   the new factors in the store under the next generation (invisible to readers).
2. **guard**: the next incoming events are scored test-then-learn against both the live model
   and the new one (before either has learned them), until `guard_events` are scored or
   `guard_timeout_s` passes; the rebuild is dropped if the new model's HR@10 is lower by more
   than `guard_margin`.
3. **catch up** (in the background, repeated while it shrinks what is left): rows whose data
   changed since the previous round (users and items with new events, new ids) are re-solved
   against the new factors from their full decayed rows, alternating users and items
   `catchup_sweeps` times (up to `new_row_sweeps` more while new users of mostly new items,
   a taste the fit never saw, still move), and their blocks re-staged.
4. **swap**, on the loop thread between batches: re-solve the rows touched since the last round,
   new ids first, at most `final_rows` of them and for at most `swap_budget_s`; copy the new
   factors into the live arrays; the step returns the flip of the generation (`model_version`
   + 1), one WriteBatch with those rows and every new id's (new ids not solved yet get their
   initial vector).
5. **after the swap**, only if rows were left over (the stream touched rows faster than the
   rounds re-solved them): they are re-solved in the background against the new factors, from
   their rows as of the swap, and the change is added to the live rows (so what SGD learned on
   the new model meanwhile stays), `after_rows` rows per step, each step one commit.

The rebuild keeps its own copy of the confidence map (the snapshot plus every batch's changed
pairs), so neither the swap nor any other loop-thread step scans the live map, and background
rounds never read what the loop thread writes. A crash before the flip leaves the old generation
(the staged one is deleted on open); after it, the new one, never a mix. Every event since the
snapshot reaches the factors of its user and item through a re-solve of their full decayed rows;
a crash between the flip and the last step of 5 leaves the rows not applied yet at their
previous round's solution (new ids at their initial vector): still one consistent model, with
those rows' newest events in the confidence map but not in their factors. The flip commit marks
the generation unfinished (`StateStore.rebuild_unfinished`) and the last after-swap step's commit
clears the mark, so a restarted writer knows to rebuild at once.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import numba
import numpy as np

from stream_mf.als import CSR, als_fit, confidence_matrix, gramian, solve_rows
from stream_mf.arrays import unique_sorted
from stream_mf.config import RebuildConfig
from stream_mf.model import BatchDelta
from stream_mf.rng import ITEM_STREAM, USER_STREAM, init_rows
from stream_mf.state import ModelState, confidence_items, new_confidence_map
from stream_mf.store_layout import BLOCK_ROWS
from stream_mf.topk import hits_at_k
from stream_mf.writes import (
    AfterSwapStep,
    ClearUnfinished,
    Flip,
    MarkRebuilt,
    Stage,
    Write,
    with_mark,
)

log = logging.getLogger(__name__)

_LOW32 = np.int64(0xFFFFFFFF)


# ---- the rebuild's copy of the confidence map ---------------------------------------------------


def _latest(batches: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys of `batches` (in order) with each key's last value."""
    if not batches:
        return np.empty(0, np.int64), np.empty(0, np.float64)
    k = np.concatenate([b[0] for b in batches]).astype(np.int64, copy=False)
    v = np.concatenate([b[1] for b in batches]).astype(np.float64, copy=False)
    order = np.argsort(k, kind="stable")
    k, v = k[order], v[order]
    last = np.ones(k.size, np.bool_)
    last[:-1] = k[1:] != k[:-1]
    return k[last], v[last]


def _ranges(sorted_keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions of every key whose high 32 bits are one of `ids` (sorted unique)."""
    hi_bits = ids.astype(np.int64) << 32
    lo = np.searchsorted(sorted_keys, hi_bits)
    hi = np.searchsorted(sorted_keys, hi_bits + (np.int64(1) << 32))
    lens = hi - lo
    total = int(lens.sum())
    if total == 0:
        return np.empty(0, np.int64)
    starts = np.repeat(lo - np.cumsum(lens) + lens, lens)
    return starts + np.arange(total, dtype=np.int64)


def _in(values: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """Mask of `values` found in `sorted_ids` (sorted unique)."""
    if sorted_ids.size == 0:
        return np.zeros(values.size, np.bool_)
    pos = np.minimum(np.searchsorted(sorted_ids, values), sorted_ids.size - 1)
    return sorted_ids[pos] == values


class _Pairs:
    """Sorted keys/values as of the last merge, an item-major index, and the batches since.

    Why a copy: rows can then be read by user or item without scanning the live map on the loop
    thread, and the background thread never reads a map the loop thread is writing.
    """

    def __init__(self, keys: np.ndarray, vals: np.ndarray) -> None:
        self.keys, self.vals = keys, vals  # sorted unique (user << 32 | item)
        self.item_keys = np.empty(0, np.int64)  # (item << 32 | user), sorted
        self.item_pos = np.empty(0, np.int64)  # where each of those is in keys
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []  # loop thread appends

    def note(self, keys: np.ndarray, vals: np.ndarray) -> None:
        self.pending.append((keys.astype(np.int64), vals.astype(np.float64)))

    def take(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The batches noted so far (loop thread), to merge in the background."""
        out, self.pending = self.pending, []
        return out

    def merge(self, batches: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Fold batches into the sorted arrays and rebuild the item index (background)."""
        k, v = _latest(batches)
        if k.size:
            pos = np.searchsorted(self.keys, k)
            hit = pos < self.keys.size
            hit[hit] = self.keys[pos[hit]] == k[hit]
            vals = self.vals.copy()
            vals[pos[hit]] = v[hit]
            new = ~hit
            self.keys = np.insert(self.keys, pos[new], k[new])
            self.vals = np.insert(vals, pos[new], v[new])
        elif self.item_keys.size == self.keys.size:
            return
        ik = ((self.keys & _LOW32) << 32) | (self.keys >> 32)
        order = np.argsort(ik)
        self.item_keys, self.item_pos = ik[order], order

    def entries(self, ids: np.ndarray, kind: str) -> np.ndarray:
        """Entries per user or item as of the last merge (what solving its row costs)."""
        keys = self.keys if kind == "user" else self.item_keys
        hi_bits = ids.astype(np.int64) << 32
        lo = np.searchsorted(keys, hi_bits)
        return np.searchsorted(keys, hi_bits + (np.int64(1) << 32)) - lo

    def rows(
        self, users: np.ndarray, items: np.ndarray, batches: list[tuple[np.ndarray, np.ndarray]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every pair of these users and items: the merged arrays overlaid with `batches` (noted
        since the last merge, in order)."""
        pos = unique_sorted(
            np.concatenate(
                [_ranges(self.keys, users), self.item_pos[_ranges(self.item_keys, items)]]
            )
        )  # np.union1d takes numpy 2.4's slow hash route (stream_mf/arrays.py)
        parts = [(self.keys[pos], self.vals[pos])]
        for k, v in batches:
            sel = _in(k >> 32, users) | _in(k & _LOW32, items)
            parts.append((k[sel], v[sel]))
        return _latest(parts)


def _concat(batches: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not batches:
        return np.empty(0, np.int64), np.empty(0, np.float64)
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def _chunks(rows: np.ndarray, entries: np.ndarray, work: int = 16_384) -> list[np.ndarray]:
    """Consecutive pieces of `rows` of about `work` entries each (a row costs its entries plus
    a k×k product, about 32 entries at k=64), each sorted, as row lookups and `_compact` expect.

    By entries, not rows: a chunk of 256 items with the most popular among them took 100 ms,
    longer than the whole time budget the chunks are there to respect."""
    cost = np.cumsum(entries.astype(np.int64) + 32)
    out: list[np.ndarray] = []
    lo = 0
    while lo < rows.size:
        base = cost[lo - 1] if lo else 0
        hi = max(lo + 1, int(np.searchsorted(cost, base + work, side="right")))
        out.append(np.sort(rows[lo:hi]))
        lo = hi
    return out


def _compact(rows: np.ndarray, row_of: np.ndarray, col_of: np.ndarray, data: np.ndarray,
             n_cols: int) -> CSR:  # fmt: skip
    """CSR whose row r is entity `rows[r]` (sorted unique): solving a few rows then costs
    nothing per entity of the whole model."""
    if rows.size > 1 and not np.all(rows[1:] > rows[:-1]):  # else rows would be dropped
        raise ValueError("rows must be sorted and unique")
    if col_of.size and int(col_of.max()) >= n_cols:  # the kernels do not check bounds
        raise ValueError(f"a pair refers to column {int(col_of.max())} of {n_cols}")
    keep = _in(row_of, rows)
    r = np.searchsorted(rows, row_of[keep])
    order = np.argsort(r, kind="stable")
    indptr = np.zeros(rows.size + 1, np.int64)
    np.cumsum(np.bincount(r, minlength=rows.size), out=indptr[1:])
    return CSR(
        indptr, col_of[keep][order].astype(np.int32), data[keep][order].astype(np.float32), n_cols
    )


def _guard_events(
    users: np.ndarray, items: np.ndarray, seen: Callable[[int], np.ndarray], n_items: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The events the guard scores (those whose item the user has not seen), as user rows,
    target items, and each one's seen items under `n_items` (CSR: pointers, indices)."""
    rows: list[int] = []
    targets: list[int] = []
    parts: list[np.ndarray] = []
    ptr = [0]
    for u, i in zip(users.tolist(), items.tolist(), strict=True):
        mine = seen(u)
        mine = mine[mine < n_items]
        if np.any(mine == i):
            continue
        rows.append(u)
        targets.append(i)
        parts.append(mine)
        ptr.append(ptr[-1] + mine.size)
    flat = np.concatenate(parts).astype(np.int64, copy=False) if parts else np.empty(0, np.int64)
    return (
        np.asarray(rows, np.int64),
        np.asarray(targets, np.int64),
        np.asarray(ptr, np.int64),
        flat,
    )


# ---- the rebuild -------------------------------------------------------------------------------


@dataclass
class Outcome:
    swapped: bool
    generation: int
    users: np.ndarray  # rows whose blocks the caller's (flip) commit must write
    items: np.ndarray
    seconds: float  # the swap step
    rows_resolved: int
    drift: float  # mean cosine between old and new vectors of the same rows
    hr_old: float
    hr_new: float
    scored: int = 0
    swap_rows: int = 0  # rows re-solved in the swap step
    deferred: int = 0  # rows re-solved after the swap (their change added to the live rows)
    swap_parts: dict[str, float] = field(default_factory=dict)  # where the swap step's time went
    unguarded: bool = False  # swapped on fewer scored events than guard_min_events


class _Touched:
    """Rows touched since the last `take`, as masks: marking costs a batch's size and taking
    one pass over the ids, where deduplicating a round's worth of batches took tens of ms."""

    def __init__(self) -> None:
        self.users = np.zeros(1024, np.bool_)
        self.items = np.zeros(1024, np.bool_)

    @staticmethod
    def _mark(mask: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if rows.size == 0:
            return mask
        need = int(rows.max()) + 1
        if need > mask.size:
            grown = np.zeros(max(need, mask.size * 2), np.bool_)
            grown[: mask.size] = mask
            mask = grown
        mask[rows] = True
        return mask

    def mark(self, users: np.ndarray, items: np.ndarray) -> None:
        self.users = self._mark(self.users, users)
        self.items = self._mark(self.items, items)

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        u, i = np.flatnonzero(self.users), np.flatnonzero(self.items)
        self.users[:] = False
        self.items[:] = False
        return u.astype(np.int64), i.astype(np.int64)


class _Growing:
    """Factor rows with spare capacity: new ids are appended without copying the whole array."""

    def __init__(self, rows: np.ndarray) -> None:
        self.buf = np.empty((max(16, rows.shape[0] * 3 // 2), rows.shape[1]), np.float32)
        self.n = rows.shape[0]
        self.buf[: self.n] = rows

    @property
    def a(self) -> np.ndarray:
        return self.buf[: self.n]

    def append(self, rows: np.ndarray) -> None:
        need = self.n + rows.shape[0]
        if need > self.buf.shape[0]:
            buf = np.empty((need * 3 // 2, self.buf.shape[1]), np.float32)
            buf[: self.n] = self.a
            self.buf = buf
        self.buf[self.n : need] = rows
        self.n = need


@dataclass
class _After:
    """Rows left over at the swap: re-solved in the background, then added step by step."""

    users: np.ndarray
    items: np.ndarray
    base_u: np.ndarray  # their new-model vectors as swapped in (what SGD started from)
    base_i: np.ndarray
    done: int = 0  # rows applied so far (users first)


class RebuildPhase(enum.Enum):
    """Where a rebuild is (module docstring): each step of `Rebuild` runs in one phase and moves
    to the next explicitly."""

    IDLE = "idle"
    FITTING = "fitting"  # 1, in the background
    GUARDING = "guarding"  # 2, scoring incoming events
    CATCHING_UP = "catching_up"  # 3, rounds in the background
    SWAPPING = "swapping"  # 4, on the loop thread
    AFTER_SWAP = "after_swap"  # 5, rows left over at the swap
    DONE = "done"
    REJECTED = "rejected"
    FAILED = "failed"

    @property
    def over(self) -> bool:
        return self in (RebuildPhase.DONE, RebuildPhase.REJECTED, RebuildPhase.FAILED)


P = RebuildPhase
#: the transitions a rebuild may make; anything else is a bug and raises
TRANSITIONS: dict[RebuildPhase, frozenset[RebuildPhase]] = {
    P.IDLE: frozenset({P.FITTING}),
    P.FITTING: frozenset({P.GUARDING, P.FAILED}),
    P.GUARDING: frozenset({P.CATCHING_UP, P.REJECTED, P.FAILED}),
    P.CATCHING_UP: frozenset({P.SWAPPING, P.FAILED}),
    P.SWAPPING: frozenset({P.AFTER_SWAP, P.DONE, P.REJECTED, P.FAILED}),
    P.AFTER_SWAP: frozenset({P.DONE, P.FAILED}),
    P.DONE: frozenset(),
    P.REJECTED: frozenset(),
    P.FAILED: frozenset(),
}


class RebuildPhaseError(RuntimeError):
    """A step called in a phase it does not run in, or a transition not in TRANSITIONS."""


_F = TypeVar("_F", bound=Callable[..., Any])


def runs_in(*phases: RebuildPhase) -> Callable[[_F], _F]:
    """Declare the phases a step of `Rebuild` runs in; calling it in any other raises."""

    def wrap(fn: _F) -> _F:
        @functools.wraps(fn)
        def checked(self: Rebuild, *args: Any, **kwargs: Any) -> Any:
            if self.phase not in phases:
                raise RebuildPhaseError(
                    f"{fn.__name__} runs in {', '.join(p.value for p in phases)}, "
                    f"not {self.phase.value}"
                )
            return fn(self, *args, **kwargs)

        checked.phases = phases  # type: ignore[attr-defined]
        return cast(_F, checked)

    return wrap


@dataclass(frozen=True)
class RebuildStep:
    """What one `Rebuild.step` asks of its driver: a commit to make (`write`, by the driver's
    loop, before anything else happens), and the `outcome` once the rebuild is over."""

    phase: RebuildPhase
    write: Write | None = None
    outcome: Outcome | None = None


class Rebuild:
    """One rebuild in flight. Drive it from the updater's loop: `note` every batch's delta,
    `step` between batches (after the batch's commit) and commit the `write` it returns, until
    it returns an `Outcome`. `inline=True` runs the background work in the caller (evaluation
    and the deterministic mode: the same steps, synchronously, so that results repeat);
    `stage=False` stages nothing (no store); `clock` is what the guard's timeout is measured on
    (evaluation counts events)."""

    def __init__(
        self,
        state: ModelState,
        cfg: RebuildConfig,
        *,
        generation: int,
        stage: bool = False,
        inline: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.now = clock  # what `guard_timeout_s` is measured on
        self.phase = RebuildPhase.IDLE
        self.generation = generation
        self.stage = stage
        # (kind, blocks) finished in the background, for the loop to write (thread-safe deque)
        self.staged: deque[tuple[str, np.ndarray]] = deque()
        self._zero_bias = np.zeros(0, np.float32)
        self.inline = inline
        self.thread: threading.Thread | None = None
        self.started = time.monotonic()
        self.decay_rate = state.config.decay_rate
        self.touched = _Touched()
        self.rounds = 0
        self.last_round_rows: int | None = None
        self.rows_resolved = 0
        self.error: BaseException | None = None
        self.fitted_at: float | None = None
        self.finite = True
        self.scored = 0
        self.hits_old = 0
        self.hits_new = 0
        self.after: _After | None = None
        self.swap_outcome: Outcome | None = None
        self._u = self._v = _Growing(np.empty((0, state.config.dim), np.float32))
        self.gram_u = np.zeros((state.config.dim,) * 2)  # YᵀY of U and V, kept current
        self.gram_v = np.zeros((state.config.dim,) * 2)
        self.clock = float(state.clock[0])
        # the fit's factors are rescaled (U*s, V/s) to fit in SGD's max-norm ball (`_fit_scale`);
        # later solves then use the regularisations that keep them the same ALS solution
        self.max_norm = state.config.max_norm
        self.scale = 1.0
        self.reg_u = self.reg_v = cfg.reg
        self.fit_rows = (state.users.n, state.items.n)  # the rows the fit solves (ids before)
        self._start_fit(state)

    @property
    def U(self) -> np.ndarray:  # noqa: N802 (the usual name)
        return self._u.a

    @property
    def V(self) -> np.ndarray:  # noqa: N802
        return self._v.a

    # ---- phases --------------------------------------------------------------------------------

    def _to(self, phase: RebuildPhase) -> None:
        if phase not in TRANSITIONS[self.phase]:
            raise RebuildPhaseError(f"no transition from {self.phase.value} to {phase.value}")
        log.debug("rebuild generation %d: %s -> %s", self.generation, self.phase.value, phase.value)
        self.phase = phase

    @property
    def busy(self) -> bool:
        """Background work in flight: `step` waits for it."""
        return self.thread is not None and self.thread.is_alive()

    def wait(self) -> None:
        """Block until the background work in flight is done (tests, evaluation)."""
        if self.thread is not None:
            self.thread.join()

    def _background(self, fn: Callable[..., None], *args: Any) -> None:
        if self.inline:  # a Ctrl-C stays a Ctrl-C here
            self.thread = None
            try:
                fn(*args)
            except Exception as exc:
                self.error = exc
            return
        self.thread = threading.Thread(target=self._guarded, args=(fn, *args), daemon=True)
        self.thread.start()

    # ---- loop-thread API --------------------------------------------------------------------

    def note(self, delta: BatchDelta) -> None:
        if self.swap_outcome is not None or not delta.pair_keys.size:
            return  # after the swap the live model learns on the new factors itself
        self.touched.mark(delta.pair_keys >> 32, delta.pair_keys & _LOW32)
        self.pairs.note(delta.pair_keys, delta.pair_values)

    @property
    def wants_scores(self) -> bool:
        """True while the guard is collecting: call `score` before learning each batch."""
        return self.phase is RebuildPhase.GUARDING and self.scored < self.cfg.guard_events

    @runs_in(RebuildPhase.GUARDING)
    def score(
        self,
        state: ModelState,
        users: np.ndarray,
        items: np.ndarray,
        seen: Callable[[int], np.ndarray],
        k: int = 10,
    ) -> None:
        """Test-then-learn on incoming events, for the live and the new model alike.

        All of a call's events are scored together: one matrix product per model over the
        call's users (a user's events come in bursts), then each event's hit counted as
        `scoring.score_event` decides it (`topk.hits_at_k`). An event's scores are the same
        whichever other events share its call only up to the product's summation order: a
        caller that needs repeatable hits passes the same events per call."""
        ok = np.flatnonzero((users >= 0) & (users < self.U.shape[0]) & (items >= 0))
        ok = ok[items[ok] < self.V.shape[0]][: self.cfg.guard_per_batch]
        ni = self.V.shape[0]
        rows, targets, ptr, excluded = _guard_events(users[ok], items[ok], seen, ni)
        if not rows.size:
            return
        who, row_of = np.unique(rows, return_inverse=True)
        old = state.users.factors[who] @ state.items.factors[:ni].T
        old += state.items.bias[:ni]
        new = self.U[who] @ self.V.T
        self.hits_old += hits_at_k(old, row_of, targets, ptr, excluded, k)
        self.hits_new += hits_at_k(new, row_of, targets, ptr, excluded, k)
        self.scored += int(rows.size)

    def step(self, state: ModelState) -> RebuildStep:
        """Advance as far as the work done allows. Raises RuntimeError if background work
        failed (the rebuild is then FAILED; `swap_outcome` says whether it had swapped).
        Blocks staged in the background go first, one chunk a step, while work goes on."""
        # whether work is in flight, before the queue: a round that ends between the two looks
        # has queued all it staged by then (else the swap could come before its last blocks,
        # which would then be lost, or written over the live generation after the flip)
        busy = self.busy
        if self.staged:
            return RebuildStep(self.phase, self._next_stage())
        if busy:
            return RebuildStep(self.phase)
        if self.error is not None:
            self._to(RebuildPhase.FAILED)
            raise RuntimeError(f"rebuild failed: {self.error}") from self.error
        if self.phase is RebuildPhase.FITTING:
            self._fitted()
        if self.phase is RebuildPhase.GUARDING:
            verdict = self._judge(state)
            if verdict is not None:
                return verdict
        if self.phase is RebuildPhase.CATCHING_UP:
            return self._catch_up(state)
        if self.phase is RebuildPhase.AFTER_SWAP:
            return self._apply_after(state)
        raise RebuildPhaseError(f"nothing to step in {self.phase.value}")

    def run_to_completion(
        self, state: ModelState, commit: Callable[[Write], None] | None = None
    ) -> RebuildStep:
        """Step with no new events until the rebuild is over, handing each write but the last
        step's to `commit` (left out if None: a driver with no store, or a test); the last
        step is returned with its write, for the driver to commit (with a mark of its own).
        Raises RuntimeError as `step` does."""
        while True:
            self.wait()
            res = self.step(state)
            if res.outcome is not None:
                return res
            if res.write is not None and commit is not None:
                commit(res.write)

    # ---- the steps -----------------------------------------------------------------------------

    @runs_in(RebuildPhase.IDLE)
    def _start_fit(self, state: ModelState) -> None:
        keys, vals = confidence_items(state.confidence, sort=False)  # sorted in the background
        self.pairs = _Pairs(keys, vals)
        nu, ni = state.users.n, state.items.n
        # the warm start is copied in the background: the loop thread may move or update the
        # live arrays meanwhile, which only changes where the fit starts from
        live = (state.users.factors, state.items.factors)
        log.info("rebuild started: %d users, %d items, %d entries", nu, ni, keys.size)
        self._to(RebuildPhase.FITTING)
        self._background(self._fit, keys, vals, nu, ni, live)

    @runs_in(RebuildPhase.FITTING)
    def _fitted(self) -> None:
        self.fitted_at = self.now()
        self._to(RebuildPhase.GUARDING)

    @runs_in(RebuildPhase.GUARDING)
    def _judge(self, state: ModelState) -> RebuildStep | None:
        """Wait for the guard's events (or its timeout), then reject or go on to catch up."""
        assert self.fitted_at is not None
        if self.scored < self.cfg.guard_events and (
            self.now() - self.fitted_at < self.cfg.guard_timeout_s
        ):
            return RebuildStep(self.phase)
        if not self._passes():
            return self._reject(state)
        self._to(RebuildPhase.CATCHING_UP)
        return None

    @runs_in(RebuildPhase.CATCHING_UP)
    def _catch_up(self, state: ModelState) -> RebuildStep:
        """Another background round while it shrinks what is left, else the swap."""
        users, items = self.touched.take()
        remaining = users.size + items.size
        shrinking = self.last_round_rows is None or remaining < 0.9 * self.last_round_rows
        if self.rounds < self.cfg.max_rounds and (
            not self.rounds or (remaining > self.cfg.final_rows and shrinking)
        ):
            self._start_round(state, users, items, remaining)
            return RebuildStep(self.phase)
        self._to(RebuildPhase.SWAPPING)
        return self._swap(state, users, items)

    # ---- background work --------------------------------------------------------------------

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except BaseException as exc:  # reported on the loop thread by step()
            self.error = exc

    def _fit(
        self, keys: np.ndarray, vals: np.ndarray, nu: int, ni: int,
        live: tuple[np.ndarray, np.ndarray],
    ) -> None:  # fmt: skip
        t0 = time.perf_counter()
        c = self.cfg
        self._u, self._v = _Growing(live[0][:nu]), _Growing(live[1][:ni])
        self.fit_rows = (nu, ni)
        order = np.argsort(keys)
        keys, vals = keys[order], vals[order]
        self.pairs.keys, self.pairs.vals = keys, vals
        by_user, by_item = confidence_matrix(
            keys, vals, nu, ni, self.clock, self.decay_rate, c.alpha, c.min_confidence
        )

        def progress(it: int, seconds: float, loss: float | None) -> None:
            log.info("rebuild: ALS iteration %d/%d (%.2fs)", it + 1, c.iterations, seconds)

        als_fit(
            by_user, by_item, self.U, self.V, c.reg, c.iterations, c.solver, c.cg_steps,
            progress=progress, compute_loss=False,
        )  # fmt: skip
        del by_user, by_item
        self._fit_scale()
        self.pairs.merge([])
        self._stage(np.arange(nu), np.arange(ni))
        log.info("rebuild: fit and staged in %.1fs", time.perf_counter() - t0)

    def _fit_scale(self) -> None:
        """Rescale the fit to U*s, V/s: every dot product (so every ranking) is kept, and the
        longest rows fit in SGD's max-norm ball, as close to s = 1 as that allows.

        Why: implicit ALS gives popular items long vectors and users short ones (a niche's items
        up to 3.1-3.3 on the niche streams, users under 1). SGD clips a row to `max_norm` the
        first time it touches it, so within a few hundred events after the swap the popular
        items shrank, and a niche's users lost 1.2 of their 10 (docs/niche-ablation.md). The
        later solves use reg/s^2 for users and reg*s^2 for items: the same ALS solution, in
        these coordinates.
        """
        cap = self.max_norm
        if cap <= 0.0 or self.U.shape[0] == 0 or self.V.shape[0] == 0:
            return
        nu = float(np.sqrt(np.max(np.einsum("ij,ij->i", self.U, self.U))))
        nv = float(np.sqrt(np.max(np.einsum("ij,ij->i", self.V, self.V))))
        if not (np.isfinite(nu) and np.isfinite(nv)) or nu <= 0.0 or nv <= 0.0:
            return  # the guard rejects a non-finite fit; a zero one has nothing to scale
        lo, hi = nv / cap, cap / nu  # s in [lo, hi]: both sides fit
        s = min(max(1.0, lo), hi) if lo <= hi else math.sqrt(nv / nu)
        if s == 1.0:
            return
        self._u.buf[: self._u.n] *= np.float32(s)
        self._v.buf[: self._v.n] *= np.float32(1.0 / s)
        self.scale = s
        self.reg_u, self.reg_v = self.cfg.reg / s**2, self.cfg.reg * s**2
        log.info(
            "rebuild: factors scaled by %.3f (users) and %.3f (items) to fit max_norm %.2f "
            "(longest rows %.2f and %.2f)", s, 1.0 / s, cap, nu, nv,
        )  # fmt: skip

    def _grow(self, state: ModelState) -> tuple[int, int]:
        """Append the ids registered since (from their online vectors), on the loop thread;
        the row counts before."""
        nu0, ni0 = self._u.n, self._v.n
        nu, ni = state.users.n, state.items.n
        if nu > nu0:
            self._u.append(state.users.factors[nu0:nu])
        if ni > ni0:
            self._v.append(state.items.factors[ni0:ni])
        self.clock = float(state.clock[0])
        return nu0, ni0

    def _start_round(
        self, state: ModelState, users: np.ndarray, items: np.ndarray, remaining: int
    ) -> None:
        """Re-solve changed rows in the background."""
        self._grow(state)
        batches = self.pairs.take()
        self.rounds += 1
        self.last_round_rows = remaining
        self._background(self._round, batches, users, items)

    def _round(
        self, batches: list[tuple[np.ndarray, np.ndarray]], users: np.ndarray, items: np.ndarray
    ) -> None:
        self.pairs.merge(batches)
        pairs = self.pairs.rows(users, items, [])
        self._resolve(pairs, users, items, fresh_grams=True, sweeps=self.cfg.catchup_sweeps)
        self._settle_new(pairs, users, items)
        self._stage(users, items)

    def _settle_new(
        self, pairs: tuple[np.ndarray, np.ndarray], users: np.ndarray, items: np.ndarray
    ) -> None:
        """If the round has users registered after the snapshot whose items are mostly new too
        (`_unanchored`), alternate over all its rows again until those users and their new
        items stop moving or `new_row_sweeps` more are spent (background).

        Why: a row the fit knew starts a round at its fitted vector; a row registered since
        starts at its online one, in SGD's coordinates. When a taste's users and items are all
        new (a niche that formed during the rebuild), nothing fitted anchors them: after 3
        sweeps a 60-user niche's items scored 0.32 for its users, its best other item 0.33,
        and SGD on the swapped model then lost it (10 -> 5.7 of 10, docs/niche-ablation.md).
        All the round's rows, not only the new ones: the touched rows the niche's users did
        not rate are what it must rise above (the new rows alone reached 7.3). Only such
        rounds: on MovieLens 2 rounds of 44 rebuilds qualify, where sweeping every round with
        a new id went 0.1052 -> 0.1044 Recall@10."""
        new_u, new_i = self._unanchored(pairs[0], users, items)
        for _ in range(self.cfg.new_row_sweeps):
            if new_u.size + new_i.size == 0:
                return
            before = np.concatenate([self.U[new_u], self.V[new_i]])
            self._resolve(pairs, users, items, count=False)
            after = np.concatenate([self.U[new_u], self.V[new_i]])
            moved = float(np.linalg.norm(after - before))
            if moved <= 1e-3 * max(float(np.linalg.norm(after)), 1e-12):
                return

    def _unanchored(
        self, keys: np.ndarray, users: np.ndarray, items: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """New users (of `users`) with most of their items new, and the new items they have:
        a taste nothing fitted anchors. New users of old items (a catalogue's usual arrivals)
        are placed by the fitted items in the usual sweeps."""
        nu_fit, ni_fit = self.fit_rows
        u_of, i_of = keys >> 32, keys & _LOW32
        new_user = u_of >= nu_fit
        u_new, i_new = u_of[new_user], i_of[new_user] >= ni_fit
        n = int(u_new.max()) + 1 if u_new.size else 0
        share = np.bincount(u_new, i_new, minlength=n) / np.maximum(
            np.bincount(u_new, minlength=n), 1
        )
        cand = np.flatnonzero(share > 0.5)
        cand = cand[_in(cand, users)]
        link = _in(u_of, cand) & (i_of >= ni_fit)
        new_i = unique_sorted(i_of[link])
        return cand.astype(np.int64), new_i[_in(new_i, items)]

    def _resolve(
        self,
        pairs: tuple[np.ndarray, np.ndarray],
        users: np.ndarray,
        items: np.ndarray,
        fresh_grams: bool = False,
        sweeps: int = 1,
        count: bool = True,
    ) -> None:
        """Users against V, then items against the updated U, from the full rows in `pairs`;
        `sweeps` times over (a taste that formed after the snapshot needs several alternations
        to show in the factors: one left a niche's users 6 of 10, docs/niche-ablation.md).

        The Gramians are kept current by rank updates over the rows solved (`fresh_grams`
        recomputes them first, in the background): a full YᵀY costs more than the few rows a
        swap solves.
        """
        if users.size == 0 and items.size == 0:
            return
        c = self.cfg
        keys, logc = pairs
        conf = np.exp(logc - self.clock * self.decay_rate)
        ok = conf >= c.min_confidence
        keys, data = keys[ok], c.alpha * conf[ok]
        u_of, i_of = keys >> 32, keys & _LOW32
        if fresh_grams:
            self.gram_u, self.gram_v = gramian(self.U), gramian(self.V)
        for _ in range(sweeps):
            if users.size:
                self.gram_u += self._solve_side(
                    users, self.U, self.V, u_of, i_of, data, self.gram_v, self.reg_u
                )
            if items.size:
                self.gram_v += self._solve_side(
                    items, self.V, self.U, i_of, u_of, data, self.gram_u, self.reg_v
                )
        if count:
            self.rows_resolved += int(users.size + items.size)

    def _solve_side(
        self, rows: np.ndarray, X_all: np.ndarray, Y: np.ndarray, row_of: np.ndarray,
        col_of: np.ndarray, data: np.ndarray, gram_y: np.ndarray, reg: float,
    ) -> np.ndarray:  # fmt: skip
        """Re-solve `rows` of `X_all` in place; returns the change of its Gramian."""
        c = self.cfg
        X = X_all[rows]
        before = gramian(X)
        C = _compact(rows, row_of, col_of, data, Y.shape[0])
        steps = max(c.cg_steps, 6)  # new rows start far from their solution
        solve_rows(C, X, Y, reg, None, c.solver, steps, gram_y)
        X_all[rows] = X
        return gramian(X) - before

    def _stage(self, users: np.ndarray, items: np.ndarray) -> None:
        self.finite = self.finite and bool(
            np.all(np.isfinite(self.U[users])) and np.all(np.isfinite(self.V[items]))
        )
        if not self.stage:
            return
        for kind, rows in (("user", users), ("item", items)):
            blocks = unique_sorted(np.asarray(rows, np.int64) // BLOCK_ROWS)
            step = self.cfg.stage_blocks
            for lo in range(0, blocks.size, step):
                self.staged.append((kind, blocks[lo : lo + step]))

    def _next_stage(self) -> Stage:
        """The next queued chunk, read from the new factors now (loop thread: `_grow` moves
        them only there, between background work)."""
        kind, blocks = self.staged.popleft()
        arr = self.U if kind == "user" else self.V
        if self._zero_bias.size < arr.shape[0]:
            self._zero_bias = np.zeros(arr.shape[0] * 3 // 2 + 16, np.float32)
        return Stage(kind, _Rows(arr, self._zero_bias), self.generation, blocks)

    # ---- the swap (loop thread) ----------------------------------------------------------------

    def _hit_rates(self) -> tuple[float, float]:
        if not self.scored:
            return 0.0, 0.0
        return self.hits_old / self.scored, self.hits_new / self.scored

    def _passes(self) -> bool:
        hr_old, hr_new = self._hit_rates()
        return self.finite and hr_new >= hr_old - self.cfg.guard_margin

    def _drift(self, state: ModelState) -> float:
        nu = self.U.shape[0]
        sample = np.arange(0, nu, max(1, nu // 10_000))
        return _mean_cosine(state.users.factors[sample], self.U[sample])

    def _reject(self, state: ModelState) -> RebuildStep:
        hr_old, hr_new = self._hit_rates()
        log.info(
            "rebuild rejected: generation %d, HR@10 on %d new events: old %.3f new %.3f, "
            "finite %s", self.generation, self.scored, hr_old, hr_new, self.finite,
        )  # fmt: skip
        none = np.empty(0, np.int64)
        self._to(RebuildPhase.REJECTED)
        out = Outcome(
            swapped=False, generation=self.generation, users=none, items=none, seconds=0.0,
            rows_resolved=self.rows_resolved, drift=self._drift(state), hr_old=hr_old,
            hr_new=hr_new, scored=self.scored,
        )  # fmt: skip
        # the guard judged a rebuild over the rows a mark was kept for: no rebuild at every restart
        return RebuildStep(self.phase, ClearUnfinished(), out)

    @runs_in(RebuildPhase.SWAPPING)
    def _swap(self, state: ModelState, users: np.ndarray, items: np.ndarray) -> RebuildStep:
        """Step 4 of the module docstring, on the loop thread: the flip to commit, and the
        outcome unless rows are left for after it."""
        timer = _Laps()
        nu0, ni0 = self._take_new_ids(state)
        new_u = np.arange(nu0, self._u.n, dtype=np.int64)
        new_i = np.arange(ni0, self._v.n, dtype=np.int64)
        all_u = np.concatenate([new_u, users[users < nu0]])  # new ids first
        all_i = np.concatenate([new_i, items[items < ni0]])
        pend = _concat(self.pairs.take())  # in order, so the last value of a key wins
        with _one_thread():
            self.gram_u += gramian(self.U[nu0:]) if self._u.n > nu0 else 0.0
            self.gram_v += gramian(self.V[ni0:]) if self._v.n > ni0 else 0.0
            timer.lap("grow")
            now_u, now_i, slowest = self._solve_within_budget(all_u, all_i, pend, timer.start)
            timer.lap("solve")
        later_u, later_i = _missing(all_u, now_u), _missing(all_i, now_i)
        # the background work checked every row it wrote; only the rows just re-solved remain
        self.finite = self.finite and bool(
            np.all(np.isfinite(self.U[now_u])) and np.all(np.isfinite(self.V[now_i]))
        )
        if not self._passes():
            return self._reject(state)
        out = self._swapped_outcome(state, now_u, now_i, later_u.size + later_i.size, timer)
        self._copy_in(state)
        timer.lap("copy")
        out.seconds = timer.total()
        timer.parts["slowest chunk"] = slowest * 1e3
        self._log_swap(out, timer.parts)
        # the flip writes what it solved and every new id (not staged)
        flip = Flip(
            self.generation,
            unique_sorted(np.concatenate([now_u, new_u])),
            unique_sorted(np.concatenate([now_i, new_i])),
            unfinished=bool(out.deferred),
        )
        if out.deferred:  # flip now, finish the rest on the new model (step 5)
            self._defer(later_u, later_i, pend)
            return RebuildStep(self.phase, flip)
        out.rows_resolved = self.rows_resolved
        self._to(RebuildPhase.DONE)
        return RebuildStep(self.phase, flip, out)

    def _take_new_ids(self, state: ModelState) -> tuple[int, int]:
        """Append the ids registered since the last round; the row counts before. They have no
        vector of the new model: they start from their initial one (as when registered),
        model-neutral, whether solved in the swap or after it."""
        nu0, ni0 = self._grow(state)
        cfg = state.config
        init_rows(self._u.buf, nu0, self._u.n, cfg.seed, USER_STREAM, cfg.init_scale)
        init_rows(self._v.buf, ni0, self._v.n, cfg.seed, ITEM_STREAM, cfg.init_scale)
        return nu0, ni0

    def _solve_within_budget(
        self,
        all_u: np.ndarray,
        all_i: np.ndarray,
        pend: tuple[np.ndarray, np.ndarray],
        start: float,
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """Re-solve candidates a chunk at a time, within `final_rows` and `swap_budget_s`;
        the rows solved (sorted) and the slowest chunk's seconds."""
        cap = self.cfg.final_rows
        share_u = cap * all_u.size // max(1, all_u.size + all_i.size)
        none = np.empty(0, np.int64)
        cand_u, cand_i = all_u[:share_u], all_i[: cap - share_u]
        chunks = [(c, none) for c in _chunks(cand_u, self.pairs.entries(cand_u, "user"))]
        chunks += [(none, c) for c in _chunks(cand_i, self.pairs.entries(cand_i, "item"))]
        # a chunk selects pending pairs of its own rows only: narrow them to the candidates
        # once here, not in every chunk (each pass over all of them cost ~6 ms of the budget)
        sel = _in(pend[0] >> 32, np.sort(cand_u)) | _in(pend[0] & _LOW32, np.sort(cand_i))
        pend_cand = (pend[0][sel], pend[1][sel])
        done_u, done_i = [none], [none]
        deadline = start + self.cfg.swap_budget_s
        slowest = 0.0
        for cu, ci in chunks:
            t = time.perf_counter()
            if t >= deadline:
                break
            self._resolve(self.pairs.rows(cu, ci, [pend_cand]), cu, ci)
            done_u.append(cu)
            done_i.append(ci)
            slowest = max(slowest, time.perf_counter() - t)
        return np.sort(np.concatenate(done_u)), np.sort(np.concatenate(done_i)), slowest

    def _swapped_outcome(
        self, state: ModelState, now_u: np.ndarray, now_i: np.ndarray, deferred: int,
        timer: _Laps,
    ) -> Outcome:  # fmt: skip
        hr_old, hr_new = self._hit_rates()
        unguarded = self.scored < min(self.cfg.guard_min_events, self.cfg.guard_events)
        if unguarded:
            log.warning(
                "rebuild generation %d swapped unguarded: the guard scored %d events in %.0f s, "
                "fewer than guard_min_events (%d), so nothing showed the new model is not worse",
                self.generation, self.scored, self.cfg.guard_timeout_s, self.cfg.guard_min_events,
            )  # fmt: skip
        none = np.empty(0, np.int64)
        out = self.swap_outcome = Outcome(
            swapped=True, generation=self.generation, users=none, items=none, seconds=0.0,
            rows_resolved=0, drift=self._drift(state), hr_old=hr_old, hr_new=hr_new,
            scored=self.scored, swap_rows=int(now_u.size + now_i.size), deferred=deferred,
            swap_parts=timer.parts, unguarded=unguarded,
        )  # fmt: skip
        return out

    def _copy_in(self, state: ModelState) -> None:
        """The new model becomes the live one (in memory; the flip commit persists it)."""
        nu, ni = self._u.n, self._v.n
        state.users.factors[:nu] = self.U
        state.items.factors[:ni] = self.V
        state.items.bias[:ni] = 0.0
        state.model_version += 1

    def _defer(
        self, later_u: np.ndarray, later_i: np.ndarray, pend: tuple[np.ndarray, np.ndarray]
    ) -> None:
        self._to(RebuildPhase.AFTER_SWAP)
        self.after = _After(later_u, later_i, self.U[later_u], self.V[later_i])
        self._background(self._after_round, [pend], later_u, later_i)

    def _log_swap(self, out: Outcome, parts: dict[str, float]) -> None:
        log.info(
            "rebuild swapped: generation %d, HR@10 on %d new events: old %.3f new %.3f, drift "
            "%.3f, swap step %.0f ms (%s), %d rows re-solved in it, %d left for after the swap",
            self.generation, out.scored, out.hr_old, out.hr_new, out.drift, out.seconds * 1e3,
            ", ".join(f"{k} {v:.0f}" for k, v in parts.items()), out.swap_rows, out.deferred,
        )  # fmt: skip

    def _after_round(
        self, batches: list[tuple[np.ndarray, np.ndarray]], users: np.ndarray, items: np.ndarray
    ) -> None:
        """Re-solve the left-over rows from their rows as of the swap (background)."""
        self.pairs.merge(batches)
        self._resolve(self.pairs.rows(users, items, []), users, items, fresh_grams=True)
        self.finite = self.finite and bool(
            np.all(np.isfinite(self.U[users])) and np.all(np.isfinite(self.V[items]))
        )

    @runs_in(RebuildPhase.AFTER_SWAP)
    def _apply_after(self, state: ModelState) -> RebuildStep:
        """Add the next `after_rows` re-solved rows' change to the live rows, to commit; the
        outcome with the last of them."""
        a = self.after
        assert a is not None and self.swap_outcome is not None
        if not self.finite:  # a non-finite solve: keep what SGD has; the rows stay consistent
            self._to(RebuildPhase.FAILED)
            raise RuntimeError("a row re-solved after the swap is not finite")
        nu_ = a.users.size
        lo, hi = a.done, min(a.done + self.cfg.after_rows, nu_ + a.items.size)
        ju, ji = slice(min(lo, nu_), min(hi, nu_)), slice(max(lo - nu_, 0), max(hi - nu_, 0))
        users, items = a.users[ju], a.items[ji]
        state.users.factors[users] += self.U[users] - a.base_u[ju]
        state.items.factors[items] += self.V[items] - a.base_i[ji]
        a.done = hi
        if hi < nu_ + a.items.size:
            return RebuildStep(self.phase, AfterSwapStep(users, items))
        out = self.swap_outcome
        out.users, out.items, out.rows_resolved = users, items, self.rows_resolved
        self._to(RebuildPhase.DONE)
        return RebuildStep(self.phase, AfterSwapStep(users, items, last=True), out)


def run_inline(
    rb: Rebuild, state: ModelState, at: int, commit: Callable[[Write], None]
) -> RebuildStep:
    """Run an inline rebuild started at `at` events applied to its end, committing every write
    in order; its last commit carries the mark `at` (`with_mark`), so that a driver restarted
    from the store runs it again exactly when it never ended. A failure of the rebuild itself
    is marked too, then raised (RuntimeError): it would fail the same way again; a failed
    commit (StoreError) is raised unmarked, so a restart runs the rebuild again."""
    try:
        res = rb.run_to_completion(state, commit)
    except RuntimeError:
        # only the rebuild's own failure (FAILED); a commit that failed (StoreError) is not
        # the rebuild's end: marked, a restart would never run it again
        if rb.phase is RebuildPhase.FAILED:
            commit(MarkRebuilt(at))
        raise
    res = dataclasses.replace(res, write=with_mark(res.write, at))
    assert res.write is not None
    commit(res.write)
    return res


class _Laps:
    """Where a step's time goes, in ms per named part."""

    def __init__(self) -> None:
        self.start = self._t = time.perf_counter()
        self.parts: dict[str, float] = {}

    def lap(self, name: str) -> None:
        t = time.perf_counter()
        self.parts[name] = (t - self._t) * 1e3
        self._t = t

    def total(self) -> float:
        return sum(self.parts.values()) / 1e3


def _missing(rows: np.ndarray, done: np.ndarray) -> np.ndarray:
    """`rows` not in `done` (sorted unique), sorted."""
    out = rows[~_in(rows, done)]
    out.sort()
    return out


class _Rows:
    """The part of an EntityTable that staging reads: factors, zero biases, row count."""

    def __init__(self, factors: np.ndarray, zeros: np.ndarray | None = None):
        self.factors = factors
        n = factors.shape[0]
        self.bias = np.zeros(n, np.float32) if zeros is None or zeros.size < n else zeros[:n]
        self.n = n


@contextmanager
def _one_thread() -> Iterator[None]:
    """Numba's parallel kernels on one thread, for this thread only (numba's setting is per
    thread). For the swap's few rows: on a loaded machine each parallel region's barrier waits
    for a descheduled worker, which measured 5-10x the single-thread time."""
    old = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(old)


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    ok = (na > 0) & (nb > 0)
    if not ok.any():
        return 0.0
    cos = np.einsum("ij,ij->i", a[ok], b[ok]) / (na[ok] * nb[ok])
    return float(np.mean(cos))


def warm_up_rebuild() -> None:
    """Compile (or load from numba's cache) what the loop thread calls during a swap, and start
    this thread's OpenMP team for one thread, as the swap uses it (the first parallel call from
    a thread pays for both: 10-60 ms measured)."""
    x = np.ones((2, 4), np.float32)
    y = np.ones((3, 4), np.float32)
    c = CSR(np.array([0, 1, 1], np.int64), np.zeros(1, np.int32), np.ones(1, np.float32), 3)
    with _one_thread():
        for solver in ("cg", "cholesky"):
            solve_rows(c, x, y, 0.1, None, solver, 1, gramian(y))
        init_rows(x, 0, 1, 0, USER_STREAM, 0.1)
    confidence_items(new_confidence_map(), sort=False)  # the snapshot copy
