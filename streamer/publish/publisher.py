"""Sending outputs: flags in window order, episodes, and what their publication releases.

The publisher owns the producer side of the data path. For each window it sends the flag, records the
report in the patient state, feeds the episode tracker (sending any transition) and releases the window's
hold in the offsets ledger, so the commit point can move past its records. When that happens depends on
the delivery mode (checkpointing/outputs.py):
- at least once: after the broker acknowledged the batch; unacknowledged sends are retried (a retry may
  duplicate a flag, never lose one; flags carry their window id);
- exactly once: as soon as the flag is in its partition's open transaction, under the partition's gate, so
  the transaction that moves the offsets also carries the flag, the state and the episode message. A send
  that fails makes the transaction fail: the worker stops and the next owner redoes the window.
"""

from __future__ import annotations

import asyncio
import time

from streamer.checkpointing import OffsetsLedger
from streamer.checkpointing.outputs import AtLeastOnceOutputs, BackgroundSends, TransactionalOutputs
from streamer.kafka.clients import retry_kafka
from streamer.logs import episode_ref, get_logger, patient_ref
from streamer.metrics import Metrics
from streamer.publish.episodes import EpisodeTracker
from streamer.publish.messages import dumps, flag_message
from streamer.settings import KafkaSettings
from streamer.state.store import StateStore
from streamer.windows.buffer import EmittedWindow

log = get_logger("streamer.publish")


class Publisher:
    def __init__(self, k: KafkaSettings, outputs: AtLeastOnceOutputs | TransactionalOutputs, ledger: OffsetsLedger,
                 store: StateStore, episodes: EpisodeTracker, metrics: Metrics, settled: asyncio.Event):
        self.k, self.outputs, self.ledger, self.store = k, outputs, ledger, store
        self.episodes, self.metrics, self.settled = episodes, metrics, settled
        self.background = BackgroundSends()  # episode messages sent beside the flags (stale closes)

    async def flags(self, batch: list[EmittedWindow], probs: list[float | None], threshold: float,
                    model_id: str) -> None:
        docs = [flag_message(w, p, threshold, model_id) for w, p in zip(batch, probs)]
        if self.outputs.exactly_once:
            await self._flags_in_transactions(batch, docs)
        else:
            await self._flags_acknowledged(batch, docs)

    async def _flags_acknowledged(self, batch: list[EmittedWindow], docs: list[dict]) -> None:
        topic = self.k.flags_topic

        async def attempt():  # all of the batch, in order
            futures = [await self.outputs.send(w.partition, topic, dumps(d), key=d["patient_id"].encode())
                       for w, d in zip(batch, docs)]
            await asyncio.gather(*futures)

        await retry_kafka(attempt, lambda exc, delay: log.warning(
            "publish_retry", topic=topic, windows=len(docs), error=repr(exc), retry_in_s=delay))
        now = time.time()
        for w, d in zip(batch, docs):
            self.store.reported(w)
            if not self.store.owns(w.partition):
                continue  # revoked meanwhile: its new owner applies these flags to the restored episodes
            for episode in self._apply_to_episode(w, d, now):
                await self.episode(w.partition, episode)
        self._released(batch, docs)

    async def _flags_in_transactions(self, batch: list[EmittedWindow], docs: list[dict]) -> None:
        topic = self.k.flags_topic
        by_partition: dict = {}
        for w, d in zip(batch, docs):
            by_partition.setdefault(w.partition, []).append((w, d))
        futures, published = [], []
        now = time.time()
        for tp, items in by_partition.items():
            async with self.outputs.gate(tp) as owned:
                if not owned:
                    continue  # revoked meanwhile: its new owner redoes these windows
                for w, d in items:
                    if not self.ledger.is_current(w.hold):
                        continue  # from before a revocation: this assignment re-reads and redoes it
                    futures.append(await self.outputs.send(tp, topic, dumps(d), key=d["patient_id"].encode()))
                    self.store.reported(w)
                    for episode in self._apply_to_episode(w, d, now):
                        futures.append(await self._send_episode(tp, episode))
                    self.ledger.release(w.hold)
                    published.append((w, d))
        await asyncio.gather(*futures)  # a failure here fails the transaction: raised, the worker stops
        self._released(published, None)

    def _apply_to_episode(self, w: EmittedWindow, d: dict, now: float) -> list[dict]:
        st = self.store.patient(w.partition, w.patient_id)
        episode = self.episodes.update(d, st.episode, now, grid=w.anchor_ns)
        if st.episode.last_window == (w.anchor_ns, w.start_ns):
            self.store.changed(w.partition, w.patient_id)
        return [episode] if episode is not None else []

    def _released(self, items, docs) -> None:
        acked = time.time()
        pairs = zip(items, docs) if docs is not None else items
        for w, d in pairs:
            if docs is not None:
                self.ledger.release(w.hold)
            self.metrics.windows.labels(d["status"]).inc()
            self.metrics.latency_s.observe(max(acked - w.completed_at, 0.0))
        self.settled.set()

    async def _send_episode(self, partition, episode: dict):
        fut = await self.outputs.send(partition, self.k.episodes_topic, dumps(episode),
                                      key=episode["patient_id"].encode())
        self._episode_sent(episode)
        return fut

    def _episode_sent(self, episode: dict) -> None:
        self.metrics.episodes.labels(episode["state"]).inc()
        log.info("episode", state=episode["state"], reason=episode["reason"], patient=patient_ref(episode["patient_id"]),
                 episode=episode_ref(episode["patient_id"], episode["start_ns"]))

    async def episode(self, partition, episode: dict) -> None:
        """At least once: one episode message, sent until the broker acknowledges it."""
        await self.outputs.send_acknowledged(partition, self.k.episodes_topic, dumps(episode),
                                             key=episode["patient_id"].encode())
        self._episode_sent(episode)

    def close_stale_episodes(self, now: float) -> int:
        """Suppression never stays on by itself: close, in the background, the episodes no scored window
        updated for episodes.stale_after_s (their state change is checkpointed like any other)."""
        closed = 0
        for partition, st in list(self.store):
            if self.outputs.exactly_once:
                # decided and sent under the partition's gate, so the close and its state share a transaction
                if st.episode.open_start_ns is not None and now - st.episode.updated_at_s >= \
                        self.episodes.s.stale_after_s:
                    self.background.spawn(self._stale_in_transaction(partition, st.patient_id, now))
                    closed += 1
                continue
            msg = self.episodes.stale(st.patient_id, st.episode, now)
            if msg is not None:
                self.store.changed(partition, st.patient_id)
                self.background.spawn(self.episode(partition, msg))
                closed += 1
        return closed

    async def _stale_in_transaction(self, partition, patient_id: str, now: float) -> None:
        async with self.outputs.gate(partition) as owned:
            if not owned or not self.store.owns(partition):
                return
            st = self.store.patient(partition, patient_id)
            msg = self.episodes.stale(patient_id, st.episode, now)
            if msg is None:
                return  # closed or renewed meanwhile
            self.store.changed(partition, patient_id)
            fut = await self._send_episode(partition, msg)
        await fut

