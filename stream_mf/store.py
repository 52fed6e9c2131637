"""RocksDB access for the model store (rocksdict, raw bytes, one column family per kind).

The layout (keys, blocks, codecs, the registry of meta keys) is in `stream_mf/store_layout.py`.
A writer changes the store only through the named commits below (`commit_batch`, `flip`,
`after_swap_step`, `stage`, `clear_rebuild_unfinished`, `mark_rebuilt`,
`drop_other_generations`, `write_offsets`), each one WriteBatch: RocksDB applies it whole or
not at all, which is the exactly-once guarantee. The updater's loop is their one caller,
through `apply` (the values of `stream_mf/writes.py`; a rebuild's background thread queues
what it stages for the loop to write); `write_full_state` is for tests, benchmarks and the
demo's seed.
Readers only ever see one generation; leftovers of an unfinished rebuild are deleted on open.
After each durable commit that changes the model, `on_commit` (the model log's publisher,
consumers/model_log.py) is told what it wrote (`CommitInfo`); `commits` counts them.

Checkpointed durability (`deferred`, docs/architecture.md "Checkpoints"): a `CommitBatch` is
then counted and handed to `on_commit` at once (the model log publishes it from memory) but
written only at the next `Checkpoint`: everything the batches since the last one changed,
merged (a row changed by many batches is written once, at its value now), the counters and
the next offsets, one WriteBatch. Every other named commit checkpoints first, so the store
never holds a rebuild's rows over batches it lacks. A crash loses the batches after the last
checkpoint; the updater replays them from its offsets (the learner is bit-identical however
the stream is cut).
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import rocksdict as rd

from stream_mf import pair_chunks
from stream_mf.arrays import unique_sorted
from stream_mf.config import ModelConfig, keep_structural
from stream_mf.learner_snapshot import LearnerSnapshot
from stream_mf.model import BatchDelta, merge_deltas
from stream_mf.sgd import N_COUNTERS, Counter
from stream_mf.state import (
    EntityTable,
    ModelState,
    confidence_items,
    fill_confidence,
    new_confidence_map,
)
from stream_mf.store_layout import (
    BATCH_LOG_KEEP,
    BATCH_LOG_PREFIX,
    BATCH_LOG_SAMPLE,
    BE32,
    BLOCK_ROWS,
    BLOCK_ROWS_KEY,
    CDF,
    CFS,
    CLOCK,
    COMMIT_SEQ,
    COMMITS,
    CONFIG,
    COUNTERS,
    F64,
    FORMAT,
    FORMAT_KEY,
    GEN_BLOCK,
    GENERATION,
    I32,
    I64,
    LEGACY_FORMATS,
    MODEL_CFS,
    MODEL_VERSION,
    N_ITEMS,
    N_USERS,
    OFFSET_EPOCH,
    REBUILD_UNFINISHED,
    REBUILT_AT,
    REBUILT_EVENTS,
    RowTable,
    as_bytes,
    batch_log_key,
    be32_keys,
    block_view,
    fill_rows,
    meta_bytes,
    meta_key,
    model_key,
    model_keys,
    offset_key,
    read_meta_block,
    read_transition_row,
    rows_bytes,
    transition_bytes,
)
from stream_mf.writes import (
    AfterSwapStep,
    Checkpoint,
    ClearUnfinished,
    CommitBatch,
    DropGenerations,
    Flip,
    MarkRebuilt,
    Restore,
    Stage,
    Write,
    WriteOffsets,
)

log = logging.getLogger(__name__)


@dataclass
class CommitInfo:
    """What one durable commit wrote, for whoever follows the store (the model log)."""

    state: ModelState
    seq: int  # commits so far, this one included (meta b"commits")
    users: np.ndarray  # rows written (changed, new or re-solved), int64
    items: np.ndarray
    pair_keys: np.ndarray  # (user << 32 | item) pairs written
    everything: bool  # every row was written (first save)
    generation: int | None  # set when this commit flipped the model generation
    offsets: Mapping[tuple[str, int], int]
    event_times: np.ndarray | None
    events: int
    #: transition rows written (`stream_mf/transitions.py`); users' last items go with `users`
    trans_rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    durable: bool = True  # False: a batch kept in memory until the next checkpoint


@dataclass
class CheckpointInfo:
    """What one checkpoint wrote (the updater's metrics)."""

    batches: int
    events: int
    bytes: int
    seconds: float


def _with_new(rows: np.ndarray, new: tuple[int, int]) -> np.ndarray:
    """Changed rows and the new ones [lo, hi): every row a batch commit writes."""
    lo, hi = new
    fresh = np.arange(lo, hi, dtype=np.int64)
    return np.concatenate([rows.astype(np.int64), fresh]) if fresh.size else rows


class StoreError(RuntimeError):
    """The store cannot be opened or written; the message says why and what to do."""


class ConfigMismatchError(StoreError):
    pass


def _options(create: bool) -> rd.Options:
    opt = rd.Options(raw_mode=True)
    opt.create_if_missing(create)
    opt.create_missing_column_families(create)
    opt.set_max_open_files(-1)
    return opt


def _lock_holder(lock: Path) -> int | None:
    """The pid holding a POSIX lock on `lock` (Linux /proc/locks), if it can be told."""
    try:
        st = lock.stat()
        want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as fh:
            for line in fh:
                fields = line.split()
                # "1: POSIX  ADVISORY  WRITE 8266 fe:00:2147587 0 EOF" ("->" marks waiters)
                if "->" not in fields and len(fields) >= 6 and fields[5] == want:
                    return int(fields[4])
    except (OSError, ValueError):
        pass
    return None


def _open_error(path: Path, exc: Exception) -> str:
    """RocksDB's open errors in words a user can act on."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "LOCK" in text and ("lock" in text.lower()):
        pid = _lock_holder(path / "LOCK")
        by = f" (pid {pid})" if pid is not None and pid != os.getpid() else ""
        return (
            f"state dir {path} is in use by another updater{by}: one updater writes a store; "
            "stop that one or give this one another --state-dir"
        )
    if "Permission denied" in text or "Read-only file system" in text:
        return (
            f"cannot write the model store at {path} ({text}): point --state-dir at a "
            "directory this user can write"
        )
    return f"cannot open the model store at {path}: {text}"


class StateStore:
    """A model's on-disk home. Open read-write from one process (the updater) only.

    `secondary=PATH` opens a read-only follower (RocksDB secondary instance) that sees the
    writer's commits after `catch_up()` (tests and tools; query processes follow the model log).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        secondary: str | os.PathLike[str] | None = None,
        sync: bool = False,
    ) -> None:
        self.path = Path(path)
        self.secondary = secondary is not None
        cfs = {name: rd.Options(raw_mode=True) for name in CFS}
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(
                f"state dir {self.path} is a file, not a directory: point --state-dir at the "
                "model store's directory (the updater creates it)"
            )
        if self.secondary:
            if not (self.path / "CURRENT").exists():
                raise StoreError(
                    f"no model store at {self.path}: start the updater first (it creates it), "
                    "or point --state-dir at its directory"
                )
            access = rd.AccessType.secondary(str(secondary))
            try:
                # a store no writer of this version opened yet lacks `pairs` (format 3)
                present = set(rd.Rdict.list_cf(str(self.path)))
                cfs = {name: opt for name, opt in cfs.items() if name in present}
                self.db = rd.Rdict(str(self.path), _options(False), cfs, access_type=access)
            except Exception as exc:  # e.g. the writer is still creating column families
                raise StoreError(f"cannot follow the model store at {self.path}: {exc}") from exc
        else:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"cannot create state dir {self.path}: {exc.strerror}: point --state-dir at "
                    "a directory this user can write"
                ) from exc
            try:
                self.db = rd.Rdict(str(self.path), _options(True), cfs)
            except Exception as exc:  # rocksdict raises bare Exception
                raise StoreError(_open_error(self.path, exc)) from exc
        self.cf = {name: self.db.get_column_family(name) for name in cfs}
        self.h = {name: self.db.get_column_family_handle(name) for name in cfs}
        self.write_opt = rd.WriteOptions()
        self.write_opt.sync = sync
        # called after each durable commit (the updater publishes the model log from it)
        self.on_commit: Callable[[CommitInfo], None] | None = None
        self.last_write_bytes = 0  # the size of the last write batch (the updater's metrics)
        self.last_write_seconds = (0.0, 0.0)  # its RocksDB write: wall, this thread's CPU
        self._format_current = False  # checked (and a format-1 store marked) at a first commit
        # checkpointed durability (module docstring): batches learned since the last checkpoint
        self.deferred = False
        self._pending: list[BatchDelta] = []
        self._pending_offsets: dict[tuple[str, int], int] = {}
        self._pending_times: list[np.ndarray] = []
        # each pending batch's pairs, sorted (made on the first read after it): a read searches
        # every batch, and a new batch sorts only its own pairs, not all since the checkpoint
        self._pending_pairs: list[tuple[np.ndarray, np.ndarray]] = []
        self._seq = self._meta_int(COMMITS)  # commits so far, the pending ones included
        self.last_checkpoint: CheckpointInfo | None = None
        # the `pairs` chunks' bounds (sorted) and sizes (None: read them when first needed),
        # and those the write being made puts (`_put_pairs`; kept once it is written)
        self._bounds: np.ndarray | None = None
        self._sizes = np.empty(0, np.int64)
        self._new_bounds: list[tuple[np.ndarray, np.ndarray]] = []
        if not self.secondary and not self.is_new:
            try:
                if self._legacy_pairs():
                    self._migrate_pairs()
                self.drop_other_generations()
            except BaseException:
                self.close()  # release the lock: the caller may open it again
                raise

    # ---- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        # Column-family objects and handles keep the DB (and its LOCK) alive until dropped.
        self.cf.clear()
        self.h.clear()
        self.db.close()
        del self.db

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def catch_up(self) -> None:
        """Follow the writer (secondary instances only)."""
        self.db.try_catch_up_with_primary()

    # ---- meta ---------------------------------------------------------------------------------

    def _meta(self, key: bytes) -> bytes | None:
        return self.cf["meta"].get(key)

    def _meta_int(self, key: bytes, default: int = 0) -> int:
        raw = self._meta(key)
        return default if raw is None else I64.unpack(raw)[0]

    def rebuilt_at(self) -> float | None:
        """Wall-clock time of the last rebuild swapped in, if any."""
        raw = self._meta(REBUILT_AT)
        return None if raw is None else F64.unpack(raw)[0]

    def generation(self) -> int:
        return self._meta_int(GENERATION)

    def clear_rebuild_unfinished(self, rebuilt_events: int | None = None) -> None:
        """Forget the mark (a later rebuild was judged, and rejected, by its guard)."""
        if self._meta(REBUILD_UNFINISHED) is not None or rebuilt_events is not None:
            wb = self._batch()
            wb.delete(REBUILD_UNFINISHED, self.h["meta"])
            self._put_rebuilt_events(wb, rebuilt_events)
            self._write(wb)

    def mark_rebuilt(self, events: int) -> None:
        """A deterministic rebuild ended at `events` applied with no commit of its own."""
        wb = self._batch()
        self._put_rebuilt_events(wb, events)
        self._write(wb)

    def rebuilt_events(self) -> int | None:
        """Events applied when the last deterministic rebuild ended (its schedule counts from
        there), if one ever did."""
        raw = self._meta(REBUILT_EVENTS)
        return None if raw is None else I64.unpack(raw)[0]

    def _put_rebuilt_events(self, wb: rd.WriteBatch, events: int | None) -> None:
        if events is not None:
            wb.put(REBUILT_EVENTS, I64.pack(events), self.h["meta"])

    def rebuild_unfinished(self) -> int | None:
        """The generation whose rows left over at the swap were not all re-solved when the
        writer stopped (a crash in a rebuild's after-swap phase), if any: those rows keep the
        last round's solution until a rebuild re-solves them."""
        raw = self._meta(REBUILD_UNFINISHED)
        return None if raw is None else I64.unpack(raw)[0]

    def _model_blocks(self, cf: str, gen: int | None = None) -> Iterator[tuple[int, bytes]]:
        """(block, value) of one generation of a model column family, in block order."""
        gen = self.generation() if gen is None else gen
        prefix = BE32.pack(gen)
        it = self.cf[cf].iter()
        it.seek(prefix)
        while it.valid():
            k = it.key()
            if k[:4] != prefix:
                break
            yield GEN_BLOCK.unpack(k)[1], it.value()
            it.next()

    def drop_other_generations(
        self, older: bool = True, staged: bool = True, below: int | None = None
    ) -> None:
        """Delete model rows of every generation but the current: `older` ones (the model a
        rebuild replaced: readers may still hold views of it for a moment), only those under
        `below` if given, and `staged` ones (an unfinished or rejected rebuild's)."""
        gen = self.generation()
        low = gen if below is None else min(below, gen)
        wb = self._batch()
        for cf in MODEL_CFS:
            h = self.h[cf]
            if older and low > 0:
                wb.delete_range(BE32.pack(0), BE32.pack(low), h)
            if staged:
                wb.delete_range(BE32.pack(gen + 1), b"\xff" * 8, h)
        self._write(wb)

    @property
    def is_new(self) -> bool:
        return self._meta(CONFIG) is None

    def stored_config(self) -> ModelConfig | None:
        raw = self._meta(CONFIG)
        return None if raw is None else ModelConfig.model_validate_json(raw)

    def model_version(self) -> int:
        return self._meta_int(MODEL_VERSION)

    def events_applied(self) -> int:
        raw = self._meta(COUNTERS)
        return 0 if raw is None else int(np.frombuffer(raw, np.int64)[0])

    def offsets(self) -> dict[tuple[str, int], int]:
        """Next offset to consume per (topic, partition), as of the last commit."""
        out: dict[tuple[str, int], int] = {}
        for k, v in _raw_items(self.cf["offsets"]):
            topic, _, part = k.decode().rpartition("/")
            out[(topic, int(part))] = I64.unpack(v)[0]
        return out

    # ---- load -------------------------------------------------------------------------------

    def _check_config(self, config: ModelConfig | None) -> ModelConfig:
        stored = self.stored_config()
        if stored is None:
            if config is None:
                raise StoreError(f"{self.path} holds no model yet and no config was given")
            return config
        if config is None:
            return stored
        config = keep_structural(stored, config)
        if stored.structural() != config.structural():
            raise ConfigMismatchError(
                f"the store at {self.path} was built with {stored.structural()} but the settings "
                f"ask for {config.structural()}; use the stored values, or a new --state-dir to "
                "start a fresh model"
            )
        return config

    def _load_table(self, kind: str, config: ModelConfig) -> EntityTable:
        n = self._meta_int(meta_key(f"n_{kind}s"))
        table = EntityTable(kind, config.dim, config.seed, config.init_scale, capacity=max(n, 1024))
        ids = [v.decode() for _, v in _raw_items(self.cf[f"{kind}_index"])]
        if len(ids) < n:
            raise StoreError(f"{self.path}: {kind} id map holds {len(ids)} ids, meta says {n}")
        table.add(ids[:n], init=False)
        fill_rows(table.factors[:n], self._model_blocks(f"{kind}_factors"))
        for k, v in _raw_items(self.cf[f"{kind}_meta"]):
            read_meta_block(table, BE32.unpack(k)[0] * BLOCK_ROWS, v)
        if kind == "item":
            fill_rows(table.bias[:n], self._model_blocks("item_bias"))
        return table

    def load(self, config: ModelConfig | None = None) -> ModelState:
        """The whole state; a new store yields an empty model with `config`."""
        config = self._check_config(config)
        if self.is_new:
            return ModelState.empty(config)
        rows = self._meta_int(BLOCK_ROWS_KEY, BLOCK_ROWS)
        if rows != BLOCK_ROWS:
            raise StoreError(
                f"{self.path} stores rows in blocks of {rows}, this version in blocks of "
                f"{BLOCK_ROWS}: rebuild the store from the topic (a new --state-dir)"
            )
        users = self._load_table("user", config)
        items = self._load_table("item", config)
        state = ModelState(
            config=config, users=users, items=items, cdf=np.zeros((3, items.capacity))
        )
        raw = self._meta(COUNTERS)
        if raw is not None:
            state.counters[:] = np.frombuffer(raw, np.int64)[:N_COUNTERS]
        state.clock[0] = F64.unpack(self._meta(CLOCK) or F64.pack(0.0))[0]
        cdf = self._meta(CDF)
        if cdf is not None:
            arr = np.frombuffer(cdf, np.float64).reshape(3, -1)
            state.cdf[:, : arr.shape[1]] = arr
        state.model_version = self.model_version()
        keys, vals = self._all_confidence()
        fill_confidence(state.confidence, keys, vals)
        self._load_transitions(state)
        return state

    def _legacy_pairs(self) -> bool:
        """The store is of format 1 or 2 (every pair a key of its own in `confidence`): one this
        version's writer has not opened yet (it migrates them into chunks on open)."""
        return self._meta(FORMAT_KEY) in LEGACY_FORMATS

    def _pairs_cf(self) -> rd.Rdict | None:
        """The chunks' column family; None for a follower of a store of an earlier format
        (which has none)."""
        cf = self.cf.get("pairs")
        if cf is None and not self._legacy_pairs():
            raise StoreError(f"the model store at {self.path} was migrated to format "
                             f"{FORMAT.decode()} after this reader opened it: open it again"
                             )  # fmt: skip
        return cf

    def _all_confidence(self) -> tuple[np.ndarray, np.ndarray]:
        """Every pair, sorted by key: the chunks (in key order: one join, one `frombuffer`),
        overlaid with the pairs stored one a key (newer than their chunk's copy)."""
        ks: list[bytes] = []
        vs: list[bytes] = []
        cf = self._pairs_cf()
        for k, v in _raw_items(cf) if cf is not None else ():
            ks.append(k)
            vs.append(v)
        keys, vals = pair_chunks.decode(b"".join(vs))
        if not self.secondary:
            self._bounds = pair_chunks.read_bounds(ks)
            self._sizes = np.fromiter((len(v) // pair_chunks.RECORD.itemsize for v in vs),
                                      np.int64, len(vs))  # fmt: skip
        s_keys, s_vals = self._singles()
        if s_keys.size:
            keys, vals = pair_chunks.newest(np.r_[keys, s_keys], np.r_[vals, s_vals])
        return keys, vals

    def _singles(self) -> tuple[np.ndarray, np.ndarray]:
        """The pairs stored one a key in `confidence` (be64 key -> f64; format 2's layout)."""
        ks: list[bytes] = []
        vs: list[bytes] = []
        for k, v in _raw_items(self.cf["confidence"]):
            ks.append(k)
            vs.append(v)
        keys = np.frombuffer(b"".join(ks), ">i8").astype(np.int64)
        return keys, np.frombuffer(b"".join(vs), "<f8").copy()

    def _singles_in(
        self, starts: np.ndarray, ends: np.ndarray
    ) -> tuple[list[bytes], np.ndarray, np.ndarray]:
        """The single pairs with keys in [start, end) of each range (sorted, disjoint): their
        keys as stored, as int64, and their values."""
        ks: list[bytes] = []
        vs: list[bytes] = []
        it = self.cf["confidence"].iter()
        for lo, hi in zip(pair_chunks.bound_keys(starts), pair_chunks.bound_keys(ends),
                          strict=True):  # fmt: skip
            it.seek(lo)
            while it.valid() and it.key() < hi:
                ks.append(it.key())
                vs.append(it.value())
                it.next()
        keys = np.frombuffer(b"".join(ks), ">i8").astype(np.int64)
        return ks, keys, np.frombuffer(b"".join(vs), "<f8").copy()

    def _chunk_index(self) -> tuple[np.ndarray, np.ndarray]:
        """The chunks' bounds and sizes (read from the store the first time, kept after)."""
        if self._bounds is None:
            ks: list[bytes] = []
            sizes: list[int] = []
            cf = self._pairs_cf()
            for k, v in _raw_items(cf) if cf is not None else ():
                ks.append(k)
                sizes.append(len(v) // pair_chunks.RECORD.itemsize)
            self._bounds = pair_chunks.read_bounds(ks)
            self._sizes = np.asarray(sizes, np.int64)
        return self._bounds, self._sizes

    def _stored_user_items(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        """A user's stored pairs: the chunks from the one holding the user's first possible
        key up to the next user's first key, overlaid with the user's single pairs."""
        lo, hi = pair_chunks.bound_key(user << 32), pair_chunks.bound_key((user + 1) << 32)
        parts: list[bytes] = []
        cf = self._pairs_cf()
        if cf is not None:
            it = cf.iter()
            it.seek_for_prev(lo)
            if not it.valid():
                it.seek(lo)
            while it.valid() and it.key() < hi:
                parts.append(it.value())
                it.next()
        s_items, s_vals = self._single_user_items(user)
        if not parts:  # the guard calls this per event: no numpy on empty parts
            return s_items, s_vals
        items, vals = pair_chunks.user_pairs(b"".join(parts), user)
        if s_items.size:
            items, vals = pair_chunks.newest(
                np.concatenate([items, s_items]), np.concatenate([vals, s_vals])
            )
        return items, vals

    def _single_user_items(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        prefix = BE32.pack(user)
        it = self.cf["confidence"].iter()
        it.seek(prefix)
        items: list[int] = []
        vals: list[float] = []
        while it.valid():
            k = it.key()
            if k[:4] != prefix:
                break
            items.append(BE32.unpack(k[4:])[0])
            vals.append(F64.unpack(it.value())[0])
            it.next()
        return np.asarray(items, np.int32), np.asarray(vals, np.float64)

    def user_items(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        """Items a user interacted with and their log-confidences, sorted by item."""
        got_i, got_v = self._stored_user_items(user)
        if self._pending:  # batches not checkpointed yet: their values win
            new_i, new_v = self._pending_user(user)
            if new_i.size:
                keep = ~np.isin(got_i, new_i)
                got_i = np.concatenate([got_i[keep], new_i])
                got_v = np.concatenate([got_v[keep], new_v])
                order = np.argsort(got_i, kind="stable")
                got_i, got_v = got_i[order], got_v[order]
        return got_i, got_v

    # ---- piecewise reads (query side) ----------------------------------------------------------

    def clock(self) -> float:
        raw = self._meta(CLOCK)
        return 0.0 if raw is None else F64.unpack(raw)[0]

    def counts(self) -> tuple[int, int]:
        return self._meta_int(N_USERS), self._meta_int(N_ITEMS)

    def item_ids(self, known: list[str]) -> list[str]:
        """`known` extended with ids registered since (ids never change once given)."""
        n_items = self.counts()[1]
        if len(known) >= n_items:
            return known[:n_items]
        out = list(known)
        it = self.cf["item_index"].iter()
        it.seek(BE32.pack(len(known)))
        while it.valid() and len(out) < n_items:
            out.append(it.value().decode())
            it.next()
        return out

    def item_arrays(
        self, dim: int, n: int, generation: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Factors, biases and log-popularity of items [0, n), of `generation` (the current one
        by default). A query process reloads these at every refresh, so the full blocks are
        copied in one piece (1.1-1.3x faster than a copy per block in bench/bench_follower.py;
        the rest is RocksDB's iteration)."""
        factors = np.zeros((n, dim), np.float32)
        bias = np.zeros(n, np.float32)
        logpop = np.full(n, -np.inf)
        gen = self.generation() if generation is None else generation
        fill_rows(factors, self._model_blocks("item_factors", gen))
        fill_rows(bias, self._model_blocks("item_bias", gen))
        # meta blocks are columns of count, last and logpop (8 bytes a row each): logpop is the
        # third third of each block
        meta = ((BE32.unpack(k)[0], v) for k, v in _raw_items(self.cf["item_meta"]))
        fill_rows(logpop, meta, columns=3, column=2)
        return factors, bias, logpop

    def user_row(
        self, user_id: str, dim: int, generation: int | None = None
    ) -> tuple[int, np.ndarray, int] | None:
        """(index, vector, events) of a user, or None if the store has not seen it (or holds no
        row of it in `generation`, the current one by default)."""
        raw = self.cf["user_ids"].get(user_id.encode())
        if raw is None:
            return None
        u = I32.unpack(raw)[0]
        b, r = divmod(u, BLOCK_ROWS)
        gen = self.generation() if generation is None else generation
        fb = self.cf["user_factors"].get(model_key(gen, b))
        mb = self.cf["user_meta"].get(BE32.pack(b))
        # a user registered after `generation` was replaced has no row in it (its block there
        # is missing, or shorter than the user's row)
        if fb is None or mb is None or len(fb) < (r + 1) * dim * 4 or len(mb) < (r + 1) * 24:
            return None
        vec = np.frombuffer(fb, np.float32).reshape(-1, dim)[r].copy()
        count = int(np.frombuffer(mb, np.int64, 1, r * 8)[0])
        return u, vec, count

    # ---- the named commits (each one WriteBatch) -------------------------------------------

    def apply(self, state: ModelState, write: Write) -> None:
        """Perform one named commit; the updater's loop calls this and nothing else writes.
        Any commit but a batch's comes after a checkpoint of the batches before it."""
        if not isinstance(write, CommitBatch | Checkpoint) and self._pending:
            self.last_checkpoint = self.checkpoint(state)
        match write:
            case CommitBatch(delta, offsets, event_times):
                self.commit_batch(state, delta, offsets, event_times)
            case Checkpoint():
                self.last_checkpoint = self.checkpoint(state)
            case Flip(generation, users, items, unfinished, mark):
                self.flip(state, generation, users, items, unfinished=unfinished,
                          rebuilt_events=mark)  # fmt: skip
            case AfterSwapStep(users, items, last, mark):
                self.after_swap_step(state, users, items, last=last, rebuilt_events=mark)
            case ClearUnfinished(mark):
                self.clear_rebuild_unfinished(mark)
            case MarkRebuilt(events):
                self.mark_rebuilt(events)
            case Stage(kind, rows, generation, blocks):
                self.stage(kind, rows, generation, blocks)
            case DropGenerations(older, staged, below):
                self.drop_other_generations(older, staged, below)
            case WriteOffsets(offsets):
                self.write_offsets(offsets.items())
            case Restore(snapshot):
                self.restore(snapshot)
            case _:
                raise TypeError(f"not a store write: {write!r}")

    def commit_batch(
        self,
        state: ModelState,
        delta: BatchDelta,
        offsets: Mapping[tuple[str, int], int] | None = None,
        event_times: np.ndarray | None = None,
    ) -> None:
        """One learned batch. Not `deferred`: written at once (every changed row, the counters
        and the next offsets, atomically), then published. `deferred`: counted and published
        now, written at the next checkpoint (module docstring)."""
        self._pending.append(delta)
        self._pending_offsets.update(offsets or {})
        if event_times is not None and event_times.size:
            self._pending_times.append(event_times)
        if not self.deferred:
            self.checkpoint(state)
            return
        self.last_write_bytes, self.last_write_seconds = 0, (0.0, 0.0)  # nothing written
        self._seq += 1
        if self.on_commit is not None:
            self.on_commit(
                CommitInfo(
                    state=state,
                    seq=self._seq,
                    users=_with_new(delta.users, delta.new_users).astype(np.int64, copy=False),
                    items=_with_new(delta.items, delta.new_items).astype(np.int64, copy=False),
                    pair_keys=delta.pair_keys,
                    everything=False,
                    generation=None,
                    offsets=dict(offsets or {}),
                    event_times=event_times,
                    events=delta.events,
                    trans_rows=delta.trans_rows,
                    durable=False,
                )
            )

    def checkpoint(self, state: ModelState) -> CheckpointInfo | None:
        """Write what the batches since the last checkpoint changed, merged, at its value in
        `state` now (the model they were learned into), with the counters and the next
        offsets, in one WriteBatch; None if there were none."""
        if not self._pending:
            return None
        t0 = time.perf_counter()
        deltas = self._pending
        delta = merge_deltas(deltas, state)
        offsets = dict(self._pending_offsets)
        times = np.concatenate(self._pending_times) if self._pending_times else None
        wb = self._batch()
        gen = self.generation()
        self._put_header(wb, state, force=False)
        self._put_rows(wb, "user", state.users, delta.new_users, delta.users, gen)
        self._put_rows(wb, "item", state.items, delta.new_items, delta.items, gen)
        self._put_pairs(wb, delta.pair_keys, delta.pair_values)
        self._put_transitions(wb, state, delta.trans_rows, _with_new(delta.users, delta.new_users))
        self._put_scalars(wb, state, cdf=delta.sampler_rebuilt)
        self._put_offsets(wb, offsets)
        if times is not None and times.size:
            self._put_batch_log(wb, times)
        self.discard_pending()
        if self.deferred:  # published already, batch by batch: only the count is written
            wb.put(COMMITS, I64.pack(self._seq), self.h["meta"])
            self._write(wb)
        else:
            self._finish(
                wb,
                state,
                users=_with_new(delta.users, delta.new_users),
                items=_with_new(delta.items, delta.new_items),
                pair_keys=delta.pair_keys,
                offsets=offsets,
                event_times=times,
                events=delta.events,
                trans_rows=delta.trans_rows,
            )
        return CheckpointInfo(
            len(deltas), delta.events, self.last_write_bytes, time.perf_counter() - t0
        )

    @property
    def pending(self) -> int:
        """Batches learned since the last checkpoint (not in the store yet)."""
        return len(self._pending)

    def pending_events(self) -> int:
        return sum(d.events for d in self._pending)

    def discard_pending(self) -> None:
        """Forget the batches since the last checkpoint (written, or the caller reloads the
        model and replays them); the count goes on: what was published stays counted."""
        self._pending = []
        self._pending_offsets = {}
        self._pending_times = []
        self._pending_pairs = []

    def _pending_user(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        """A user's pairs (item, log-confidence) from the batches since the checkpoint; a later
        batch's value of a pair wins."""
        for d in self._pending[len(self._pending_pairs) :]:
            # within a batch a pair is unique (`BatchDelta.pair_keys`): sort, no dedupe
            order = np.argsort(d.pair_keys, kind="stable")
            self._pending_pairs.append((d.pair_keys[order], d.pair_values[order]))
        items: dict[int, float] = {}
        for keys, vals in self._pending_pairs:
            lo, hi = np.searchsorted(keys, [user << 32, (user + 1) << 32])
            items.update(
                zip((keys[lo:hi] & 0xFFFFFFFF).tolist(), vals[lo:hi].tolist(), strict=True)
            )
        got = sorted(items.items())
        return (
            np.fromiter((i for i, _ in got), np.int32, len(got)),
            np.fromiter((v for _, v in got), np.float64, len(got)),
        )

    def commits(self) -> int:
        """Commits so far, batches waiting for a checkpoint included (a model log marker
        carries the count it stands for)."""
        return self._seq

    def durable_commits(self) -> int:
        """Commits as of the last write (a restart carries on from here)."""
        return self._meta_int(COMMITS)

    def bump_commits(self, seq: int) -> None:
        """Count on from `seq`: the model log already holds commits up to it (a replay after
        a crash must not publish lower counts)."""
        self._seq = max(self._seq, seq)

    def _finish(
        self,
        wb: rd.WriteBatch,
        state: ModelState,
        *,
        users: np.ndarray,
        items: np.ndarray,
        pair_keys: np.ndarray | None = None,
        everything: bool = False,
        generation: int | None = None,
        offsets: Mapping[tuple[str, int], int] | None = None,
        event_times: np.ndarray | None = None,
        events: int = 0,
        seq: int | None = None,
        trans_rows: np.ndarray | None = None,
    ) -> None:
        """Count the commit, write it, then tell the follower (the model log) what it wrote:
        only after the write is durable, so the log never runs ahead of the store. `seq`: the
        count to set (a restore carries on from its snapshot's count)."""
        seq = self._seq + 1 if seq is None else seq
        wb.put(COMMITS, I64.pack(seq), self.h["meta"])
        self._write(wb)
        self._seq = seq
        if self.on_commit is not None:
            self.on_commit(
                CommitInfo(
                    state=state,
                    seq=seq,
                    users=users.astype(np.int64, copy=False),
                    items=items.astype(np.int64, copy=False),
                    pair_keys=np.empty(0, np.int64) if pair_keys is None else pair_keys,
                    everything=everything,
                    generation=generation,
                    offsets=dict(offsets or {}),
                    event_times=event_times,
                    events=events,
                    trans_rows=np.empty(0, np.int64) if trans_rows is None else trans_rows,
                )
            )

    def flip(
        self,
        state: ModelState,
        generation: int,
        users: np.ndarray,
        items: np.ndarray,
        *,
        unfinished: bool = False,
        rebuilt_events: int | None = None,
    ) -> None:
        """A rebuild's swap: `users`' and `items`' rows (already staged rows need not be) under
        `generation`, which readers then see; marks it unfinished while rows wait after it."""
        wb = self._batch()
        self._put_generation(wb, generation, unfinished=unfinished)
        self._put_rebuilt_events(wb, rebuilt_events)
        self._put_model_rows(wb, state, users, items, generation)
        self._finish(wb, state, users=users, items=items, generation=generation)

    def after_swap_step(
        self, state: ModelState, users: np.ndarray, items: np.ndarray, *, last: bool = False,
        rebuilt_events: int | None = None,
    ) -> None:  # fmt: skip
        """Rows re-solved after a deferred swap; the last step clears the unfinished mark."""
        wb = self._batch()
        gen = self.generation()
        if last:
            self._put_generation(wb, gen, unfinished=False)
        self._put_rebuilt_events(wb, rebuilt_events)
        self._put_model_rows(wb, state, users, items, gen)
        self._finish(wb, state, users=users, items=items)

    def write_full_state(
        self,
        state: ModelState,
        offsets: Mapping[tuple[str, int], int] | None = None,
        *,
        generation: int | None = None,
    ) -> None:
        """Every row, pair and counter (a first save; tests, benchmarks, the demo's seed),
        under `generation` (flipped to it) if given."""
        wb = self._batch()
        gen = self.generation() if generation is None else generation
        if generation is not None:
            self._put_generation(wb, generation, unfinished=False)
        self._finish_whole(wb, state, gen, offsets, generation=generation)

    def _put_whole_state(
        self,
        wb: rd.WriteBatch,
        state: ModelState,
        gen: int,
        offsets: Mapping[tuple[str, int], int] | None,
    ) -> np.ndarray:
        """Every row, pair, scalar and offset of `state` into `wb` (a first save, a restore);
        returns the pair keys written."""
        self._put_header(wb, state, force=True)
        for kind, table in (("user", state.users), ("item", state.items)):
            rows = np.arange(table.n, dtype=np.int64)
            self._put_rows(wb, kind, table, (0, table.n), rows, gen)
        keys, vals = confidence_items(state.confidence)
        self._put_pairs(wb, keys, vals)
        t = state.transitions
        filled = np.flatnonzero((t.succ[: state.items.n] >= 0).any(axis=1))
        self._put_transitions(wb, state, filled, np.arange(state.users.n, dtype=np.int64))
        self._put_scalars(wb, state, cdf=True)
        self._put_offsets(wb, offsets)
        return keys

    def _finish_whole(
        self,
        wb: rd.WriteBatch,
        state: ModelState,
        gen: int,
        offsets: Mapping[tuple[str, int], int] | None,
        *,
        generation: int | None = None,
        seq: int | None = None,
    ) -> None:
        """The whole state into `wb`, committed as one write that touched every row."""
        keys = self._put_whole_state(wb, state, gen, offsets)
        self._finish(
            wb,
            state,
            users=np.arange(state.users.n, dtype=np.int64),
            items=np.arange(state.items.n, dtype=np.int64),
            pair_keys=keys,
            everything=True,
            offsets=offsets,
            generation=generation,
            seq=seq,
        )

    def restore(self, snap: LearnerSnapshot) -> None:
        """A learner snapshot as a new store's first commit, one WriteBatch: a kill before it
        leaves an empty store (restored again at the next start), after it the whole model."""
        if not self.is_new:
            raise StoreError(f"{self.path} already holds a model: a learner snapshot is restored "
                             "only into an empty state dir")  # fmt: skip
        state = snap.state
        wb = self._batch()
        meta = self.h["meta"]
        gen = snap.generation
        wb.put(GENERATION, I64.pack(gen), meta)
        if snap.rebuilt_at is not None:
            wb.put(REBUILT_AT, F64.pack(snap.rebuilt_at), meta)
        if snap.rebuild_unfinished is not None:
            wb.put(REBUILD_UNFINISHED, I64.pack(snap.rebuild_unfinished), meta)
        self._put_rebuilt_events(wb, snap.rebuilt_events)
        self._finish_whole(wb, state, gen, snap.offsets, seq=snap.commits)

    def stage(self, kind: str, table: RowTable, gen: int, blocks: np.ndarray) -> None:
        """Write factor (and bias) blocks of a future generation; invisible until it is flipped."""
        wb = self._batch()
        rows = blocks.astype(np.int64) * BLOCK_ROWS
        self._put_blocks(wb, kind, table, rows, gen, meta=None)
        self._write(wb)

    def write_offsets(self, offsets: Iterable[tuple[tuple[str, int], int]]) -> None:
        """Move stored offsets (the offset-gap policy); moving one back starts a new epoch, so
        that model log readers take what follows as new, not as a replay."""
        moved = dict(offsets)
        stored = self.offsets()
        wb = self._batch()
        if any(o < stored.get(k, 0) for k, o in moved.items()):
            wb.put(OFFSET_EPOCH, I64.pack(self.offset_epoch() + 1), self.h["meta"])
        self._put_offsets(wb, moved)
        self._write(wb)

    def offset_epoch(self) -> int:
        """Times the stored offsets were moved back on purpose (model log markers carry it)."""
        return self._meta_int(OFFSET_EPOCH)

    # ---- what the commits are made of ----------------------------------------------------------

    def _batch(self) -> rd.WriteBatch:
        if self.secondary:
            raise StoreError("a secondary (read-only) store cannot commit")
        self._new_bounds = []  # a batch built and dropped (an error) adds no chunk
        return rd.WriteBatch(raw_mode=True)

    def _put_header(self, wb: rd.WriteBatch, state: ModelState, *, force: bool) -> None:
        """Format, block size and config: written with the first commit of a store."""
        if not force and not self.is_new and not self._format_current:  # a format-1 store
            self._format_current = True
            if self._meta(FORMAT_KEY) != FORMAT:
                wb.put(FORMAT_KEY, FORMAT, self.h["meta"])
        if force or self.is_new:
            meta = self.h["meta"]
            wb.put(FORMAT_KEY, FORMAT, meta)
            wb.put(BLOCK_ROWS_KEY, I64.pack(BLOCK_ROWS), meta)
            wb.put(CONFIG, state.config.model_dump_json().encode(), meta)

    def _put_generation(self, wb: rd.WriteBatch, generation: int, *, unfinished: bool) -> None:
        meta = self.h["meta"]
        wb.put(GENERATION, I64.pack(generation), meta)
        wb.put(REBUILT_AT, F64.pack(time.time()), meta)
        if unfinished:
            wb.put(REBUILD_UNFINISHED, I64.pack(generation), meta)
        else:
            wb.delete(REBUILD_UNFINISHED, meta)

    def _put_model_rows(
        self, wb: rd.WriteBatch, state: ModelState, users: np.ndarray, items: np.ndarray, gen: int
    ) -> None:
        """Rows a rebuild changed, with the counters (its commits carry no events)."""
        self._put_blocks(wb, "user", state.users, users.astype(np.int64), gen, state.users)
        self._put_blocks(wb, "item", state.items, items.astype(np.int64), gen, state.items)
        self._put_scalars(wb, state, cdf=False)

    def _put_rows(
        self,
        wb: rd.WriteBatch,
        kind: str,
        table: EntityTable,
        new: tuple[int, int],
        rows: np.ndarray,
        gen: int,
    ) -> None:
        self._put_ids(wb, kind, table, *new)
        self._put_blocks(wb, kind, table, rows, gen, table)

    def _put_scalars(self, wb: rd.WriteBatch, state: ModelState, *, cdf: bool) -> None:
        meta = self.h["meta"]
        wb.put(COUNTERS, state.counters.tobytes(), meta)
        wb.put(CLOCK, F64.pack(float(state.clock[0])), meta)
        wb.put(N_USERS, I64.pack(state.users.n), meta)
        wb.put(N_ITEMS, I64.pack(state.items.n), meta)
        wb.put(MODEL_VERSION, I64.pack(state.model_version), meta)
        if cdf:
            n_cdf = int(state.counters[Counter.CDF_LEN])
            wb.put(CDF, np.ascontiguousarray(state.cdf[:, :n_cdf]).tobytes(), meta)

    def _put_offsets(
        self, wb: rd.WriteBatch, offsets: Mapping[tuple[str, int], int] | None
    ) -> None:
        for (topic, part), nxt in (offsets or {}).items():
            wb.put(offset_key(topic, part), I64.pack(nxt), self.h["offsets"])

    def _write(self, wb: rd.WriteBatch) -> None:
        self.last_write_bytes = wb.size_in_bytes()
        t, c = time.perf_counter(), time.thread_time()
        new, self._new_bounds = self._new_bounds, []
        try:
            self.db.write(wb, self.write_opt)
        except Exception as exc:  # rocksdict raises bare Exception
            self._bounds = None  # read again from the store when next needed
            raise StoreError(f"writing to the model store at {self.path} failed: {exc}") from exc
        if new and self._bounds is not None:
            self._bounds, self._sizes = pair_chunks.newest(
                np.concatenate([self._bounds, *(b for b, _ in new)]),
                np.concatenate([self._sizes, *(z for _, z in new)]),
            )
        self.last_write_seconds = (time.perf_counter() - t, time.thread_time() - c)

    def _put_batch_log(self, wb: rd.WriteBatch, times: np.ndarray) -> None:
        """A sample of the batch's event times, so readers can tell how fresh what they serve is."""
        seq = self._meta_int(COMMIT_SEQ) + 1
        sample = times
        if times.size > BATCH_LOG_SAMPLE:
            sample = times[np.linspace(0, times.size - 1, BATCH_LOG_SAMPLE).astype(np.int64)]
        meta = self.h["meta"]
        wb.put(COMMIT_SEQ, I64.pack(seq), meta)
        wb.put(batch_log_key(seq), I64.pack(times.size) + sample.astype("<f8").tobytes(), meta)
        if seq % 256 == 0:
            wb.delete_range(batch_log_key(0), batch_log_key(seq - BATCH_LOG_KEEP), meta)

    def batch_log(self, after: int) -> tuple[int, list[tuple[int, np.ndarray]]]:
        """(last seq, [(events, sampled event times)]) of commits after `after`."""
        out: list[tuple[int, np.ndarray]] = []
        last = after
        it = self.cf["meta"].iter()
        it.seek(batch_log_key(after + 1))
        while it.valid():
            k = it.key()
            if not k.startswith(BATCH_LOG_PREFIX):
                break
            last = struct.unpack(">Q", k[len(BATCH_LOG_PREFIX) :])[0]
            v = it.value()
            out.append((I64.unpack(v[:8])[0], np.frombuffer(v[8:], "<f8")))
            it.next()
        return last, out

    def commit_seq(self) -> int:
        return self._meta_int(COMMIT_SEQ)

    def _put_ids(self, wb: rd.WriteBatch, kind: str, table: EntityTable, lo: int, hi: int) -> None:
        h_ids, h_index = self.h[f"{kind}_ids"], self.h[f"{kind}_index"]
        for k in range(lo, hi):
            key = table.ids[k].encode()
            wb.put(key, I32.pack(k), h_ids)
            wb.put(BE32.pack(k), key, h_index)

    def _put_blocks(
        self,
        wb: rd.WriteBatch,
        kind: str,
        table: RowTable,
        rows: np.ndarray,
        gen: int,
        meta: EntityTable | None,
    ) -> None:
        """Factor (and bias) blocks of `rows` from `table`; their meta blocks too from `meta`
        (the same table) unless it is None, as when staging a future generation."""
        if rows.size == 0:
            return
        h_f, h_m = self.h[f"{kind}_factors"], self.h[f"{kind}_meta"]
        h_b = self.h["item_bias"] if kind == "item" else None
        n = table.n
        blocks = unique_sorted(rows.astype(np.int64) // BLOCK_ROWS)
        full = blocks[(blocks + 1) * BLOCK_ROWS <= n]  # whole blocks: bytes in one C call each
        put = wb.put
        if full.size:
            keys = model_keys(gen, full)
            for k, v in zip(keys, rows_bytes(table.factors, full), strict=True):
                put(k, v, h_f)
            if meta is not None:
                parts = (meta.count, meta.last, meta.logpop)
                raw = np.concatenate([block_view(a, full) for a in parts], axis=1)
                for k, v in zip(be32_keys(full), as_bytes(raw), strict=True):
                    put(k, v, h_m)
            if h_b is not None:
                for k, v in zip(keys, rows_bytes(table.bias, full), strict=True):
                    put(k, v, h_b)
        for b in blocks[full.size :].tolist():  # the last, partial block
            lo = b * BLOCK_ROWS
            hi = min(lo + BLOCK_ROWS, n)
            key = model_key(gen, b)
            put(key, table.factors[lo:hi].tobytes(), h_f)
            if meta is not None:
                put(BE32.pack(b), meta_bytes(meta, lo, hi), h_m)
            if h_b is not None:
                put(key, table.bias[lo:hi].tobytes(), h_b)

    def _put_transitions(
        self, wb: rd.WriteBatch, state: ModelState, rows: np.ndarray, users: np.ndarray
    ) -> None:
        """Transition rows `rows`, whole, and the last-item blocks of `users`."""
        t = state.transitions
        if rows.size:
            h = self.h["transitions"]
            for k, v in zip(be32_keys(rows), transition_bytes(t.succ, t.logw, rows), strict=True):
                wb.put(k, v, h)
        if users.size and t.last.shape[0] >= state.users.n:
            h = self.h["user_last"]
            n = state.users.n
            for b in unique_sorted(users.astype(np.int64) // BLOCK_ROWS).tolist():
                lo = b * BLOCK_ROWS
                wb.put(
                    BE32.pack(b), t.last[lo : min(lo + BLOCK_ROWS, n)].astype("<i4").tobytes(), h
                )

    def _load_transitions(self, state: ModelState) -> None:
        t = state.transitions
        t.slots = state.config.transition_slots
        t.reserve(state.users.n, state.items.n)
        for k, v in _raw_items(self.cf["transitions"]):
            row = BE32.unpack(k)[0]
            if row < state.items.n:
                t.succ[row], t.logw[row] = read_transition_row(v, t.slots)
        n = state.users.n
        for k, v in _raw_items(self.cf["user_last"]):
            lo = BE32.unpack(k)[0] * BLOCK_ROWS
            part = np.frombuffer(v, "<i4")[: max(n - lo, 0)]
            t.last[lo : lo + part.size] = part

    def _put_pairs(self, wb: rd.WriteBatch, keys: np.ndarray, vals: np.ndarray) -> None:
        """Pairs (unique keys) at their new values (`stream_mf/pair_chunks.py`): a chunk that
        gets many is folded (read, merged with them and with its single pairs, put back whole,
        cut if it grew too big, its singles deleted); the few of any other chunk are put one a
        key, as format 2 did."""
        if keys.size == 0:
            return
        if keys.size > 1 and not (keys[1:] > keys[:-1]).all():
            order = np.argsort(keys)
            keys, vals = keys[order], vals[order]
        bounds, sizes = self._chunk_index()
        owner = pair_chunks.owners(bounds, keys)
        touched, _, fold = pair_chunks.plan(bounds, sizes, owner)
        folded = touched[fold]
        into = np.isin(owner, folded)
        h_single, put = self.h["confidence"], wb.put
        for k, v in zip(pair_chunks.single_keys(keys[~into]),
                        pair_chunks.single_values(vals[~into]), strict=True):  # fmt: skip
            put(k, v, h_single)
        if folded.size == 0:
            return
        old = folded[np.isin(folded, bounds, assume_unique=True)]
        names: list[str | int | float | bytes | bool] = list(pair_chunks.bound_keys(old))
        cf = self._pairs_cf()
        raw = cast(list[bytes | None], cf.get(names) if names and cf is not None else [])
        if any(r is None for r in raw):
            self._bounds = None
            raise StoreError(f"the model store at {self.path} lost a chunk of pairs it had "
                             "(written by another process?): restart the updater")  # fmt: skip
        ends = pair_chunks.range_ends(bounds, folded)
        s_raw, s_keys, s_vals = self._singles_in(folded, ends)
        out, values = pair_chunks.rewrite(
            old,
            cast(list[bytes], raw),
            [
                (s_keys, s_vals, pair_chunks.owners(bounds, s_keys)),
                (keys[into], vals[into], owner[into]),
            ],
        )
        h = self.h["pairs"]
        for k, v in zip(pair_chunks.bound_keys(out), values, strict=True):
            put(k, v, h)
        for k in s_raw:  # point deletes: a range tombstone a chunk would slow every seek
            wb.delete(k, h_single)
        size = np.fromiter((len(v) // pair_chunks.RECORD.itemsize for v in values), np.int64,
                           len(values))  # fmt: skip
        self._new_bounds.append((out, size))

    def _migrate_pairs(self) -> None:
        """Formats 1 and 2 into 3 on open: the per-pair keys of `confidence` as chunks in
        `pairs`, in steps of `MIGRATE_CHUNKS` chunks, then one WriteBatch that empties
        `confidence` and sets the format. A crash before that last write leaves a format-2
        store (whose half-filled `pairs` the next open clears first): migrated again."""
        t0 = time.perf_counter()
        was = (self._meta(FORMAT_KEY) or b"?").decode()
        keys, vals = self._singles()
        bounds, values = pair_chunks.chunk(keys, vals, pair_chunks.block_start(keys))
        h = self.h["pairs"]
        wb = self._batch()
        wb.delete_range(b"", b"\xff" * 9, h)
        names = pair_chunks.bound_keys(bounds)
        for j, (k, v) in enumerate(zip(names, values, strict=True)):
            wb.put(k, v, h)
            if (j + 1) % MIGRATE_CHUNKS == 0:
                self._write(wb)
                wb = self._batch()
        wb.delete_range(b"", b"\xff" * 9, self.h["confidence"])
        wb.put(FORMAT_KEY, FORMAT, self.h["meta"])
        self._write(wb)
        # drop the emptied pairs and the range tombstone now, not when RocksDB gets to them:
        # every `user_items` seeks in `confidence` (its single pairs)
        self.cf["confidence"].compact_range(None, None)
        self._format_current = True
        self._bounds = bounds
        self._sizes = np.fromiter((len(v) // pair_chunks.RECORD.itemsize for v in values),
                                  np.int64, len(values))  # fmt: skip
        log.info("%s: store format %s migrated to %s (%d confidence pairs in %d chunks) in "
                 "%.1f s%s", self.path, was, FORMAT.decode(), keys.size, bounds.size,
                 time.perf_counter() - t0, "; transitions start empty and fill from the next "
                 "event on" if was == "1" else "")  # fmt: skip


#: chunks a migration step writes (a WriteBatch of ~8-16 MB)
MIGRATE_CHUNKS = 2048


def _raw_items(cf: rd.Rdict) -> Iterator[tuple[bytes, bytes]]:
    """A column family's entries as the bytes they are: every one is opened in raw mode, which
    rocksdict's stubs cannot tell (they type a key as any of the modes' key types)."""
    return cast(Iterator[tuple[bytes, bytes]], cf.items())


def raw_keys(cf: rd.Rdict) -> Iterator[bytes]:
    """A column family's keys (see `_raw_items`)."""
    return cast(Iterator[bytes], cf.keys())


__all__ = [
    "BLOCK_ROWS",
    "MODEL_CFS",
    "ConfigMismatchError",
    "StateStore",
    "StoreError",
    "confidence_items",
    "new_confidence_map",
    "raw_keys",
]
