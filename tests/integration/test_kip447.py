"""KIP-447 against Apache Kafka (the `broker` fixture): TxnOffsetCommit v3 fenced by the group generation and
OffsetFetch v7 with require_stable, through streamer/kafka/kip447.py on aiokafka's clients."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.structs import TopicPartition

from streamer.kafka.clients import committed_offsets
from streamer.kafka.kip447 import (ILLEGAL_GENERATION, OFFSET_FETCH_KEY, TXN_OFFSET_COMMIT_KEY,
                                   UNSTABLE_OFFSET_COMMIT, GroupFenced, Kip447Producer, StableOffsetFetch,
                                   UnstableOffsets, committed_offsets_stable, group_metadata)
from tests.kafka_utils import isolated_settings, joined_consumer, poll_until

TEST_TIMEOUT_S = 120.0


def _producer(bootstrap: str, cls=Kip447Producer) -> AIOKafkaProducer:
    return cls(bootstrap_servers=bootstrap, transactional_id=f"kip447-{uuid.uuid4().hex[:8]}",
               enable_idempotence=True, acks="all", request_timeout_ms=15000)


def _alive(producer: AIOKafkaProducer) -> bool:
    return not producer._sender.sender_task.done()


def test_one_producer_commits_two_partitions_with_v3_visible_only_after_commit(broker):
    s = isolated_settings(broker.bootstrap, partitions=2)
    topic = s.kafka.input_topics[0]
    tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]

    async def main():
        consumer = await joined_consumer(s.kafka, "only", partitions=2)
        producer = _producer(broker.bootstrap)
        await producer.start()
        try:
            offered = {node: (v[TXN_OFFSET_COMMIT_KEY], v[OFFSET_FETCH_KEY])
                       for node, v in producer.broker_versions.items()}
            member = group_metadata(consumer)
            await producer.begin_transaction()
            await producer.send_offsets_to_transaction({tps[0]: 11, tps[1]: 22}, member)
            # open: the stable fetch waits, the plain (aiokafka v3, no require_stable) one sees nothing yet
            with pytest.raises(UnstableOffsets):
                await committed_offsets_stable(consumer, tps, timeout_s=1.0)
            before = await committed_offsets(consumer, tps)
            await producer.commit_transaction()
            after = await committed_offsets_stable(consumer, tps, timeout_s=20.0)
            return offered, member, before, after
        finally:
            await producer.stop()
            await consumer.stop()

    offered, member, before, after = asyncio.run(asyncio.wait_for(main(), TEST_TIMEOUT_S))
    assert all(t[1] >= 3 and o[1] >= 7 for t, o in offered.values()), offered
    assert member.generation_id >= 1 and member.member_id
    assert [offset for offset, _ in before.values()] == [None, None], before
    assert after == {tps[0]: (11, ""), tps[1]: (22, "")}


def test_a_stale_generation_is_refused_and_the_same_producer_commits_after_abort(broker):
    """A member's generation ends when a second member joins; a commit still carrying it is refused by the
    coordinator (ILLEGAL_GENERATION: the member id is the same, only the generation is old). The producer
    aborts and commits the next transaction with the fresh generation. Control: aiokafka's own v0 commit of
    the same offsets from the same stale moment is accepted, so the refusal is v3's generation check."""
    s = isolated_settings(broker.bootstrap, partitions=2)
    topic = s.kafka.input_topics[0]

    async def main():
        first = await joined_consumer(s.kafka, "first", partitions=2)
        stale = group_metadata(first)
        owned_then = sorted(first.assignment())
        second = await joined_consumer(s.kafka, "second")
        try:
            await poll_until([first, second],
                              lambda: first._coordinator.generation > stale.generation_id
                              and len(first.assignment()) == 1 and len(second.assignment()) == 1,
                              "the rebalance after the second member joined")
            fresh = group_metadata(first)
            producer = _producer(broker.bootstrap)
            await producer.start()
            try:
                await producer.begin_transaction()
                with pytest.raises(GroupFenced) as refused:
                    await producer.send_offsets_to_transaction({tp: 5 for tp in owned_then}, stale)
                alive_after_refusal = _alive(producer)
                await producer.abort_transaction()
                mine = sorted(first.assignment())
                await producer.begin_transaction()
                await producer.send_offsets_to_transaction({tp: 9 for tp in mine}, fresh)
                await producer.commit_transaction()
                committed = await committed_offsets_stable(first, mine, timeout_s=20.0)
                alive_at_end = _alive(producer)
            finally:
                await producer.stop()
            # the control: an unfenced v0 commit from the same stale moment goes through
            plain = _producer(broker.bootstrap, cls=AIOKafkaProducer)
            await plain.start()
            try:
                await plain.begin_transaction()
                await plain.send_offsets_to_transaction({tp: 3 for tp in owned_then}, stale.group_id)
                await plain.commit_transaction()
            finally:
                await plain.stop()
            unfenced = await committed_offsets_stable(first, owned_then, timeout_s=20.0)
            return stale, fresh, refused.value, alive_after_refusal, mine, committed, alive_at_end, unfenced
        finally:
            await second.stop()
            await first.stop()

    stale, fresh, refused, alive_after_refusal, mine, committed, alive_at_end, unfenced = asyncio.run(
        asyncio.wait_for(main(), TEST_TIMEOUT_S))
    # the refusal is about the old generation, not a missing one: -1 never reaches the wire
    assert stale.generation_id >= 1 and fresh.generation_id > stale.generation_id
    assert stale.member_id == fresh.member_id
    assert refused.code == ILLEGAL_GENERATION, refused
    assert alive_after_refusal and alive_at_end
    assert len(mine) == 1 and committed == {mine[0]: (9, "")}
    assert unfenced == {tp: (3, "") for tp in [TopicPartition(topic, 0), TopicPartition(topic, 1)]}


def test_a_stable_fetch_waits_for_an_open_transaction_holding_the_groups_offsets(broker):
    s = isolated_settings(broker.bootstrap, partitions=2)
    tp = TopicPartition(s.kafka.input_topics[0], 0)

    async def main():
        consumer = await joined_consumer(s.kafka, "reader", partitions=2)
        other = _producer(broker.bootstrap)
        await other.start()
        try:
            await other.begin_transaction()
            await other.send_offsets_to_transaction({tp: 7}, group_metadata(consumer))
            waiting = asyncio.ensure_future(committed_offsets_stable(consumer, [tp], timeout_s=60.0))
            # the raw answer while the transaction is open
            coordinator = consumer._coordinator
            await coordinator.ensure_coordinator_known()
            raw = await coordinator._send_req(StableOffsetFetch(s.kafka.group_id, [tp]))
            codes = [code for _, parts, _ in raw.topics for *_, code, _ in parts] + [raw.error_code]
            still_waiting = not waiting.done()
            await other.commit_transaction()
            found = await waiting
            return codes, still_waiting, found
        finally:
            await other.stop()
            await consumer.stop()

    codes, still_waiting, found = asyncio.run(asyncio.wait_for(main(), TEST_TIMEOUT_S))
    assert UNSTABLE_OFFSET_COMMIT in codes, codes
    assert still_waiting
    assert found == {tp: (7, "")}
