"""Topic administration: the product's topics and their creation, idempotent from any process."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from consumers.settings import TopicSettings

__all__ = ["admin_client", "create_topics", "product_topics"]

logger = logging.getLogger(__name__)


def admin_client(bootstrap: str, client_config: Mapping[str, Any] | None = None) -> AdminClient:
    """An AdminClient whose librdkafka log goes to :mod:`logging` rather than raw stderr;
    `client_config` carries security settings (TLS, SASL) when the broker needs them."""
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap, **(client_config or {})}
    conf["logger"] = logger
    return AdminClient(conf)


def product_topics(
    partitions: int, topics: TopicSettings | None = None, interactions: int | None = None
) -> dict[str, int]:
    """Name -> partition count of every topic the product uses; `interactions` overrides the
    main topic's count (the demo replays into one partition to keep the stream's order)."""
    t = topics or TopicSettings()
    return {
        t.interactions: interactions or partitions,
        t.dead_letter: 1,
        t.requests: partitions,
        t.responses: partitions,
        t.control: 1,
    }


def create_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    timeout: float = 15.0,
    config: Mapping[str, str] | None = None,
    client_config: Mapping[str, Any] | None = None,
) -> None:
    """Create ``topics`` (name -> partition count) and wait until metadata shows all of them.

    Idempotent, so every process can declare the topics it needs at startup. An existing topic with
    a different partition count raises :class:`ValueError`: key-to-partition mapping (and with it
    per-user order) depends on that count, so silently using another is not safe.
    """
    if not topics:
        return
    admin = admin_client(bootstrap, client_config)
    deadline = time.monotonic() + timeout
    new = [
        NewTopic(name, num_partitions=n, replication_factor=1, config=dict(config or {}))
        for name, n in topics.items()
    ]
    for name, future in admin.create_topics(new, request_timeout=timeout).items():
        try:
            future.result(timeout=max(0.1, deadline - time.monotonic()))
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
            logger.debug("topic %s already exists", name)
    pending = dict(topics)
    while True:
        md = admin.list_topics(timeout=max(0.1, min(2.0, deadline - time.monotonic())))
        for name in list(pending):
            meta = md.topics.get(name)
            if meta is None or meta.error is not None or not meta.partitions:
                continue
            if len(meta.partitions) != pending[name]:
                raise ValueError(
                    f"topic {name!r} has {len(meta.partitions)} partitions, wanted {pending[name]}"
                )
            del pending[name]
        if not pending:
            return
        if time.monotonic() >= deadline:
            missing = sorted(pending)
            raise TimeoutError(f"topics not visible in metadata after {timeout} s: {missing}")
        time.sleep(0.05)
