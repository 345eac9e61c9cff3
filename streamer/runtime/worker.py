"""The asyncio worker: it owns the four loops and the shutdown order, and wires the stages.

ingest/ (decode, dead letters) -> windows/ (per-patient grids) -> batching.py -> model/scoring.py (in the
inference thread) -> publish/ (flags, episodes) -> checkpointing/ (offsets ledger, checkpoint). Four tasks
share one event loop: consume, inference, publish and commit. What it checks and builds before joining
its group is in startup.py, how partitions change hands in ownership.py, the once-a-second work in
upkeep.py.
"""

from __future__ import annotations

import asyncio
import gc
import time
from concurrent.futures import ThreadPoolExecutor

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from streamer.batching import MicroBatcher
from streamer.checkpointing import Checkpointer, OffsetsLedger
from streamer.delivery.event_time import ClockOffset, EventTime
from streamer.delivery import Delivery
from streamer.checkpointing.schedule import CheckpointSchedule
from streamer.ingest.deadletter import DeadLetters
from streamer.ingest.partitioning import PartitionerWatch
from streamer.kafka.acls import authorization_fix
from streamer.kafka.clients import make_consumer, request_rejoin
from streamer.kafka.partitioning import OutputRouting
from streamer.logs import get_logger
from streamer.metrics import HealthServer, InferenceWatch, IngestCounts, Metrics
from streamer.model.infer import ArtifactScorer, refuse_demo_model
from streamer.model.scoring import WindowScorer
from streamer.publish.episodes import EpisodeTracker
from streamer.publish.publisher import Publisher
from streamer.runtime.intake import Intake
from streamer.runtime.ownership import PartitionOwnership
from streamer.runtime.startup import (StartupError, choose_delivery, output_routing, preflight,
                                      state_topic_problem)
from streamer.runtime.upkeep import Backpressure, Upkeep
from streamer.settings import Settings
from streamer.state.store import StateStore
from streamer.windows.buffer import EmittedWindow
from streamer.windows.stage import WindowStage

__all__ = ["StartupError", "Worker"]

log = get_logger("streamer.worker")


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: "Worker"):
        self.worker = worker

    async def on_partitions_revoked(self, revoked):
        await self.worker.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned):
        await self.worker.on_assigned(set(assigned))


class Worker:
    def __init__(self, settings: Settings, scorer: ArtifactScorer | None = None, clock=time.time):
        """`clock`: the wall clock episodes are stamped and aged by (a host clock's offset, in tests)."""
        self.settings = settings
        self.clock = clock
        self.owns_process = False  # `streamer run`: the process is this worker's alone (see start)
        self.metrics = Metrics()
        self.ingest_counts = IngestCounts(self.metrics)
        self.scorer = scorer
        self.store = StateStore(clock)
        self.stage = WindowStage(settings.windows, self.store)
        self.ledger = OffsetsLedger()
        self.checkpointer: Checkpointer | None = None
        self.settled = asyncio.Event()  # set whenever an output is acknowledged (revocation waits on it)
        self.batcher = MicroBatcher(settings.batching.max_batch, settings.batching.max_wait_ms)
        self.publisher: Publisher | None = None  # built once the model id and the producer exist
        self.dead_letters: DeadLetters | None = None
        self.window_scorer: WindowScorer | None = None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self.stopping = asyncio.Event()
        self.assigned: set[TopicPartition] = set()
        self.joined = False  # a group generation assigned this worker its partitions (none, for a standby)
        self.backpressure = Backpressure(settings.batching.max_pending_windows, self.ledger, self.metrics)
        self.consumer = None
        self.producer = None
        self.delivery: Delivery | None = None
        self.fatal: BaseException | None = None  # a failure that must end the worker with exit 1
        self.fences: list[float] = []  # monotonic times of the recent transaction fences
        self.state_reader = None  # reads patient states back on assignment (no group)
        self.health: HealthServer | None = None
        self.inference_watch = InferenceWatch(settings.model.inference_stall_s)
        self.metrics.watch_inference(self.inference_watch)
        self.metrics.watch_episodes(self.store.open_episodes)
        self.metrics.patient_states.set_function(self.store.count)
        self.metrics.ready.set_function(lambda: float(self.ready()[0]))
        self.ownership: PartitionOwnership | None = None  # built at start, with the clients
        self.upkeep: Upkeep | None = None
        self.abandoned_startup = False  # stopped while the model was still loading in its thread
        self.deadline_exceeded = False  # the shutdown ran out of time: the process must exit now
        self.event_time = EventTime()  # caps output timestamps at the input's event time (event_time.py)
        self.clock_offset = ClockOffset(settings.kafka.clock_offset_warn_s, self.metrics.clock_offset_s)
        self.partitioner_watch = PartitionerWatch(settings.kafka.input_partitioner, settings.kafka.input_topics,
                                                  self.metrics.partitioner_mismatch)
        self.routing: OutputRouting | None = None
        self.intake = Intake(settings, self.ledger, self.stage, self.ingest_counts, self.metrics,
                             self.partitioner_watch, self._dead_letter, self._submit)
        self.commits_end = asyncio.Event()  # the commit loop ends after its checkpoint in flight

    @property
    def s(self) -> Settings:
        """The settings under their earlier name (`settings`), kept for existing callers."""
        return self.settings

    @s.setter
    def s(self, value: Settings) -> None:
        self.settings = value

    @property
    def paused(self) -> bool:
        """Whether backpressure pauses fetching now."""
        return self.backpressure.paused

    # -- lifecycle ------------------------------------------------------------------------------
    def stop(self) -> None:
        self.stopping.set()

    def ready(self) -> tuple[bool, str]:
        """Ready once the model is loaded and the worker has joined its group, with or without partitions: a
        standby (more replicas than input partitions) is ready to take over on the next rebalance, and a
        rollout must not wait for partitions it can never get."""
        if self.scorer is None:
            return False, "model not loaded"
        if self.consumer is None or not self.joined:
            return False, "not yet a member of the consumer group"
        if not self.assigned:
            return True, "ready: standby, no partitions assigned"
        return True, f"ready: {len(self.assigned)} partitions"

    async def start(self) -> bool:
        """Load the model, check topics, join the group. False if a stop came before the model was ready:
        nothing was consumed then, so there is nothing to drain."""
        k = self.settings.kafka
        if self.scorer is None:
            refuse_demo_model(self.settings.model)
        await preflight(k)  # before the model load: a wrong CA, host name or password fails in a second
        if self.scorer is None:
            log.info("model_loading", checkpoint=str(self.settings.model.checkpoint or "demo"))
            # warmed here, not in one-shot scoring: only a long-running worker earns back its cost
            load = asyncio.get_running_loop().run_in_executor(
                self.executor, lambda: ArtifactScorer(self.settings.model).warm_up())
            stop = asyncio.ensure_future(self.stopping.wait())
            await asyncio.wait({load, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not load.done():
                self.abandoned_startup = True
                load.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "never retrieved"
                return False
            self.scorer = load.result()
        if self.stopping.is_set():
            return False
        info = self.scorer.info
        self.metrics.model.info({"model_id": info.model_id, "device": info.device, "precision": info.precision})
        self.window_scorer = WindowScorer(self.scorer, self.settings.model.cpu_fallback, self.metrics)
        # a micro-batch is one network call at most: past it, the model scores in several calls anyway,
        # and the first call's flags would wait for the last (pinned, 400 beds on one core: p99 1.7 -> 0.5 s)
        device_batch = getattr(self.scorer, "device_batch", None)
        if device_batch:
            self.batcher.max_batch = min(self.batcher.max_batch, device_batch)
        self.routing = await output_routing(k)
        self.delivery, self.producer = await choose_delivery(k, self.event_time, self.routing, self._fenced,
                                                            on_committed=self.metrics.flag_steps.committed)
        self.consumer = make_consumer(k)
        self.state_reader = make_consumer(k, group_id=None, client_id=f"{k.client_id}-state")
        self.checkpointer = Checkpointer(self.ledger, self.stage, self.store, self.consumer, self.delivery,
                                         k.state_topic, k.group_id)
        self.publisher = Publisher(k, self.delivery, self.ledger, self.store,
                                   EpisodeTracker(self.settings.episodes, info.model_id), self.metrics, self.settled,
                                   persist=self.checkpointer.persist, clock=self.clock)
        self.dead_letters = DeadLetters(k.dead_letter_topic, self.delivery, self.ledger, self.metrics, self.settled)
        self.publisher.background.on_failure = self.dead_letters.background.on_failure = self._fail
        self.ownership = PartitionOwnership(
            k, self.assigned, self.ledger, self.stage, self.store, self.event_time, self.metrics, self.settled,
            self.delivery, self.consumer, self.state_reader, self.dead_letters, self.publisher, self.routing,
            checkpoint=self._commit, failed=lambda: self.fatal is not None, clock=self.clock)
        self.upkeep = Upkeep(self.settings, self.assigned, self.stage, self.ledger, self.store, self.metrics,
                             self.consumer, self.publisher, self.dead_letters, submit=self._submit,
                             paused=lambda: self.backpressure.paused, clock=self.clock)
        try:
            if self.producer is not None:
                await self.producer.start()
            await self.state_reader.start()
            await self._check_state_topic()
            self.consumer.subscribe(k.input_topics, listener=_Rebalance(self))
            await self.consumer.start()
        except KafkaError as exc:
            await self._close_clients()
            raise StartupError(f"broker unreachable at {k.bootstrap_servers}: {exc!r}") from None
        if self.settings.metrics_port is not None:
            self.health = HealthServer(self.metrics, self.ready, self.settings.metrics_host, self.settings.metrics_port,
                                       alive=self.inference_watch.alive)
            port = await self.health.start()
            log.info("metrics_listening", host=self.settings.metrics_host, port=port)
        if self.owns_process:
            # Startup (torch, the model, the clients) leaves ~375k objects that every full collection would
            # walk: 0.1-0.2 s with the GIL held, the event loop and the inference thread stalled, a latency
            # spike each time. They live as long as the process: collected once, then left out of the
            # collector's scans (only where the worker is the process: frozen objects are never collected).
            gc.collect()
            gc.freeze()
        log.info("worker_started", group=k.group_id, topics=k.input_topics, model=info.model_id,
                 objects_frozen=gc.get_freeze_count())
        return True

    def _fail(self, exc: BaseException) -> None:
        """A failure the worker cannot continue from (a transaction that cannot commit, a restore that cannot
        finish): stop with exit 1; the next owner resumes from the last checkpoint."""
        if self.fatal is None:
            self.fatal = exc
            log.error("worker_failed", error=repr(exc), fix=authorization_fix(exc, self.settings.kafka))
        self.stopping.set()

    # a worker fenced this often is fighting another owner, not riding out a broker failover
    FENCES_TOLERATED, FENCE_WINDOW_S = 5, 600.0

    def _fenced(self, tp: TopicPartition) -> None:
        """A partition's transaction was fenced (delivery/exactly_once.py): its open transaction is gone, so
        is this worker's claim on it. As Kafka Streams does, rejoin the group: the revocation drops the
        partition without a checkpoint, and whoever the group gives it to (this worker, after a broker
        failover that outlasted the transaction timeout; the newer owner, if this one was a zombie) restores
        it from its last commit."""
        self.metrics.fenced.inc()
        now = time.monotonic()
        self.fences = [t for t in self.fences if now - t < self.FENCE_WINDOW_S] + [now]
        log.error("partition_fenced", topic=tp.topic, partition=tp.partition, fences=len(self.fences),
                  action="rejoin the group")
        if len(self.fences) > self.FENCES_TOLERATED:
            self._fail(RuntimeError(f"fenced {len(self.fences)} times in {self.FENCE_WINDOW_S:.0f} s: another "
                                    "worker keeps taking these partitions' transactional ids"))
        elif self.consumer is not None and not self.stopping.is_set():
            request_rejoin(self.consumer)

    async def run(self) -> int:
        """Run until stop(); returns the process exit code."""
        if not await self.start():
            self.executor.shutdown(wait=False, cancel_futures=True)
            log.info("worker_stopped", exit_code=0, phase="model_loading")
            return 0
        publish_queue: asyncio.Queue = asyncio.Queue(maxsize=2)
        consume = asyncio.create_task(self._consume_loop(), name="consume")
        infer = asyncio.create_task(self._inference_loop(publish_queue), name="inference")
        publish = asyncio.create_task(self._publish_loop(publish_queue), name="publish")
        commit = asyncio.create_task(self._commit_loop(), name="commit")
        stop_wait = asyncio.create_task(self.stopping.wait())
        done, _ = await asyncio.wait({consume, infer, publish, commit, stop_wait},
                                     return_when=asyncio.FIRST_COMPLETED)
        failed = [t for t in done if t is not stop_wait and t.exception() is not None]
        for t in failed:
            log.error("task_failed", task=t.get_name(), error=repr(t.exception()),
                      fix=authorization_fix(t.exception(), self.settings.kafka))
        if failed and self.fatal is None and self.delivery.task_failure_is_fatal:
            self.fatal = failed[0].exception()  # e.g. the open transactions cannot commit any more
        self.stopping.set()
        stop_wait.cancel()
        return await self._shutdown(consume, infer, publish, commit, publish_queue,
                                    failed=bool(failed) or self.fatal is not None)

    async def _shutdown(self, consume, infer, publish, commit, publish_queue: asyncio.Queue, failed: bool) -> int:
        """Stop fetching, finish and publish what is in flight, commit, leave the group: all of it within
        shutdown_deadline_s, whatever the brokers do.

        The last part of the deadline is kept for the final checkpoint and closing the clients. A checkpoint
        in flight is awaited, never cancelled: aiokafka goes on with a cancelled commit's EndTxn (shielded),
        and a second commit would then meet a producer still committing. Past the deadline the worker gives
        up with exit 1 and `deadline_exceeded` (the caller exits the process at once): what is not committed
        stays in an open transaction that the partition's next owner aborts as it takes the partition.
        If the inference or publish task died, the other one is ended rather than left waiting for it
        until the deadline: what was not acknowledged stays uncommitted and the next owner redoes it."""
        deadline = self.settings.shutdown_deadline_s
        end = time.monotonic() + deadline
        drain_end = end - min(10.0, deadline / 3)  # the rest: final checkpoint, then closing
        code = 1 if failed else 0
        consume.cancel()
        self.batcher.close()
        ending = []
        if publish.done():
            infer.cancel()  # nothing can be published any more
        elif infer.done():
            ending.append(asyncio.create_task(publish_queue.put(None)))  # publish what is queued, then end
        drained = asyncio.ensure_future(asyncio.gather(infer, publish, *ending, *self.dead_letters.background.tasks,
                                                       *self.publisher.background.tasks, return_exceptions=True))
        if not await self._within(drained, drain_end):
            # publishing is still under way (a stalled broker): it is left as it is, never cancelled halfway
            # through a window (a flag sent but its state not yet marked), and nothing more is committed
            log.error("shutdown_deadline_exceeded", phase="drain", pending=self.ledger.in_flight())
            self.deadline_exceeded = True
        self.commits_end.set()
        await asyncio.gather(consume, return_exceptions=True)
        if not await self._within(commit, end - 1.0):
            self.fatal = self.fatal or TimeoutError("a checkpoint did not finish before the shutdown deadline")
            self.deadline_exceeded = True
        elif not commit.cancelled() and commit.exception() is not None and self.fatal is None:
            self.fatal = commit.exception()
            log.error("task_failed", task="commit", error=repr(self.fatal),
                      fix=authorization_fix(self.fatal, self.settings.kafka))
        if self.fatal is None and not self.deadline_exceeded:
            final = asyncio.ensure_future(self._commit(self.assigned))
            if not await self._within(final, end - 1.0):
                self.deadline_exceeded = True
            elif final.exception() is not None:  # the transaction cannot commit: the next owner redoes it
                log.error("final_checkpoint_failed", error=repr(final.exception()))
                code = 1
        if self.deadline_exceeded:
            log.error("shutdown_deadline_exceeded", phase="checkpoint", deadline_s=deadline)
        if self.fatal is not None or self.deadline_exceeded:
            code = 1
        await self._close_clients(max(end - time.monotonic(), 0.5))
        if self.health is not None:
            await self.health.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)
        log.info("worker_stopped", exit_code=code)
        return code

    @staticmethod
    async def _within(task: asyncio.Future, until_monotonic: float) -> bool:
        """Wait for `task` until a monotonic time without cancelling it; whether it finished."""
        if not task.done():
            await asyncio.wait({task}, timeout=max(until_monotonic - time.monotonic(), 0.0))
        return task.done()

    async def _check_state_topic(self) -> None:
        problem, _ = await state_topic_problem(self.settings.kafka)
        if problem is not None:
            await self._close_clients()
            raise StartupError(problem)

    async def _close_clients(self, timeout_s: float = 10.0) -> None:
        """Close every client, all of them within `timeout_s` (a client that cannot close in time is left:
        the process is about to exit)."""
        until = time.monotonic() + timeout_s

        async def close(name, stop):
            try:
                await asyncio.wait_for(stop(), max(until - time.monotonic(), 0.1))
            except Exception as exc:  # noqa: BLE001 (closing must not hide the real exit reason)
                log.warning("client_stop_failed", client=name, error=repr(exc))

        if self.delivery is not None:
            await close("delivery", lambda: self.delivery.stop(max(until - time.monotonic(), 0.1)))
        await asyncio.gather(*(close(name, client.stop) for name, client in
                               (("consumer", self.consumer), ("producer", self.producer),
                                ("state_reader", self.state_reader)) if client is not None))

    # -- consume --------------------------------------------------------------------------------
    async def _consume_loop(self) -> None:
        consumer = self.consumer
        next_gauges = next_evict = 0.0
        while not self.stopping.is_set():
            records = await consumer.getmany(timeout_ms=100, max_records=self.settings.kafka.max_poll_records)
            now = time.time()
            for tp, batch in records.items():
                partitions = len(consumer.partitions_for_topic(tp.topic) or ())
                if tp not in self.assigned:
                    # fetched before its states were restored (aiokafka fetches before the assignment
                    # listener returns): fetch these again later rather than skip them
                    if batch and tp in consumer.assignment():
                        consumer.seek(tp, batch[0].offset)
                    continue
                if batch:
                    newest = max(r.timestamp for r in batch)
                    self.event_time.observe(tp, newest)
                    high = consumer.highwater(tp)
                    if high is not None and batch[-1].offset + 1 >= high:
                        self.clock_offset.observe(newest)  # caught up: these records are fresh
                ingest = self.intake.ingest
                for record in batch:
                    ingest(tp, record, now, partitions)
            self.ingest_counts.flush()
            if now >= next_evict:  # scans the patients silent for idle_evict_s: once a second is enough
                self.upkeep.every_second(now)
                next_evict = now + 1.0
            self._backpressure()
            if now >= next_gauges:
                self.upkeep.gauges()
                next_gauges = now + 1.0
            await asyncio.sleep(0)  # let publish/commit run between fetches

    def _submit(self, w: EmittedWindow) -> None:
        w.hold = self.ledger.hold(w.partition, w.min_offset)
        self.batcher.put(w)

    def _backpressure(self) -> None:
        if self.consumer is not None:
            self.backpressure.apply(self.consumer)

    def _dead_letter(self, tp: TopicPartition, record, reason: str, detail: str) -> None:
        self.dead_letters.send(tp, record, reason, detail)

    # -- inference ------------------------------------------------------------------------------
    async def _inference_loop(self, out: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self.batcher.next_batch()
            if batch is None:
                await out.put(None)
                return
            started = time.time()
            self.inference_watch.begin(len(batch))
            try:
                probs = await loop.run_in_executor(self.executor, self.window_scorer, batch)
            finally:
                self.inference_watch.end()
            scored = time.time()
            steps = self.metrics.flag_steps
            for w in batch:
                steps.observe("queued", started - w.completed_at)
            steps.observe("inference", scored - started, len(batch))
            await out.put((batch, probs, scored))

    # -- publish --------------------------------------------------------------------------------
    async def _publish_loop(self, queue: asyncio.Queue) -> None:
        while (item := await queue.get()) is not None:
            await self._publish(*item)

    async def _publish(self, batch: list[EmittedWindow], probs: list[float | None], scored_at: float) -> None:
        info = self.scorer.info
        self.metrics.flag_steps.observe("to_publisher", time.time() - scored_at, len(batch))
        await self.publisher.flags(batch, probs, info.threshold, info.model_id)

    # -- commits and rebalances -------------------------------------------------------------------
    async def _commit_loop(self) -> None:
        """Checkpoints as the schedule says (checkpointing/schedule.py) until `commits_end` (shutdown); a
        checkpoint is never cancelled in the middle (see _shutdown)."""
        k = self.settings.kafka
        awaiting = self.delivery.awaiting  # flags in open transactions (exactly once; else never any)
        schedule = CheckpointSchedule(k.commit_interval_s, self.commits_end,
                                      awaiting.event if k.commit_after_flags else None, awaiting.take_partitions,
                                      spacing_s=k.flag_commit_spacing_ms / 1000)
        while (partitions := await schedule.next(self.assigned)) is not None:
            if partitions:
                await self._commit(partitions)

    async def _commit(self, partitions: set[TopicPartition]) -> None:
        if self.checkpointer is not None:
            await self.checkpointer.checkpoint(partitions)

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        try:
            await self.ownership.revoke(revoked)
        except Exception as exc:  # noqa: BLE001 (aiokafka would log and swallow it: a silent stall)
            self._fail(exc)

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        try:
            await self.ownership.assign(assigned)
            self.joined = True
        except Exception as exc:  # noqa: BLE001 (aiokafka would swallow it, leaving the partitions unread)
            log.error("restore_failed", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned),
                      error=repr(exc))
            self._fail(exc)
