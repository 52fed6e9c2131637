"""The learner's whole state as bytes, cut into bounded records, and back (pure: no Kafka).

A learner snapshot is what an updater on a new, empty disk needs to carry on exactly where the
old one was: everything the store persists (ids, factors, biases, per-row counters, confidences,
the sampler table, counters, clock, config, generation, model version, commit count) plus the
next input offsets that state stands for. The learner is deterministic however the stream is
cut into batches, so this snapshot plus a replay of `interactions` from its offsets gives back
bit for bit the model that was lost (docs/architecture.md, "Learner snapshots").

It is not the model log's serving snapshot: that one has no confidences, sampler nor counters,
and its item rows are coalesced (up to `model_log_item_seconds` behind the store). It is its
own stream of records on its own topic (consumers/learner_snapshot.py). Store format 2 added
the transition table and users' last items (`stream_mf/transitions.py`); a format-1 snapshot
restores with an empty table.

Records:

  b"B"                        a snapshot begins (JSON: id, chunks, size)
  b"L" be64 id be32 index     one chunk of the encoded state (at most `chunk_bytes`)
  b"E"                        the snapshot is complete (JSON `SnapshotEnd`: id, chunks, size,
                              sha256, the offset of its B record, source offsets, ...)
  a chunk key, no value       tombstone of a superseded snapshot's chunk

A snapshot without its E record (a writer killed half way) is never used; one whose chunks do
not add up to the E record's digest is never used either.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from stream_mf.config import ModelConfig
from stream_mf.sgd import N_COUNTERS, Counter
from stream_mf.state import EntityTable, ModelState, confidence_items, fill_confidence
from stream_mf.store_layout import BLOCK_ROWS
from stream_mf.store_layout import FORMAT as STORE_FORMAT

FORMAT = 1
#: store formats whose snapshots this version reads (1: before transitions, restored empty;
#: a snapshot's pairs do not depend on the store's layout of them, format 3's change)
_READS_STORE_FORMATS = ("1", "2", STORE_FORMAT.decode())
MAGIC = b"SMFL"
BEGIN_KEY = b"B"
END_KEY = b"E"
CHUNK_PREFIX = b"L"
_CHUNK_KEY = struct.Struct(">cQI")
_HEAD = struct.Struct("<4sI")  # magic, header length
#: a chunk's default size: well under librdkafka's and brokers' 1 MB message limit
CHUNK_BYTES = 512 * 1024
_ROW_ARRAYS = (("factors", "<f4"), ("bias", "<f4"), ("count", "<i8"), ("last", "<f8"),
               ("logpop", "<f8"))  # fmt: skip


class SnapshotFormatError(ValueError):
    """Bytes that are not a learner snapshot this version can read."""


@dataclass
class LearnerSnapshot:
    """A learner's state as of one durable commit, and what the store keeps beside it."""

    state: ModelState
    offsets: dict[tuple[str, int], int]  # next offset to consume per (topic, partition)
    generation: int
    commits: int
    rebuilt_at: float | None = None
    rebuild_unfinished: int | None = None
    rebuilt_events: int | None = None  # where the deterministic rebuild schedule counts from

    @property
    def events(self) -> int:
        return self.state.events_applied


@dataclass
class SnapshotEnd:
    """The record that makes a snapshot complete."""

    id: int
    chunks: int
    size: int  # bytes of the encoded state
    sha256: str
    begin: int  # offset of the snapshot's B record: a reader reads on from there
    commits: int = 0
    events: int = 0
    generation: int = 0
    model_version: int = 0
    offsets: dict[str, int] = field(default_factory=dict)
    at: float = 0.0  # wall time the state was taken
    format: int = FORMAT

    def encode(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self))

    @classmethod
    def decode(cls, raw: bytes | None) -> SnapshotEnd:
        try:
            return cls(**orjson.loads(raw or b""))
        except (orjson.JSONDecodeError, TypeError) as exc:
            raise SnapshotFormatError(f"bad snapshot end record: {exc}") from exc


# ---- state <-> bytes ---------------------------------------------------------------------------


def _ids_bytes(ids: list[str]) -> tuple[bytes, bytes]:
    enc = [s.encode() for s in ids]
    return np.fromiter(map(len, enc), "<i4", len(enc)).tobytes(), b"".join(enc)


def encode(snap: LearnerSnapshot) -> bytes:
    """The whole state as one byte string: a JSON header, then raw little-endian arrays."""
    st = snap.state
    sections: list[tuple[str, bytes]] = []
    for table in (st.users, st.items):
        n = table.n
        lens, blob = _ids_bytes(table.ids)
        sections += [(f"{table.kind}_id_lens", lens), (f"{table.kind}_ids", blob)]
        for name, dt in _ROW_ARRAYS:
            arr = getattr(table, name)[:n]
            sections.append((f"{table.kind}_{name}", np.ascontiguousarray(arr, dt).tobytes()))
    cdf_len = int(st.counters[Counter.CDF_LEN])
    sections.append(("cdf", np.ascontiguousarray(st.cdf[:, :cdf_len], "<f8").tobytes()))
    keys, vals = confidence_items(st.confidence)
    sections += [("conf_keys", keys.astype("<i8").tobytes()),
                 ("conf_vals", vals.astype("<f8").tobytes())]  # fmt: skip
    t = st.transitions  # store format 2: the successor table and users' last items
    t.reserve(st.users.n, st.items.n)
    ni, nu = st.items.n, st.users.n
    sections += [("trans_succ", np.ascontiguousarray(t.succ[:ni], "<i4").tobytes()),
                 ("trans_logw", np.ascontiguousarray(t.logw[:ni], "<f8").tobytes()),
                 ("trans_last", np.ascontiguousarray(t.last[:nu], "<i4").tobytes())]  # fmt: skip
    header = {
        "format": FORMAT,
        "store_format": STORE_FORMAT.decode(),
        "block_rows": BLOCK_ROWS,
        "config": st.config.model_dump(mode="json"),
        "counters": st.counters.tolist(),
        "clock": float(st.clock[0]),
        "model_version": st.model_version,
        "generation": snap.generation,
        "commits": snap.commits,
        "rebuilt_at": snap.rebuilt_at,
        "rebuild_unfinished": snap.rebuild_unfinished,
        "rebuilt_events": snap.rebuilt_events,
        "offsets": {f"{t}/{p}": o for (t, p), o in snap.offsets.items()},
        "n_users": st.users.n,
        "n_items": st.items.n,
        "cdf_len": cdf_len,
        "transition_slots": t.slots,
        "sections": [[name, len(raw)] for name, raw in sections],
    }
    head = orjson.dumps(header)
    return b"".join([_HEAD.pack(MAGIC, len(head)), head, *(raw for _, raw in sections)])


def decode(raw: bytes) -> LearnerSnapshot:
    """`encode`'s inverse; SnapshotFormatError if the bytes are not one this version reads."""
    try:
        magic, hlen = _HEAD.unpack_from(raw)
        if magic != MAGIC:
            raise SnapshotFormatError("not a learner snapshot (bad magic)")
        h: dict[str, Any] = orjson.loads(raw[_HEAD.size : _HEAD.size + hlen])
    except (struct.error, orjson.JSONDecodeError) as exc:
        raise SnapshotFormatError(f"unreadable learner snapshot header: {exc}") from exc
    if h.get("format") != FORMAT:
        raise SnapshotFormatError(f"learner snapshot format {h.get('format')}, this version "
                                  f"reads {FORMAT}")  # fmt: skip
    if h["store_format"] not in _READS_STORE_FORMATS or h["block_rows"] != BLOCK_ROWS:
        raise SnapshotFormatError(
            f"learner snapshot of store format {h['store_format']} (blocks of "
            f"{h['block_rows']}), this version writes {STORE_FORMAT.decode()} ({BLOCK_ROWS})"
        )
    at = _HEAD.size + hlen
    parts: dict[str, memoryview] = {}
    view = memoryview(raw)
    for name, size in h["sections"]:
        if at + size > len(raw):
            raise SnapshotFormatError(f"learner snapshot cut short in section {name}")
        parts[name] = view[at : at + size]
        at += size
    config = ModelConfig.model_validate(h["config"])
    state = ModelState.empty(config, capacity=max(h["n_users"], h["n_items"], 1024))
    for table, n in ((state.users, h["n_users"]), (state.items, h["n_items"])):
        _fill_table(table, n, parts)
    counters = np.asarray(h["counters"], np.int64)
    state.counters[: min(N_COUNTERS, counters.size)] = counters[:N_COUNTERS]
    state.clock[0] = float(h["clock"])
    state.model_version = int(h["model_version"])
    cdf_len = int(h["cdf_len"])
    state.sync_capacity()
    if cdf_len:
        state.cdf[:, :cdf_len] = np.frombuffer(parts["cdf"], "<f8").reshape(3, cdf_len)
    keys = np.frombuffer(parts["conf_keys"], "<i8").astype(np.int64)
    vals = np.frombuffer(parts["conf_vals"], "<f8").astype(np.float64)
    fill_confidence(state.confidence, keys, vals)
    if "trans_succ" in parts:  # store format 1 had none: the table starts empty
        m, ni, nu = int(h["transition_slots"]), h["n_items"], h["n_users"]
        succ = np.frombuffer(parts["trans_succ"], "<i4").reshape(ni, m)
        logw = np.frombuffer(parts["trans_logw"], "<f8").reshape(ni, m)
        t = state.transitions
        k = min(m, t.slots)
        if m > t.slots:  # fewer slots asked for: keep each row's strongest
            top = np.sort(np.argsort(-logw, axis=1, kind="stable")[:, :k], axis=1)
            succ, logw = np.take_along_axis(succ, top, 1), np.take_along_axis(logw, top, 1)
        t.succ[:ni, :k] = succ[:, :k]
        t.logw[:ni, :k] = logw[:, :k]
        t.last[:nu] = np.frombuffer(parts["trans_last"], "<i4")
    offsets = {}
    for k, v in h["offsets"].items():
        topic, _, part = k.rpartition("/")
        offsets[(topic, int(part))] = int(v)
    return LearnerSnapshot(
        state=state,
        offsets=offsets,
        generation=int(h["generation"]),
        commits=int(h["commits"]),
        rebuilt_at=h.get("rebuilt_at"),
        rebuild_unfinished=h.get("rebuild_unfinished"),
        rebuilt_events=h.get("rebuilt_events"),
    )


def _fill_table(table: EntityTable, n: int, parts: dict[str, memoryview]) -> None:
    kind = table.kind
    lens = np.frombuffer(parts[f"{kind}_id_lens"], "<i4")
    blob = bytes(parts[f"{kind}_ids"])
    ends = np.cumsum(lens).tolist()
    starts = [0, *ends[:-1]]
    ids = [blob[a:b].decode() for a, b in zip(starts, ends, strict=True)]
    if len(ids) != n:
        raise SnapshotFormatError(f"{len(ids)} {kind} ids, the header says {n}")
    table.add(ids, init=False)
    for name, dt in _ROW_ARRAYS:
        arr = np.frombuffer(parts[f"{kind}_{name}"], dt)
        target = getattr(table, name)
        target[:n] = arr.reshape(target[:n].shape)


# ---- bytes <-> records -----------------------------------------------------------------------


def chunk_key(snap_id: int, index: int) -> bytes:
    return _CHUNK_KEY.pack(CHUNK_PREFIX, snap_id, index)


def parse_chunk_key(key: bytes) -> tuple[int, int] | None:
    """(snapshot id, chunk index) of a chunk key; None for any other key."""
    if len(key) != _CHUNK_KEY.size or key[:1] != CHUNK_PREFIX:
        return None
    _, snap_id, index = _CHUNK_KEY.unpack(key)
    return snap_id, index


def n_chunks(size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(1, -(-size // chunk_bytes))


def chunk_records(
    snap_id: int, raw: bytes, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of each chunk, in order; every value at most `chunk_bytes`."""
    view = memoryview(raw)
    for j in range(n_chunks(len(raw), chunk_bytes)):
        yield chunk_key(snap_id, j), bytes(view[j * chunk_bytes : (j + 1) * chunk_bytes])


def begin_record(snap_id: int, chunks: int, size: int) -> tuple[bytes, bytes]:
    return BEGIN_KEY, orjson.dumps({"id": snap_id, "chunks": chunks, "size": size})


def digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


class Assembler:
    """Collects the chunks of one snapshot (in any order, duplicates harmless) and checks them
    against its end record."""

    def __init__(self, end: SnapshotEnd) -> None:
        self.end = end
        self.parts: dict[int, bytes] = {}

    def feed(self, key: bytes, value: bytes | None) -> None:
        got = parse_chunk_key(key)
        if got is None or value is None or got[0] != self.end.id:
            return
        if 0 <= got[1] < self.end.chunks:
            self.parts[got[1]] = value

    @property
    def complete(self) -> bool:
        return len(self.parts) == self.end.chunks

    def missing(self) -> list[int]:
        return [j for j in range(self.end.chunks) if j not in self.parts]

    def bytes(self) -> bytes:
        """The encoded state; SnapshotFormatError unless every chunk is here and the digest
        matches (a chunk lost or damaged on the way)."""
        if not self.complete:
            raise SnapshotFormatError(f"learner snapshot {self.end.id}: chunks "
                                      f"{self.missing()[:5]} missing")  # fmt: skip
        raw = b"".join(self.parts[j] for j in range(self.end.chunks))
        if len(raw) != self.end.size or digest(raw) != self.end.sha256:
            raise SnapshotFormatError(f"learner snapshot {self.end.id}: bytes do not match its "
                                      "end record's digest")  # fmt: skip
        return raw


def assemble(end: SnapshotEnd, records: Iterable[tuple[bytes, bytes | None]]) -> LearnerSnapshot:
    """The snapshot `end` closes, from records read from its begin offset on."""
    a = Assembler(end)
    for k, v in records:
        a.feed(k, v)
    return decode(a.bytes())


__all__ = [
    "Assembler",
    "LearnerSnapshot",
    "SnapshotEnd",
    "SnapshotFormatError",
    "assemble",
    "chunk_records",
    "decode",
    "encode",
]
