"""Exactly once against what aiokafka and Apache Kafka really do (issue 32): a refused record never
commits, delivery the brokers accept whatever the worker's clock, a shutdown that is clean at any moment and
bounded, readers blocked for a bounded time, restores past another owner's open transaction, episode
numbers that never depend on a clock, one transactional id prefix per group."""

from __future__ import annotations

import asyncio
import signal
import time

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from streamer.delivery import CheckpointPlan, ExactlyOnceDelivery, TransactionFailed
from streamer.client import decode_episode
from streamer.kafka.partitioning import home_partition
from streamer.kafka.clients import make_consumer, make_producer, read_records
from streamer.offline.recordings import Recording, parse_start, regular_times
from streamer.offline.replay import Source, replay
from streamer.synthetic import generate
from benchmarks.bench_txn import counting_requests
from benchmarks.campaigns.common import feed_in_background
from streamer.runtime import Worker
from tests.kafka_utils import (expected_windows, faketime_env, flags_of, isolated_settings, joined_consumer, log_events,
                               set_topic_config, start_worker_process, until_true, wait_for_event, wait_until)

pytestmark = pytest.mark.integration
T0 = parse_start("2026-12-01T05:00:00Z")


def _bed(name: str, seconds: float = 21.0, seed: int = 1) -> Source:
    n = int(500 * seconds)
    return Source(name, Recording(regular_times(n, 500, T0), generate(seconds, fs=500, seed=seed).values, 500.0))


async def _committed(k, tp: TopicPartition) -> int | None:
    consumer = make_consumer(k)  # the worker's group; never subscribes, so it does not join
    await consumer.start()
    try:
        return await consumer.committed(tp)
    finally:
        await consumer.stop()


def _an_open_transaction(delivery):
    """(its producer, its state: has_writes, sent) of an open transaction of either exactly-once delivery
    (kafka.transactions: per_partition, one per partition; per_worker, the worker's one)."""
    if isinstance(delivery, ExactlyOnceDelivery):
        txn = next(iter(delivery._txns.values()))
        return txn.producer, txn
    return delivery._producer, delivery._txn


def test_a_refused_record_aborts_the_whole_transaction_and_the_offsets_stay(broker):
    """Item 1, deterministic: one transaction = [a record the broker refuses, a record it accepts, consumer
    offset 42]. aiokafka alone would commit the accepted record and offset 42; here nothing is visible to a
    read_committed reader, the offset stays where it was, and the failure names the refusing topic."""
    s = isolated_settings(broker.bootstrap, partitions=1)
    k = s.kafka
    asyncio.run(set_topic_config(k, k.dead_letter_topic, **{"max.message.bytes": "200"}))
    tp = TopicPartition(k.input_topics[0], 0)

    async def main():
        delivery = ExactlyOnceDelivery(k, lambda tid: make_producer(k, transactional_id=tid))
        await delivery.open(tp)
        try:
            async with delivery.gate(tp):
                await delivery.send(tp, k.dead_letter_topic, b"x" * 1000, key=b"bed-1")  # refused: too large
                await delivery.send(tp, k.flags_topic, b'{"accepted": true}', key=b"bed-1")
            with pytest.raises(TransactionFailed, match=f"refused; first on {k.dead_letter_topic}"):
                await delivery.commit(tp, k.group_id, lambda: (42, []))
        finally:
            await delivery.stop()
        visible = await read_records(k, [k.flags_topic, k.dead_letter_topic], timeout_s=4, idle_polls=None)
        return visible, await _committed(k, tp)

    visible, committed = asyncio.run(main())
    assert visible == [], "a record of an aborted transaction became visible"
    assert committed is None, f"the offsets moved to {committed} over a refused record"


def test_the_delivery_interface_counts_in_the_transaction_and_a_refusal_fails_it(broker):
    """Exactly once through the interface both modes share (`deliver`, `checkpoint`): `counted` runs as the
    record joins the open transaction, a flag marks its partition as awaiting a commit, nothing is visible
    before the commit and everything after it, the commit hands the flag's wait to `on_committed`, and a
    refused record fails its block with TransactionFailed naming the topic."""
    s = isolated_settings(broker.bootstrap, partitions=1)
    k = s.kafka
    asyncio.run(set_topic_config(k, k.dead_letter_topic, **{"max.message.bytes": "200"}))
    tp = TopicPartition(k.input_topics[0], 0)
    waited: list[float] = []

    async def main():
        delivery = ExactlyOnceDelivery(k, lambda tid: make_producer(k, transactional_id=tid),
                                       on_committed=lambda joined, at: waited.extend(at - t for t in joined))
        await delivery.open(tp)
        try:
            counted = []
            async with delivery.deliver(tp) as block:
                assert block.owned
                await block.send(k.flags_topic, b'{"flag": 1}', key=b"bed-1", urgent=True,
                             counted=lambda: counted.append(delivery.awaiting.event.is_set()))
                assert counted == [True], "counted as it joined the transaction, awaiting its commit"
            assert block.stands() and delivery.awaiting.take_partitions() == {tp}
            before = await read_records(k, [k.flags_topic], timeout_s=3, idle_polls=None)
            plan = CheckpointPlan({tp: 7}, lambda _: iter(()))
            committed = await delivery.checkpoint({tp}, lambda _: plan, None, k.group_id)
            after = await read_records(k, [k.flags_topic], timeout_s=10, idle_polls=1)
            with pytest.raises(TransactionFailed, match=f"a record on {k.dead_letter_topic} was refused"):
                async with delivery.deliver(tp) as block:
                    await block.send(k.dead_letter_topic, b"x" * 1000, key=b"bed-1")  # over the topic's limit
        finally:
            await delivery.stop()
        return before, committed, after, await _committed(k, tp)

    before, committed, after, offset = asyncio.run(main())
    assert before == [], "a flag was visible before its transaction committed"
    assert committed == {tp: 7} and offset == 7
    assert [r.value for r in after] == [b'{"flag": 1}']
    assert len(waited) == 1 and 0 <= waited[0] < 30


def test_refused_state_records_stop_the_worker_loudly_and_nothing_is_committed(broker, scorer):
    """Item 1, the silent variant: the state topic refuses the patient states (a per-topic size limit)
    while flags pass. The worker must stop with exit 1 naming the state topic, with no flag visible and
    the offsets unmoved, instead of committing flags without the states that say they were reported."""
    s = isolated_settings(broker.bootstrap, partitions=1)
    k = s.kafka
    # AlterConfigs replaces a topic's whole configuration: the state topic stays compacted
    asyncio.run(set_topic_config(k, k.state_topic, **{"max.message.bytes": "64", "cleanup.policy": "compact"}))

    async def main():
        worker = Worker(s, scorer=scorer)
        task = asyncio.create_task(worker.run())
        try:
            await until_true(lambda: asyncio.sleep(0, bool(worker.core.partitions)), 60, "assignment")
            await replay(k, [_bed("bed-state")], speed=None, chunk_s=0.5)
            code = await asyncio.wait_for(task, 60)
        finally:
            worker.stop()
        flags = await read_records(k, [k.flags_topic], timeout_s=4, idle_polls=None)
        return code, worker.fatal, flags, await _committed(k, TopicPartition(k.input_topics[0], 0))

    code, fatal, flags, committed = asyncio.run(main())
    assert code == 1
    assert isinstance(fatal, TransactionFailed) and k.state_topic in str(fatal), repr(fatal)
    assert flags == [], "flags committed without the states that say they were reported"
    assert committed in (None, 0), f"the offsets moved to {committed} past records whose states were refused"


@pytest.mark.parametrize("offset", ["+2h", "-30m"])
def test_a_worker_clock_far_off_publishes_every_window_and_says_so(broker, checkpoint, tmp_path, offset):
    """Item 2: a worker clock two hours ahead (past the brokers' 1 h limit on future timestamps) or half an
    hour behind, under libfaketime, with linger 100 ms: every window is flagged once, the delivery carry
    timestamps the brokers accepted, the worker logs clock_offset, and SIGTERM ends it with exit 0."""
    s = isolated_settings(broker.bootstrap, partitions=2)
    s.kafka.linger_ms = 100
    s.model.checkpoint = checkpoint
    beds = [_bed(f"skew-{i}", seed=i) for i in range(3)]
    log = tmp_path / "worker.log"
    proc = start_worker_process(s, log, **faketime_env(offset))
    try:
        wait_for_event(log, "partition_assigned", proc=proc)
        asyncio.run(replay(s.kafka, beds, speed=None, chunk_s=0.5))
        expected = expected_windows(beds)

        def flagged():
            records = asyncio.run(read_records(s.kafka, [s.kafka.flags_topic], timeout_s=3, idle_polls=1))
            return records if expected <= {(f["patient_id"], f["window_start_ns"]) for f in flags_of(records)} \
                else None

        records = wait_until(flagged, 90, "every window's flag", proc=proc)
        offsets = [e for e in log_events(log) if e.get("event") == "clock_offset"]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    ids = [f["window_id"] for f in flags_of(records)]
    assert len(ids) == len(set(ids)), "a window published twice"
    now_ms = time.time() * 1000
    assert all(r.timestamp <= now_ms + 60_000 for r in records), "an output stamped by the skewed clock"
    assert offsets, "no clock_offset log line"
    sign = 1 if offset.startswith("+") else -1
    assert sign * offsets[0]["offset_s"] > 1000, offsets[0]
    assert code == 0, [e for e in log_events(log) if e.get("level") == "error"][:3]


def test_a_stop_while_a_checkpoint_commits_is_clean(broker, scorer):
    """Item 3: the stop request arrives while a checkpoint's EndTxn is in flight (the broker frozen for a
    second at that moment). The shutdown waits for that commit instead of cancelling it into aiokafka's
    shielded EndTxn, and its final checkpoint succeeds: exit 0, no final_checkpoint_failed."""
    s = isolated_settings(broker.bootstrap, partitions=1)
    s.kafka.commit_interval_s = 0.2

    async def main():
        worker = Worker(s, scorer=scorer)
        task = asyncio.create_task(worker.run())
        try:
            await until_true(lambda: asyncio.sleep(0, bool(worker.core.partitions)), 60, "assignment")
            await replay(s.kafka, [_bed("bed-stop", seconds=11)], speed=None, chunk_s=0.5)
            await until_true(lambda: asyncio.sleep(0, bool(worker.core.ledger.committed)), 60, "a first commit")
            producer, _ = _an_open_transaction(worker.parts.delivery)
            real = producer.commit_transaction
            armed = [True]

            async def commit_with_a_stop():
                if armed and armed.pop():
                    broker.freeze()
                    asyncio.get_running_loop().call_later(1.0, broker.thaw)
                    worker.stop()
                await real()

            producer.commit_transaction = commit_with_a_stop
            # a commit happens only with something in the transaction: a window's flag
            await replay(s.kafka, [_bed("bed-late", seconds=11, seed=3)], speed=None, chunk_s=0.5)
            code = await asyncio.wait_for(task, 60)
            return code, armed
        finally:
            broker.thaw()
            worker.stop()

    code, armed = asyncio.run(main())
    assert not armed, "the stop never met a commit in flight"
    assert code == 0


def test_shutdown_during_a_broker_freeze_ends_within_its_deadline(broker, scorer):
    """Item 3: SIGTERM (stop) while the broker is frozen: the whole shutdown, final checkpoint included,
    ends within shutdown_deadline_s with exit 1, instead of waiting for the broker to come back."""
    s = isolated_settings(broker.bootstrap, partitions=1, shutdown_deadline_s=5.0)
    s.kafka.commit_interval_s = 2.0  # room to freeze the broker while a flag waits in the open transaction
    s.kafka.commit_after_flags = False  # flags wait for the periodic checkpoint, not their own commit

    async def main():
        worker = Worker(s, scorer=scorer)
        task = asyncio.create_task(worker.run())
        try:
            await until_true(lambda: asyncio.sleep(0, bool(worker.core.partitions)), 60, "assignment")
            await replay(s.kafka, [_bed("bed-freeze", seconds=11)], speed=None, chunk_s=0.5)
            await until_true(lambda: asyncio.sleep(0, bool(worker.core.ledger.committed)), 60, "a first commit")
            await replay(s.kafka, [_bed("bed-more", seconds=11, seed=2)], speed=None, chunk_s=0.5)
            _, txn = _an_open_transaction(worker.parts.delivery)
            await until_true(lambda: asyncio.sleep(0, txn.has_writes and bool(txn.sent)), 60,
                             "a flag in the transaction")
            broker.freeze()
            t0 = time.monotonic()
            worker.stop()
            code = await asyncio.wait_for(task, 30)
            return code, time.monotonic() - t0, worker.deadline_exceeded
        finally:
            broker.thaw()
            worker.stop()

    code, took, exceeded = asyncio.run(main())
    print(f"shutdown with a frozen broker: {took:.1f} s (deadline 5 s)")
    assert code == 1 and exceeded
    assert took <= 5.0 + 1.0, f"the shutdown took {took:.1f} s"  # the deadline, and the loop's scheduling


async def _end_offsets(k, topic: str, partitions: int):
    """(last stable offsets, high watermarks) of `topic`: what read_committed readers can reach, and the end."""
    committed = make_consumer(k, group_id=None, client_id="lso-reader")
    uncommitted = AIOKafkaConsumer(bootstrap_servers=k.bootstrap_servers, isolation_level="read_uncommitted")
    await committed.start()
    await uncommitted.start()
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    try:
        return await committed.end_offsets(tps), await uncommitted.end_offsets(tps)
    finally:
        await committed.stop()
        await uncommitted.stop()


def _blocked(k, topic: str, partitions: int) -> bool:
    lso, hw = asyncio.run(_end_offsets(k, topic, partitions))
    return lso != hw


def test_readers_are_blocked_for_a_bounded_time_after_a_kill_9(broker, checkpoint, tmp_path):
    """Item 4: SIGKILL in the middle of a stream, no successor: read_committed readers of the flags topic
    wait at most the transaction timeout (10 s) plus the brokers' abort check (5 s on the suite's broker,
    10 s by default), well inside the 35 s suppression lease; with a successor, as long as the group takes
    to hand the partitions over (the session timeout, 6 s here)."""
    s = isolated_settings(broker.bootstrap, partitions=2)
    s.model.checkpoint = checkpoint
    s.kafka.commit_interval_s = 2.0  # flags wait in open transactions long enough to kill the worker then
    s.kafka.commit_after_flags = False
    beds = [_bed(f"kill-{i}", seconds=60, seed=i) for i in range(4)]
    log = tmp_path / "worker.log"
    figures = {}
    for successor in (False, True):
        proc = start_worker_process(s, log)
        wait_for_event(log, "partition_assigned", proc=proc)
        feeder = feed_in_background(s.kafka, beds, speed=4.0)
        nxt = None
        try:
            # the moment that blocks readers longest: a flag in a transaction still open
            wait_until(lambda: _blocked(s.kafka, s.kafka.flags_topic, 2), 90, "a flag in an open transaction",
                       interval_s=0.01, proc=proc)
            proc.kill()
            t_kill = time.monotonic()
            proc.wait(10)
            if successor:
                nxt = start_worker_process(s, log)
            wait_until(lambda: not _blocked(s.kafka, s.kafka.flags_topic, 2), 40, "readers unblocked")
            figures[successor] = time.monotonic() - t_kill
        finally:
            feeder.join(120)
            if nxt is not None:
                nxt.send_signal(signal.SIGTERM)
                nxt.wait(60)
    print(f"read_committed readers blocked after SIGKILL: alone {figures[False]:.1f} s, "
          f"with a successor {figures[True]:.1f} s")
    assert figures[False] <= 10 + 5 + 3, figures
    assert figures[True] <= 10 + 5 + 3, figures


def test_outputs_line_up_with_the_input_partitions_under_crc32(broker, scorer):
    """Item 4: monitors on librdkafka's default partitioner (crc32): every flag and episode lies in the
    output partition of the same number as its patient's input partition, so one input partition's open
    transaction blocks readers of that output partition only."""
    s = isolated_settings(broker.bootstrap, partitions=4)
    s.kafka.input_partitioner = "crc32"
    beds = [_bed(f"crc-{i}", seconds=11, seed=i) for i in range(8)]
    homes = {b.patient_id: home_partition(b.patient_id.encode(), 4, "crc32") for b in beds}
    assert any(homes[p] != home_partition(p.encode(), 4, "murmur2") for p in homes), "the test needs them apart"

    async def main():
        worker = Worker(s, scorer=scorer)
        task = asyncio.create_task(worker.run())
        try:
            await until_true(lambda: asyncio.sleep(0, len(worker.core.partitions) == 4), 60, "assignment")
            from streamer.ingest.producer import chunks_of, encode

            producer = make_producer(s.kafka)  # a gateway that places records as librdkafka's default does
            await producer.start()
            for b in beds:
                for c in chunks_of(b.patient_id, b.recording.times_ns, b.recording.values, 250, fs=500.0):
                    await producer.send(s.kafka.input_topics[0], encode(c), key=b.patient_id.encode(),
                                        partition=homes[b.patient_id])
            await producer.flush()
            await producer.stop()

            async def flagged():
                records = await read_records(s.kafka, [s.kafka.flags_topic], timeout_s=2, idle_polls=1)
                return len({r.key for r in records}) == len(beds)

            await until_true(flagged, 90, "a flag of every bed")
            return await read_records(s.kafka, [s.kafka.flags_topic], timeout_s=3, idle_polls=1)
        finally:
            worker.stop()
            await asyncio.wait_for(task, 60)

    records = asyncio.run(main())
    misplaced = [(r.key, r.partition) for r in records if r.partition != homes[r.key.decode()]]
    assert misplaced == []


def test_a_restore_reads_past_another_topics_open_transaction(broker):
    """Item 5: state partition 0 is written by the owners of partition 0 of two input topics. The other
    topic's owner has a transaction open (it died, or stalls) below this topic's latest states: the restore
    waits for it to end and returns the latest state, never an older one from below the stable offset."""
    from streamer.state.changelog import read_states, state_key
    from streamer.state.patients import PatientState

    s = isolated_settings(broker.bootstrap, partitions=1)
    k = s.kafka
    mine, theirs = k.input_topics[0], f"{k.input_topics[0]}-other"

    def state(pid: str, seq: int) -> bytes:
        st = PatientState(pid)
        st.episode.seq = seq
        return st.to_bytes(mine)

    async def main():
        other = make_producer(k, transactional_id=f"{k.group_id}-{theirs}-0")
        owner = make_producer(k, transactional_id=f"{k.group_id}-{mine}-0")
        await other.start()
        await owner.start()
        await owner.begin_transaction()
        await (await owner.send(k.state_topic, state("bed-r", 1), key=state_key(mine, "bed-r"), partition=0))
        await owner.commit_transaction()
        await other.begin_transaction()  # left open, below the latest state
        await (await other.send(k.state_topic, b"x", key=state_key(theirs, "bed-x"), partition=0))
        await owner.begin_transaction()
        await (await owner.send(k.state_topic, state("bed-r", 2), key=state_key(mine, "bed-r"), partition=0))
        await owner.commit_transaction()
        reader = make_consumer(k, group_id=None, client_id="restore")
        await reader.start()
        try:
            restore = asyncio.create_task(read_states(reader, k.state_topic, [TopicPartition(mine, 0)],
                                                      idle_timeout_s=30))
            # the restore must still be waiting on the open transaction: it may end no sooner (old code: at once)
            early = bool((await asyncio.wait({restore}, timeout=2.0))[0])
            await other.abort_transaction()
            restored = await asyncio.wait_for(restore, 30)
        finally:
            await reader.stop()
            await other.stop()
            await owner.stop()
        return early, restored

    early, restored = asyncio.run(main())
    assert not early, "the restore stopped at the other owner's open transaction"
    assert restored.states[TopicPartition(mine, 0)]["bed-r"].episode.seq == 2


def test_after_a_state_loss_the_episode_seq_stays_above_what_readers_saw(broker, scorer):
    """Item 6: readers saw seq S for a bed; its state is then unreadable and the next owner's clock is 30
    minutes behind. Its state_lost close must still be numbered above S (read back from the episodes topic),
    or SuppressionView would ignore every later message of that bed."""
    s = isolated_settings(broker.bootstrap, partitions=1)
    k = s.kafka
    seen = int(time.time() * 1_000_000) + 5
    from streamer.state.changelog import state_key

    async def main():
        producer = make_producer(k)
        await producer.start()
        # an open episode as a worker writes it (a record the readers' decoder refuses is no floor: issue 45)
        now_ns, lease_ns = time.time_ns(), 30 * 10**9
        opened = {"schema": 2, "patient_id": "bed-seq", "episode_id": f"bed-seq:{now_ns - 20 * 10**9}", "seq": seen,
                  "state": "open", "renewal": False, "reason": None, "start_ns": now_ns - 20 * 10**9, "end_ns": None,
                  "last_flagged_end_ns": now_ns - 10**9, "peak_probability": 0.9, "flagged_windows": 2,
                  "model": "m", "updated_at_ns": now_ns, "valid_until_ns": now_ns + lease_ns, "lease_ns": lease_ns}
        assert decode_episode(orjson.dumps(opened)).seq == seen
        await producer.send_and_wait(k.episodes_topic, orjson.dumps(opened), key=b"bed-seq", partition=0)
        await producer.send_and_wait(k.state_topic, b"\x00 not a state", key=state_key(k.input_topics[0], "bed-seq"),
                                     partition=0)
        await producer.stop()
        worker = Worker(s, scorer=scorer, clock=lambda: time.time() - 1800)
        task = asyncio.create_task(worker.run())
        try:
            async def closed():
                records = await read_records(k, [k.episodes_topic], timeout_s=2, idle_polls=1)
                return [orjson.loads(r.value) for r in records][1:]

            await until_true(closed, 60, "the state_lost close")
            return await closed()
        finally:
            worker.stop()
            await asyncio.wait_for(task, 60)

    after = asyncio.run(main())
    assert after[0]["reason"] == "state_lost"
    assert after[0]["seq"] > seen, f"seq went backwards: {after[0]['seq']} after {seen}"


def test_a_worker_with_another_transactional_id_prefix_is_refused(broker, scorer):
    """Item 7: a per-worker prefix would turn fencing off. The group's last commit names its prefix; a
    worker with another one refuses the partition (exit 1, naming both) unless told the previous prefix
    during a planned change, and then fences the previous ids first."""
    s = isolated_settings(broker.bootstrap, partitions=1)

    async def run_until_committed(settings):
        worker = Worker(settings, scorer=scorer)
        task = asyncio.create_task(worker.run())
        try:
            await until_true(lambda: asyncio.sleep(0, bool(worker.core.partitions) or task.done()), 60, "assignment")
            if task.done():
                return task.result(), worker
            await replay(settings.kafka, [_bed("bed-prefix", seconds=11)], speed=None, chunk_s=0.5)
            await until_true(lambda: asyncio.sleep(0, bool(worker.core.ledger.committed) or task.done()), 60,
                             "a commit")
        finally:
            worker.stop()
        return await asyncio.wait_for(task, 60), worker

    code, _ = asyncio.run(run_until_committed(s))
    assert code == 0
    pod = s.model_copy(deep=True)
    pod.kafka.transactional_id_prefix = "pod-b"
    code, worker = asyncio.run(run_until_committed(pod))
    assert code == 1
    assert "'pod-b'" in str(worker.fatal) and repr(s.kafka.group_id) in str(worker.fatal), worker.fatal
    pod.kafka.previous_transactional_id_prefix = s.kafka.group_id
    code, _ = asyncio.run(run_until_committed(pod))
    assert code == 0


def test_a_fenced_transaction_costs_the_partition_not_the_worker(broker, scorer):
    """A transaction fenced while the worker still owns its partition (here another producer takes the
    transactional id; after a broker failover that outlasts kafka.transaction_timeout_ms the broker's abort
    does the same): the worker drops the partition, rejoins the group, restores it from its last commit and
    goes on. Every window of both beds is flagged exactly once, and SIGTERM still ends it with exit 0."""
    s = isolated_settings(broker.bootstrap, partitions=1)
    k = s.kafka
    first, second = _bed("bed-before", seconds=11), _bed("bed-after", seconds=21, seed=2)

    async def main():
        worker = Worker(s, scorer=scorer)
        task = asyncio.create_task(worker.run())
        try:
            await until_true(lambda: asyncio.sleep(0, bool(worker.core.partitions)), 60, "assignment")
            tp = next(iter(worker.core.partitions))
            await replay(k, [first], speed=None, chunk_s=0.5)
            await until_true(lambda: asyncio.sleep(0, bool(worker.core.ledger.committed.get(tp))), 60, "a first commit")
            rival = make_producer(k, transactional_id=worker.parts.delivery.transactional_id(tp))
            await rival.start()  # InitProducerId: a newer epoch; the worker's open transaction is aborted
            await rival.stop()
            await replay(k, [second], speed=None, chunk_s=0.5)
            expected = expected_windows([first, second])

            async def flagged():
                records = await read_records(k, [k.flags_topic], timeout_s=2, idle_polls=1)
                seen = {(f["patient_id"], f["window_start_ns"]) for f in flags_of(records)}
                return records if expected <= seen else None

            records = await until_true(flagged, 90, "every window's flag after the fence")
            fenced = worker.core.metrics.registry.get_sample_value("streamer_transactions_fenced_total")
            worker.stop()
            return records, fenced, await asyncio.wait_for(task, 60), worker.fatal
        finally:
            worker.stop()

    records, fenced, code, fatal = asyncio.run(main())
    ids = [f["window_id"] for f in flags_of(records)]
    assert len(ids) == len(set(ids)), "a window published twice"
    assert fenced == 1, fenced
    assert code == 0 and fatal is None, fatal


def test_aiokafka_asks_for_a_transactions_partitions_as_their_records_come_unless_named_first(broker):
    """The premise of `ask_for_partitions` (kafka/clients.py), on aiokafka 0.14 and Apache Kafka: a record
    sent after the first one's partition joined costs an AddPartitionsToTxn of its own; its partition named
    right after the first send joins in the first one's request. A named partition with no record commits."""
    s = isolated_settings(broker.bootstrap, partitions=1)
    k = s.kafka
    from streamer.kafka.clients import ask_for_partitions

    async def one_transaction(tid: str, name_first: bool, write_state: bool = True) -> dict:
        counts: dict = {}
        producer = counting_requests(lambda: make_producer(k, transactional_id=tid), counts)()
        await producer.start()
        try:
            await producer.begin_transaction()
            flag = await producer.send(k.flags_topic, b"flag", key=b"bed-1", partition=0)
            if name_first:  # as the delivery does: right after the first send, before anything yields
                ask_for_partitions(producer, [TopicPartition(k.state_topic, 0)])
            await flag
            if write_state:
                await (await producer.send(k.state_topic, b"state", key=b"bed-1", partition=0))
            await producer.commit_transaction()
        finally:
            await producer.stop()
        return counts

    async def main():
        return (await one_transaction(f"{k.transactional_id_prefix}-a", False),
                await one_transaction(f"{k.transactional_id_prefix}-b", True),
                await one_transaction(f"{k.transactional_id_prefix}-c", True, write_state=False))

    late, named, unused = asyncio.run(main())
    assert late.get(24) == 2 and named.get(24) == 1 and unused.get(24) == 1, (late, named, unused)
    assert late.get(26) == named.get(26) == unused.get(26) == 1  # each committed (EndTxn answered)
    visible = asyncio.run(read_records(k, [k.flags_topic, k.state_topic], until=lambda got: len(got) >= 5,
                                       timeout_s=20, idle_polls=None))
    assert sorted(r.value for r in visible) == [b"flag", b"flag", b"flag", b"state", b"state"]


def test_a_flag_and_its_state_join_their_transaction_in_one_add_partitions_request(broker):
    """Issue 48 item 4, through the delivery (either mode: STREAMER_KAFKA__TRANSACTIONS): a partition's
    first flag of a transaction asks for its state partition too, so the checkpoint that writes the state
    record sends no AddPartitionsToTxn of its own; flag, state and offset commit together."""
    s = isolated_settings(broker.bootstrap, partitions=1)
    k = s.kafka
    tp = TopicPartition(k.input_topics[0], 0)
    counts: dict = {}
    plan = CheckpointPlan({tp: 5}, lambda _: [(k.state_topic, b"bed-1", b"state", 0)])

    async def main():
        if k.transactions == "per_worker":
            from aiokafka import AIOKafkaProducer

            from streamer.delivery import ExactlyOnceGroupDelivery
            from streamer.kafka.kip447 import Kip447Producer, group_metadata

            consumer = await joined_consumer(k, "only", partitions=1)
            delivery = ExactlyOnceGroupDelivery(k, counting_requests(
                lambda tid, kip447: make_producer(k, transactional_id=tid, producer_class=Kip447Producer
                                                  if kip447 else AIOKafkaProducer), counts),
                lambda: group_metadata(consumer))
            await delivery.start()
        else:
            consumer = None
            delivery = ExactlyOnceDelivery(k, counting_requests(lambda tid: make_producer(k, transactional_id=tid),
                                                                 counts))
        await delivery.open(tp)
        try:
            async with delivery.deliver(tp) as block:
                await block.send(k.flags_topic, b'{"flag": 1}', key=b"bed-1", urgent=True)
            before_checkpoint = counts.get(24, 0)
            committed = await delivery.checkpoint({tp}, lambda _: plan, consumer, k.group_id)
        finally:
            await delivery.stop()
            if consumer is not None:
                await consumer.stop()
        # the coordinator applies a transaction's offsets as it writes the commit markers, after EndTxn
        # returned: a plain OffsetFetch may still see the old offset for a moment
        return before_checkpoint, committed, await until_true(lambda: _committed(k, tp), 20, "the offset")

    before_checkpoint, committed, offset = asyncio.run(main())
    assert before_checkpoint == 1 and counts.get(24) == 1, counts
    assert committed == {tp: 5} and offset == 5
    visible = asyncio.run(read_records(k, [k.flags_topic, k.state_topic], until=lambda got: len(got) >= 2,
                                       timeout_s=20, idle_polls=None))
    assert sorted(r.value for r in visible) == [b"state", b'{"flag": 1}']


def test_a_partition_assigned_as_the_worker_stops_gets_no_producer(broker):
    """per_partition: an assignment landing after `stop` began (the worker stops its delivery before its
    consumer) opens nothing, so no partition's producer outlives the delivery (before, it was started and
    left running with an open transaction)."""
    s = isolated_settings(broker.bootstrap, partitions=2)
    k = s.kafka
    made: list = []

    def counted(tid: str):
        made.append(make_producer(k, transactional_id=tid))
        return made[-1]

    async def main():
        delivery = ExactlyOnceDelivery(k, counted)
        tps = [TopicPartition(k.input_topics[0], p) for p in (0, 1)]
        await delivery.open(tps[0])
        await delivery.stop()
        await delivery.open(tps[1])
        async with delivery.gate(tps[1]) as owned:
            assert owned is False

    asyncio.run(main())
    assert len(made) == 1 and all(p._closed for p in made), [p._closed for p in made]

