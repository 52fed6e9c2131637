from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from consumers.kernel_cache import ensure_cached
from consumers.local_broker import EmbeddedBroker


def pytest_configure(config: pytest.Config) -> None:
    """Before any worker starts: numba's cache of the ALS kernels, so every test process and
    every service it starts runs the same (cached) kernels; tests compare their results bit for
    bit (stream_mf/kernel_cache.py says why a compile in-process would differ)."""
    if not hasattr(config, "workerinput"):
        ensure_cached()


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
