"""At least once through the one delivery interface (delivery/), without a broker: the
order of durable writes, sends, acknowledgements and `counted` callbacks the publisher relies on. Exactly
once, against Apache Kafka: tests/integration/test_integration_transactions.py."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError

from streamer.delivery import AtLeastOnceDelivery, CheckpointPlan


class Producer:
    """aiokafka's send as the outputs use it; records land at once unless `failures` says otherwise."""

    def __init__(self, events: list, failures: list[Exception] | None = None):
        self.events, self.failures = events, list(failures or [])

    async def send(self, topic, value, key=None, headers=None, partition=None, timestamp_ms=None):
        fut = asyncio.get_running_loop().create_future()
        if self.failures:
            fut.set_exception(self.failures.pop(0))
        else:
            self.events.append(("landed", topic, value))
            fut.set_result(None)
        return fut


def test_acknowledged_delivery_writes_first_then_sends_then_counts_each_in_order():
    """durable_first before any record of the block; each `counted` after its acknowledgement, in send
    order; what a callback sends is delivered (its own durable write first) before the next one counts."""
    events: list = []

    async def main():
        delivery = AtLeastOnceDelivery(Producer(events))

        async def write(name):
            events.append(("durable", name))

        async with delivery.deliver("p0") as d:
            assert d.owned
            d.durable_first(lambda: write("state-a"))

            async def flag_a_counted():
                events.append(("counted", b"flag-a"))
                d.durable_first(lambda: write("episode-a"))
                await d.send("episodes", b"episode-a", counted=lambda: events.append(("counted", b"episode-a")))

            await d.send("flags", b"flag-a", counted=flag_a_counted, urgent=True)
            await d.send("flags", b"flag-b", counted=lambda: events.append(("counted", b"flag-b")))
            assert events == [], "nothing is sent before the block ends"
        assert d.stands() and not delivery.awaiting.event.is_set()  # nothing waits for a commit to be seen

    asyncio.run(main())
    assert events == [("durable", "state-a"), ("landed", "flags", b"flag-a"), ("landed", "flags", b"flag-b"),
                      ("counted", b"flag-a"), ("durable", "episode-a"), ("landed", "episodes", b"episode-a"),
                      ("counted", b"episode-a"), ("counted", b"flag-b")]


def test_acknowledged_delivery_retries_what_can_succeed_and_raises_what_cannot():
    events: list = []

    async def main(failures):
        delivery = AtLeastOnceDelivery(Producer(events, failures))
        counted = []
        async with delivery.deliver("p0") as d:
            await d.send("flags", b"f", counted=lambda: counted.append(1))
        return counted

    assert asyncio.run(main([KafkaConnectionError("down")])) == [1]  # sent again, then counted once
    assert events == [("landed", "flags", b"f")]
    with pytest.raises(MessageSizeTooLargeError):
        asyncio.run(main([MessageSizeTooLargeError("too big")]))  # never counted


def test_an_acknowledged_checkpoint_writes_the_records_then_commits_and_retries_them_later_on_failure():
    events: list = []

    class Consumer:
        def __init__(self):
            self.commits = []

        async def commit(self, offsets):
            self.commits.append(dict(offsets))

    def plan_for(partitions):
        return CheckpointPlan({"p0": 42}, lambda tp: iter([("state", b"k", b"v", 0)]), {"p0"},
                              lambda: events.append(("retry_later",)))

    async def main(failures):
        consumer = Consumer()
        committed = await AtLeastOnceDelivery(Producer(events, failures)).checkpoint({"p0"}, plan_for, consumer, "g")
        return committed, consumer.commits

    assert asyncio.run(main([])) == ({"p0": 42}, [{"p0": 42}])
    assert events == [("landed", "state", b"v")]
    events.clear()
    assert asyncio.run(main([KafkaConnectionError("down")])) == (None, [])  # nothing committed
    assert events == [("retry_later",)]
