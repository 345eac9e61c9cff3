"""The input schema enforced by the broker: the embedded broker's file schema registry refuses a
malformed JSON chunk at produce time, before any worker sees it."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import orjson
import pytest
from aiokafka.errors import KafkaError

from streamer.ingest.contract import Chunk, encode_binary, encode_json
from streamer.kafka.broker import EmbeddedBroker
from streamer.kafka.clients import make_producer
from tests.kafka_utils import SCHEMAS, isolated_settings, read_topic

pytestmark = pytest.mark.integration
T0 = 1_795_316_700_000_000_000


def registry_entry(schema_file: str) -> dict:
    """Tansu's JSON registry entry for a topic: the record as an object whose `value` has the schema
    (no `key` entry: the key is the patient id as plain UTF-8, not JSON)."""
    return {"type": "object", "properties": {"value": json.loads((SCHEMAS / schema_file).read_text())}}


def test_broker_refuses_what_the_input_schema_refuses(tmp_path):
    registry = tmp_path / "registry"
    registry.mkdir()
    with EmbeddedBroker(schema_registry=registry) as broker:
        s = isolated_settings(broker.bootstrap, partitions=1)
        topic = s.kafka.input_topics[0]
        (registry / f"{topic}.json").write_text(json.dumps(registry_entry("ecg-chunk.v1.schema.json")))
        good = encode_json(Chunk("bed-1", "II", T0, 500.0, np.zeros(125)))
        bad = {"no_lead": orjson.dumps({"patient_id": "bed-1", "t0_ns": T0, "fs": 500, "samples": [0.1]}),
               "counts_without_gain": orjson.dumps({"patient_id": "bed-1", "lead": "II", "t0_ns": T0, "fs": 500,
                                                    "counts": [1, 2]}),
               "binary_frame": encode_binary(Chunk("bed-1", "II", T0, 500.0, np.zeros(125)))}

        async def produce() -> dict[str, bool]:
            producer = make_producer(s.kafka, request_timeout_ms=5000)
            await producer.start()
            try:
                accepted = {}
                for name, value in {"good": good, **bad}.items():
                    try:
                        await producer.send_and_wait(topic, value, key=b"bed-1")
                        accepted[name] = True
                    except KafkaError:
                        accepted[name] = False
                return accepted
            finally:
                await producer.stop()

        accepted = asyncio.run(produce())
        assert accepted == {"good": True, "no_lead": False, "counts_without_gain": False, "binary_frame": False}
        stored = asyncio.run(read_topic(s.kafka, topic, timeout_s=5))
        assert [r.value for r in stored] == [good]
