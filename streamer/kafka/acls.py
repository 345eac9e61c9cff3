"""The minimal ACLs of each role around the worker (docs/operations.md, "Security"; tested against Apache
Kafka's StandardAuthorizer, with Kafka's own kafka-acls, in tests/integration/test_integration_security.py).

worker   `streamer run`: reads the inputs, writes the outputs, owns its state topic, group and transactions.
gateway  `streamer gateway hl7|sdc`, another monitor gateway or `streamer replay`: writes the inputs, and the
         dead-letter topic (a gateway's message it cannot use that holds patient data); reads the inputs
         (`streamer gateway hl7` resumes each bed's segment from the input's newest records at start, without
         a consumer group), nothing else.
reader   an alarm system or `streamer alerts hl7`: reads flags and episodes, with its own consumer group when it
         uses one.
view     `streamer view` and `streamer watch`: read flags, episodes and (view's ECG strip) the inputs; no group.
"""

from __future__ import annotations

import shlex

from streamer.settings import KafkaSettings

# (resource type, pattern type, name, operations)
Acl = tuple[str, str, str, str]
ROLES = ("worker", "gateway", "reader", "view")


def worker_acls(k: KafkaSettings) -> list[Acl]:
    """What `streamer run` reads and writes, nothing more."""
    acls: list[Acl] = [("topic", "literal", t, "READ,DESCRIBE") for t in k.input_topics]
    acls += [("topic", "literal", k.state_topic, "READ,WRITE,DESCRIBE,DESCRIBE_CONFIGS")]
    acls += [("topic", "literal", k.flags_topic, "WRITE,DESCRIBE")]
    # exactly once the start checks the dead-letter topic takes the largest dead letter (max.message.bytes)
    acls += [("topic", "literal", k.dead_letter_topic, "WRITE,DESCRIBE,DESCRIBE_CONFIGS")]
    # episodes: READ too, each patient's highest seq is read back at assignment (state/changelog.py)
    acls += [("topic", "literal", k.episodes_topic, "READ,WRITE,DESCRIBE")]
    acls += [("group", "literal", k.group_id, "READ,DESCRIBE"),
             # exactly once: one transactional id per input partition, <prefix>-<topic>-<partition>
             ("transactional_id", "prefixed", k.transactional_id_prefix, "WRITE,DESCRIBE")]
    return acls


def role_acls(k: KafkaSettings, role: str, group: str | None = None) -> list[Acl]:
    """The ACLs of `role` (one of ROLES); `group`: a reader's consumer group, if it uses one.
    An idempotent producer (every current client's default) needs no cluster ACL: WRITE on a topic
    implies IDEMPOTENT_WRITE since Kafka 2.8 (KIP-679)."""
    if role == "worker":
        return worker_acls(k)
    if role == "gateway":
        # READ on the inputs: the HL7 gateway's restart resumes segments from their tail (no group: no group ACL)
        return ([("topic", "literal", t, "READ,WRITE,DESCRIBE") for t in k.input_topics]
                + [("topic", "literal", k.dead_letter_topic, "WRITE,DESCRIBE")])
    if role == "reader":
        acls: list[Acl] = [("topic", "literal", t, "READ,DESCRIBE") for t in (k.flags_topic, k.episodes_topic)]
        return acls + ([("group", "literal", group, "READ,DESCRIBE")] if group else [])
    if role == "view":
        return [("topic", "literal", t, "READ,DESCRIBE") for t in (*k.input_topics, k.flags_topic, k.episodes_topic)]
    raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")


_FLAG = {"topic": "--topic", "group": "--group", "transactional_id": "--transactional-id"}


def kafka_acls_commands(k: KafkaSettings, principal: str, bootstrap: str = "BROKER:9093",
                        config: str = "admin.properties", role: str = "worker", group: str | None = None,
                        tool: str = "kafka-acls.sh") -> list[str]:
    """The role's ACLs as `kafka-acls.sh` command lines a platform team runs as printed."""
    out = []
    for rtype, pattern, name, ops in role_acls(k, role, group):
        op_flags = " ".join(f"--operation {op.title().replace('_', '')}" for op in ops.split(","))
        out.append(f"{tool} --bootstrap-server {shlex.quote(bootstrap)} --command-config {shlex.quote(config)} "
                   f"--add --allow-principal {shlex.quote(principal)} {op_flags} {_FLAG[rtype]} {shlex.quote(name)} "
                   f"--resource-pattern-type {pattern}")
    return out


def principal_of(k: KafkaSettings) -> str:
    """The principal these settings authenticate as, where the settings say it (SASL with a user name)."""
    if k.security_protocol.startswith("SASL") and k.sasl_mechanism != "OAUTHBEARER" and k.sasl_username:
        return f"User:{k.sasl_username}"
    return "User:NAME"


def authorization_fix(exc: BaseException, k: KafkaSettings, role: str = "worker") -> str | None:
    """For an error the brokers' authorizer caused (retrying never helps): the command that prints the
    role's grants; None for any other error."""
    if "Authorization" not in repr(exc):
        return None
    principal = principal_of(k)
    return (f"{principal} lacks an ACL the {role} role needs: `streamer acls --role {role} --principal "
            f"{principal}` prints its grants")
