"""The model store's on-disk layout: column families, keys, blocks and value codecs (pure).

Keys are big-endian so that byte order is numeric order; values are little-endian.

Column families:
  meta          the keys of META below
  user_ids      utf-8 id -> int32 index          user_index  be32 index -> utf-8 id
  item_ids      utf-8 id -> int32 index          item_index  be32 index -> utf-8 id
  user_factors  be32 gen | be32 block -> f32[rows, dim]   (item_factors alike)
  item_bias     be32 gen | be32 block -> f32[rows]
  user_meta     be32 block -> i64 count[rows] | f64 last[rows] | f64 logpop[rows]  (item_meta alike)
  pairs         be64 chunk bound -> (<i8 user << 32 | item, <f8 log decayed confidence)[<=512]
                (confidence pairs in chunks, anchored at t=0: stream_mf/pair_chunks.py)
  confidence    be32 user | be32 item -> f64: a pair stored single, newer than its chunk's copy
                if any (a checkpoint's few pairs of a chunk); formats 1-2: every pair
  offsets       b"topic/partition" -> int64 next offset to consume
  transitions   be32 item -> i32 successor[M] | f64 log decayed count[M]  (stream_mf/transitions.py)
  user_last     be32 block -> i32 last item[rows]  (-1: none yet)

Format 2 added `transitions` and `user_last`. Format 3 moved the confidence pairs from a key
each in `confidence` to chunks of up to 512 in `pairs`, `confidence` keeping the pairs a
checkpoint wrote single. The updater migrates a format-1 or -2 store when it opens it
(`StateStore._migrate_pairs`: chunks written in steps, then one WriteBatch empties `confidence`
and sets the format; a crash before it migrates again at the next open). A format-1 store also
starts with an empty transition table and no last items (they fill from the next event on).
Readers read every format alike (chunks, if any, overlaid with the single pairs).

Meta keys (tests/unit/test_store.py checks this list against META):
  config              JSON ModelConfig
  counters            int64[N_COUNTERS]
  clock               f64 stream clock (seconds)
  n_users             int64
  n_items             int64
  model_version       int64, + 1 at every swap
  generation          int64, the generation readers see
  cdf                 f64[3, cdf_len] the negative sampler's table
  format              bytes, FORMAT
  block_rows          int64, BLOCK_ROWS
  rebuilt_at          f64 wall-clock time of the last swap
  rebuild_unfinished  int64 generation whose after-swap rows were not all applied
  rebuilt_events      int64 events applied when the last deterministic rebuild ended
  commit_seq          int64 sequence number of the last batch log entry
  commits             int64 durable commits so far (model log markers name it)
  offset_epoch        int64 times the offsets were moved back on purpose (offset gap)
  batchlog/<seq>      int64 events | f64[<=256] sampled event times (seq: be64)

Factors and biases are the *model* and live under a generation number: a rebuild stages a whole
new model under the next generation while the stream goes on, then one commit writes the rows that
changed meanwhile and flips `generation`. Rows are stored in blocks of BLOCK_ROWS: a micro-batch
touches thousands of rows and a put costs microseconds of Python, so writing dirty blocks instead
of dirty rows cuts a commit's puts by an order of magnitude (bench/README.md).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

FORMAT = b"3"
#: formats whose pairs are one key each in `confidence` (migrated on open)
LEGACY_FORMATS = (b"1", b"2")
BLOCK_ROWS = 16
CFS = (
    "meta", "user_ids", "user_index", "item_ids", "item_index", "user_factors", "user_meta",
    "item_factors", "item_bias", "item_meta", "confidence", "offsets", "transitions", "user_last",
    "pairs",
)  # fmt: skip
MODEL_CFS = ("user_factors", "item_factors", "item_bias")
BATCH_LOG_PREFIX = b"batchlog/"
BATCH_LOG_SAMPLE = 256
BATCH_LOG_KEEP = 1024
BE32 = struct.Struct(">I")
I32 = struct.Struct("<i")
I64 = struct.Struct("<q")
F64 = struct.Struct("<d")
GEN_BLOCK = struct.Struct(">II")


@dataclass(frozen=True)
class MetaKey:
    """One key of the meta column family: its bytes and what its value holds."""

    key: bytes
    value: str


def _registry(*keys: MetaKey) -> dict[str, MetaKey]:
    return {k.key.decode(): k for k in keys}


#: every key the store writes to `meta`, in the order of the module docstring
META = _registry(
    MetaKey(b"config", "JSON ModelConfig"),
    MetaKey(b"counters", "int64[N_COUNTERS]"),
    MetaKey(b"clock", "f64 stream clock (seconds)"),
    MetaKey(b"n_users", "int64"),
    MetaKey(b"n_items", "int64"),
    MetaKey(b"model_version", "int64, + 1 at every swap"),
    MetaKey(b"generation", "int64, the generation readers see"),
    MetaKey(b"cdf", "f64[3, cdf_len] the negative sampler's table"),
    MetaKey(b"format", "bytes, FORMAT"),
    MetaKey(b"block_rows", "int64, BLOCK_ROWS"),
    MetaKey(b"rebuilt_at", "f64 wall-clock time of the last swap"),
    MetaKey(b"rebuild_unfinished", "int64 generation whose after-swap rows were not all applied"),
    MetaKey(b"rebuilt_events", "int64 events applied when the last deterministic rebuild ended"),
    MetaKey(b"commit_seq", "int64 sequence number of the last batch log entry"),
    MetaKey(b"commits", "int64 durable commits so far (model log markers name it)"),
    MetaKey(b"offset_epoch", "int64 times the offsets were moved back on purpose (offset gap)"),
    MetaKey(
        BATCH_LOG_PREFIX + b"<seq>", "int64 events | f64[<=256] sampled event times (seq: be64)"
    ),
)


def meta_key(name: str) -> bytes:
    """The bytes of a registered meta key (a typo fails here, not as a silently missing row)."""
    return META[name].key


CONFIG, COUNTERS, CLOCK = meta_key("config"), meta_key("counters"), meta_key("clock")
N_USERS, N_ITEMS = meta_key("n_users"), meta_key("n_items")
MODEL_VERSION, GENERATION, CDF = meta_key("model_version"), meta_key("generation"), meta_key("cdf")
FORMAT_KEY, BLOCK_ROWS_KEY = meta_key("format"), meta_key("block_rows")
REBUILT_AT, REBUILD_UNFINISHED = meta_key("rebuilt_at"), meta_key("rebuild_unfinished")
COMMIT_SEQ, COMMITS = meta_key("commit_seq"), meta_key("commits")
OFFSET_EPOCH = meta_key("offset_epoch")
REBUILT_EVENTS = meta_key("rebuilt_events")


class RowTable(Protocol):
    """What writing model blocks reads of a table: an EntityTable, or a rebuild's new factors
    (with zero biases) staged as a future generation."""

    @property
    def factors(self) -> np.ndarray: ...
    @property
    def bias(self) -> np.ndarray: ...
    @property
    def n(self) -> int: ...


class MetaTable(Protocol):
    """What a meta block holds of an entity table's rows."""

    @property
    def count(self) -> np.ndarray: ...
    @property
    def last(self) -> np.ndarray: ...
    @property
    def logpop(self) -> np.ndarray: ...


def offset_key(topic: str, partition: int) -> bytes:
    return f"{topic}/{partition}".encode()


def model_key(gen: int, block: int) -> bytes:
    return GEN_BLOCK.pack(gen, block)


def batch_log_key(seq: int) -> bytes:
    return BATCH_LOG_PREFIX + struct.pack(">Q", max(seq, 0))


def meta_bytes(table: MetaTable, lo: int, hi: int) -> bytes:
    return (
        table.count[lo:hi].tobytes() + table.last[lo:hi].tobytes() + table.logpop[lo:hi].tobytes()
    )


def block_view(a: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """Whole blocks of `a` as one row of raw bytes each: shape (len(blocks), BLOCK_ROWS*row)."""
    per = a[: (int(blocks[-1]) + 1) * BLOCK_ROWS].reshape(
        -1, BLOCK_ROWS * int(np.prod(a.shape[1:]))
    )
    return per[blocks].view(np.uint8)


def as_bytes(raw: np.ndarray) -> list[bytes]:
    """One `bytes` per row of a 2-D uint8 array, in one C call (a void view's tolist)."""
    out: list[bytes] = np.ascontiguousarray(raw).view(f"V{raw.shape[1]}").ravel().tolist()
    return out


def rows_bytes(a: np.ndarray, blocks: np.ndarray) -> list[bytes]:
    return as_bytes(block_view(a, blocks))


def model_keys(gen: int, blocks: np.ndarray) -> list[bytes]:
    """`model_key(gen, b)` for every block at once."""
    k = np.empty((blocks.size, 2), ">u4")
    k[:, 0] = gen
    k[:, 1] = blocks
    out: list[bytes] = k.view("V8").ravel().tolist()
    return out


def be32_keys(blocks: np.ndarray) -> list[bytes]:
    out: list[bytes] = blocks.astype(">u4").view("V4").tolist()
    return out


def transition_bytes(succ: np.ndarray, logw: np.ndarray, rows: np.ndarray) -> list[bytes]:
    """One value per transition row: its successors (i32) then their log-counts (f64)."""
    raw = np.concatenate(
        [succ[rows].astype("<i4").view(np.uint8), logw[rows].astype("<f8").view(np.uint8)], axis=1
    )
    return as_bytes(raw)


def read_transition_row(raw: bytes, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """A `transitions` value back into (successors, log-counts), fitted to `slots` (a row
    stored with more keeps its strongest, with fewer is padded empty)."""
    m = len(raw) // 12
    succ = np.frombuffer(raw, "<i4", m, 0).astype(np.int32)
    logw = np.frombuffer(raw, "<f8", m, 4 * m).astype(np.float64)
    if m > slots:
        keep = np.sort(np.argsort(-logw, kind="stable")[:slots])
        succ, logw = succ[keep], logw[keep]
    out_s = np.full(slots, -1, np.int32)
    out_w = np.full(slots, -np.inf)
    out_s[: succ.size] = succ
    out_w[: logw.size] = logw
    return out_s, out_w


def read_meta_block(table: MetaTable, lo: int, raw: bytes) -> None:
    rows = len(raw) // 24
    table.count[lo : lo + rows] = np.frombuffer(raw, np.int64, rows, 0)
    table.last[lo : lo + rows] = np.frombuffer(raw, np.float64, rows, rows * 8)
    table.logpop[lo : lo + rows] = np.frombuffer(raw, np.float64, rows, rows * 16)


def fill_rows(
    out: np.ndarray, blocks: Iterable[tuple[int, bytes]], columns: int = 1, column: int = 0
) -> None:
    """Copy blocked rows into `out` ([n] or [n, dim]): an unbroken run of full blocks from block
    0, in order, in one join and one copy; any other block on its own. With `columns` > 1 each
    block holds that many columns of its rows one after the other, and `column` is taken."""
    n = out.shape[0]
    tail = out.shape[1:]
    width = int(np.prod(tail)) if tail else 1
    full = BLOCK_ROWS * width * columns * out.dtype.itemsize
    run: list[bytes] = []
    rest: list[tuple[int, bytes]] = []
    for blk, v in blocks:
        if not rest and blk == len(run) and len(v) == full and (blk + 1) * BLOCK_ROWS <= n:
            run.append(v)
        else:
            rest.append((blk, v))
    if run:
        flat = np.frombuffer(b"".join(run), out.dtype).reshape(len(run), columns, -1)
        out[: len(run) * BLOCK_ROWS] = flat[:, column].reshape(-1, *tail)
    for blk, v in rest:
        lo = blk * BLOCK_ROWS
        if lo >= n:
            continue
        rows = len(v) // (width * columns * out.dtype.itemsize)
        part = np.frombuffer(v, out.dtype).reshape(columns, rows, *tail)[column][: n - lo]
        out[lo : lo + part.shape[0]] = part
