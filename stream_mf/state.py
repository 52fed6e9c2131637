"""In-memory model state: growable numpy arrays the numba kernels work on, plus the id maps.

RocksDB is the source of truth (`store.py`); these arrays are its hot copy. Capacity doubles as new
ids arrive, so registering an id is amortised O(1) and kernels never see a reallocation mid-batch.
The confidence map's bulk copies (numba kernels) live here with the map, not with persistence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numba
import numpy as np
from numba import types
from numba.typed import Dict

from stream_mf.config import ModelConfig
from stream_mf.rng import ITEM_STREAM, USER_STREAM, init_rows
from stream_mf.sgd import N_COUNTERS, Counter
from stream_mf.transitions import Transitions

NEVER = -np.inf  # last-seen / log-popularity of an entity with no events yet


def _grown(arr: np.ndarray, cap: int, fill: float) -> np.ndarray:
    out = np.full((cap, *arr.shape[1:]), fill, dtype=arr.dtype)
    out[: arr.shape[0]] = arr
    return out


class IdIndex(dict[str, int]):
    """String id -> dense row. Inside `EntityTable.resolve` (and only there), indexing with `[]`
    registers an unseen id at the next row; anywhere else an unknown id raises KeyError, like a
    plain dict, so a stray lookup can never add a row the table does not have."""

    __slots__ = ("fresh",)

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.fresh: list[str] | None = None  # a list only while `resolve` runs

    def __missing__(self, key: str) -> int:
        if self.fresh is None:
            raise KeyError(key)
        row = len(self)
        self[key] = row
        self.fresh.append(key)
        return row


class EntityTable:
    """Users or items: string ids <-> dense int32 indices, factors and per-entity counters.

    `logpop` is the log of the time-decayed event weight anchored at t=0
    (`log sum_e w_e 2**(t_e/half_life)`), so decaying never touches a row: the decayed value at
    time `now` is `exp(logpop - now * ln2/half_life)` and rankings need no decay at all.
    """

    def __init__(self, kind: str, dim: int, seed: int, init_scale: float, capacity: int = 1024):
        self.kind = kind
        self.stream = USER_STREAM if kind == "user" else ITEM_STREAM
        self.dim, self.seed, self.init_scale = dim, seed, init_scale
        self.ids: list[str] = []
        self.index = IdIndex()
        cap = max(capacity, 16)
        self.factors = np.zeros((cap, dim), dtype=np.float32)
        self.bias = np.zeros(cap, dtype=np.float32)
        self.count = np.zeros(cap, dtype=np.int64)
        self.last = np.full(cap, NEVER, dtype=np.float64)
        self.logpop = np.full(cap, NEVER, dtype=np.float64)

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def capacity(self) -> int:
        return self.factors.shape[0]

    def reserve(self, n: int) -> None:
        if n <= self.capacity:
            return
        cap = self.capacity
        while cap < n:
            cap *= 2
        self.factors = _grown(self.factors, cap, 0.0)
        self.bias = _grown(self.bias, cap, 0.0)
        self.count = _grown(self.count, cap, 0)
        self.last = _grown(self.last, cap, NEVER)
        self.logpop = _grown(self.logpop, cap, NEVER)

    def add(self, new_ids: Sequence[str], init: bool = True) -> None:
        """Register ids known to be new; rows get a seeded random start keyed by index."""
        start = self.n
        for k, key in enumerate(new_ids, start):
            self.index[key] = k
        self._registered(start, new_ids, init)

    def _registered(self, start: int, new_ids: Sequence[str], init: bool = True) -> None:
        """Rows, capacity and seeded start vectors for ids just indexed from row `start`."""
        self.reserve(start + len(new_ids))
        self.ids.extend(new_ids)
        if init and new_ids:
            init_rows(self.factors, start, self.n, self.seed, self.stream, self.init_scale)

    def resolve(self, keys: Sequence[str]) -> np.ndarray:
        """Dense indices of `keys`, registering unknown ones in first-seen order.

        One C-level pass: the index's `__missing__` runs (in Python) only for unseen ids, so a
        batch of known ids costs one dict lookup each (this was two list passes and 18% of the
        updater's time)."""
        index = self.index
        start = self.n
        fresh: list[str] = []
        index.fresh = fresh
        try:
            out = np.fromiter(map(index.__getitem__, keys), np.int32, len(keys))
        except BaseException:
            for k in fresh:  # all or nothing: the index never gets ahead of `ids`
                del index[k]
            raise
        finally:
            index.fresh = None
        if fresh:
            self._registered(start, fresh)
        return out

    def lookup(self, keys: Sequence[str]) -> np.ndarray:
        """Indices without registering; -1 for unknown ids."""
        get = self.index.get
        return np.asarray([get(k, -1) for k in keys], dtype=np.int32)


def new_confidence_map() -> Dict:
    """(user << 32 | item) -> log decayed confidence, anchored at t=0 like `logpop`."""
    return Dict.empty(key_type=types.int64, value_type=types.float64)


@numba.njit(cache=True)
def pair_key(user: int, item: int) -> np.int64:
    return (np.int64(user) << 32) | np.int64(item)


@dataclass
class ModelState:
    """Everything a model is: what the store persists and a restart loads back."""

    config: ModelConfig
    users: EntityTable
    items: EntityTable
    cdf: np.ndarray
    counters: np.ndarray = field(default_factory=lambda: np.zeros(N_COUNTERS, dtype=np.int64))
    clock: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.float64))
    confidence: Dict = field(default_factory=new_confidence_map)
    model_version: int = 0
    #: item-to-item successors and each user's last item (`stream_mf.transitions`)
    transitions: Transitions = field(default_factory=lambda: Transitions.empty(32))

    @classmethod
    def empty(cls, config: ModelConfig, capacity: int = 1024) -> ModelState:
        c = config
        return cls(
            config=c,
            users=EntityTable("user", c.dim, c.seed, c.init_scale, capacity),
            items=EntityTable("item", c.dim, c.seed, c.init_scale, capacity),
            cdf=np.zeros((3, max(capacity, 16)), dtype=np.float64),
            transitions=Transitions.empty(c.transition_slots),
        )

    @property
    def events_applied(self) -> int:
        return int(self.counters[Counter.EVENTS])

    def sync_capacity(self) -> None:
        """The sampler table (and the transitions) must cover every registered row before a
        kernel runs."""
        self.transitions.slots = self.config.transition_slots
        self.transitions.reserve(self.users.n, self.items.n)
        if self.cdf.shape[1] < self.items.capacity:
            grown = np.zeros((3, self.items.capacity), dtype=np.float64)
            grown[:, : self.cdf.shape[1]] = self.cdf
            self.cdf = grown


# ---- the confidence map's bulk copies (numba: a typed Dict is only iterable fast in there) ----


def fill_confidence(conf: Dict, keys: np.ndarray, vals: np.ndarray) -> None:
    """Insert (key, value) pairs into the map (a store load)."""
    _fill(conf, keys, vals)


def confidence_items(conf: Dict, sort: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The confidence map's entries; `sort=False` leaves them in map order, for a caller that
    only pays for the copy now (a rebuild's snapshot on the loop thread) and sorts later."""
    n = len(conf)
    keys = np.empty(n, np.int64)
    vals = np.empty(n, np.float64)
    _dump(conf, keys, vals)
    if not sort:
        return keys, vals
    order = np.argsort(keys)
    return keys[order], vals[order]


@numba.njit(cache=True)
def _fill(conf: Dict, keys: np.ndarray, vals: np.ndarray) -> None:
    for j in range(keys.shape[0]):
        conf[keys[j]] = vals[j]


@numba.njit(cache=True)
def _dump(conf: Dict, keys: np.ndarray, vals: np.ndarray) -> None:
    j = 0
    for k, v in conf.items():
        keys[j] = k
        vals[j] = v
        j += 1  # noqa: SIM113 (numba)
