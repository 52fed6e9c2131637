"""Online SGD on implicit feedback with sampled negatives, one event at a time.

The kernel takes a whole micro-batch as arrays (a Python call per event would cost more than the
math). Events are applied strictly in order and all randomness is keyed by (seed, partition,
offset), and the negative sampler is rebuilt on a schedule counted in events, so the resulting
arrays do not depend on how the stream was cut into batches. `sgd_reference.py` is the plain
numpy twin the tests compare against.

Losses (per positive (u, i) with event weight w and sampled negatives j):
  logistic: -w log s(x_ui) - w * negative_weight * sum_j log s(-x_uj)      (x = u.v + b)
  bpr:      -w sum_j log s(x_ui - x_uj)

The default is BPR with 8 negatives (40% uniform, the rest by popularity**0.75), each the
higher-scoring of 2 draws (adaptive, WARP-like), a user learning rate 2.5x the item one, no item
biases (lr_bias 0), every vector capped at norm 2, and after its steps the user vector leans toward
the item just learnt (`user_pull` 0.1: recency of the user's own last items, with no state beyond
the vector; docs/quality-ablation.md). Biases learnt against popularity-drawn negatives fall for a
niche's items and rise for lucky tail items, and swamp a niche user's affinity
(docs/niche-ablation.md); `bias_uniform` learns them from uniform draws only, which makes them
popularity instead (no better for niches). Prequential Recall@10 on MovieLens latest-small (every
rating a positive; popularity 0.049): BPR with plain uniform negatives 0.058; adding the adaptive
choice 0.067; the previous defaults (biases at 0.2x) 0.0866, then 0.089; today's (the pull and a
180-day half-life) about 0.100; 16 negatives, 3 draws 0.102 (bench/results/tune_sgd.json), but a
user vector that jumpy loses a stable taste on planted data (tests/unit/test_sgd.py) and 3 draws
cost ~30% of the speed. The norm cap is what allows the high user rate and many negatives (without
it they diverge). Logistic loss scores below BPR here: MovieLens rewards ranking a user's next item
above others, which BPR optimises, and uniform negatives let the item bias learn popularity. Uniform
draws index the table directly (no binary search), which pays for the second draw.

Speed on a model larger than the caches is memory latency more than arithmetic (the dot products
are AVX-512 already): an event's draws all come before its scores, the rows and counters they and
the next event will read are prefetched (`llvm.prefetch`, a hint that changes no value), and the
coin-flip choices (uniform or popularity draw, alias or not, better candidate, sigmoid side) are
selects, not mispredicted branches. Together 1.36x events/s (1.47x CPU) on the bench stream with
the shipped model, with bit-identical state (bench/results/bench_sgd_compare_default_model.json).
"""

from __future__ import annotations

import math
from enum import IntEnum
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np
from llvmlite import ir  # type: ignore[import-untyped]
from numba import njit
from numba.core import cgutils
from numba.core import types as nbtypes
from numba.extending import intrinsic

from stream_mf.rng import next_uniform, stream_seed

if TYPE_CHECKING:
    from stream_mf.config import ModelConfig


class Counter(IntEnum):
    """Slots of the int64 `StreamArrays.counters` array (persisted with the model as raw bytes,
    so a slot's index is part of the store's format: append, never renumber)."""

    EVENTS = 0  # events applied so far
    NEXT_REFRESH = 1  # event count at which the sampler is rebuilt next
    CDF_LEN = 2  # items covered by the sampler's cumulative table
    REBUILDS = 3  # how many times the sampler was rebuilt (persist the table when this changes)


N_COUNTERS = len(Counter)

LOSS_LOGISTIC = 0
LOSS_BPR = 1
MAX_NEG_TRIES = 8
NEG_INF = -np.inf
#: fastmath without the no-NaN/no-inf assumptions: a diverging model must show as NaN, not UB.
_FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}


# ---- the kernel's records --------------------------------------------------------------------
# NamedTuples: numba takes them as heterogeneous tuples (attribute access is resolved at compile
# time, so a field costs what a positional argument did), they cache with `cache=True`, and the
# numpy twin reads the same fields. Every field has one fixed type (the `of`/`from_config`
# builders cast), so a call never compiles a second specialisation.


class SgdParams(NamedTuple):
    """Hyper-parameters, scalars only (built from a `ModelConfig` by `from_config`)."""

    lr: float
    reg: float
    reg_bias: float
    n_neg: int
    neg_exponent: float
    neg_weight: float
    decay_rate: float
    loss: int  # LOSS_LOGISTIC or LOSS_BPR
    seed: int
    refresh: int  # events between sampler rebuilds, once past the doubling start
    n_candidates: int  # draws per negative slot; the highest-scoring one is used
    n_steps: int  # SGD steps per event
    lr_user: float  # user learning rate as a multiple of `lr`
    lr_bias: float  # bias learning rate as a multiple of `lr`
    max_norm: float  # rows updated are scaled back to this norm (0: no cap)
    uniform_mix: float  # share of draws uniform over seen items, not from the cdf
    bias_uniform: bool  # biases learn only from uniformly drawn negatives
    user_pull: float  # after the steps, the user vector moves by this times the item's vector

    @classmethod
    def from_config(cls, c: ModelConfig) -> SgdParams:
        return cls(
            lr=float(c.learning_rate),
            reg=float(c.reg),
            reg_bias=float(c.reg_bias),
            n_neg=int(c.n_negatives),
            neg_exponent=float(c.negative_exponent),
            neg_weight=float(c.negative_weight),
            decay_rate=float(c.decay_rate),
            loss=int(c.loss_code),
            seed=int(c.seed),
            refresh=int(c.sampler_refresh),
            n_candidates=int(c.n_candidates),
            n_steps=int(c.n_steps),
            lr_user=float(c.lr_user),
            lr_bias=float(c.lr_bias),
            max_norm=float(c.max_norm),
            uniform_mix=float(c.uniform_mix),
            bias_uniform=bool(c.bias_uniform),
            user_pull=float(c.user_pull),
        )


class _Table(Protocol):
    """What `EntityArrays.of` reads (an `EntityTable`; sgd.py cannot import state.py)."""

    factors: np.ndarray
    bias: np.ndarray
    count: np.ndarray
    last: np.ndarray
    logpop: np.ndarray

    @property
    def n(self) -> int: ...


class EntityArrays(NamedTuple):
    """One entity table's rows (users or items), sized to its capacity; `n` rows are in use."""

    factors: np.ndarray  # float32[capacity, dim]
    bias: np.ndarray  # float32[capacity] (the kernel learns item biases only)
    events: np.ndarray  # int64[capacity] events seen (`EntityTable.count`; `count` is tuple's)
    last: np.ndarray  # float64[capacity] newest event time
    logpop: np.ndarray  # float64[capacity] log decayed activity, anchored at t=0
    n: int

    @classmethod
    def of(cls, t: _Table) -> EntityArrays:
        return cls(t.factors, t.bias, t.count, t.last, t.logpop, int(t.n))


class StreamArrays(NamedTuple):
    """What the whole stream builds up besides the tables."""

    cdf: np.ndarray  # float64[3, item capacity]: cumulative weights, alias prob, alias index
    counters: np.ndarray  # int64[N_COUNTERS], indexed by `Counter`
    clock: np.ndarray  # float64[1] newest event time seen


class KernelBatch(NamedTuple):
    """A micro-batch as dense indices, and the per-event results the kernel writes back."""

    users: np.ndarray  # int32[n]
    items: np.ndarray  # int32[n]
    base_w: np.ndarray  # float64[n] type weight (x value)
    times: np.ndarray  # float64[n] epoch seconds
    partitions: np.ndarray  # int32[n]
    offsets: np.ndarray  # int64[n]
    neg_out: np.ndarray  # int32[n, n_neg] out: negatives drawn (-1 where none was)
    logw_out: np.ndarray  # float64[n] out: log(base_w) + t * decay_rate


@njit(cache=True, inline="always")
def logaddexp(a: float, b: float) -> float:
    if a == NEG_INF:
        return b
    if b == NEG_INF:
        return a
    if a > b:
        return a + math.log1p(math.exp(b - a))
    return b + math.log1p(math.exp(a - b))


@njit(cache=True, inline="always")
def sigmoid(x: float) -> float:
    """1 / (1 + e^-x), stable on both sides, without a branch on x's sign (random in the
    kernel, so a branch is mispredicted half the time): the same bits as the two-sided form
    1/(1+e^-x) for x >= 0 and e^x/(1+e^x) below."""
    e = math.exp(-abs(x))
    num = 1.0 if x >= 0 else e
    return num / (1.0 + e)


@njit(cache=True, nogil=True)
def rebuild_cdf(cdf: np.ndarray, logpop: np.ndarray, n_items: int, exponent: float) -> int:
    """The sampler table over items [0, n_items); unseen items (-inf) weigh 0.

    `cdf` has three rows: cumulative popularity**exponent, then a Walker/Vose alias table
    (probability, alias index) over the same weights, so a popularity draw costs O(1) instead
    of a binary search (35% of the kernel's time on 50k items). Returns the table's length, up
    to the last seen item: items registered by the current batch but not yet seen must not
    change it, or draws would depend on the batching.
    """
    top = NEG_INF
    for i in range(n_items):
        if logpop[i] > top:
            top = logpop[i]
    acc = 0.0
    length = 0
    for i in range(n_items):
        lp = logpop[i]
        if lp != NEG_INF:
            acc += math.exp(exponent * (lp - top))
            length = i + 1
        cdf[0, i] = acc
    if length > 0 and acc > 0.0:
        build_alias(cdf, length)
    return length


@njit(cache=True, nogil=True)
def build_alias(table: np.ndarray, n: int) -> None:
    """Vose's alias method over the weights table[0, i] - table[0, i-1], deterministically."""
    total = table[0, n - 1]
    scaled = np.empty(n)
    small = np.empty(n, np.int64)
    large = np.empty(n, np.int64)
    ns = 0
    nl = 0
    prev = 0.0
    for i in range(n):
        w = table[0, i] - prev
        prev = table[0, i]
        scaled[i] = w * n / total
        if scaled[i] < 1.0:
            small[ns] = i
            ns += 1
        else:
            large[nl] = i
            nl += 1
    while ns > 0 and nl > 0:
        ns -= 1
        lo = small[ns]
        nl -= 1
        hi = large[nl]
        table[1, lo] = scaled[lo]
        table[2, lo] = hi
        scaled[hi] = (scaled[hi] + scaled[lo]) - 1.0
        if scaled[hi] < 1.0:
            small[ns] = hi
            ns += 1
        else:
            large[nl] = hi
            nl += 1
    while nl > 0:
        nl -= 1
        table[1, large[nl]] = 1.0
        table[2, large[nl]] = large[nl]
    while ns > 0:  # rounding leftovers; draws of unseen items are rejected anyway
        ns -= 1
        table[1, small[ns]] = 1.0
        table[2, small[ns]] = small[ns]


@njit(cache=True, inline="always")
def draw_item(cdf: np.ndarray, n: int, u: float) -> int:
    """An item by popularity**exponent from the alias table, with one uniform in [0, 1)."""
    y = u * n
    c = min(int(y), n - 1)
    if y - c >= cdf[1, c]:
        c = int(cdf[2, c])
    return c


@njit(cache=True, inline="always")
def draw_mixed(cdf: np.ndarray, n: int, x: float, uniform_mix: float) -> int:
    """The item of uniform `x` in [0, 1): uniform over [0, n) below `uniform_mix`, else by the
    alias table, with (x - mix) / (1 - mix) as its uniform; for 0 < uniform_mix < 1.

    The same item as choosing a branch by `x < uniform_mix` and calling `draw_item`, but both
    sides are computed and one is selected: the choice is random, and a mispredicted branch
    per draw cost more than the spare arithmetic (and one spare sampler read)."""
    cu = min(int(x / uniform_mix * n), n - 1)
    y = max((x - uniform_mix) / (1.0 - uniform_mix) * n, 0.0)
    cp = min(int(y), n - 1)
    alias = int(cdf[2, cp])
    cp = alias if y - cp >= cdf[1, cp] else cp
    return cu if x < uniform_mix else cp


@njit(cache=True, inline="always")
def is_seen(cdf: np.ndarray, c: int) -> bool:
    """Whether item c had any weight when the table was built."""
    return cdf[0, c] != (cdf[0, c - 1] if c > 0 else 0.0)


def _prefetch_typer(typingctx: Any, arr: Any, row: Any, off: Any) -> Any:
    """A hint that byte `off` of row (1-d: element) `row` of an array will be read soon
    (`llvm.prefetch`; no effect on any value). Reading the rows of the next event's and this
    event's candidates in advance lets their cache misses overlap instead of queueing behind
    each other."""
    if not (isinstance(arr, nbtypes.Array) and arr.ndim in (1, 2)):
        return None
    if not (isinstance(row, nbtypes.Integer) and isinstance(off, nbtypes.Integer)):
        return None

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        r = context.cast(builder, args[1], sig.args[1], nbtypes.intp)
        o = context.cast(builder, args[2], sig.args[2], nbtypes.intp)
        stride = cgutils.unpack_tuple(builder, ary.strides, sig.args[0].ndim)[0]
        addr = builder.add(builder.ptrtoint(ary.data, cgutils.intp_t), builder.mul(r, stride))
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        ptr = builder.inttoptr(builder.add(addr, o), i8p)
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])  # read, keep in all levels, data
        return context.get_dummy_value()

    return nbtypes.none(arr, row, off), codegen


_prefetch_at: Any = intrinsic(_prefetch_typer)  # (arr, row, off); typed here as numba sees it


@njit(cache=True, inline="always")
def prefetch_row(A: np.ndarray, r: int) -> None:
    """Prefetch every cache line of row r of a C-contiguous 2-d array."""
    nb = A.shape[1] * A.itemsize
    for off in range(0, nb, 64):
        _prefetch_at(A, r, off)
    _prefetch_at(A, r, nb - 1)  # a row not aligned to a line ends in one more


@njit(cache=True, inline="always")
def _prefetch_draws(
    cdf: np.ndarray, ncdf: int, seed: int, part: int, off: int, n: int, uniform_mix: float
) -> None:
    """Prefetch the sampler entries an event's first `n` draws read (its draws are a pure
    function of its key, so they can be replayed an event early; a retry is not foreseen)."""
    if ncdf <= 0:
        return
    s = stream_seed(seed, part, off)
    for _ in range(n):
        s, x = next_uniform(s)
        if x < uniform_mix:
            c = min(int(x / uniform_mix * ncdf), ncdf - 1)
            _prefetch_at(cdf, 0, c * 8)
        else:
            c = min(int((x - uniform_mix) / (1.0 - uniform_mix) * ncdf), ncdf - 1)
            _prefetch_at(cdf, 1, c * 8)
            _prefetch_at(cdf, 2, c * 8)


@njit(cache=True, inline="always")
def _clip_norm(A: np.ndarray, r: int, sq: float, max_norm: float) -> None:
    """Scale row r (squared norm `sq`) back onto the ball of radius max_norm (0: no limit)."""
    if max_norm > 0.0 and sq > max_norm * max_norm:
        k = max_norm / math.sqrt(sq)
        for f in range(A.shape[1]):
            A[r, f] *= k


def sgd_batch(
    batch: KernelBatch,
    user_t: EntityArrays,
    item_t: EntityArrays,
    stream: StreamArrays,
    p: SgdParams,
) -> None:
    """Apply `batch` in order: sampler schedule, negatives, counters, then `p.n_steps` steps.

    The records reach the compiled kernel as plain tuples: numba's dispatcher fingerprints a
    plain tuple in C, but a NamedTuple with its class and field names, on every call (8 us a
    call against 2 us for the old positional arguments; 4 us this way, what a one-event batch
    notices)."""
    _sgd_kernel(tuple(batch), tuple(user_t), tuple(item_t), tuple(stream), tuple(p))


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_FAST)
def _sgd_kernel(
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
    u_old = np.empty(dim, dtype=np.float64)  # the user row before a step, widened once
    n_draws = n_neg * n_candidates
    mixed = 0.0 < uniform_mix < 1.0  # draws pick uniform or popularity without a branch
    cands = np.empty(max(n_draws, 1), dtype=np.int64)
    unis = np.zeros(max(n_draws, 1), dtype=np.bool_)
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
        if e + 1 < users.shape[0]:
            prefetch_row(U, users[e + 1])
            prefetch_row(V, items[e + 1])
            un, it = users[e + 1], items[e + 1]
            _prefetch_at(u_count, un, 0)
            _prefetch_at(u_last, un, 0)
            _prefetch_at(u_logact, un, 0)
            _prefetch_at(i_count, it, 0)
            _prefetch_at(i_last, it, 0)
            _prefetch_at(i_logpop, it, 0)
            _prefetch_at(bias, it, 0)
            _prefetch_draws(
                cdf,
                counters[Counter.CDF_LEN],
                seed,
                partitions[e + 1],
                offsets[e + 1],
                n_draws,
                uniform_mix,
            )
        if t > clock[0]:
            clock[0] = t
        w = base_w[e] * math.exp(-(clock[0] - t) * decay_rate)
        lw = math.log(base_w[e]) + t * decay_rate
        logw_out[e] = lw

        # negatives, drawn before this event's own popularity is counted: each slot keeps the
        # highest-scoring of `n_candidates` draws (adaptive, WARP-like); its score is kept for
        # the first step. All draws come first, then all scores: the draws do not depend on
        # the scores, and the rows they name are then fetched independently of each other
        # (a row is a cache miss on a large model; interleaved, each waited for the next draw).
        for f in range(dim):
            u_old[f] = U[u, f]
        s = stream_seed(seed, partitions[e], offsets[e])
        ncdf = counters[Counter.CDF_LEN]
        can_draw = ncdf > 0 and cdf[0, ncdf - 1] > 0.0
        for k in range(n_draws):
            cand = -1
            uni = False
            if can_draw:
                for _ in range(MAX_NEG_TRIES):
                    s, x = next_uniform(s)
                    uni = x < uniform_mix
                    if mixed:
                        c = draw_mixed(cdf, ncdf, x, uniform_mix)
                    elif uni:
                        c = min(int(x / uniform_mix * ncdf), ncdf - 1)
                    else:
                        c = draw_item(cdf, ncdf, (x - uniform_mix) / (1.0 - uniform_mix))
                    if not is_seen(cdf, c):
                        continue  # not seen when the table was built
                    if c != i:
                        cand = c
                        break
            cands[k] = cand
            unis[k] = uni
            if cand >= 0:
                prefetch_row(V, cand)
                _prefetch_at(bias, cand, 0)
        k = 0
        for j in range(n_neg):
            best = -1
            best_x = 0.0
            best_uni = False
            for _c in range(n_candidates):
                cand = cands[k]
                uni = unis[k]
                k += 1
                if cand < 0:
                    continue
                xc = np.float64(bias[cand])
                for f in range(dim):
                    xc += u_old[f] * V[cand, f]
                # selects, not a branch: which candidate scores higher is a coin flip
                better = (best < 0) | (xc > best_x)
                best = cand if better else best
                best_x = xc if better else best_x
                best_uni = uni if better else best_uni
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
                x_pos += u_old[f] * V[i, f]
            for j in range(n_neg):
                neg = neg_out[e, j]
                if step > 0 and neg >= 0:
                    x = np.float64(bias[neg])
                    for f in range(dim):
                        x += u_old[f] * V[neg, f]
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
                for f in range(dim):
                    v = V[neg, f] - lr * (g * u_old[f] + reg * V[neg, f])
                    V[neg, f] = v
                    sq += v * v
                gb = g * bmask[j] if bias_uniform else g
                bias[neg] -= lr_b * (gb + reg_bias * bias[neg])
                _clip_norm(V, neg, sq, max_norm)
            sq = 0.0
            for f in range(dim):
                v = V[i, f] - lr * (g_pos * u_old[f] + reg * V[i, f])
                V[i, f] = v
                sq += v * v
            bias[i] -= lr_b * (g_pos_b + reg_bias * bias[i])
            _clip_norm(V, i, sq, max_norm)
            sq = 0.0
            for f in range(dim):
                v = U[u, f] - lr_u * (grad_u[f] + reg * u_old[f])
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
