"""The checkpoint: the one place input offsets move, together with the patient states they depend on."""

from __future__ import annotations

import asyncio


from streamer.checkpointing.ledger import OffsetsLedger
from streamer.delivery import CheckpointPlan, Delivery
from streamer.kafka.clients import retry_kafka
from streamer.logs import get_logger
from streamer.state.changelog import state_key
from streamer.state.store import StateStore

log = get_logger("streamer.checkpoint")


class Checkpointer:
    def __init__(self, ledger: OffsetsLedger, stage, store: StateStore, consumer,
                 delivery: Delivery, state_topic: str, group_id: str):
        self.ledger, self.stage, self.store = ledger, stage, store
        self.consumer, self.delivery, self.state_topic, self.group_id = consumer, delivery, state_topic, group_id
        self._lock = asyncio.Lock()  # checkpoints never overlap (commit loop, revocation, shutdown)

    def prepare(self, partitions) -> tuple[dict, dict, dict]:
        """Steps 1 and 2's inputs, in that order: (offsets safe to commit, changed states to write, patients
        whose states expired: tombstones to write)."""
        points = self.ledger.commit_points(self.stage.min_open_offsets(partitions), partitions)
        return points, self.store.take_dirty(partitions), self.store.take_expired(partitions)

    def _state_records(self, tp, states) -> list[tuple[str, bytes, bytes, int]]:
        return [(self.state_topic, state_key(tp.topic, st.patient_id), st.to_bytes(tp.topic), tp.partition)
                for st in states]

    def _tombstones(self, tp, patient_ids) -> list[tuple[str, bytes, None, int]]:
        return [(self.state_topic, state_key(tp.topic, pid), None, tp.partition) for pid in patient_ids]

    async def persist(self, tp, st) -> None:
        """At least once: one patient's state written now, until acknowledged (an episode message is
        written ahead in the state before it is sent: publish/publisher.py). Skipped once the partition
        is no longer this worker's: its revocation checkpoint wrote the state."""
        async def attempt():
            if self.store.lookup(tp, st.patient_id) is not st:
                return
            # serialized at each attempt, just before its send: a retry never lands a state older than
            # one a checkpoint wrote meanwhile
            ((topic, key, value, out_partition),) = self._state_records(tp, [st])
            await (await self.delivery.send(tp, topic, value, key=key, out_partition=out_partition))

        await retry_kafka(attempt, lambda exc, delay: log.warning(
            "state_write_retry", error=repr(exc), retry_in_s=delay))

    async def checkpoint(self, partitions) -> bool:
        """Move the committed offsets of `partitions` as far as is safe. Steps, in this order:

        1. Per partition, the offset safe to commit (the offsets ledger's rule, ledger.py: nothing that still feeds an
           unpublished window or an unacknowledged dead letter), taken first.
        2. The patient states changed since the last checkpoint (what was reported, episodes) written to
           the changelog. They are at least as new as the offsets of step 1, so a restart from those
           offsets never meets a window whose report the state does not know about.
        3. The offsets of step 1 committed.
        The delivery carries it out as its mode says (streamer/delivery): exactly once, per partition, 1-3 are one
        transaction with every output since the last checkpoint (a failure stops the worker); at least once,
        states acknowledged before the commit, and a failure at 2 or 3 commits nothing more and the next
        checkpoint tries again (False).
        """
        if self.consumer is None:
            return False
        async with self._lock:
            committed = await self.delivery.checkpoint(partitions, self._plan, self.consumer, self.group_id)
            if committed is None:
                return False
            self.ledger.mark_committed(committed)
        for tp, offset in committed.items():
            log.debug("offsets_committed", topic=tp.topic, partition=tp.partition, offset=offset)
        return True

    def _plan(self, partitions) -> CheckpointPlan:
        points, dirty, expired = self.prepare(partitions)

        def records(tp):
            yield from self._tombstones(tp, expired.get(tp, ()))
            for st in dirty.get(tp, ()):  # each serialized as it is taken: just before its send
                yield from self._state_records(tp, [st])

        def retry_later() -> None:
            for tp, states in dirty.items():
                for st in states:
                    self.store.changed(tp, st.patient_id)
            for tp, patient_ids in expired.items():
                self.store.expire_again(tp, patient_ids)

        return CheckpointPlan(points, records, set(dirty) | set(expired), retry_later)
