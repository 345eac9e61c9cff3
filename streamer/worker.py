"""The asyncio worker: ingest -> windows -> batches -> model -> publish -> commit.

Four tasks share one event loop: the consume loop (decode, buffer, emit windows), the inference loop
(micro-batches, run in a worker thread so heartbeats and fetching go on), the publish loop (flags and
episodes, in window order, acknowledged by the broker) and the commit loop (kafka/commits.py's rule).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from streamer.batching import MicroBatcher
from streamer.checkpointing import Checkpointer
from streamer.ingest.contract import InvalidMessage, decode
from streamer.ingest.deadletter import dead_letter_headers, oversized_dead_letter
from streamer.kafka.clients import (TlsError, check_tls, ensure_topics, make_consumer, make_producer,
                                    missing_topics, retriable, retry_kafka)
from streamer.kafka.commits import CommitTracker
from streamer.logs import episode_ref, get_logger, patient_ref
from streamer.metrics import HealthServer, Metrics
from streamer.model.infer import ArtifactScorer
from streamer.publish import EpisodeTracker, dumps, flag_message
from streamer.settings import Settings
from streamer.state.changelog import read_states
from streamer.state.store import StateStore
from streamer.windows.buffer import SCORABLE, EmittedWindow
from streamer.windows.resample import to_model_samples
from streamer.windows.stage import WindowStage

log = get_logger("streamer.worker")


class StartupError(RuntimeError):
    """A condition that must stop the worker before it joins the group (clear message, exit 1)."""


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: "Worker"):
        self.worker = worker

    async def on_partitions_revoked(self, revoked):
        await self.worker.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned):
        await self.worker.on_assigned(set(assigned))


class Worker:
    def __init__(self, settings: Settings, scorer: ArtifactScorer | None = None):
        self.s = settings
        self.metrics = Metrics()
        self.scorer = scorer
        self.store = StateStore()
        self.stage = WindowStage(settings.windows, self.store)
        self.tracker = CommitTracker()
        self.checkpointer: Checkpointer | None = None
        self.settled = asyncio.Event()  # set whenever an output is acknowledged (revocation waits on it)
        self.batcher = MicroBatcher(settings.batching.max_batch, settings.batching.max_wait_ms)
        self.episodes: EpisodeTracker | None = None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self.stopping = asyncio.Event()
        self.pending_by_tp: Counter[TopicPartition] = Counter()  # emitted, not yet acknowledged
        self.assigned: set[TopicPartition] = set()
        self.dead_letter_tasks: set[asyncio.Task] = set()
        self.paused = False
        self.consumer = None
        self.producer = None
        self.state_reader = None  # reads patient states back on assignment (no group)
        self.health: HealthServer | None = None
        self.abandoned_startup = False  # stopped while the model was still loading in its thread

    # -- lifecycle ------------------------------------------------------------------------------
    def stop(self) -> None:
        self.stopping.set()

    def ready(self) -> tuple[bool, str]:
        if self.scorer is None:
            return False, "model not loaded"
        if self.consumer is None or not self.assigned:
            return False, "no partitions assigned"
        return True, f"ready: {len(self.assigned)} partitions"

    async def start(self) -> bool:
        """Load the model, check topics, join the group. False if a stop came before the model was ready:
        nothing was consumed then, so there is nothing to drain."""
        k = self.s.kafka
        try:
            await check_tls(k)  # before the model load: a wrong CA or host name fails in a second, not after it
        except TlsError as exc:
            raise StartupError(str(exc)) from None
        if self.scorer is None:
            log.info("model_loading", checkpoint=str(self.s.model.checkpoint or "demo"))
            # warmed here, not in one-shot scoring: only a long-running worker earns back its cost
            load = asyncio.get_running_loop().run_in_executor(
                self.executor, lambda: ArtifactScorer(self.s.model).warm_up())
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
        self.episodes = EpisodeTracker(self.s.episodes, info.model_id)
        try:
            if k.create_topics:
                await ensure_topics(k)
            else:
                missing = await missing_topics(k)
                if missing:
                    raise StartupError(f"topics missing on {k.bootstrap_servers}: {missing} "
                                       "(create them, or set kafka.create_topics=true)")
        except (KafkaError, asyncio.TimeoutError, OSError) as exc:
            raise StartupError(f"broker unreachable at {k.bootstrap_servers}: {exc!r}") from None
        self.producer = make_producer(k)
        self.consumer = make_consumer(k)
        self.state_reader = make_consumer(k, group_id=None, client_id=f"{k.client_id}-state")
        self.checkpointer = Checkpointer(self.tracker, self.stage, self.store, self.consumer, self.producer,
                                         k.state_topic)
        try:
            await self.producer.start()
            await self.state_reader.start()
            await self._check_state_partitions()
            self.consumer.subscribe(k.input_topics, listener=_Rebalance(self))
            await self.consumer.start()
        except KafkaError as exc:
            await self._close_clients()
            raise StartupError(f"broker unreachable at {k.bootstrap_servers}: {exc!r}") from None
        if self.s.metrics_port is not None:
            self.health = HealthServer(self.metrics, self.ready, self.s.metrics_host, self.s.metrics_port)
            port = await self.health.start()
            log.info("metrics_listening", host=self.s.metrics_host, port=port)
        log.info("worker_started", group=k.group_id, topics=k.input_topics, model=info.model_id)
        return True

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
            log.error("task_failed", task=t.get_name(), error=repr(t.exception()))
        self.stopping.set()
        stop_wait.cancel()
        return await self._shutdown(consume, infer, publish, commit, publish_queue, failed=bool(failed))

    async def _shutdown(self, consume, infer, publish, commit, publish_queue: asyncio.Queue, failed: bool) -> int:
        """Stop fetching, finish and publish what is in flight, commit, leave the group.

        If the inference or publish task died, the other one is ended rather than left waiting for it
        until the deadline: what was not acknowledged stays uncommitted and the next owner redoes it."""
        deadline = self.s.shutdown_deadline_s
        code = 1 if failed else 0
        consume.cancel()
        self.batcher.close()
        ending = []
        if publish.done():
            infer.cancel()  # nothing can be published any more
        elif infer.done():
            ending.append(asyncio.create_task(publish_queue.put(None)))  # publish what is queued, then end
        try:
            await asyncio.wait_for(asyncio.gather(infer, publish, *ending, *self.dead_letter_tasks,
                                                  return_exceptions=True), deadline)
        except asyncio.TimeoutError:
            log.error("shutdown_deadline_exceeded", pending=sum(self.pending_by_tp.values()))
            code = 1
        commit.cancel()
        await asyncio.gather(consume, commit, return_exceptions=True)
        await self._commit(self.assigned)
        await self._close_clients()
        if self.health is not None:
            await self.health.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)
        log.info("worker_stopped", exit_code=code)
        return code

    async def _check_state_partitions(self) -> None:
        """Input partition p keeps its patients' states in partition p of the state topic."""
        k = self.s.kafka
        have = await self.producer.partitions_for(k.state_topic)
        for topic in k.input_topics:
            need = await self.producer.partitions_for(topic)
            if need and have is not None and max(need) > max(have, default=-1):
                await self._close_clients()
                raise StartupError(f"{k.state_topic} has {len(have)} partitions but {topic} has {len(need)}: "
                                   "the state topic needs at least as many (create it with more)")

    async def _close_clients(self) -> None:
        for client in (self.consumer, self.producer, self.state_reader):
            if client is not None:
                try:
                    await asyncio.wait_for(client.stop(), 10)
                except Exception as exc:  # closing must not hide the real exit reason
                    log.warning("client_stop_failed", error=repr(exc))

    # -- consume --------------------------------------------------------------------------------
    async def _consume_loop(self) -> None:
        consumer = self.consumer
        next_gauges = next_evict = 0.0
        while not self.stopping.is_set():
            records = await consumer.getmany(timeout_ms=100, max_records=self.s.kafka.max_poll_records)
            now = time.time()
            for tp, batch in records.items():
                if tp not in self.assigned:
                    # fetched before its states were restored (aiokafka fetches before the assignment
                    # listener returns): fetch these again later rather than skip them
                    if batch and tp in consumer.assignment():
                        consumer.seek(tp, batch[0].offset)
                    continue
                for record in batch:
                    self._ingest(tp, record, now)
            if now >= next_evict:  # scans the patients silent for idle_evict_s: once a second is enough
                self.stage.flowing(self._caught_up(), now)
                for w in self.stage.evict(now):
                    self._submit(w)
                self._close_stale_episodes(now)
                next_evict = now + 1.0
            self._backpressure()
            if now >= next_gauges:
                self._update_gauges()
                next_gauges = now + 1.0
            await asyncio.sleep(0)  # let publish/commit run between fetches

    def _ingest(self, tp: TopicPartition, record, now: float) -> None:
        self.tracker.consumed(tp, record.offset)
        self.metrics.messages.inc()
        ws = self.s.windows
        try:
            chunk = decode(record.key, record.value, ws)
        except InvalidMessage as exc:
            if exc.reason == "wrong_lead" and ws.unknown_lead == "drop":
                self.metrics.dropped.labels(exc.reason).inc()
                return
            self._dead_letter(tp, record, exc.reason, exc.detail)
            return
        try:
            result = self.stage.accept(tp, record.offset, chunk, now)
        except Exception as exc:  # a bug must cost one record, never the other patients
            log.exception("ingest_failed", patient=patient_ref(chunk.patient_id), offset=record.offset)
            self._dead_letter(tp, record, "internal_error", repr(exc)[:200])
            return
        self.metrics.samples.inc(result.new_samples)
        self.metrics.duplicate_samples.inc(result.duplicate_samples)
        self.metrics.late_samples.inc(result.late_samples)
        self.metrics.implausible_samples.inc(result.implausible_samples)
        if result.rejected:
            self._dead_letter(tp, record, result.rejected,
                              f"{result.late_samples} samples not accepted ({result.rejected})")
        elif result.late_samples:
            self._dead_letter(tp, record, "partly_late",
                              f"{result.late_samples} of {len(chunk.samples)} samples older than the open windows")
        for w in result.windows:
            self._submit(w)

    def _caught_up(self) -> list[TopicPartition]:
        """Partitions fetched lately and read to their high watermark: their silence is real silence."""
        now_ms = time.time() * 1000
        fresh_ms = 2 * self.s.kafka.fetch_max_wait_ms + 1000
        out = []
        for tp in self.assigned:
            high, polled = self.consumer.highwater(tp), self.consumer.last_poll_timestamp(tp)
            if high is not None and polled is not None and now_ms - polled <= fresh_ms and not self.paused \
                    and self.tracker.next_offset.get(tp, self.tracker.committed.get(tp, 0)) >= high:
                out.append(tp)
        return out

    def _submit(self, w: EmittedWindow) -> None:
        w.hold = self.tracker.hold(w.partition, w.min_offset)
        self.pending_by_tp[w.partition] += 1
        self.batcher.put(w)

    def _backpressure(self) -> None:
        pending = sum(self.pending_by_tp.values())
        limit = self.s.batching.max_pending_windows
        assignment = list(self.consumer.assignment())
        if pending > limit and assignment:
            if not self.paused:
                log.warning("backpressure_pause", pending=pending)
            self.consumer.pause(*assignment)  # also pauses partitions assigned meanwhile
            self.paused = True
        elif self.paused and pending <= limit // 2:
            self.consumer.resume(*assignment)
            self.paused = False
            log.info("backpressure_resume", pending=pending)
        self.metrics.paused.set(1 if self.paused else 0)

    def _update_gauges(self) -> None:
        self.metrics.patients.set(len(self.stage.streams))
        self.metrics.buffer_bytes.set(self.stage.nbytes)
        self.metrics.pending.set(sum(self.pending_by_tp.values()))
        for tp in self.assigned:
            high = self.consumer.highwater(tp)
            if high is not None:
                nxt = self.tracker.next_offset.get(tp, self.tracker.committed.get(tp, 0))
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(high - nxt, 0))

    # -- dead letters ---------------------------------------------------------------------------
    def _dead_letter(self, tp: TopicPartition, record, reason: str, detail: str) -> None:
        hold = self.tracker.hold(tp, record.offset)
        key = record.key.decode("utf-8", "replace") if record.key else None
        log.warning("dead_letter", reason=reason, detail=detail[:200], patient=patient_ref(key) if key else None,
                    topic=tp.topic, partition=tp.partition, offset=record.offset)
        self._background(self._send_dead_letter(tp, record, reason, detail, hold))

    def _background(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.dead_letter_tasks.add(task)
        task.add_done_callback(self.dead_letter_tasks.discard)

    async def _send_dead_letter(self, tp: TopicPartition, record, reason: str, detail: str, hold) -> None:
        headers = dead_letter_headers(reason, detail, tp.topic, tp.partition, record.offset)
        topic = self.s.kafka.dead_letter_topic
        try:
            await self._send_with_retry(topic, record.key, record.value or b"", headers)
        except KafkaError as exc:
            if retriable(exc):
                raise
            # e.g. the record plus headers is over the producer's size limit: a small dead letter that
            # still identifies it, so the partition moves on
            log.warning("dead_letter_replaced", reason=reason, error=repr(exc)[:200], topic=tp.topic,
                        partition=tp.partition, offset=record.offset)
            value, small_headers = oversized_dead_letter(record, headers, repr(exc))
            await self._send_with_retry(topic, record.key, value, small_headers)
        self.tracker.release(hold)
        self.settled.set()
        self.metrics.dead_letters.labels(reason).inc()

    async def _send_with_retry(self, topic: str, key: bytes | None, value: bytes, headers=None) -> None:
        async def attempt():
            await (await self.producer.send(topic, value, key=key, headers=headers))

        await retry_kafka(attempt, lambda exc, delay: log.warning("publish_retry", topic=topic, error=repr(exc),
                                                                  retry_in_s=delay))

    # -- inference ------------------------------------------------------------------------------
    def _infer(self, batch: list[EmittedWindow]) -> list[float | None]:
        """Runs in the inference thread: resample, preprocess and score the scorable windows at once."""
        t0 = time.perf_counter()
        delay = self.s.batching.test_inference_delay_s
        if delay:
            time.sleep(delay)
        idx = [i for i, w in enumerate(batch) if w.status == SCORABLE]
        probs: list[float | None] = [None] * len(batch)
        if idx:
            x = np.stack([to_model_samples(batch[i].samples) for i in idx])
            for i, p in zip(idx, self._score_with_fallback(x)):
                probs[i] = float(p)
            self.metrics.batch_size.observe(len(idx))
            self.metrics.inference_s.observe(time.perf_counter() - t0)
        return probs

    def _score_with_fallback(self, x: np.ndarray, attempts: int = 3) -> np.ndarray:
        """Retry device failures; after `attempts`, continue on the CPU if model.cpu_fallback allows it,
        else raise (the worker exits non-zero; commits guarantee the next owner loses nothing)."""
        for attempt in range(1, attempts + 1):
            try:
                return self.scorer.probabilities(x)
            except RuntimeError as exc:
                log.error("inference_failed", attempt=attempt, device=self.scorer.info.device, error=repr(exc)[:300])
                if attempt < attempts:
                    continue
                if self.s.model.cpu_fallback and self.scorer.device.type != "cpu":
                    self.scorer.fall_back_to_cpu()
                    self.metrics.device_fallback.set(1)
                    return self.scorer.probabilities(x)
                raise

    async def _inference_loop(self, out: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self.batcher.next_batch()
            if batch is None:
                await out.put(None)
                return
            probs = await loop.run_in_executor(self.executor, self._infer, batch)
            await out.put((batch, probs))

    # -- publish --------------------------------------------------------------------------------
    async def _publish_loop(self, queue: asyncio.Queue) -> None:
        while (item := await queue.get()) is not None:
            await self._publish(*item)

    async def _publish(self, batch: list[EmittedWindow], probs: list[float | None]) -> None:
        info = self.scorer.info
        docs = [flag_message(w, p, info.threshold, info.model_id) for w, p in zip(batch, probs)]
        topic = self.s.kafka.flags_topic

        async def attempt():  # all of the batch, in order; a retry may duplicate a flag, never lose one
            futures = [await self.producer.send(topic, dumps(d), key=d["patient_id"].encode()) for d in docs]
            await asyncio.gather(*futures)

        await retry_kafka(attempt, lambda exc, delay: log.warning(
            "publish_retry", topic=topic, windows=len(docs), error=repr(exc), retry_in_s=delay))
        now = time.time()
        for w, d in zip(batch, docs):
            self.store.reported(w)
            if not self.store.owns(w.partition):
                continue  # revoked meanwhile: its new owner applies these flags to the restored episodes
            st = self.store.patient(w.partition, w.patient_id)
            episode = self.episodes.update(d, st.episode, now, grid=w.anchor_ns)
            if st.episode.last_window == (w.anchor_ns, w.start_ns):
                self.store.changed(w.partition, w.patient_id)
            if episode is not None:
                await self._send_episode(episode)
        acked = time.time()
        for w, d in zip(batch, docs):
            self.tracker.release(w.hold)
            self.pending_by_tp[w.partition] -= 1
            self.metrics.windows.labels(d["status"]).inc()
            self.metrics.latency_s.observe(max(acked - w.completed_at, 0.0))
        self.settled.set()

    async def _send_episode(self, episode: dict) -> None:
        await self._send_with_retry(self.s.kafka.episodes_topic, episode["patient_id"].encode(), dumps(episode))
        self.metrics.episodes.labels(episode["state"]).inc()
        log.info("episode", state=episode["state"], reason=episode["reason"], patient=patient_ref(episode["patient_id"]),
                 episode=episode_ref(episode["patient_id"], episode["start_ns"]))

    def _close_stale_episodes(self, now: float) -> None:
        """Suppression never stays on by itself: an episode no scored window updated for
        episodes.stale_after_s is closed (its state is checkpointed like any other change)."""
        if self.episodes is None:
            return
        for partition, st in self.store:
            msg = self.episodes.stale(st.patient_id, st.episode, now)
            if msg is not None:
                self.store.changed(partition, st.patient_id)
                self._background(self._send_episode(msg))

    # -- commits and rebalances -------------------------------------------------------------------
    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.s.kafka.commit_interval_s)
            await self._commit(self.assigned)

    async def _commit(self, partitions: set[TopicPartition]) -> None:
        if self.checkpointer is not None:
            await self.checkpointer.checkpoint(partitions)

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Publish what is in flight for these partitions, checkpoint, then drop their buffers and states."""
        deadline = time.monotonic() + self.s.kafka.session_timeout_ms / 2000
        while any(self.pending_by_tp[tp] > 0 or self.tracker.in_flight(tp) for tp in revoked):
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("revoke_before_drained", pending=sum(self.pending_by_tp[tp] for tp in revoked))
                break
            self.settled.clear()
            try:
                await asyncio.wait_for(self.settled.wait(), left)
            except asyncio.TimeoutError:
                pass
        await self._commit(revoked)
        for tp in revoked:
            dropped = self.stage.drop_partition(tp)
            self.tracker.drop_partition(tp)
            self.assigned.discard(tp)
            log.info("partition_revoked", topic=tp.topic, partition=tp.partition, patients_dropped=dropped)

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        """Restore the patient states of these partitions, then let their records in (never before)."""
        new = sorted(assigned - self.assigned)
        for tp in new:
            self.tracker.start_partition(tp, await self.consumer.committed(tp))
        states = await read_states(self.state_reader, self.s.kafka.state_topic, new)
        for tp in new:
            self.store.load(tp, states[tp])
            self.assigned.add(tp)
            log.info("partition_assigned", topic=tp.topic, partition=tp.partition,
                     committed=self.tracker.committed.get(tp), patients_restored=len(states[tp]))
