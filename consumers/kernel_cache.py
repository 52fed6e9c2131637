"""Fill numba's cache in a child process before this one calls the parallel ALS kernels.

Why a child: `stream_mf/kernel_cache.py` (a kernel compiled in the running process gives
other float bits than one loaded from the cache, so every process must load)."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

from stream_mf import kernel_cache

log = logging.getLogger(__name__)


def ensure_cached(timeout_s: float = 900.0) -> None:
    """Start `python -m stream_mf.kernel_cache` when a kernel's cache is missing; a failure
    is logged (this process then compiles: correct, only not bit-identical to later ones)."""
    cold = kernel_cache.cold()
    if not cold:
        return
    log.info("compiling %d ALS kernel(s) into numba's cache, once per install: %s",
             len(cold), ", ".join(cold))  # fmt: skip
    t0 = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "stream_mf.kernel_cache"],
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("could not fill numba's cache (%s): compiling in this process", exc)
        return
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:]
        log.warning("filling numba's cache failed (%s): compiling in this process", *tail or ["?"])
        return
    still = kernel_cache.cold()
    if still:  # numba could not write where it reads: every start would compile again
        log.warning("numba's cache was not written for %s (is NUMBA_CACHE_DIR writable?): "
                    "this process compiles them itself", ", ".join(still))  # fmt: skip
        return
    log.info("numba's cache filled in %.1f s", time.monotonic() - t0)
