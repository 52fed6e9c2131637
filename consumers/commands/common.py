"""Flags every process shares, and building its settings object from flags over environment."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, TypeVar

from consumers.settings import ProcessSettings

S = TypeVar("S", bound=ProcessSettings)


def add_process_flags(p: argparse.ArgumentParser, state: bool = True, metrics: bool = True) -> None:
    g = p.add_argument_group("process")
    g.add_argument(
        "--bootstrap-servers",
        default=None,
        help="Kafka brokers (env STREAM_MF_KAFKA__BOOTSTRAP_SERVERS or KAFKA_BOOTSTRAP_SERVERS; "
        "default 127.0.0.1:9092)",
    )
    if state:
        g.add_argument("--state-dir", type=Path, default=None, help="model store (default ./state)")
    if metrics:
        g.add_argument("--metrics-host", default=None, help="default 127.0.0.1")
        g.add_argument(
            "--metrics-port", type=int, default=None, help="default 9464; 0 picks one; -1 off"
        )


def build_settings(cls: type[S], args: argparse.Namespace, **more: Any) -> S:
    """Flags override environment variables, which override defaults."""
    init: dict[str, Any] = {}
    kafka: dict[str, Any] = {}
    if getattr(args, "bootstrap_servers", None):
        kafka["bootstrap_servers"] = args.bootstrap_servers
    elif "KAFKA_BOOTSTRAP_SERVERS" in os.environ and not os.environ.get(
        "STREAM_MF_KAFKA__BOOTSTRAP_SERVERS"
    ):
        kafka["bootstrap_servers"] = os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    if kafka:
        init["kafka"] = kafka
    if getattr(args, "state_dir", None) is not None:
        init["state_dir"] = args.state_dir
    metrics: dict[str, Any] = {}
    if getattr(args, "metrics_host", None):
        metrics["host"] = args.metrics_host
    if getattr(args, "metrics_port", None) is not None:
        metrics["port"] = args.metrics_port
    if metrics:
        init["metrics"] = metrics
    init.update({k: v for k, v in more.items() if v is not None})
    return cls(**init)
