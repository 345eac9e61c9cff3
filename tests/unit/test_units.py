"""Unit tests of parts that otherwise only run through the broker: the micro-batcher, the message
encodings (round trips), the Kafka retry helper and the backpressure rule."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.budget import examples

from streamer.batching import MicroBatcher
from streamer.ingest.contract import Chunk, decode, encode_binary, encode_json
from streamer.kafka.clients import retriable, retry_kafka
from streamer.settings import WindowSettings

T0 = 1_795_316_700_000_000_000


# -- micro-batcher ---------------------------------------------------------------------------------
def test_batcher_flushes_at_max_batch_at_once():
    async def main():
        b = MicroBatcher(max_batch=3, max_wait_ms=10_000)
        for i in range(7):
            b.put(i)
        t0 = time.monotonic()
        sizes = [len(await b.next_batch()), len(await b.next_batch())]
        return sizes, time.monotonic() - t0

    sizes, took = asyncio.run(main())
    assert sizes == [3, 3] and took < 1.0, "full batches must not wait for max_wait"


def test_batcher_flushes_a_lone_window_after_max_wait_and_keeps_order():
    async def main():
        b = MicroBatcher(max_batch=8, max_wait_ms=50)
        b.put("a")
        b.put("b")
        t0 = time.monotonic()
        batch = await b.next_batch()
        return batch, time.monotonic() - t0

    batch, took = asyncio.run(main())
    assert batch == ["a", "b"] and 0.03 <= took < 2.0


def test_batcher_close_flushes_the_rest_then_ends():
    async def main():
        b = MicroBatcher(max_batch=8, max_wait_ms=10_000)
        b.put(1)
        b.close()
        return await b.next_batch(), await b.next_batch()

    assert asyncio.run(main()) == ([1], None)


# -- encodings -------------------------------------------------------------------------------------
finite_mv = st.floats(min_value=-50, max_value=50, allow_nan=False, width=32)


@settings(max_examples=examples(150), deadline=None)
@given(pid=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FFF, categories=["L", "N", "P"]),
                   min_size=1, max_size=40),
       fs=st.sampled_from([125.0, 250.0, 360.0, 500.0, 1000.0]),
       samples=st.lists(finite_mv, min_size=1, max_size=400),
       seq=st.none() | st.integers(0, 2**40), seg=st.none() | st.integers(0, 10**12))
def test_json_and_binary_round_trip(pid, fs, samples, seq, seg):
    chunk = Chunk(pid, "II", T0, fs, np.asarray(samples, dtype=np.float64), seq,
                  None if seg is None else T0 - seg)
    s = WindowSettings()
    for value in (encode_json(chunk), encode_binary(chunk)):
        back = decode(pid.encode(), value, s, now_ns=T0)
        assert (back.patient_id, back.lead, back.t0_ns, back.fs, back.seq, back.segment_start_ns) == \
               (chunk.patient_id, chunk.lead, chunk.t0_ns, chunk.fs, chunk.seq, chunk.segment_start_ns)
        np.testing.assert_array_equal(back.samples.astype(np.float32), chunk.samples.astype(np.float32))


def test_int16_counts_round_trip_within_one_count():
    mv = np.linspace(-5, 5, 500)
    chunk = Chunk("bed-1", "II", T0, 500.0, mv)
    back = decode(b"bed-1", encode_binary(chunk, counts_gain=200.0, baseline=1024.0), WindowSettings(), now_ns=T0)
    assert np.max(np.abs(back.samples - mv)) <= 0.5 / 200.0 + 1e-12


# -- retry helper ----------------------------------------------------------------------------------
def test_retry_backs_off_on_retriable_errors_then_succeeds():
    calls, delays = [], []

    async def attempt():
        calls.append(1)
        if len(calls) < 4:
            raise KafkaConnectionError("broker down")
        return "sent"

    result = asyncio.run(retry_kafka(attempt, lambda exc, d: delays.append(d), first_delay_s=0.01, max_delay_s=0.03))
    assert result == "sent" and len(calls) == 4
    assert delays == [0.01, 0.02, 0.03]  # doubling, capped


def test_retry_raises_what_cannot_succeed_at_once():
    calls = []

    async def attempt():
        calls.append(1)
        raise MessageSizeTooLargeError("too big")

    assert not retriable(MessageSizeTooLargeError("too big")) and retriable(KafkaConnectionError("down"))
    with pytest.raises(MessageSizeTooLargeError):
        asyncio.run(retry_kafka(attempt, first_delay_s=0.01))
    assert len(calls) == 1


# -- backpressure ----------------------------------------------------------------------------------
class _Consumer:
    """Records pause/resume calls; the assignment is what the worker sees."""

    def __init__(self, partitions):
        self.partitions, self.paused = set(partitions), set()

    def assignment(self):
        return set(self.partitions)

    def pause(self, *tps):
        self.paused |= set(tps)

    def resume(self, *tps):
        self.paused -= set(tps)


def test_backpressure_pauses_above_the_limit_and_resumes_at_half():
    from streamer.settings import Settings
    from streamer.runtime import Worker

    s = Settings()
    s.batching.max_pending_windows = 10
    worker = Worker(s, scorer=object())
    consumer = _Consumer({("in", 0), ("in", 1)})
    worker.core.partitions.open(("in", 0))
    holds = [worker.core.ledger.hold(("in", 0), i) for i in range(11)]
    worker.core.backpressure.apply(consumer)  # what the consume loop does after each fetch
    assert worker.paused and consumer.paused == {("in", 0), ("in", 1)}
    for h in holds[:5]:  # 6 left: above half the limit, still paused
        worker.core.ledger.release(h)
    worker.core.backpressure.apply(consumer)
    assert worker.paused
    worker.core.ledger.release(holds[5])  # 5 left: at half, fetching resumes
    worker.core.backpressure.apply(consumer)
    assert not worker.paused and consumer.paused == set()
