"""KIP-447 wire format and guards (streamer/kafka/kip447.py): the bytes Kafka's message schemas give, the
refusals, and hostile responses. The broker's side is tests/integration/test_kip447.py."""

from __future__ import annotations

import struct
from io import BytesIO

import pytest
from aiokafka.structs import TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.budget import examples

from streamer.kafka.kip447 import (GroupMetadata, Kip447Unsupported, MalformedResponse, OffsetFetchResponse_v7,
                                   StableOffsetFetch, TxnOffsetCommitResponse_v3, TxnOffsetCommitV3,
                                   UnfencedGroupMetadata, _read_offset_fetch)


# Kafka's primitive encodings, written out from the protocol guide (not aiokafka's types)
def i16(v: int) -> bytes:
    return struct.pack(">h", v)


def i32(v: int) -> bytes:
    return struct.pack(">i", v)


def i64(v: int) -> bytes:
    return struct.pack(">q", v)


def uvarint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def compact_string(s: str | None) -> bytes:  # length + 1, 0 for null
    if s is None:
        return uvarint(0)
    raw = s.encode()
    return uvarint(len(raw) + 1) + raw


def compact_array(items: list[bytes]) -> bytes:  # count + 1
    return uvarint(len(items) + 1) + b"".join(items)


NO_TAGS = uvarint(0)


def test_txn_offset_commit_v3_encodes_to_kafkas_layout():
    member = GroupMetadata("ward-7", 12, "member-éé-1", "bed-3")
    offsets = {TopicPartition("ecg", 1): (200, None), TopicPartition("ecg", 0): (100, "prefix"),
               TopicPartition("a-topic", 4): (2**40, "")}
    req = TxnOffsetCommitV3("tx-1", 4242, 3, member, offsets).prepare({28: (0, 6)})

    def partition(index: int, offset: int, metadata: str | None) -> bytes:
        # PartitionIndex int32, CommittedOffset int64, CommittedLeaderEpoch int32 (-1), CommittedMetadata
        # nullable compact string, tagged fields
        return i32(index) + i64(offset) + i32(-1) + compact_string(metadata) + NO_TAGS

    expected = (
        compact_string("tx-1")            # TransactionalId
        + compact_string("ward-7")        # GroupId
        + i64(4242)                       # ProducerId
        + i16(3)                          # ProducerEpoch
        + i32(12)                         # GenerationId (v3+)
        + compact_string("member-éé-1")   # MemberId (v3+)
        + compact_string("bed-3")         # GroupInstanceId (v3+, nullable)
        + compact_array([                 # Topics, sorted by name, partitions by index
            compact_string("a-topic") + compact_array([partition(4, 2**40, "")]) + NO_TAGS,
            compact_string("ecg") + compact_array([partition(0, 100, "prefix"), partition(1, 200, None)]) + NO_TAGS,
        ])
        + NO_TAGS
    )
    assert req.encode() == expected
    # request header v2 (flexible): api key 28, version 3, correlation id, client id (int16 string), tags
    assert req.build_request_header(7, "c").encode() == i16(28) + i16(3) + i32(7) + i16(1) + b"c" + NO_TAGS


def test_a_null_group_instance_id_is_a_null_compact_string():
    req = TxnOffsetCommitV3("t", 1, 0, GroupMetadata("g", 1, "m"), {}).prepare({28: (3, 3)})
    assert req.encode() == (compact_string("t") + compact_string("g") + i64(1) + i16(0) + i32(1)
                            + compact_string("m") + uvarint(0) + compact_array([]) + NO_TAGS)


def test_offset_fetch_v7_encodes_require_stable():
    tps = [TopicPartition("ecg", 2), TopicPartition("ecg", 0), TopicPartition("b", 1)]
    req = StableOffsetFetch("ward-7", tps).prepare({9: (1, 10)})
    expected = (compact_string("ward-7")
                + compact_array([compact_string("b") + compact_array([i32(1)]) + NO_TAGS,
                                 compact_string("ecg") + compact_array([i32(0), i32(2)]) + NO_TAGS])
                + b"\x01"  # RequireStable
                + NO_TAGS)
    assert req.encode() == expected
    assert req.build_request_header(1, "c").encode()[:4] == i16(9) + i16(7)


@pytest.mark.parametrize("generation, member", [(-1, "m"), (-1, ""), (3, ""), (-5, "m")])
def test_group_metadata_refuses_what_would_not_be_fenced(generation, member):
    with pytest.raises(UnfencedGroupMetadata, match="not fenced"):
        GroupMetadata("g", generation, member)


def test_group_metadata_needs_a_group():
    with pytest.raises(UnfencedGroupMetadata):
        GroupMetadata("", 1, "m")


@pytest.mark.parametrize("versions", [{}, {28: (0, 2)}, {28: (4, 6)}])
def test_a_broker_without_txn_offset_commit_v3_is_refused_not_downgraded(versions):
    with pytest.raises(Kip447Unsupported, match="TxnOffsetCommit v3") as refused:
        TxnOffsetCommitV3("t", 1, 0, GroupMetadata("g", 1, "m"), {}).prepare(versions)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("versions", [{}, {9: (0, 6)}])
def test_a_broker_without_offset_fetch_v7_is_refused(versions):
    with pytest.raises(Kip447Unsupported, match="OffsetFetch v7"):
        StableOffsetFetch("g", [TopicPartition("t", 0)]).prepare(versions)


def _txn_response(code: int, tags: bytes = NO_TAGS) -> bytes:
    return (i32(0) + compact_array([compact_string("ecg") + compact_array([i32(0) + i16(code) + tags]) + NO_TAGS])
            + NO_TAGS)


def test_a_txn_offset_commit_response_decodes():
    resp = TxnOffsetCommitResponse_v3.decode(_txn_response(22, tags=uvarint(1) + uvarint(5) + uvarint(2) + b"hi"))
    assert resp.topics == [("ecg", [(0, 22, {5: b"hi"})], {})]


def test_a_tagged_field_that_runs_past_the_end_is_refused():
    # aiokafka's TaggedFields would keep the two bytes that are there as the tag's value
    body = i32(0) + compact_array([]) + uvarint(1) + uvarint(3) + uvarint(200) + b"ab"
    with pytest.raises(MalformedResponse, match="runs past the end"):
        TxnOffsetCommitResponse_v3.decode(body)


def test_trailing_bytes_are_refused():
    with pytest.raises(MalformedResponse, match="after its last field"):
        TxnOffsetCommitResponse_v3.decode(_txn_response(0) + b"\x00")


def test_an_offset_fetch_answer_for_other_partitions_is_refused():
    body = (i32(0) + compact_array([compact_string("ecg") + compact_array(
        [i32(9) + i64(5) + i32(-1) + compact_string("") + i16(0) + NO_TAGS]) + NO_TAGS]) + i16(0) + NO_TAGS)
    resp = OffsetFetchResponse_v7.decode(body)
    with pytest.raises(MalformedResponse, match="asked"):
        _read_offset_fetch(resp, "g", [TopicPartition("ecg", 0)])


def test_unstable_offsets_are_retried_not_read():
    body = (i32(0) + compact_array([compact_string("ecg") + compact_array(
        [i32(0) + i64(-1) + i32(-1) + compact_string("") + i16(88) + NO_TAGS]) + NO_TAGS]) + i16(0) + NO_TAGS)
    found, why = _read_offset_fetch(OffsetFetchResponse_v7.decode(body), "g", [TopicPartition("ecg", 0)])
    assert found is None and why.startswith("UNSTABLE_OFFSET_COMMIT (88)")


VALID = [_txn_response(0), _txn_response(22),
         i32(5) + compact_array([compact_string("ecg") + compact_array(
             [i32(0) + i64(7) + i32(3) + compact_string("m") + i16(0) + NO_TAGS]) + NO_TAGS]) + i16(0) + NO_TAGS]


@settings(max_examples=examples(400), deadline=2000)
@given(data=st.data())
def test_hostile_or_truncated_responses_raise_one_clear_error(data):
    """Through the real decoders (the ones conn.py calls): a valid answer cut short, with bytes flipped, or
    random bytes either decodes to the schema or raises MalformedResponse; never a struct.error, never a
    hang (each field reads at least one byte, so hostile lengths end at the buffer's end)."""
    kind = data.draw(st.sampled_from(["truncated", "flipped", "random"]))
    cls = data.draw(st.sampled_from([TxnOffsetCommitResponse_v3, OffsetFetchResponse_v7]))
    if kind == "random":
        raw = data.draw(st.binary(max_size=300))
    else:
        raw = bytearray(data.draw(st.sampled_from(VALID)))
        if kind == "truncated":
            raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
        else:
            for _ in range(data.draw(st.integers(1, 4))):
                raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        raw = bytes(raw)
    try:
        resp = cls.decode(BytesIO(raw))
    except MalformedResponse as exc:
        assert cls.__name__ in str(exc) and len(str(exc)) < 250 and "\n" not in str(exc)
        return
    # what did decode re-encodes to the very bytes (nothing skipped, nothing invented)
    assert resp.encode() == raw


def test_a_truncated_valid_answer_is_refused_at_every_length():
    for cls, raw in ((TxnOffsetCommitResponse_v3, VALID[1]), (OffsetFetchResponse_v7, VALID[2])):
        for cut in range(len(raw)):
            with pytest.raises(MalformedResponse):
                cls.decode(raw[:cut])
