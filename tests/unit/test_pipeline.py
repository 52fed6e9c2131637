"""The updater's pipeline (docs/architecture.md, *The loop's states*): what the loop does while
a batch's kernel runs on the worker must not change what is learnt or published. Here: model
log records held during a kernel go out in the order they were made, a snapshot's records after
the held ones; a batch decoded in two pieces (the prefetched prefix and the rest) equals the
batch decoded at once, and so does a batch decoded one payload at a time. No broker: the
producer is created but nothing is sent (the end-to-end replays that run the pipeline are
tests/reliability/test_checkpoint_kills.py and test_crash_anywhere.py)."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import orjson

from consumers.model_log import ModelLogPublisher
from consumers.settings import KafkaSettings, MetricsSettings, UpdaterSettings
from consumers.updater import _Decoded, _joined
from stream_mf.config import ModelConfig
from stream_mf.decode import DecodedEvents, decode_events
from stream_mf.store import StateStore

TYPES = ModelConfig().event_types


def test_held_records_go_out_in_order_and_before_a_direct_one(tmp_path: Path) -> None:
    settings = UpdaterSettings(
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9"),  # nothing listens: never used
        metrics=MetricsSettings(port=-1),
        state_dir=tmp_path / "state",
    )
    with StateStore(tmp_path / "state") as store:
        p = ModelLogPublisher(settings, store)
        sent: list[bytes] = []
        p._send = lambda key, *_a: sent.append(key)  # type: ignore[method-assign]
        try:
            p.defer = True
            p._produce(b"u1", b"x")
            p._produce(b"M1", b"y", side=False)
            assert sent == [] and p.held == 2 and p.bytes_since == 6
            p.release()
            assert sent == [b"u1", b"M1"] and p.held == 0
            p._produce(b"u2", b"x")
            with p._direct():  # a snapshot: what was held first, then its own records at once
                p._produce(b"B", b"z")
                assert sent == [b"u1", b"M1", b"u2", b"B"]
            assert p.defer
            p._produce(b"u3", b"x")
            p.release()
            assert sent[-1] == b"u3"
        finally:
            p.defer = False
            p.producer.flush(0)


def _payloads() -> list[bytes | None]:
    good = [
        orjson.dumps(
            {
                "user_id": f"u{j % 7}",
                "item_id": f"i{j % 11}",
                "event_type": "view",
                "timestamp": 1_700_000_000 + j,
            }
        )
        for j in range(40)
    ]
    good[5] = b"{not json"
    good[9] = b""
    good[17] = orjson.dumps({"user_id": "u", "item_id": "i", "event_type": "nope", "timestamp": 1})
    good[23] = orjson.dumps(  # ms timestamp: the model's path, merged in input order
        {"user_id": "u", "item_id": "i", "event_type": "click", "timestamp": 1_700_000_000_000}
    )
    return [*good, None]


def _same(a: DecodedEvents, b: DecodedEvents) -> None:
    assert a.positions == b.positions and a.users == b.users and a.items == b.items
    assert a.types == b.types and a.weights == b.weights and a.times == b.times
    assert a.rejects == b.rejects


def _piece(raw: list[bytes | None], lo: int, hi: int) -> _Decoded:
    return _Decoded(
        list(range(lo, hi)),  # type: ignore[arg-type]  # only concatenated
        np.zeros(hi - lo, np.int32),
        np.arange(lo, hi, dtype=np.int64),
        decode_events(raw[lo:hi], TYPES),
    )


def test_a_batch_decoded_in_pieces_equals_it_decoded_at_once() -> None:
    raw = _payloads()
    whole = decode_events(raw, TYPES)
    for cuts in ((0,), (1,), (6,), (20,), (len(raw),), (6, 23), (1, 5, 9, 17, 23, 30)):
        bounds = [0, *cuts, len(raw)]
        got = _joined([_piece(raw, a, b) for a, b in pairwise(bounds)])
        _same(got.dec, whole)
        assert got.offs.tolist() == list(range(len(raw)))
        assert got.msgs == list(range(len(raw)))


def test_a_batch_decoded_at_once_equals_one_payload_at_a_time() -> None:
    raw = [p for p in _payloads() if p]
    ok = [p for j, p in enumerate(raw) if j not in (5, 16, 22)]  # canonical ones only
    at_once = decode_events(ok, TYPES)
    assert len(at_once.positions) == len(ok)
    one = DecodedEvents()
    for j, p in enumerate(ok):
        d = decode_events([p], TYPES)
        one.positions += [j + q for q in d.positions]
        one.users += d.users
        one.items += d.items
        one.types += d.types
        one.weights += d.weights
        one.times += d.times
    _same(at_once, one)
    # one bad payload anywhere: the loop decides each, as before
    mixed = decode_events(raw, TYPES)
    assert [r.reason for r in mixed.rejects] == ["malformed_json", "unknown_event_type"]
