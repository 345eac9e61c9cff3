"""The minimal ACLs a worker needs on a cluster with an authorizer (docs/operations.md, "Security"; tested against
Apache Kafka's StandardAuthorizer in tests/test_integration_security.py)."""

from __future__ import annotations

from streamer.settings import KafkaSettings

# (resource type, pattern type, name, operations)
Acl = tuple[str, str, str, str]


def worker_acls(k: KafkaSettings) -> list[Acl]:
    """What `streamer run` reads and writes, nothing more."""
    acls: list[Acl] = [("topic", "literal", t, "READ,DESCRIBE") for t in k.input_topics]
    acls += [("topic", "literal", k.state_topic, "READ,WRITE,DESCRIBE,DESCRIBE_CONFIGS")]
    acls += [("topic", "literal", t, "WRITE,DESCRIBE") for t in (k.flags_topic, k.dead_letter_topic)]
    # episodes: READ too, each patient's highest seq is read back at assignment (state/changelog.py)
    acls += [("topic", "literal", k.episodes_topic, "READ,WRITE,DESCRIBE")]
    acls += [("group", "literal", k.group_id, "READ,DESCRIBE"),
             # exactly once: one transactional id per input partition, <prefix>-<topic>-<partition>
             ("transactional_id", "prefixed", k.transactional_id_prefix, "WRITE,DESCRIBE")]
    return acls


def kafka_acls_commands(k: KafkaSettings, principal: str, bootstrap: str = "BROKER:9093",
                        config: str = "admin.properties") -> list[str]:
    """The same as `kafka-acls.sh` command lines for a platform team."""
    flag = {"topic": "--topic", "group": "--group", "transactional_id": "--transactional-id"}
    out = []
    for rtype, pattern, name, ops in worker_acls(k):
        op_flags = " ".join(f"--operation {op.title().replace('_', '')}" for op in ops.split(","))
        out.append(f"kafka-acls.sh --bootstrap-server {bootstrap} --command-config {config} --add "
                   f"--allow-principal {principal} {op_flags} {flag[rtype]} {name} --resource-pattern-type {pattern}")
    return out
