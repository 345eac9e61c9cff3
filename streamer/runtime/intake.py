"""One input record in: decode, check its partition, window it. The consume loop calls `Intake.ingest` for
every record it fetches.

Invariant: `ingest` never raises because of what a record holds. Every record ends in exactly one of
- accepted by the window stage (its samples buffered or held; the stage may still refuse it later, and hand
  it back as a dead letter then),
- dropped by an explicit policy (`windows.unknown_lead = "drop"`), counted in `streamer_dropped_total`,
- a dead letter with a reason, counted in `streamer_dead_letters_total{reason}`.
A failure no rule foresaw (a bug, a library refusing a shape) is `internal_error`: it costs that record,
never its partition (Kafka Streams' deserialization exception handler, set to continue).
"""

from __future__ import annotations

import enum
import time
from typing import Callable

from streamer.checkpointing import OffsetsLedger
from streamer.ingest.contract import InvalidMessage, decode
from streamer.ingest.partitioning import PartitionerWatch, home_partition
from streamer.logs import get_logger, patient_ref
from streamer.metrics import IngestCounts, Metrics
from streamer.settings import Settings
from streamer.windows.buffer import EmittedWindow
from streamer.windows.stage import WindowStage

log = get_logger("streamer.worker")


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    DROPPED = "dropped"
    DEAD_LETTER = "dead_letter"


DeadLetterSink = Callable[[object, object, str, str], None]  # (partition, record, reason, detail)


class Intake:
    def __init__(self, settings: Settings, ledger: OffsetsLedger, stage: WindowStage, counts: IngestCounts,
                 metrics: Metrics, partitioner_watch: PartitionerWatch, dead_letter: DeadLetterSink,
                 submit: Callable[[EmittedWindow], None]):
        self.settings = settings
        self.ledger = ledger
        self.stage = stage
        self.counts = counts
        self.metrics = metrics
        self.partitioner_watch = partitioner_watch
        self.dead_letter = dead_letter
        self.submit = submit

    def ingest(self, tp, record, now: float, partitions: int) -> Outcome:
        """`partitions`: how many the record's topic has (0: unknown, then the key is not checked)."""
        self.ledger.consumed(tp, record.offset)
        self.counts.messages += 1
        ws = self.settings.windows
        try:
            chunk = decode(record.key, record.value, ws)
        except InvalidMessage as exc:
            if exc.reason == "wrong_lead" and ws.unknown_lead == "drop":
                self.metrics.dropped.labels(exc.reason).inc()
                return Outcome.DROPPED
            self.dead_letter(tp, record, exc.reason, exc.detail)
            return Outcome.DEAD_LETTER
        except Exception as exc:  # decode promises InvalidMessage only: a bug here costs one record
            log.exception("decode_failed", offset=record.offset)
            self.dead_letter(tp, record, "internal_error", type(exc).__name__)
            return Outcome.DEAD_LETTER
        rule = self.settings.kafka.input_partitioner
        if partitions and (home := home_partition(record.key, partitions, rule)) != tp.partition:
            self.partitioner_watch.mismatch(tp, record.key, partitions, time.monotonic())
            self.dead_letter(tp, record, "wrong_partition", f"the key belongs to partition {home} of {partitions} "
                             f"({rule}, kafka.input_partitioner), not {tp.partition}: a patient on two "
                             "partitions would have two owners")
            return Outcome.DEAD_LETTER
        try:
            result = self.stage.accept(tp, record.offset, chunk, now, ref=record)
        except Exception as exc:  # a bug must cost one record, never the other patients
            log.exception("ingest_failed", patient=patient_ref(chunk.patient_id), offset=record.offset)
            self.dead_letter(tp, record, "internal_error", repr(exc)[:200])
            return Outcome.DEAD_LETTER
        self.counts.accepted(result)
        outcome = Outcome.ACCEPTED
        for refused, reason, detail in result.dead_letters:  # this record, or earlier ones held until now
            self.dead_letter(tp, refused, reason, detail)
            if refused is record:
                outcome = Outcome.DEAD_LETTER
        for w in result.windows:
            self.submit(w)
        return outcome
