"""Stores of earlier formats, written the way those versions wrote them (fixtures for the
migration tests): a store of this version turned back into format 2 (or 1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rocksdict as rd

from stream_mf import pair_chunks
from stream_mf.store import raw_keys
from stream_mf.store_layout import CFS, FORMAT_KEY


def to_legacy(path: Path, fmt: bytes = b"2") -> int:
    """Rewrite the closed store at `path` in format `fmt` (1 or 2): every confidence pair (its
    chunks' and its single ones) a key of its own in `confidence` (be32 user, be32 item -> <f8),
    no `pairs` column family; format 1 also without transitions and last items. Returns the
    pairs written."""
    cfs = {name: rd.Options(raw_mode=True) for name in CFS}
    opt = rd.Options(raw_mode=True)
    db = rd.Rdict(str(path), opt, cfs)
    try:
        vals = list(db.get_column_family("pairs").values())
        keys, conf = pair_chunks.decode(b"".join(vals))
        singles = db.get_column_family("confidence")
        sk = np.frombuffer(b"".join(raw_keys(singles)), ">i8").astype(np.int64)
        sv = np.frombuffer(b"".join(list(singles.values())), "<f8")
        keys, conf = pair_chunks.newest(np.r_[keys, sk], np.r_[conf, sv])
        del singles
        wb = rd.WriteBatch(raw_mode=True)
        h = db.get_column_family_handle("confidence")
        for k, v in zip(keys.astype(">i8").view("V8").tolist(),
                        conf.astype("<f8").view("V8").tolist(), strict=True):  # fmt: skip
            wb.put(k, v, h)
        if fmt == b"1":
            for cf in ("transitions", "user_last"):
                wb.delete_range(b"", b"\xff" * 9, db.get_column_family_handle(cf))
        wb.put(FORMAT_KEY, fmt, db.get_column_family_handle("meta"))
        db.write(wb)
        del h, wb
        db.drop_column_family("pairs")
    finally:
        db.close()
    assert "pairs" not in rd.Rdict.list_cf(str(path))
    return int(np.asarray(keys).size)
