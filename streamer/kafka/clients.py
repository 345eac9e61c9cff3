"""aiokafka client factories. Plain Kafka protocol only, so Apache Kafka and Tansu behave alike."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.abc import AbstractTokenProvider
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, KafkaTimeoutError
from aiokafka.helpers import create_ssl_context

from streamer.errors import SettingsError
from streamer.settings import KafkaSettings, read_secret_file


class TlsError(RuntimeError):
    """TLS to the brokers cannot work with these settings: say which file or name to fix, once, at start."""


class CredentialError(TlsError):
    """A credential file named in the settings cannot be read (reported like a TLS file)."""


class AuthenticationError(TlsError):
    """The brokers refused the SASL credentials: said as such, not as "broker unreachable"."""


def uses_tls(k: KafkaSettings) -> bool:
    return k.security_protocol in ("SSL", "SASL_SSL")


def tls_context(k: KafkaSettings) -> ssl.SSLContext:
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        path = getattr(k, name)
        if path is not None and not path.is_file():
            raise TlsError(f"kafka.{name} {path} is not a readable file")
    try:
        return create_ssl_context(
            cafile=str(k.ssl_cafile) if k.ssl_cafile else None,
            certfile=str(k.ssl_certfile) if k.ssl_certfile else None,
            keyfile=str(k.ssl_keyfile) if k.ssl_keyfile else None,
        )
    except ssl.SSLError as exc:
        raise TlsError(f"kafka TLS files cannot be used ({exc.reason or exc}): check ssl_cafile, "
                       "ssl_certfile and ssl_keyfile (PEM)") from None


async def check_tls(k: KafkaSettings) -> None:
    """With SSL/SASL_SSL, one TLS handshake per bootstrap server before any Kafka client starts.

    aiokafka logs a failed handshake and retries until its own timeout, then says only that it could not
    bootstrap; an operator needs the reason (unknown CA, wrong host name, a plaintext port) at once."""
    if not uses_tls(k):
        return
    ctx, timeout_s = tls_context(k), k.tls_check_timeout_s
    for server in k.bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        host = host.strip("[]")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout_s)
        except (OSError, asyncio.TimeoutError):
            continue  # unreachable: the clients' own retries and errors cover it
        try:
            await writer.start_tls(ctx, server_hostname=host, ssl_handshake_timeout=timeout_s)
        except ssl.SSLCertVerificationError as exc:
            await _closed(writer)
            raise TlsError(f"TLS to {host}:{port}: the broker's certificate was refused ({exc.verify_message}); "
                           f"check kafka.ssl_cafile ({k.ssl_cafile or 'system CAs'}) and that the certificate "
                           f"names {host!r}") from None
        except (ssl.SSLError, OSError, asyncio.TimeoutError) as exc:
            # A plaintext Kafka port reads the ClientHello as a request and waits, or hangs up.
            await _closed(writer)
            raise TlsError(f"no TLS handshake with {host}:{port} ({getattr(exc, 'reason', None) or exc!r}): is that "
                           "port a TLS listener?") from None
        await _closed(writer)


async def check_connection(k: KafkaSettings) -> None:
    """What every command runs before its Kafka clients: the TLS handshake (check_tls), then with SASL one
    authentication against the first reachable bootstrap server.

    aiokafka logs a refused login and goes on to say only "Unable to bootstrap": the operator, and an alert
    keyed on the startup error, must learn that the credentials are wrong."""
    await check_tls(k)
    if not k.security_protocol.startswith("SASL"):
        return
    from aiokafka.conn import create_conn
    from aiokafka.errors import (AuthenticationFailedError, AuthenticationMethodNotSupported, IllegalSaslStateError,
                                 SaslAuthenticationFailed, UnsupportedSaslMechanismError)

    refused = (AuthenticationFailedError, AuthenticationMethodNotSupported, IllegalSaslStateError,
               SaslAuthenticationFailed, UnsupportedSaslMechanismError)
    kw = security_kwargs(k)
    timeout_s = k.tls_check_timeout_s
    for server in k.bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            conn = await asyncio.wait_for(create_conn(
                host.strip("[]"), int(port), client_id=f"{k.client_id}-login-check",
                request_timeout_ms=int(timeout_s * 1000), ssl_context=kw.get("ssl_context"),
                security_protocol=k.security_protocol, sasl_mechanism=kw.get("sasl_mechanism"),
                sasl_plain_username=kw.get("sasl_plain_username"), sasl_plain_password=kw.get("sasl_plain_password"),
                sasl_oauth_token_provider=kw.get("sasl_oauth_token_provider")), timeout_s)
        except refused as exc:
            who = k.sasl_username if k.sasl_mechanism != "OAUTHBEARER" else f"the token in {k.sasl_oauth_token_file}"
            raise AuthenticationError(
                f"authentication failed at {host}:{port}: the brokers refused {who} with {k.sasl_mechanism} "
                f"({type(exc).__name__}: {exc}); check kafka.sasl_username, the password (kafka.sasl_password or "
                "sasl_password_file) or the token, and kafka.sasl_mechanism") from None
        except (KafkaError, OSError, asyncio.TimeoutError):
            continue  # unreachable or slow: the clients' own retries and errors cover it
        conn.close()
        return


async def _closed(writer: asyncio.StreamWriter) -> None:
    """Close a probe connection and wait for it. A failed handshake also leaves its error in the stream's
    close future: awaited here, it is retrieved; left to the garbage collector, asyncio may log it ("Future
    exception was never retrieved", with a traceback) at exit, depending on the order objects die."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 2.0)
    except (OSError, ssl.SSLError, asyncio.TimeoutError):
        pass


class FileTokenProvider(AbstractTokenProvider):
    """SASL OAUTHBEARER with a token the platform keeps fresh in a file (a projected service-account token,
    a sidecar): read at every authentication, never cached past it, never logged."""

    def __init__(self, path: Path):
        self.path = path

    async def token(self) -> str:
        try:
            return read_secret_file(self.path, "kafka.sasl_oauth_token_file")
        except SettingsError as exc:
            raise CredentialError(str(exc).removeprefix("settings: ")) from None


def security_kwargs(k: KafkaSettings) -> dict[str, Any]:
    """TLS and SASL options passed through to aiokafka; the password never reaches a log."""
    kw: dict[str, Any] = {"security_protocol": k.security_protocol}
    if uses_tls(k):
        kw["ssl_context"] = tls_context(k)
    if k.security_protocol.startswith("SASL") and k.sasl_mechanism == "OAUTHBEARER":
        kw.update(sasl_mechanism="OAUTHBEARER", sasl_oauth_token_provider=FileTokenProvider(k.sasl_oauth_token_file))
    elif k.security_protocol.startswith("SASL"):
        kw.update(sasl_mechanism=k.sasl_mechanism, sasl_plain_username=k.sasl_username,
                  sasl_plain_password=k.password())
    return kw


def _passed_through(kind: str, cls: type, options: dict[str, Any], managed: dict[str, Any]) -> dict[str, Any]:
    """kafka.<kind>_options: aiokafka arguments streamer does not set itself; a typo or a managed one stops
    the process with the name (a silently ignored client option is a misconfigured hospital feed)."""
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "loop"}
    for name in options:
        if name not in accepted:
            raise SettingsError(f"settings: kafka.{kind}_options.{name} is not an aiokafka {cls.__name__} argument")
        if name in managed or name.startswith(("sasl_", "ssl_", "security_")):
            raise SettingsError(f"settings: kafka.{kind}_options.{name} is set by streamer from its own settings "
                                "(see docs/settings.md)")
    return options


def make_producer(k: KafkaSettings, transactional_id: str | None = None, idempotent: bool = False,
                  producer_class: type[AIOKafkaProducer] = AIOKafkaProducer, **extra: Any) -> AIOKafkaProducer:
    """acks=all; idempotent when asked (the worker, where the brokers can: no duplicates from its own retries);
    transactional for exactly-once checkpoints (delivery/); `producer_class`: a subclass with the same
    options (kafka/kip447.py's Kip447Producer)."""
    acks: Any = "all" if k.acks == "all" else int(k.acks)
    managed: dict[str, Any] = dict(
        bootstrap_servers=k.bootstrap_servers, client_id=f"{k.client_id}-producer", acks=acks, linger_ms=k.linger_ms,
        compression_type=None if k.compression_type == "none" else k.compression_type,
        enable_idempotence=(idempotent and acks == "all") or bool(transactional_id),
        transactional_id=transactional_id, transaction_timeout_ms=k.transaction_timeout_ms)
    opts: dict[str, Any] = dict(max_batch_size=1 << 20, request_timeout_ms=30000)  # defaults options may change
    opts.update(_passed_through("producer", AIOKafkaProducer, k.producer_options, managed))
    opts.update(managed)
    opts.update(extra)  # a caller's own needs (a reader without a group, a test's timeout)
    return producer_class(**opts, **security_kwargs(k))


async def start_ordered_producer(k: KafkaSettings, timeout_s: float = 30.0,
                                 **extra: Any) -> tuple[AIOKafkaProducer, str | None]:
    """A started producer for a feed whose order per key matters (replay, gateways): idempotent where the
    brokers grant a producer id and acks=all, else a plain one. Returns (producer, why it is not idempotent,
    or None). aiokafka 0.14 never expires an idempotent batch: one that timed out is retried at the head of
    its partition, and the broker drops the copy it already wrote and refuses a gap in the sequence. A
    plain producer fails a batch that timed out while newer ones of its partition go on: its caller must
    keep the order itself (streamer.ingest.producer.OrderedSender does both)."""
    why_not = "kafka.acks is not all"
    if k.acks == "all":
        producer = make_producer(k, idempotent=True, **extra)
        try:
            await asyncio.wait_for(producer.start(), timeout_s)
            return producer, None
        except (KafkaError, asyncio.TimeoutError) as exc:  # e.g. the embedded broker's InitProducerId fails
            why_not = f"no producer id from the brokers: {exc!r}"
            try:
                await asyncio.wait_for(producer.stop(), 5.0)
            except (KafkaError, asyncio.TimeoutError, OSError):
                pass  # nothing was sent with it; its connections go with it
    producer = make_producer(k, **extra)
    await producer.start()
    return producer, why_not


def make_consumer(k: KafkaSettings, **extra: Any) -> AIOKafkaConsumer:
    """read_committed: what an aborted transaction (a fenced zombie's, a crashed checkpoint's) wrote is
    never seen, and outputs appear once their checkpoint committed."""
    managed: dict[str, Any] = dict(
        bootstrap_servers=k.bootstrap_servers, client_id=f"{k.client_id}-consumer", group_id=k.group_id,
        enable_auto_commit=False, auto_offset_reset=k.auto_offset_reset,
        max_poll_records=k.max_poll_records, session_timeout_ms=k.session_timeout_ms,
        heartbeat_interval_ms=k.heartbeat_interval_ms, fetch_min_bytes=k.fetch_min_bytes,
        fetch_max_wait_ms=k.fetch_max_wait_ms, isolation_level="read_committed",
    )
    opts: dict[str, Any] = dict(fetch_max_bytes=16 << 20, max_partition_fetch_bytes=4 << 20)
    opts.update(_passed_through("consumer", AIOKafkaConsumer, k.consumer_options, managed))
    opts.update(managed)
    opts.update(extra)
    return AIOKafkaConsumer(**opts, **security_kwargs(k))


async def committed_offsets(consumer: AIOKafkaConsumer, partitions) -> dict:
    """{partition: (committed offset or None, its metadata)} for the consumer's group. The metadata names the
    transactional id prefix of an exactly-once commit (delivery/); `committed()` gives the
    offset only, so the group coordinator's own fetch is used (tests/integration/test_apache_kafka.py proves it)."""
    found = await consumer._coordinator.fetch_committed_offsets(list(partitions))
    out = {}
    for tp in partitions:
        meta = found.get(tp)
        offset = meta.offset if meta is not None and meta.offset >= 0 else None
        out[tp] = (offset, meta.metadata if meta is not None else None)
    return out


def request_rejoin(consumer: AIOKafkaConsumer) -> None:
    """Make the consumer rejoin its group (revoking, then assigning, through the rebalance listener), as
    Kafka Streams does when a task's producer is fenced. aiokafka 0.14 has no public call for it: its group
    coordinator's request_rejoin (tests/integration/test_integration_transactions.py proves the round trip)."""
    consumer._coordinator.request_rejoin()


def make_admin(k: KafkaSettings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(bootstrap_servers=k.bootstrap_servers, client_id=f"{k.client_id}-admin",
                               **security_kwargs(k))


def wanted_topics(k: KafkaSettings, partitions: int | None = None, replication: int = 1) -> list[NewTopic]:
    """What `kafka.create_topics` creates: the plan of streamer/kafka/topics.py without its retention."""
    from streamer.kafka.topics import topic_plan

    return [_new_topic(t) for t in topic_plan(k, partitions, k.replication_factor or replication, retention=False)]


def _new_topic(t) -> NewTopic:
    """A TopicSpec of streamer/kafka/topics.py as the admin client's CreateTopics entry."""
    return NewTopic(t.name, t.partitions, t.replication, topic_configs=dict(t.configs))


async def _default_replication(admin: AIOKafkaAdminClient) -> int:
    """The brokers' default.replication.factor (DescribeConfigs on one broker); 1 if it does not say.
    (CreateTopics takes -1 for "the broker's default" only from version 4, newer than aiokafka speaks.)"""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    try:
        cluster = await admin.describe_cluster()
        node = cluster["brokers"][0]["node_id"]
        for resp in await admin.describe_configs([ConfigResource(ConfigResourceType.BROKER, str(node))]):
            for resource in resp.resources:
                for entry in resource[4]:
                    if entry[0] == "default.replication.factor" and entry[1]:
                        return int(entry[1])
    except (KafkaError, KeyError, IndexError, ValueError, TypeError):
        pass
    return 1


async def ensure_topics(k: KafkaSettings, partitions: int | None = None, timeout_s: float = 15.0) -> list[str]:
    """Create the configured topics that are missing (replication_factor, min_insync_replicas, else the
    brokers' defaults; the episode and state topics compacted); returns those created."""
    admin = make_admin(k)
    await asyncio.wait_for(admin.start(), timeout_s)
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in wanted_topics(k, partitions) if t.name not in existing]
        if missing and k.replication_factor is None:
            missing = [t for t in wanted_topics(k, partitions, await _default_replication(admin))
                       if t.name not in existing]
        await _create(admin, missing, f"replication_factor={k.replication_factor}, min_insync_replicas="
                      f"{k.min_insync_replicas}")
        return [t.name for t in missing]
    finally:
        await admin.close()


async def create_planned_topics(k: KafkaSettings, plan, timeout_s: float = 15.0) -> list[str]:
    """`streamer topics --create`: the plan's missing topics (streamer/kafka/topics.py); returns those created.
    An existing topic is left as it is (the worker checks what it relies on at start)."""
    admin = make_admin(k)
    await asyncio.wait_for(admin.start(), timeout_s)
    try:
        existing = set(await admin.list_topics())
        missing = [_new_topic(t) for t in plan if t.name not in existing]
        await _create(admin, missing, "streamer topics")
        return [t.name for t in missing]
    finally:
        await admin.close()


async def _create(admin: AIOKafkaAdminClient, topics: list[NewTopic], context: str) -> None:
    if not topics:
        return
    resp = await admin.create_topics(topics)
    # (name, error_code[, error_message]); 36: created meanwhile by another worker
    errors = [(e[0], e[1], e[2] if len(e) > 2 else None) for e in getattr(resp, "topic_errors", ())
              if e[1] not in (0, 36)]
    if errors:
        from aiokafka.errors import for_code

        name, code, message = errors[0]
        raise for_code(code)(f"creating topic {name}: {message or for_code(code).__name__} ({context})")


async def missing_topics(k: KafkaSettings, timeout_s: float = 15.0) -> list[str]:
    admin = make_admin(k)
    await asyncio.wait_for(admin.start(), timeout_s)
    try:
        existing = set(await admin.list_topics())
    finally:
        await admin.close()
    needed = [*k.input_topics, k.flags_topic, k.episodes_topic, k.dead_letter_topic, k.state_topic]
    return [t for t in needed if t not in existing]


async def _describe(k: KafkaSettings, topics: list[str], timeout_s: float) -> list[dict]:
    """Metadata of `topics`: one dict per topic with its error_code and partitions."""
    admin = make_admin(k)
    await asyncio.wait_for(admin.start(), timeout_s)
    try:
        return await admin.describe_topics(topics)
    finally:
        await admin.close()


async def partition_counts(k: KafkaSettings, topics: list[str], timeout_s: float = 15.0) -> dict[str, int]:
    """Partitions of each existing topic among `topics` (metadata)."""
    return {t["topic"]: len(t["partitions"]) for t in await _describe(k, topics, timeout_s) if t["error_code"] == 0}


async def require_topics(k: KafkaSettings, topics: list[str], timeout_s: float = 15.0) -> None:
    """Raise unless every topic exists and this principal may DESCRIBE it. A consumer subscribed to a topic
    it may not describe only logs it and reads nothing, for ever: a reader must learn it at start."""
    from aiokafka.errors import TopicAuthorizationFailedError, UnknownTopicOrPartitionError

    codes = {t["topic"]: t["error_code"] for t in await _describe(k, topics, timeout_s)}
    refused = [t for t in topics if codes.get(t) == TopicAuthorizationFailedError.errno]
    if refused:
        raise TopicAuthorizationFailedError(", ".join(refused))
    missing = [t for t in topics if codes.get(t, UnknownTopicOrPartitionError.errno) != 0]
    if missing:
        raise UnknownTopicOrPartitionError(", ".join(missing))


async def topic_config(k: KafkaSettings, topic: str, name: str, timeout_s: float = 15.0) -> str | None:
    """One configuration value of a topic as the brokers report it (DescribeConfigs); None if the broker
    does not say."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = make_admin(k)
    await asyncio.wait_for(admin.start(), timeout_s)
    try:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    for resp in responses:
        for resource in resp.resources:
            # (error_code, error_message, resource_type, resource_name, config_entries)
            for entry in resource[4]:
                if entry[0] == name:
                    return entry[1]
    return None


async def read_records(k: KafkaSettings, topics: list[str], until=None, timeout_s: float = 60.0,
                       idle_polls: int | None = 3) -> list:
    """Records of `topics` from the beginning (no group, nothing committed), read until `until(records)`
    is true, or `idle_polls` empty polls in a row once something was read, or the timeout."""
    import time
    import uuid

    consumer = make_consumer(k, group_id=None, auto_offset_reset="earliest", client_id=f"reader-{uuid.uuid4().hex[:8]}")
    await consumer.start()
    consumer.subscribe(topics)
    out: list = []
    idle = 0
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=300)
            for records in batch.values():
                out.extend(records)
            if until is not None and until(out):
                break
            idle = 0 if batch else idle + 1
            if until is None and idle_polls is not None and out and idle >= idle_polls:
                break
    finally:
        await consumer.stop()
    return out


def retriable(exc: BaseException) -> bool:
    """Whether trying again can succeed: a broker down, stalled or electing, not a record too large or a
    missing permission. aiokafka marks a send that timed out (a stalled broker) as not retriable."""
    return isinstance(exc, KafkaError) and (exc.retriable or isinstance(exc, KafkaTimeoutError))


async def retry_kafka(attempt, on_retry=None, first_delay_s: float = 0.2, max_delay_s: float = 5.0):
    """Await `attempt()` until it succeeds, backing off on retriable Kafka errors; others are raised.

    Used where giving up would lose data: the caller's offsets stay uncommitted meanwhile.
    `on_retry(exc, delay)` is told about each failure.
    """
    delay = first_delay_s
    while True:
        try:
            return await attempt()
        except KafkaError as exc:
            if not retriable(exc):
                raise
            if on_retry is not None:
                on_retry(exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay_s)


def transaction_end(producer: AIOKafkaProducer) -> asyncio.Future | None:
    """The future aiokafka's transaction manager resolves when the producer's transaction ends: in a fatal
    state aiokafka 0.14 keeps the cause (e.g. ProducerFenced) only there, and answers every later call with
    an IllegalOperation or an AssertionError. Private (`_txn_manager`), hence here beside the other two
    private calls, pinned with aiokafka and proven by tests/integration/test_integration_transactions.py."""
    manager = getattr(producer, "_txn_manager", None)
    end = getattr(manager, "wait_for_transaction_end", None)
    return None if end is None else end()


def ask_for_partitions(producer: AIOKafkaProducer, partitions) -> None:
    """Name output partitions to the producer's open transaction before anything is sent to them.
    aiokafka 0.14 adds a partition when a record for it is sent, and its sender asks the coordinator for
    every partition pending at that moment in one AddPartitionsToTxn: a partition named together with the
    one being sent joins in the same request instead of one of its own when its record comes (the state
    record at the checkpoint, after the flag). A partition named and then not written only gets the
    commit's marker. Private (`_txn_manager`), pinned with aiokafka and proven on Apache Kafka by
    tests/integration/test_integration_transactions.py (one AddPartitionsToTxn a transaction)."""
    manager = getattr(producer, "_txn_manager", None)
    if manager is None or manager.transactional_id is None or not manager.is_in_transaction():
        return
    for tp in partitions:
        manager.maybe_add_partition_to_txn(tp)
