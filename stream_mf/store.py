"""RocksDB persistence of the model state (rocksdict, raw bytes, one column family per kind).

Layout (keys big-endian so that byte order is numeric order; values little-endian):
  meta          b"config" JSON ModelConfig, b"counters" int64[4], b"clock" f64, b"n_users",
                b"n_items", b"model_version" int64, b"cdf" f64[3, cdf_len], b"format",
                b"block_rows", b"commits" int64 (durable commits so far: model log markers name it)
  user_ids      utf-8 id -> int32 index          user_index  be32 index -> utf-8 id
  item_ids      utf-8 id -> int32 index          item_index  be32 index -> utf-8 id
  user_factors  be32 gen | be32 block -> f32[rows, dim]   (item_factors alike)
  item_bias     be32 gen | be32 block -> f32[rows]
  user_meta     be32 block -> i64 count[rows] | f64 last[rows] | f64 logpop[rows]  (item_meta alike)
  confidence    be32 user | be32 item -> f64 log decayed confidence (anchored at t=0)
  offsets       b"topic/partition" -> int64 next offset to consume

Factors and biases are the *model* and live under a generation number (meta b"generation"): a
rebuild stages a whole new model under the next generation in small steps while the stream goes
on, then one commit writes the rows that changed meanwhile and flips the generation. Readers only
ever see one generation; leftovers of an unfinished rebuild are deleted on open.

Rows are stored in blocks of BLOCK_ROWS: a micro-batch touches thousands of rows and a put costs
microseconds of Python, so writing dirty blocks instead of dirty rows cuts a commit's puts by an
order of magnitude (bench/README.md). Everything a batch changed, and the offsets after it, go
into one WriteBatch: RocksDB applies it whole or not at all, which is the exactly-once guarantee.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rocksdict as rd

from stream_mf.arrays import unique_sorted
from stream_mf.config import ModelConfig
from stream_mf.model import BatchDelta
from stream_mf.sgd import CDF_LEN, N_COUNTERS
from stream_mf.state import EntityTable, ModelState, new_confidence_map

FORMAT = b"1"
BLOCK_ROWS = 16
CFS = (
    "meta", "user_ids", "user_index", "item_ids", "item_index", "user_factors", "user_meta",
    "item_factors", "item_bias", "item_meta", "confidence", "offsets",
)  # fmt: skip
BATCH_LOG_PREFIX = b"batchlog/"
BATCH_LOG_SAMPLE = 256
BATCH_LOG_KEEP = 1024
_BE32 = struct.Struct(">I")
_I32 = struct.Struct("<i")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")


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


def offset_key(topic: str, partition: int) -> bytes:
    return f"{topic}/{partition}".encode()


_GEN_BLOCK = struct.Struct(">II")
MODEL_CFS = ("user_factors", "item_factors", "item_bias")


def _fill_rows(
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


def _model_key(gen: int, block: int) -> bytes:
    return _GEN_BLOCK.pack(gen, block)


def _batch_log_key(seq: int) -> bytes:
    return BATCH_LOG_PREFIX + struct.pack(">Q", max(seq, 0))


def _meta_bytes(table: EntityTable, lo: int, hi: int) -> bytes:
    return (
        table.count[lo:hi].tobytes() + table.last[lo:hi].tobytes() + table.logpop[lo:hi].tobytes()
    )


def _block_view(a: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """Whole blocks of `a` as one row of raw bytes each: shape (len(blocks), BLOCK_ROWS*row)."""
    per = a[: (int(blocks[-1]) + 1) * BLOCK_ROWS].reshape(
        -1, BLOCK_ROWS * int(np.prod(a.shape[1:]))
    )
    return per[blocks].view(np.uint8)


def _as_bytes(raw: np.ndarray) -> list[bytes]:
    """One `bytes` per row of a 2-D uint8 array, in one C call (a void view's tolist)."""
    return np.ascontiguousarray(raw).view(f"V{raw.shape[1]}").ravel().tolist()


def _rows_bytes(a: np.ndarray, blocks: np.ndarray) -> list[bytes]:
    return _as_bytes(_block_view(a, blocks))


def _model_keys(gen: int, blocks: np.ndarray) -> list[bytes]:
    """`_model_key(gen, b)` for every block at once."""
    k = np.empty((blocks.size, 2), ">u4")
    k[:, 0] = gen
    k[:, 1] = blocks
    return k.view("V8").ravel().tolist()


def _be32_keys(blocks: np.ndarray) -> list[bytes]:
    return blocks.astype(">u4").view("V4").tolist()


def _read_meta_block(table: EntityTable, lo: int, raw: bytes) -> None:
    rows = len(raw) // 24
    table.count[lo : lo + rows] = np.frombuffer(raw, np.int64, rows, 0)
    table.last[lo : lo + rows] = np.frombuffer(raw, np.float64, rows, rows * 8)
    table.logpop[lo : lo + rows] = np.frombuffer(raw, np.float64, rows, rows * 16)


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
        self.cf = {name: self.db.get_column_family(name) for name in CFS}
        self.h = {name: self.db.get_column_family_handle(name) for name in CFS}
        self.write_opt = rd.WriteOptions()
        self.write_opt.sync = sync
        # called after each durable commit (the updater publishes the model log from it)
        self.on_commit: Callable[[CommitInfo], None] | None = None
        if not self.secondary and not self.is_new:
            self.drop_other_generations()

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
        return default if raw is None else _I64.unpack(raw)[0]

    def rebuilt_at(self) -> float | None:
        """Wall-clock time of the last rebuild swapped in, if any."""
        raw = self._meta(b"rebuilt_at")
        return None if raw is None else _F64.unpack(raw)[0]

    def generation(self) -> int:
        return self._meta_int(b"generation")

    def clear_rebuild_unfinished(self) -> None:
        """Forget the mark (a later rebuild was judged, and rejected, by its guard)."""
        if self._meta(b"rebuild_unfinished") is not None:
            wb = rd.WriteBatch(raw_mode=True)
            wb.delete(b"rebuild_unfinished", self.h["meta"])
            self._write(wb)

    def rebuild_unfinished(self) -> int | None:
        """The generation whose rows left over at the swap were not all re-solved when the
        writer stopped (a crash in a rebuild's after-swap phase), if any: those rows keep the
        last round's solution until a rebuild re-solves them."""
        raw = self._meta(b"rebuild_unfinished")
        return None if raw is None else _I64.unpack(raw)[0]

    def _model_blocks(self, cf: str, gen: int | None = None) -> Iterator[tuple[int, bytes]]:
        """(block, value) of one generation of a model column family, in block order."""
        gen = self.generation() if gen is None else gen
        prefix = _BE32.pack(gen)
        it = self.cf[cf].iter()
        it.seek(prefix)
        while it.valid():
            k = it.key()
            if k[:4] != prefix:
                break
            yield _GEN_BLOCK.unpack(k)[1], it.value()
            it.next()

    def drop_other_generations(
        self, older: bool = True, staged: bool = True, below: int | None = None
    ) -> None:
        """Delete model rows of every generation but the current: `older` ones (the model a
        rebuild replaced: readers may still hold views of it for a moment), only those under
        `below` if given, and `staged` ones (an unfinished or rejected rebuild's)."""
        gen = self.generation()
        low = gen if below is None else min(below, gen)
        wb = rd.WriteBatch(raw_mode=True)
        for cf in MODEL_CFS:
            h = self.h[cf]
            if older and low > 0:
                wb.delete_range(_BE32.pack(0), _BE32.pack(low), h)
            if staged:
                wb.delete_range(_BE32.pack(gen + 1), b"\xff" * 8, h)
        self._write(wb)

    @property
    def is_new(self) -> bool:
        return self._meta(b"config") is None

    def stored_config(self) -> ModelConfig | None:
        raw = self._meta(b"config")
        return None if raw is None else ModelConfig.model_validate_json(raw)

    def model_version(self) -> int:
        return self._meta_int(b"model_version")

    def events_applied(self) -> int:
        raw = self._meta(b"counters")
        return 0 if raw is None else int(np.frombuffer(raw, np.int64)[0])

    def offsets(self) -> dict[tuple[str, int], int]:
        """Next offset to consume per (topic, partition), as of the last commit."""
        out: dict[tuple[str, int], int] = {}
        for k, v in self.cf["offsets"].items():
            topic, _, part = k.decode().rpartition("/")
            out[(topic, int(part))] = _I64.unpack(v)[0]
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
        if stored.structural() != config.structural():
            raise ConfigMismatchError(
                f"the store at {self.path} was built with {stored.structural()} but the settings "
                f"ask for {config.structural()}; use the stored values, or a new --state-dir to "
                "start a fresh model"
            )
        return config

    def _load_table(self, kind: str, config: ModelConfig) -> EntityTable:
        n = self._meta_int(f"n_{kind}s".encode())
        table = EntityTable(kind, config.dim, config.seed, config.init_scale, capacity=max(n, 1024))
        ids = [v.decode() for v in self.cf[f"{kind}_index"].values()]
        if len(ids) < n:
            raise StoreError(f"{self.path}: {kind} id map holds {len(ids)} ids, meta says {n}")
        table.add(ids[:n], init=False)
        _fill_rows(table.factors[:n], self._model_blocks(f"{kind}_factors"))
        for k, v in self.cf[f"{kind}_meta"].items():
            _read_meta_block(table, _BE32.unpack(k)[0] * BLOCK_ROWS, v)
        if kind == "item":
            _fill_rows(table.bias[:n], self._model_blocks("item_bias"))
        return table

    def load(self, config: ModelConfig | None = None) -> ModelState:
        """The whole state; a new store yields an empty model with `config`."""
        config = self._check_config(config)
        if self.is_new:
            return ModelState.empty(config)
        rows = self._meta_int(b"block_rows", BLOCK_ROWS)
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
        raw = self._meta(b"counters")
        if raw is not None:
            state.counters[:] = np.frombuffer(raw, np.int64)[:N_COUNTERS]
        state.clock[0] = _F64.unpack(self._meta(b"clock") or _F64.pack(0.0))[0]
        cdf = self._meta(b"cdf")
        if cdf is not None:
            arr = np.frombuffer(cdf, np.float64).reshape(3, -1)
            state.cdf[:, : arr.shape[1]] = arr
        state.model_version = self.model_version()
        keys, vals = self._all_confidence()
        fill_confidence(state.confidence, keys, vals)
        return state

    def _all_confidence(self) -> tuple[np.ndarray, np.ndarray]:
        ks: list[bytes] = []
        vs: list[bytes] = []
        for k, v in self.cf["confidence"].items():
            ks.append(k)
            vs.append(v)
        keys = np.frombuffer(b"".join(ks), ">i8").astype(np.int64)
        return keys, np.frombuffer(b"".join(vs), "<f8").copy()

    def user_items(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        """Items a user interacted with and their log-confidences (a prefix scan)."""
        prefix = _BE32.pack(user)
        it = self.cf["confidence"].iter()
        it.seek(prefix)
        items: list[int] = []
        vals: list[float] = []
        while it.valid():
            k = it.key()
            if k[:4] != prefix:
                break
            items.append(_BE32.unpack(k[4:])[0])
            vals.append(_F64.unpack(it.value())[0])
            it.next()
        return np.asarray(items, np.int32), np.asarray(vals, np.float64)

    # ---- piecewise reads (query side) ----------------------------------------------------------

    def clock(self) -> float:
        raw = self._meta(b"clock")
        return 0.0 if raw is None else _F64.unpack(raw)[0]

    def counts(self) -> tuple[int, int]:
        return self._meta_int(b"n_users"), self._meta_int(b"n_items")

    def item_ids(self, known: list[str]) -> list[str]:
        """`known` extended with ids registered since (ids never change once given)."""
        n_items = self.counts()[1]
        if len(known) >= n_items:
            return known[:n_items]
        out = list(known)
        it = self.cf["item_index"].iter()
        it.seek(_BE32.pack(len(known)))
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
        _fill_rows(factors, self._model_blocks("item_factors", gen))
        _fill_rows(bias, self._model_blocks("item_bias", gen))
        # meta blocks are columns of count, last and logpop (8 bytes a row each): logpop is the
        # third third of each block
        meta = ((_BE32.unpack(k)[0], v) for k, v in self.cf["item_meta"].items())
        _fill_rows(logpop, meta, columns=3, column=2)
        return factors, bias, logpop

    def user_row(
        self, user_id: str, dim: int, generation: int | None = None
    ) -> tuple[int, np.ndarray, int] | None:
        """(index, vector, events) of a user, or None if the store has not seen it (or holds no
        row of it in `generation`, the current one by default)."""
        raw = self.cf["user_ids"].get(user_id.encode())
        if raw is None:
            return None
        u = _I32.unpack(raw)[0]
        b, r = divmod(u, BLOCK_ROWS)
        gen = self.generation() if generation is None else generation
        fb = self.cf["user_factors"].get(_model_key(gen, b))
        mb = self.cf["user_meta"].get(_BE32.pack(b))
        # a user registered after `generation` was replaced has no row in it (its block there
        # is missing, or shorter than the user's row)
        if fb is None or mb is None or len(fb) < (r + 1) * dim * 4 or len(mb) < (r + 1) * 24:
            return None
        vec = np.frombuffer(fb, np.float32).reshape(-1, dim)[r].copy()
        count = int(np.frombuffer(mb, np.int64, 1, r * 8)[0])
        return u, vec, count

    # ---- commit -----------------------------------------------------------------------------

    def commit(
        self,
        state: ModelState,
        delta: BatchDelta | None,
        offsets: Mapping[tuple[str, int], int] | None = None,
        *,
        everything: bool = False,
        event_times: np.ndarray | None = None,
        generation: int | None = None,
        extra_users: np.ndarray | None = None,
        extra_items: np.ndarray | None = None,
        unfinished: bool = False,
    ) -> None:
        """Persist one batch: every changed row, the counters and the next offsets, atomically.

        `everything=True` writes every row (first save, or after a rebuild replaced the model).
        A commit that sets `generation` also records whether that rebuild still has rows to
        re-solve after it (`unfinished`, the flip of a deferred swap) or is complete.
        """
        if self.secondary:
            raise StoreError("a secondary (read-only) store cannot commit")
        wb = rd.WriteBatch(raw_mode=True)
        meta = self.h["meta"]
        gen = self.generation() if generation is None else generation
        written: dict[str, np.ndarray] = {}
        if generation is not None:
            wb.put(b"generation", _I64.pack(generation), meta)
            wb.put(b"rebuilt_at", _F64.pack(time.time()), meta)
            if unfinished:
                wb.put(b"rebuild_unfinished", _I64.pack(generation), meta)
            else:
                wb.delete(b"rebuild_unfinished", meta)
        if self.is_new or everything:
            wb.put(b"format", FORMAT, meta)
            wb.put(b"block_rows", _I64.pack(BLOCK_ROWS), meta)
            wb.put(b"config", state.config.model_dump_json().encode(), meta)
        for kind, table in (("user", state.users), ("item", state.items)):
            if everything or delta is None:
                lo, hi = 0, table.n
                rows = np.arange(table.n, dtype=np.int64)
            else:
                lo, hi = delta.new_users if kind == "user" else delta.new_items
                rows = delta.users if kind == "user" else delta.items
                extra = extra_users if kind == "user" else extra_items
                if extra is not None and extra.size:
                    rows = np.concatenate([rows.astype(np.int64), extra.astype(np.int64)])
            self._put_ids(wb, kind, table, lo, hi)
            self._put_blocks(wb, kind, table, rows, gen)
            new = np.arange(lo, hi, dtype=np.int64)
            written[kind] = np.concatenate([rows.astype(np.int64), new]) if new.size else rows
        if everything or delta is None:
            keys, vals = confidence_items(state.confidence)
        else:
            keys, vals = delta.pair_keys, delta.pair_values
        self._put_pairs(wb, keys, vals)
        wb.put(b"counters", state.counters.tobytes(), meta)
        wb.put(b"clock", _F64.pack(float(state.clock[0])), meta)
        wb.put(b"n_users", _I64.pack(state.users.n), meta)
        wb.put(b"n_items", _I64.pack(state.items.n), meta)
        wb.put(b"model_version", _I64.pack(state.model_version), meta)
        if everything or delta is None or delta.sampler_rebuilt:
            n_cdf = int(state.counters[CDF_LEN])
            wb.put(b"cdf", np.ascontiguousarray(state.cdf[:, :n_cdf]).tobytes(), meta)
        for (topic, part), nxt in (offsets or {}).items():
            wb.put(offset_key(topic, part), _I64.pack(nxt), self.h["offsets"])
        if event_times is not None and event_times.size:
            self._put_batch_log(wb, event_times)
        seq = self.commits() + 1
        wb.put(b"commits", _I64.pack(seq), meta)
        self._write(wb)
        if self.on_commit is not None:
            self.on_commit(
                CommitInfo(
                    state=state, seq=seq, users=written["user"], items=written["item"],
                    pair_keys=keys, everything=everything or delta is None,
                    generation=generation, offsets=dict(offsets or {}), event_times=event_times,
                    events=0 if delta is None else delta.events,
                )
            )  # fmt: skip

    def commits(self) -> int:
        """Durable commits so far (a model log marker carries the count it stands for)."""
        return self._meta_int(b"commits")

    def _write(self, wb: rd.WriteBatch) -> None:
        try:
            self.db.write(wb, self.write_opt)
        except Exception as exc:  # rocksdict raises bare Exception
            raise StoreError(f"writing to the model store at {self.path} failed: {exc}") from exc

    def _put_batch_log(self, wb: rd.WriteBatch, times: np.ndarray) -> None:
        """A sample of the batch's event times, so readers can tell how fresh what they serve is."""
        seq = self._meta_int(b"commit_seq") + 1
        sample = times
        if times.size > BATCH_LOG_SAMPLE:
            sample = times[np.linspace(0, times.size - 1, BATCH_LOG_SAMPLE).astype(np.int64)]
        meta = self.h["meta"]
        wb.put(b"commit_seq", _I64.pack(seq), meta)
        wb.put(_batch_log_key(seq), _I64.pack(times.size) + sample.astype("<f8").tobytes(), meta)
        if seq % 256 == 0:
            wb.delete_range(_batch_log_key(0), _batch_log_key(seq - BATCH_LOG_KEEP), meta)

    def batch_log(self, after: int) -> tuple[int, list[tuple[int, np.ndarray]]]:
        """(last seq, [(events, sampled event times)]) of commits after `after`."""
        out: list[tuple[int, np.ndarray]] = []
        last = after
        it = self.cf["meta"].iter()
        it.seek(_batch_log_key(after + 1))
        while it.valid():
            k = it.key()
            if not k.startswith(BATCH_LOG_PREFIX):
                break
            last = struct.unpack(">Q", k[len(BATCH_LOG_PREFIX) :])[0]
            v = it.value()
            out.append((_I64.unpack(v[:8])[0], np.frombuffer(v[8:], "<f8")))
            it.next()
        return last, out

    def commit_seq(self) -> int:
        return self._meta_int(b"commit_seq")

    def _put_ids(self, wb: rd.WriteBatch, kind: str, table: EntityTable, lo: int, hi: int) -> None:
        h_ids, h_index = self.h[f"{kind}_ids"], self.h[f"{kind}_index"]
        for k in range(lo, hi):
            key = table.ids[k].encode()
            wb.put(key, _I32.pack(k), h_ids)
            wb.put(_BE32.pack(k), key, h_index)

    def _put_blocks(
        self,
        wb: rd.WriteBatch,
        kind: str,
        table: EntityTable,
        rows: np.ndarray,
        gen: int,
        meta: bool = True,
    ) -> None:
        if rows.size == 0:
            return
        h_f, h_m = self.h[f"{kind}_factors"], self.h[f"{kind}_meta"]
        h_b = self.h["item_bias"] if kind == "item" else None
        n = table.n
        blocks = unique_sorted(rows.astype(np.int64) // BLOCK_ROWS)
        full = blocks[(blocks + 1) * BLOCK_ROWS <= n]  # whole blocks: bytes in one C call each
        put = wb.put
        if full.size:
            keys = _model_keys(gen, full)
            for k, v in zip(keys, _rows_bytes(table.factors, full), strict=True):
                put(k, v, h_f)
            if meta:
                parts = (table.count, table.last, table.logpop)
                raw = np.concatenate([_block_view(a, full) for a in parts], axis=1)
                for k, v in zip(_be32_keys(full), _as_bytes(raw), strict=True):
                    put(k, v, h_m)
            if h_b is not None:
                for k, v in zip(keys, _rows_bytes(table.bias, full), strict=True):
                    put(k, v, h_b)
        for b in blocks[full.size :].tolist():  # the last, partial block
            lo = b * BLOCK_ROWS
            hi = min(lo + BLOCK_ROWS, n)
            key = _model_key(gen, b)
            put(key, table.factors[lo:hi].tobytes(), h_f)
            if meta:
                put(_BE32.pack(b), _meta_bytes(table, lo, hi), h_m)
            if h_b is not None:
                put(key, table.bias[lo:hi].tobytes(), h_b)

    def stage_model(self, kind: str, table: EntityTable, gen: int, blocks: np.ndarray) -> None:
        """Write factor (and bias) blocks of a future generation; invisible until it is flipped."""
        wb = rd.WriteBatch(raw_mode=True)
        rows = blocks.astype(np.int64) * BLOCK_ROWS
        self._put_blocks(wb, kind, table, rows, gen, meta=False)
        self._write(wb)

    def _put_pairs(self, wb: rd.WriteBatch, keys: np.ndarray, vals: np.ndarray) -> None:
        if keys.size == 0:
            return
        h = self.h["confidence"]
        put = wb.put
        # V8 views turn into 8-byte `bytes` in one C call (3x cheaper than slicing a buffer)
        kb = keys.astype(">i8").view("V8").tolist()
        vb = vals.astype("<f8").view("V8").tolist()
        for k, v in zip(kb, vb, strict=True):
            put(k, v, h)

    def write_offsets(self, offsets: Iterable[tuple[tuple[str, int], int]]) -> None:
        wb = rd.WriteBatch(raw_mode=True)
        for (topic, part), nxt in offsets:
            wb.put(offset_key(topic, part), _I64.pack(nxt), self.h["offsets"])
        self._write(wb)


def fill_confidence(conf: object, keys: np.ndarray, vals: np.ndarray) -> None:
    _fill(conf, keys, vals)


def confidence_items(conf: object, sort: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The confidence map's entries; `sort=False` leaves them in map order, for a caller that
    only pays for the copy now (a rebuild's snapshot on the loop thread) and sorts later."""
    n = len(conf)  # type: ignore[arg-type]
    keys = np.empty(n, np.int64)
    vals = np.empty(n, np.float64)
    _dump(conf, keys, vals)
    if not sort:
        return keys, vals
    order = np.argsort(keys)
    return keys[order], vals[order]


def _jit() -> tuple[object, object]:
    from numba import njit

    @njit(cache=True)
    def fill(conf, keys, vals):  # type: ignore[no-untyped-def]
        for j in range(keys.shape[0]):
            conf[keys[j]] = vals[j]

    @njit(cache=True)
    def dump(conf, keys, vals):  # type: ignore[no-untyped-def]
        j = 0
        for k, v in conf.items():
            keys[j] = k
            vals[j] = v
            j += 1  # noqa: SIM113 (numba)

    return fill, dump


_fill, _dump = _jit()
__all__ = ["ConfigMismatchError", "StateStore", "StoreError", "new_confidence_map"]
