"""Hostile input, property-based: whatever bytes arrive, nothing raises and nothing bad is learnt.

- `decode_events` either decodes a payload into events that satisfy the contract (ids of 1..256
  characters, a known event type, a finite positive weight, a finite timestamp in seconds) or
  rejects it with one of `decode.REASONS`; it never raises.
- The msgspec fast path and the pydantic model agree: every payload the decoder accepts, the
  model accepts with identical normalised values, and vice versa.
- Size limits: payloads over `max_bytes` are `too_large`, ids over 256 characters are rejected.
- Bytes that are not UTF-8, spliced into JSON (mostly inside strings, as a Latin-1 producer
  sends them), are `malformed_json` naming the first bad byte, on both paths; nesting from a
  few levels to far past every parser's limit, alone or in a field, never raises.
- The query service's request parsing raises nothing but `ValidationError` / `JSONDecodeError`,
  and `QueryService.handle` answers every request exactly once without raising.
- Nothing in the product deserialises with pickle, marshal, eval, exec or yaml.load.
- End to end: ~300 hostile payloads mixed into valid events through a real broker and a real
  updater process: every valid event applied, every bad one dead-lettered, the updater alive.
"""

from __future__ import annotations

import ast
import json
import math
import random
import time
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from consumers import kafka_io
from consumers.metrics import QueryMetrics
from consumers.query import QueryService
from consumers.reply_delay import ReplyDelay
from consumers.settings import KafkaSettings, QuerySettings
from stream_mf.config import DEFAULT_EVENT_TYPES, EventTypeSpec
from stream_mf.decode import REASONS, decode_events, fast_path
from stream_mf.events import MAX_ID_CHARS, InteractionEvent, event_weight
from stream_mf.messages import MAX_K, RecRequest, RecResponse
from tests.integration.conftest import Cluster

ROOT = Path(__file__).resolve().parents[2]
WEIGHTED_TYPES: dict[str, EventTypeSpec] = {
    **DEFAULT_EVENT_TYPES,
    "rating": EventTypeSpec(weight=1.0, use_value=True),
    "dwell": EventTypeSpec(weight=0.25, use_value=True),
}
TYPE_SETS = (DEFAULT_EVENT_TYPES, WEIGHTED_TYPES)
#: reasons that mean "the JSON object was read and the model said no"
MODEL_REASONS = {"missing_field", "unknown_event_type", "invalid_field"}

PROPERTY = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---- strategies ---------------------------------------------------------------------------------

huge_ints = st.integers(min_value=-(2**80), max_value=2**80)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64)
    | huge_ints
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
ids = (
    st.text(max_size=12)
    | st.text(min_size=1, max_size=4).map(lambda s: (s * 300)[: MAX_ID_CHARS + 3])
    | st.sampled_from(["", "u1", "i1", "x" * MAX_ID_CHARS, "x" * (MAX_ID_CHARS + 1), " ", "\x00"])
    | st.integers()
    | huge_ints
    | st.floats()
    | st.booleans()
    | json_values
)
_offsets = st.sampled_from(
    ["Z", "z", "+00:00", "-00:00", "+01:00", "-05:30", "+14:00", "-23:59", ""]
)
rfc3339_after_epoch = st.builds(
    lambda dt, off, sep: dt.strftime(f"%Y-%m-%d{sep}%H:%M:%S.%f") + off,
    st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9998, 12, 30)),
    _offsets,
    st.sampled_from(["T", " ", "t"]),
)
timestamps = (
    st.floats(allow_nan=True, allow_infinity=True)
    | st.floats(min_value=0, max_value=2e9)
    | st.integers(min_value=0, max_value=10**11)  # epoch seconds
    | st.integers(min_value=10**11, max_value=2 * 10**14)  # epoch ms, and past the ms limit
    | st.integers(max_value=0)
    | huge_ints
    | st.booleans()
    | rfc3339_after_epoch
    | st.from_regex(r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]{0,12}(Z|[+-][0-9]{2}:?[0-9]{2})?\Z")
    | st.sampled_from(["", "now", "yesterday", "1700000000", "NaN", "2023-11-14T22:13:20"])
    | json_values
)
values = (
    st.none()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.integers()
    | huge_ints
    | st.booleans()
    | st.text(max_size=5)
    | json_values
)
_REQUIRED = ("user_id", "item_id", "event_type", "timestamp")
good_ids = st.text(min_size=1, max_size=MAX_ID_CHARS)
good_timestamps = (
    st.floats(min_value=0, max_value=2e9)
    | st.integers(min_value=0, max_value=10**11 - 1)
    | st.integers(min_value=10**11, max_value=10**14 - 1)
    | rfc3339_after_epoch.filter(lambda s: s[-1] in "Zz0")  # with an offset
)
good_values = st.none() | st.floats(min_value=0, max_value=1e6) | st.integers(0, 10**6)


@st.composite
def event_dicts(draw: st.DrawFn, types: Mapping[str, EventTypeSpec]) -> dict[str, Any]:
    """Event-shaped objects: each field valid three times in four, else anything hostile."""

    def pick(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> Any:
        return draw(good if draw(st.integers(0, 3)) else bad)

    d: dict[str, Any] = {
        "user_id": pick(good_ids, ids),
        "item_id": pick(good_ids, ids),
        "event_type": pick(
            st.sampled_from(list(types)),
            st.sampled_from(["teleport", "", "VIEW", "view ", "x" * 65]) | json_values,
        ),
        "timestamp": pick(good_timestamps, timestamps),
    }
    if draw(st.booleans()):
        d["value"] = pick(good_values, values)
    if draw(st.booleans()):
        d["event_id"] = pick(good_ids, ids)
    if draw(st.integers(0, 4)) == 0:
        for key in draw(st.lists(st.sampled_from(_REQUIRED), min_size=1, max_size=2, unique=True)):
            del d[key]
    if draw(st.integers(0, 9)) == 0:
        d[draw(st.text(max_size=8))] = draw(json_values)
    return d


def _dump(value: Any, ascii_only: bool) -> bytes:
    """JSON text, including what orjson would refuse to write: NaN, Infinity, > 64-bit ints."""
    return json.dumps(value, allow_nan=True, ensure_ascii=ascii_only).encode()


#: byte sequences that are not UTF-8: Latin-1 and cp1252 letters, stray continuation and lead
#: bytes, a torn sequence, overlong forms, an encoded surrogate, past U+10FFFF, a BOM's half
NOT_UTF8 = st.sampled_from(
    [
        b"\xe9",
        b"\x80",
        b"\xbf",
        b"\xc3",
        b"\xe2\x82",
        b"\xc0\xaf",
        b"\xe0\x80\xaf",
        b"\xed\xa0\x80",
        b"\xf4\x90\x80\x80",
        b"\xf8\x88\x80\x80\x80",
        b"\xfe",
        b"\xff",
    ]
)


@st.composite
def not_utf8_inside(draw: st.DrawFn, raw: bytes) -> bytes:
    """`raw` with bytes that are not UTF-8 spliced in: inside a string most of the time (after
    an opening quote, where a Latin-1 producer puts its letters), anywhere otherwise."""
    quotes = [j + 1 for j, b in enumerate(raw) if b == 0x22]
    in_string = bool(quotes) and draw(st.integers(0, 3)) != 0  # 3 times in 4
    at = draw(st.sampled_from(quotes) if in_string else st.integers(0, len(raw)))
    bad = b"".join(draw(st.lists(NOT_UTF8, min_size=1, max_size=3)))
    cut = draw(st.integers(0, 2)) if draw(st.booleans()) else 0  # replace rather than insert
    out = raw[:at] + bad + raw[at + cut :]
    # a lead byte can replace another and complete a valid sequence (\xc3 for the \xc2 of
    # \xc2\x80 makes "À"): such a draw is not what this strategy promises
    assume(not _is_utf8(out))
    return out


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@st.composite
def deeply_nested(draw: st.DrawFn, types: Mapping[str, EventTypeSpec]) -> bytes:
    """Nesting from a few levels to far past every parser's limit, alone or in a field."""
    depth = draw(st.integers(1, 3000) | st.integers(1000, 1100))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    inner = opener * depth + draw(st.sampled_from([b"1", b'"x"', b"null", b""])) + closer * depth
    if draw(st.booleans()):
        return inner
    d = draw(event_dicts(types))
    field = draw(st.sampled_from(["user_id", "item_id", "timestamp", "value", "extra"]))
    d[field] = "\x00PLACEHOLDER"
    return _dump(d, True).replace(b'"\\u0000PLACEHOLDER"', inner)


@st.composite
def payloads(draw: st.DrawFn, types: Mapping[str, EventTypeSpec]) -> bytes:
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.binary(max_size=400))
    if kind == 4:
        return draw(deeply_nested(types))
    value = draw(json_values) if kind == 1 else draw(event_dicts(types))
    raw = _dump(value, draw(st.booleans()))
    if kind == 5:  # what a producer that is not UTF-8 sends
        raw = draw(not_utf8_inside(raw))
    if draw(st.integers(0, 7)) == 0:  # torn message
        raw = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    return raw


# ---- the decoder --------------------------------------------------------------------------------


def _model(d: dict[str, Any], types: Mapping[str, EventTypeSpec]) -> InteractionEvent | None:
    try:
        return InteractionEvent.model_validate(d, context={"event_types": types})
    except ValidationError:
        return None


def check_payload(raw: bytes, types: Mapping[str, EventTypeSpec], max_bytes: int) -> None:
    """The whole contract for one payload (decoded alone)."""
    dec = decode_events([raw], types, max_bytes)  # must not raise, whatever the bytes
    assert len(dec.positions) + len(dec.rejects) == 1
    accepted = bool(dec.positions)
    if not accepted:
        (rej,) = dec.rejects
        assert rej.position == 0 and rej.reason in REASONS and rej.message
    else:
        u, i, t, w, ts = dec.users[0], dec.items[0], dec.types[0], dec.weights[0], dec.times[0]
        assert type(u) is str and 1 <= len(u) <= MAX_ID_CHARS
        assert type(i) is str and 1 <= len(i) <= MAX_ID_CHARS
        assert t in types
        assert type(w) is float and math.isfinite(w) and w > 0
        assert type(ts) is float and math.isfinite(ts)
    if not raw or len(raw) > max_bytes:
        assert not accepted and dec.rejects[0].reason == ("empty" if not raw else "too_large")
        return
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as bad:  # rejected, naming the first byte that is not UTF-8
        assert not accepted and dec.rejects[0].reason == "malformed_json"
        assert f"not valid UTF-8 at byte {bad.start} " in dec.rejects[0].message
        return
    try:
        d = orjson.loads(raw)
    except orjson.JSONDecodeError:
        assert not accepted and dec.rejects[0].reason == "malformed_json"
        return
    if type(d) is not dict:
        assert not accepted and dec.rejects[0].reason == "not_an_object"
        return
    if accepted and not isinstance(d["timestamp"], str):
        # numbers: non-negative seconds (RFC 3339 text: see test_rfc3339_before_1970_is_rejected)
        assert dec.times[0] >= 0.0
    # the fast path and the model agree, both ways
    ev = _model(d, types)
    fast = fast_path(raw, types)
    if fast is not None:
        assert ev is not None, f"fast path accepted what the model rejects: {d!r}"
        weight = event_weight(ev.event_type, ev.value, types)
        assert fast == (ev.user_id, ev.item_id, ev.event_type, weight, ev.timestamp)
        assert ev.timestamp == float(d["timestamp"])
    if accepted:
        assert ev is not None, f"decoded what the model rejects: {d!r}"
        assert (dec.users[0], dec.items[0], dec.types[0]) == (ev.user_id, ev.item_id, ev.event_type)
        assert dec.times[0] == ev.timestamp
        assert dec.weights[0] == event_weight(ev.event_type, ev.value, types)
    else:
        reason = dec.rejects[0].reason
        assert reason in MODEL_REASONS
        if ev is not None:  # the model's event is fine but its weight is not
            w = event_weight(ev.event_type, ev.value, types)
            assert reason == "invalid_field" and not (w > 0 and math.isfinite(w)), (d, reason)


def _verdict(raw: bytes, types: Mapping[str, EventTypeSpec]) -> str:
    """For `--hypothesis-show-statistics`: how much of the input reaches each path."""
    dec = decode_events([raw], types)
    if dec.rejects:
        return f"rejected: {dec.rejects[0].reason}"
    return "accepted: fast path" if fast_path(raw, types) else "accepted: model path"


@PROPERTY
@given(data=st.data(), types=st.sampled_from(TYPE_SETS))
def test_any_payload_is_decoded_or_dead_lettered(
    data: st.DataObject, types: Mapping[str, EventTypeSpec]
) -> None:
    raw = data.draw(payloads(types))
    check_payload(raw, types, 64 * 1024)
    event(_verdict(raw, types))


@PROPERTY
@given(raws=st.lists(st.binary(max_size=64) | payloads(DEFAULT_EVENT_TYPES), max_size=20))
def test_a_batch_decodes_like_its_messages_one_by_one(raws: list[bytes]) -> None:
    """Positions and rejects cover the batch exactly; batching changes no verdict."""
    batch: list[bytes | None] = [*raws, None]  # a tombstone too
    dec = decode_events(batch, DEFAULT_EVENT_TYPES)
    assert sorted(dec.positions + [r.position for r in dec.rejects]) == list(range(len(batch)))
    assert dec.rejects[-1].position == len(raws) and dec.rejects[-1].reason == "empty"
    for pos, raw in enumerate(raws):
        one = decode_events([raw], DEFAULT_EVENT_TYPES)
        assert (pos in dec.positions) == bool(one.positions)


@settings(PROPERTY, max_examples=500)
@given(d=event_dicts(WEIGHTED_TYPES), ascii_only=st.booleans())
def test_fast_path_is_a_subset_of_the_model(d: dict[str, Any], ascii_only: bool) -> None:
    raw = _dump(d, ascii_only)
    check_payload(raw, WEIGHTED_TYPES, 64 * 1024)
    event(_verdict(raw, WEIGHTED_TYPES))


@PROPERTY
@given(
    d=event_dicts(WEIGHTED_TYPES),
    ms=st.booleans(),
    data=st.data(),
    max_bytes=st.sampled_from([256, 1024, 64 * 1024]),
)
def test_bytes_that_are_not_utf8_are_dead_lettered_on_both_paths(
    d: dict[str, Any], ms: bool, data: st.DataObject, max_bytes: int
) -> None:
    """An event that would pass, but for bytes that are not UTF-8 somewhere (in a string, mostly):
    msgspec raises UnicodeDecodeError there, not DecodeError, which once stopped the updater.
    `ms` sends it down the model's path (ms timestamps are the model's); small `max_bytes`
    makes some payloads oversized."""
    d = {**_valid(), **d} if data.draw(st.booleans()) else d
    if ms:
        d["timestamp"] = 1_700_000_000_000
    raw = data.draw(not_utf8_inside(_dump(d, data.draw(st.booleans()))))
    check_payload(raw, WEIGHTED_TYPES, max_bytes)
    dec = decode_events([raw, orjson.dumps(_valid())], WEIGHTED_TYPES, max_bytes)
    assert dec.positions == [1] and dec.rejects[0].reason in {"malformed_json", "too_large"}
    assert fast_path(raw, WEIGHTED_TYPES) is None


@settings(PROPERTY, max_examples=100)
@given(types=st.sampled_from(TYPE_SETS), data=st.data())
def test_deep_nesting_never_raises(types: Mapping[str, EventTypeSpec], data: st.DataObject) -> None:
    raw = data.draw(deeply_nested(types))
    check_payload(raw, types, 64 * 1024)
    event(_verdict(raw, types))


def _valid(**change: Any) -> dict[str, Any]:
    return {"user_id": "u1", "item_id": "i1", "event_type": "view", "timestamp": 1.7e9, **change}


@PROPERTY
@given(max_bytes=st.integers(256, 8192), over=st.integers(1, 4096), pad=st.sampled_from(b" \n"))
def test_payloads_over_max_bytes_are_too_large(max_bytes: int, over: int, pad: int) -> None:
    body = orjson.dumps(_valid())
    exact = body + bytes([pad]) * (max_bytes - len(body))  # valid JSON of exactly max_bytes
    assert len(exact) == max_bytes
    dec = decode_events([exact, exact + bytes([pad]) * over], DEFAULT_EVENT_TYPES, max_bytes)
    assert dec.positions == [0]
    assert [(r.position, r.reason) for r in dec.rejects] == [(1, "too_large")]


@PROPERTY
@given(
    field=st.sampled_from(["user_id", "item_id", "event_id"]),
    n=st.integers(MAX_ID_CHARS + 1, 5000),
    char=st.characters(codec="utf-8", exclude_categories=["Cs"]),
    slow=st.booleans(),
)
def test_ids_over_256_chars_are_rejected(field: str, n: int, char: str, slow: bool) -> None:
    # `slow`: an RFC 3339 timestamp sends the event through the pydantic path instead
    ts: Any = "2023-11-14T22:13:20Z" if slow else 1.7e9
    ok = orjson.dumps(_valid(timestamp=ts, **{field: char * MAX_ID_CHARS}))
    bad = orjson.dumps(_valid(timestamp=ts, **{field: char * n}))
    dec = decode_events([ok, bad], DEFAULT_EVENT_TYPES)
    assert dec.positions == [0]
    assert [(r.position, r.reason) for r in dec.rejects] == [(1, "invalid_field")]
    assert field in dec.rejects[0].message


@settings(max_examples=50, deadline=None)
@given(
    dt=st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(1969, 12, 31)),
    off=st.integers(-23 * 60, 23 * 60),
)
def test_rfc3339_before_1970_is_rejected(dt: datetime, off: int) -> None:
    text = dt.replace(tzinfo=timezone(timedelta(minutes=off))).isoformat()
    for raw in (
        orjson.dumps(_valid(timestamp=text)),
        orjson.dumps(_valid(timestamp="1969-12-31T23:59:59Z")),
    ):
        dec = decode_events([raw], DEFAULT_EVENT_TYPES)
        assert not dec.positions and dec.rejects[0].reason == "invalid_field", (text, dec.times)


def test_known_hostile_corners() -> None:
    """Hand-picked cases the strategies might only reach slowly."""
    corners = [
        b"\xef\xbb\xbf" + orjson.dumps(_valid()),  # UTF-8 BOM
        b"\xff\xfe" + orjson.dumps(_valid()).decode().encode("utf-16-le"),
        b"[" * 5000 + b"]" * 5000,  # past orjson's recursion limit
        b'{"a":' * 2000 + b"1" + b"}" * 2000,
        orjson.dumps(_valid(user_id="u\x00", item_id="\u202e")),  # NUL and bidi override: valid
        orjson.dumps(_valid(timestamp=2**63)),
        _dump(_valid(timestamp=2**80), True),
        _dump(_valid(timestamp=float("nan")), True),
        _dump(_valid(value=float("-inf"), event_type="rating"), True),
        _dump(_valid(value=10**400, event_type="rating"), True),
        orjson.dumps(_valid(event_type="rating", value=1e308)),
        orjson.dumps(_valid(event_type="rating", value=-0.0)),
        orjson.dumps(_valid(event_type="rating", value=True)),
        orjson.dumps(_valid(timestamp=True)),
        orjson.dumps(_valid(timestamp="9999-12-31T23:59:59.999999-23:59")),
        orjson.dumps(_valid(timestamp="0001-01-01T00:00:00+23:59")),
        orjson.dumps(_valid(timestamp=" 2023-11-14T22:13:20Z\n")),
        orjson.dumps(_valid(timestamp=99_999_999_999.999)),
        orjson.dumps(_valid(timestamp=100_000_000_000)),
        orjson.dumps(_valid(timestamp=-0.0)),
        orjson.dumps(_valid(event_type="x" * 100_000)),
        orjson.dumps({**_valid(), "user_id": None}),
        b'{"user_id":"u1","user_id":7,"item_id":"i1","event_type":"view","timestamp":1}',
    ]
    for types in TYPE_SETS:
        for raw in corners:
            check_payload(raw, types, 64 * 1024)


# ---- requests -----------------------------------------------------------------------------------

request_ids = st.text(max_size=10) | st.text(min_size=250, max_size=300) | json_values
id_lists = st.lists(ids, max_size=5) | json_values


@st.composite
def request_dicts(draw: st.DrawFn) -> dict[str, Any]:
    d: dict[str, Any] = {"request_id": draw(request_ids)}
    optional: dict[str, st.SearchStrategy[Any]] = {
        "kind": st.sampled_from(
            ["recommend", "similar_items", "recommend_anonymous", "because", "popular", "x"]
        )
        | json_values,
        "user_id": ids,
        "item_id": ids,
        "items": id_lists,
        "k": st.integers(-5, 2 * MAX_K) | huge_ints | st.floats() | json_values,
        "exclude_seen": st.booleans() | json_values,
        "exclude_items": id_lists,
        "candidates": id_lists,
        "sent_at": timestamps,
    }
    for key, strat in optional.items():
        if draw(st.booleans()):
            d[key] = draw(strat)
    if draw(st.integers(0, 9)) == 0:
        d[draw(st.text(max_size=8))] = draw(json_values)
    return d


@st.composite
def request_payloads(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(st.binary(max_size=300))
    return _dump(draw(json_values if kind == 1 else request_dicts()), draw(st.booleans()))


def parse_request(raw: bytes) -> RecRequest:
    """The parse step of `QueryService.handle`."""
    return RecRequest.model_validate(orjson.loads(raw))


@PROPERTY
@given(raw=request_payloads())
def test_request_parsing_raises_only_validation_errors(raw: bytes) -> None:
    try:
        req = parse_request(raw)
    except (ValidationError, orjson.JSONDecodeError):
        return
    assert 1 <= len(req.request_id) <= 256 and 1 <= req.k <= MAX_K
    for ident in (req.user_id, req.item_id, *(req.items or ()), *req.exclude_items):
        assert ident is None or (type(ident) is str and 1 <= len(ident) <= MAX_ID_CHARS)
    assert req.sent_at is None or math.isfinite(req.sent_at)


class _FakeMessage:
    def __init__(self, value: bytes | None, headers: list[tuple[str, bytes]]) -> None:
        self._value, self._headers = value, headers
        self._ts = int(time.time() * 1000)

    def value(self) -> bytes | None:
        return self._value

    def key(self) -> bytes | None:
        return None

    def headers(self) -> list[tuple[str, bytes]]:
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        return 1, self._ts


class _FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes, list[tuple[str, bytes]]]] = []

    def produce(self, topic: str, key: bytes, value: bytes, headers: Any, on_delivery: Any) -> None:
        self.sent.append((topic, key, value, headers))
        on_delivery(None, None)  # acknowledged at once


class _FakeConsumer:
    def __init__(self) -> None:
        self.stored = 0

    def store_offsets(self, message: Any) -> None:
        self.stored += 1


def _bare_query_service() -> tuple[QueryService, _FakeProducer, _FakeConsumer]:
    """The real `handle`, without Kafka clients or a model store (so every reply is an error)."""
    svc = QueryService.__new__(QueryService)
    svc.settings = QuerySettings()
    svc.registry = CollectorRegistry()
    svc.metrics = QueryMetrics(svc.registry)
    svc.follower = None  # type: ignore[assignment]  # no model: handle() answers with errors
    svc.reply_delay = ReplyDelay()
    producer, consumer = _FakeProducer(), _FakeConsumer()
    svc.producer = producer  # type: ignore[assignment]
    svc.consumer = consumer  # type: ignore[assignment]
    return svc, producer, consumer


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=request_payloads() | st.none(),
    reply_to=st.sampled_from([b"", b"replies", b"\xff\xfe"]),
)
def test_query_service_answers_every_request_exactly_once(
    raw: bytes | None, reply_to: bytes
) -> None:
    svc, producer, consumer = _bare_query_service()
    svc.handle(_FakeMessage(raw, [("reply_to", reply_to)]))  # type: ignore[arg-type]
    assert consumer.stored == 1 and len(producer.sent) == 1
    topic, _key, value, headers = producer.sent[0]
    assert topic
    resp = RecResponse.model_validate_json(value)
    assert resp.error and not resp.items  # no model here: every answer is an error, never silence
    assert headers == [("correlation_id", resp.request_id.encode())]


# ---- no unsafe deserialisation ------------------------------------------------------------------

_BANNED_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle"}
_BANNED_CALLS = {"eval", "exec"}
_YAML_UNSAFE = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}


def _unsafe_uses(src: str, name: str) -> list[str]:
    tree = ast.parse(src, name)
    found = []
    for node in ast.walk(tree):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [
                f"{where} import {a.name}"
                for a in node.names
                if a.name.split(".")[0] in _BANNED_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
            _BANNED_MODULES
        ):
            found.append(f"{where} from {node.module} import ...")
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in _BANNED_CALLS:
                found.append(f"{where} {f.id}(...)")
            elif (
                isinstance(f, ast.Name)
                and f.id == "__import__"
                and not (
                    node.args
                    and isinstance(node.args[0], ast.Constant)
                    and node.args[0].value not in _BANNED_MODULES
                )
            ):
                found.append(f"{where} __import__ of a computed or banned module")
            elif isinstance(f, ast.Attribute):
                owner = f.value.id if isinstance(f.value, ast.Name) else ""
                if owner in {"yaml", "ruamel"} and f.attr in _YAML_UNSAFE:
                    found.append(f"{where} {owner}.{f.attr}(...)")
                if owner in _BANNED_MODULES:
                    found.append(f"{where} {owner}.{f.attr}(...)")
                if any(
                    k.arg == "allow_pickle"
                    and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                    for k in node.keywords
                ):
                    found.append(f"{where} {owner}.{f.attr}(allow_pickle=...)")
        elif (
            isinstance(node, ast.Attribute)
            and node.attr in {"loads", "load"}
            and (isinstance(node.value, ast.Name) and node.value.id in _BANNED_MODULES)
        ):
            found.append(f"{where} {node.value.id}.{node.attr}")
    return found


def test_no_unsafe_deserialisation_in_the_product() -> None:
    files = sorted((ROOT / "stream_mf").rglob("*.py")) + sorted((ROOT / "consumers").rglob("*.py"))
    assert len(files) > 20
    found = [hit for f in files for hit in _unsafe_uses(f.read_text(), str(f.relative_to(ROOT)))]
    assert not found, "unsafe deserialisation in the product:\n" + "\n".join(found)


def test_the_unsafe_use_checker_catches_what_it_is_for() -> None:
    src = (
        "import pickle\nfrom marshal import loads\nimport yaml\nyaml.load(x)\neval('1')\n"
        "exec(code)\nnp.load(f, allow_pickle=True)\n__import__(name)\n"
        "yaml.safe_load(x)\nnp.load(f)\n__import__('numpy')\nmodel.eval()\n"
    )
    hits = _unsafe_uses(src, "probe.py")
    lines = sorted(int(h.split(":")[1].split()[0]) for h in hits)
    assert lines == [1, 2, 4, 5, 6, 7, 8], hits  # `import yaml` and safe calls are fine


# ---- the full consumer path ---------------------------------------------------------------------


def _valid_events(rng: random.Random, n: int) -> list[bytes]:
    out = []
    now = time.time()
    for j in range(n):
        doc: dict[str, Any] = {
            "user_id": f"u{rng.randrange(40)}",
            "item_id": f"i{rng.randrange(60)}",
            "event_type": rng.choice(list(DEFAULT_EVENT_TYPES)),
            "timestamp": rng.choice(
                [
                    now - rng.uniform(0, 3600),  # seconds
                    int((now - rng.uniform(0, 3600)) * 1000),  # ms
                    datetime.fromtimestamp(now - rng.uniform(0, 3600), UTC).isoformat(),
                ]
            ),
        }
        if j % 7 == 0:
            doc["event_id"] = f"e{j}"
        if j % 11 == 0:
            doc["value"] = rng.uniform(0, 5)
        out.append(orjson.dumps(doc))
    return out


def _without(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


#: the updater's default bound (a record's timestamp, taken after this, + max_future_seconds)
_LATEST = time.time() + 86_400


def _hostile_events(rng: random.Random, n: int) -> list[bytes | None]:
    """A seeded mix of every way a payload can be bad (each checked bad before use)."""
    base = {"user_id": "u1", "item_id": "i1", "event_type": "view", "timestamp": 1.7e9}
    makers: list[Any] = [
        lambda: None,
        lambda: b"",
        lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) + b"\xff",
        lambda: orjson.dumps(base)[: rng.randrange(1, 60)],
        lambda: b"\xff" + orjson.dumps(base),
        lambda: _dump(rng.choice([[1, 2], "s", 3, None, True, 1.5]), True),
        lambda: orjson.dumps(_without(base, rng.choice(_REQUIRED))),
        lambda: orjson.dumps({**base, "event_type": rng.choice(["teleport", "", "VIEW"])}),
        lambda: orjson.dumps({**base, rng.choice(["user_id", "item_id"]): rng.randrange(10**6)}),
        lambda: orjson.dumps({**base, "user_id": "x" * rng.randrange(257, 20_000)}),
        lambda: orjson.dumps({**base, "item_id": ""}),
        lambda: _dump({**base, "timestamp": rng.choice([float("nan"), float("inf")])}, True),
        lambda: _dump({**base, "timestamp": 2 ** rng.randrange(64, 90)}, True),
        lambda: orjson.dumps({**base, "timestamp": rng.choice([-1, -1e9, 1e15, True, "soon"])}),
        lambda: orjson.dumps({**base, "timestamp": "2023-11-14T22:13:20"}),
        lambda: orjson.dumps({**base, "value": rng.choice(["lots", [1], {}])}),
        lambda: _dump({**base, "value": float("nan")}, True),
        lambda: orjson.dumps({**base, "extra": rng.random()}),
        lambda: b"[" * 3000 + b"]" * 3000,
        lambda: orjson.dumps({**base, "timestamp": rng.choice([4.1e9, 9e10, 4.1e12])}),
        lambda: b'{"pad": "' + b"x" * rng.randrange(70_000, 120_000) + b'"}',
        lambda: orjson.dumps(base).replace(b'"u1"', b'"Jos\xe9"'),  # Latin-1 inside a string
        lambda: orjson.dumps({**base, "timestamp": 1.7e12}).replace(
            b'"i1"', b'"i' + bytes([rng.choice([0x80, 0xC3, 0xFF, 0xED])]) + b'"'
        ),  # the model's path (an ms timestamp), a bad byte in the item id
        lambda: orjson.dumps(base)[:-1] + b',"x":' + b"[" * 2000 + b"]" * 2000 + b"}",
    ]
    out: list[bytes | None] = []
    for j in range(n):
        raw = makers[j % len(makers)]()
        assert not decode_events([raw], DEFAULT_EVENT_TYPES, latest=_LATEST).positions, raw
        out.append(raw)
    return out


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_hostile_payloads_through_a_real_updater(cluster: Cluster) -> None:
    rng = random.Random(20240601)
    good = _valid_events(rng, 500)
    bad = _hostile_events(rng, 300)
    mixed: list[tuple[bytes | None, bytes | None]] = [(b"k", v) for v in good] + [
        (rng.choice([None, b"evil", b"\xff"]), v) for v in bad
    ]
    rng.shuffle(mixed)
    expect = decode_events([v for _, v in mixed], DEFAULT_EVENT_TYPES, latest=_LATEST)
    assert len(expect.positions) == len(good) and len(expect.rejects) == len(bad)
    expect_reasons = Counter(r.reason for r in expect.rejects)
    # every reason decoding gives at least once (`internal` is the updater's own failure)
    assert set(expect_reasons) == set(REASONS) - {"internal"}, expect_reasons

    conf: dict[str, Any] = {"message.max.bytes": 2_000_000}
    producer = kafka_io.producer(KafkaSettings(bootstrap_servers=cluster.kafka), **conf)
    for key, value in mixed:
        producer.produce(cluster.topics.interactions, value=value, key=key)
    assert producer.flush(30) == 0
    updater = cluster.start("updater", "updater", "--max-batch-events", "97")
    cluster.wait_metric("updater", "stream_mf_events_consumed_total", len(mixed), timeout=60)
    cluster.wait_metric("updater", "stream_mf_events_applied_total", len(good), timeout=30)
    time.sleep(0.3)
    assert cluster.metric("updater", "stream_mf_events_applied_total") == len(good)
    assert cluster.metric("updater", "stream_mf_events_dead_lettered_total") == len(bad)
    for reason, count in expect_reasons.items():
        got = cluster.metric(
            "updater", f'stream_mf_events_dead_lettered_total{{reason="{reason}"}}'
        )
        assert got == count, (reason, got, count)
    assert updater.alive(), updater.log_tail()

    # every bad message is on the dead-letter topic, byte for byte, once
    consumer = Consumer(
        {
            "bootstrap.servers": cluster.kafka,
            "group.id": "dlt-reliability",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
        }
    )
    consumer.assign([TopicPartition(cluster.topics.dead_letter, 0, 0)])
    seen: dict[int, tuple[str, bytes]] = {}
    end = time.monotonic() + 30
    try:
        while len(seen) < len(bad) and time.monotonic() < end:
            for m in consumer.consume(200, 0.5):
                if m.error():
                    continue
                h = kafka_io.headers_dict(m.headers())
                off = int(h["original.offset"])
                assert off not in seen, f"offset {off} dead-lettered twice"
                seen[off] = (h["error.reason"].decode(), m.value() or b"")
    finally:
        consumer.close()
    assert sorted(seen) == sorted(r.position for r in expect.rejects)
    for r in expect.rejects:
        assert seen[r.position] == (r.reason, mixed[r.position][1] or b"")
    assert updater.alive(), updater.log_tail()
