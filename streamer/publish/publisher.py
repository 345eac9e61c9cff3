"""Sending outputs: flags in window order, episodes, and what their acknowledgement releases.

The publisher owns the producer side of the data path: it retries what the broker did not acknowledge
(a retry may duplicate a flag, never lose one; flags carry their window id), records each reported
window in the patient state, feeds the episode tracker, and only then releases the window's hold in
the offsets ledger, so the commit point can move past its records.
"""

from __future__ import annotations

import asyncio
import time

from streamer.checkpointing import OffsetsLedger
from streamer.kafka.clients import retry_kafka, send_with_retry
from streamer.logs import episode_ref, get_logger, patient_ref
from streamer.metrics import Metrics
from streamer.publish.episodes import EpisodeTracker
from streamer.publish.messages import dumps, flag_message
from streamer.settings import KafkaSettings
from streamer.state.store import StateStore
from streamer.windows.buffer import EmittedWindow

log = get_logger("streamer.publish")


class Publisher:
    def __init__(self, k: KafkaSettings, producer, ledger: OffsetsLedger, store: StateStore,
                 episodes: EpisodeTracker, metrics: Metrics, settled: asyncio.Event):
        self.k, self.producer, self.ledger, self.store = k, producer, ledger, store
        self.episodes, self.metrics, self.settled = episodes, metrics, settled
        self.tasks: set[asyncio.Task] = set()  # episode messages sent beside the flags (stale closes)

    async def flags(self, batch: list[EmittedWindow], probs: list[float | None], threshold: float,
                    model_id: str) -> None:
        docs = [flag_message(w, p, threshold, model_id) for w, p in zip(batch, probs)]
        topic = self.k.flags_topic

        async def attempt():  # all of the batch, in order
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
                await self.episode(episode)
        acked = time.time()
        for w, d in zip(batch, docs):
            self.ledger.release(w.hold)
            self.metrics.windows.labels(d["status"]).inc()
            self.metrics.latency_s.observe(max(acked - w.completed_at, 0.0))
        self.settled.set()

    async def episode(self, episode: dict) -> None:
        await send_with_retry(self.producer, self.k.episodes_topic, episode["patient_id"].encode(), dumps(episode))
        self.metrics.episodes.labels(episode["state"]).inc()
        log.info("episode", state=episode["state"], reason=episode["reason"], patient=patient_ref(episode["patient_id"]),
                 episode=episode_ref(episode["patient_id"], episode["start_ns"]))

    def close_stale_episodes(self, now: float) -> int:
        """Suppression never stays on by itself: close, in the background, the episodes no scored window
        updated for episodes.stale_after_s (their state change is checkpointed like any other)."""
        closed = 0
        for partition, st in self.store:
            msg = self.episodes.stale(st.patient_id, st.episode, now)
            if msg is not None:
                self.store.changed(partition, st.patient_id)
                task = asyncio.create_task(self.episode(msg))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
                closed += 1
        return closed
