"""`streamer gateway hl7` (issue 47, item 1): PCD-01 waveform messages over MLLP into input records.

Unit tests and hypothesis fuzz of the parser (streamer.gateways.pcd01) need no broker; the server tests
run the gateway on Apache Kafka (the `broker` fixture) and talk to it with python-hl7's own MLLP client,
sending hl7apy-built, validated messages (tests/hl7_fixtures.py)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer.gateways.hl7_in import Segments, tls_context
from streamer.gateways.pcd01 import Pcd01, Refusal, Wave, parse_dtm, parse_pcd01, read_header
from streamer.errors import SettingsError
from tests.hl7_fixtures import (DIMLESS, LEAD_II, MV, MessageSpec, WaveSpec, build, dtm, ecg_mv,
                                lead_ii_message, mv_text)

T0 = 1_790_000_000_000_000_000  # 2026-09-21T...Z, a multiple of 100 us
NOW = T0 + 3600 * 10**9


def _parse(raw: bytes, **kw) -> Pcd01:
    return parse_pcd01(raw, now_ns=kw.pop("now_ns", NOW), **kw)


def _refusal(raw: bytes, **kw) -> Refusal:
    with pytest.raises(Refusal) as info:
        _parse(raw, **kw)
    return info.value


# -- the parser -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["mv", "counts", "name_only", "vendor", "uv"])
def test_each_shape_gives_the_exact_lead_ii_samples_and_time(shape):
    raw, expected = lead_ii_message("C1", T0, ecg_mv(500), shape=shape, others=True)
    pcd = _parse(raw)
    assert pcd.key == "MRN-1001" and pcd.key_source == "PID-3" and pcd.other_waves == 2
    (wave,) = pcd.waves
    assert wave.t0_ns == T0 and wave.fs == 500.0
    assert wave.samples_mv.dtype == np.float64 and np.array_equal(wave.samples_mv, expected)


def test_grouped_waves_never_lend_their_rate_or_resolution_to_lead_ii():
    """Lead I (250 Hz, 0.01 mV) and pleth (125 Hz) sit beside lead II (500 Hz, 0.005 mV) in one message: lead
    II's values and rate come from its own dotted group only, wherever the others' OBXs are."""
    raw, expected = lead_ii_message("C1", T0, ecg_mv(400), shape="counts", others=True)
    (wave,) = _parse(raw).waves
    assert wave.fs == 500.0 and np.array_equal(wave.samples_mv, expected)
    # without its own rate, lead II is refused rather than given lead I's
    spec = MessageSpec("C2", [WaveSpec("131329^MDC_ECG_ELEC_POTL_I^MDC", ["1", "2"], "1.1.1.1001", MV, "250",
                                       time=dtm(T0)),
                              WaveSpec(LEAD_II, ["1", "2"], "1.1.1.1002", MV, None, time=dtm(T0))])
    assert _refusal(build(spec)).reason == "no_rate"


def test_times_are_exact_nanoseconds_with_their_offset():
    assert parse_dtm("20260921093320.1234+0200") == parse_dtm("20260921073320.1234+0000")
    assert parse_dtm("20260921073320.123456789+0000") % 10**9 == 123456789
    assert parse_dtm("20260921073320-0530") - parse_dtm("20260921073320+0000") == 5.5 * 3600 * 10**9
    raw, _ = lead_ii_message("C1", T0, ecg_mv(10), offset_minutes=-300)
    assert _parse(raw).waves[0].t0_ns == T0
    with pytest.raises(Refusal) as info:
        parse_dtm("20260921073320.12")
    assert info.value.reason == "time_without_offset"
    assert parse_dtm("20260921073320", default_offset=3600) == parse_dtm("20260921063320+0000")
    assert parse_dtm("20260921073320", naive_times="utc") == parse_dtm("20260921073320+0000")
    for bad in ("20261321073320+0000", "20260921073360+0000", "202609210733+0000", "20260921073320+2500", "x"):
        with pytest.raises(Refusal):
            parse_dtm(bad)


def test_a_time_without_offset_takes_msh7s_and_is_refused_without_one():
    text = mv_text(ecg_mv(10))
    naive = dtm(T0)[:-5]
    spec = MessageSpec("C1", [WaveSpec(LEAD_II, text, time=naive)], msh_time="20260101120000+0100")
    assert _parse(build(spec)).waves[0].t0_ns == T0 - 3600 * 10**9
    spec.msh_time = "20260101120000"
    assert _refusal(build(spec)).reason == "time_without_offset"
    assert _parse(build(spec), naive_times="utc").waves[0].t0_ns == T0


def test_absurd_times_are_refused():
    assert _refusal(lead_ii_message("C1", 900_000_000 * 10**9, ecg_mv(10))[0]).reason == "bad_timestamp"
    future = NOW + 2 * 86400 * 10**9
    assert _refusal(lead_ii_message("C1", future, ecg_mv(10))[0]).reason == "bad_timestamp"


def test_keys_patient_then_bed_by_setting_and_neither_is_refused():
    raw, _ = lead_ii_message("C1", T0, ecg_mv(10), patient=None)
    refusal = _refusal(raw)
    assert (refusal.code, refusal.reason) == ("AR", "no_patient")
    pcd = _parse(raw, key_by="bed")
    assert (pcd.key, pcd.key_source) == ("ICU/12/1", "PV1-3")
    raw, _ = lead_ii_message("C1", T0, ecg_mv(10), patient=None, bed=None)
    assert (_refusal(raw, key_by="bed").code, _refusal(raw, key_by="bed").reason) == ("AR", "no_patient_or_bed")


def test_inop_and_invalid_status_mark_the_wave_invalid_without_samples():
    raw, _ = lead_ii_message("C1", T0, ecg_mv(10), inop=True, others=True)
    (wave,) = _parse(raw).waves
    assert wave.samples_mv is None and wave.why_invalid == "inop"
    spec = MessageSpec("C2", [WaveSpec(LEAD_II, mv_text(ecg_mv(10)), status="X", time=dtm(T0))])
    (wave,) = _parse(build(spec)).waves
    assert wave.samples_mv is None


@pytest.mark.parametrize("edit, reason", [
    ((b"|500|", b"|-500|"), "bad_rate"),
    ((b"|500|", b"|1e400|"), "bad_rate"),
    ((b"|500|", b"|NaN|"), "bad_rate"),
    ((b"266418^MDC_DIM_MILLI_VOLT", b"262880^MDC_DIM_MILLI_L"), "unknown_unit"),
    ((b"131330^MDC_ECG_ELEC_POTL_II", b"131330^MDC_PULS_OXIM_PLETH"), "ambiguous_lead"),
    ((b"|F|||2026", b"|F|||1999"), "bad_timestamp"),
    ((b"ORU^R01^ORU_R01", b"ADT^A01^ADT_A01"), "unsupported_message"),
])
def test_content_errors_are_refused_with_their_reason(edit, reason):
    raw, _ = lead_ii_message("C1", T0, ecg_mv(10))
    assert edit[0] in raw
    refusal = _refusal(raw.replace(edit[0], edit[1], 1))
    assert refusal.reason == reason and refusal.code in ("AE", "AR")


def test_an_msh_that_repeats_a_separator_is_refused_not_raised():
    # python-hl7's parser asserts on it: the handler must still answer (a raise closed the connection
    # unanswered, and the station resent the message forever)
    raw = b"MSH|^^~\\&|A|B|C|D|20260101120000+0000||ORU^R01^ORU_R01|F0|P|2.6\rPID|||MRN^^^H^MR\r"
    assert _refusal(raw).reason == "unparseable"


def test_values_are_strict_hl7_numbers():
    raw, _ = lead_ii_message("C1", T0, np.array([0.1, 0.2, 0.3]))
    for bad in (b"0.100^1e400^0.300", b"0.100^nan^0.300", b"0.100^^0.300", b"0.100^inf^0.300", b"0x1^2^3"):
        assert _refusal(raw.replace(b"0.100^0.200^0.300", bad)).reason == "bad_value"


def test_counts_without_a_resolution_are_refused():
    spec = MessageSpec("C1", [WaveSpec(LEAD_II, ["1", "2"], unit=DIMLESS, time=dtm(T0))])
    assert _refusal(build(spec)).reason == "unknown_unit"


def test_segments_continue_break_on_gaps_and_inop_and_stay_bounded():
    seg = Segments(cap=2)
    raw, _ = lead_ii_message("C1", T0, ecg_mv(500))
    first = seg.chunks(_parse(raw))
    assert first[0].segment_start_ns == T0  # the first message after start starts a segment
    nxt = seg.chunks(_parse(lead_ii_message("C2", T0 + 10**9, ecg_mv(500))[0]))
    assert nxt[0].segment_start_ns == T0  # contiguous
    late = seg.chunks(_parse(lead_ii_message("C3", T0 + 2 * 10**9 + 2 * 10**6, ecg_mv(500))[0]))
    assert late[0].segment_start_ns == T0 + 2 * 10**9 + 2 * 10**6  # one sample missing: a new segment
    assert seg.chunks(_parse(lead_ii_message("C4", T0 + 3 * 10**9 + 2 * 10**6, ecg_mv(500), inop=True)[0])) == []
    after = seg.chunks(_parse(lead_ii_message("C5", T0 + 4 * 10**9 + 2 * 10**6, ecg_mv(500))[0]))
    assert after[0].segment_start_ns == after[0].t0_ns  # after an INOP: a new segment though contiguous
    for p in ("A", "B"):
        seg.chunks(_parse(lead_ii_message("C6", T0, ecg_mv(5), patient=p)[0]))
    assert seg.forgotten == 1 and len(seg._beds) == 2


def _pcd(t0_ns: int, samples, fs: float = 500.0, key: str = "MRN-1001", inop: bool = False) -> Pcd01:
    """A parsed message of one lead-II wave, built directly (the parser has its own tests above)."""
    return Pcd01(read_header(b""), key, "PID-3", [Wave(t0_ns, fs, None if inop else np.asarray(samples, float))])


def _start(segments: Segments, t0_ns: int, n: int = 500, fs: float = 500.0, **kw) -> int:
    (chunk,) = segments.chunks(_pcd(t0_ns, np.zeros(n), fs, **kw))
    assert chunk.t0_ns == t0_ns
    return chunk.segment_start_ns


def test_a_resend_keeps_its_segment_and_does_not_move_the_next_sample():
    seg = Segments(cap=4)
    assert [_start(seg, T0 + i * 10**9) for i in range(3)] == [T0] * 3
    assert _start(seg, T0 + 2 * 10**9) == T0  # the last message again (its ACK was lost)
    assert _start(seg, T0 + 1 * 10**9) == T0  # an older one, wholly covered
    assert _start(seg, T0 + 1 * 10**9 + 10**6, n=10) == T0  # a piece of one, off the grid by half a sample
    assert _start(seg, T0 + 3 * 10**9) == T0  # the next sample was still due at T0 + 3 s
    assert seg.resends == 3
    # after an INOP a resend still keeps its segment; new data starts one
    assert seg.chunks(_pcd(T0 + 4 * 10**9, [], inop=True)) == []
    assert _start(seg, T0 + 3 * 10**9) == T0
    assert _start(seg, T0 + 5 * 10**9) == T0 + 5 * 10**9


def test_a_partial_overlap_continues_the_segment_and_a_gap_or_a_new_rate_starts_one():
    seg = Segments(cap=4)
    assert _start(seg, T0) == T0
    assert _start(seg, T0 + 500_000_000) == T0  # starts inside, ends past: continues to T0 + 1.5 s
    assert _start(seg, T0 + 1_500_000_000) == T0
    assert _start(seg, T0 + 2_500_000_000 + 1_001_000) == T0 + 2_500_000_000 + 1_001_000  # half a sample late
    assert _start(seg, T0 + 3_501_001_000, fs=250.0, n=250) == T0 + 3_501_001_000  # another rate


def test_a_message_back_in_time_starts_a_segment_without_cutting_the_beds_stream():
    """Before the segment's first sample: a clock stepped back or a backfill. It starts a segment (the
    worker refuses it as an older timeline unless records confirm it); the next message that continues
    the bed's segment keeps that segment's start, and records that continue the new timeline keep its."""
    seg = Segments(cap=4)
    assert [_start(seg, T0 + i * 10**9) for i in range(2)] == [T0] * 2
    back = T0 - 60 * 10**9
    assert _start(seg, back) == back  # a lone outlier
    assert _start(seg, T0 + 2 * 10**9) == T0  # the bed's stream goes on
    assert [_start(seg, back + i * 10**9) for i in range(3)] == [back] * 3  # a clock stepped back for good
    assert _start(seg, back + 10**9) == back  # its resend
    assert _start(seg, back + 3 * 10**9) == back


def test_a_restart_resumes_each_beds_segment_from_decoded_records():
    from streamer.ingest.contract import Chunk, InvalidMessage, decode, encode_binary, encode_json
    from streamer.settings import WindowSettings

    before = Segments(cap=8)
    stored = [before.chunks(_pcd(T0 + i * 10**9, ecg_mv(500, seed=i), key=p))[0]
              for i in range(3) for p in ("A", "B")]
    stored.append(before.chunks(_pcd(T0 + 2 * 10**9, ecg_mv(500, seed=2), key="A"))[0])  # a resend came last
    tail = [(c.patient_id.encode(), (encode_json if i % 2 else encode_binary)(c)) for i, c in enumerate(stored)]
    tail += [(b"A", b"{not json"), (None, tail[0][1]), (b"C", encode_json(Chunk("C", "II", T0, 500.0, np.ones(5))))]
    after = Segments(cap=8)
    taken = 0
    for key, value in tail:
        try:
            chunk = decode(key, value, WindowSettings(), NOW)
        except InvalidMessage:
            continue
        taken += after.resume(chunk)
    assert taken == len(stored)  # C has no segment start: not a record of this gateway's
    assert _start(after, T0 + 3 * 10**9, key="A") == T0 and _start(after, T0 + 3 * 10**9, key="B") == T0
    assert _start(after, T0 + 2 * 10**9, key="B") == T0  # the resend of what was stored before the restart
    assert _start(after, T0, key="C") == T0 and _start(after, T0 + 10**9 + 10**6, key="C") == T0 + 10**9 + 10**6
    # a record whose segment starts after its first sample is not this gateway's: not taken
    assert not after.resume(Chunk("D", "II", T0, 500.0, np.ones(5), None, T0 + 10**9))


@st.composite
def station_deliveries(draw):
    """One bed's contiguous recording cut into messages, and how a central station delivers them: each
    message until ACKed, resent when its ACK was lost (stored) or the gateway died (stored or not); the
    gateway may also restart between messages. Times as a DTM carries them: whole milliseconds."""
    fs = draw(st.sampled_from([250.0, 360.0, 500.0]))
    lengths = draw(st.lists(st.integers(1, int(1.5 * fs)), min_size=1, max_size=14))
    fates = []
    for _ in lengths:
        tries = draw(st.lists(st.sampled_from(["ack_lost", "stored_crash", "lost_crash"]), max_size=3))
        fates.append([*tries, draw(st.sampled_from(["acked", "acked_then_restart"]))])
    tail = draw(st.integers(1, 3))
    return fs, lengths, fates, tail


@given(station_deliveries())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_resends_and_restarts_keep_one_segment_with_exact_times_and_the_workers_windows(delivery):
    """However a station resends (and the gateway restarts), every chunk of one contiguous recording
    carries the recording's segment start with the message's exact time and samples, and the worker's
    stream buffer cuts from the records Kafka holds exactly the windows it cuts from one copy of each."""
    from streamer.ingest.contract import decode, encode_json
    from streamer.settings import WindowSettings
    from streamer.windows.buffer import PatientStream

    fs, lengths, fates, tail = delivery
    rng = np.random.default_rng(len(lengths))
    messages, first = [], 0
    for n in lengths:
        t0 = T0 + round(round(first * 1e9 / fs) / 1e6) * 10**6  # the DTM's millisecond
        messages.append((t0, rng.normal(0, 0.5, n)))
        first += n
    ws = WindowSettings()
    segments, log = Segments(cap=4), []  # log: the input topic, (chunk, message index, a resend?)

    def restart():
        nonlocal segments
        segments = Segments(cap=4)
        for chunk, _, _ in log[-tail:]:
            assert segments.resume(decode(b"MRN-1001", encode_json(chunk), ws, NOW))

    for i, ((t0, samples), tries) in enumerate(zip(messages, fates)):
        for fate in tries:
            (chunk,) = segments.chunks(_pcd(t0, samples, fs))
            assert (chunk.segment_start_ns, chunk.t0_ns) == (T0, t0)
            assert np.array_equal(chunk.samples, samples)
            if fate != "lost_crash":
                log.append((chunk, i, any(j == i for _, j, _ in log)))
            if fate != "ack_lost" and fate != "acked":
                restart()

    def windows(records):
        stream = PatientStream("MRN-1001", 0, ws)
        out, dead = [], []
        for offset, (chunk, _, resent) in enumerate(records):
            result = stream.accept(chunk, offset, 0.0, ref=(offset, resent))
            out += result.windows
            dead += [ref for ref, _, _ in result.dead_letters]
        out += stream.close(0.0)
        return [(w.start_ns, w.status, w.reason, None if w.samples is None else w.samples.tobytes()) for w in out], dead

    once = [next(r for r in log if r[1] == i) for i in range(len(messages))]
    assert [r[1] for r in once] == list(range(len(messages)))  # every ACKed message is stored
    got, dead = windows(log)
    want, _ = windows(once)
    assert got == want
    assert all(resent for _, resent in dead)  # only a copy is ever dead-lettered (already-reported samples)


def test_the_ack_is_a_valid_hl7_ack_that_swaps_the_applications():
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    from streamer.gateways.hl7_in import Hl7Gateway
    from streamer.settings import Settings

    gw = Hl7Gateway(None, Settings())
    raw, _ = lead_ii_message("CTRL-77", T0, ecg_mv(5))
    header = read_header(raw)
    for code, reason, detail in (("AA", "", ""), ("AE", "bad_rate", "rate | ^ & ~ \\ odd"), ("AR", "not_hl7", "x")):
        ack = gw.ack(header, code, reason, detail).decode()
        msg = parse_message(ack, validation_level=VALIDATION_LEVEL.STRICT)
        assert msg.msh.msh_3.to_er7() == "STREAMER" and msg.msh.msh_5.to_er7() == "CENTRAL^0012A1FFFE001234^EUI-64"
        assert msg.msh.msh_6.to_er7() == "ICU-NORTH" and msg.msh.msh_4.to_er7() == "HOSPITAL"
        assert msg.msa.msa_1.to_er7() == code and msg.msa.msa_2.to_er7() == "CTRL-77"
        if code != "AA":
            assert reason in msg.err.err_8.to_er7() and msg.err.err_4.to_er7() == "E"


def test_a_non_loopback_listen_needs_tls_or_an_explicit_opt_in():
    def args(host, **kw):
        return argparse.Namespace(listen=(host, 2575), tls_cert=None, tls_key=None, tls_ca=None,
                                  allow_plain_mllp=False, **kw)
    assert tls_context(args("127.0.0.1")) is None
    with pytest.raises(SettingsError, match="needs --tls-cert"):
        tls_context(args("0.0.0.0"))
    a = args("0.0.0.0")
    a.allow_plain_mllp = True
    assert tls_context(a) is None
    b = args("127.0.0.1")
    b.tls_cert = "x.pem"
    with pytest.raises(SettingsError, match="go together"):
        tls_context(b)


# -- fuzz -------------------------------------------------------------------------------------------
_GOOD = [lead_ii_message(f"F{i}", T0, ecg_mv(30, seed=i), shape=s, others=i % 2 == 0, inop=i == 3)[0]
         for i, s in enumerate(["mv", "counts", "name_only", "vendor", "uv"])]
_NASTY = [b"|", b"^", b"~", b"\\", b"&", b"\r", b"\n", b"\x00", b"\xff", b"1e400", b"NaN", b"-", b".", b"9" * 30,
          b"^" * 200, b"~" * 200, b"MSH|", b"OBX|1|NA|", b"\x0b", b"\x1c\r", "é".encode(), b"0^MDC_ATTR_SAMP_RATE"]


@st.composite
def mutated(draw):
    raw = bytearray(draw(st.sampled_from(_GOOD)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(raw)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(st.sampled_from(_NASTY) | st.binary(max_size=8))
        if op == "insert":
            raw[at:at] = piece
        elif op == "delete":
            del raw[at:at + draw(st.integers(1, 40))]
        else:
            raw[at:at + len(piece)] = piece
    return bytes(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated(), st.binary(max_size=400), st.text(max_size=300).map(lambda t: ("MSH|^~\\&|" + t).encode())))
def test_fuzz_any_bytes_give_waves_or_a_refusal_with_a_reason(raw):
    try:
        pcd = _parse(raw, key_by="bed")
    except Refusal as refusal:
        assert refusal.code in ("AE", "AR") and refusal.reason and refusal.reason.isidentifier()
        return
    for wave in pcd.waves:
        assert wave.samples_mv is None or np.isfinite(wave.samples_mv).all()
        assert wave.fs > 0 and wave.t0_ns >= 946_684_800 * 10**9
    assert 1 <= len(pcd.key) <= 128


# -- the server on Apache Kafka ---------------------------------------------------------------------
async def _client(port: int):
    from hl7.mllp import open_hl7_connection

    return await open_hl7_connection("127.0.0.1", port, encoding="utf-8")


async def _exchange(conn, raw: bytes, timeout_s: float = 30.0):
    reader, writer = conn
    writer.writeblock(raw)
    await writer.drain()
    ack = await asyncio.wait_for(reader.readmessage(), timeout_s)
    msa = ack.segment("MSA")
    return str(msa[1]), str(msa[2]), str(ack)


async def _gateway(s, **kw):
    from streamer.gateways.hl7_in import Hl7Gateway
    from streamer.gateways.sink import ConfirmedSink

    sink = await ConfirmedSink.open(s.kafka, encoding="json")
    gw = Hl7Gateway(sink, s, **kw)
    server = await gw.serve("127.0.0.1", 0, None)
    return gw, server, server.sockets[0].getsockname()[1]


async def _stop(gw, server):
    server.close()
    await gw.close_connections(5.0)
    await gw.sink.close()


def _records(s, n: int):
    from streamer.ingest.contract import decode
    from tests.kafka_utils import read_topic

    records = asyncio.run(read_topic(s.kafka, s.kafka.input_topics[0], until=lambda r: len(r) >= n,
                                     timeout_s=30))
    return [decode(r.key, r.value, s.windows) for r in records]


def _by_time(chunks):
    return sorted(chunks, key=lambda c: (c.patient_id, c.t0_ns))


@pytest.mark.integration
def test_messages_become_exact_records_and_bad_ones_get_a_clear_nak(broker):
    from tests.kafka_utils import isolated_settings

    s = isolated_settings(broker.bootstrap, partitions=2)
    now = time.time_ns() // 10**6 * 10**6 - 60 * 10**9
    sent = []  # (patient, t0, expected mV) ACKed AA

    async def scenario():
        gw, server, port = await _gateway(s, key_by="bed")
        conn = await _client(port)
        try:
            t = now
            for i, shape in enumerate(["mv", "counts", "name_only", "vendor", "uv"]):
                samples = ecg_mv(500, seed=i, start=i * 500)
                raw, expected = lead_ii_message(f"M{i}", t, samples, shape=shape, others=i % 2 == 0)
                assert (await _exchange(conn, raw))[:2] == ("AA", f"M{i}")
                sent.append(("MRN-1001", t, expected, now))
                t += 10**9
            raw, _ = lead_ii_message("INOP", t, ecg_mv(500), inop=True)
            assert (await _exchange(conn, raw))[:2] == ("AA", "INOP")
            t += 10**9
            raw, expected = lead_ii_message("AFTER", t, ecg_mv(500, seed=9))
            assert (await _exchange(conn, raw))[0] == "AA"
            sent.append(("MRN-1001", t, expected, t))  # a new segment after the INOP
            raw, expected = lead_ii_message("BED", now, ecg_mv(250, seed=3), patient=None)
            assert (await _exchange(conn, raw))[0] == "AA"
            sent.append(("ICU/12/1", now, expected, now))
            # hostile and bad messages: a NAK naming the reason, and the connection goes on
            for bad, code, reason in [
                (b"\x00\xff garbage \x80", "AR", "not_utf8"),
                (b"plain text, no MSH", "AR", "not_hl7"),
                (raw.replace(b"|500|", b"|-500|"), "AE", "bad_rate"),
                (raw.replace(b"0.", b"1e400^", 1), "AE", "bad_value"),
                (lead_ii_message("NP", now, ecg_mv(9), patient=None, bed=None)[0], "AR", "no_patient_or_bed"),
                (b"MSH|^~\\&|X|Y|||20260101||ORU^R01|BIG|P|2.6\r" + b"PID|" + b"^" * 50000 + b"~" * 50000,
                 "AR", None),
            ]:
                code_got, _, text = await _exchange(conn, bad)
                assert code_got in ("AE", "AR"), text
                assert code_got == code and "ERR|" in text, text
                if reason:
                    assert reason in text, text
            raw, expected = lead_ii_message("GOOD", t + 10**9, ecg_mv(500, seed=11))
            assert (await _exchange(conn, raw))[0] == "AA"
            sent.append(("MRN-1001", t + 10**9, expected, t))
        finally:
            conn[1].close()
            await _stop(gw, server)
        return gw

    gw = asyncio.run(scenario())
    chunks = _by_time(_records(s, len(sent)))
    assert len(chunks) == len(sent)
    for chunk, (patient, t0, expected, seg) in zip(chunks, sorted(sent, key=lambda x: (x[0], x[1]))):
        assert (chunk.patient_id, chunk.t0_ns, chunk.segment_start_ns, chunk.fs) == (patient, t0, seg, 500.0)
        assert np.array_equal(chunk.samples, expected)
    assert gw.counts["accepted"] == len(sent) + 1 and gw.counts["refused:bad_rate"] == 1
    dead = asyncio.run(__import__("tests.kafka_utils", fromlist=["read_topic"]).read_topic(
        s.kafka, s.kafka.dead_letter_topic, until=lambda r: len(r) >= 3, timeout_s=20))
    assert {dict(r.headers)["__streams.errors.exception"].decode() for r in dead} >= {"bad_rate", "bad_value"}


@pytest.mark.integration
def test_frames_and_connections_are_bounded_and_the_server_stays_up(broker):
    from tests.kafka_utils import isolated_settings

    s = isolated_settings(broker.bootstrap, partitions=1)
    t = time.time_ns() // 10**6 * 10**6 - 60 * 10**9

    async def scenario():
        gw, server, port = await _gateway(s, max_connections=3, max_message_bytes=64 << 10, idle_timeout_s=1.0)
        try:
            # an oversize frame: AR, the connection closed (its framing is lost), memory not grown past the limit
            reader, writer = await _client(port)
            writer.write(b"\x0bMSH|^~\\&|" + b"A" * (300 << 10))
            await writer.drain()
            ack = await asyncio.wait_for(reader.readmessage(), 10)
            assert str(ack.segment("MSA")[1]) == "AR" and "too_large" in str(ack)
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed
            # bytes outside a frame: AR, the connection goes on
            conn = await _client(port)
            conn[1].write(b"junk\x1c\r")
            await conn[1].drain()
            assert str((await asyncio.wait_for(conn[0].readmessage(), 10)).segment("MSA")[1]) == "AR"
            # connections beyond max_connections are closed at once and counted
            others = [await _client(port) for _ in range(3)]
            closed = [await asyncio.wait_for(r.read(), 10) == b"" for r, _ in others]
            assert closed.count(True) >= 1 and gw.counts["connections_refused"] >= 1
            # an idle connection is closed after idle_timeout
            await asyncio.wait_for(conn[0].read(), 10)
            assert gw.counts["idle_closed"] >= 1
            # and the gateway still answers
            fresh = await _client(port)
            raw, _ = lead_ii_message("OK", t, ecg_mv(100))
            assert (await _exchange(fresh, raw))[0] == "AA"
            fresh[1].close()
            for _, w in others:
                w.close()
        finally:
            await _stop(gw, server)

    asyncio.run(scenario())


@pytest.mark.integration
def test_fuzz_through_the_real_server_never_takes_it_down(broker):
    from tests.kafka_utils import isolated_settings

    s = isolated_settings(broker.bootstrap, partitions=1)

    async def scenario(examples):
        gw, server, port = await _gateway(s, key_by="bed")
        conn = await _client(port)
        try:
            for raw in examples:
                raw = raw.replace(b"\x1c\r", b"\x1c")  # one frame each
                code, _, _ = await _exchange(conn, raw, 20)
                assert code in ("AA", "AE", "AR")
            raw, _ = lead_ii_message("LAST", time.time_ns() // 10**6 * 10**6 - 10**10, ecg_mv(100))
            assert (await _exchange(conn, raw))[0] == "AA"
            assert gw.counts["internal_errors"] == 0
        finally:
            conn[1].close()
            await _stop(gw, server)

    examples = []

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(mutated(), st.binary(min_size=1, max_size=300)))
    def collect(raw):
        examples.append(raw)

    collect()
    asyncio.run(scenario(examples))


@pytest.mark.integration
def test_no_ack_while_kafka_is_frozen_then_every_ack_after(broker):
    """The broker stopped (SIGSTOP): the message waits, unanswered; once it resumes, AA, and the record is
    on the topic."""
    from tests.kafka_utils import isolated_settings

    s = isolated_settings(broker.bootstrap, partitions=1)
    t = time.time_ns() // 10**6 * 10**6 - 60 * 10**9

    async def scenario():
        gw, server, port = await _gateway(s)
        conn = await _client(port)
        try:
            raw, _ = lead_ii_message("WARM", t, ecg_mv(500))
            assert (await _exchange(conn, raw))[0] == "AA"
            broker.freeze()
            try:
                raw, _ = lead_ii_message("FROZEN", t + 10**9, ecg_mv(500, seed=2))
                conn[1].writeblock(raw)
                await conn[1].drain()
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(pending := asyncio.ensure_future(conn[0].readmessage())),
                                           3.0)
            finally:
                broker.thaw()
            ack = await asyncio.wait_for(pending, 60)
            assert str(ack.segment("MSA")[1]) == "AA" and str(ack.segment("MSA")[2]) == "FROZEN"
        finally:
            conn[1].close()
            await _stop(gw, server)

    asyncio.run(scenario())
    chunks = _by_time(_records(s, 2))
    assert [c.t0_ns for c in chunks] == [t, t + 10**9] and chunks[1].segment_start_ns == t


@pytest.mark.integration
def test_a_restarted_gateway_resumes_segments_from_the_topic_skipping_hostile_records(broker):
    """The tail of the input topic, with records that do not decode among them, gives the next gateway
    each bed's segment: its next message keeps the segment start. Unreachable brokers cost the resume
    (logged, counted), never the gateway."""
    from streamer.gateways.hl7_in import _resume
    from streamer.kafka.clients import make_producer
    from tests.kafka_utils import isolated_settings

    s = isolated_settings(broker.bootstrap, partitions=2)
    t = time.time_ns() // 10**6 * 10**6 - 60 * 10**9

    async def scenario():
        gw, server, port = await _gateway(s)
        conn = await _client(port)
        for i in range(3):
            raw, _ = lead_ii_message(f"R{i}", t + i * 10**9, ecg_mv(500, seed=i), patient="MRN-R")
            assert (await _exchange(conn, raw))[0] == "AA"
        conn[1].close()
        await _stop(gw, server)
        producer = make_producer(s.kafka)
        await producer.start()
        try:
            for key, value in [(b"MRN-R", b"\x00garbage"), (None, b"{}"), (b"MRN-X", b'{"patient_id": "MRN-X"}')]:
                await producer.send_and_wait(s.kafka.input_topics[0], value, key=key, partition=0)
                await producer.send_and_wait(s.kafka.input_topics[0], value, key=key, partition=1)
        finally:
            await producer.stop()

        gw, server, port = await _gateway(s)
        await _resume(gw, s, 5)  # the 3 records of MRN-R's partition are among its newest 5
        assert gw.counts["resumed_beds"] == 1 and gw.counts["resume_skipped"] >= 2, gw.counts
        conn = await _client(port)
        raw, _ = lead_ii_message("R3", t + 3 * 10**9, ecg_mv(500, seed=3), patient="MRN-R")
        assert (await _exchange(conn, raw))[0] == "AA"
        conn[1].close()
        await _stop(gw, server)

        # port 9 (discard): nothing listens
        unreachable = s.model_copy(update={"kafka": s.kafka.model_copy(update={"bootstrap_servers": "127.0.0.1:9"})})
        gw2, server2, _ = await _gateway(s)
        try:
            await _resume(gw2, unreachable, 5, idle_timeout_s=3)
            assert gw2.counts["resume_failed"] == 1 and "resumed_beds" not in gw2.counts
        finally:
            await _stop(gw2, server2)

    asyncio.run(scenario())
    from streamer.ingest.contract import InvalidMessage, decode
    from tests.kafka_utils import read_topic

    records = asyncio.run(read_topic(s.kafka, s.kafka.input_topics[0], until=lambda r: len(r) >= 10, timeout_s=30))
    chunks = []
    for r in records:
        try:
            chunks.append(decode(r.key, r.value, s.windows))
        except InvalidMessage:
            continue
    chunks = [c for c in chunks if c.patient_id == "MRN-R"]
    assert [c.t0_ns for c in _by_time(chunks)] == [t + i * 10**9 for i in range(4)]
    assert {c.segment_start_ns for c in chunks} == {t}


def _gateway_process(s, tmp_path, *extra):
    from tests.kafka_utils import settings_env

    log = open(tmp_path / "gateway.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamer", "gateway", "hl7", "--listen", "127.0.0.1:0", *extra],
                            stdout=subprocess.PIPE, stderr=log, env=settings_env(s), text=True)
    line = proc.stdout.readline()
    assert line.startswith("listening="), (line, (tmp_path / "gateway.log").read_text()[-2000:])
    return proc, int(line.strip().rsplit(":", 1)[1])


@pytest.mark.integration
def test_kill_9_mid_stream_loses_no_acked_sample_and_sigterm_exits_0(broker, tmp_path):
    from tests.kafka_utils import isolated_settings

    s = isolated_settings(broker.bootstrap, partitions=2)
    t = time.time_ns() // 10**6 * 10**6 - 120 * 10**9
    acked: dict[tuple[str, int], np.ndarray] = {}
    proc, port = _gateway_process(s, tmp_path)

    async def stream(port, beds, killer=None, after=15):
        start = len(acked)
        conns = [await _client(port) for _ in beds]

        async def bed(conn, patient):
            for i in range(40):
                raw, expected = lead_ii_message(f"{patient}-{i}", t + i * 10**9, ecg_mv(500, seed=i),
                                                patient=patient)
                try:
                    code, _, _ = await _exchange(conn, raw, 10)
                except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                    return
                if code == "AA":
                    acked[(patient, t + i * 10**9)] = expected

        tasks = [asyncio.create_task(bed(c, p)) for c, p in zip(conns, beds)]
        if killer:
            while len(acked) < start + after:
                await asyncio.sleep(0.02)
            killer()
        await asyncio.gather(*tasks)
        for _, w in conns:
            w.close()

    asyncio.run(stream(port, ["K1", "K2", "K3"], killer=lambda: os.kill(proc.pid, signal.SIGKILL)))
    assert proc.wait(10) == -signal.SIGKILL
    assert 15 <= len(acked) < 120
    chunks = _records(s, len(acked))
    stored = {(c.patient_id, c.t0_ns): c.samples for c in chunks}
    for key, expected in acked.items():
        assert key in stored, f"ACKed {key} is not on the topic"
        assert np.array_equal(stored[key], expected)

    # a fresh gateway: SIGTERM stops it with exit 0 once the messages in flight are answered
    proc, port = _gateway_process(s, tmp_path)
    asyncio.run(stream(port, ["K4"], killer=lambda: proc.send_signal(signal.SIGTERM), after=5))
    assert proc.wait(30) == 0
    assert proc.stdout.read() == ""


@pytest.mark.integration
def test_mllp_over_mutual_tls_takes_only_monitors_with_a_certificate_of_its_ca(broker, tmp_path):
    """--tls-cert/--tls-key/--tls-ca: a monitor presenting a certificate of the CA gets AA over TLS; one
    without a certificate, or speaking plain MLLP to the TLS port, never gets an ACK, and the gateway
    goes on serving the next good monitor."""
    import ssl

    from hl7.mllp import open_hl7_connection

    from tests.kafka_utils import isolated_settings
    from tests.tls import have_openssl, make_ca, make_server_cert

    if not have_openssl():
        pytest.skip("needs openssl to make the certificates")
    make_ca(tmp_path, "ward-ca")
    cert, key = make_server_cert(tmp_path, "ward-ca", "gateway", "IP:127.0.0.1,DNS:localhost")
    monitor_cert, monitor_key = make_server_cert(tmp_path, "ward-ca", "monitor", "DNS:monitor-12")
    args = argparse.Namespace(listen=("127.0.0.1", 0), tls_cert=str(cert), tls_key=str(key),
                              tls_ca=str(tmp_path / "ward-ca.pem"), allow_plain_mllp=False)
    server_tls = tls_context(args)
    assert server_tls.verify_mode == ssl.CERT_REQUIRED
    s = isolated_settings(broker.bootstrap, partitions=1)
    t0 = time.time_ns() // 10**6 * 10**6 - 60 * 10**9

    def client_tls(with_certificate: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ward-ca.pem"))
        if with_certificate:
            ctx.load_cert_chain(str(monitor_cert), str(monitor_key))
        return ctx

    async def scenario():
        from streamer.gateways.hl7_in import Hl7Gateway
        from streamer.gateways.sink import ConfirmedSink

        sink = await ConfirmedSink.open(s.kafka, encoding="json")
        gw = Hl7Gateway(sink, s)
        server = await gw.serve("127.0.0.1", 0, server_tls)
        port = server.sockets[0].getsockname()[1]
        try:
            raw, _ = lead_ii_message("TLS-1", t0, ecg_mv(500))
            for refused in ({"ssl": client_tls(False), "server_hostname": "127.0.0.1"}, {}):
                try:
                    conn = await open_hl7_connection("127.0.0.1", port, encoding="utf-8", **refused)
                    got = await _exchange(conn, raw, timeout_s=5)
                except (ssl.SSLError, ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError, OSError):
                    got = None
                assert got is None, f"an ACK without a client certificate over {refused or 'plain MLLP'}: {got}"
            conn = await open_hl7_connection("127.0.0.1", port, encoding="utf-8", ssl=client_tls(True),
                                             server_hostname="127.0.0.1")
            assert (await _exchange(conn, raw))[:2] == ("AA", "TLS-1")
            conn[1].close()
        finally:
            server.close()
            await gw.close_connections(5.0)
            await sink.close()

    asyncio.run(scenario())
    assert [c.t0_ns for c in _records(s, 1)] == [t0]
