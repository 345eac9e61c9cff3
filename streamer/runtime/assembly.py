"""What a worker runs with, built in one place: `Core` when the worker is made (no I/O), `Parts` when it
starts (the model is loaded and the brokers answered), closed in reverse order (`Parts.close`).

Invariants: nothing is wired after it is built (each part gets its collaborators in its constructor); each
piece of state has one owner among them (the worker holds `Core` and `Parts`, the parts hold references,
never copies); the Worker (worker.py) only runs the loops and the shutdown.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from streamer.batching import MicroBatcher
from streamer.checkpointing import Checkpointer, OffsetsLedger
from streamer.delivery import Delivery
from streamer.delivery.event_time import ClockOffset, EventTime
from streamer.ingest.deadletter import DeadLetters
from streamer.ingest.partitioning import PartitionerWatch
from streamer.kafka.clients import make_consumer, request_rejoin
from streamer.kafka.kip447 import group_metadata
from streamer.kafka.partitioning import OutputRouting
from streamer.logs import get_logger
from streamer.metrics import HealthServer, InferenceWatch, IngestCounts, Metrics
from streamer.model.infer import ArtifactScorer
from streamer.model.scoring import WindowScorer
from streamer.partitions import OwnedPartitions
from streamer.publish.episodes import EpisodeTracker
from streamer.publish.publisher import Publisher
from streamer.runtime.ownership import PartitionOwnership
from streamer.runtime.startup import (StartupError, choose_delivery, dead_letter_topic_limit, output_routing,
                                      state_topic_problem)
from streamer.runtime.upkeep import Backpressure, Upkeep
from streamer.settings import Settings
from streamer.state.store import StateStore
from streamer.windows.buffer import EmittedWindow
from streamer.windows.stage import WindowStage

log = get_logger("streamer.worker")


@dataclass(frozen=True)
class Core:
    """The worker's own state and stages, which exist before any broker is reached: the patient states
    (`store`), the windows (`stage`), the offsets (`ledger`), the micro-batcher, the output stamps
    (`event_time`) and the partitions held (`partitions`: one object per assignment; what the consume loop
    reads, what the ledger keeps offsets on)."""
    settings: Settings
    clock: Callable[[], float]  # the wall clock episodes are stamped and aged by
    metrics: Metrics
    ingest_counts: IngestCounts
    store: StateStore
    stage: WindowStage
    ledger: OffsetsLedger
    batcher: MicroBatcher
    backpressure: Backpressure
    event_time: EventTime
    clock_offset: ClockOffset
    partitioner_watch: PartitionerWatch
    inference_watch: InferenceWatch
    settled: asyncio.Event  # set whenever an output is acknowledged (revocation waits on it)
    partitions: OwnedPartitions

    @classmethod
    def build(cls, settings: Settings, clock: Callable[[], float] = time.time) -> "Core":
        metrics = Metrics()
        partitions = OwnedPartitions()  # each partition's pieces hang on its object there
        store = StateStore(clock, owned=partitions)
        ledger = OffsetsLedger(partitions)
        k = settings.kafka
        core = cls(
            settings=settings, clock=clock, metrics=metrics, ingest_counts=IngestCounts(metrics), store=store,
            stage=WindowStage(settings.windows, store), ledger=ledger,
            batcher=MicroBatcher(settings.batching.max_batch, settings.batching.max_wait_ms),
            backpressure=Backpressure(settings.batching.max_pending_windows, ledger, metrics),
            event_time=EventTime(owned=partitions),
            clock_offset=ClockOffset(k.clock_offset_warn_s, metrics.clock_offset_s),
            partitioner_watch=PartitionerWatch(k.input_partitioner, k.input_topics, metrics.partitioner_mismatch),
            inference_watch=InferenceWatch(settings.model.inference_stall_s), settled=asyncio.Event(),
            partitions=partitions)
        metrics.watch_inference(core.inference_watch)
        metrics.watch_episodes(store.open_episodes)
        metrics.patient_states.set_function(store.count)
        return core


@dataclass(frozen=True)
class Hooks:
    """What the parts call back into the running worker."""
    fail: Callable[[BaseException], None]  # a failure the worker cannot continue from: stop, exit 1
    failed: Callable[[], bool]  # the worker has failed: nothing more is committed
    stopping: Callable[[], bool]  # the worker is shutting down
    checkpoint: Callable[[set[TopicPartition]], Awaitable[None]]
    submit: Callable[[EmittedWindow], None]  # a window to the batcher, held in the ledger
    ready: Callable[[], tuple[bool, str]]


class FenceWatch:
    """A partition's transaction was fenced (delivery/exactly_once.py): its open transaction is gone, so is
    this worker's claim on it: the partition is closed dirty at once (partitions.py). As Kafka Streams does,
    the worker rejoins the group: the revocation releases the partition without a drain or a checkpoint, and
    whoever the group gives it to (this worker, after a broker failover that outlasted the transaction
    timeout; the newer owner, if this one was a zombie) restores it from its last commit. Fenced more than
    `tolerated` times within `window_s`, the worker is fighting another owner, not riding out a failover:
    it fails."""

    def __init__(self, metrics: Metrics, partitions: OwnedPartitions, rejoin: Callable[[], None],
                 fail: Callable[[BaseException], None], tolerated: int = 5, window_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic):
        self.metrics, self.partitions, self.rejoin, self.fail = metrics, partitions, rejoin, fail
        self.tolerated, self.window_s, self.clock = tolerated, window_s, clock
        self.fences: list[float] = []  # monotonic times of the recent fences

    def __call__(self, tp: TopicPartition) -> None:
        self.together([tp])

    def together(self, tps: list[TopicPartition]) -> None:
        """One fence that cost these partitions at once (kafka.transactions = per_worker: the worker's one
        transaction was lost): each closed dirty, counted once, one rejoin."""
        for tp in tps:
            self.partitions.close_dirty(tp)  # nothing of it counts from now on; the revocation releases it
        self.metrics.fenced.inc()
        now = self.clock()
        self.fences = [t for t in self.fences if now - t < self.window_s] + [now]
        log.error("partition_fenced", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in tps),
                  fences=len(self.fences), action="rejoin the group")
        if len(self.fences) > self.tolerated:
            self.fail(RuntimeError(f"fenced {len(self.fences)} times in {self.window_s:.0f} s: another worker "
                                   "keeps taking these partitions' transactional ids"))
        else:
            self.rejoin()


@dataclass(frozen=True)
class Parts:
    """Everything built at start, once: the model's caller, where outputs go (`delivery`) and the clients,
    the checkpoint, the publisher, the dead letters, partition ownership, the once-a-second upkeep and the
    health server. `close` stops them in reverse order, within a deadline."""
    window_scorer: WindowScorer
    routing: OutputRouting
    delivery: Delivery
    producer: AIOKafkaProducer | None  # at least once: the delivery's one producer
    consumer: AIOKafkaConsumer
    state_reader: AIOKafkaConsumer  # reads patient states back on assignment (no group)
    checkpointer: Checkpointer
    publisher: Publisher
    dead_letters: DeadLetters
    ownership: PartitionOwnership
    upkeep: Upkeep
    health: HealthServer | None

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop the health server, the delivery (exactly once: its producers, aborting open transactions),
        then the clients, all within `timeout_s` (one that cannot close in time is left: the process is
        about to exit)."""
        await close_all(self.delivery, (self.consumer, self.producer, self.state_reader), timeout_s)
        if self.health is not None:
            await self.health.stop()


async def close_all(delivery: Delivery | None, clients, timeout_s: float) -> None:
    until = time.monotonic() + timeout_s

    async def close(name, stop):
        try:
            await asyncio.wait_for(stop(), max(until - time.monotonic(), 0.1))
        except Exception as exc:  # noqa: BLE001 (closing must not hide the real exit reason)
            log.warning("client_stop_failed", client=name, error=repr(exc))

    if delivery is not None:
        await close("delivery", lambda: delivery.stop(max(until - time.monotonic(), 0.1)))
    names = ("consumer", "producer", "state_reader")
    await asyncio.gather(*(close(name, client.stop) for name, client in zip(names, clients) if client is not None))


async def assemble(core: Core, scorer: ArtifactScorer, hooks: Hooks) -> Parts:
    """Build and start every part (the consumer subscribes last, so no partition is assigned before the
    parts that take it exist). StartupError when the brokers cannot be reached or the state topic is
    wrong; nothing is left open then."""
    s, k = core.settings, core.settings.kafka
    info = scorer.info
    window_scorer = WindowScorer(scorer, s.model.cpu_fallback, core.metrics)
    routing = await output_routing(k)
    # a fence can only come once a partition is assigned, so after `consumer` below exists
    fenced = FenceWatch(core.metrics, core.partitions, lambda: hooks.stopping() or request_rejoin(consumer),
                        hooks.fail)
    delivery, producer = await choose_delivery(k, core.event_time, routing, fenced,
                                               on_committed=core.metrics.flag_steps.committed,
                                               group_member=lambda: group_metadata(consumer),
                                               on_fenced_together=fenced.together)
    consumer = make_consumer(k)
    state_reader = make_consumer(k, group_id=None, client_id=f"{k.client_id}-state")
    checkpointer = Checkpointer(core.ledger, core.stage, core.store, consumer, delivery, k.state_topic, k.group_id)
    publisher = Publisher(k, delivery, core.ledger, core.store, EpisodeTracker(s.episodes, info.model_id),
                          core.metrics, core.settled, persist=checkpointer.persist, clock=core.clock,
                          on_failure=hooks.fail)
    dead_letters = DeadLetters(k.dead_letter_topic, delivery, core.ledger, core.metrics, core.settled,
                               on_failure=hooks.fail)
    dead_letters.fit_to(await dead_letter_topic_limit(k))  # larger ones go as their stand-in at once
    ownership = PartitionOwnership(
        kafka=k, partitions=core.partitions, stage=core.stage, store=core.store, event_time=core.event_time,
        metrics=core.metrics, settled=core.settled, delivery=delivery, consumer=consumer, state_reader=state_reader,
        dead_letters=dead_letters, publisher=publisher, routing=routing,
        checkpoint=hooks.checkpoint, failed=hooks.failed, clock=core.clock,
        read_committed=delivery.read_committed)  # per_worker: a stable read, then a seek
    upkeep = Upkeep(s, core.partitions, core.stage, core.ledger, core.store, core.metrics, consumer, publisher,
                    dead_letters, submit=hooks.submit, paused=lambda: core.backpressure.paused, clock=core.clock)
    try:
        if producer is not None:
            await producer.start()
        await state_reader.start()
        problem, _ = await state_topic_problem(k)
        if problem is not None:
            raise StartupError(problem)
        consumer.subscribe(k.input_topics, listener=ownership.listener(hooks.fail))
        await consumer.start()
    except (KafkaError, StartupError) as exc:
        await close_all(delivery, (consumer, producer, state_reader), 10.0)
        if isinstance(exc, StartupError):
            raise
        raise StartupError(f"broker unreachable at {k.bootstrap_servers}: {exc!r}") from None
    health = None
    if s.metrics_port is not None:
        health = HealthServer(core.metrics, hooks.ready, s.metrics_host, s.metrics_port,
                              alive=core.inference_watch.alive)
        log.info("metrics_listening", host=s.metrics_host, port=await health.start())
    return Parts(window_scorer, routing, delivery, producer, consumer, state_reader, checkpointer, publisher,
                 dead_letters, ownership, upkeep, health)
