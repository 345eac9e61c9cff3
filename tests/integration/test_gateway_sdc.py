"""`streamer gateway sdc` (issue 47, item 2): sdc11073's own provider classes stream a lead-II waveform on
loopback (tests/sdc_provider.py) into the gateway, the gateway into Apache Kafka; the records must be the
samples sent, with exact contiguous times, segments exactly where validity, the patient or the device's
MDIB changed. The time and segment rules are also tested alone (Timeline) and with hypothesis."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.gateways.sdc_in import (GatewayOptions, Inbox, Report, SdcGateway, Timeline, UnusableDevice,
                                      Waveform, find_lead_ii)
from streamer.ingest.contract import decode
from streamer.synthetic import clean_ecg
from tests.kafka_utils import isolated_settings, read_topic, settings_env

FS = 500.0
T0 = 1_790_000_000.0  # a time in seconds, as sdc11073 gives DeterminationTime


def _report(t_s, n=50, key="MRN-1", valid=True, active=True, value=0.25):
    return Report([value] * n, t_s, valid, active, key, time.time_ns())


def _timeline(mv_per_unit=1.0) -> Timeline:
    t = Timeline("dev")
    t.connected(Waveform("ecg", FS, mv_per_unit, "266418"), "urn:uuid:1")
    return t


# -- the rules, alone --------------------------------------------------------------------------------
def test_contiguous_reports_keep_one_segment_and_exact_times_despite_jitter():
    t = _timeline()
    jitter_ms = [0, 0.9, -0.8, 0.4, -0.95, 0.7]  # a pm:Timestamp rounds to 1 ms
    chunks, at = [], T0
    for j in jitter_ms:
        chunks.append(t.take(_report(at + j / 1000)))
        at += 50 / FS
    assert {c.segment_start_ns for c in chunks} == {int(T0 * 1e9)}
    assert [c.t0_ns for c in chunks] == [int(T0 * 1e9) + i * 100_000_000 for i in range(len(chunks))]
    assert [c.seq for c in chunks] == list(range(len(chunks)))


def test_a_real_gap_invalid_data_or_a_new_patient_starts_a_new_segment():
    t = _timeline()
    a = t.take(_report(T0))
    b = t.take(_report(T0 + 0.1 + 0.004))  # two samples late: a gap
    assert b.segment_start_ns == b.t0_ns != a.segment_start_ns
    assert t.take(_report(T0 + 0.2 + 0.004, valid=False)) is None
    assert t.take(_report(T0 + 0.3 + 0.004, active=False)) is None
    c = t.take(_report(T0 + 0.4 + 0.004))  # contiguous in time, but after invalid data
    assert c.segment_start_ns == c.t0_ns != b.segment_start_ns
    assert t.take(_report(T0 + 0.5 + 0.004, key=None)) is None  # nobody associated: not sent
    d = t.take(_report(T0 + 0.6 + 0.004, key="MRN-2"))
    e = t.take(_report(T0 + 0.7 + 0.004, key="MRN-2"))
    assert d.patient_id == e.patient_id == "MRN-2" and e.segment_start_ns == d.t0_ns
    f = t.take(_report(T0 + 0.8 + 0.004, key="MRN-3"))  # re-association without a pause
    assert f.segment_start_ns == f.t0_ns and f.patient_id == "MRN-3"
    lost = _report(T0 + 0.9 + 0.004, key="MRN-3")
    lost.after_loss = True
    assert t.take(lost).segment_start_ns == int(round((T0 + 0.9 + 0.004) * 1e9))
    assert t.gaps == {"reconnected": 1, "discontinuous": 1, "invalid": 1, "no_patient": 1,
                      "patient_changed": 1, "dropped": 1}


def test_a_new_sequence_id_starts_a_new_segment_even_when_times_run_on():
    t = _timeline()
    a = t.take(_report(T0))
    t.connected(Waveform("ecg", FS, 1.0, "266418"), "urn:uuid:2")
    b = t.take(_report(T0 + 0.1))
    assert b.segment_start_ns == b.t0_ns != a.segment_start_ns


def test_micro_volts_become_millivolts():
    t = _timeline(mv_per_unit=1e-3)
    assert np.allclose(t.take(_report(T0, value=250)).samples, 0.25)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(-0.002, 0.01), st.integers(0, 600), st.booleans(), st.booleans(),
                          st.sampled_from(["A", "B", None]),
                          st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(),
                                             st.just("x")), max_size=5)),
                max_size=30))
def test_hostile_reports_never_raise_and_never_break_a_segments_times(steps):
    t = _timeline()
    at = T0
    for step, n, valid, active, key, junk in steps:
        at += step
        samples = [0.1] * n + junk
        chunk = t.take(Report(samples, at, valid, active, key, 0))
        if chunk is not None:
            assert np.isfinite(chunk.samples).all() and 0 < len(chunk.samples) <= 10 * FS
            assert chunk.t0_ns >= chunk.segment_start_ns
            assert (chunk.t0_ns - chunk.segment_start_ns) % 2_000_000 == 0  # on the segment's sample grid


def test_a_full_inbox_drops_counts_and_marks_the_gap():
    async def scenario():
        inbox = Inbox(asyncio.get_running_loop(), max_reports=3)
        for i in range(5):
            inbox.put(_report(T0 + i))
        first = await inbox.take()
        inbox.put(_report(T0 + 9))
        second = await inbox.take()
        return inbox, first, second

    inbox, first, second = asyncio.run(scenario())
    assert inbox.dropped == 2 and len(first) == 3 and not any(r.after_loss for r in first)
    assert second[0].after_loss


def _mdib_with_unit(unit: str):
    from tests.sdc_provider import make_mdib

    return make_mdib("urn:uuid:1", unit)


def test_lead_ii_is_found_by_mdc_code_and_other_units_are_refused():
    w = find_lead_ii(_mdib_with_unit("266418"), 50, 10000)
    assert (w.handle, w.fs, w.mv_per_unit) == ("ecg.ii", 500.0, 1.0)
    assert find_lead_ii(_mdib_with_unit("266419"), 50, 10000).mv_per_unit == 1e-3  # MDC_DIM_MICRO_VOLT
    with pytest.raises(UnusableDevice, match="unit"):
        find_lead_ii(_mdib_with_unit("266432"), 50, 10000)  # another unit of the volt's block, not micro volt
    with pytest.raises(UnusableDevice, match="unit"):
        find_lead_ii(_mdib_with_unit("262656"), 50, 10000)  # MDC_DIM_DIMLESS: not a voltage
    with pytest.raises(UnusableDevice, match="rate"):
        find_lead_ii(_mdib_with_unit("266418"), 600, 10000)


# -- over loopback, into Apache Kafka ---------------------------------------------------------------
def _signal() -> np.ndarray:
    return clean_ecg(20.0, FS, np.random.default_rng(3))


def _decoded(s, records):
    return [decode(r.key, r.value, s.windows) for r in records]


@pytest.mark.integration
def test_the_gateway_sends_exactly_the_samples_with_segments_where_the_device_changed(broker):
    from streamer.gateways.sink import ConfirmedSink
    from tests.sdc_provider import EcgProvider

    s = isolated_settings(broker.bootstrap, partitions=2)
    topic = s.kafka.input_topics[0]
    provider = EcgProvider(_signal(), fs=FS, patient="MRN-A").start()

    async def records_until(pred, what):
        got = await read_topic(s.kafka, topic, until=lambda rs: pred(_decoded(s, rs)), timeout_s=40)
        chunks = _decoded(s, got)
        assert pred(chunks), f"timed out waiting for {what}"
        return chunks

    async def scenario():
        sink = await ConfirmedSink.open(s.kafka)
        gateway = SdcGateway(GatewayOptions([provider.url], silence_s=3.0), sink)
        run = asyncio.create_task(gateway.run())
        try:
            await records_until(lambda cs: len(cs) >= 15, "15 records")
            provider.set_valid(False)
            await _until(lambda: len(provider.sent_where(lambda r: not r.valid)) >= 5, "5 invalid reports")
            provider.set_valid(True)
            await records_until(lambda cs: len({c.segment_start_ns for c in cs}) >= 2 and
                                sum(c.segment_start_ns == cs[-1].segment_start_ns for c in cs) >= 5, "segment 2")
            provider.set_patient("MRN-B")
            await records_until(lambda cs: sum(c.patient_id == "MRN-B" for c in cs) >= 10, "MRN-B's records")
            old_sequence = provider.sequence_id
            await asyncio.to_thread(provider.restart)
            assert provider.sequence_id != old_sequence
            restarted_at_ns = int(provider.sent[-1].t0_s * 1e9) if provider.sent else 0
            await records_until(lambda cs: sum(c.t0_ns > restarted_at_ns for c in cs) >= 10, "records after restart")
        finally:
            gateway.stop()
            await asyncio.wait_for(run, 30)
            await sink.close()
        return gateway, restarted_at_ns

    try:
        gateway, restarted_at_ns = asyncio.run(scenario())
    finally:
        provider.stop()
    chunks = asyncio.run(read_topic(s.kafka, topic, timeout_s=10))
    chunks = _decoded(s, chunks)
    sent = {round(r.t0_s * 1000): r for r in provider.sent}  # by DeterminationTime, in ms as the wire has it

    # every record is a report the provider sent, sample for sample (float32 frames), within the 1 ms of a
    # pm:Timestamp of its DeterminationTime, and keyed by the patient associated when it was sent
    wrong_patient = 0
    for c in chunks:
        r = sent.get(round(c.t0_ns / 1e6)) or sent.get(round(c.t0_ns / 1e6) - 1) or sent.get(round(c.t0_ns / 1e6) + 1)
        assert r is not None and r.valid, c.t0_ns
        assert abs(c.t0_ns - r.t0_s * 1e9) <= 1_000_000
        np.testing.assert_array_equal(c.samples, r.values.astype(np.float32).astype(np.float64))
        assert c.lead == "II" and c.fs == FS
        wrong_patient += c.patient_id != r.patient
    # the context report and the waveform travel on two subscriptions: at most the report in flight as the
    # patient changed may carry the previous patient (docs/gateways.md, limits)
    assert wrong_patient <= 1

    # segments: first MRN-A, MRN-A after the invalid stretch, MRN-B, MRN-B after the restart
    segments: dict[int, list] = {}
    for c in chunks:
        segments.setdefault(c.segment_start_ns, []).append(c)
    assert len(segments) == 4, sorted(segments)
    order = sorted(segments)
    assert [segments[k][0].patient_id for k in order] == ["MRN-A", "MRN-A", "MRN-B", "MRN-B"]
    assert order[3] > restarted_at_ns
    for start, part in segments.items():
        part.sort(key=lambda c: c.t0_ns)
        assert part[0].t0_ns == start
        for prev, nxt in zip(part, part[1:]):  # contiguous and exact: no sample missing, none twice
            assert nxt.t0_ns == prev.t0_ns + len(prev.samples) * 2_000_000
    # no valid report inside a segment's span is missing
    for part in segments.values():
        lo, hi = part[0].t0_ns / 1e9 - 0.001, part[-1].t0_ns / 1e9 + 0.001  # a pm:Timestamp has ms steps
        inside = [r for r in provider.sent if lo <= r.t0_s <= hi]
        assert all(r.valid for r in inside) and len(inside) == len(part)
    # the invalid stretch sent nothing
    invalid = [r.t0_s for r in provider.sent if not r.valid]
    assert not any(min(invalid) - 0.001 <= c.t0_ns / 1e9 <= max(invalid) + 0.001 for c in chunks)
    t = gateway.timelines[provider.url]
    assert t.gaps.get("invalid", 0) >= 1 and gateway.connects[provider.url] == 2
    assert gateway.inboxes[provider.url].dropped == 0


async def _until(condition, what, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.mark.integration
def test_the_command_stops_on_sigterm_with_exit_0_and_refuses_https_without_tls(broker, tmp_path):
    from tests.sdc_provider import EcgProvider

    s = isolated_settings(broker.bootstrap, partitions=1)
    refused = subprocess.run([sys.executable, "-m", "streamer", "gateway", "sdc", "--device",
                              "https://127.0.0.1:9/x"], env=settings_env(s), capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 2 and "tls" in refused.stderr.lower()
    provider = EcgProvider(_signal(), fs=FS).start()
    log = tmp_path / "gateway.log"
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "streamer", "gateway", "sdc", "--device", provider.url],
                                    env=settings_env(s), stdout=out, stderr=subprocess.STDOUT)
        try:
            records = asyncio.run(read_topic(s.kafka, s.kafka.input_topics[0], until=lambda rs: len(rs) >= 5,
                                             timeout_s=60))
            assert len(records) >= 5, log.read_text()[-3000:]
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        provider.stop()
    text = log.read_text()
    assert "sdc_plain_http" in text and "sdc_gateway_stopped" in text
    assert "MRN-0001" not in text  # patient ids are hashed in logs by default


def test_mutual_tls_both_ways_and_a_device_of_another_ca_is_never_read(broker, tmp_path):
    """SDPi's mutual TLS (--tls-cert/--tls-key/--tls-ca): with certificates of one CA the provider's
    waveform arrives over https, the notifications coming back over TLS too; a provider whose certificate
    another CA signed is never connected and nothing of it is sent."""
    import argparse

    from sdc11073.certloader import mk_ssl_contexts

    from streamer.gateways.sdc_in import _ssl_contexts
    from streamer.gateways.sink import ConfirmedSink
    from tests.sdc_provider import EcgProvider
    from tests.tls import have_openssl, make_ca, make_server_cert

    if not have_openssl():
        pytest.skip("needs openssl to make the certificates")
    for ca in ("ward-ca", "rogue-ca"):
        make_ca(tmp_path, ca)
    gw_cert, gw_key = make_server_cert(tmp_path, "ward-ca", "gateway", "IP:127.0.0.1,DNS:localhost")
    dev_cert, dev_key = make_server_cert(tmp_path, "ward-ca", "monitor", "IP:127.0.0.1,DNS:localhost")
    rogue_cert, rogue_key = make_server_cert(tmp_path, "rogue-ca", "rogue", "IP:127.0.0.1,DNS:localhost")
    gateway_tls = _ssl_contexts(argparse.Namespace(tls_cert=str(gw_cert), tls_key=str(gw_key),
                                                   tls_ca=str(tmp_path / "ward-ca.pem")))
    s = isolated_settings(broker.bootstrap, partitions=1)
    topic = s.kafka.input_topics[0]
    good = EcgProvider(_signal(), fs=FS, patient="MRN-TLS",
                       ssl_context_container=mk_ssl_contexts(dev_key, dev_cert, tmp_path / "ward-ca.pem")).start()
    rogue = EcgProvider(_signal(), fs=FS, patient="MRN-ROGUE",
                        ssl_context_container=mk_ssl_contexts(rogue_key, rogue_cert, tmp_path / "rogue-ca.pem")).start()
    assert good.url.startswith("https://") and rogue.url.startswith("https://")

    async def scenario():
        sink = await ConfirmedSink.open(s.kafka)
        gateway = SdcGateway(GatewayOptions([good.url, rogue.url], ssl_contexts=gateway_tls, silence_s=3.0), sink)
        run = asyncio.create_task(gateway.run())
        try:
            got = await read_topic(s.kafka, topic, until=lambda rs: len(_decoded(s, rs)) >= 10, timeout_s=40)
            await _until(lambda: gateway.connect_failures.get(rogue.url, 0) >= 1, "the rogue device refused")
        finally:
            gateway.stop()
            await asyncio.wait_for(run, 30)
            await sink.close()
        return gateway, _decoded(s, got)

    try:
        gateway, chunks = asyncio.run(scenario())
    finally:
        good.stop()
        rogue.stop()
    assert len(chunks) >= 10 and {c.patient_id for c in chunks} == {"MRN-TLS"}
    assert gateway.connects.get(good.url) == 1 and not gateway.connects.get(rogue.url)
