"""A dead letter is sized as the broker counts it: header keys in UTF-8, null header values, every varint
(deadletter.batch_bytes, aiokafka's own batch bound). Counting characters let a hostile record's many
empty headers through at about a third of their size, and a null header value (Kafka allows it) raised
TypeError in the dead-letter task, which is fatal: the worker stopped on every restart."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import orjson
from aiokafka import TopicPartition
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from hypothesis import given, settings, strategies as st

from streamer.ingest.deadletter import (DEAD_LETTER_FRAMING_BYTES, MAX_DEAD_LETTER_BYTES, STAND_IN_MAX_BYTES,
                                       DeadLetters, batch_bytes, dead_letter_headers, headers_dict)
from tests.budget import examples


@dataclass
class Record:  # the fields of aiokafka's ConsumerRecord the dead letters read
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list
    timestamp: int = 1_795_000_000_000


def _dead_letters() -> DeadLetters:
    return DeadLetters("dlq", delivery=None, ledger=None, metrics=None, settled=asyncio.Event())


def _real_batch_bytes(key, value, headers) -> int:
    """The bytes of a real batch holding this one record, built by aiokafka."""
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=1, producer_id=7,
                                        producer_epoch=0, base_sequence=0, batch_size=1 << 30)
    assert builder.append(0, timestamp=1_795_000_000_000, key=key, value=value, headers=headers) is not None
    return len(builder.build())


@settings(max_examples=examples(100), deadline=None)
@given(key=st.none() | st.binary(max_size=40), value=st.none() | st.binary(max_size=2000),
       headers=st.lists(st.tuples(st.text(max_size=12), st.none() | st.binary(max_size=30)), max_size=40))
def test_batch_bytes_bounds_the_real_batch(key, value, headers):
    assert batch_bytes(key, value, headers) >= _real_batch_bytes(key, value, headers)


def test_many_empty_headers_are_weighed_as_the_broker_weighs_them():
    """500 kB of value and 150,000 empty one-letter headers: 650 kB by characters, about 950 kB in a batch,
    over the largest dead letter: it goes as the small stand-in that identifies it."""
    headers = [("h", b"")] * 150_000
    record = Record("in", 0, 5, b"bed-1", b"x" * 500_000, headers)
    by_characters = len(record.key) + len(record.value) + sum(len(k) + len(v) for k, v in headers)
    assert by_characters < MAX_DEAD_LETTER_BYTES < _real_batch_bytes(record.key, record.value, headers)
    key, value, out = _dead_letters()._sized(TopicPartition("in", 0), record, "malformed_json", "not JSON")
    assert headers_dict(out).get("value_omitted") == "too_large" and key == b"bed-1"
    assert orjson.loads(value)["value_size"] == 500_000
    assert batch_bytes(record.key, value, out) < 2_000


def test_a_null_header_value_is_kept_not_fatal():
    record = Record("in", 0, 5, b"bed-1", b"{not json", [("trace", None), ("ok", b"1")])
    key, value, out = _dead_letters()._sized(TopicPartition("in", 0), record, "malformed_json", "not JSON")
    assert (key, value) == (b"bed-1", b"{not json") and out[:2] == [("trace", None), ("ok", b"1")]
    assert out == dead_letter_headers("malformed_json", "not JSON", "in", 0, 5, record.headers)


@settings(max_examples=examples(60), deadline=None)
@given(limit=st.integers(0, 2_000_000), key=st.none() | st.binary(max_size=40_000),
       value=st.binary(max_size=60_000), detail=st.text(max_size=3000), topic=st.text(min_size=1, max_size=249))
def test_what_is_sent_fits_the_topic_or_is_a_stand_in_that_fits_any_topic_the_start_accepts(limit, key, value,
                                                                                            detail, topic):
    """Sized to the topic (`fit_to`, its max.message.bytes read at start): a dead letter goes whole only if it
    fits under that limit; otherwise as a stand-in no larger than STAND_IN_MAX_BYTES, the least an
    exactly-once start accepts, whatever the key, the value, the error message or the topic name."""
    dead_letters = _dead_letters()
    dead_letters.fit_to(limit)
    record = Record(topic, 3, 9, key, value, [("h", None)])
    out_key, out_value, out_headers = dead_letters._sized(TopicPartition(topic, 3), record, "malformed_json", detail)
    size = batch_bytes(out_key, out_value, out_headers)
    if out_value == value:
        assert size <= max(dead_letters.max_bytes, STAND_IN_MAX_BYTES) and size <= MAX_DEAD_LETTER_BYTES
        assert size <= limit - DEAD_LETTER_FRAMING_BYTES or dead_letters.max_bytes == STAND_IN_MAX_BYTES
    else:
        assert headers_dict(out_headers)["value_omitted"] == "too_large"
        assert size <= STAND_IN_MAX_BYTES, size

