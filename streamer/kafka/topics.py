"""The topics a deployment needs, with the partitions, replication, min ISR, cleanup and retention README's
topic table prescribes: one plan, which `streamer topics` prints as `kafka-topics.sh` commands or creates
with an admin client, and which the worker's own `kafka.create_topics` (demos, tests) creates without the
retention (a replayed recording's old timestamps must not expire while a test reads them)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from streamer.settings import KafkaSettings

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
# Inputs: a restart replays only what is not committed yet, hours are plenty. Flags: as long as a reader may
# lag. Dead letters hold ECG and patient ids: kept only as long as triage needs.
RETENTION_MS = {"input": DAY_MS, "flags": 7 * DAY_MS, "dead_letter": 7 * DAY_MS}


@dataclass(frozen=True)
class TopicSpec:
    name: str
    role: str  # input, flags, episodes, state, dead_letter
    partitions: int
    replication: int
    configs: dict[str, str] = field(default_factory=dict)


def topic_plan(k: KafkaSettings, partitions: int | None = None, replication: int | None = None,
               min_insync_replicas: int | None = None, retention: bool = True) -> list[TopicSpec]:
    """Every topic of the settings. Episodes and state are compacted (the state topic is checked for it at
    start); the others delete by time when `retention`."""
    n = partitions or k.input_partitions
    rf = replication or k.replication_factor or 1
    isr = min_insync_replicas or k.min_insync_replicas
    plain = {"min.insync.replicas": str(isr)} if isr else {}

    def spec(name: str, role: str) -> TopicSpec:
        configs = dict(plain)
        if role in ("episodes", "state"):
            configs["cleanup.policy"] = "compact"
        elif retention:
            configs.update({"cleanup.policy": "delete", "retention.ms": str(RETENTION_MS[role])})
        return TopicSpec(name, role, n, rf, configs)

    return ([spec(t, "input") for t in k.input_topics]
            + [spec(k.flags_topic, "flags"), spec(k.episodes_topic, "episodes"), spec(k.state_topic, "state"),
               spec(k.dead_letter_topic, "dead_letter")])


def kafka_topics_commands(plan: list[TopicSpec], bootstrap: str, config: str | None = "admin.properties",
                          tool: str = "kafka-topics.sh") -> list[str]:
    """The plan as `kafka-topics.sh --create` lines, run as printed (`--if-not-exists`: a rerun is harmless)."""
    out = []
    for t in plan:
        cmd = [tool, "--bootstrap-server", bootstrap, *(["--command-config", config] if config else []),
               "--create", "--if-not-exists", "--topic", t.name, "--partitions", str(t.partitions),
               "--replication-factor", str(t.replication)]
        for key, value in t.configs.items():
            cmd += ["--config", f"{key}={value}"]
        out.append(shlex.join(cmd))
    return out


def compaction_fix(k: KafkaSettings, topic: str, config: str = "admin.properties") -> str:
    """The `kafka-configs.sh` line that makes an existing topic compacted, runnable as printed."""
    return topic_config_fix(k, topic, "cleanup.policy", "compact", config)


def topic_config_fix(k: KafkaSettings, topic: str, name: str, value: str, config: str = "admin.properties") -> str:
    """The `kafka-configs.sh` line that sets one configuration of an existing topic, runnable as printed."""
    return shlex.join(["kafka-configs.sh", "--bootstrap-server", k.bootstrap_servers, "--command-config", config,
                       "--alter", "--entity-type", "topics", "--entity-name", topic,
                       "--add-config", f"{name}={value}"])
