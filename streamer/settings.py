"""Settings: defaults < TOML file (configs/) < STREAMER_* environment < explicit overrides.

Nested groups use a double underscore in env vars, e.g. STREAMER_KAFKA__BOOTSTRAP_SERVERS.
The TOML file is chosen with STREAMER_CONFIG (or `--config` on the CLI).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from streamer.errors import SettingsError  # noqa: F401  (raised here; imported from here too)
from streamer.spec import RELEASED_THRESHOLD, WINDOW_S  # noqa: F401  (re-exported)


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a config file fails at start


class KafkaSettings(_Group):
    bootstrap_servers: str = Field("127.0.0.1:9092", description="comma-separated host:port of the brokers")
    client_id: str = Field("streamer", description="prefix of the Kafka client ids (broker logs and quotas)")
    group_id: str = Field("streamer-artifact", description="consumer group: one per deployment; its workers share the "
                                                           "input partitions")
    input_topics: list[str] = Field(["ecg.lead2"], description="topics of monitor chunks, keyed by patient id "
                                                               "(docs/messages.md)")
    input_partitioner: Literal["murmur2", "crc32"] = Field(
        "murmur2", description="how the monitors' producers map a patient id to an input partition: murmur2 is "
        "Kafka's default (Java client; librdkafka partitioner=murmur2_random), crc32 librdkafka's default. A "
        "record on another partition is dead-lettered (wrong_partition): one patient, one owner")
    flags_topic: str = Field("ecg.artifact.flags", description="one flag per window (schemas/artifact-flag.v1)")
    episodes_topic: str = Field("ecg.artifact.episodes", description="artifact episodes and their leases, compacted "
                                                                     "(schemas/artifact-episode.v2)")
    dead_letter_topic: str = Field("ecg.deadletter", description="rejected records with the reason in headers: holds "
                                                                 "ECG and patient ids, restrict and expire it")
    state_topic: str | None = Field(None, description="compacted changelog of per-patient state (internal; as "
                                    "many partitions as the input topics); default <group_id>.state, so two "
                                    "deployments on one cluster never share one")
    input_partitions: int = Field(8, ge=1, description="used when the worker or `broker` creates topics")
    create_topics: bool = Field(False, description="create missing topics at start (demo/tests only)")
    replication_factor: int | None = Field(None, ge=1, description="replicas of the topics the worker creates "
                                           "(create_topics); default: the brokers' default.replication.factor. "
                                           "A 3-broker cluster: 3")
    min_insync_replicas: int | None = Field(None, ge=1, description="min.insync.replicas of the topics the worker "
                                            "creates; default: the brokers' own. With acks=all a write survives "
                                            "the loss of RF - this many brokers. A 3-broker cluster: 2")
    delivery: Literal["auto", "exactly_once", "at_least_once"] = Field(
        "auto", description="exactly_once: one Kafka transaction per checkpoint and input partition (flags, "
        "episodes, dead letters, states, offsets); at_least_once: acknowledged outputs, then the commit "
        "(duplicates with the same window_id after a crash). auto: exactly_once when the brokers run "
        "transactions (a probe at start), else at_least_once; the choice is logged (delivery_mode)")
    transactional_id_prefix: str | None = Field(None, description="transactional ids are <prefix>-<input topic>-"
                                                "<partition>; default: the group id. Every worker of a group must "
                                                "use the same one (fencing rests on it): a partition last committed "
                                                "under another prefix is refused. ACLs: WRITE and DESCRIBE on it")
    previous_transactional_id_prefix: str | None = Field(None, description="only while changing "
                                                         "transactional_id_prefix (every worker stopped first): "
                                                         "partitions last committed under this prefix are "
                                                         "taken, after fencing its ids")
    transactions: Literal["per_partition", "per_worker"] = Field(
        "per_partition", description="exactly_once: per_partition, one transactional producer per input "
        "partition (id <prefix>-<topic>-<partition>; a new owner fences the old one by taking its id); "
        "per_worker, one producer and one transaction per worker (id <prefix>-worker-<worker_id>) whose "
        "offset commits the group coordinator fences by generation (KIP-447, Kafka 2.5+; docs/windows-and-"
        "delivery.md). Switching either way: stop every worker first")
    worker_id: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,100}$", description="transactions = "
                                  "per_worker: this worker's part of its transactional id, stable across its "
                                  "restarts and unique in the group (two live workers with one id fence each "
                                  "other until one fails); default <host name>-<process id> (stable in a "
                                  "container, whose process id is 1)")
    transaction_timeout_ms: int = Field(10000, ge=1000, description="the broker aborts a transaction left open "
                                        "this long (a worker that died with no successor); read_committed "
                                        "readers of its output partitions wait at most this plus the brokers' "
                                        "abort check (transaction.abort.timed.out.transaction.cleanup.interval."
                                        "ms, 10 s by default): well inside the 35 s suppression lease")
    clock_offset_warn_s: float = Field(120.0, gt=0, description="the worker's clock is compared with the "
                                       "timestamps of fresh input records; further apart than this, it logs "
                                       "clock_offset (error) and streamer_clock_offset_seconds shows it. Outputs are "
                                       "stamped with the input's event time, never this clock, so the brokers "
                                       "accept them either way")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="SASL_SSL for a hospital cluster")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = Field(
        None, description="with SASL_*: OAUTHBEARER takes sasl_oauth_token_file, the others a user and password")
    sasl_username: str | None = Field(None, description="PLAIN and SCRAM")
    sasl_password: SecretStr | None = Field(None, description="PLAIN and SCRAM (or sasl_password_file)")
    sasl_password_file: Path | None = Field(None, description="a file holding the password (a mounted secret)")
    sasl_oauth_token_file: Path | None = Field(None, description="OAUTHBEARER: a file holding the current "
                                               "bearer token, read again at every authentication, so the "
                                               "platform or a sidecar can rotate it")
    ssl_cafile: Path | None = Field(None, description="PEM CA bundle that signs the brokers' certificates (else the "
                                                      "system CAs)")
    ssl_certfile: Path | None = Field(None, description="PEM client certificate (mutual TLS)")
    ssl_keyfile: Path | None = Field(None, description="PEM key of ssl_certfile")
    acks: Literal["all", "1"] = Field("all", description="all: a write is acknowledged once every in-sync "
                                      "replica has it (nothing acknowledged is lost with a broker). 1 (leader "
                                      "only) is allowed with delivery=at_least_once alone: a leader failover "
                                      "can then lose acknowledged flags")
    compression_type: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "none", description="compression of what the worker produces (flags are small JSON; zstd or lz4 "
        "save network on large fleets)")
    linger_ms: int = Field(5, ge=0, description="how long the producer waits to fill a batch: adds at most "
                           "this much latency to every flag")
    producer_options: dict[str, Any] = Field({}, description="further aiokafka producer arguments, passed "
                                             "through (e.g. {\"request_timeout_ms\": 60000}); those streamer "
                                             "sets from other settings are refused")
    consumer_options: dict[str, Any] = Field({}, description="further aiokafka consumer arguments, passed "
                                             "through (e.g. {\"rebalance_timeout_ms\": 120000}); those "
                                             "streamer sets from other settings are refused")
    tls_check_timeout_s: float = Field(5.0, gt=0, description="the TLS handshake made with each bootstrap server "
                                       "at start must finish within this (a plaintext port never answers)")
    restore_idle_timeout_s: float = Field(60.0, gt=0, description="a partition's patient states are read back "
                                          "at its assignment for as long as records keep coming; this long "
                                          "without one stops the worker (exit 1, naming the partition)")
    auto_offset_reset: Literal["earliest", "latest"] = Field("earliest", description="where a group without commits "
                                                                                     "starts: earliest loses no window")
    max_poll_records: int = Field(2000, ge=1, description="records per fetch handed to the consume loop")
    fetch_min_bytes: int = Field(65536, ge=1, description="the broker answers a fetch once it has this many "
                                 "bytes... (1: a fetch per record or two under load, which cost a fifth of the "
                                 "worker's CPU at 400 beds)")
    fetch_max_wait_ms: int = Field(50, ge=0, description="...or after this long: fewer, larger fetches cost the "
                                   "broker and the worker less per record, at most this much added latency")
    session_timeout_ms: int = Field(10000, ge=1000, description="a worker silent this long loses its partitions to the "
                                                                "others")
    heartbeat_interval_ms: int = Field(3000, ge=100, description="group heartbeat period (under a third of the session "
                                                                 "timeout)")
    commit_interval_s: float = Field(0.25, gt=0, description="checkpoint period (every owned partition: offsets, "
                                     "states; one a checkpoint for flags took in the last half period waits for "
                                     "the next: at most 1.5 periods); with exactly_once and commit_after_flags "
                                     "off, it also bounds how long a flag stays invisible to read_committed readers")
    commit_after_flags: bool = Field(True, description="exactly_once: commit the partitions a batch's flags went to "
                                     "as soon as they are in their transactions (visible after one commit, not at "
                                     "the next checkpoint period; smaller, more frequent transactions, never two "
                                     "at once)")
    flag_commit_spacing_ms: float = Field(100.0, ge=0, description="exactly_once with commit_after_flags: at least "
                                          "this long between two such commits (more flags per transaction, less "
                                          "CPU per flag; at most this much added latency)")

    @model_validator(mode="after")
    def _derived_names(self) -> "KafkaSettings":
        if self.state_topic is None:
            self.state_topic = f"{self.group_id}.state"
        if self.transactional_id_prefix is None:
            self.transactional_id_prefix = self.group_id
        if self.delivery != "at_least_once" and self.commit_interval_s * 1000 * 4 > self.transaction_timeout_ms:
            raise ValueError("kafka.commit_interval_s must be under a quarter of kafka.transaction_timeout_ms "
                             "with exactly-once delivery (auto may choose it): each checkpoint's transaction must "
                             "commit long before the brokers abort it")
        if self.min_insync_replicas and self.replication_factor and \
                self.min_insync_replicas > self.replication_factor:
            raise ValueError("kafka.min_insync_replicas must not exceed kafka.replication_factor")
        return self

    @model_validator(mode="after")
    def _producer_acks(self) -> "KafkaSettings":
        if self.acks != "all" and self.delivery != "at_least_once":
            raise ValueError(f"kafka.acks={self.acks} needs kafka.delivery=at_least_once (idempotent and "
                             "transactional producers write with acks=all)")
        return self

    @model_validator(mode="after")
    def _sasl_complete(self) -> "KafkaSettings":
        if self.security_protocol.startswith("SASL") and self.sasl_mechanism == "OAUTHBEARER":
            if self.sasl_oauth_token_file is None:
                raise ValueError("kafka.sasl_oauth_token_file is required with sasl_mechanism=OAUTHBEARER")
        elif self.security_protocol.startswith("SASL"):
            if not self.sasl_mechanism or not self.sasl_username:
                raise ValueError(
                    "kafka.sasl_mechanism and kafka.sasl_username are required "
                    f"with security_protocol={self.security_protocol}"
                )
            if self.sasl_password is None and self.sasl_password_file is None:
                raise ValueError("kafka.sasl_password or kafka.sasl_password_file is required for SASL")
        return self

    def password(self) -> str | None:
        if self.sasl_password is not None:
            return self.sasl_password.get_secret_value()
        if self.sasl_password_file is not None:
            return read_secret_file(self.sasl_password_file, "kafka.sasl_password_file")
        return None


class WindowSettings(_Group):
    window_s: float = Field(WINDOW_S, gt=0, description="fixed by the released model; change only for experiments")
    overlap_s: float = Field(0.0, ge=0, description="overlap of consecutive windows (0: the released model's grid)")
    reorder_tolerance_s: float = Field(2.0, ge=0, description="how long a window with holes waits for late chunks")
    max_interpolated_gap_samples: int = Field(5, ge=0, description="longer holes are not filled: the window is "
                                                                   "insufficient_data")
    max_missing_fraction: float = Field(0.05, ge=0, le=1, description="a window missing more of its samples is "
                                                                      "insufficient_data (too_many_missing)")
    max_forward_jump_s: float = Field(300.0, gt=0, description="a record further ahead of its segment is off the "
                                      "timeline: dead-lettered (timestamp_jump) unless new_timeline_chunks follow it; "
                                      "also caps the no_data windows one record can produce")
    new_timeline_chunks: int = Field(4, ge=1, description="consistent records off the timeline (a clock step, a "
                                     "new earlier segment, segment_start_ns dropped) that start a new segment, when "
                                     "they are also at least twice the records that kept to the old timeline meanwhile "
                                     "(repeats not counted); fewer are outliers, dead-lettered without moving the grid")
    provisional_records: int = Field(3, ge=1, description="records a new or reopened stream holds before its "
                                     "timeline is set: the largest group of them that agree (same segment and rate, "
                                     "times within reorder_tolerance_s) sets it, so an outlier first record cannot; "
                                     "1 sets it from the first record")
    max_window_life_s: float = Field(120.0, gt=0, description="an open window still incomplete after this long "
                                     "(its partition flowing: outages do not count) closes its patient's stream: "
                                     "reported truncated, the commit moves on (a monitor clock that crawls)")
    idle_evict_s: float = Field(60.0, gt=0, description="a patient silent this long while its partition keeps flowing "
                                                        "has its open window reported and its buffer freed")
    max_chunk_s: float = Field(10.0, gt=0, description="larger messages are dead-lettered as oversized")
    max_buffer_bytes: int = Field(1 << 30, gt=0, description="total bytes held by open windows, all patients")
    max_patients: int = Field(10_000, ge=1, description="patients this worker holds at once: states and open "
                              "streams, provisional ones included. A record of a further new patient id is "
                              "dead-lettered (too_many_patients) while every bed already streaming keeps "
                              "streaming; idle states are then forgotten early to make room. Size it above the "
                              "beds of the partitions a worker may hold (an id flood costs ~4 KB an id)")
    min_rate_hz: float = Field(50.0, gt=0, description="lowest sample rate accepted")
    max_rate_hz: float = Field(10000.0, gt=0, description="highest sample rate accepted")
    max_clock_skew_s: float = Field(86400.0, gt=0, description="timestamps further in the future are rejected")
    unknown_lead: Literal["dead_letter", "drop"] = Field("dead_letter", description="what happens to chunks of other "
                                                                                    "leads")
    accepted_leads: list[str] = Field(["II", "MLII"], description="lead names scored (the model is trained on lead II)")
    max_abs_mv: float = Field(100.0, gt=0, le=1e30, description="samples beyond +-this many mV (after units and "
                              "gain) cannot be lead-II ECG (e.g. microvolts sent as millivolts): their windows "
                              "are reported insufficient_data, reason implausible_amplitude, never scored")
    min_gain: float = Field(0.01, gt=0, description="smallest plausible |gain| of counts, in counts per mV")
    max_gain: float = Field(1e7, gt=0, description="largest plausible |gain| of counts, in counts per mV")
    rate_tolerance: float = Field(1e-5, ge=0, lt=0.01, description="relative difference of sample rates "
                                  "taken as the same rate (gateways send 500.0 and 500.001, 2e-6 apart, for one "
                                  "stream); 1e-5 drifts under 0.05 samples over a 10 s window")

    @model_validator(mode="after")
    def _overlap_below_window(self) -> "WindowSettings":
        if self.overlap_s >= self.window_s:
            raise ValueError("windows.overlap_s must be smaller than windows.window_s")
        if self.min_gain > self.max_gain:
            raise ValueError("windows.min_gain must not exceed windows.max_gain")
        return self


class ModelSettings(_Group):
    checkpoint: Path | None = Field(None, description="the released .pth state dict. Required by `streamer run` "
                                    "unless allow_demo")
    allow_demo: bool = Field(False, description="with checkpoint unset, score with the bundled SYNTHETIC demo "
                             "model (demo and tests only: it was trained on synthetic signals)")
    expected_sha256: str | None = Field(None, description="refuse any checkpoint with another digest")
    threshold: float = Field(RELEASED_THRESHOLD, ge=0, le=1, description="probability at or above which a window is "
                                                                         "artifact (the released operating point)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="cuda fails at start without CUDA; auto "
                                                                       "takes it when present")
    backend: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto", description="auto: on the CPU, the faster of PyTorch and ONNX Runtime (and its batch size) "
        "measured once per machine and cached; torch elsewhere. onnxruntime: the same network exported, CPU only")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="half precision applies on CUDA only")
    device_batch: int | None = Field(None, ge=1, description="windows per network call; default: measured "
                                     "on the CPU with backend auto (else 16), 256 on CUDA")
    cache_dir: Path | None = Field(None, description="where backend auto keeps its measured choice and the "
                                   "exported ONNX model; default $XDG_CACHE_HOME/streamer/model or "
                                   "~/.cache/streamer/model. Must be this user's and closed to group and others "
                                   "(chmod 700), else start is refused; a stored model is used only after it "
                                   "matches the checkpoint")
    backend_cache: bool = Field(True, description="false: measure at every start, store nothing")
    cpu_threads: int | None = Field(None, ge=1, description="threads for CPU inference (torch and onnxruntime); "
                                    "default: all cores. Set it when other busy processes share the machine")
    cpu_fallback: bool = Field(False, description="after repeated device failures, continue on the CPU")
    inference_stall_s: float = Field(120.0, gt=0, description="/healthz fails (503) while one batch has been in "
                                     "the model longer than this: a hung device or thread gets the worker "
                                     "restarted. Well above the slowest batch (max_batch windows on the CPU)")
    fold_stem: bool = Field(True, description="fold the grayscale-to-RGB copy into the first convolution (same output, "
                                              "less work)")
    channels_last: bool = Field(True, description="NHWC memory layout for the network (faster on most devices)")
    name: str | None = Field(None, description="model name in the model id; derived from the file if unset")


class BatchSettings(_Group):
    max_batch: int = Field(64, ge=1, description="windows per micro-batch at most, and at most one network "
                           "call (model.device_batch): a batch's flags go out together, so on the CPU a larger "
                           "one would only hold the first windows' flags back while the rest are scored")
    max_wait_ms: float = Field(10.0, ge=0, description="an idle model scores a micro-batch once its first window "
                               "waited this long (while the model runs, windows queue up and the next batch takes "
                               "them all: waiting longer only adds latency)")
    max_pending_windows: int = Field(2048, ge=1, description="pause fetching above this many queued windows")


class EpisodeSettings(_Group):
    open_after: int = Field(2, ge=1, description="consecutive flagged windows that open an episode")
    close_after: int = Field(2, ge=1, description="consecutive clean windows that close it")
    stale_after_s: float = Field(60.0, gt=0, description="an open episode with no scored window for this long "
                                 "is closed (reason stale): suppression never stays on by itself")
    lease_s: float = Field(30.0, gt=0, le=600, description="how long an open or renewal message suppresses "
                           "alarms: consumers drop the suppression when it lapses (every worker down, broker down). "
                           "Readers cap every lease at their own maximum (streamer_client: 35 s, max_lease_s): "
                           "raising this above 30 s means raising that in every reader to at least lease_s + "
                           "skew_allowance_s, or their suppressions end early (alarms sound)")
    renew_every_s: float = Field(10.0, gt=0, description="the owner renews each open episode's lease this often "
                                 "(a few times per lease: two renewals may be lost before it lapses)")
    skew_allowance_s: float = Field(5.0, ge=0, le=60, description="clock difference tolerated between a worker and the "
                                    "consumers that read its leases (the clients' default)")

    @model_validator(mode="after")
    def _renew_within_lease(self):
        if self.renew_every_s * 2 > self.lease_s:
            raise ValueError(f"episodes.renew_every_s ({self.renew_every_s}) must be at most half of "
                             f"episodes.lease_s ({self.lease_s}): a single late renewal would lapse the lease")
        return self


class StateSettings(_Group):
    ttl_s: float = Field(86400.0, gt=0, description="a patient whose state has not changed for this long (no "
                         "window reported, no episode message) is forgotten: its state is tombstoned in the state "
                         "topic, so memory and restore time follow the active beds. A bed back later starts "
                         "afresh on its own grid")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STREAMER_",
        env_nested_delimiter="__",
        extra="forbid",
        toml_file=None,
    )

    log_format: Literal["auto", "json", "console"] = Field("auto", description="auto: JSON lines unless stderr is a "
                                                                               "terminal; every library's lines too")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="lowest level logged "
                                                                                        "(aiokafka's records included)")
    patient_id_in_logs: Literal["plain", "hashed", "omit"] = Field(
        "hashed", description="how logs show patient ids: hashed is a keyed HMAC: with patient_id_log_key the same id "
        "gives the same reference across restarts and workers; without one, a random key of this process (consistent "
        "within one run, not linkable across runs; said in a log line at start). plain shows ids in clear. Waveform "
        "samples are never logged")
    patient_id_log_key: SecretStr | None = Field(None, description="HMAC key of hashed patient ids in logs")
    patient_id_log_key_file: Path | None = Field(None, description="...or a file holding it (a mounted secret)")
    shutdown_deadline_s: float = Field(30.0, gt=0, description="on SIGTERM: time to publish what is in flight and "
                                                               "commit before exit 1")
    event_loop: Literal["asyncio", "uvloop"] = Field(
        "asyncio", description="the worker's event loop: asyncio's own, or uvloop's (libuv), for measuring: "
        "uvloop is not installed with streamer (it did not win: benchmarks/RESULTS.md, 2026-12-06); without "
        "it the worker refuses to start")
    metrics_host: str = Field("127.0.0.1", description="address of /metrics, /healthz, /readyz (the images: 0.0.0.0 "
                                                       "inside the container)")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="serve /metrics, /healthz, /readyz")
    kafka: KafkaSettings = KafkaSettings()
    windows: WindowSettings = WindowSettings()
    model: ModelSettings = ModelSettings()
    batching: BatchSettings = BatchSettings()
    episodes: EpisodeSettings = EpisodeSettings()
    state: StateSettings = StateSettings()

    def patient_log_key(self) -> bytes | None:
        if self.patient_id_log_key is not None:
            return self.patient_id_log_key.get_secret_value().encode()
        if self.patient_id_log_key_file is not None:
            return read_secret_file(self.patient_id_log_key_file, "patient_id_log_key_file").encode()
        return None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config = os.environ.get("STREAMER_CONFIG")
        if config:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config)))
        return tuple(sources)


def read_secret_file(path: Path, setting: str) -> str:
    """A secret from a mounted file, stripped of its trailing newline; an unreadable or empty file stops
    with the setting named (never the content)."""
    try:
        secret = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"settings: cannot read {setting} {path}: {getattr(exc, 'strerror', None) or exc}") \
            from None
    if not secret:
        raise SettingsError(f"settings: {setting} {path} is empty")
    return secret


# STREAMER_* variables that are not settings: read by the CLI and the scripts.
TOOL_VARIABLES = {
    "STREAMER_CONFIG": "the TOML settings file",
    "STREAMER_VENV": "the virtual environment of scripts/test and scripts/demo",
    "STREAMER_KAFKA_DIR": "where scripts/kafka keeps its clusters",
    "STREAMER_KAFKA_CACHE": "where scripts/kafka keeps the Apache Kafka distribution",
    "STREAMER_DEMO_OUT": "where scripts/demo writes its logs",
}


def setting_fields(model: type[BaseModel] | None = None, prefix: str = ""):
    """Every setting, nested groups walked: (dotted name, STREAMER_* variable, its pydantic FieldInfo)."""
    for name, field in (model or Settings).model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield from setting_fields(kind, f"{prefix}{name}.")
        else:
            dotted = f"{prefix}{name}"
            yield dotted, "STREAMER_" + dotted.replace(".", "__").upper(), field


def setting_variables() -> dict[str, str]:
    """Every STREAMER_* variable a setting answers to, with its dotted setting name."""
    return {var: dotted for dotted, var, _ in setting_fields()}


def check_environment(environ: dict[str, str] | None = None) -> None:
    """A STREAMER_* variable that no setting reads is a typo that would silently keep a default (the demo
    model, plaintext Kafka): refuse it, naming the nearest valid variable."""
    import difflib

    environ = os.environ if environ is None else environ
    known = {**setting_variables(), **TOOL_VARIABLES}
    # a mapping setting also takes one variable per key: STREAMER_KAFKA__PRODUCER_OPTIONS__<KEY>
    mappings = tuple(f"{var}__" for _, var, field in setting_fields()
                     if getattr(field.annotation, "__origin__", None) is dict)
    for var in sorted(environ):
        upper = var.upper()
        if not upper.startswith("STREAMER_") or upper in known or upper.startswith(mappings):
            continue
        near = difflib.get_close_matches(upper, list(known), n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]}?" if near else "; see docs/settings.md"
        raise SettingsError(f"settings: unknown environment variable {var}{hint}")


def _nearest_field(loc: tuple) -> str | None:
    """For a key no setting has (a TOML typo): the closest name in the same group, dotted."""
    import difflib

    model: type[BaseModel] = Settings
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        inner = getattr(field, "annotation", None) if field is not None else None
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return None
        model = inner
    near = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    return ".".join([*map(str, loc[:-1]), near[0]]) if near else None


_SECRET_WORDS = ("password", "secret", "key", "token", "credential", "sasl", "ssl")


def _value_may_be_shown(loc: tuple) -> bool:
    """Whether an invalid value at `loc` may be echoed: only for a declared setting (never an unknown key,
    whatever its name: a typo of a secret's name holds the secret) that is not a secret, a secret's file or
    a mapping of client options (those may carry passwords)."""
    model: type[BaseModel] = Settings
    for i, part in enumerate(loc):
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        if field is None or any(word in str(part).lower() for word in _SECRET_WORDS):
            return False
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            model = kind
            continue
        return i == len(loc) - 1 and "SecretStr" not in str(kind) and "dict" not in str(kind)
    return False


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings; `config` (a TOML path) takes the place of STREAMER_CONFIG. Unknown STREAMER_*
    variables are refused (check_environment)."""
    previous = os.environ.get("STREAMER_CONFIG")
    check_environment()
    try:
        if config is not None:
            if not Path(config).is_file():
                raise SettingsError(f"settings: config file not found: {config}")
            os.environ["STREAMER_CONFIG"] = str(config)
        elif previous and not Path(previous).is_file():
            raise SettingsError(f"settings: STREAMER_CONFIG file not found: {previous}")
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "(settings)"
            # the value is shown only for a setting known not to be secret: a mistyped key may hold one
            shown = err["type"] != "extra_forbidden" and _value_may_be_shown(err["loc"])
            line = f"  {name}: {err['msg']} (got {err.get('input')!r})"[:300] if shown else f"  {name}: {err['msg']}"
            if err["type"] == "extra_forbidden" and (near := _nearest_field(err["loc"])):
                line += f"; did you mean {near}?"
            lines.append(line)
        raise SettingsError("invalid settings:\n" + "\n".join(lines)) from None
    finally:
        if config is not None:
            if previous is None:
                os.environ.pop("STREAMER_CONFIG", None)
            else:
                os.environ["STREAMER_CONFIG"] = previous


def settings_to_env(settings: Settings) -> dict[str, str]:
    """The STREAMER_* environment that reproduces `settings` in another process (e.g. `streamer run`)."""
    import json

    env: dict[str, str] = {}

    def put(prefix: str, model: BaseModel) -> None:
        for name in type(model).model_fields:
            value = getattr(model, name)
            key = f"{prefix}{name.upper()}"
            if isinstance(value, BaseModel):
                put(f"{key}__", value)
            elif value is None:
                continue
            elif isinstance(value, SecretStr):
                env[key] = value.get_secret_value()
            elif isinstance(value, bool):
                env[key] = "true" if value else "false"
            elif isinstance(value, list):
                env[key] = json.dumps(value)
            else:
                env[key] = str(value)

    put("STREAMER_", settings)
    return env
