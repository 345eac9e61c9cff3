"""The asyncio worker: it runs the four loops and the shutdown, and nothing else.

ingest/ (decode, dead letters) -> windows/ (per-patient grids) -> batching.py -> model/scoring.py (in the
inference thread) -> publish/ (flags, episodes) -> delivery/ (where outputs go, when they count) ->
checkpointing/ (offsets ledger, checkpoint). Four tasks share one event loop: consume, inference, publish
and commit. What the worker runs with is built in assembly.py (`Core` when it is made, `Parts` when it
starts); what it checks before joining its group is in startup.py, how partitions change hands in
ownership.py, the once-a-second work in upkeep.py.
"""

from __future__ import annotations

import asyncio
import gc
import time
from concurrent.futures import ThreadPoolExecutor

from aiokafka import TopicPartition

from streamer.checkpointing.schedule import CheckpointSchedule
from streamer.kafka.acls import authorization_fix
from streamer.logs import get_logger
from streamer.model.infer import ArtifactScorer, refuse_demo_model
from streamer.runtime.assembly import Core, Hooks, Parts, assemble
from streamer.runtime.intake import Intake
from streamer.runtime.startup import StartupError, preflight
from streamer.settings import Settings
from streamer.windows.buffer import EmittedWindow

__all__ = ["StartupError", "Worker"]

log = get_logger("streamer.worker")


class Worker:
    def __init__(self, settings: Settings, scorer: ArtifactScorer | None = None, clock=time.time,
                 owns_process: bool = False):
        """`clock`: the wall clock episodes are stamped and aged by (a host clock's offset, in tests).
        `owns_process`: `streamer run`, the process is this worker's alone (see start)."""
        self.settings, self.scorer, self.owns_process = settings, scorer, owns_process
        self.core = Core.build(settings, clock)
        self.parts: Parts | None = None  # built at start
        self.core.metrics.ready.set_function(lambda: float(self.ready()[0]))
        self.intake = Intake(settings, self.core.ledger, self.core.stage, self.core.ingest_counts, self.core.metrics,
                             self.core.partitioner_watch, self._dead_letter, self._submit)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self.stopping = asyncio.Event()
        self.commits_end = asyncio.Event()  # the commit loop ends after its checkpoint in flight
        self.fatal: BaseException | None = None  # a failure that must end the worker with exit 1
        self.abandoned_startup = False  # stopped while the model was still loading in its thread
        self.deadline_exceeded = False  # the shutdown ran out of time: the process must exit now

    @property
    def paused(self) -> bool:
        """Whether backpressure pauses fetching now."""
        return self.core.backpressure.paused

    # -- lifecycle ------------------------------------------------------------------------------
    def stop(self) -> None:
        self.stopping.set()

    def ready(self) -> tuple[bool, str]:
        """Ready once the model is loaded and the worker has joined its group, with or without partitions: a
        standby (more replicas than input partitions) is ready to take over on the next rebalance, and a
        rollout must not wait for partitions it can never get."""
        if self.scorer is None:
            return False, "model not loaded"
        if self.parts is None or not self.parts.ownership.joined:
            return False, "not yet a member of the consumer group"
        if not self.core.partitions:
            return True, "ready: standby, no partitions assigned"
        return True, f"ready: {len(self.core.partitions.tps())} partitions"

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
        self.core.metrics.model.info({"model_id": info.model_id, "device": info.device, "precision": info.precision})
        # a micro-batch is one network call at most: past it, the model scores in several calls anyway,
        # and the first call's flags would wait for the last (pinned, 400 beds on one core: p99 1.7 -> 0.5 s)
        device_batch = getattr(self.scorer, "device_batch", None)
        if device_batch:
            self.core.batcher.max_batch = min(self.core.batcher.max_batch, device_batch)
        self.parts = await assemble(self.core, self.scorer, Hooks(
            fail=self._fail, failed=lambda: self.fatal is not None, stopping=self.stopping.is_set,
            checkpoint=self._commit, submit=self._submit, ready=self.ready))
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
        if failed and self.fatal is None and self.parts.delivery.task_failure_is_fatal:
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
        self.core.batcher.close()
        ending = []
        if publish.done():
            infer.cancel()  # nothing can be published any more
        elif infer.done():
            ending.append(asyncio.create_task(publish_queue.put(None)))  # publish what is queued, then end
        background = (*self.parts.dead_letters.background.tasks, *self.parts.publisher.background.tasks)
        drained = asyncio.ensure_future(asyncio.gather(infer, publish, *ending, *background, return_exceptions=True))
        if not await _within(drained, drain_end):
            # publishing is still under way (a stalled broker): it is left as it is, never cancelled halfway
            # through a window (a flag sent but its state not yet marked), and nothing more is committed
            log.error("shutdown_deadline_exceeded", phase="drain", pending=self.core.ledger.in_flight())
            self.deadline_exceeded = True
        self.commits_end.set()
        await asyncio.gather(consume, return_exceptions=True)
        if not await _within(commit, end - 1.0):
            self.fatal = self.fatal or TimeoutError("a checkpoint did not finish before the shutdown deadline")
            self.deadline_exceeded = True
        elif not commit.cancelled() and commit.exception() is not None and self.fatal is None:
            self.fatal = commit.exception()
            log.error("task_failed", task="commit", error=repr(self.fatal),
                      fix=authorization_fix(self.fatal, self.settings.kafka))
        if self.fatal is None and not self.deadline_exceeded:
            final = asyncio.ensure_future(self._commit(self.core.partitions.tps()))
            if not await _within(final, end - 1.0):
                self.deadline_exceeded = True
            elif final.exception() is not None:  # the transaction cannot commit: the next owner redoes it
                log.error("final_checkpoint_failed", error=repr(final.exception()))
                code = 1
        if self.deadline_exceeded:
            log.error("shutdown_deadline_exceeded", phase="checkpoint", deadline_s=deadline)
        if self.fatal is not None or self.deadline_exceeded:
            code = 1
        await self.parts.close(max(end - time.monotonic(), 0.5))
        self.executor.shutdown(wait=False, cancel_futures=True)
        log.info("worker_stopped", exit_code=code)
        return code

    # -- consume --------------------------------------------------------------------------------
    async def _consume_loop(self) -> None:
        consumer, upkeep = self.parts.consumer, self.parts.upkeep
        core = self.core
        next_gauges = next_evict = 0.0
        while not self.stopping.is_set():
            records = await consumer.getmany(timeout_ms=100, max_records=self.settings.kafka.max_poll_records)
            now = time.time()
            for tp, batch in records.items():
                partitions = len(consumer.partitions_for_topic(tp.topic) or ())
                if tp not in core.partitions:
                    # fetched before its states were restored (aiokafka fetches before the assignment
                    # listener returns): fetch these again later rather than skip them
                    if batch and tp in consumer.assignment():
                        consumer.seek(tp, batch[0].offset)
                    continue
                if batch:
                    newest = max(r.timestamp for r in batch)
                    core.event_time.observe(tp, newest)
                    high = consumer.highwater(tp)
                    if high is not None and batch[-1].offset + 1 >= high:
                        core.clock_offset.observe(newest)  # caught up: these records are fresh
                self.intake.ingest_batch(tp, batch, now, partitions)  # decoded together, settled in order
            core.ingest_counts.flush()
            if now >= next_evict:  # scans the patients silent for idle_evict_s: once a second is enough
                upkeep.every_second(now)
                next_evict = now + 1.0
            core.backpressure.apply(consumer)
            if now >= next_gauges:
                upkeep.gauges()
                next_gauges = now + 1.0
            await asyncio.sleep(0)  # let publish/commit run between fetches

    def _submit(self, w: EmittedWindow) -> None:
        w.hold = self.core.ledger.hold(w.partition, w.min_offset)
        self.core.batcher.put(w)

    def _dead_letter(self, tp: TopicPartition, record, reason: str, detail: str) -> None:
        self.parts.dead_letters.send(tp, record, reason, detail)

    # -- inference ------------------------------------------------------------------------------
    async def _inference_loop(self, out: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self.core.batcher.next_batch()
            if batch is None:
                await out.put(None)
                return
            started = time.time()
            self.core.inference_watch.begin(len(batch))
            try:
                probs = await loop.run_in_executor(self.executor, self.parts.window_scorer, batch)
            finally:
                self.core.inference_watch.end()
            scored = time.time()
            steps = self.core.metrics.flag_steps
            for w in batch:
                steps.observe("queued", started - w.completed_at)
            steps.observe("inference", scored - started, len(batch))
            await out.put((batch, probs, scored))

    # -- publish --------------------------------------------------------------------------------
    async def _publish_loop(self, queue: asyncio.Queue) -> None:
        info, steps = self.scorer.info, self.core.metrics.flag_steps
        while (item := await queue.get()) is not None:
            batch, probs, scored_at = item
            steps.observe("to_publisher", time.time() - scored_at, len(batch))
            await self.parts.publisher.flags(batch, probs, info.threshold, info.model_id)

    # -- commits and rebalances -------------------------------------------------------------------
    async def _commit_loop(self) -> None:
        """Checkpoints as the schedule says (checkpointing/schedule.py) until `commits_end` (shutdown); a
        checkpoint is never cancelled in the middle (see _shutdown)."""
        k = self.settings.kafka
        awaiting = self.parts.delivery.awaiting  # flags in open transactions (exactly once; else never any)
        schedule = CheckpointSchedule(k.commit_interval_s, self.commits_end,
                                      awaiting.event if k.commit_after_flags else None, awaiting.take_partitions,
                                      spacing_s=k.flag_commit_spacing_ms / 1000)
        while (partitions := await schedule.next(self.core.partitions.tps())) is not None:
            if partitions:
                await self._commit(partitions)

    async def _commit(self, partitions: set[TopicPartition]) -> None:
        if self.parts is not None:
            await self.parts.checkpointer.checkpoint(partitions)


async def _within(task: asyncio.Future, until_monotonic: float) -> bool:
    """Wait for `task` until a monotonic time without cancelling it; whether it finished."""
    if not task.done():
        await asyncio.wait({task}, timeout=max(until_monotonic - time.monotonic(), 0.0))
    return task.done()
