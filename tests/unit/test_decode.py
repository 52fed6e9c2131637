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
        (2, "malformed_json"), (4, "empty"), (6, "invalid_field")
    ]  # fmt: skip
    assert "not a boolean" in dec.rejects[2].message
    assert [fast_path(p, TYPES) is not None for p in payloads if p] == [
        True, False, False, False, True, False, False
    ]  # fmt: skip


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
        (1, "future_timestamp"), (2, "malformed_json"), (3, "future_timestamp"),
        (5, "future_timestamp"),
    ]  # fmt: skip
    msg = dec.rejects[0].message
    assert "4100000000.0 s (2099-12-03" in msg and "--max-future-seconds" in msg
    assert decode_events(payloads, TYPES).positions == [0, 1, 3, 4, 5, 6]  # no bound


def test_the_future_bound_can_differ_per_payload() -> None:
    payloads = [_ev("a", 1.7e9), _ev("b", 1.7e9), b"", _ev("c", 1.6e9)]
    bounds = np.array([1.8e9, 1.69e9, 0.0, 1.65e9])  # one per payload, rejects included
    dec = decode_events(payloads, TYPES, latest=bounds)
    assert dec.users == ["a", "c"]
    assert [(r.position, r.reason) for r in dec.rejects] == [
        (1, "future_timestamp"), (2, "empty")
    ]  # fmt: skip
