"""Sending outputs: flags in window order, episodes, and what their publication releases.

The publisher owns the producer side of the data path. For each window it sends the flag, records the
report in the patient state, feeds the episode tracker (sending any transition) and releases the window's
hold in the offsets ledger, so the commit point can move past its records. All of that is done when the
flag counts, and the publisher does not know when that is: it sends through `delivery.deliver` (one
interface, streamer/delivery) and makes the changes in the flag's `counted` callback. The mode
decides the moment:
- at least once: once the broker acknowledged the flag; unacknowledged sends are retried (a retry may
  duplicate a flag, never lose one; flags carry their window id);
- exactly once: as soon as the flag is in its partition's open transaction, under the partition's gate, so
  the transaction that moves the offsets also carries the flag, the state and the episode message. A send
  that fails makes the transaction fail: the worker stops and the next owner redoes the window.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Awaitable, Callable

from streamer.checkpointing import OffsetsLedger
from streamer.delivery import BackgroundSends, Block, Delivery
from streamer.logs import episode_ref, get_logger, patient_ref
from streamer.metrics import Metrics
from streamer.model.decision import Verdict, decide
from streamer.partitions import OwnedPartition
from streamer.publish.episodes import EpisodeTracker
from streamer.publish.messages import episode_bytes, flag_bytes
from streamer.settings import KafkaSettings
from streamer.state.patients import EpisodeTransition, FlagAhead, PatientState
from streamer.state.store import StateStore
from streamer.windows.buffer import EmittedWindow

log = get_logger("streamer.publish")


class Publisher:
    def __init__(self, k: KafkaSettings, delivery: Delivery, ledger: OffsetsLedger,
                 store: StateStore, episodes: EpisodeTracker, metrics: Metrics, settled: asyncio.Event,
                 persist: Callable[[object, PatientState], Awaitable[None]] | None = None,
                 clock: Callable[[], float] = time.time, on_failure: Callable[[BaseException], None] | None = None):
        self.kafka, self.delivery, self.ledger, self.store = k, delivery, ledger, store
        self.partitions = ledger.partitions  # the worker's registry: "still mine?" is `OwnedPartition.mine`
        self.episodes, self.metrics, self.settled = episodes, metrics, settled
        self.persist = persist  # one patient's state written now (Checkpointer.persist): durable_first's writes
        self.clock = clock  # wall time (s): episode staleness and leases
        # episode messages sent beside the flags (renewals, stale closes); a failure for good is fatal
        self.background = BackgroundSends(on_failure)

    async def flags(self, batch: list[EmittedWindow], probs: list[float | None], threshold: float,
                    model_id: str) -> None:
        """Publish a scored batch: each partition's flags in window order, side by side across partitions."""
        taken = time.time()
        by_partition: dict = {}
        for w, p in zip(batch, probs):
            by_partition.setdefault(w.partition, []).append((w, decide(w, p, threshold, model_id)))
        counted = await asyncio.gather(*(self._partition_flags(tp, items) for tp, items in by_partition.items()))
        self._counted([pair for pairs in counted for pair in pairs], taken)

    async def _partition_flags(self, tp, items: list[tuple[EmittedWindow, Verdict]]
                               ) -> list[tuple[EmittedWindow, Verdict]]:
        """One partition's flags; returns those that count (none if the partition was lost meanwhile)."""
        counted: list = []
        async with self.delivery.deliver(tp) as block:
            if not block.owned:
                return []  # revoked meanwhile: its new owner redoes these windows
            # A window handed on before its partition was revoked is dropped: the records it came from were
            # not committed past, so whoever owns the partition now redoes it (and a wall-clock close
            # published late beside that redo would give one window_id two contents).
            items = [(w, v) for w, v in items if self.ledger.is_current(w.hold)]
            if self.persist is not None and any(w.by_clock for w, _ in items):
                block.durable_first(functools.partial(self._write_ahead, items))
            for w, v in items:
                await block.send(self.kafka.flags_topic, flag_bytes(v), key=v.patient_id.encode(), urgent=True,
                             counted=functools.partial(self._flag_counted, block, w, v, counted))
        # a refusal fails the transaction (raised above: the worker stops); a fence drops them: they are
        # redone from the partition's last commit
        return counted if block.stands() else []

    async def _flag_counted(self, block: Block, w: EmittedWindow, v: Verdict, counted: list) -> None:
        """What a flag that counts implies: its window reported, its episode updated (and any transition
        sent with it), its hold released so the commit point may pass its records. Of an assignment that
        ended meanwhile, nothing: the partition's next assignment (here or elsewhere) redoes the window from
        its last commit, against the state it restored."""
        if not w.hold.owner.mine:
            return
        self.store.reported(w)
        self.store.flag_published(w.partition, w.patient_id, v.window_id)
        st, episode = self._apply_to_episode(w, v, self.clock())
        if episode is not None:
            await self._send_episode(block, w.partition, st, episode)
        self.ledger.release(w.hold)
        counted.append((w, v))

    async def _write_ahead(self, items: list[tuple[EmittedWindow, Verdict]]) -> None:
        """Windows the wall clock closed: their patients' states, marking them reported and holding their
        flags, are written before the flags are sent (where a state is not written with its flags, at
        least once). Else a crash after the send and before the next checkpoint lets the replay complete
        such a window from records that came later: one window_id, two contents."""
        states = self.store.write_ahead(items)
        await asyncio.gather(*(self.persist(tp, st) for tp, st in states))

    def _apply_to_episode(self, w: EmittedWindow, v: Verdict, now: float
                          ) -> tuple[PatientState, EpisodeTransition | None]:
        st = self.store.patient(w.partition, w.patient_id)
        episode = self.episodes.update(v, st.episode, now, grid=w.anchor_ns)
        if st.episode.last_window == (w.anchor_ns, w.start_ns):
            self.store.changed(w.partition, w.patient_id)
        return st, episode

    def _counted(self, pairs: list[tuple[EmittedWindow, Verdict]], taken: float) -> None:
        """`taken`: when the publisher took the batch (the `sent` step starts there)."""
        now = time.time()
        for w, v in pairs:
            self.metrics.windows.labels(v.status).inc()
            self.metrics.latency_s.observe(max(now - w.completed_at, 0.0))
        self.metrics.flag_steps.observe("sent", now - taken, len(pairs))
        self.settled.set()

    # -- episode messages -------------------------------------------------------------------------
    # Each one is the state's `pending` message until it counts (then `pending` is cleared). The state
    # holding it is `durable_first`: at least once it is written to the changelog before the message is
    # sent, so a crash anywhere in between leaves it in the durable state and the next owner sends it
    # again (same seq, same bytes), and no number is ever sent that the durable state has not seen;
    # exactly once the message, the state and the offsets are one transaction.

    async def _send_episode(self, block: Block, partition, st: PatientState, episode: EpisodeTransition,
                            durable: bool = True) -> None:
        """`durable`: the state holding the message as pending is written first (where the outputs need
        that); False for a message restored from the durable state."""
        if durable and self.persist is not None:
            block.durable_first(functools.partial(self.persist, partition, st))
        await block.send(self.kafka.episodes_topic, episode_bytes(episode), key=episode.patient_id.encode(),
                     counted=functools.partial(self._sent, partition, st, episode))

    def _sent(self, partition, st: PatientState, episode: EpisodeTransition) -> None:
        if st.episode.pending is not None and st.episode.pending.seq == episode.seq:
            st.episode.pending = None
            self.store.changed(partition, st.patient_id)
        state = "renewed" if episode.renewal else episode.state
        self.metrics.episodes.labels(state).inc()
        if not episode.renewal:
            log.info("episode", state=episode.state, reason=episode.reason, seq=episode.seq,
                     patient=patient_ref(episode.patient_id),
                     episode=episode_ref(episode.patient_id, episode.start_ns)
                     if episode.start_ns is not None else None)

    def tend_episodes(self, now: float) -> int:
        """Once a second: renew the lease of each open episode when due, and close (reason stale) those
        no scored window updated for episodes.stale_after_s; in the background. Returns how many."""
        due = 0
        for partition, st in list(self.store):
            task = self.partitions.get(partition)
            if task is None or not self.episodes.due(st.episode, now):
                continue
            due += 1
            # decided when its delivery begins (exactly once: under the partition's gate), so the message
            # and its state count together
            self.background.spawn(self._tend(task, st.patient_id, now))
        return due

    async def _tend(self, task: OwnedPartition, patient_id: str, now: float) -> None:
        partition = task.tp
        async with self.delivery.deliver(partition) as block:
            if not block.owned or not task.mine:
                return
            st = self.store.patient(partition, patient_id)
            msg = self.episodes.tend(patient_id, st.episode, now)
            if msg is None:
                return  # closed or renewed meanwhile
            self.store.changed(partition, patient_id)
            await self._send_episode(block, partition, st, msg)

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
        task = self.partitions.get(partition)
        for st in list(self.store.states_of(partition).values()):
            if st.flags_ahead:
                self.background.spawn(self._republish_flags(task, st))
            if st.episode.pending is not None:
                self.background.spawn(self._republish(task, st, fresh=st.patient_id in lost))

    async def _republish_flags(self, task: OwnedPartition, st: PatientState) -> None:
        """Flags a previous owner wrote ahead and may not have published: sent again, the same bytes (a
        consumer de-duplicates by window_id), applied to the episode (a no-op if they were), cleared."""
        partition, entries = task.tp, list(st.flags_ahead)
        log.info("flags_republished", patient=patient_ref(st.patient_id), windows=len(entries),
                 topic=getattr(partition, "topic", None), partition=getattr(partition, "partition", partition))
        async with self.delivery.deliver(partition) as block:
            if not block.owned or not task.mine:
                return
            for e in entries:
                await block.send(self.kafka.flags_topic, flag_bytes(e.verdict), key=st.patient_id.encode(),
                             counted=functools.partial(self._written_ahead_counted, block, task, st, e))

    async def _written_ahead_counted(self, block: Block, task: OwnedPartition, st: PatientState,
                                     entry: FlagAhead) -> None:
        if not task.mine:
            return  # acknowledged after its assignment ended: the next one republishes it from its state
        partition = task.tp
        episode = self._flag_written_ahead_published(partition, st, entry)
        if episode is not None:
            await self._send_episode(block, partition, st, episode)

    def _flag_written_ahead_published(self, partition, st: PatientState, entry: FlagAhead
                                      ) -> EpisodeTransition | None:
        self.store.flag_published(partition, st.patient_id, entry.verdict.window_id)
        episode = self.episodes.update(entry.verdict, st.episode, self.clock(), grid=entry.grid)
        self.store.changed(partition, st.patient_id)
        return episode

    async def _republish(self, task: OwnedPartition, st: PatientState, fresh: bool) -> None:
        partition = task.tp
        async with self.delivery.deliver(partition) as block:
            if not block.owned or not task.mine or st.episode.pending is None:
                return
            # a restored pending message is durable already; a state_lost close is not yet
            await self._send_episode(block, partition, st, st.episode.pending, durable=fresh)
