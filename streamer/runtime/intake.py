"""Input records in: decode, check the partition, window. The consume loop calls `Intake.ingest_batch` once
for each partition's records of a fetch (decoded together, then settled one by one in offset order);
`ingest` takes one record.

Invariant: `ingest` never raises because of what a record holds. Every record ends in exactly one of
- accepted by the window stage (its samples buffered or held; the stage may still refuse it later, and hand
  it back as a dead letter then),
- dropped by an explicit policy (`windows.unknown_lead = "drop"`), counted in `streamer_dropped_total`,
- a dead letter with a reason, counted in `streamer_dead_letters_total{reason}`.
A failure no rule foresaw (a bug, a library refusing a shape) is `internal_error`: it costs that record,
never its partition (Kafka Streams' deserialization exception handler, set to continue).
`ingest_batch` ends each record exactly as `ingest` would, in the same order (decode_many's outcome for a
record is decode's), so the window stage still gets records one at a time in offset order.
"""

from __future__ import annotations

import enum
import time
from typing import Callable

from streamer.checkpointing import OffsetsLedger
from streamer.ingest.contract import Chunk, InvalidMessage, decode, decode_many
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
        try:
            chunk = decode(record.key, record.value, self.settings.windows)
        except InvalidMessage as exc:
            return self._refused(tp, record, exc)
        except Exception as exc:  # decode promises InvalidMessage only: a bug here costs one record
            log.exception("decode_failed", offset=record.offset)
            self.dead_letter(tp, record, "internal_error", type(exc).__name__)
            return Outcome.DEAD_LETTER
        return self._window(tp, record, chunk, now, partitions)

    def ingest_batch(self, tp, records, now: float, partitions: int) -> list[Outcome]:
        """`records`: one partition's records of a fetch, in offset order; each ends as `ingest` would end
        it. Binary frames decode together in about half the time (benchmarks/RESULTS.md, issue 48 item 3);
        should decode_many itself fail (a bug), each record goes through `ingest`."""
        try:
            decoded = decode_many([(r.key, r.value) for r in records], self.settings.windows)
        except Exception:  # decode_many promises outcomes only: a bug costs the bulk path, never a record
            log.exception("decode_many_failed", first_offset=records[0].offset if records else None)
            return [self.ingest(tp, record, now, partitions) for record in records]
        outcomes = []
        for record, result in zip(records, decoded):
            self.ledger.consumed(tp, record.offset)
            self.counts.messages += 1
            if type(result) is Chunk:
                outcomes.append(self._window(tp, record, result, now, partitions))
            else:
                outcomes.append(self._refused(tp, record, result))
        return outcomes

    def _refused(self, tp, record, exc: InvalidMessage) -> Outcome:
        if exc.reason == "wrong_lead" and self.settings.windows.unknown_lead == "drop":
            self.metrics.dropped.labels(exc.reason).inc()
            return Outcome.DROPPED
        self.dead_letter(tp, record, exc.reason, exc.detail)
        return Outcome.DEAD_LETTER

    def _window(self, tp, record, chunk: Chunk, now: float, partitions: int) -> Outcome:
        """A decoded record: on its patient's partition, then into the window stage."""
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
