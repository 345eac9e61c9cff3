"""The checkpoint: the one place input offsets move, together with the patient states they depend on."""

from __future__ import annotations

import asyncio

from aiokafka.errors import KafkaError

from streamer.checkpointing.ledger import OffsetsLedger
from streamer.logs import get_logger
from streamer.state.changelog import state_key
from streamer.state.store import StateStore

log = get_logger("streamer.checkpoint")


class Checkpointer:
    def __init__(self, ledger: OffsetsLedger, stage, store: StateStore, consumer, producer, state_topic: str):
        self.ledger, self.stage, self.store = ledger, stage, store
        self.consumer, self.producer, self.state_topic = consumer, producer, state_topic

    def prepare(self, partitions) -> tuple[dict, dict]:
        """Steps 1 and 2's inputs, in that order: (offsets safe to commit, changed states to write)."""
        points = {tp: off for tp, off in self.ledger.commit_points(self.stage.min_open_offsets()).items()
                  if tp in partitions}
        return points, self.store.take_dirty(partitions)

    async def checkpoint(self, partitions) -> bool:
        """Move the committed offsets of `partitions` as far as is safe. Steps, in this order:

        1. Per partition, the offset safe to commit (the offsets ledger's rule, ledger.py: nothing that still feeds an
           unpublished window or an unacknowledged dead letter), taken first.
        2. The patient states changed since the last checkpoint (what was reported, episodes) written to
           the changelog and acknowledged. They are at least as new as the offsets of step 1, so a restart
           from those offsets never meets a window whose report the state does not know about.
        3. The offsets of step 1 committed.
        A failure at 2 or 3 commits nothing more; the next checkpoint tries again.
        """
        if self.consumer is None:
            return False
        points, dirty = self.prepare(partitions)
        try:
            futures = []
            for tp, states in dirty.items():
                for st in states:
                    futures.append(await self.producer.send(
                        self.state_topic, st.to_bytes(tp.topic), key=state_key(tp.topic, st.patient_id),
                        partition=tp.partition))
            await asyncio.gather(*futures)
        except KafkaError as exc:
            for tp, states in dirty.items():
                for st in states:
                    self.store.changed(tp, st.patient_id)
            log.warning("checkpoint_state_failed", error=repr(exc))
            return False
        if not points:
            return True
        try:
            await self.consumer.commit(points)
        except KafkaError as exc:  # e.g. a rebalance is under way: the next checkpoint catches up
            log.warning("commit_failed", error=repr(exc))
            return False
        self.ledger.mark_committed(points)
        return True
