"""The id an error reply carries: whatever of the request's own id can be read, else its
headers or key, so the sender can match the error to what it sent."""

from __future__ import annotations

import pytest

from consumers.query import reply_id
from stream_mf.messages import request_id_in


@pytest.mark.parametrize(
    ("raw", "expect"),
    [
        (b'{"request_id": "r1", "k": -3}', "r1"),  # valid JSON, invalid request
        (b'{"request_id": "r2", "user_id": "Jos\xe9"}', "r2"),  # invalid UTF-8 elsewhere
        (b'{"request_id": "Jos\xe9"}', "Jos\ufffd"),  # ... or in the id itself
        (b'{"request_id": "r\\"3\\u00e9", "k": NaN}', 'r"3\u00e9'),  # escapes, not JSON
        (b'{"kind": "popular", "request_id": "r4", "user_id": "u', "r4"),  # truncated
        (b'{"request_id": 17, "k": 0}', "17"),
        (b'{"request_id": -5, "k": Infinity}', "-5"),
        (b'{"request_id": true}', None),
        (b'{"request_id": ""}', None),
        (b'{"note": "\\"request_id\\": \\"fake\\""}', None),  # only inside another string
        (b'{"note": "\\"request_id\\": \\"fake\\"", "x": NaN}', None),
        (b"[1, 2]", None),
        (b"", None),
        (b"\xff\xfe\x00", None),
        (b'{"request_id": "' + b"x" * 300 + b'"', "x" * 256),  # capped like the model
    ],
)
def test_request_id_in(raw: bytes, expect: str | None) -> None:
    assert request_id_in(raw) == expect


def test_reply_id_falls_back_to_headers_then_key() -> None:
    assert reply_id(b'{"request_id": "body"}', b"key", {"request_id": b"hdr"}) == "body"
    assert reply_id(b"junk", b"key", {"request_id": b"hdr", "correlation_id": b"c"}) == "hdr"
    assert reply_id(b"junk", b"key", {"correlation_id": b"c"}) == "c"
    assert reply_id(b"junk", b"key", {}) == "key"
    assert reply_id(b"junk", b"k\xe9", {}) == "k\ufffd"
    assert reply_id(b"junk", None, {}) == "unknown"
    assert reply_id(b"junk", b"", {"request_id": b""}) == "unknown"
