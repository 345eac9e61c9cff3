"""The gateways' ConfirmedSink over the real OrderedSender with an in-memory producer whose acknowledgements
the test gives: deliver() returns only once the brokers acknowledged its chunks, newer chunks are sent while
an older confirmation waits, and a failed delivery is resent in order before the waiter is answered."""

from __future__ import annotations

import asyncio

import numpy as np
from aiokafka.errors import KafkaTimeoutError

from streamer.gateways.sink import ConfirmedSink
from streamer.ingest.contract import Chunk, decode
from streamer.ingest.producer import OrderedSender
from streamer.settings import WindowSettings

T0 = 1_795_000_000_000_000_000


class Producer:
    """aiokafka's producer as OrderedSender uses it: send() returns a future the test resolves."""

    def __init__(self, name: str, log: list):
        self.name, self.log, self.futures = name, log, []

    async def send(self, topic, value, key=None, headers=None, **_):
        fut = asyncio.get_running_loop().create_future()
        self.futures.append(fut)
        self.log.append((self.name, decode(key, value, WindowSettings(), now_ns=T0).seq))
        return fut

    async def stop(self):
        pass

    def ack(self, error: BaseException | None = None) -> None:
        for fut in self.futures:
            if not fut.done():
                fut.set_exception(error) if error else fut.set_result(None)


def chunk(seq: int) -> Chunk:
    return Chunk("bed-1", "II", T0 + seq * 10**8, 500.0, np.zeros(50), seq, T0)


async def _sink(log: list, producers: list) -> ConfirmedSink:
    async def open_producer():
        producers.append(Producer(f"p{len(producers)}", log))
        return producers[-1], None  # idempotent

    sender = OrderedSender(open_producer, "in", "binary")
    await sender.start()
    sink = ConfirmedSink(sender, "dlq")
    sink._flusher = asyncio.create_task(sink._confirm_loop())
    return sink


async def _until(condition, what: str) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(what)


def test_newer_chunks_are_sent_while_an_older_confirmation_waits():
    async def main():
        log, producers = [], []
        sink = await _sink(log, producers)
        first = asyncio.create_task(sink.deliver([chunk(0)]))
        await _until(lambda: log == [("p0", 0)], "the first chunk sent")
        second = asyncio.create_task(sink.deliver([chunk(1)]))
        await _until(lambda: log == [("p0", 0), ("p0", 1)], "the second chunk sent before the first is acknowledged")
        await asyncio.sleep(0.01)
        assert not first.done() and not second.done()  # nothing acknowledged, nothing answered
        producers[0].ack()
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        assert sink.delivered_chunks == 2
        await sink.close()

    asyncio.run(main())


def test_a_failed_delivery_is_resent_in_order_before_its_waiter_is_answered():
    async def main():
        log, producers = [], []
        sink = await _sink(log, producers)
        first = asyncio.create_task(sink.deliver([chunk(0), chunk(1)]))
        await _until(lambda: len(log) == 2, "sent")
        second = asyncio.create_task(sink.deliver([chunk(2)]))
        await _until(lambda: len(log) == 3, "the newer chunk sent while the first waits")
        producers[0].ack(KafkaTimeoutError())  # every delivery of the first producer timed out
        await _until(lambda: len(producers) == 2 and len(log) == 6, "a fresh producer resends")
        assert log[3:] == [("p1", 0), ("p1", 1), ("p1", 2)]  # the bed's chunks again, in their order
        assert not first.done() and not second.done()
        producers[1].ack()
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        await sink.close()

    asyncio.run(main())
