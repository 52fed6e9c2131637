"""The model log: the serving model as Kafka records, and a reader that materialises it.

The updater publishes, after each durable commit, every row the commit changed; query processes
on any machine follow the topic and hold the model in memory (docs/architecture.md, "Model
log"). This module is the format and the reader, with no Kafka in it: the producing and the
consuming are `consumers/model_log.py`.

Records (one partition, so order is the log's order). Keys are fixed per row, so a compacted
topic keeps the latest value of each; values are whole rows or blocks, never increments, so a
record applied twice is harmless:

  b"u" be32 gen be32 row    a user row of generation `gen`: id, every per-row array of the
                            model (factors, bias, count, last, logpop) and the items the user
                            has seen (exclusions and `because`)
  b"i" be32 gen be32 row    an item row of `gen`, in the same layout (no seen items)
  b"t" be32 gen be32 row    an item's transition row, whole: its filled slots' successors and
                            log decayed counts (`stream_mf/transitions.py`); a user row (format 2)
                            carries the user's last item beside its arrays
  b"C"                      the model config (JSON), first record of every snapshot
  b"B"                      a snapshot begins (JSON {"seq", "gen"})
  b"M"                      a commit marker (JSON, `Marker`): the rows before it, since the
                            previous marker, are one commit; a reader applies them at the marker
  b"S"                      a slice of a periodic snapshot follows: the next `rows` records
                            (JSON {"rows"}) are rows at their current values, between commits
  a row key with no value   a tombstone: the row's generation was replaced

A snapshot is B, C, then every row of the live generation, then a marker with `snapshot` true.
The updater's periodic snapshots go to a topic of their own (same records, no commits between
them), so the commits that readers tail never queue behind them; every marker names where a
starting reader begins: the latest complete snapshot's B record on this topic (`snap`), or, for
one on the snapshot topic (`snap_topic`, B at `snap_begin`), the offset on this topic to tail
from after reading it (`snap`). A reader never reads anything older. Older logs carried
periodic snapshots here in slices (S and its rows) with commits in between; a reader that
already serves that generation skips the slices' rows undecoded.
"""

from __future__ import annotations

import dataclasses
import struct
import threading
import time
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
import orjson

from stream_mf.answer import UserRecord
from stream_mf.arrays import unique_sorted
from stream_mf.config import ModelConfig
from stream_mf.flat_lists import EMPTY, FlatLists
from stream_mf.recommend import ItemView
from stream_mf.state import NEVER, EntityTable, ModelState

FORMAT = 1  # item rows
USER_FORMAT = 2  # user rows: format 1 plus the user's last item (i32) after the arrays
TRANS_FORMAT = 1
MARKER_KEY = b"M"
BEGIN_KEY = b"B"
SLICE_KEY = b"S"
CONFIG_KEY = b"C"
MAX_TIMES = 32  # event times a marker samples, for the readers' freshness histogram
_ROW_KEY = struct.Struct(">cII")
_USER_HEAD = struct.Struct("<BHI")  # format, dim, seen count
_ITEM_HEAD = struct.Struct("<BHH")  # format, dim, rows
_TRANS_HEAD = struct.Struct("<BH")  # format, slots
_I32 = struct.Struct("<i")
_ROW_ARRAYS = (("bias", "<f4"), ("count", "<i8"), ("last", "<f8"), ("logpop", "<f8"))


class LogFormatError(ValueError):
    """A record this version cannot read: skipped, logged and counted, never applied."""


class MixedGenerationError(AssertionError):
    """A request would score user rows of one generation against item rows of another."""


# ---- encoding (updater side) ----------------------------------------------------------------


def user_key(gen: int, row: int) -> bytes:
    return _ROW_KEY.pack(b"u", gen, row)


def item_key(gen: int, row: int) -> bytes:
    return _ROW_KEY.pack(b"i", gen, row)


def encode_user(table: EntityTable, row: int, seen: np.ndarray, last_item: int = -1) -> bytes:
    """One user row, whole: a reader needs nothing else to serve that user."""
    s = np.ascontiguousarray(seen, "<i4")
    head = _USER_HEAD.pack(USER_FORMAT, table.dim, s.size)
    parts = [head, table.factors[row].astype("<f4").tobytes()]
    parts += [getattr(table, name)[row : row + 1].astype(dt).tobytes() for name, dt in _ROW_ARRAYS]
    parts += [_I32.pack(last_item), s.tobytes(), table.ids[row].encode()]
    return b"".join(parts)


def trans_key(gen: int, row: int) -> bytes:
    return _ROW_KEY.pack(b"t", gen, row)


def transition_records(
    succ: np.ndarray, logw: np.ndarray, gen: int, rows: Iterable[int]
) -> Iterator[tuple[bytes, bytes]]:
    """Transition rows, whole (`stream_mf/transitions.py`), one record each: the filled slots
    only (a row fills from slot 0 and never empties one), so a row of 3 successors costs 39
    bytes, not 387."""
    idx = np.fromiter(rows, np.int64)
    if idx.size == 0:
        return
    s, w = succ[idx], logw[idx]
    filled = (s >= 0).sum(axis=1).tolist()
    head = _TRANS_HEAD.pack
    for j, r in enumerate(idx.tolist()):
        k = filled[j]
        yield (
            trans_key(gen, r),
            b"".join((head(TRANS_FORMAT, k), s[j, :k].astype("<i4").tobytes(),
                      w[j, :k].astype("<f8").tobytes())),
        )  # fmt: skip


def filled_rows(succ: np.ndarray, n: int) -> np.ndarray:
    """Transition rows below `n` that hold any successor (the others are never sent)."""
    return np.flatnonzero((succ[:n] >= 0).any(axis=1))


_META = np.dtype([(name, dt) for name, dt in _ROW_ARRAYS])  # packed: the wire layout


def user_records(
    table: EntityTable,
    gen: int,
    seen: SeenIndex | None,
    rows: Iterable[int],
    kind: bytes = b"u",
    last: np.ndarray | None = None,
) -> Iterator[tuple[bytes, bytes]]:
    """`encode_user` of many rows, each with its last item from `last` (-1 past its end or
    without it). Everything but the seen items and the id is fixed-width, so it is laid out in
    one packed record array (the wire layout) and turned into bytes in a few C calls; the seen
    lists come end to end in one buffer (`SeenIndex.lists`): a commit at 20k events/s carries
    thousands of user rows, and a Python step per array per row was most of their cost. Item
    rows (`kind` b"i") have the same layout in format 1: no last item, no seen items."""
    idx = np.fromiter(rows, np.int64)
    if idx.size == 0:
        return
    user = kind == b"u"
    dim = table.dim
    fields: list[Any] = [("fmt", "u1"), ("dim", "<u2"), ("n", "<u4"), ("f", "<f4", (dim,))]
    fields += list(_ROW_ARRAYS) + ([("last_item", "<i4")] if user else [])
    rec = np.empty(idx.size, np.dtype(fields))  # packed: no padding between fields
    rec["fmt"] = USER_FORMAT if user else FORMAT
    rec["dim"] = dim
    rec["f"] = table.factors[idx]
    for name, _dt in _ROW_ARRAYS:
        rec[name] = getattr(table, name)[idx]
    if user:
        rec["last_item"] = -1
        if last is not None:
            ok = idx < last.shape[0]
            rec["last_item"][ok] = last[idx[ok]]
    blob, offs = b"", [0] * (idx.size + 1)
    if seen is not None:
        counts, blob, offs = seen.lists(idx)
        rec["n"] = counts
    else:
        rec["n"] = 0
    fixed = rec.view(f"V{rec.dtype.itemsize}").tolist()
    keys = np.empty(idx.size, _KEY)
    keys["kind"] = kind
    keys["gen"] = gen
    keys["row"] = idx
    kb = keys.view(f"V{_KEY.itemsize}").tolist()
    ids = table.ids
    for j, u in enumerate(idx.tolist()):
        yield kb[j], b"".join((fixed[j], blob[offs[j] : offs[j + 1]], ids[u].encode()))


_KEY = np.dtype([("kind", "S1"), ("gen", ">u4"), ("row", ">u4")])  # `_ROW_KEY`, packed


def item_records(
    table: EntityTable, gen: int, rows: Iterable[int]
) -> Iterator[tuple[bytes, bytes]]:
    """Item rows, one record each: sampled negatives touch rows all over the catalogue, so a
    record per row costs far fewer bytes than blocks of rows."""
    return user_records(table, gen, None, rows, b"i")


def snapshot_records(state: ModelState, gen: int, seen: SeenIndex) -> Iterator[tuple[bytes, bytes]]:
    """A snapshot's body (after its BEGIN record, before its marker): the config, then every
    row of the model (transition rows: those that hold any)."""
    t = state.transitions
    yield CONFIG_KEY, state.config.model_dump_json().encode()
    yield from user_records(state.users, gen, seen, range(state.users.n), last=t.last)
    yield from item_records(state.items, gen, range(state.items.n))
    yield from transition_records(t.succ, t.logw, gen, filled_rows(t.succ, state.items.n))


def begin_record(seq: int, gen: int, n_users: int = 0, n_items: int = 0) -> tuple[bytes, bytes]:
    """A snapshot begins; the row counts let a reader size its arrays once."""
    return BEGIN_KEY, orjson.dumps({"seq": seq, "gen": gen, "n_users": n_users, "n_items": n_items})


def slice_record(rows: int) -> tuple[bytes, bytes]:
    """A periodic snapshot's slice of `rows` row records follows."""
    return SLICE_KEY, orjson.dumps({"rows": rows})


@dataclass
class Marker:
    """The end of one commit: what the model is as of it."""

    seq: int  # the store's commit count (every durable commit adds one)
    gen: int
    version: int
    events: int
    clock: float
    n_users: int
    n_items: int
    offsets: dict[str, int] = field(default_factory=dict)  # "topic/partition" -> next offset
    snapshot: bool = False  # this marker closes a snapshot
    # where a starting reader begins on this topic: the latest complete snapshot's BEGIN
    # record, or (a periodic snapshot on a topic of its own) the point to tail from after it
    snap: int | None = None
    snap_topic: str | None = None  # that snapshot's topic, when not this one
    snap_begin: int | None = None  # the offset of its BEGIN record there
    pending_items: int = 0  # item and transition rows changed in the store, not yet in the log
    count: int = 0  # events in this commit
    times: list[float] = field(default_factory=list)  # a sample of their event times
    at: float = 0.0  # wall time the marker was produced
    epoch: int = 0  # the store's offset epoch: offsets moved back on purpose start a new one

    def behind(self, other: Marker) -> bool:
        """True when this commit stands for less of the input than `other`: a replay after a
        crash (the updater learns again from its last checkpoint) or an older epoch. A reader
        that applied `other` skips it (whole rows of an older state would move it back). A
        commit of events that ends where `other` ended is a replay too (its events are applied
        already); a marker of no events there (a snapshot, an item flush) is not."""
        if self.epoch != other.epoch:
            return self.epoch < other.epoch
        if any(self.offsets.get(k, 0) < o for k, o in other.offsets.items()):
            return True
        return self.count > 0 and self.offsets == other.offsets

    def encode(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self))

    @classmethod
    def decode(cls, raw: bytes) -> Marker:
        try:
            doc = orjson.loads(raw)
            return cls(**doc)
        except (orjson.JSONDecodeError, TypeError) as exc:
            raise LogFormatError(f"bad commit marker: {exc}") from exc


class SeenIndex(FlatLists):
    """Each user's seen items, sorted, on the updater side: a user row in the log carries the
    whole list (a full value, never an increment), and the store's prefix scan per user would
    cost a RocksDB seek for every user of every batch.

    The lists are `FlatLists` (as a replica's `SeenStore`): a dict of an array per user cost
    a Python step per touched user per commit (150 ms a 50k-event commit at 100k users, 13.5%
    of the updater's loop); here a commit is a few numpy passes over the touched users'
    lists."""

    def __init__(self, pair_keys: np.ndarray) -> None:
        super().__init__()
        self.add(pair_keys)

    def add(self, pair_keys: np.ndarray) -> None:
        """Fold a commit's pairs in. The touched users' lists are gathered, each tagged with the
        user's place in the commit (`place << 32 | item`), so old and new pairs are both sorted
        arrays of one key space: a binary search finds the new pairs already held, an insert
        merges the rest in order, and only the lists that grew are written again."""
        if pair_keys.size == 0:
            return
        # unique_sorted: numpy 2's np.unique hashes, 14x slower here (a sort of ~500k keys)
        keys = unique_sorted(np.asarray(pair_keys, np.int64))
        users = keys >> 32
        first = np.flatnonzero(np.concatenate([[True], users[1:] != users[:-1]]))
        touched = users[first]
        self._reserve(int(touched[-1]) + 1)
        place = np.arange(touched.size, dtype=np.int64)
        new = (np.repeat(place, np.diff(np.append(first, keys.size))) << 32) | (keys & _LOW32)
        n_old = self.count[touched]
        old = self._gather(self.start[touched], n_old).astype(np.int64)
        old |= np.repeat(place, n_old) << 32
        at = np.searchsorted(old, new)
        held = np.zeros(new.size, np.bool_)
        inside = at < old.size
        held[inside] = old[at[inside]] == new[inside]
        fresh, at = new[~held], at[~held]
        if fresh.size == 0:
            return
        merged = np.empty(old.size + fresh.size, np.int64)
        slots = at + np.arange(fresh.size)  # where each fresh key lands in the merged order
        keep = np.ones(merged.size, np.bool_)
        keep[slots] = False
        merged[slots] = fresh
        merged[keep] = old
        grew = np.zeros(touched.size, np.bool_)
        grew[fresh >> 32] = True
        merged = merged[grew[merged >> 32]]  # the lists that did not grow stay where they are
        rows = touched[grew]
        counts = np.bincount(merged >> 32, minlength=touched.size)[grew]
        self._append(rows, (merged & _LOW32).astype(np.int32), counts)

    def users(self) -> np.ndarray:
        """The users with any seen item, ascending."""
        return np.flatnonzero(self.count)

    def lists(self, rows: np.ndarray) -> tuple[np.ndarray, bytes, list[int]]:
        """The seen lists of `rows` for encoding: their sizes, the lists end to end as "<i4"
        bytes, and each list's byte offset in them (one more at the end)."""
        counts = np.zeros(rows.size, np.int64)
        ok = rows < self.count.size
        counts[ok] = self.count[rows[ok]]
        starts = np.zeros(rows.size, np.int64)
        starts[ok] = self.start[rows[ok]]
        blob = self._gather(starts, counts).astype("<i4", copy=False).tobytes()
        offs = np.zeros(rows.size + 1, np.int64)
        np.cumsum(counts * 4, out=offs[1:])
        return counts, blob, offs.tolist()


_NONE = EMPTY
_LOW32 = np.int64(0xFFFFFFFF)


def sample_times(times: np.ndarray) -> list[float]:
    if times.size > MAX_TIMES:
        times = times[np.linspace(0, times.size - 1, MAX_TIMES).astype(np.int64)]
    return [float(t) for t in times]


# ---- decoding --------------------------------------------------------------------------------


@dataclass
class Record:
    kind: str  # user, item, config, begin, marker, tombstone
    gen: int = 0
    index: int = 0  # user row or item block
    value: Any = None  # decoded payload


@dataclass
class UserRow:
    """A user record checked but not unpacked: rows are unpacked many at a time
    (`ServingModel.set_users`), a few C calls for a commit's or a snapshot's worth."""

    raw: bytes
    dim: int
    n_seen: int
    id: str
    last_item: int = -1  # the user's last item (format 2 user rows), -1 if none


def decode(key: bytes | None, value: bytes | None) -> Record:
    """One record; LogFormatError if it cannot be read (the caller skips and counts it)."""
    if not key:
        raise LogFormatError("record without a key")
    if key == MARKER_KEY:
        return Record("marker", value=Marker.decode(value or b""))
    if key == CONFIG_KEY:
        try:
            return Record("config", value=ModelConfig.model_validate_json(value or b""))
        except ValueError as exc:
            raise LogFormatError(f"bad config record: {exc}") from exc
    if key == SLICE_KEY:
        try:
            return Record("slice", value=int(orjson.loads(value or b"")["rows"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise LogFormatError(f"bad snapshot slice record: {exc}") from exc
    if key == BEGIN_KEY:
        try:
            doc = orjson.loads(value or b"")
            return Record("begin", gen=int(doc["gen"]), value=doc)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise LogFormatError(f"bad snapshot begin record: {exc}") from exc
    if len(key) != _ROW_KEY.size or key[:1] not in (b"u", b"i", b"t"):
        raise LogFormatError(f"unknown record key {key[:16]!r}")
    kind, gen, index = _ROW_KEY.unpack(key)
    name = {b"u": "user", b"i": "item", b"t": "trans"}[kind]
    if value is None:
        return Record("tombstone", gen, index, name)
    try:
        payload: Any = _trans(value) if kind == b"t" else _user(value)
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise LogFormatError(f"bad {name} record {gen}/{index}: {exc}") from exc
    return Record(name, gen, index, payload)


_USER_FIXED = _USER_HEAD.size


def _user(raw: bytes) -> UserRow:
    """A user or item row: format 1 (items, and users before transitions) or 2 (users, with
    their last item)."""
    fmt, dim, n_seen = _USER_HEAD.unpack_from(raw)
    if fmt not in (FORMAT, USER_FORMAT):
        raise ValueError(f"format {fmt}, this version reads {FORMAT} and {USER_FORMAT}")
    extra = 4 if fmt == USER_FORMAT else 0
    m_end = _USER_FIXED + dim * 4 + _META.itemsize
    at = m_end + extra + 4 * n_seen
    if len(raw) < at:
        raise ValueError(f"{len(raw)} bytes, a row of dim {dim} with {n_seen} seen needs {at}")
    last = _I32.unpack_from(raw, m_end)[0] if extra else -1
    return UserRow(raw, dim, n_seen, raw[at:].decode(), last)


def _trans(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    fmt, slots = _TRANS_HEAD.unpack_from(raw)
    if fmt != TRANS_FORMAT:
        raise ValueError(f"format {fmt}, this version reads {TRANS_FORMAT}")
    at = _TRANS_HEAD.size
    if len(raw) != at + 12 * slots:
        raise ValueError(
            f"{len(raw)} bytes, a transition row of {slots} slots has {at + 12 * slots}"
        )
    succ = np.frombuffer(raw, "<i4", slots, at)
    return succ, np.frombuffer(raw, "<f8", slots, at + 4 * slots)


def unpack_users(rows: list[UserRow], dim: int) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    """Factors [n, dim], the per-row arrays (a structured array) and the seen items (int32
    bytes, read as an array per request: 100k small arrays cost ~11 MB of headers) of many user
    rows."""
    fb, mb = dim * 4, _META.itemsize
    f_at, m_at = _USER_FIXED, _USER_FIXED + fb
    factors = np.frombuffer(b"".join([r.raw[f_at:m_at] for r in rows]), "<f4").reshape(-1, dim)
    meta = np.frombuffer(b"".join([r.raw[m_at : m_at + mb] for r in rows]), _META)
    s_at = m_at + mb
    seen = []  # bytes: a third of an array's; in a format-2 row the last item comes first
    for r in rows:
        lo = s_at + 4 if r.raw[0] == USER_FORMAT else s_at
        seen.append(r.raw[lo : lo + 4 * r.n_seen])
    return factors, meta, seen


# ---- compact storage for a replica (no Python object per row) --------------------------------


class CompactIds(Sequence[str]):
    """Row -> id and id -> row without a Python str, list slot and dict entry per id (about
    100 bytes each, and small objects that outlive the snapshot's records they were made
    beside, which kept the freed records' memory from going back to the OS): the ids' bytes in
    one buffer, each row's start and length, and a sorted array of their hashes (Python's
    `hash`, stable within a process) with the row of each; ids added since the last sort are
    found in a small dict. About 30 bytes an id."""

    MERGE = 4096  # ids in the dict before they are sorted in

    def __init__(self) -> None:
        self._blob = bytearray()
        self._start = np.zeros(16, np.int64)
        self._len = np.zeros(16, np.int32)
        self._hash = np.zeros(16, np.int64)
        self._n = 0
        self._sorted_h = np.empty(0, np.int64)
        self._sorted_rows = np.empty(0, np.int64)
        self._recent: dict[str, int] = {}
        self.lookup = _IdLookup(self)

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, row: int) -> str: ...
    @overload
    def __getitem__(self, row: slice) -> list[str]: ...
    def __getitem__(self, row: int | slice) -> str | list[str]:
        if isinstance(row, slice):
            return [self[r] for r in range(*row.indices(self._n))]
        if row < 0:
            row += self._n
        if not 0 <= row < self._n:
            raise IndexError(row)
        at = int(self._start[row])
        return self._blob[at : at + int(self._len[row])].decode()

    def _raw(self, row: int) -> bytes:
        at = int(self._start[row])
        return bytes(self._blob[at : at + int(self._len[row])])

    def extend_to(self, n: int) -> None:
        """Rows up to `n` (new ones with an empty id until set)."""
        if n > self._start.size:
            cap = max(n, self._start.size + self._start.size // 4)
            for name in ("_start", "_len", "_hash"):
                a = getattr(self, name)
                grown = np.zeros(cap, a.dtype)
                grown[: a.size] = a
                setattr(self, name, grown)
        self._n = max(self._n, n)

    def set_many(self, rows: list[int], ids: list[str]) -> None:
        """Give rows their ids (a row's id never changes within a generation: rows whose id
        is already this one are left alone)."""
        new_rows, new_ids, raws = [], [], []
        for row, i in zip(rows, ids, strict=True):
            b = i.encode()
            if int(self._len[row]) == len(b) and self._raw(row) == b:
                continue
            new_rows.append(row)
            new_ids.append(i)
            raws.append(b)
        if not new_rows:
            return
        idx = np.asarray(new_rows, np.int64)
        lens = np.fromiter(map(len, raws), np.int64, len(raws))
        self._start[idx] = len(self._blob) + np.cumsum(lens) - lens
        self._len[idx] = lens
        self._hash[idx] = np.fromiter(map(hash, raws), np.int64, len(raws))
        self._blob += b"".join(raws)
        if len(self._recent) + len(new_rows) < self.MERGE:
            self._recent.update(zip(new_ids, new_rows, strict=True))
        else:
            self._merge()

    def _merge(self) -> None:
        """Sort every row's hash in (the dict empties)."""
        h = self._hash[: self._n]
        order = np.argsort(h, kind="stable")
        self._sorted_h, self._sorted_rows = h[order], order
        self._recent.clear()

    def get(self, key: str, default: int | None = None) -> int | None:
        row = self._recent.get(key)
        if row is not None:
            return row
        b = key.encode()
        h = hash(b)
        sh = self._sorted_h
        j = int(np.searchsorted(sh, h))
        while j < sh.size and sh[j] == h:
            row = int(self._sorted_rows[j])
            if int(self._hash[row]) == h and self._raw(row) == b:
                return row
            j += 1
        return default

    def nbytes(self) -> int:
        arrays = (self._start, self._len, self._hash, self._sorted_h, self._sorted_rows)
        return len(self._blob) + sum(a.nbytes for a in arrays)


class _IdLookup(Mapping[str, int]):
    """id -> row of a `CompactIds` (what `ItemView.index` and the users' index are)."""

    def __init__(self, ids: CompactIds) -> None:
        self.ids = ids

    def __getitem__(self, key: str) -> int:
        row = self.ids.get(key)
        if row is None:
            raise KeyError(key)
        return row

    def get(self, key: str, default: Any = None) -> Any:
        return self.ids.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


class SeenStore(FlatLists):
    """Each user's seen items (int32) as `FlatLists` instead of a bytes object per user."""

    GROW = 0.25  # a replica's memory is the bound here (`ServingModel.memory`)
    SLACK = 0.0

    def set_many(self, rows: np.ndarray, lists: list[bytes]) -> None:
        flat = np.frombuffer(b"".join(lists), "<i4")
        counts = np.fromiter((len(x) // 4 for x in lists), np.int64, len(lists))
        self._append(np.asarray(rows, np.int64), flat, counts)

    def nbytes(self) -> int:
        return int(self.count.sum()) * 4

    def __getitem__(self, row: int) -> bytes:
        """A user's seen items as int32 bytes (what each row held before: tools and tests)."""
        return self.of(row).astype("<i4").tobytes()


class PendingRows:
    """A commit's row records until its marker. A live commit's few stay decoded; past `spill`
    rows they are kept as their bytes in one buffer instead, and decoded again, `SPILL` at a
    time, when the marker applies them. A catch-up reads commits of every row (the bench's:
    200k records): held as Python objects they took ~2.5x their bytes, and the pools and heap
    they were freed into stayed with the process (a replica held 3-3.8x its model).

    Spilled rows are decoded again under the model's lock (a request waits for that): a reader
    that serves requests sets `spill` to `SERVING_SPILL`, above a live commit's rows (an item
    flush at 1k events/s: ~6k), so then only a commit of a backlog's size pays it."""

    SPILL = 4096
    SERVING_SPILL = 65536
    _KINDS = ("user", "item", "trans")

    def __init__(self) -> None:
        self.spill = self.SPILL
        self.recs: list[Record] = []
        self.blob = bytearray()
        self.meta = array("q")  # per spilled row: kind, gen, index, start, length

    def __len__(self) -> int:
        return len(self.recs) + len(self.meta) // 5

    def append(self, rec: Record) -> None:
        if len(self.recs) < self.spill and not self.meta:
            self.recs.append(rec)
            return
        if self.recs:
            recs, self.recs = self.recs, []
            for r in recs:
                self._spill(r)
        self._spill(rec)

    def _spill(self, rec: Record) -> None:
        if rec.kind == "trans":
            succ, logw = rec.value
            raw = succ.astype("<i4").tobytes() + logw.astype("<f8").tobytes()
        else:
            raw = rec.value.raw
        self.meta.extend((self._KINDS.index(rec.kind), rec.gen, rec.index, len(self.blob),
                          len(raw)))  # fmt: skip
        self.blob += raw

    def clear(self) -> None:
        self.recs, self.blob, self.meta = [], bytearray(), array("q")

    def nbytes(self) -> int:
        """The rows' bytes (of the decoded ones: their records' payloads, not the objects)."""
        held = 0
        for r in list(self.recs):
            held += sum(a.nbytes for a in r.value) if r.kind == "trans" else len(r.value.raw)
        return len(self.blob) + self.meta.itemsize * len(self.meta) + held

    def spilled(self) -> Iterator[list[Record]]:
        """The spilled rows in log order, at most `SPILL` decoded at a time (rows are either
        all in `recs` or all spilled)."""
        meta, blob = self.meta, self.blob
        for lo in range(0, len(meta), 5 * self.SPILL):
            out = []
            for j in range(lo, min(len(meta), lo + 5 * self.SPILL), 5):
                kind, gen, index, at, n = meta[j : j + 5]
                raw = bytes(blob[at : at + n])
                if kind == 2:
                    slots = n // 12
                    value: Any = (np.frombuffer(raw, "<i4", slots),
                                  np.frombuffer(raw, "<f8", slots, 4 * slots))  # fmt: skip
                else:
                    value = _user(raw)
                out.append(Record(self._KINDS[kind], gen, index, value))
            yield out


# ---- the reader (query side) -----------------------------------------------------------------


class ServingModel:
    """One generation of the model as a reader holds it: the same arrays as the updater's
    `EntityTable`s, plus each user's seen items and the generation every row came from (the
    no-mixing check reads it)."""

    def __init__(self, config: ModelConfig, gen: int) -> None:
        self.config, self.gen = config, gen
        c = config
        self.users = EntityTable("user", c.dim, c.seed, c.init_scale, 16)
        self.items = EntityTable("item", c.dim, c.seed, c.init_scale, 16)
        for t in (self.users, self.items):  # compact ids: no Python object per row
            ids = CompactIds()
            t.ids, t.index = ids, ids.lookup  # type: ignore[assignment]
        self.user_gen = np.full(16, -1, np.int64)
        self.item_gen = np.full(16, -1, np.int64)
        self.seen = SeenStore()
        self.marker: Marker | None = None
        self.items_changed = True
        # the served view reads these arrays in place (no copy per commit): a request holds
        # the lock while it reads them, the reader while it writes a commit into them, so a
        # request sees a commit whole or not at all
        self.lock = threading.Lock()
        # the reader is waiting for the lock: requests let it in first (threading.Lock hands
        # over to no one in particular, and a backlog of requests could hold it off)
        self.writer_waiting = False
        self.item_norms = np.zeros(16, np.float32)  # cosine similarity's row norms
        # transitions (`stream_mf/transitions.py`): each user's last item, each item's row
        self.user_last = np.full(16, -1, np.int32)
        self.succ = np.full((16, config.transition_slots), -1, np.int32)
        self.logw = np.full((16, config.transition_slots), -np.inf)

    @staticmethod
    def _grow(table: EntityTable, gens: np.ndarray, n: int) -> np.ndarray:
        if n > table.n:
            _reserve(table, n)
            ids = table.ids
            assert isinstance(ids, CompactIds)
            ids.extend_to(n)
        if gens.size < table.capacity:
            g = np.full(table.capacity, -1, np.int64)
            g[: gens.size] = gens
            gens = g
        return gens

    def set_users(
        self, gen: int, rows: list[int], users: list[UserRow], kind: str = "user"
    ) -> None:
        """Many user (or item) rows at once (the last of a row wins)."""
        if not rows:
            return
        last = dict(zip(rows, range(len(rows)), strict=True))  # row -> its last record
        if len(last) < len(rows):
            rows, users = list(last), [users[j] for j in last.values()]
        bad = [j for j, u in enumerate(users) if u.dim != self.config.dim]
        if bad:
            raise LogFormatError(f"user rows of dim {users[bad[0]].dim}, the model's is "
                                 f"{self.config.dim}")  # fmt: skip
        user = kind == "user"
        t = self.users if user else self.items
        idx = np.asarray(rows, np.int64)
        gens = self._grow(t, self.user_gen if user else self.item_gen, int(idx.max()) + 1)
        if user:
            self.user_gen = gens
        else:
            self.item_gen = gens
            self.items_changed = True
        factors, meta, seen = unpack_users(users, self.config.dim)
        t.factors[idx] = factors
        if not user:
            if self.item_norms.size < t.capacity:
                grown = np.zeros(t.capacity, np.float32)
                grown[: self.item_norms.size] = self.item_norms
                self.item_norms = grown
            self.item_norms[idx] = np.linalg.norm(factors, axis=1)
        for name, _dt in _ROW_ARRAYS:
            getattr(t, name)[idx] = meta[name]
        if user:
            self.seen.set_many(idx, seen)
            if self.user_last.size < t.capacity:
                lasts = np.full(t.capacity, -1, np.int32)
                lasts[: self.user_last.size] = self.user_last
                self.user_last = lasts
            self.user_last[idx] = [u.last_item for u in users]
        ids = t.ids
        assert isinstance(ids, CompactIds)
        ids.set_many(rows, [u.id for u in users])
        gens[idx] = gen

    def set_transitions(self, rows: list[int], values: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Whole transition rows (the last of a row wins), fitted to the model's slots."""
        need = max(rows) + 1
        slots = self.succ.shape[1]
        if need > self.succ.shape[0]:
            cap = max(need, self.succ.shape[0] + self.succ.shape[0] // 4)
            succ = np.full((cap, slots), -1, np.int32)
            logw = np.full((cap, slots), -np.inf)
            succ[: self.succ.shape[0]], logw[: self.logw.shape[0]] = self.succ, self.logw
            self.succ, self.logw = succ, logw
        for r, (sv, wv) in zip(rows, values, strict=True):
            m = min(slots, sv.size)
            self.succ[r, :m], self.logw[r, :m] = sv[:m], wv[:m]
            self.succ[r, m:], self.logw[r, m:] = -1, -np.inf

    def complete(self, marker: Marker) -> bool:
        """Every row the marker counts is here, of the marker's generation."""
        return (
            marker.gen == self.gen
            and self.users.n >= marker.n_users
            and self.items.n >= marker.n_items
            and bool(np.all(self.user_gen[: marker.n_users] == self.gen))
            and bool(np.all(self.item_gen[: marker.n_items] == self.gen))
        )

    def nbytes(self) -> int:
        t = (self.users, self.items)
        arrays = sum(getattr(x, n).nbytes for x in t for n in ("factors", "bias", "count", "last",
                                                                "logpop"))  # fmt: skip
        trans = self.succ.nbytes + self.logw.nbytes + self.user_last.nbytes
        return arrays + trans + self.seen.nbytes()

    def memory(self) -> dict[str, int]:
        """Bytes held, by part (the replica's memory metric): the rows' arrays (`rows`: the
        first n of each, what the model is; `spare`: capacity beyond n), transitions, seen
        items (live, and the garbage of replaced lists), ids and the per-row bookkeeping."""
        out = dict.fromkeys(("rows", "spare", "transitions", "seen", "seen_garbage", "ids",
                             "bookkeeping"), 0)  # fmt: skip
        for t in (self.users, self.items):
            for name in ("factors", "bias", "count", "last", "logpop"):
                a = getattr(t, name)
                used = a[: t.n].nbytes
                out["rows"] += used
                out["spare"] += a.nbytes - used
            ids = t.ids
            out["ids"] += ids.nbytes() if isinstance(ids, CompactIds) else 0
        n_items = self.items.n
        for a in (self.succ, self.logw):
            out["transitions"] += a[:n_items].nbytes
            out["spare"] += a.nbytes - a[:n_items].nbytes
        out["transitions"] += self.user_last[: self.users.n].nbytes
        out["spare"] += self.user_last.nbytes - self.user_last[: self.users.n].nbytes
        live = self.seen.nbytes()
        out["seen"] = live
        out["seen_garbage"] = self.seen.items.nbytes - live
        out["bookkeeping"] = (self.user_gen.nbytes + self.item_gen.nbytes + self.item_norms.nbytes
                              + self.seen.start.nbytes + self.seen.count.nbytes)  # fmt: skip
        return out


def _reserve(table: EntityTable, n: int) -> None:
    """Room for `n` rows, growing by a quarter (`EntityTable.reserve` doubles: a replica would
    hold up to twice its model)."""
    if n <= table.capacity:
        return
    cap = max(n, table.capacity + table.capacity // 4)
    for name, fill in (("factors", 0.0), ("bias", 0.0), ("count", 0), ("last", NEVER),
                       ("logpop", NEVER)):  # fmt: skip
        a = getattr(table, name)
        out = np.full((cap, *a.shape[1:]), fill, a.dtype)
        out[: a.shape[0]] = a
        setattr(table, name, out)


class PinnedUsers:
    """Users of one `ServingModel`, checked against the generation of the view they are scored
    with: the assertion inside the reader that no request mixes generations."""

    def __init__(self, model: ServingModel, generation: int) -> None:
        self.model, self.generation = model, generation

    def user(self, user_id: str) -> UserRecord | None:
        m = self.model
        u = m.users.index.get(user_id)
        if u is None or u >= m.users.n:
            return None
        gen = int(m.user_gen[u])
        if gen < 0:
            return None
        if gen != self.generation:
            raise MixedGenerationError(
                f"user row {u} is of generation {gen}, the item view of {self.generation}"
            )
        t = m.users
        last = int(m.user_last[u]) if u < m.user_last.size else -1
        return UserRecord(index=u, vector=t.factors[u].copy(), events=int(t.count[u]),
                          seen=m.seen.of(u), last_item=last)  # fmt: skip


@dataclass(frozen=True)
class Served:
    """What one request reads: an item view and the users of the same generation. A request
    holds `lock` while it reads them (the reader writes commits into the same arrays)."""

    view: ItemView
    users: PinnedUsers
    marker: Marker

    @property
    def lock(self) -> threading.Lock:
        return self.users.model.lock

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the model for one request, after a commit the reader is waiting to write."""
        model = self.users.model
        while model.writer_waiting:
            time.sleep(0.0002)
        with model.lock:
            yield


class ModelReader:
    """Materialises the log in memory. `feed` every record in log order; `served` is what
    requests read, rebuilt by `publish` after a run of records (so a fetch of many commits
    costs one view). A commit's records are held until its marker and then applied together;
    a snapshot is built on the side and replaces the served model at its marker, so a request
    never sees half a commit nor two generations."""

    def __init__(self) -> None:
        self.live: ServingModel | None = None
        self.building: ServingModel | None = None
        self.config: ModelConfig | None = None
        self.pending = PendingRows()
        self.early: list[Record] = []  # a snapshot's rows before its config record
        self._ubuf: list[Record] = []  # user rows for the model being built, unpacked together
        self._begin = (0, 0, 0)  # generation and row counts of the snapshot under way
        self.served: Served | None = None
        self.applied: list[Marker] = []  # markers applied since the last `take_applied`
        self.skipped = 0  # records of a generation they cannot belong to (never applied)
        self.replayed = 0  # commits skipped as behind the one applied (a replay, `Marker.behind`)
        self.dirty = False
        self.last_marker: Marker | None = None
        self.tailing = False  # reading a snapshot of the live generation into the live model
        self._skip = 0  # rows of a slice of such a snapshot still to skip

    # ---- records ------------------------------------------------------------------------

    def skips_next(self) -> bool:
        """True (and counted down) while the rows of a snapshot slice of the served generation
        go by: the caller need not even decode them."""
        if self._skip <= 0:
            return False
        self._skip -= 1
        return True

    def feed(self, rec: Record) -> None:
        if rec.kind == "tombstone":
            return  # a replaced generation's row: the reader already moved past it
        if rec.kind == "slice":
            # rows the served model already has (if it serves this generation); a model built
            # from this snapshot's BEGIN needs them
            if self.tailing and self.live is not None and self.building is None:
                self._skip = rec.value
            return
        if rec.kind == "config" and self.tailing and self.live is not None:
            if rec.value == self.live.config:
                return  # a snapshot of the model served: its rows apply like a commit's
            self.tailing = False  # another shape: built on the side after all
        if rec.kind == "config":
            self.config = rec.value
            self._ubuf.clear()
            if self.building is None or self.building.config != rec.value:
                gen = self.building.gen if self.building is not None else 0
                self.building = self._sized(ServingModel(rec.value, max(gen, self._begin[0])))
            for r in self.early:
                self._build(r)
            self.early.clear()
            return
        if rec.kind == "begin":
            doc = rec.value
            self._begin = (rec.gen, int(doc.get("n_users", 0)), int(doc.get("n_items", 0)))
            if self.live is not None and self.building is None and rec.gen == self.live.gen:
                # a snapshot of the generation served (periodic): its rows are full rows of
                # that generation, at least as new as the ones held, so they are applied to
                # the live model with the commits around them; building a second model on
                # the side would stop the served one for as long as the snapshot takes to
                # read (seconds) and hold two models
                self.tailing = True
                return
            # a snapshot of another generation (a rebuild's swap), or the first: built on the
            # side (the live model keeps serving meanwhile)
            self.tailing = False
            self.pending.clear()
            self._ubuf.clear()
            self.building = (
                self._sized(ServingModel(self.config, rec.gen)) if self.config is not None else None
            )
            return
        if rec.kind == "marker":
            self._marker(rec.value)
            return
        if self.live is None or self.building is not None:
            self._build(rec)
        else:
            self.pending.append(rec)

    def _sized(self, model: ServingModel) -> ServingModel:
        """Arrays of the size the snapshot under way announced (its rows arrive in order)."""
        gen, nu, ni = self._begin
        if model.gen == gen:
            _reserve(model.users, nu)
            _reserve(model.items, ni)
        return model

    def _build(self, rec: Record) -> None:
        b = self.building
        if b is None:
            if self.config is None:
                self.early.append(rec)
                return
            b = self.building = ServingModel(self.config, rec.gen)
        if rec.gen > b.gen:  # the log moved to a newer generation: its rows replace these
            self._ubuf.clear()
            b = self.building = ServingModel(b.config, rec.gen)
        if rec.gen < b.gen:
            return
        self._ubuf.append(rec)
        if len(self._ubuf) >= 4096:
            self._flush_users(b)

    def _flush_users(self, model: ServingModel) -> None:
        buf, self._ubuf = self._ubuf, []
        _apply(model, [r for r in buf if r.gen == model.gen])

    def _marker(self, m: Marker) -> None:
        self.last_marker = m
        b = self.building
        live = self.live
        if live is not None and live.marker is not None and m.behind(live.marker):
            # a commit of a replay that this reader already applied (its source offsets stop
            # short of the served ones): skipped, snapshot included, so it never goes back
            self.replayed += 1
            self.pending.clear()
            self._ubuf.clear()
            if b is not None and b.complete(m):  # a snapshot of the replay: dropped
                self.building = None
            if m.snapshot:
                self.tailing = False
            return
        if b is not None:
            self._flush_users(b)
            if not b.complete(m):  # a compacted stretch, or a snapshot still under way
                return
            b.marker = m
            self.live, self.building = b, None
            self.pending.clear()
            self._done(m)
            return
        live = self.live
        if live is None:
            return
        if m.gen != live.gen:
            # a generation changes only through a snapshot: rows of another one outside a
            # snapshot are never applied to this model
            self.skipped += len(self.pending)
            self.pending.clear()
            return
        recs = self.pending.recs  # a live commit's (decoded): filtered before the lock
        ok = [r for r in recs if r.gen == live.gen]
        self.skipped += len(recs) - len(ok)
        live.writer_waiting = True
        with live.lock:
            live.writer_waiting = False
            _apply(live, ok)
            for chunk in self.pending.spilled():
                ok = [r for r in chunk if r.gen == live.gen]
                self.skipped += len(chunk) - len(ok)
                _apply(live, ok)
            live.marker = m
            served = self.served
            if live.items_changed and served is not None and served.users.model is live:
                served.view._cache.pop("gram", None)  # of the item rows before this commit
        self.pending.clear()
        if m.snapshot:
            self.tailing = False
        self._done(m)

    def _done(self, m: Marker) -> None:
        self.applied.append(m)
        self.dirty = True

    def take_applied(self) -> list[Marker]:
        out, self.applied = self.applied, []
        return out

    # ---- what requests read ---------------------------------------------------------------

    def publish(self) -> bool:
        """Rebuild what requests read after records were fed; True if it changed."""
        if not self.dirty or self.live is None or self.live.marker is None:
            return False
        m, live = self.live.marker, self.live
        prev = self.served
        n = min(live.items.n, m.n_items)
        if n and not np.all(live.item_gen[:n] == live.gen):
            raise MixedGenerationError(f"item rows of another generation than {live.gen}")
        if (
            prev is not None
            and prev.users.model is live
            and not live.items_changed
            and prev.view.n == n
            and prev.view.succ is live.succ  # transition rows not reallocated
        ):
            view = dataclasses.replace(prev.view, clock=m.clock, model_version=m.version)
        else:
            # the live arrays themselves, not a copy (a replica holds one model): commits
            # are written into them under the model's lock, which requests hold too; the
            # norms are kept up to date row by row, and V^T V (fold-ins) is recomputed
            # lazily for a view whose item rows changed
            t = live.items
            state = ModelState(
                config=live.config, users=live.users, items=_first(t, n),
                cdf=np.zeros((3, 0)), clock=np.array([m.clock]), confidence=None,
                model_version=m.version,
            )  # fmt: skip
            view = dataclasses.replace(
                ItemView.from_state(state, copy=False),
                generation=live.gen,
                succ=live.succ,
                logw=live.logw,
            )
            view._cache["norms"] = live.item_norms[:n]
            live.items_changed = False
        self.served = Served(view, PinnedUsers(live, live.gen), m)
        self.dirty = False
        return True


class _First:
    """The first `n` rows of a table (an item row whose marker is not applied yet stays out)."""

    def __init__(self, table: EntityTable, n: int) -> None:
        self.n = n
        self.factors, self.bias, self.logpop = table.factors, table.bias, table.logpop
        self.count, self.last = table.count, table.last
        self.ids = table.ids  # rows from n on are never asked for (n is the view's size)
        self.index = table.index


def _first(table: EntityTable, n: int) -> Any:
    return table if table.n == n else _First(table, n)


def _apply(model: ServingModel, records: list[Record]) -> None:
    """User, item and transition rows of one generation, each kind in one go."""
    for kind in ("user", "item"):
        rows = [r for r in records if r.kind == kind]
        if rows:
            model.set_users(model.gen, [r.index for r in rows], [r.value for r in rows], kind)
    trans = [r for r in records if r.kind == "trans"]
    if trans:
        model.set_transitions([r.index for r in trans], [r.value for r in trans])


def materialise(records: Iterable[tuple[bytes | None, bytes | None]]) -> ModelReader:
    """A reader fed every (key, value) in order (tests and tools); unreadable ones skipped."""
    reader = ModelReader()
    for k, v in records:
        if reader.skips_next():
            continue
        try:
            reader.feed(decode(k, v))
        except LogFormatError:  # unreadable, or not of this model's shape
            reader.skipped += 1
    reader.publish()
    return reader


__all__ = ["NEVER", "ItemView", "Marker", "ModelReader", "Served", "decode"]
