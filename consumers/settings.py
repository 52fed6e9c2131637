"""One frozen pydantic-settings object per process, from environment variables and flags.

Environment variables are prefixed `STREAM_MF_` (nested with `__`, e.g.
`STREAM_MF_KAFKA__BOOTSTRAP_SERVERS`); `KAFKA_BOOTSTRAP_SERVERS` is honoured too. Secrets are
`SecretStr`, so they never show in logs, reprs or `/metrics`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from stream_mf.config import ModelConfig, RebuildConfig

#: librdkafka's `compression.type` values. Replies and dead letters default to none: they are
#: small and latency-bound, and kafkajs (the most used Node client) reads LZ4, Snappy or Zstd
#: records only with a codec plugin it does not ship, silently receiving nothing without one.
Compression = Literal["none", "gzip", "snappy", "lz4", "zstd"]


class KafkaSettings(BaseModel):
    """Connection and security settings shared by every Kafka client a process creates."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: Path | None = None
    ssl_certificate_location: Path | None = None
    ssl_key_location: Path | None = None
    ssl_key_password: SecretStr | None = None
    client_id: str = "stream-mf"
    extra: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="further librdkafka properties, passed through (masked when printed: "
        "some are secrets, e.g. ssl.keystore.password)",
    )

    def client_config(self) -> dict[str, Any]:
        """librdkafka properties; the only place secrets are unwrapped."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
            "client.id": self.client_id,
        }
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
        if self.sasl_username is not None:
            conf["sasl.username"] = self.sasl_username
        if self.sasl_password is not None:
            conf["sasl.password"] = self.sasl_password.get_secret_value()
        if self.ssl_ca_location:
            conf["ssl.ca.location"] = str(self.ssl_ca_location)
        if self.ssl_certificate_location:
            conf["ssl.certificate.location"] = str(self.ssl_certificate_location)
        if self.ssl_key_location:
            conf["ssl.key.location"] = str(self.ssl_key_location)
        if self.ssl_key_password is not None:
            conf["ssl.key.password"] = self.ssl_key_password.get_secret_value()
        conf.update({k: v.get_secret_value() for k, v in self.extra.items()})
        return conf


class TopicSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    interactions: str = "interactions"
    dead_letter: str = "interactions.DLT"
    control: str = "stream-mf-control"
    requests: str = "rec-requests"
    responses: str = "rec-responses"
    model: str = "model"
    model_snapshots: str = Field(
        default="",
        description="periodic snapshots of the model log (compacted, 1 partition), off the "
        "topic query processes tail, so its commits never queue behind them; empty: "
        "`<model>-snapshots` (one per model log: two models' rows would share keys)",
    )
    learner: str = Field(
        default="",
        description="learner snapshots (compacted, 1 partition); empty: `<interactions>.learner`, "
        "so a snapshot is only ever found beside the stream its offsets belong to",
    )

    @model_validator(mode="after")
    def _learner_beside_interactions(self) -> TopicSettings:
        if not self.learner:
            object.__setattr__(self, "learner", f"{self.interactions}.learner")
        if not self.model_snapshots:
            object.__setattr__(self, "model_snapshots", f"{self.model}-snapshots")
        return self


class MetricsSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=9464, ge=-1, le=65535, description="0 picks a free port; -1 is off")


class ProcessSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STREAM_MF_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: TopicSettings = Field(default_factory=TopicSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    log_level: str = "INFO"
    no_broker_warning_seconds: float = Field(
        default=10.0,
        gt=0,
        description="say once, in one line, when no Kafka broker has answered this long after "
        "start (the process keeps retrying; librdkafka's own lines are throttled)",
    )


class UpdaterSettings(ProcessSettings):
    """The updater: the single writer of the model store."""

    state_dir: Path = Path("state")
    group_id: str = "stream-mf-updater"
    use_consumer_group: bool = Field(
        default=False,
        description="subscribe through the group protocol instead of assigning every partition",
    )
    max_batch_events: int = Field(
        default=200_000,
        ge=1,
        description="micro-batch bound by count (large batches amortise the RocksDB commit)",
    )
    max_batch_seconds: float = Field(
        default=0.1, gt=0, description="longest wait for a micro-batch to fill (a backlog fills it)"
    )
    batch_linger_seconds: float = Field(
        default=0.02,
        ge=0,
        description="once a micro-batch has its first event, wait at most this long for more "
        "before committing it (a light stream is committed promptly; behind a backlog what is "
        "already fetched is drained whatever this says, so batches still fill up)",
    )
    fetch_wait_ms: int = Field(
        default=20,
        ge=0,
        description="the interactions consumer's fetch.wait.max.ms: Kafka answers a waiting "
        "fetch as soon as data arrives; the embedded broker answers every fetch after this "
        "long and lists the partition's batches for each one behind the end, so a shorter "
        "wait costs it CPU that every process on the host then waits for "
        "(docs/architecture.md, Embedded broker; was 5)",
    )
    pause_gc: bool = Field(
        default=True,
        description="freeze start-up objects and pause the cyclic GC while a micro-batch is read "
        "and applied behind a backlog (the collector's share of wall time ~10% -> ~3%, "
        "consumers/gc_control.py); off: CPython's default",
    )
    max_message_bytes: int = Field(default=64 * 1024, ge=256)
    max_future_seconds: float = Field(
        default=86_400.0,
        ge=0,
        description="dead-letter events timed more than this after their message's Kafka "
        "timestamp, or the updater's clock if earlier (reason future_timestamp): one would move "
        "the stream clock and decay every real event toward zero; inf accepts any time",
    )
    dead_letter_compression: Compression = Field(
        default="none",
        description="compression of dead letters (none: readable by every client without a "
        "codec plugin; they are few and small)",
    )
    dead_letter_timeout_seconds: float = Field(
        default=300.0,
        gt=0,
        description="how long a batch waits for the broker to acknowledge its dead letters "
        "(a broker outage shorter than this is ridden out, shown every 5 s in the log and "
        "errors_total{kind='broker'}); then the updater stops without committing the batch",
    )
    sync_writes: bool = Field(
        default=False, description="fsync every checkpoint and store commit (survives an OS crash)"
    )
    checkpoint_seconds: float = Field(
        default=30.0,
        ge=0,
        description="write the learned state and the next offsets to the model store at least "
        "this often (a checkpoint); a crash replays `interactions` from the last one. 0 with "
        "checkpoint_events 0: every micro-batch, as before checkpoints. A checkpoint holds the "
        "loop for ~0.25-0.5 s at 100k x 50k (every item row: negatives touch them all), so "
        "the interval is what share of live events wait behind one (30 s, Kafka Streams' "
        "commit.interval.ms: ~1%; 10 s put the freshness p99 at 0.25-0.4 s)",
    )
    checkpoint_events: int = Field(
        default=1_000_000,
        ge=0,
        description="... or once this many events were learned since the last checkpoint "
        "(0: no bound by count)",
    )
    on_offset_gap: Literal["fail", "resume-from-start", "resume-from-end"] = Field(
        default="fail",
        description="when the model store's next offset lies outside the partition's log (topic "
        "recreated, broker data lost, events removed by retention): fail (stop, exit 6), "
        "resume-from-start (apply the log from its first record) or resume-from-end (apply "
        "only events published from now on)",
    )
    offset_check_seconds: float = Field(
        default=30.0,
        gt=0,
        description="how often, while running, the stored offsets of the assigned partitions are "
        "checked against their log (a broker restarted without its topics, a recreated topic); "
        "assignment checks at once",
    )
    session_timeout_ms: int = 10_000
    live_eval_rate: float = Field(
        default=0.005, ge=0, le=1, description="share of events scored test-then-learn (0 = off)"
    )
    live_eval_max_per_batch: int = Field(
        default=32, ge=0, description="bounds live scoring's cost on large batches"
    )
    blas_threads: int = Field(
        default=1,
        ge=1,
        description="BLAS threads: live evaluation's and the rebuild guard's products are "
        "small, and a second BLAS thread beside the loop and the learn worker took a 50k x 64 "
        "product from 1.4 ms to 7-12 ms on 2 busy cores (bench/README.md, *The pipeline*)",
    )
    pipeline_min_events: int = Field(
        default=0,
        ge=0,
        description="a batch of at least this many events learns on a worker thread while the "
        "loop fetches and decodes the next one and hands the last commit's model log records "
        "to the producer (the same state, bit for bit); smaller ones learn on the loop's "
        "thread. 0 (the default): never. It needs a free second core, and the GIL-bound work "
        "(decode, id resolution, publishing) limits what it can hide; on 2 shared cores it "
        "measured no faster than without (bench/README.md, *The pipeline*); try 2000",
    )
    model_log_item_seconds: float = Field(
        default=1.0,
        ge=0,
        description="item rows (which sampled negatives touch by the thousand) go to the model "
        "log at most this often: the bound on how stale an item row in the log may be (user "
        "rows and new ids go out with every commit)",
    )
    model_log_item_threshold: float = Field(
        default=0.01,
        ge=0,
        description="an item row changed only a little (its factors by less than this, "
        "relative, and no event counted for it: sampled negatives) waits for a later flush, up "
        "to model_log_item_max_seconds; 0 sends every changed row at every flush",
    )
    model_log_item_max_seconds: float = Field(
        default=10.0,
        ge=0,
        description="the longest an item row's small changes wait before going to the model "
        "log (the staleness bound of such rows; others go out within model_log_item_seconds)",
    )
    model_log_snapshot_ratio: float = Field(
        default=2.0,
        gt=0,
        description="publish a full snapshot once the model log records since the last one "
        "outweigh it this many times (a restarting reader reads at most about 1 + this)",
    )
    model_log_snapshot_min_seconds: float = Field(
        default=60.0,
        ge=0,
        description="the least time between two periodic snapshots (each holds up the updater "
        "for about a second at 100k users x 50k items)",
    )
    model_log_compression: Compression = Field(
        default="none", description="compression of the model log (float rows barely compress)"
    )
    learner_snapshot_seconds: float = Field(
        default=600.0,
        gt=0,
        description="write a learner snapshot (the whole state and its input offsets, on the "
        "learner topic) this often; also after every rebuild swap, on `stream-mf snapshot` and "
        "at a clean stop. A lost disk replays at most this much of `interactions` (README)",
    )
    learner_snapshot_events: int | None = Field(
        default=None, ge=1, description="also write one after this many events applied"
    )
    learner_snapshot_chunk_bytes: int = Field(
        default=512 * 1024,
        ge=1024,
        le=900_000,
        description="bytes per learner snapshot record (under the brokers' 1 MB message limit)",
    )
    learner_snapshot_compression: Compression = Field(
        default="lz4", description="compression of learner snapshot records"
    )
    restore: bool = Field(
        default=True,
        description="on an empty or missing state dir, restore the latest complete learner "
        "snapshot from Kafka and replay `interactions` from its offsets (off: start fresh)",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    rebuild: RebuildConfig = Field(
        default_factory=lambda: RebuildConfig(every_seconds=3600.0),
        description="periodic full ALS rebuilds (also on request: `stream-mf rebuild`)",
    )


class QuerySettings(ProcessSettings):
    """A query process: follows the model log (no state dir), never writes the model."""

    group_id: str = "stream-mf-query"
    min_user_events: int = Field(default=1, ge=0)
    max_message_bytes: int = Field(default=256 * 1024, ge=256)
    default_deadline_ms: int | None = Field(
        default=30_000,
        description="drop requests older than this (ms, by message timestamp) when they carry "
        "no deadline_ms header; a new consumer group starts at the earliest request",
    )
    session_timeout_ms: int = 10_000
    blas_threads: int = Field(default=1, ge=1, description="BLAS threads for scoring")
    fetch_wait_ms: int = Field(default=2, ge=0, description="consumer fetch.wait.max.ms")
    model_log_fetch_wait_ms: int = Field(
        default=20,
        ge=0,
        description="the model-log follower's fetch.wait.max.ms (see the updater's "
        "fetch_wait_ms; was 5)",
    )
    reply_compression: Compression = Field(
        default="none",
        description="compression of replies (none: readable by every client without a codec "
        "plugin; a reply is small and latency-bound)",
    )


class ClientSettings(ProcessSettings):
    """Command-line clients (publish, recommend)."""
