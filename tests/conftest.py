from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from consumers.local_broker import EmbeddedBroker


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    """An embedded broker of the module's own, for tests that pause, stop or fill it (a shared
    one would disturb every other test). It starts in well under a second."""
    b = EmbeddedBroker().start()
    try:
        yield b
    finally:
        if b.is_running() and b.paused:
            b.resume()  # a test failed while the broker was frozen
        b.stop(timeout=1.0)  # Tansu lingers ~5 s on SIGTERM while a client is connected
