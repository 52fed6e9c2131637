"""Batch decoding keeps input order whichever path each payload takes."""

from __future__ import annotations

import numpy as np
import orjson

from stream_mf.config import EventTypeSpec, ModelConfig
from stream_mf.decode import decode_events, fast_path

TYPES = ModelConfig().event_types


def _ev(user: str, ts: object, **extra: object) -> bytes:
    return orjson.dumps(
        {"user_id": user, "item_id": "i", "event_type": "view", "timestamp": ts, **extra}
    )


def test_columns_follow_input_order_across_fast_and_model_paths() -> None:
    payloads = [
        _ev("a", 1.7e9),  # fast
        _ev("b", 1_700_000_000_500),  # ms: the model's path
        b"{not json",
        _ev("c", "2023-11-14T22:13:20Z"),  # RFC 3339: the model's path
        None,
        _ev("d", 5),  # fast (an int)
        _ev("e", 1.7e9, value=True),  # a boolean value: the model refuses it
        _ev("f", 1.7e9, value="2.5"),  # a numeric string: the model reads it
    ]
    dec = decode_events(payloads, TYPES)
    assert dec.positions == [0, 1, 3, 5, 7]
    assert dec.users == ["a", "b", "c", "d", "f"]
    assert dec.times == [1.7e9, 1_700_000_000.5, 1_700_000_000.0, 5.0, 1.7e9]
    assert [(r.position, r.reason) for r in dec.rejects] == [
        (2, "malformed_json"),
        (4, "empty"),
        (6, "invalid_field"),
    ]
    assert "not a boolean" in dec.rejects[2].message
    fast = [fast_path(p, TYPES) is not None for p in payloads if p]
    assert fast == [True, False, False, False, True, False, False]


def test_duplicate_keys_take_the_last_value_on_both_paths() -> None:
    raw = b'{"user_id":"x","user_id":"y","item_id":"i","event_type":"view","timestamp":1}'
    assert fast_path(raw, TYPES) is not None
    assert decode_events([raw], TYPES).users == ["y"]
    # an ms timestamp sends the same payload down the model's path: the same verdict
    slow = raw.replace(b'"timestamp":1}', b'"timestamp":1700000000000}')
    assert fast_path(slow, TYPES) is None
    assert decode_events([slow], TYPES).users == ["y"]


def test_weighted_types_multiply_the_value() -> None:
    raw = orjson.dumps(
        {"user_id": "u", "item_id": "i", "event_type": "rating", "timestamp": 1, "value": 4.5}
    )
    types = {**TYPES, "rating": EventTypeSpec(weight=2.0, use_value=True)}
    assert decode_events([raw], types).weights == [9.0]
    assert fast_path(raw, types) == ("u", "i", "rating", 9.0, 1.0)
    neg = orjson.dumps(
        {"user_id": "u", "item_id": "i", "event_type": "rating", "timestamp": 1, "value": -1}
    )
    assert decode_events([neg], types).rejects[0].reason == "invalid_field"
    assert decode_events([raw.replace(b',"value":4.5', b"")], types).rejects[0].reason == (
        "invalid_field"
    )  # a weighted type needs its value


def test_events_from_the_future_are_rejected_with_their_reason() -> None:
    latest = 1.8e9
    payloads = [
        _ev("a", 1.7e9),
        _ev("b", 4.1e9),  # 2099 in seconds: fast path
        b"{not json",  # an earlier-position reject must stay in order with the future ones
        _ev("c", 4_100_000_000_000),  # the same in ms: the model's path
        _ev("d", latest),  # exactly the bound: accepted
        _ev("e", "2099-01-01T00:00:00Z"),
        _ev("f", 1_700_000_000_500),  # a past time in ms, kept from the model's path
    ]
    dec = decode_events(payloads, TYPES, latest=latest)
    assert dec.positions == [0, 4, 6]
    assert dec.users == ["a", "d", "f"] and dec.times == [1.7e9, latest, 1_700_000_000.5]
    assert [(r.position, r.reason) for r in dec.rejects] == [
        (1, "future_timestamp"),
        (2, "malformed_json"),
        (3, "future_timestamp"),
        (5, "future_timestamp"),
    ]
    msg = dec.rejects[0].message
    assert "4100000000.0 s (2099-12-03" in msg and "--max-future-seconds" in msg
    assert decode_events(payloads, TYPES).positions == [0, 1, 3, 4, 5, 6]  # no bound


def test_the_future_bound_can_differ_per_payload() -> None:
    payloads = [_ev("a", 1.7e9), _ev("b", 1.7e9), b"", _ev("c", 1.6e9)]
    bounds = np.array([1.8e9, 1.69e9, 0.0, 1.65e9])  # one per payload, rejects included
    dec = decode_events(payloads, TYPES, latest=bounds)
    assert dec.users == ["a", "c"]
    assert [(r.position, r.reason) for r in dec.rejects] == [(1, "future_timestamp"), (2, "empty")]


_LATIN1 = b'{"user_id":"Jos\xe9","item_id":"i","event_type":"view","timestamp":1}'


def test_invalid_utf8_inside_a_string_is_malformed_json_naming_the_byte() -> None:
    """msgspec raises UnicodeDecodeError (not DecodeError) here: it once stopped the updater."""
    for raw, bad in (
        (_LATIN1, b"\xe9"),  # a Latin-1 "é" inside the user id: the fast path's shape
        (_LATIN1.replace(b'"timestamp":1', b'"timestamp":1700000000000'), b"\xe9"),  # the model's
        (b'{"user_id":"u","item_id":"i","event_type":"view","timestamp":1,"x\xff":1}', b"\xff"),
        (b'{"user_id":"\xed\xa0\x80","item_id":"i","event_type":"view","timestamp":1}', b"\xed"),
        (b"\xc3", b"\xc3"),  # a torn two-byte sequence
    ):
        at = raw.index(bad)
        dec = decode_events([raw, _ev("ok", 1.7e9)], TYPES)
        assert dec.positions == [1] and dec.users == ["ok"]
        (rej,) = dec.rejects
        assert rej.reason == "malformed_json"
        assert f"not valid UTF-8 at byte {at} (0x{raw[at]:02x}" in rej.message, rej.message
        assert fast_path(raw, TYPES) is None


def test_deep_nesting_nan_and_huge_numbers_are_rejected_without_raising() -> None:
    head = b'{"user_id":"u","item_id":"i","event_type":"rating","timestamp":1,"value":'
    payloads = [
        b"[" * 100_000 + b"]" * 100_000,  # past every parser's depth limit
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        head + b"[" * 1023 + b"1" + b"]" * 1023 + b"}",  # just inside orjson's limit
        head + b"[" * 1025 + b"1" + b"]" * 1025 + b"}",  # just past it
        head + b"NaN}",
        head + b"-Infinity}",
        head + b"1e999999}",
        head + b"9" * 100_000 + b"}",
        head.replace(b'"timestamp":1', b'"timestamp":' + b"9" * 5000) + b"1}",
    ]
    dec = decode_events(payloads, TYPES, max_bytes=1 << 20)
    assert dec.positions == []
    assert [r.reason for r in dec.rejects] == [
        "malformed_json",
        "malformed_json",
        "invalid_field",
        "malformed_json",
        "malformed_json",
        "malformed_json",
        "malformed_json",
        "malformed_json",
        "malformed_json",
    ]
    assert "depth" in dec.rejects[0].message
