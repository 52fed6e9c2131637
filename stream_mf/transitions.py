"""Item-to-item transitions: "a user's last item was followed by that item", decayed, bounded.

The largest single gain measured on MovieLens (docs/quality-ablation.md): a decayed count of
transitions across users, per predecessor row, added to the factor score of each successor of
the user's last item at `ModelConfig.transition_weight` times its share of the row's decayed
total (`transition_norm` "share", the default; "max": log1p of the count over the row's
largest, which gained as much on MovieLens but lost planted tastes and niches). Factors learn
what a user likes; this learns what people pick *next*, which a per-user vector cannot express.

State, all plain arrays (the store, learner snapshots and the model log carry them whole):

- `succ[item, m]` int32, the successor in slot m of `item`'s row, -1 for an empty slot;
- `logw[item, m]` float64, its log decayed count anchored at t = 0 (`log sum 2**(t/half_life)`,
  the product's convention: decaying never rewrites a row, ranking within a row needs none);
- `last[user]` int32, the user's last item, -1 before the first event.

Memory is bounded: items x M slots x 12 bytes (M = `transition_slots`, 32 by default: 3.7 MB
for MovieLens's 9.7k items, 38 MB for a million... rows only exist for items, never pairs). A
new successor of a full row takes the weakest slot (lowest log-count, the lowest slot index on a
tie): a fresh transition is anchored at the newest time, so it outweighs old single ones.
Updates run in event order, so the table is identical however the stream is cut into batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numba import njit

NEG_INF = -np.inf


@dataclass
class Transitions:
    """The successor table and each user's last item, grown with the model's capacity."""

    slots: int
    succ: np.ndarray = field(default_factory=lambda: np.full((0, 1), -1, np.int32))
    logw: np.ndarray = field(default_factory=lambda: np.full((0, 1), NEG_INF))
    last: np.ndarray = field(default_factory=lambda: np.full(0, -1, np.int32))
    #: set by the block evaluator (`stream_mf.block_eval`) while it learns a block: each
    #: event's bonus at its test time is recorded into it (None: nothing recorded)
    recording: TransitionLog | None = None

    @classmethod
    def empty(cls, slots: int, n_users: int = 0, n_items: int = 0) -> Transitions:
        return cls(
            slots=slots,
            succ=np.full((n_items, slots), -1, np.int32),
            logw=np.full((n_items, slots), NEG_INF),
            last=np.full(n_users, -1, np.int32),
        )

    def reserve(self, n_users: int, n_items: int) -> None:
        """Room for `n_users` and `n_items` rows (doubling, like `EntityTable.reserve`)."""
        if self.last.shape[0] < n_users:
            cap = max(n_users, 2 * self.last.shape[0], 16)
            grown = np.full(cap, -1, np.int32)
            grown[: self.last.shape[0]] = self.last
            self.last = grown
        if self.succ.shape[0] < n_items or self.succ.shape[1] != self.slots:
            cap = max(n_items, 2 * self.succ.shape[0], 16)
            succ = np.full((cap, self.slots), -1, np.int32)
            logw = np.full((cap, self.slots), NEG_INF)
            m = min(self.slots, self.succ.shape[1])
            succ[: self.succ.shape[0], :m] = self.succ[:, :m]
            logw[: self.succ.shape[0], :m] = self.logw[:, :m]
            self.succ, self.logw = succ, logw

    @property
    def nbytes(self) -> int:
        return int(self.succ.nbytes + self.logw.nbytes + self.last.nbytes)


@dataclass
class TransitionLog:
    """Per event of a block, the bonus entries it was scored with: event e's in
    [ptr[e], ptr[e + 1]) of `item` and `value` (float32, weight x normalised count)."""

    ptr: np.ndarray
    item: np.ndarray
    value: np.ndarray


@njit(cache=True, inline="always")
def _log1pexp(x: float) -> float:
    """log(1 + e^x): the decayed count's log1p, from its log, without overflow."""
    if x > 30.0:
        return x
    return math.log1p(math.exp(x))


@njit(cache=True, inline="always")
def _add(succ: np.ndarray, logw: np.ndarray, row: int, item: int, lw: float) -> None:
    """Fold one transition row -> item of log-weight `lw` into the table."""
    slots = succ.shape[1]
    weakest = 0
    empty = -1
    for m in range(slots):
        s = succ[row, m]
        if s == item:
            a, b = logw[row, m], lw
            if a < b:
                a, b = b, a
            logw[row, m] = a + math.log1p(math.exp(b - a))
            return
        if s < 0:
            if empty < 0:
                empty = m
        elif logw[row, m] < logw[row, weakest]:
            weakest = m
    m = empty if empty >= 0 else weakest
    succ[row, m] = item
    logw[row, m] = lw


@njit(cache=True, nogil=True)
def _bonus_into(
    succ: np.ndarray,
    logw: np.ndarray,
    row: int,
    now_lw: float,
    weight: float,
    n_items: int,
    out_item: np.ndarray,
    out_val: np.ndarray,
    at: int,
    share: bool = False,
) -> int:
    """Row `row`'s entries (successors known below `n_items`) as weight x log1p(decayed count)
    / the row's largest (or, `share`, weight x decayed count / the row's total), into `out_*`
    from `at`; returns the new end."""
    slots = succ.shape[1]
    if share:  # a share does not depend on `now`: count from the row's newest instead, so
        # that a row older than ~1,000 half-lives does not underflow to no bonus at all
        top = -np.inf
        for m in range(slots):
            j = succ[row, m]
            if j >= 0 and j < n_items and logw[row, m] > top:
                top = logw[row, m]
        if top > -np.inf:
            now_lw = top
    mx = 0.0
    for m in range(slots):
        j = succ[row, m]
        if j >= 0 and j < n_items:
            if share:
                mx += math.exp(logw[row, m] - now_lw)
            else:
                v = _log1pexp(logw[row, m] - now_lw)
                if v > mx:
                    mx = v
    if not mx > 0.0:
        return at
    for m in range(slots):
        j = succ[row, m]
        if j >= 0 and j < n_items:
            out_item[at] = j
            if share:
                out_val[at] = np.float32(weight * math.exp(logw[row, m] - now_lw) / mx)
            else:
                out_val[at] = np.float32(weight * _log1pexp(logw[row, m] - now_lw) / mx)
            at += 1
    return at


@njit(cache=True, nogil=True)
def _update(
    succ: np.ndarray,
    logw: np.ndarray,
    last: np.ndarray,
    users: np.ndarray,
    items: np.ndarray,
    times: np.ndarray,
    rate: float,
    changed: np.ndarray,
    record: bool,
    clock0: float,
    weight: float,
    n_items0: int,
    rec_ptr: np.ndarray,
    rec_item: np.ndarray,
    rec_val: np.ndarray,
    share: bool,
) -> int:
    """Fold a batch in event order; writes the predecessor row of each transition into
    `changed` (with repeats) and returns how many. Under `record`, first writes each event's
    bonus as the model would score it just before learning it (the clock then: the running
    maximum of `clock0` and earlier times; items known then)."""
    n_changed = 0
    at = 0
    clock = clock0
    known = n_items0
    for e in range(users.shape[0]):
        u, i = users[e], items[e]
        p = last[u]
        if record:
            rec_ptr[e] = at
            if p >= 0 and weight != 0.0:
                at = _bonus_into(
                    succ, logw, p, clock * rate, weight, known, rec_item, rec_val, at, share
                )
        if p >= 0 and p != i:
            _add(succ, logw, p, i, times[e] * rate)
            changed[n_changed] = p
            n_changed += 1
        last[u] = i
        if times[e] > clock:
            clock = times[e]
        if i + 1 > known:
            known = i + 1
    if record:
        rec_ptr[users.shape[0]] = at
    return n_changed


def update(
    t: Transitions,
    users: np.ndarray,
    items: np.ndarray,
    times: np.ndarray,
    decay_rate: float,
    *,
    clock0: float = 0.0,
    weight: float = 0.0,
    n_items0: int = 0,
    share: bool = False,
) -> np.ndarray:
    """Fold a batch (indices already registered, `t` reserved for them) into the table in
    event order; returns the rows it changed, sorted and unique. While `t.recording` is set
    (the block evaluator), each event's bonus at its test time is recorded there."""
    n = users.shape[0]
    changed = np.empty(n, np.int32)
    rec = t.recording is not None
    cap = n * t.slots if rec else 0
    ptr = np.zeros(n + 1 if rec else 1, np.int64)
    ritem = np.empty(cap, np.int32)
    rval = np.empty(cap, np.float32)
    m = _update(
        t.succ,
        t.logw,
        t.last,
        np.ascontiguousarray(users, np.int32),
        np.ascontiguousarray(items, np.int32),
        np.ascontiguousarray(times, np.float64),
        decay_rate,
        changed,
        rec,
        clock0,
        weight,
        n_items0,
        ptr,
        ritem,
        rval,
        share,
    )
    if rec:
        t.recording = TransitionLog(ptr, ritem[: ptr[n]], rval[: ptr[n]])
    return np.unique(changed[:m])


def bonus(
    succ: np.ndarray,
    logw: np.ndarray,
    item: int,
    now: float,
    decay_rate: float,
    weight: float,
    n_items: int,
    share: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The items `item`'s row adds to, and by how much (float32): weight x log1p(decayed
    count at `now`) / the row's largest (`share`: weight x decayed count / the row's total,
    which `now` does not change). Empty for no row, a zero weight or an empty row."""
    if weight == 0.0 or item < 0 or item >= succ.shape[0]:
        return np.empty(0, np.int32), np.empty(0, np.float32)
    slots = succ.shape[1]
    out_i = np.empty(slots, np.int32)
    out_v = np.empty(slots, np.float32)
    k = _bonus_into(succ, logw, item, now * decay_rate, weight, n_items, out_i, out_v, 0, share)
    return out_i[:k], out_v[:k]


def add_bonus(
    scores: np.ndarray,
    succ: np.ndarray,
    logw: np.ndarray,
    item: int,
    now: float,
    decay_rate: float,
    weight: float,
    share: bool = False,
) -> None:
    """Add the user's last `item`'s row to `scores` (one per item, float32) in place: the one
    scoring rule of the query (`recommend.recommend`) and the evaluator."""
    idx, val = bonus(succ, logw, item, now, decay_rate, weight, scores.shape[0], share)
    if idx.size:
        scores[idx] += val.astype(scores.dtype)


# ---- the reference twin (plain Python, for the tests) ----


def update_reference(
    succ: np.ndarray,
    logw: np.ndarray,
    last: np.ndarray,
    users: np.ndarray,
    items: np.ndarray,
    times: np.ndarray,
    decay_rate: float,
) -> None:
    """`update` one event at a time in Python with numpy's logaddexp."""
    for u, i, t in zip(users.tolist(), items.tolist(), times.tolist(), strict=True):
        p = int(last[u])
        if p >= 0 and p != i:
            row = succ[p]
            hit = np.flatnonzero(row == i)
            lw = t * decay_rate
            if hit.size:
                logw[p, hit[0]] = np.logaddexp(logw[p, hit[0]], lw)
            else:
                free = np.flatnonzero(row < 0)
                # the first free slot, else the first of equal minima
                m = int(free[0]) if free.size else int(np.argmin(logw[p]))
                succ[p, m] = i
                logw[p, m] = lw
        last[u] = i


def bonus_reference(
    succ: np.ndarray,
    logw: np.ndarray,
    item: int,
    now: float,
    decay_rate: float,
    weight: float,
    share: bool = False,
) -> dict[int, float]:
    """`bonus` as a dict, in numpy."""
    ok = succ[item] >= 0
    counts = np.exp(logw[item][ok] - now * decay_rate)
    vs = counts if share else np.log1p(counts)
    den = vs.sum() if share else (vs.max() if vs.size else 0.0)
    if not vs.size or den <= 0:
        return {}
    return {
        int(j): float(np.float32(weight * v / den)) for j, v in zip(succ[item][ok], vs, strict=True)
    }
