"""Run the parallel ALS kernels from numba's cache, never from a compile in this process.

Measured (numba 0.68.1, x86-64, `bench`-free: hash of one `_cg_rows` call): a `parallel=True`,
fastmath kernel compiled in the running process gives other float bits than the same kernel
loaded from its cache by a later process; each of the two is reproducible. The single-threaded
kernels (SGD, scoring) give the same bits either way. So the first process after an install (or
after an edit) would rebuild differently from every later one, and a deterministic rebuild
would not be bit-identical across a restart or a restore (docs/architecture.md). The cure is
that every process loads: `warm_all` compiles each kernel once in a child process, which writes
the cache (`consumers.kernel_cache.ensure_cached` starts it when an index file is missing).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stream_mf import als


def _dispatchers() -> dict[str, object]:
    return {
        name: getattr(als, name)
        for name in ("_gram_parts", "_cg_rows", "_cholesky_rows", "_observed_loss")
    }


def cold() -> list[str]:
    """The kernels whose cache index is missing (compiling them here would give the bits of a
    first compile). Empty when numba keeps its cache elsewhere than this reads (then nothing
    can be checked and nothing is started)."""
    out = []
    for name, d in _dispatchers().items():
        try:
            index = Path(d._cache._cache_file._index_path)  # type: ignore[attr-defined]
        except AttributeError:
            return []
        if not index.exists():
            out.append(name)
    return out


def warm_all() -> None:
    """Compile every parallel ALS kernel for the types the product calls it with (float32
    factors, C-contiguous; int64 rows; the CSR's arrays), which writes their caches."""
    rng = np.random.default_rng(0)
    keys = np.arange(6, dtype=np.int64) << 32 | np.arange(6, dtype=np.int64) % 3
    cu, ci = als.confidence_matrix(keys, rng.random(6), 6, 3, 0.0, 0.0, 1.0)
    x = rng.random((6, 4), np.float32)
    y = rng.random((3, 4), np.float32)
    als.als_fit(cu, ci, x, y, 0.1, 1, solver="cg", compute_loss=True)
    als.als_fit(cu, ci, x, y, 0.1, 1, solver="cholesky", compute_loss=True)
    als.solve_rows(cu, x, y, 0.1, np.array([0, 1], np.int64), "cg", 1, als.gramian(y))
    als.solve_rows(cu, x, y, 0.1, None, "cholesky", 1, als.gramian(y))


if __name__ == "__main__":
    warm_all()
