"""Prequential (test-then-learn) evaluation, Vinagre et al. 2014.

For each event, in time order: if its user has been seen before, ask the model for its top-K
(excluding items the user already has) and record whether the event's item is there, and at which
rank; then learn the event. Repeats of an item the user already has are learned but not scored,
because excluding seen items would make them certain misses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Protocol, cast

import numba
import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from stream_mf.als import als_fit, confidence_matrix
from stream_mf.block_eval import NOT_SCORED, BlockScorer
from stream_mf.config import EventTypeSpec, ModelConfig
from stream_mf.datasets import EventColumns
from stream_mf.model import EventBatch, Kernel, OnlineModel
from stream_mf.rebuild import Outcome, Rebuild, RebuildConfig
from stream_mf.rebuild_scheduler import RebuildScheduler
from stream_mf.recommend import add_transitions
from stream_mf.scoring import event_rank, ndcg_of, top_unseen
from stream_mf.state import ModelState, confidence_items


class PrequentialLearner(Protocol):
    name: str

    def user_index(self, user_id: str) -> int: ...

    def item_index(self, item_id: str) -> int: ...

    def scores(self, user: int) -> np.ndarray: ...

    def recommend(self, user: int, k: int, exclude: np.ndarray) -> np.ndarray: ...

    def learn(self, batch: EventBatch) -> None: ...


class _ModelLearner:
    """Shared id handling: every learner here keeps its ids in an OnlineModel's tables.

    `block_mode` says how the block evaluator (`stream_mf.block_eval`) may score it: by the
    item factors and biases (`factors`, as `SGDLearner.scores`), by popularity (`popularity`)
    or not at all (None: the per-event loop). Such a learner learns through `learn(batch,
    kernel)` and says with `piece_length` where its own schedule cuts the stream."""

    name = "base"
    block_mode: str | None = None

    def __init__(self, config: ModelConfig):
        self.model = OnlineModel(config)

    def piece_length(self, batch: EventBatch) -> int:
        """How many of `batch`'s leading events may be learnt in one call (nothing of the
        learner's own happens between them)."""
        return len(batch)

    def user_index(self, user_id: str) -> int:
        return self.model.state.users.index.get(user_id, -1)

    def item_index(self, item_id: str) -> int:
        return self.model.state.items.index.get(item_id, -1)

    def learn(self, batch: EventBatch, kernel: Kernel | None = None) -> None:
        self.model.learn(batch, kernel)

    def scores(self, user: int) -> np.ndarray:
        """A fresh score per item for `user` (callers may overwrite it)."""
        raise NotImplementedError

    def recommend(self, user: int, k: int, exclude: np.ndarray) -> np.ndarray:
        return top_unseen(self.scores(user), exclude, k)


class SGDLearner(_ModelLearner):
    name = "sgd"
    block_mode: str | None = "factors"

    def scores(self, user: int) -> np.ndarray:
        """The factors and item biases, plus the user's last item's successors (the query's
        `recommend.recommend`, and the block evaluator's bonus)."""
        st = self.model.state
        items = st.items
        n = items.n
        s = items.factors[:n] @ st.users.factors[user] + items.bias[:n]
        add_transitions(s, st, user)
        return s


class PopularLearner(_ModelLearner):
    """Decayed popularity so far; the SGD part runs with no negatives and is ignored."""

    name = "popular"
    block_mode = "popularity"

    def __init__(self, config: ModelConfig):
        super().__init__(
            config.model_copy(update={"dim": 1, "n_negatives": 0, "transition_weight": 0.0})
        )

    def scores(self, user: int) -> np.ndarray:
        items = self.model.state.items
        return items.logpop[: items.n].copy()


def _fit_als(
    model: OnlineModel, U: np.ndarray, V: np.ndarray, rcfg: RebuildConfig
) -> tuple[np.ndarray, np.ndarray]:
    """A full ALS fit on the model's decayed confidences, warm-started from (U, V) grown to
    the current number of users and items."""
    st = model.state
    nu, ni, dim = st.users.n, st.items.n, U.shape[1]
    U = _grow(U, nu, dim, st.config.seed)
    V = _grow(V, ni, dim, st.config.seed + 1)
    keys, vals = confidence_items(st.confidence)
    by_user, by_item = confidence_matrix(
        keys,
        vals,
        nu,
        ni,
        float(st.clock[0]),
        st.config.decay_rate,
        rcfg.alpha,
        rcfg.min_confidence,
    )
    als_fit(
        by_user,
        by_item,
        U,
        V,
        rcfg.reg,
        rcfg.iterations,
        rcfg.solver,
        rcfg.cg_steps,
        compute_loss=False,
    )
    return U, V


def refit_pieces(batch: EventBatch, seen: int, every: int) -> Iterator[tuple[EventBatch, bool]]:
    """`batch` cut where a refit is due, after the first event ever and then every `every`
    events, each piece with whether a refit follows it. Refits then land on the same events
    however the stream was cut into batches (one event at a time, as `prequential` feeds it, or
    in bulk), so a model's answers do not depend on the batching."""
    lo, n = 0, len(batch)
    while lo < n:
        done = seen + lo
        due = 1 if done == 0 else (done // every + 1) * every
        hi = min(n, due - seen)
        yield batch.slice(lo, hi), seen + hi == due
        lo = hi


def _grow(a: np.ndarray, n: int, dim: int, seed: int) -> np.ndarray:
    if a.shape[0] >= n:
        return a[:n]
    rng = np.random.default_rng(seed + a.shape[0])
    extra = (rng.standard_normal((n - a.shape[0], dim)) * 0.01).astype(np.float32)
    return np.concatenate([a, extra])


class ALSLearner(_ModelLearner):
    """Implicit ALS refit every `refit_every` events; in between, each user's vector is folded in
    from the user's current decayed row against the last item factors (without it, a model
    refit every N events has not seen most users it must score on bursty streams)."""

    name = "als"

    def __init__(
        self, config: ModelConfig, rebuild: RebuildConfig | None = None, refit_every: int = 1000
    ):
        super().__init__(config.model_copy(update={"n_negatives": 0, "transition_weight": 0.0}))
        self.rcfg = rebuild or RebuildConfig()
        self.refit_every = refit_every
        self.U = np.zeros((0, config.dim), np.float32)
        self.V = np.zeros((0, config.dim), np.float32)
        self.gram = np.zeros((config.dim, config.dim))
        self.rows: dict[int, dict[int, float]] = {}
        # per user, since the last refit: (M = sum e v v^T, m = sum e v, s = sum v, L) with
        # e = exp(logc - L); decay scales every e alike, so the fold-in costs O(k^2) an event
        # instead of O(items of the user x k^2)
        self.stats: dict[int, list] = {}
        self.seen_events = 0

    def learn(self, batch: EventBatch, kernel: Kernel | None = None) -> None:
        for piece, refit in refit_pieces(batch, self.seen_events, self.refit_every):
            self._learn(piece, refit)

    def _learn(self, batch: EventBatch, refit: bool) -> None:
        delta = self.model.learn(batch)  # never recorded: the per-event loop scores ALS
        n_items = self.V.shape[0]
        for key, val in zip(delta.pair_keys.tolist(), delta.pair_values.tolist(), strict=True):
            u, i = key >> 32, key & 0xFFFFFFFF
            row = self.rows.setdefault(u, {})
            old = row.get(i)
            row[i] = val
            st = self.stats.get(u)
            if st is not None and i < n_items:
                self._update(st, i, old, val)
        self.seen_events += len(batch)
        if refit:
            self.U, self.V = _fit_als(self.model, self.U, self.V, self.rcfg)
            v = self.V.astype(np.float64)
            self.gram = v.T @ v
            self.stats = {}

    def _update(self, st: list, i: int, old: float | None, new: float) -> None:
        M, m, s, L = st
        v = self.V[i].astype(np.float64)
        if new - L > 30.0:  # rebase before exp overflows
            scale = np.exp(L - new)
            M *= scale
            m *= scale
            st[3] = L = new
        if old is not None:
            e = np.exp(old - L)
            M -= e * np.outer(v, v)
            m -= e * v
            s -= v
        e = np.exp(new - L)
        M += e * np.outer(v, v)
        m += e * v
        s += v

    def _stats(self, user: int) -> list:
        st = self.stats.get(user)
        if st is None:
            row = self.rows.get(user, {})
            items = np.fromiter((i for i in row if i < self.V.shape[0]), np.int64)
            logc = np.fromiter((row[i] for i in items.tolist()), np.float64, items.size)
            L = float(logc.max()) if logc.size else 0.0
            e = np.exp(logc - L)
            vs = self.V[items].astype(np.float64)
            st = [(vs.T * e) @ vs, vs.T @ e, vs.sum(axis=0), L]
            self.stats[user] = st
        return st

    def user_vector(self, user: int) -> np.ndarray:
        M, m, s, L = self._stats(user)
        if not s.any():
            return np.zeros(self.V.shape[1], np.float32)
        state = self.model.state
        scale = self.rcfg.alpha * np.exp(L - float(state.clock[0]) * state.config.decay_rate)
        a = self.gram + scale * M + self.rcfg.reg * np.eye(M.shape[0])
        return np.linalg.solve(a, s + scale * m).astype(np.float32)

    def scores(self, user: int) -> np.ndarray:
        return self.V @ self.user_vector(user)


class _GuardView:
    """The rows the guard scores from, as they were at a step point (a copy: the per-event
    loop learns in between; the updater scores a batch before learning it)."""

    def __init__(self, state: ModelState):
        nu, ni = state.users.n, state.items.n
        self.users = SimpleNamespace(factors=state.users.factors[:nu].copy())
        self.items = SimpleNamespace(
            factors=state.items.factors[:ni].copy(), bias=state.items.bias[:ni].copy()
        )


class HybridLearner(SGDLearner):
    """Online SGD with the updater's own rebuild (`stream_mf.rebuild.Rebuild`: fit, guard,
    catch-up, swap, after-swap) driven synchronously, its background work run inline.

    With `refit_every` (`--model hybrid`), a rebuild is due that many events after the last one
    ended and its guard gives up after as many events. Without it (the shipped model, `default`),
    `rebuild`'s own schedule applies, `every_events` and `every_seconds`, with the seconds (and
    the guard's timeout) counted in stream time, the events' timestamps: the updater counts them
    on the wall clock, which no replay can repeat. The swap solves up to `final_rows` (never cut
    by `swap_budget_s`, a wall-clock budget). Batches are cut where a rebuild is due and, while
    one runs, every `guard_per_batch` events from its start (the updater steps it between
    micro-batches; cut so, its guard scores every event it may): answers do not depend on how
    the stream is cut. Nothing is persisted: the rebuild's writes are what a store would
    commit."""

    name = "hybrid"

    def __init__(
        self,
        config: ModelConfig,
        rebuild: RebuildConfig | None = None,
        refit_every: int | None = 1000,
    ):
        super().__init__(config)
        rcfg = rebuild or RebuildConfig()
        self.stream_clock = refit_every is None
        if refit_every is not None:
            rcfg = rcfg.model_copy(
                update={
                    "every_events": refit_every,
                    "every_seconds": None,
                    "guard_timeout_s": float(refit_every),
                }
            )
        self.rcfg = rcfg.model_copy(update={"swap_budget_s": math.inf})
        self.schedule = RebuildScheduler(
            every_events=self.rcfg.every_events,
            every_seconds=self.rcfg.every_seconds,
            events_at_last=0,
            time_at_last=0.0,
        )
        self.rebuild: Rebuild | None = None
        self.rebuild_started_at = 0  # events applied when the rebuild in flight started
        self.generation = 0
        self.outcomes: list[Outcome] = []
        self.failed = 0
        self._started = False
        self._items_of: dict[int, set[int]] = {}  # what the guard excludes, as the store has it
        self._pending: list[int] = []  # pairs learnt since the last step point
        self._seen_arrays: dict[int, np.ndarray] = {}  # `_seen`'s answers, until they change
        self._guard: _GuardView | None = None
        self._guard_ids: list[tuple[np.ndarray, np.ndarray]] = []  # the step's events so far

    def _now(self) -> float:
        """The rebuild's clock here: stream time, or events learnt (`refit_every`)."""
        st = self.model.state
        return float(st.clock[0]) if self.stream_clock else float(st.events_applied)

    def piece_length(self, batch: EventBatch) -> int:
        st, n = self.model.state, len(batch)
        if self.rebuild is not None:
            step = self.rcfg.guard_per_batch
            return min(n, step - (st.events_applied - self.rebuild_started_at) % step)
        sch, cut = self.schedule, n
        if sch.every_events:
            cut = min(cut, max(1, sch.events_at_last + sch.every_events - st.events_applied))
        if sch.every_seconds and n:
            start = sch.time_at_last if self._started else float(batch.times[0])
            clock = np.maximum.accumulate(np.maximum(batch.times[:cut], st.clock[0]))
            due = np.flatnonzero(clock - start >= sch.every_seconds)
            if due.size:
                cut = int(due[0]) + 1
        return cut

    def learn(self, batch: EventBatch, kernel: Kernel | None = None) -> None:
        lo = 0
        while lo < len(batch):
            hi = lo + self.piece_length(batch.slice(lo, len(batch)))
            self._learn_piece(batch.slice(lo, hi), kernel)
            lo = hi

    def _learn_piece(self, batch: EventBatch, kernel: Kernel | None) -> None:
        """Learn a piece that ends at or before the next cut. While a rebuild runs, what the
        updater does per micro-batch happens per `guard_per_batch` events from its start: the
        guard scores them, in one call once they are learnt, against the model as it was when
        they began (`_GuardView`), and the rebuild steps after them, however the stream reaches
        here."""
        st = self.model.state
        if not self._started and len(batch):
            self._started = True  # the schedule's seconds count from the first event
            self.schedule.time_at_last = float(batch.times[0]) if self.stream_clock else 0.0
        rb = self.rebuild
        at_step = rb is None or self._into_step(st) == 0
        if at_step:
            self._fold_pending()
            self._guard = _GuardView(st) if rb is not None and rb.wants_scores else None
            self._guard_ids = []
        if rb is not None and self._guard is not None:
            users = st.users.lookup(batch.user_ids).astype(np.int64)
            items = st.items.lookup(batch.item_ids).astype(np.int64)
            self._guard_ids.append((users, items))
        delta = self.model.learn(batch, kernel)
        self._pending.extend(delta.pair_keys.tolist())
        if rb is not None:
            rb.note(delta)
            if self._into_step(st) == 0:
                self._score_step(rb)
                self._step(rb)
        if self.rebuild is None and self._pending:
            self._fold_pending()
        if rb is None and self.schedule.due(st.events_applied, st.users.n, st.items.n, self._now()):
            self.schedule.started()
            self.generation += 1
            self.rebuild_started_at = st.events_applied
            self.rebuild = Rebuild(
                st, self.rcfg, generation=self.generation, inline=True, clock=self._now
            )

    def _score_step(self, rb: Rebuild) -> None:
        """The guard scores the step's events in one call, at its end, against the model and
        the items each user had at its start: the same call however the stream was cut into
        pieces (its matrix product, so its hits, then do not depend on the cutting)."""
        if self._guard is None or not self._guard_ids:
            return
        users = np.concatenate([u for u, _ in self._guard_ids])
        items = np.concatenate([i for _, i in self._guard_ids])
        self._guard_ids = []
        rb.score(cast(ModelState, self._guard), users, items, self._seen)

    def _into_step(self, st: ModelState) -> int:
        """Events since the last step point of the rebuild in flight."""
        return (st.events_applied - self.rebuild_started_at) % self.rcfg.guard_per_batch

    def _fold_pending(self) -> None:
        """The pairs learnt since the last step point join what the guard excludes."""
        for key in self._pending:
            u = key >> 32
            self._items_of.setdefault(u, set()).add(key & 0xFFFFFFFF)
            self._seen_arrays.pop(u, None)
        self._pending = []

    def _seen(self, user: int) -> np.ndarray:
        """The user's items as the guard excludes them (kept until they change: a user's
        events come in bursts)."""
        got = self._seen_arrays.get(user)
        if got is None:
            mine = self._items_of.get(user, ())
            got = self._seen_arrays[user] = np.fromiter(mine, np.int64, len(mine))
        return got

    def _step(self, rb: Rebuild) -> None:
        st = self.model.state
        try:
            outcome = rb.step(st).outcome
        except RuntimeError:
            self.failed += 1
            outcome = None
        if outcome is None and not rb.phase.over:
            return
        if outcome is not None:
            self.outcomes.append(outcome)
        self.rebuild = None
        self.schedule.ended(st.events_applied, self._now(), replaced_below=None, unfinished=False)


class ShippedLearner(HybridLearner):
    """What `stream-mf updater` learns and `stream-mf query` answers with the same settings:
    the online model, the updater's rebuilds on their schedule (in stream time, see
    `HybridLearner`), and the query's answer (`stream_mf.answer.answer`: factors and item biases
    for a user with at least `min_user_events` events, decayed popularity for one with fewer,
    the user's items excluded)."""

    name = "default"

    def __init__(
        self,
        config: ModelConfig,
        rebuild: RebuildConfig | None = None,
        min_user_events: int = 1,
    ):
        super().__init__(config, rebuild, refit_every=None)
        self.min_user_events = min_user_events
        if min_user_events > 1:
            self.block_mode = None  # two answer kinds: the per-event loop scores it

    def scores(self, user: int) -> np.ndarray:
        st = self.model.state
        if st.users.count[user] < self.min_user_events:
            return st.items.logpop[: st.items.n].copy()
        return super().scores(user)


LEARNERS: dict[str, Callable[..., PrequentialLearner]] = {
    "sgd": SGDLearner,
    "popular": PopularLearner,
    "als": ALSLearner,
    "hybrid": HybridLearner,
    "default": ShippedLearner,
}


def make_learner(
    name: str,
    config: ModelConfig,
    rebuild: RebuildConfig | None = None,
    refit_every: int = 1000,
    min_user_events: int = 1,
) -> PrequentialLearner:
    """A learner by name; `als` and `hybrid` also take the rebuild settings, `default` (the
    shipped model) the rebuild's schedule and the query's `min_user_events`."""
    if name in ("als", "hybrid"):
        return LEARNERS[name](config, rebuild, refit_every)
    if name == "default":
        return ShippedLearner(config, rebuild, min_user_events)
    return LEARNERS[name](config)


@dataclass
class PrequentialResult:
    model: str
    k: int
    events: int = 0
    evaluated: int = 0
    hits: int = 0
    ndcg_sum: float = 0.0
    seconds: float = 0.0
    windows: list[dict[str, float]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    # per event: -1 not scored (new user or an item the user has), 0 miss, 1 hit; kept on request
    outcomes: np.ndarray | None = None

    @property
    def recall_at_k(self) -> float:
        return self.hits / self.evaluated if self.evaluated else 0.0

    @property
    def ndcg_at_k(self) -> float:
        return self.ndcg_sum / self.evaluated if self.evaluated else 0.0

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "k": self.k,
            "recall_at_k": self.recall_at_k,
            "ndcg_at_k": self.ndcg_at_k,
            "evaluated": self.evaluated,
            "events": self.events,
            "events_per_s": self.events_per_s,
            "seconds": self.seconds,
            "windows": self.windows,
            "config": self.config,
        }


def base_weights(events: EventColumns, types: Mapping[str, EventTypeSpec]) -> np.ndarray:
    """Type weight, times the value where the type uses one."""
    w = np.empty(len(events))
    for j, (t, v) in enumerate(zip(events.event_types, events.values.tolist(), strict=True)):
        spec = types.get(t)
        if spec is None:
            raise ValueError(
                f"event type {t!r} is not configured (known: {', '.join(sorted(types))})"
            )
        w[j] = spec.weight * v if spec.use_value and math.isfinite(v) else spec.weight
    return w


#: events per block of the block evaluator: the matrix product wants many rows; each event
#: re-scores the rows the block's earlier events changed (~9 an event by default), so the
#: correction grows with the block (64 x 9.7k x 64 ran at the product's full speed on one core)
BLOCK_EVENTS = 64
#: progress bar steps, in events
_PROGRESS_EVERY = 2000


def block_mode(learner: PrequentialLearner) -> str | None:
    """How the block evaluator can score `learner`, or None: a learner whose scores are not
    its class's own (a test's poisoned one) goes through the per-event loop."""
    mode = getattr(learner, "block_mode", None)
    own = {
        "factors": (SGDLearner.scores, ShippedLearner.scores),
        "popularity": (PopularLearner.scores,),
    }.get(mode or "", ())
    if "scores" in vars(learner) or type(learner).scores not in own:
        return None
    return mode


@contextmanager
def _numba_threads(n: int) -> Iterator[None]:
    """numba's parallel kernels (the rebuilds' ALS) on `n` threads, for this thread only.

    One: an evaluation is one sequential stream, and its ALS solves are small; on two busy
    cores the second thread's spinning and barrier waits cost more than it gave (hybrid on
    MovieLens-latest-small: 26 CPU-s on two threads, 11 on one, and less wall time too,
    bench/bench_evaluate.py). Run several evaluations side by side to use more cores. Results
    do not depend on it (`als.gramian`)."""
    old = numba.get_num_threads()
    numba.set_num_threads(min(n, old))
    try:
        yield
    finally:
        numba.set_num_threads(old)


def prequential(
    events: EventColumns,
    learner: PrequentialLearner,
    k: int = 10,
    types: Mapping[str, EventTypeSpec] | None = None,
    window: int = 5000,
    progress: bool = True,
    keep_outcomes: bool = False,
    block: int | None = BLOCK_EVENTS,
) -> PrequentialResult:
    """Test-then-learn over `events` (which must already be in time order). `keep_outcomes`
    records each event's outcome, to compare with a sample scored elsewhere (the live eval).
    `block`: events scored together by the block evaluator where the learner allows it
    (`stream_mf.block_eval`, same hits as the per-event loop); None forces the loop."""
    types = types or ModelConfig().event_types
    weights = base_weights(events, types)
    start = time.perf_counter()
    bar = tqdm(total=len(events), disable=not progress, unit="ev", desc=learner.name, leave=False)
    mode = block_mode(learner) if block else None
    with _numba_threads(1):
        if mode is None:
            ranks = _per_event(events, learner, weights, k, bar)
        else:
            assert block is not None and isinstance(learner, _ModelLearner)
            ranks = _blocks(events, learner, weights, k, bar, mode == "popularity", block)
    bar.close()
    res = _summary(ranks, learner.name, k, window)
    res.seconds = time.perf_counter() - start
    if keep_outcomes:
        res.outcomes = np.where(ranks == NOT_SCORED, -1, ranks >= 0).astype(np.int8)
    return res


def _summary(ranks: np.ndarray, name: str, k: int, window: int) -> PrequentialResult:
    """Totals and per-window figures from each event's rank (NOT_SCORED, MISS or 0..k-1)."""
    res = PrequentialResult(model=name, k=k, events=int(ranks.size))
    w_hits, w_ndcg, w_n = 0, 0.0, 0
    scored = np.flatnonzero(ranks != NOT_SCORED)
    for e, r in zip(scored.tolist(), ranks[scored].tolist(), strict=True):
        res.evaluated += 1
        w_n += 1
        if r >= 0:
            g = ndcg_of(r)
            res.hits += 1
            res.ndcg_sum += g
            w_hits += 1
            w_ndcg += g
        if w_n == window:
            res.windows.append(
                {"event": e + 1, "recall_at_k": w_hits / w_n, "ndcg_at_k": w_ndcg / w_n}
            )
            w_hits, w_ndcg, w_n = 0, 0.0, 0
    if w_n >= max(1, window // 4):  # a tiny last window would only add noise
        res.windows.append(
            {"event": int(ranks.size), "recall_at_k": w_hits / w_n, "ndcg_at_k": w_ndcg / w_n}
        )
    return res


def _per_event(
    events: EventColumns,
    learner: PrequentialLearner,
    weights: np.ndarray,
    k: int,
    bar: tqdm,
) -> np.ndarray:
    """The reference loop: each event scored from `learner.scores`, then learnt alone."""
    ranks = np.full(len(events), NOT_SCORED, np.int64)
    seen: dict[int, set[int]] = {}
    seen_list: dict[int, list[int]] = {}
    empty = np.empty(0, np.int64)
    for e in range(len(events)):
        uid, iid = events.users[e], events.items[e]
        u = learner.user_index(uid)
        if u >= 0:
            item = learner.item_index(iid)
            mine = seen.get(u)
            if mine is None or item not in mine:
                lst = seen_list.get(u)
                exclude = np.asarray(lst, np.int64) if lst else empty
                ranks[e] = event_rank(learner.scores(u), item, exclude, k)
        learner.learn(
            EventBatch.build(
                [uid], [iid], weights[e : e + 1], events.times[e : e + 1], first_offset=e
            )
        )
        u = learner.user_index(uid)
        item = learner.item_index(iid)
        if item not in seen.setdefault(u, set()):
            seen[u].add(item)
            seen_list.setdefault(u, []).append(item)
        if e % _PROGRESS_EVERY == 0:
            bar.update(_PROGRESS_EVERY if e else 1)
    return ranks


def _blocks(
    events: EventColumns,
    learner: _ModelLearner,
    weights: np.ndarray,
    k: int,
    bar: tqdm,
    popularity: bool,
    block: int,
) -> np.ndarray:
    """The block evaluator (`stream_mf.block_eval`): blocks of up to `block` events, cut where
    the learner's own schedule cuts (`piece_length`), each learnt in one recorded call."""
    n = len(events)
    ranks = np.full(n, NOT_SCORED, np.int64)
    scorer = BlockScorer(learner.model, popularity, k)
    users, items = events.users, events.items
    lo, shown = 0, 0
    # one BLAS thread: a block's product is too small to split (on 2 busy cores two threads
    # made a 64 x 9.7k x 64 product 2-5x slower than one, measured by hand)
    with threadpool_limits(1, "blas"):
        while lo < n:
            hi = min(n, lo + block)
            batch = EventBatch.build(
                users[lo:hi], items[lo:hi], weights[lo:hi], events.times[lo:hi], first_offset=lo
            )
            cut = learner.piece_length(batch)
            if cut < hi - lo:
                hi = lo + cut
                batch = batch.slice(0, cut)
            start = scorer.begin()
            learner.learn(batch, scorer.kernel)
            scorer.ranks(start, ranks[lo:hi])
            lo = hi
            if lo - shown >= _PROGRESS_EVERY or lo == n:
                bar.update(lo - shown)
                shown = lo
    return ranks
