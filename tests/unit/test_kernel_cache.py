"""Every process runs the parallel ALS kernels from numba's cache (stream_mf/kernel_cache.py):
a process that filled the cache through `ensure_cached` gives the bits of one that loaded it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[2]

FIT = """
import hashlib, numpy as np
from consumers.kernel_cache import ensure_cached
from stream_mf import als
{ensure}
rng = np.random.default_rng(0)
keys = np.unique((rng.integers(0, 800, 20000).astype(np.int64) << 32) | rng.integers(0, 400, 20000))
cu, ci = als.confidence_matrix(keys, rng.random(keys.size), 800, 400, 0.0, 0.0, 10.0)
x = (rng.standard_normal((800, 16)) * 0.1).astype(np.float32)
y = (rng.standard_normal((400, 16)) * 0.1).astype(np.float32)
als.als_fit(cu, ci, x, y, 0.1, 2, compute_loss=False)
print(hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest())
"""


def _fit(cache: Path, ensure: bool) -> str:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    code = FIT.format(ensure="ensure_cached()" if ensure else "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True)
    return out.stdout.decode().strip()


def test_a_first_process_fits_as_later_ones_do(tmp_path: Path) -> None:
    first = _fit(tmp_path, ensure=True)  # an empty cache: filled by a child, then loaded
    assert list(tmp_path.glob("**/*.nbi")), "ensure_cached wrote no cache"
    assert _fit(tmp_path, ensure=False) == first
