"""The worker's once-a-second work beside the fetches: windows of silent beds closed by the wall clock,
episode leases renewed or closed stale, idle patient states forgotten, fetching paused while too much is
in flight, and the gauges. Each step is a method the consume loop calls; none awaits."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from aiokafka import TopicPartition

from streamer.checkpointing import OffsetsLedger
from streamer.ingest.deadletter import DeadLetters
from streamer.logs import get_logger
from streamer.metrics import Metrics
from streamer.partitions import OwnedPartitions
from streamer.publish.publisher import Publisher
from streamer.settings import Settings
from streamer.state.store import StateStore
from streamer.windows.buffer import EmittedWindow
from streamer.windows.stage import WindowStage

log = get_logger("streamer.worker")


class Backpressure:
    """Fetching pauses while more than `limit` windows and dead letters are in flight (not yet acknowledged
    or in a transaction) and resumes at half of it: memory stays bounded when inference or the brokers lag."""

    def __init__(self, limit: int, ledger: OffsetsLedger, metrics: Metrics):
        self.limit, self.ledger, self.metrics = limit, ledger, metrics
        self.paused = False

    def apply(self, consumer) -> bool:
        """Pause or resume `consumer`'s whole assignment; whether fetching is paused now."""
        pending = self.ledger.in_flight()
        assignment = list(consumer.assignment())
        if pending > self.limit and assignment:
            if not self.paused:
                log.warning("backpressure_pause", pending=pending)
            consumer.pause(*assignment)  # also pauses partitions assigned meanwhile
            self.paused = True
        elif self.paused and pending <= self.limit // 2:
            consumer.resume(*assignment)
            self.paused = False
            log.info("backpressure_resume", pending=pending)
        self.metrics.paused.set(1 if self.paused else 0)
        return self.paused


@dataclass
class Upkeep:
    settings: Settings
    partitions: OwnedPartitions  # the worker's (iterates the topic-partitions held)
    stage: WindowStage
    ledger: OffsetsLedger
    store: StateStore
    metrics: Metrics
    consumer: object  # AIOKafkaConsumer of the group
    publisher: Publisher
    dead_letters: DeadLetters
    submit: Callable[[EmittedWindow], None]  # a window to the batcher, held in the ledger
    paused: Callable[[], bool]  # whether backpressure pauses fetching now
    clock: Callable[[], float] = time.time  # wall time of episodes and state ages
    next_expiry: float = field(default=0.0)

    def every_second(self, now: float) -> None:
        """Silent beds' windows closed by the wall clock (only on partitions read to their end: a lagging
        partition's silence is not the bed's), their refused records dead-lettered, episodes tended, idle
        states expired."""
        self.stage.flowing(self.caught_up(), now)
        for w in self.stage.evict(now):
            self.submit(w)
        for tp, refused, reason, detail in self.stage.take_rejected():
            self.dead_letters.send(tp, refused, reason, detail)
        self.publisher.tend_episodes(self.clock())
        self.expire_states()
        self.make_room()

    def caught_up(self) -> list[TopicPartition]:
        """Partitions fetched lately and read to their high watermark: their silence is real silence."""
        now_ms = time.time() * 1000
        fresh_ms = 2 * self.settings.kafka.fetch_max_wait_ms + 1000
        out = []
        for tp in self.partitions:
            high, polled = self.consumer.highwater(tp), self.consumer.last_poll_timestamp(tp)
            if high is not None and polled is not None and now_ms - polled <= fresh_ms and not self.paused() \
                    and self.ledger.position(tp) >= high:
                out.append(tp)
        return out

    def expire_states(self) -> None:
        """Every few minutes (a quarter of state.ttl_s at most): forget patients unchanged for state.ttl_s."""
        now, ttl = self.clock(), self.settings.state.ttl_s
        if now < self.next_expiry:
            return
        self.next_expiry = now + min(300.0, ttl / 4)
        for tp in self.partitions:
            gone = self.store.expire_idle(tp, now, ttl, lambda pid, tp=tp: (tp, pid) in self.stage.streams)
            if gone:
                self.metrics.states_expired.inc(len(gone))
                log.info("states_expired", topic=tp.topic, partition=tp.partition, patients=len(gone))

    def make_room(self) -> None:
        """At the patient cap, forget idle states early (down to 90 % of it), so that a flood of ids that set
        timelines and went silent cannot keep a newly admitted bed out until state.ttl_s. Beds streaming,
        and patients with an open episode or unpublished flags, are never forgotten."""
        refused = self.stage.take_refused_patients()
        cap = self.settings.windows.max_patients
        if refused:
            log.warning("patients_refused", count=refused, max_patients=cap, held=self.stage.patients())
        # only states crowding the cap make room: provisional streams of new ids (a flood of one-record
        # ids) leave at idle eviction by themselves, and forgetting a paused bed's state for them would
        # refuse that bed when it comes back
        target = self.store.count() - int(cap * 0.9)
        if target <= 0:
            return
        gone = self.store.reclaim(target, self.clock(), self.settings.windows.idle_evict_s,
                                  lambda tp, pid: (tp, pid) in self.stage.streams)
        if gone:
            self.metrics.states_expired.inc(len(gone))
            log.warning("states_reclaimed", patients=len(gone), max_patients=cap)

    def gauges(self) -> None:
        self.metrics.patients.set(len(self.stage.streams))
        self.metrics.patients_held.set(self.stage.patients())
        self.metrics.max_patients.set(self.settings.windows.max_patients)
        self.metrics.buffer_bytes.set(self.stage.nbytes)
        self.metrics.pending.set(self.ledger.in_flight())
        for tp in self.partitions:
            high = self.consumer.highwater(tp)
            if high is not None:
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(high - self.ledger.position(tp), 0))
