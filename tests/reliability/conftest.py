"""Reuse the integration fixtures (session broker, per-test `cluster`) for the reliability tests.

`tests/` has no `__init__.py`; the rootdir is on `sys.path` (`pythonpath = ["."]`), so the
integration conftest is importable as the namespace module `tests.integration.conftest`.
"""

from __future__ import annotations

from tests.integration.conftest import Cluster, cluster, kafka, make_topics, topic_env

__all__ = ["Cluster", "cluster", "kafka", "make_topics", "topic_env"]
