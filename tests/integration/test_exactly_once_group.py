"""kafka.transactions = per_worker (streamer/delivery/exactly_once_group.py) against Apache Kafka: one
producer commits every partition of the worker, and a zombie worker (its generation over) can neither
commit offsets nor make its outputs visible; the same producer goes on under the new generation. The rest
of the exactly-once suite runs on per_worker with STREAMER_KAFKA__TRANSACTIONS=per_worker
(tests/kafka_utils.py)."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaProducer

from streamer.delivery import CheckpointPlan, ExactlyOnceGroupDelivery, TransactionFailed
from streamer.kafka.clients import make_consumer, make_producer, read_records
from streamer.kafka.kip447 import Kip447Producer, committed_offsets_stable, group_metadata
from streamer.runtime import Worker
from streamer.delivery.exactly_once import TXN_METADATA_PREFIX
from tests.kafka_utils import isolated_settings, joined_consumer, poll_until

pytestmark = pytest.mark.integration
TEST_TIMEOUT_S = 150.0


def _producers(k):
    def make(tid: str, kip447: bool) -> AIOKafkaProducer:
        return make_producer(k, transactional_id=tid, producer_class=Kip447Producer if kip447 else AIOKafkaProducer)
    return make


def _plan(offsets: dict, records: dict | None = None):
    return lambda partitions: CheckpointPlan({tp: o for tp, o in offsets.items() if tp in partitions},
                                             lambda tp: list((records or {}).get(tp, ())))


def test_a_zombie_worker_of_an_old_generation_can_neither_commit_offsets_nor_be_seen(broker):
    """The worker commits both partitions in one transaction; a second member joins, so the worker's
    generation is over, but it was never told (no rebalance listener: a zombie). Its next checkpoint, with
    an output of its own in the transaction, is refused by the group coordinator: every partition is lost
    (on_fenced, once, with both), the offsets stay where the first commit left them and a read_committed
    reader never sees the output. The same producer then commits under the new generation."""
    s = isolated_settings(broker.bootstrap, partitions=2, kafka={"transactions": "per_worker", "worker_id": "zombie"})
    k = s.kafka

    async def main():
        first = await joined_consumer(k, "first", partitions=2)
        tps = sorted(first.assignment())
        lost: list[list] = []
        zombie = ExactlyOnceGroupDelivery(k, _producers(k), lambda: group_metadata(first), on_fenced=lost.append)
        second = None
        try:
            await zombie.start()
            for tp in tps:
                await zombie.open(tp)
            first_commit = await zombie.checkpoint(set(tps), _plan({tp: 3 for tp in tps}), first, k.group_id)
            generation = zombie._owned[tps[0]].group.generation_id
            second = await joined_consumer(k, "second")
            await poll_until([first, second], lambda: first._coordinator.generation > generation
                              and len(first.assignment()) == 1 and len(second.assignment()) == 1,
                              "the rebalance after the second member joined")
            async with zombie.deliver(tps[0]) as block:
                assert block.owned
                await block.send(k.flags_topic, b"zombie-output", key=b"bed-z", out_partition=0)
            refused = await zombie.checkpoint({tps[0]}, _plan({tp: 9 for tp in tps}), first, k.group_id)
            outputs_stand = block.stands()
            after_refusal = await committed_offsets_stable(first, tps, timeout_s=20.0)
            # the same producer, the partition this member still owns, the generation it has now
            for tp in tps:
                await zombie.close(tp)
            mine = sorted(first.assignment())
            await zombie.open(mine[0])
            async with zombie.deliver(mine[0]) as later:
                await later.send(k.flags_topic, b"after-the-rejoin", key=b"bed-a", out_partition=0)
            again = await zombie.checkpoint({mine[0]}, _plan({mine[0]: 11}), first, k.group_id)
            final = await committed_offsets_stable(first, tps, timeout_s=20.0)
            seen = await read_records(k, [k.flags_topic], timeout_s=60,
                                      until=lambda rs: any(r.value == b"after-the-rejoin" for r in rs))
            return tps, first_commit, lost, refused, outputs_stand, after_refusal, mine, again, final, seen, \
                zombie.lost_transactions
        finally:
            await zombie.stop()
            for consumer in (second, first):
                if consumer is not None:
                    await consumer.stop()

    tps, first_commit, lost, refused, outputs_stand, after_refusal, mine, again, final, seen, lost_count = \
        asyncio.run(asyncio.wait_for(main(), TEST_TIMEOUT_S))
    metadata = f"{TXN_METADATA_PREFIX}{s.kafka.transactional_id_prefix}"
    assert first_commit == {tp: 3 for tp in tps}
    assert refused == {} and lost == [tps] and lost_count == 1 and not outputs_stand
    assert after_refusal == {tp: (3, metadata) for tp in tps}, after_refusal
    assert again == {mine[0]: 11}
    assert final == {tp: (11 if tp == mine[0] else 3, metadata) for tp in tps}, final
    values = [r.value for r in seen]
    assert b"after-the-rejoin" in values and b"zombie-output" not in values, values


def test_a_worker_on_per_worker_flags_every_window_once_with_one_transactional_id(broker, scorer):
    """The worker chooses per_worker from the setting, takes one id for all its partitions and commits
    each partition's offsets with its transactional id prefix named (the takeover check still works)."""
    from streamer.offline.recordings import parse_start
    from streamer.offline.replay import replay, synthetic_fleet
    from tests.kafka_utils import expected_windows, flags_of, read_topic, scored_ids

    s = isolated_settings(broker.bootstrap, partitions=2, kafka={"transactions": "per_worker"})
    fleet = [src for src, _ in synthetic_fleet(3, 21.0, parse_start("2026-12-06T05:00:00Z"), seed=4)]
    expected = expected_windows(fleet)

    async def main():
        worker = Worker(s, scorer=scorer)
        task = asyncio.create_task(worker.run())
        try:
            await replay(s.kafka, fleet, speed=None, chunk_s=0.5)
            records = await read_topic(s.kafka, s.kafka.flags_topic, timeout_s=90,
                                       until=lambda rs: expected <= set(scored_ids(flags_of(rs))))
            delivery = worker.parts.delivery
            owned = sorted(delivery._owned)
        finally:
            worker.stop()
            code = await asyncio.wait_for(task, 60)
        reader = make_consumer(s.kafka)
        await reader.start()
        try:
            committed = await committed_offsets_stable(reader, owned, timeout_s=20.0)
        finally:
            await reader.stop()
        return delivery, owned, code, flags_of(records), committed

    delivery, owned, code, flags, committed = asyncio.run(asyncio.wait_for(main(), TEST_TIMEOUT_S))
    assert code == 0
    assert isinstance(delivery, ExactlyOnceGroupDelivery)
    assert delivery.transactional_id(owned[0]) == delivery.transactional_id(owned[1]) == delivery.worker_id
    assert delivery.worker_id.startswith(f"{s.kafka.transactional_id_prefix}-worker-")
    assert len(owned) == 2 and delivery.lost_transactions == 0
    ids = [f["window_id"] for f in flags]
    assert expected <= set(scored_ids(flags)) and len(ids) == len(set(ids))
    metadata = f"{TXN_METADATA_PREFIX}{s.kafka.transactional_id_prefix}"
    assert all(offset is not None and meta == metadata for offset, meta in committed.values()), committed


def test_a_refused_record_of_one_partition_aborts_the_worker_transaction_and_no_offset_moves(broker):
    """One transaction = [a record of partition 0 the broker refuses, a record of partition 1 it accepts,
    both partitions' offsets]: the checkpoint fails naming the refusing topic, nothing is visible to a
    read_committed reader, neither offset moves, and the delivery refuses to go on (the worker stops)."""
    from tests.kafka_utils import set_topic_config

    s = isolated_settings(broker.bootstrap, partitions=2, kafka={"transactions": "per_worker", "worker_id": "refused"})
    k = s.kafka
    asyncio.run(set_topic_config(k, k.dead_letter_topic, **{"max.message.bytes": "200"}))

    async def main():
        consumer = await joined_consumer(k, "only", partitions=2)
        tps = sorted(consumer.assignment())
        delivery = ExactlyOnceGroupDelivery(k, _producers(k), lambda: group_metadata(consumer))
        try:
            await delivery.start()
            for tp in tps:
                await delivery.open(tp)
            async with delivery.gate(tps[0]):
                await delivery.send(tps[0], k.dead_letter_topic, b"x" * 1000, key=b"bed-1")  # too large
            async with delivery.gate(tps[1]):
                await delivery.send(tps[1], k.flags_topic, b'{"accepted": true}', key=b"bed-2")
            with pytest.raises(TransactionFailed, match=f"refused; first on {k.dead_letter_topic}"):
                await delivery.checkpoint({tps[1]}, _plan({tp: 42 for tp in tps}), consumer, k.group_id)
            with pytest.raises(TransactionFailed):
                async with delivery.gate(tps[1]):
                    pass
            committed = await committed_offsets_stable(consumer, tps, timeout_s=20.0)
        finally:
            await delivery.stop()
            await consumer.stop()
        visible = await read_records(k, [k.flags_topic, k.dead_letter_topic], timeout_s=4, idle_polls=None)
        return tps, committed, visible

    tps, committed, visible = asyncio.run(asyncio.wait_for(main(), TEST_TIMEOUT_S))
    assert visible == [], "a record of an aborted transaction became visible"
    assert set(committed) == set(tps) and all(offset is None for offset, _ in committed.values()), committed


def test_a_partition_that_leaves_uncommitted_aborts_only_what_the_transaction_held(broker):
    """Partition 0 leaves with a record in the open transaction (no checkpoint came first): the transaction
    is aborted, so that record is never seen; partition 1 had nothing in it, loses nothing and goes on in a
    new transaction, whose commit is seen with its offset."""
    s = isolated_settings(broker.bootstrap, partitions=2, kafka={"transactions": "per_worker", "worker_id": "leave"})
    k = s.kafka

    async def main():
        consumer = await joined_consumer(k, "only", partitions=2)
        tps = sorted(consumer.assignment())
        lost: list[list] = []
        delivery = ExactlyOnceGroupDelivery(k, _producers(k), lambda: group_metadata(consumer), on_fenced=lost.append)
        try:
            await delivery.start()
            for tp in tps:
                await delivery.open(tp)
            async with delivery.deliver(tps[0]) as block:
                await block.send(k.flags_topic, b"left-uncommitted", key=b"bed-0", out_partition=0)
            await delivery.close(tps[0])
            async with delivery.deliver(tps[1]) as block:
                await block.send(k.flags_topic, b"stays", key=b"bed-1", out_partition=1)
            committed = await delivery.checkpoint({tps[1]}, _plan({tps[1]: 5}), consumer, k.group_id)
            offsets = await committed_offsets_stable(consumer, tps, timeout_s=20.0)
        finally:
            await delivery.stop()
            await consumer.stop()
        seen = await read_records(k, [k.flags_topic], timeout_s=30,
                                  until=lambda rs: any(r.value == b"stays" for r in rs))
        return tps, lost, committed, offsets, [r.value for r in seen]

    tps, lost, committed, offsets, values = asyncio.run(asyncio.wait_for(main(), TEST_TIMEOUT_S))
    assert lost == [], "partition 1 had nothing in the aborted transaction"
    assert committed == {tps[1]: 5} and offsets[tps[1]][0] == 5 and offsets[tps[0]][0] is None, offsets
    assert b"stays" in values and b"left-uncommitted" not in values, values


def test_a_partition_assigned_as_the_worker_stops_starts_nothing(broker):
    """The worker stops its delivery before its consumer, so an assignment can land after `stop` began:
    that partition gets no producer and no transaction (a gate yields False: its outputs are dropped, as
    for a partition no longer owned), and no producer outlives the delivery. Before, `open` found no
    producer and started a new one, whose transaction nothing ever ended."""
    s = isolated_settings(broker.bootstrap, partitions=2, kafka={"transactions": "per_worker", "worker_id": "stops"})
    k = s.kafka
    made: list[AIOKafkaProducer] = []

    def counted(tid: str, kip447: bool) -> AIOKafkaProducer:
        made.append(_producers(k)(tid, kip447))
        return made[-1]

    async def main():
        consumer = await joined_consumer(k, "only", partitions=2)
        tps = sorted(consumer.assignment())
        delivery = ExactlyOnceGroupDelivery(k, counted, lambda: group_metadata(consumer))
        try:
            await delivery.start()
            await delivery.open(tps[0])
            await delivery.stop()
            await delivery.open(tps[1])
            for tp in tps:
                async with delivery.gate(tp) as owned:
                    assert owned is False, f"{tp} still takes outputs after stop"
        finally:
            await consumer.stop()

    asyncio.run(asyncio.wait_for(main(), TEST_TIMEOUT_S))
    assert len(made) == 1, f"{len(made)} producers: one started after stop"
    assert all(p._closed for p in made), "a producer outlived the delivery"

