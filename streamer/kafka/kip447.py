"""KIP-447 on aiokafka 0.14: transactional offset commits fenced by the consumer group's generation.

aiokafka only sends TxnOffsetCommit v0, which carries no generation: the group coordinator accepts the
offsets of a zombie that lost its partitions in a rebalance, so exactly-once needs one producer per input
partition (streamer/delivery/exactly_once.py). Version 3 carries generation, member id and group instance
id; the coordinator refuses a commit from a generation that is over (ILLEGAL_GENERATION, UNKNOWN_MEMBER_ID,
FENCED_INSTANCE_ID), which lets ONE producer commit the offsets of every partition a worker owns.

What this module adds, on aiokafka's own protocol classes:
- TxnOffsetCommitRequest_v3 / Response_v3 and OffsetFetchRequest_v7 / Response_v7 (require_stable);
- GroupMetadata, read from a consumer's group coordinator, that refuses generation -1 / an empty member
  (v3 with those is exactly as unfenced as v0);
- Kip447Producer: `send_offsets_to_transaction(offsets, group_metadata)` sends v3 through a handler that
  makes the three group errors abortable (abort_transaction, rejoin, redo: the producer stays usable);
- committed_offsets_stable(): OffsetFetch v7 with require_stable, retrying UNSTABLE_OFFSET_COMMIT (88).

A broker that does not offer TxnOffsetCommit v3 / OffsetFetch v7 is refused with one line, never served a
silently unfenced older version. Error codes from 82 on reach aiokafka as UnknownError: raw codes are
compared here. Private aiokafka attributes used (pinned with aiokafka 0.14, proven by
tests/integration/test_kip447.py): AIOKafkaProducer._sender/_txn_manager/_message_accumulator, Sender.
_acks/_retry_backoff/_request_timeout_ms/_find_coordinator/_coordinator_dead/_do_txn_offset_commit,
TransactionManager.add_offsets_to_txn/error_transaction/offset_committed/is_in_transaction/_txn_partitions/
_txn_consumer_group, and
AIOKafkaConsumer._coordinator (.group_id, .generation, .member_id, ._group_instance_id, .coordinator_id,
.ensure_coordinator_known, ._send_req, .coordinator_dead).
"""

from __future__ import annotations

import asyncio
import collections
import struct
import time
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.client import CoordinationType
from aiokafka.errors import (GroupAuthorizationFailedError, IllegalOperation, IncompatibleBrokerVersion, KafkaError,
                             KafkaTimeoutError, ProducerFenced, TransactionalIdAuthorizationFailed, for_code)
from aiokafka.producer.sender import Sender, TxnOffsetCommitHandler
from aiokafka.protocol.admin import ApiVersionRequest
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (Boolean, CompactArray, CompactString, Int16, Int32, Int64, Schema, TaggedFields,
                                     UnsignedVarInt32)
from aiokafka.structs import TopicPartition
from aiokafka.util import commit_structure_validate

log = structlog.get_logger(__name__)

TXN_OFFSET_COMMIT_KEY, TXN_OFFSET_COMMIT_VERSION = 28, 3
OFFSET_FETCH_KEY, OFFSET_FETCH_VERSION = 9, 7

NONE = 0
UNKNOWN_TOPIC_OR_PARTITION = 3
REQUEST_TIMED_OUT = 7
COORDINATOR_LOAD_IN_PROGRESS = 14
COORDINATOR_NOT_AVAILABLE = 15
NOT_COORDINATOR = 16
ILLEGAL_GENERATION = 22
UNKNOWN_MEMBER_ID = 25
GROUP_AUTHORIZATION_FAILED = 30
INVALID_PRODUCER_EPOCH = 47
CONCURRENT_TRANSACTIONS = 51
TRANSACTIONAL_ID_AUTHORIZATION_FAILED = 53
FENCED_INSTANCE_ID = 82
UNSTABLE_OFFSET_COMMIT = 88
PRODUCER_FENCED = 90

#: the coordinator says this member's generation is over: abort, rejoin, redo (never fatal to the producer)
GROUP_FENCED_CODES = frozenset({ILLEGAL_GENERATION, UNKNOWN_MEMBER_ID, FENCED_INSTANCE_ID})
_COORDINATOR_MOVED = frozenset({COORDINATOR_NOT_AVAILABLE, NOT_COORDINATOR, REQUEST_TIMED_OUT})
_TRY_AGAIN = frozenset({COORDINATOR_LOAD_IN_PROGRESS, UNKNOWN_TOPIC_OR_PARTITION, CONCURRENT_TRANSACTIONS})


class Kip447Unsupported(IncompatibleBrokerVersion):
    """The broker does not offer the fenced API version: refused, never downgraded to an unfenced one."""


class UnfencedGroupMetadata(ValueError):
    """Group metadata without a generation or member: a commit with it would not be fenced."""


class MalformedResponse(KafkaError):
    """A broker answer that does not decode to its schema (truncated, hostile, trailing bytes)."""


class GroupFenced(KafkaError):
    """The group coordinator refused the transaction's offsets because this member's generation is over
    (ILLEGAL_GENERATION 22, UNKNOWN_MEMBER_ID 25, FENCED_INSTANCE_ID 82). Abortable: abort the
    transaction, rejoin the group, redo the work of the partitions it still owns."""

    def __init__(self, code: int, member: GroupMetadata):
        self.code, self.member = code, member
        super().__init__(f"group {member.group_id!r} refused the offsets of generation {member.generation_id} "
                         f"member {member.member_id!r}: {_code_name(code)} ({code})")


class UnstableOffsets(KafkaTimeoutError):
    """OffsetFetch kept answering UNSTABLE_OFFSET_COMMIT (88) past the deadline: a transaction holding
    offsets of the group is still open."""


def _code_name(code: int) -> str:
    named = {FENCED_INSTANCE_ID: "FENCED_INSTANCE_ID", UNSTABLE_OFFSET_COMMIT: "UNSTABLE_OFFSET_COMMIT",
             PRODUCER_FENCED: "PRODUCER_FENCED"}
    return named.get(code) or getattr(for_code(code), "message", f"error {code}")


# -- wire format -------------------------------------------------------------------------------------------


class StrictTaggedFields(TaggedFields):
    """aiokafka's TaggedFields, strict: a tag whose bytes run past the buffer is an error (aiokafka keeps the
    short read), and encoding writes each tag's size (aiokafka leaves it out). Unknown tags are kept, unread."""

    @classmethod
    def decode(cls, data: BytesIO) -> dict[int, bytes]:
        fields: dict[int, bytes] = {}
        previous = -1
        for _ in range(UnsignedVarInt32.decode(data)):
            tag = UnsignedVarInt32.decode(data)
            if tag <= previous:
                raise ValueError(f"tag {tag} out of order")
            previous = tag
            size = UnsignedVarInt32.decode(data)
            value = data.read(size)
            if len(value) != size:
                raise ValueError(f"tag {tag} runs past the end ({len(value)} of {size} bytes)")
            fields[tag] = value
        return fields

    @classmethod
    def encode(cls, value: dict[int, bytes]) -> bytes:
        out = [UnsignedVarInt32.encode(len(value))]
        for tag in sorted(value):
            out += [UnsignedVarInt32.encode(tag), UnsignedVarInt32.encode(len(value[tag])), value[tag]]
        return b"".join(out)


_STR = CompactString("utf-8")
_TAGS = StrictTaggedFields


class _StrictResponse(Response):
    """Decoding refuses what does not fit the schema exactly, with one clear error (MalformedResponse),
    never a struct.error or a short read taken for data. Every field consumes bytes, so a hostile length
    ends at the buffer's end: decoding cannot loop without reading."""

    @classmethod
    def decode(cls, data: BytesIO | bytes):
        buf = BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
        try:
            fields = [field.decode(buf) for field in cls.SCHEMA.fields]
        except (ValueError, struct.error) as exc:
            # aiokafka's text repeats the raw bytes: keep only the reason (a peer's bytes never reach a log)
            reason = str(exc).rpartition("hit error: ")[2][:120]
            raise MalformedResponse(f"{cls.__name__} does not decode at byte {buf.tell()}: {reason}") from None
        if buf.read(1):
            raise MalformedResponse(f"{cls.__name__} has bytes after its last field")
        return cls(*fields)


class TxnOffsetCommitResponse_v3(_StrictResponse):
    API_KEY = TXN_OFFSET_COMMIT_KEY
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("topics", CompactArray(
            ("name", _STR),
            ("partitions", CompactArray(("partition_index", Int32), ("error_code", Int16), ("tags", _TAGS))),
            ("tags", _TAGS))),
        ("tags", _TAGS),
    )


class TxnOffsetCommitRequest_v3(RequestStruct):
    """topics: [(name, [(partition_index, committed_offset, committed_leader_epoch, committed_metadata,
    tags)], tags)]; the first flexible version (compact strings and arrays, request header v2)."""

    FLEXIBLE_VERSION = True
    API_KEY = TXN_OFFSET_COMMIT_KEY
    API_VERSION = 3
    RESPONSE_TYPE = TxnOffsetCommitResponse_v3
    SCHEMA = Schema(
        ("transactional_id", _STR),
        ("group_id", _STR),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("generation_id", Int32),
        ("member_id", _STR),
        ("group_instance_id", _STR),  # nullable: compact length 0
        ("topics", CompactArray(
            ("name", _STR),
            ("partitions", CompactArray(
                ("partition_index", Int32), ("committed_offset", Int64), ("committed_leader_epoch", Int32),
                ("committed_metadata", _STR), ("tags", _TAGS))),
            ("tags", _TAGS))),
        ("tags", _TAGS),
    )


class OffsetFetchResponse_v7(_StrictResponse):
    API_KEY = OFFSET_FETCH_KEY
    API_VERSION = 7
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("topics", CompactArray(
            ("name", _STR),
            ("partitions", CompactArray(
                ("partition_index", Int32), ("committed_offset", Int64), ("committed_leader_epoch", Int32),
                ("metadata", _STR), ("error_code", Int16), ("tags", _TAGS))),
            ("tags", _TAGS))),
        ("error_code", Int16),
        ("tags", _TAGS),
    )


class OffsetFetchRequest_v7(RequestStruct):
    FLEXIBLE_VERSION = True
    API_KEY = OFFSET_FETCH_KEY
    API_VERSION = 7
    RESPONSE_TYPE = OffsetFetchResponse_v7
    SCHEMA = Schema(
        ("group_id", _STR),
        ("topics", CompactArray(("name", _STR), ("partition_indexes", CompactArray(Int32)), ("tags", _TAGS))),
        ("require_stable", Boolean),
        ("tags", _TAGS),
    )


def require_version(versions: dict[int, tuple[int, int]], api_key: int, version: int, name: str) -> None:
    """Raise Kip447Unsupported (one line) unless the broker's ApiVersions range for api_key holds version."""
    offered = versions.get(api_key)
    if offered is None or not offered[0] <= version <= offered[1]:
        said = "does not offer it" if offered is None else f"offers v{offered[0]}-v{offered[1]}"
        raise Kip447Unsupported(f"{name} v{version} (KIP-447, Kafka 2.5+) is needed and the broker {said}: refusing "
                                "rather than sending an older version the group coordinator does not fence")


class TxnOffsetCommitV3(Request[TxnOffsetCommitRequest_v3]):
    """Builds v3 only: on a connection without v3, Kip447Unsupported (never aiokafka's v0)."""

    API_KEY = TXN_OFFSET_COMMIT_KEY

    def __init__(self, transactional_id: str, producer_id: int, producer_epoch: int, member: GroupMetadata,
                 offsets: dict[TopicPartition, tuple[int, str | None]]):
        self._fields = (transactional_id, member.group_id, producer_id, producer_epoch, member.generation_id,
                        member.member_id, member.group_instance_id, _offset_topics(offsets))

    def prepare(self, versions: dict[int, tuple[int, int]]) -> TxnOffsetCommitRequest_v3:
        require_version(versions, TXN_OFFSET_COMMIT_KEY, TXN_OFFSET_COMMIT_VERSION, "TxnOffsetCommit")
        return self.build(TxnOffsetCommitRequest_v3)

    def build(self, request_struct_class: type[TxnOffsetCommitRequest_v3]) -> TxnOffsetCommitRequest_v3:
        return request_struct_class(*self._fields, {})


def _offset_topics(offsets: dict[TopicPartition, tuple[int, str | None]]) -> list:
    """{tp: (offset, metadata)} as v3's topics, sorted; committed_leader_epoch -1 (not tracked)."""
    by_topic: dict[str, list] = collections.defaultdict(list)
    for tp, (offset, metadata) in sorted(offsets.items()):
        by_topic[tp.topic].append((tp.partition, offset, -1, metadata, {}))
    return [(topic, partitions, {}) for topic, partitions in by_topic.items()]


class StableOffsetFetch(Request[OffsetFetchRequest_v7]):
    """OffsetFetch v7 with require_stable; on a connection without v7, Kip447Unsupported."""

    API_KEY = OFFSET_FETCH_KEY

    def __init__(self, group_id: str, partitions: list[TopicPartition]):
        by_topic: dict[str, list[int]] = collections.defaultdict(list)
        for tp in sorted(set(partitions)):
            by_topic[tp.topic].append(tp.partition)
        self._fields = (group_id, [(t, ps, {}) for t, ps in by_topic.items()], True, {})

    def prepare(self, versions: dict[int, tuple[int, int]]) -> OffsetFetchRequest_v7:
        require_version(versions, OFFSET_FETCH_KEY, OFFSET_FETCH_VERSION, "OffsetFetch")
        return self.build(OffsetFetchRequest_v7)

    def build(self, request_struct_class: type[OffsetFetchRequest_v7]) -> OffsetFetchRequest_v7:
        return request_struct_class(*self._fields)


async def broker_versions(client, timeout_s: float = 15.0) -> dict[int, dict[int, tuple[int, int]]]:
    """{node id: {api key: (min, max)}} from an ApiVersions request to every broker in the client's metadata."""
    out = {}
    for broker in sorted(client.cluster.brokers(), key=lambda b: b.nodeId):
        resp = await asyncio.wait_for(client.send(broker.nodeId, ApiVersionRequest()), timeout_s)
        if resp.error_code != NONE:
            raise KafkaError(f"broker {broker.nodeId} refused ApiVersions: {_code_name(resp.error_code)}")
        out[broker.nodeId] = {key: (low, high) for key, low, high in resp.api_versions}
    return out


async def require_kip447(client, timeout_s: float = 15.0) -> dict[int, dict[int, tuple[int, int]]]:
    """Raise Kip447Unsupported unless every broker offers TxnOffsetCommit v3 and OffsetFetch v7 (any of
    them may become the group coordinator); returns what they offer."""
    versions = await broker_versions(client, timeout_s)
    if not versions:
        raise KafkaError("no broker in the metadata to ask for its ApiVersions")
    for node, offered in versions.items():
        for key, version, name in ((TXN_OFFSET_COMMIT_KEY, TXN_OFFSET_COMMIT_VERSION, "TxnOffsetCommit"),
                                   (OFFSET_FETCH_KEY, OFFSET_FETCH_VERSION, "OffsetFetch")):
            try:
                require_version(offered, key, version, name)
            except Kip447Unsupported as exc:
                raise Kip447Unsupported(f"broker {node}: {exc}") from None
    return versions


# -- the group's side --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupMetadata:
    """Who commits: the consumer group member and the generation its partitions were assigned in.

    Invariant: generation_id >= 0 and member_id non-empty. The coordinator skips the generation check for
    generation -1 with an empty member, which would make the commit as unfenced as v0: refused here."""

    group_id: str
    generation_id: int
    member_id: str
    group_instance_id: str | None = None

    def __post_init__(self) -> None:
        if not self.group_id:
            raise UnfencedGroupMetadata("group metadata without a group id")
        if self.generation_id < 0 or not self.member_id:
            raise UnfencedGroupMetadata(
                f"group {self.group_id!r} has no generation (generation {self.generation_id}, member "
                f"{self.member_id!r}): the consumer is not in the group, and a commit without one is not fenced")


def group_metadata(consumer: AIOKafkaConsumer) -> GroupMetadata:
    """The consumer's group membership as it is now: read it where the partitions are assigned
    (on_partitions_assigned), and commit with that copy, never a fresh one (that would adopt a newer
    generation for work done under the old one). Raises UnfencedGroupMetadata between generations."""
    coordinator = consumer._coordinator
    group_id = getattr(coordinator, "group_id", None)
    if group_id is None:
        raise UnfencedGroupMetadata("the consumer has no group (group_id=None): nothing to fence with")
    return GroupMetadata(group_id, coordinator.generation, coordinator.member_id,
                         coordinator._group_instance_id)


# -- the producer's side -----------------------------------------------------------------------------------


class _FencedOffsets(dict):
    """aiokafka's pending offsets ({tp: OffsetAndMetadata}) carrying the member they are committed for:
    the transaction manager queues this very dict and the sender gets it back."""

    member: GroupMetadata


def abortable(txn_manager, exc: BaseException) -> None:
    """End the transaction in an abortable error, still knowing what it holds. aiokafka's error_transaction
    forgets the partitions and the group already added to it: abort_transaction then takes it for empty and
    ends it locally, sending no EndTxn(ABORT), and the broker's transaction, records and all, stays open
    under the same producer id and epoch until the next commit_transaction of that producer commits it
    (tests/integration/test_exactly_once_group.py proved it: a zombie's record became visible)."""
    added, group = set(txn_manager._txn_partitions), txn_manager._txn_consumer_group
    txn_manager.error_transaction(exc)
    txn_manager._txn_partitions.update(added)
    txn_manager._txn_consumer_group = group


class FencedTxnOffsetCommitHandler(TxnOffsetCommitHandler):
    """aiokafka's TxnOffsetCommitHandler sending v3. The three group errors end the transaction as
    abortable (the caller aborts, rejoins, redoes): aiokafka raises them, which kills the sender task and
    leaves the producer unusable. Retriable errors are retried as aiokafka does."""

    def __init__(self, sender: Sender, offsets: _FencedOffsets, group_id: str):
        super().__init__(sender, offsets, group_id)
        self._member = offsets.member

    def create_request(self) -> TxnOffsetCommitV3:
        txn_manager = self._sender._txn_manager
        return TxnOffsetCommitV3(
            txn_manager.transactional_id, txn_manager.producer_id, txn_manager.producer_epoch, self._member,
            {tp: (meta.offset, meta.metadata) for tp, meta in self._offsets.items()})

    def handle_response(self, resp: TxnOffsetCommitResponse_v3) -> float | None:
        txn_manager = self._sender._txn_manager
        answered = {}
        for topic, partitions, _ in resp.topics or ():
            for partition, code, _ in partitions or ():
                answered[TopicPartition(topic, partition)] = code
        if set(answered) != set(self._offsets):
            # a broker that answers for other partitions than asked: loud (the sender stops), never guessed
            raise MalformedResponse(f"TxnOffsetCommit answered for {sorted(answered)}, asked {sorted(self._offsets)}")
        for tp, code in sorted(answered.items()):
            if code == NONE:
                txn_manager.offset_committed(tp, self._offsets[tp].offset, self._group_id)
            elif code in GROUP_FENCED_CODES:
                log.warning("txn_offset_commit_fenced", group=self._group_id, partition=str(tp), code=code,
                            generation=self._member.generation_id, member=self._member.member_id)
                abortable(txn_manager, GroupFenced(code, self._member))
                # send_offsets_to_transaction raises it; the transaction's end future holds it too, and
                # abort_transaction replaces that future unread: asyncio would log it as never retrieved
                txn_manager.wait_for_transaction_end().exception()
                return None
            elif code in _COORDINATOR_MOVED:
                self._sender._coordinator_dead(CoordinationType.GROUP)
                return self._default_backoff
            elif code in _TRY_AGAIN:
                return self._default_backoff
            elif code in (INVALID_PRODUCER_EPOCH, PRODUCER_FENCED):
                raise ProducerFenced()
            elif code == TRANSACTIONAL_ID_AUTHORIZATION_FAILED:
                raise TransactionalIdAuthorizationFailed(txn_manager.transactional_id)
            elif code == GROUP_AUTHORIZATION_FAILED:
                abortable(txn_manager, GroupAuthorizationFailedError(self._group_id))
                return None
            else:
                # as aiokafka: an error nobody planned for stops the producer, with its raw code
                raise for_code(code)(f"TxnOffsetCommit v3 for {tp}: {_code_name(code)} ({code})")
        return None


class Kip447Sender(Sender):
    """aiokafka's Sender whose transactional offset commits go through FencedTxnOffsetCommitHandler."""

    async def _do_txn_offset_commit(self, offsets, group_id: str) -> None:
        if not offsets:
            return
        if not isinstance(offsets, _FencedOffsets):
            # only Kip447Producer.send_offsets_to_transaction queues offsets: anything else is a bug, loud
            raise IllegalOperation("offsets queued without group metadata: refusing an unfenced commit")
        try:
            node_id = await self._find_coordinator(CoordinationType.GROUP, group_id)
        except GroupAuthorizationFailedError as exc:
            abortable(self._txn_manager, exc)
            return
        await FencedTxnOffsetCommitHandler(self, offsets, group_id).do(node_id)


class Kip447Producer(AIOKafkaProducer):
    """A transactional AIOKafkaProducer whose send_offsets_to_transaction takes GroupMetadata and commits
    with TxnOffsetCommit v3. start() refuses brokers without v3 / OffsetFetch v7 (Kip447Unsupported).
    After GroupFenced: abort_transaction(), rejoin the group, begin again: the producer stays usable."""

    def __init__(self, **kwargs: Any):
        if not kwargs.get("transactional_id"):
            raise ValueError("Kip447Producer needs a transactional_id")
        super().__init__(**kwargs)
        stock = self._sender
        self._sender = Kip447Sender(
            self.client, acks=stock._acks, txn_manager=self._txn_manager,
            message_accumulator=self._message_accumulator, retry_backoff_ms=stock._retry_backoff * 1000,
            request_timeout_ms=stock._request_timeout_ms)
        self.broker_versions: dict[int, dict[int, tuple[int, int]]] = {}

    async def start(self) -> None:
        await super().start()
        try:
            self.broker_versions = await require_kip447(self.client)
        except BaseException:
            await self.stop()
            raise

    async def send_offsets_to_transaction(self, offsets, group_metadata: GroupMetadata) -> None:  # type: ignore[override]
        """Add `offsets` ({tp: offset or OffsetAndMetadata}) to the open transaction, fenced by
        `group_metadata`. Raises GroupFenced if the coordinator says that generation is over (then abort)."""
        if not isinstance(group_metadata, GroupMetadata):
            raise TypeError("send_offsets_to_transaction needs GroupMetadata, not a bare group id: a commit "
                            "without the generation is not fenced")
        self._ensure_transactional()
        if not self._txn_manager.is_in_transaction():
            raise IllegalOperation("Not in the middle of a transaction")
        pending = _FencedOffsets(commit_structure_validate(offsets))
        pending.member = group_metadata
        await asyncio.shield(self._txn_manager.add_offsets_to_txn(pending, group_metadata.group_id))


# -- reading committed offsets -----------------------------------------------------------------------------


async def committed_offsets_stable(consumer: AIOKafkaConsumer, partitions, timeout_s: float = 30.0,
                                   backoff_s: float = 0.1) -> dict[TopicPartition, tuple[int | None, str | None]]:
    """{tp: (committed offset or None, its metadata)} for the consumer's group, with require_stable: while a
    transaction holding offsets of the group is open the broker answers UNSTABLE_OFFSET_COMMIT (88), retried
    here until `timeout_s` (then UnstableOffsets). A broker without OffsetFetch v7 raises Kip447Unsupported.
    Sent to the consumer's group coordinator (aiokafka's own fetch stays v3 and never waits)."""
    coordinator = consumer._coordinator
    group_id = getattr(coordinator, "group_id", None)
    if group_id is None:
        raise UnfencedGroupMetadata("the consumer has no group (group_id=None): no committed offsets to fetch")
    wanted = sorted(set(partitions))
    deadline = time.monotonic() + timeout_s
    why = "nothing asked yet"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            if why.startswith("UNSTABLE"):
                raise UnstableOffsets(f"group {group_id!r}: offsets still unstable after {timeout_s:.1f} s ({why})")
            raise KafkaTimeoutError(f"group {group_id!r}: no committed offsets within {timeout_s:.1f} s ({why})")
        try:
            await asyncio.wait_for(coordinator.ensure_coordinator_known(), left)
            resp = await asyncio.wait_for(coordinator._send_req(StableOffsetFetch(group_id, wanted)), left)
        except asyncio.TimeoutError:
            why = "the group coordinator did not answer"
            continue
        except KafkaError as exc:
            if not exc.retriable and not isinstance(exc, MalformedResponse):
                raise
            why = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(min(backoff_s, max(0.0, deadline - time.monotonic())))
            continue
        found, why = _read_offset_fetch(resp, group_id, wanted)
        if found is not None:
            return found
        if why.startswith(("COORDINATOR_NOT_AVAILABLE", "NOT_COORDINATOR")):
            coordinator.coordinator_dead()
        await asyncio.sleep(min(backoff_s, max(0.0, deadline - time.monotonic())))


def _read_offset_fetch(resp: OffsetFetchResponse_v7, group_id: str, wanted: list[TopicPartition]):
    """(the offsets, "") or (None, why to retry); raises on an error retrying cannot cure."""
    retry = {UNSTABLE_OFFSET_COMMIT: "UNSTABLE_OFFSET_COMMIT", COORDINATOR_LOAD_IN_PROGRESS:
             "COORDINATOR_LOAD_IN_PROGRESS", COORDINATOR_NOT_AVAILABLE: "COORDINATOR_NOT_AVAILABLE",
             NOT_COORDINATOR: "NOT_COORDINATOR"}
    codes = [resp.error_code]
    found: dict[TopicPartition, tuple[int | None, str | None]] = {}
    for topic, partitions, _ in resp.topics or ():
        for index, offset, _epoch, metadata, code, _ in partitions or ():
            codes.append(code)
            found[TopicPartition(topic, index)] = (offset if offset >= 0 else None, metadata)
    for code in codes:
        if code in retry:
            return None, f"{retry[code]} ({code})"
    for code in codes:
        if code != NONE:
            raise for_code(code)(f"OffsetFetch v7 for group {group_id!r}: {_code_name(code)} ({code})")
    if set(found) != set(wanted):
        raise MalformedResponse(f"OffsetFetch answered for {sorted(found)}, asked {sorted(wanted)}")
    return found, ""
