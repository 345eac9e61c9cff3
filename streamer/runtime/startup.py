"""What the worker checks and chooses before it joins its group, as functions it calls in order: the
connection (TLS, SASL login), the topics and their partitions, the delivery mode, the state topic. Each
failure is a StartupError with the cause and the fix (exit 1 before anything is consumed)."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from streamer.delivery import (AtLeastOnceDelivery, Delivery, ExactlyOnceDelivery, ExactlyOnceGroupDelivery,
                               probe_transactions)
from streamer.delivery.event_time import EventTime
from streamer.kafka.clients import (TlsError, check_connection, ensure_topics, make_producer, missing_topics,
                                    partition_counts, topic_config)
from streamer.kafka.topics import compaction_fix, topic_config_fix
from streamer.ingest.deadletter import DEAD_LETTER_FRAMING_BYTES, STAND_IN_MAX_BYTES
from streamer.kafka.partitioning import OutputRouting
from streamer.logs import get_logger
from streamer.settings import KafkaSettings

KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588  # a topic's max.message.bytes unless configured

log = get_logger("streamer.worker")


class StartupError(RuntimeError):
    """A condition that must stop the worker before it joins the group (clear message, exit 1)."""


async def preflight(k: KafkaSettings) -> None:
    """TLS handshake and SASL login, before the model load: a wrong CA, host name or password fails in a
    second, not after it."""
    try:
        await check_connection(k)
    except TlsError as exc:
        raise StartupError(str(exc)) from None


async def output_routing(k: KafkaSettings) -> OutputRouting:
    """The topics exist (created with kafka.create_topics), and where each input partition's outputs go."""
    try:
        if k.create_topics:
            await ensure_topics(k)
        else:
            missing = await missing_topics(k)
            if missing:
                raise StartupError(f"topics missing on {k.bootstrap_servers}: {missing} "
                                   "(create them: `streamer topics` prints the commands, or set "
                                   "kafka.create_topics=true; with ACLs, a topic the principal may not DESCRIBE "
                                   "looks missing too)")
        outputs = [k.flags_topic, k.episodes_topic, k.dead_letter_topic]
        return OutputRouting(await partition_counts(k, [*k.input_topics, *outputs]), k.input_partitioner)
    except (KafkaError, asyncio.TimeoutError, OSError) as exc:
        raise StartupError(f"broker unreachable at {k.bootstrap_servers}: {exc!r}") from None


async def choose_delivery(k: KafkaSettings, event_time: EventTime, routing: OutputRouting, on_fenced,
                          on_committed=None, group_member=None,
                          on_fenced_together=None) -> tuple[Delivery, AIOKafkaProducer | None]:
    """exactly_once where the brokers run transactions (a probe), else at_least_once; logged. Returns the
    delivery and, at least once, its one producer (exactly once per_partition: one per partition, opened on
    assignment; per_worker: the delivery's own, started here, refused with one line by brokers without
    KIP-447). The mode is chosen here once: nothing else asks which it is (streamer/delivery's one
    interface). `on_committed(joined_times, at)`: how long flags waited in open transactions for their
    commit. per_worker: `group_member()` reads the consumer's group membership, `on_fenced_together(tps)`
    is told when the worker's transaction is lost with every partition in it."""
    try:
        why_not = None
        if k.delivery != "at_least_once":
            why_not = await probe_transactions(k, lambda tid: make_producer(k, transactional_id=tid))
            if why_not is not None and k.delivery == "exactly_once":
                raise StartupError(f"kafka.delivery = exactly_once but the brokers at {k.bootstrap_servers} "
                                   f"refused a transaction ({why_not}); use at_least_once for brokers without "
                                   "transactions")
        if k.delivery != "at_least_once" and why_not is None:
            problem = await dead_letter_topic_problem(k)
            if problem is not None:
                raise StartupError(problem)
    except KafkaError as exc:
        raise StartupError(f"cannot set up delivery on {k.bootstrap_servers}: {exc!r}") from None
    if k.delivery != "at_least_once" and why_not is None and k.transactions == "per_worker":
        return await _per_worker(k, event_time, routing, group_member, on_fenced_together, on_committed), None
    if k.delivery != "at_least_once" and why_not is None:
        log.info("delivery_mode", mode="exactly_once", transactional_id_prefix=k.transactional_id_prefix,
                 transactions="per_partition")
        return ExactlyOnceDelivery(k, lambda tid: make_producer(k, transactional_id=tid), event_time, routing,
                                    on_fenced=on_fenced, on_committed=on_committed), None
    # idempotence needs InitProducerId, which a broker without transactions may lack as well
    idempotent = k.delivery == "at_least_once" and why_not is None
    if k.delivery == "at_least_once":
        why_not = "kafka.delivery = at_least_once"
    log.info("delivery_mode", mode="at_least_once", reason=why_not, idempotent=idempotent)
    producer = make_producer(k, idempotent=idempotent)
    return AtLeastOnceDelivery(producer, event_time, routing), producer


async def _per_worker(k: KafkaSettings, event_time: EventTime, routing: OutputRouting, group_member,
                      on_fenced_together, on_committed) -> Delivery:
    """kafka.transactions = per_worker: the worker's one transactional producer, started (its id taken)."""
    from streamer.kafka.kip447 import Kip447Producer, Kip447Unsupported

    if group_member is None:
        raise StartupError("kafka.transactions = per_worker needs the consumer's group membership (a bug)")

    def producer(tid: str, kip447: bool) -> AIOKafkaProducer:
        return make_producer(k, transactional_id=tid, producer_class=Kip447Producer if kip447 else AIOKafkaProducer)

    delivery = ExactlyOnceGroupDelivery(k, producer, group_member, event_time, routing,
                                        on_fenced=on_fenced_together, on_committed=on_committed)
    try:
        await delivery.start()
    except Kip447Unsupported as exc:
        raise StartupError(f"kafka.transactions = per_worker: {exc} (use per_partition)") from None
    except KafkaError as exc:
        raise StartupError(f"cannot take the transactional id {delivery.worker_id!r} on {k.bootstrap_servers}: "
                           f"{exc!r}") from None
    log.info("delivery_mode", mode="exactly_once", transactional_id_prefix=k.transactional_id_prefix,
             transactions="per_worker", transactional_id=delivery.worker_id)
    return delivery


async def state_topic_problem(k: KafkaSettings) -> tuple[str | None, int]:
    """At start and on every assignment: input partition p keeps its patients' states in partition p of
    the state topic, which must be compacted (else every state write is kept and restores slow down
    without bound). Returns (why it cannot be used, with the fix, or None; its partitions)."""
    counts = await partition_counts(k, [k.state_topic, *k.input_topics])
    n = counts.get(k.state_topic, 0)
    if not n:
        return f"the state topic {k.state_topic} is missing (create it compacted, as many partitions as the input)", 0
    for topic in k.input_topics:
        if counts.get(topic, 0) > n:
            return (f"{k.state_topic} has {n} partitions but {topic} has {counts[topic]}: the state topic needs "
                    "at least as many (add partitions to it)"), n
    policy = await topic_config(k, k.state_topic, "cleanup.policy")
    if policy is None:
        log.warning("state_topic_policy_unknown", topic=k.state_topic)
    elif "compact" not in policy.split(","):
        return (f"{k.state_topic} has cleanup.policy={policy}; the state changelog must be compacted: "
                f"{compaction_fix(k, k.state_topic)}"), n
    return None, n


async def dead_letter_topic_limit(k: KafkaSettings) -> int | None:
    """The dead-letter topic's max.message.bytes as the brokers describe it, or None (warned) when they do
    not say: unchecked, not refused, so an upgrade never stops a worker whose ACLs predate the check."""
    try:
        value = await topic_config(k, k.dead_letter_topic, "max.message.bytes")
    except (KafkaError, OSError, asyncio.TimeoutError) as exc:
        value, why = None, repr(exc)[:200]
    else:
        why = "not described" if value is None else f"unreadable: {value[:40]!r}"
    if value is None or not value.strip().isdigit():
        log.warning("dead_letter_topic_limit_unknown", topic=k.dead_letter_topic, why=why,
                    effect="dead letters sized to the producer's limit only",
                    hint="no DESCRIBE_CONFIGS on it (streamer acls --role worker), or a broker that does not "
                         "describe topics (the embedded demo broker)")
        return None
    return int(value)


async def dead_letter_topic_problem(k: KafkaSettings) -> str | None:
    """At start, exactly once: the dead-letter topic must take at least a dead letter's small stand-in
    (deadletter.STAND_IN_MAX_BYTES; anything larger than the topic takes goes as one, `DeadLetters.fit_to`).
    There a refused dead letter fails its transaction and stops the worker, and the record is read again on
    every restart: one hostile record would stop its partition's monitoring. (At least once a refused dead
    letter is released with an error.) Returns why the topic cannot be used, with the fix, or None."""
    limit = await dead_letter_topic_limit(k)
    need = STAND_IN_MAX_BYTES + DEAD_LETTER_FRAMING_BYTES
    if limit is None or limit >= need:
        return None
    return (f"{k.dead_letter_topic} has max.message.bytes={limit}, below the {need} bytes even a dead letter's "
            f"small stand-in needs: with exactly-once delivery a refused dead letter stops the worker on every "
            f"restart (give it the input topics' limit, e.g. Kafka's default): "
            f"{topic_config_fix(k, k.dead_letter_topic, 'max.message.bytes', str(KAFKA_DEFAULT_MAX_MESSAGE_BYTES))}")
