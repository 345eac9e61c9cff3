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
from typing import Awaitable, Callable

from streamer.checkpointing import OffsetsLedger
from streamer.checkpointing.outputs import AtLeastOnceOutputs, BackgroundSends, TransactionalOutputs
from streamer.kafka.clients import retry_kafka
from streamer.logs import episode_ref, get_logger, patient_ref
from streamer.metrics import Metrics
from streamer.publish.episodes import EpisodeTracker
from streamer.publish.messages import dumps, flag_message
from streamer.settings import KafkaSettings
from streamer.state.patients import PatientState
from streamer.state.store import StateStore
from streamer.windows.buffer import EmittedWindow

log = get_logger("streamer.publish")


class Publisher:
    def __init__(self, k: KafkaSettings, outputs: AtLeastOnceOutputs | TransactionalOutputs, ledger: OffsetsLedger,
                 store: StateStore, episodes: EpisodeTracker, metrics: Metrics, settled: asyncio.Event,
                 persist: Callable[[object, PatientState], Awaitable[None]] | None = None,
                 clock: Callable[[], float] = time.time):
        self.k, self.outputs, self.ledger, self.store = k, outputs, ledger, store
        self.episodes, self.metrics, self.settled = episodes, metrics, settled
        self.persist = persist  # at least once: one patient's state written now (Checkpointer.persist)
        self.clock = clock  # wall time (s): episode staleness and leases
        self.background = BackgroundSends()  # episode messages sent beside the flags (renewals, stale closes)
        # exactly once: partitions whose open transactions hold flags no checkpoint committed yet
        self.uncommitted: set = set()
        self.flags_uncommitted = asyncio.Event()

    def take_uncommitted(self) -> set:
        """The partitions with flags in open transactions, forgotten here (their checkpoint is next)."""
        taken, self.uncommitted = self.uncommitted, set()
        self.flags_uncommitted.clear()
        return taken

    async def flags(self, batch: list[EmittedWindow], probs: list[float | None], threshold: float,
                    model_id: str) -> None:
        taken = time.time()
        if self.outputs.exactly_once:
            docs = [flag_message(w, p, threshold, model_id) for w, p in zip(batch, probs)]
            await self._flags_in_transactions(batch, docs, taken)
            return
        # A window handed on before its partition was revoked is dropped, as with transactions: the records
        # it came from were not committed past, so whoever owns the partition now redoes it, and a wall-clock
        # close (truncated) published late beside that redo would give one window_id two contents.
        current = [(w, p) for w, p in zip(batch, probs) if self.ledger.is_current(w.hold)]
        if current:
            await self._flags_acknowledged([w for w, _ in current],
                                           [flag_message(w, p, threshold, model_id) for w, p in current], taken)

    async def _flags_acknowledged(self, batch: list[EmittedWindow], docs: list[dict], taken: float) -> None:
        topic = self.k.flags_topic
        if self.persist is not None and any(w.by_clock for w in batch):
            await self._write_ahead(batch, docs)

        async def attempt():  # all of the batch, in order
            futures = [await self.outputs.send(w.partition, topic, dumps(d), key=d["patient_id"].encode())
                       for w, d in zip(batch, docs)]
            await asyncio.gather(*futures)

        await retry_kafka(attempt, lambda exc, delay: log.warning(
            "publish_retry", topic=topic, windows=len(docs), error=repr(exc), retry_in_s=delay))
        now = self.clock()
        for w, d in zip(batch, docs):
            self.store.reported(w)
            self.store.flag_published(w.partition, w.patient_id, d["window_id"])
            if not self.store.owns(w.partition):
                continue  # revoked meanwhile: its new owner applies these flags to the restored episodes
            st, episode = self._apply_to_episode(w, d, now)
            if episode is not None:
                await self._publish_acknowledged(w.partition, st, episode)
        self._released(batch, docs, taken)

    async def _write_ahead(self, batch: list[EmittedWindow], docs: list[dict]) -> None:
        """Windows the wall clock closed: their patients' states, marking them reported and holding their
        flags, are written before the flags are sent. Else a crash after the send and before the next
        checkpoint lets the replay complete such a window from records that came later: one window_id, two
        contents."""
        states = self.store.write_ahead(list(zip(batch, docs)))
        await asyncio.gather(*(self.persist(tp, st) for tp, st in states))

    async def _flags_in_transactions(self, batch: list[EmittedWindow], docs: list[dict], taken: float) -> None:
        topic = self.k.flags_topic
        by_partition: dict = {}
        for w, d in zip(batch, docs):
            by_partition.setdefault(w.partition, []).append((w, d))
        futures, published = [], []
        now = self.clock()
        for tp, items in by_partition.items():
            async with self.outputs.gate(tp) as owned:
                if not owned:
                    continue  # revoked meanwhile: its new owner redoes these windows
                for w, d in items:
                    if not self.ledger.is_current(w.hold):
                        continue  # from before a revocation: this assignment re-reads and redoes it
                    futures.append(await self.outputs.send(tp, topic, dumps(d), key=d["patient_id"].encode()))
                    self.store.reported(w)
                    st, episode = self._apply_to_episode(w, d, now)
                    if episode is not None:
                        futures.append(await self._send_in_transaction(tp, st, episode))
                    self.ledger.release(w.hold)
                    published.append((w, d))
                    self.metrics.flag_steps.joined_transaction(tp, time.time(), 1)
                    self.uncommitted.add(tp)
        if self.uncommitted:
            self.flags_uncommitted.set()
        await asyncio.gather(*futures)  # a refusal fails the transaction: raised, the worker stops
        # a fence drops them (resolved, not raised): they are redone from the partition's last commit
        self._released([(w, d) for w, d in published if not self.outputs.lost(w.partition)
                        and self.ledger.is_current(w.hold)], None, taken)

    def _apply_to_episode(self, w: EmittedWindow, d: dict, now: float) -> tuple[PatientState, dict | None]:
        st = self.store.patient(w.partition, w.patient_id)
        episode = self.episodes.update(d, st.episode, now, grid=w.anchor_ns)
        if st.episode.last_window == (w.anchor_ns, w.start_ns):
            self.store.changed(w.partition, w.patient_id)
        return st, episode

    def _released(self, items, docs, taken: float) -> None:
        """`taken`: when the publisher took the batch (the `sent` step starts there)."""
        acked = time.time()
        pairs = list(zip(items, docs) if docs is not None else items)
        for w, d in pairs:
            if docs is not None:
                self.ledger.release(w.hold)
            self.metrics.windows.labels(d["status"]).inc()
            self.metrics.latency_s.observe(max(acked - w.completed_at, 0.0))
        self.metrics.flag_steps.observe("sent", acked - taken, len(pairs))
        self.settled.set()

    # -- episode messages -------------------------------------------------------------------------
    # Each one is the state's `pending` message until it is published. At least once: the state holding
    # it is written to the changelog first, then the message is sent until acknowledged, then `pending`
    # is cleared; a crash anywhere in between leaves it in the durable state and the next owner sends it
    # again (same seq, same bytes), and no number is ever sent that the durable state has not seen.
    # Exactly once: the message, the state and the offsets are one transaction; `pending` is cleared
    # as the message joins it.

    async def _send_in_transaction(self, partition, st: PatientState, episode: dict):
        fut = await self.outputs.send(partition, self.k.episodes_topic, dumps(episode),
                                      key=episode["patient_id"].encode())
        self._sent(partition, st, episode)
        return fut

    async def _publish_acknowledged(self, partition, st: PatientState, episode: dict, persist: bool = True) -> None:
        if persist and self.persist is not None:
            await self.persist(partition, st)
        await self.outputs.send_acknowledged(partition, self.k.episodes_topic, dumps(episode),
                                             key=episode["patient_id"].encode())
        self._sent(partition, st, episode)

    def _sent(self, partition, st: PatientState, episode: dict) -> None:
        if st.episode.pending is not None and st.episode.pending["seq"] == episode["seq"]:
            st.episode.pending = None
            self.store.changed(partition, st.patient_id)
        state = "renewed" if episode["renewal"] else episode["state"]
        self.metrics.episodes.labels(state).inc()
        if not episode["renewal"]:
            log.info("episode", state=episode["state"], reason=episode["reason"], seq=episode["seq"],
                     patient=patient_ref(episode["patient_id"]),
                     episode=episode_ref(episode["patient_id"], episode["start_ns"])
                     if episode["start_ns"] is not None else None)

    def tend_episodes(self, now: float) -> int:
        """Once a second: renew the lease of each open episode when due, and close (reason stale) those
        no scored window updated for episodes.stale_after_s; in the background. Returns how many."""
        due = 0
        for partition, st in list(self.store):
            if not self.episodes.due(st.episode, now):
                continue
            due += 1
            if self.outputs.exactly_once:
                # decided and sent under the partition's gate, so the message and its state share a transaction
                self.background.spawn(self._tend_in_transaction(partition, st.patient_id, now))
                continue
            msg = self.episodes.tend(st.patient_id, st.episode, now)
            if msg is not None:
                self.store.changed(partition, st.patient_id)
                self.background.spawn(self._publish_acknowledged(partition, st, msg))
        return due

    async def _tend_in_transaction(self, partition, patient_id: str, now: float) -> None:
        async with self.outputs.gate(partition) as owned:
            if not owned or not self.store.owns(partition):
                return
            st = self.store.patient(partition, patient_id)
            msg = self.episodes.tend(patient_id, st.episode, now)
            if msg is None:
                return  # closed or renewed meanwhile
            self.store.changed(partition, patient_id)
            fut = await self._send_in_transaction(partition, st, msg)
        await fut

    def resume(self, partition, lost: list[str], now: float) -> None:
        """After a partition's states were restored: a conservative close (`state_lost`) for each patient
        whose state could not be read, and every message a previous owner left pending, sent again."""
        for patient_id in lost:
            st = self.store.patient(partition, patient_id)  # a fresh state in place of the unreadable one
            self.episodes.lost(patient_id, st.episode, now)
            self.store.changed(partition, patient_id)
            self.metrics.states_lost.inc()
            log.error("state_lost", patient=patient_ref(patient_id), topic=getattr(partition, "topic", None),
                      partition=getattr(partition, "partition", partition))
        for st in list(self.store.partitions.get(partition, {}).values()):
            if st.flags_ahead:
                self.background.spawn(self._republish_flags(partition, st))
            if st.episode.pending is not None:
                self.background.spawn(self._republish(partition, st, fresh=st.patient_id in lost))

    async def _republish_flags(self, partition, st: PatientState) -> None:
        """Flags a previous owner wrote ahead and may not have published: sent again, the same bytes (a
        consumer de-duplicates by window_id), applied to the episode (a no-op if they were), cleared."""
        entries = list(st.flags_ahead)
        log.info("flags_republished", patient=patient_ref(st.patient_id), windows=len(entries),
                 topic=getattr(partition, "topic", None), partition=getattr(partition, "partition", partition))
        if self.outputs.exactly_once:
            async with self.outputs.gate(partition) as owned:
                if not owned or not self.store.owns(partition):
                    return
                futures = []
                for e in entries:
                    futures.append(await self.outputs.send(partition, self.k.flags_topic, dumps(e["flag"]),
                                                           key=st.patient_id.encode()))
                    episode = self._flag_written_ahead_published(partition, st, e)
                    if episode is not None:
                        futures.append(await self._send_in_transaction(partition, st, episode))
            await asyncio.gather(*futures)
            return
        for e in entries:
            await self.outputs.send_acknowledged(partition, self.k.flags_topic, dumps(e["flag"]),
                                                 key=st.patient_id.encode())
            episode = self._flag_written_ahead_published(partition, st, e)
            if episode is not None:
                await self._publish_acknowledged(partition, st, episode)

    def _flag_written_ahead_published(self, partition, st: PatientState, entry: dict) -> dict | None:
        flag = entry["flag"]
        self.store.flag_published(partition, st.patient_id, flag["window_id"])
        episode = self.episodes.update(flag, st.episode, self.clock(), grid=entry["grid"])
        self.store.changed(partition, st.patient_id)
        return episode

    async def _republish(self, partition, st: PatientState, fresh: bool) -> None:
        if not self.outputs.exactly_once:
            # a restored pending message is durable already; a state_lost close is not yet
            await self._publish_acknowledged(partition, st, st.episode.pending, persist=fresh)
            return
        async with self.outputs.gate(partition) as owned:
            if not owned or not self.store.owns(partition) or st.episode.pending is None:
                return
            fut = await self._send_in_transaction(partition, st, st.episode.pending)
        await fut
