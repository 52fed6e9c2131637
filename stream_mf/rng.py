"""Counter-based randomness (SplitMix64) so a replay draws exactly the same numbers.

Every event's random stream is keyed by (seed, partition, offset), never by a generator that carries
state across events: that is what makes state bit-identical however a stream is cut into batches
or restarted after a crash. Each numba function has a pure-Python twin for the reference tests.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S11 = np.uint64(11)
_INV53 = 1.0 / 9007199254740992.0
MASK64 = (1 << 64) - 1

#: Stream tags that keep row initialisation apart from event randomness.
USER_STREAM = 0x5553_4552  # "USER"
ITEM_STREAM = 0x4954_454D  # "ITEM"


@njit(cache=True, inline="always")
def mix64(z: np.uint64) -> np.uint64:
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(cache=True, inline="always")
def stream_seed(seed: int, stream: int, counter: int) -> np.uint64:
    """Seed of the random stream for (seed, stream, counter), e.g. (seed, partition, offset)."""
    s = mix64(np.uint64(seed) ^ mix64(np.uint64(stream) + _GOLDEN))
    return mix64(s ^ np.uint64(counter))


@njit(cache=True, inline="always")
def next_uniform(state: np.uint64) -> tuple[np.uint64, float]:
    """Advance `state`; return it with a uniform double in [0, 1)."""
    state = state + _GOLDEN
    return state, float(mix64(state) >> _S11) * _INV53


@njit(cache=True, nogil=True)
def init_rows(arr: np.ndarray, start: int, stop: int, seed: int, stream: int, scale: float) -> None:
    """Fill rows [start, stop) with uniform(-scale, scale)/sqrt(dim), keyed by row index."""
    dim = arr.shape[1]
    amp = scale / np.sqrt(dim)
    for r in range(start, stop):
        s = stream_seed(seed, stream, r)
        for f in range(dim):
            s, x = next_uniform(s)
            arr[r, f] = (2.0 * x - 1.0) * amp


# ---- pure-Python twins (reference only) ------------------------------------------------------


def py_mix64(z: int) -> int:
    z &= MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def py_stream_seed(seed: int, stream: int, counter: int) -> int:
    s = py_mix64(seed ^ py_mix64(stream + 0x9E3779B97F4A7C15))
    return py_mix64(s ^ counter)


def py_next_uniform(state: int) -> tuple[int, float]:
    state = (state + 0x9E3779B97F4A7C15) & MASK64
    return state, (py_mix64(state) >> 11) * _INV53
