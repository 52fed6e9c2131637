"""Decoding raw message payloads into event columns, and naming exactly why a payload is bad.

Per-message pydantic validation is far slower than the rest of the pipeline (DESIGN.md), so a
fast path checks the common, canonical shape by hand and hands everything else to the pydantic
model, which either normalises it (ms timestamps, RFC 3339) or explains the error. The fast path
accepts a strict subset of what the model accepts, with identical results, and the tests check
that on arbitrary input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import orjson
from pydantic import ValidationError

from stream_mf.config import EventTypeSpec
from stream_mf.events import MAX_ID_CHARS, MS_THRESHOLD, InteractionEvent, describe_error

#: Dead-letter reasons: a small fixed set, so they can label a metric.
REASONS = (
    "empty",
    "too_large",
    "malformed_json",
    "not_an_object",
    "missing_field",
    "unknown_event_type",
    "invalid_field",
)
_FIELDS = frozenset({"user_id", "item_id", "event_type", "timestamp", "value", "event_id"})


@dataclass(frozen=True)
class Reject:
    position: int
    reason: str
    message: str


@dataclass
class DecodedEvents:
    """Valid events as columns, with their positions in the input; rejects with reasons."""

    positions: list[int] = field(default_factory=list)
    users: list[str] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)


def _fast_ok(d: dict, types: Mapping[str, EventTypeSpec]) -> bool:
    if not _FIELDS.issuperset(d):
        return False
    u, i, t, ts = d.get("user_id"), d.get("item_id"), d.get("event_type"), d.get("timestamp")
    if type(u) is not str or type(i) is not str or type(t) is not str:
        return False
    if not (0 < len(u) <= MAX_ID_CHARS and 0 < len(i) <= MAX_ID_CHARS) or t not in types:
        return False
    if type(ts) is not float and type(ts) is not int:
        return False
    if not (0.0 <= ts < MS_THRESHOLD):  # also False for NaN
        return False
    v = d.get("value")
    if v is not None and (type(v) not in (float, int) or not math.isfinite(v)):
        return False
    if types[t].use_value and (v is None or v < 0):
        return False
    eid = d.get("event_id")
    return eid is None or (type(eid) is str and 0 < len(eid) <= MAX_ID_CHARS)


def _reason(exc: ValidationError) -> str:
    errs = exc.errors(include_url=False)
    if any(e["type"] == "missing" for e in errs):
        return "missing_field"
    if any(e["loc"] == ("event_type",) and "unknown event_type" in e["msg"] for e in errs):
        return "unknown_event_type"
    return "invalid_field"


def decode_events(
    payloads: Sequence[bytes | None],
    types: Mapping[str, EventTypeSpec],
    max_bytes: int = 64 * 1024,
) -> DecodedEvents:
    """Decode a batch; never raises on input, whatever the bytes."""
    out = DecodedEvents()
    ctx = {"event_types": types}
    for pos, raw in enumerate(payloads):
        if not raw:
            out.rejects.append(Reject(pos, "empty", "the message has no payload"))
            continue
        if len(raw) > max_bytes:
            out.rejects.append(
                Reject(pos, "too_large", f"{len(raw)} bytes; events are limited to {max_bytes}")
            )
            continue
        try:
            d = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            out.rejects.append(Reject(pos, "malformed_json", f"invalid JSON (or not UTF-8): {exc}"))
            continue
        if type(d) is not dict:
            out.rejects.append(
                Reject(pos, "not_an_object", f"expected a JSON object, got {type(d).__name__}")
            )
            continue
        if _fast_ok(d, types):
            u, i, t, ts, v = (
                d["user_id"],
                d["item_id"],
                d["event_type"],
                d["timestamp"],
                d.get("value"),
            )
        else:
            try:
                ev = InteractionEvent.model_validate(d, context=ctx)
            except ValidationError as exc:
                out.rejects.append(Reject(pos, _reason(exc), describe_error(exc)))
                continue
            u, i, t, ts, v = ev.user_id, ev.item_id, ev.event_type, ev.timestamp, ev.value
        spec = types[t]
        w = spec.weight * float(v) if spec.use_value and v is not None else spec.weight
        if not (w > 0 and math.isfinite(w)):
            out.rejects.append(
                Reject(pos, "invalid_field", f"value {v!r} gives event weight {w}; must be > 0")
            )
            continue
        out.positions.append(pos)
        out.users.append(u)
        out.items.append(i)
        out.types.append(t)
        out.weights.append(w)
        out.times.append(float(ts))
    return out
