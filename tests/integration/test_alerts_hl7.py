"""`streamer alerts hl7`: the episodes topic as IHE PCD-04 ECG-artifact technical alerts over MLLP.

- the alert machine with a fake clock, and a hypothesis state machine that holds it to SuppressionView's
  semantics (active iff suppressed, start (continue)* end, no gap longer than renew_s, end by the lease);
- PCD-04 content through python-hl7's parser (software no one on this project wrote), hostile text;
- the MLLP sender against python-hl7's MLLP server standing in for the alarm manager: AA, AE then AA,
  a connection dropped before the ACK, AR;
- the bridge on Apache Kafka: start / continue / end, lapse with no renewal, restart, hostile records."""

from __future__ import annotations

import asyncio
import time

import hl7
import orjson
import pytest
from hypothesis import given, settings as hsettings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from streamer.client import decode_episode
from streamer.gateways.alerts_out import AlertBridge, AlertMachine, AlertSender
from streamer.gateways.pcd04 import AlertEvent, alert_id, build_alert, check_ack, escape

S = 10**9
T0 = 1_800_000_000 * S


class Clock:
    def __init__(self, now: int = T0):
        self.now = now

    def __call__(self) -> int:
        return self.now


def episode(pid: str, seq: int, state: str = "open", eid: str | None = None, at: int = T0, lease_s: float = 30.0,
            renewal: bool = False, reason: str | None = None) -> bytes:
    """An episode record as the worker writes it (schema 2)."""
    lease = int(lease_s * S) if state == "open" else None
    return orjson.dumps({
        "schema": 2, "patient_id": pid, "episode_id": eid or f"{pid}:1", "seq": seq, "state": state,
        "renewal": renewal, "reason": reason if state == "closed" else None, "start_ns": at - 20 * S,
        "end_ns": at if state == "closed" else None, "last_flagged_end_ns": at, "peak_probability": 0.9,
        "flagged_windows": 2, "model": "m", "updated_at_ns": at,
        "valid_until_ns": at + lease if lease else None, "lease_ns": lease})


def phases(events, pid=None) -> list[str]:
    return [e.phase for e in events if pid is None or e.patient_id == pid]


# -- the machine, by a fake clock --------------------------------------------------------------------
def test_start_continue_end_and_lapse_on_the_bridges_own_clock():
    clock = Clock()
    m = AlertMachine(renew_ns=10 * S, skew_s=5, max_lease_s=35, clock=clock)
    m.observe(decode_episode(episode("bed-1", 1), clock.now))
    assert phases(m.tick()) == ["start"]
    clock.now += 3 * S
    m.observe(decode_episode(episode("bed-1", 2, at=clock.now, renewal=True), clock.now))
    assert phases(m.tick()) == ["continue"]  # a renewal record: continue at once
    clock.now += 9 * S
    assert m.tick() == []
    clock.now += 1 * S  # renew_s after the last message: continue with no record
    assert phases(m.tick()) == ["continue"]
    # no record any more: the lease (from the renewal at +3 s: 30 s + 5 s skew) ends on this clock
    deadline = m.next_deadline()
    assert deadline is not None
    while (deadline := m.next_deadline()) is not None and deadline <= T0 + 3 * S + 35 * S:
        clock.now = deadline
        out = m.tick()
        assert "start" not in phases(out)
    clock.now = T0 + 3 * S + 35 * S + 1
    out = m.tick()
    assert phases(out) == ["end"] and out[0].reason == "lapsed"
    assert m.active == {} and m.next_deadline() is None


def test_close_and_new_episode_and_stale_start():
    clock = Clock()
    m = AlertMachine(renew_ns=10 * S, clock=clock)
    m.observe(decode_episode(episode("b", 1), clock.now))
    m.observe(decode_episode(episode("b", 2, "closed", reason="stale"), clock.now))
    assert m.tick() == []  # opened and closed between two ticks: nothing to say
    m.observe(decode_episode(episode("b", 3, eid="b:2"), clock.now))
    assert phases(m.tick()) == ["start"]
    m.observe(decode_episode(episode("b", 4, eid="b:3"), clock.now))  # another episode replaces it
    out = m.tick()
    assert [(e.phase, e.episode_id) for e in out] == [("end", "b:2"), ("start", "b:3")]
    m.observe(decode_episode(episode("b", 5, "closed", eid="b:3", reason="clean"), clock.now))
    out = m.tick()
    assert phases(out) == ["end"] and out[0].reason == "clean"
    # read back at start: an episode whose lease ended long ago is never a start
    old = AlertMachine(renew_ns=10 * S, clock=clock)
    old.observe(decode_episode(episode("c", 1, at=T0 - 3600 * S), clock.now))
    assert old.catch_up() == []


class AlertModel(RuleBasedStateMachine):
    """The machine against SuppressionView: whatever records arrive and however time passes (the bridge
    ticks at every deadline), each bed's alert is active exactly while the view suppresses it."""

    BEDS = ("a", "b", "c")

    def __init__(self):
        super().__init__()
        self.clock = Clock()
        self.renew = 10 * S
        self.m = AlertMachine(renew_ns=self.renew, skew_s=5, max_lease_s=35, clock=self.clock)
        self.seq = {b: 0 for b in self.BEDS}
        self.eid = {b: 1 for b in self.BEDS}
        self.events: list[AlertEvent] = []

    def _tick(self):
        self.events.extend(self.m.tick())

    @rule(bed=st.sampled_from(BEDS), kind=st.sampled_from(["open", "renew", "close", "new"]),
          seq_step=st.integers(-1, 3), skew=st.integers(-40, 40))
    def record(self, bed, kind, seq_step, skew):
        if kind == "new":
            self.eid[bed] += 1
        self.seq[bed] = max(1, self.seq[bed] + seq_step)  # replays and reorderings too
        state = "closed" if kind == "close" else "open"
        raw = episode(bed, self.seq[bed], state, eid=f"{bed}:{self.eid[bed]}", at=self.clock.now + skew * S,
                      renewal=kind == "renew", reason="clean" if state == "closed" else None)
        self.m.observe(decode_episode(raw, self.clock.now))
        self._tick()

    @rule(dt=st.integers(0, 60 * S))
    def advance(self, dt):
        """Time passes with no record: the bridge ticks at each deadline. Each tick moves the deadline
        on, and a lapse is said at the lease's end (+1 ns), not at some later tick."""
        end = self.clock.now + dt
        first, last = len(self.events), None
        while (d := self.m.next_deadline()) is not None and d <= end:
            assert d != last, "a tick at the deadline left it where it was"
            last = self.clock.now = max(self.clock.now, d)
            self._tick()
        self.clock.now = end
        self._tick()
        for e in self.events[first:]:
            if e.phase == "end" and e.reason == "lapsed":
                assert e.at_ns <= self.m.view.lease_end_ns(e.patient_id) + 1, "lapse said late"

    @invariant()
    def active_iff_suppressed(self):
        for b in self.BEDS:
            assert (b in self.m.active) == self.m.view.suppressed(b), b

    @invariant()
    def phases_well_formed_and_renewed_in_time(self):
        for b in self.BEDS:
            open_id, last = None, None
            for e in (e for e in self.events if e.patient_id == b):
                if e.phase == "start":
                    assert open_id is None
                    open_id = e.episode_id
                else:
                    assert open_id == e.episode_id, (e, open_id)
                    assert e.at_ns - last <= self.renew
                    if e.phase == "end":
                        open_id = None
                last = e.at_ns


TestAlertModel = AlertModel.TestCase
TestAlertModel.settings = hsettings(max_examples=60, stateful_step_count=40, deadline=None)


# -- PCD-04 content ----------------------------------------------------------------------------------
HOSTILE = "a|b^c~d\\e&f\rMSH|^~\\&|FORGED\x0b\x1c\r\nPID|||x"


def _obx(msg, code: str) -> str:
    return next(str(s[5]) for s in msg.segments("OBX") if str(s[3]).startswith(code))


def test_pcd04_content_and_a_hostile_patient_id_cannot_forge_a_segment_or_field():
    e = AlertEvent(HOSTILE, HOSTILE, "start", T0 - 20 * S, T0)
    text = build_alert(e, "ctl-1", T0)
    assert "\x0b" not in text and "\x1c" not in text and "\n" not in text
    msg = hl7.parse(text)
    assert [str(s[0]) for s in msg] == ["MSH", "PID", "PV1", "OBR"] + ["OBX"] * 7
    assert str(msg.segment("MSH")[9]) == "ORU^R40^ORU_R40" and str(msg.segment("MSH")[12]) == "2.6"
    assert str(msg.segment("MSH")[11]) == "P" and str(msg.segment("MSH")[21]).startswith("IHE_PCD_ACM_001")
    pid = msg.segment("PID")
    assert len(pid) == 6 and len(pid[3][0]) == 5  # PID-3 stays one CX of 5 components
    assert msg.unescape(str(pid[3][0][0])) == HOSTILE.replace("\r", "\\X0D\\").replace("\n", "\\X0A\\") \
        .replace("\x0b", "\\X0B\\").replace("\x1c", "\\X1C\\")
    assert str(msg.segment("OBR")[2][0][0]) == alert_id(HOSTILE)
    assert _obx(msg, "68481") == "start" and _obx(msg, "68482") == "active"
    assert _obx(msg, "68484") == "PL" and _obx(msg, "68485") == "ST"
    end = hl7.parse(build_alert(AlertEvent("b", "b:1", "end", T0, T0 + S, T0 + S, reason=HOSTILE), "c2", T0))
    assert _obx(end, "68481") == "end" and _obx(end, "68482") == "inactive"
    assert len(end.segments("OBX")) == 7 and str(end.segment("OBR")[8])


@given(st.text(min_size=1, max_size=60))
@hsettings(max_examples=150, deadline=None)
def test_any_patient_id_stays_in_its_field(pid):
    msg = hl7.parse(build_alert(AlertEvent(pid, pid, "continue", T0, T0), "c", T0))
    assert [str(s[0]) for s in msg] == ["MSH", "PID", "PV1", "OBR"] + ["OBX"] * 7
    assert len(msg.segment("PID")[3][0]) == 5
    assert not any(c in escape(pid) for c in "|^~&\r\n")


@given(st.binary(max_size=300))
@hsettings(max_examples=200, deadline=None)
def test_check_ack_never_raises(block):
    assert check_ack(block, "c").code in ("invalid", "AA", "AE", "AR", "CA", "CE", "CR")


def test_check_ack_codes():
    ack = b"MSH|^~\\&|AM||||20260101||ACK^R40^ACK|9|P|2.6\rMSA|%s|c1|why\x1b[2J\r"
    assert check_ack(ack % b"AA", "c1").accepted
    assert check_ack(ack % b"AE", "c1").error and "\x1b" not in check_ack(ack % b"AE", "c1").reason
    assert check_ack(ack % b"AR", "c1").rejected
    assert check_ack(ack % b"AA", "other").code == "invalid"


# -- the MLLP sender against python-hl7's server -----------------------------------------------------
class AlarmManager:
    """python-hl7's MLLP server: records each message it parsed and answers by `script` (a list of
    "AA", "AE", "AR" or "drop", one per message received, then AA)."""

    def __init__(self, script=(), tls=None):
        self.script = list(script)
        self.received: list[hl7.Message] = []
        self.server = None
        self.tls = tls  # an ssl.SSLContext: MLLP over TLS

    async def start(self) -> int:
        from hl7.mllp import start_hl7_server

        self.server = await start_hl7_server(self._client, "127.0.0.1", 0, encoding="utf-8", ssl=self.tls)
        return self.server.sockets[0].getsockname()[1]

    async def _client(self, reader, writer):
        try:
            while True:
                msg = await reader.readmessage()  # framing checked by python-hl7: VT ... FS CR
                self.received.append(msg)
                answer = self.script.pop(0) if self.script else "AA"
                if answer == "drop":
                    writer.close()
                    return
                ctl = str(msg.segment("MSH")[10])
                writer.writemessage(hl7.parse(f"MSH|^~\\&|AM||||20260101||ACK^R40^ACK|a{ctl}|P|2.6\rMSA|{answer}|"
                                              f"{ctl}|{answer} reason"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def phases(self) -> list[tuple[str, str]]:
        return [(str(m.segment("PID")[3][0][0]), _obx(m, "68481")) for m in self.received]

    async def stop(self):
        self.server.close()


async def _until(cond, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def _events(pid, *ph):
    return [AlertEvent(pid, f"{pid}:1", p, T0, T0 + i * S, T0 + i * S if p == "end" else None)
            for i, p in enumerate(ph)]


@pytest.mark.parametrize("script, resent", [((), 0), (("AE", "AE"), 2), (("drop",), 1), (("AR",), 0)])
def test_sender_resends_until_acked_and_keeps_each_beds_order(script, resent):
    async def main():
        am = AlarmManager(script)
        port = await am.start()
        sender = AlertSender("127.0.0.1", port, ack_timeout_s=5, backoff_s=(0.01, 0.05))
        x = _events("x", "start", "continue", "end")
        for e in x[:2] + _events("y", "start"):
            sender.enqueue(e)
        task = asyncio.create_task(sender.run())
        await _until(lambda: sender.pending() == 0)
        sender.enqueue(x[2])  # after the continue was ACKed: nothing to supersede
        await _until(lambda: sender.pending() == 0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await am.stop()
        return am, sender

    am, sender = asyncio.run(main())
    got = am.phases()
    assert len(got) == 4 + resent
    distinct = list(dict.fromkeys(got))  # a resend repeats the same message
    assert [p for p in distinct if p[0] == "x"] == [("x", "start"), ("x", "continue"), ("x", "end")]
    assert ("y", "start") in distinct
    controls = [str(m.segment("MSH")[10]) for m in am.received]
    assert len(set(controls)) == 4  # a resend carries the same MSH-10
    assert sender.counts["acked"] == (3 if "AR" in script else 4)
    assert sender.counts["rejected"] == script.count("AR")


def test_alerts_go_over_mutual_tls_and_never_to_an_alarm_manager_of_another_ca(tmp_path):
    """--tls-cert/--tls-key/--tls-ca: the alarm manager (python-hl7's server over TLS, client certificates
    required) gets the alerts from a bridge with a certificate of its CA; a server whose certificate another
    CA signed is never sent a message (the bridge keeps it queued, resending to nobody)."""
    import ssl

    from streamer.gateways.alerts_out import client_tls
    from tests.tls import have_openssl, make_ca, make_server_cert

    if not have_openssl():
        pytest.skip("needs openssl to make the certificates")
    for ca in ("ward-ca", "rogue-ca"):
        make_ca(tmp_path, ca)
    am_cert, am_key = make_server_cert(tmp_path, "ward-ca", "alarm-manager", "IP:127.0.0.1,DNS:localhost")
    rogue_cert, rogue_key = make_server_cert(tmp_path, "rogue-ca", "rogue", "IP:127.0.0.1,DNS:localhost")
    bridge_cert, bridge_key = make_server_cert(tmp_path, "ward-ca", "bridge", "DNS:bridge")

    def server_tls(cert, key) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tmp_path / "ward-ca.pem"))
        ctx.load_cert_chain(str(cert), str(key))
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    async def main():
        good = AlarmManager(tls=server_tls(am_cert, am_key))
        rogue = AlarmManager(tls=server_tls(rogue_cert, rogue_key))
        tls = client_tls(str(bridge_cert), str(bridge_key), str(tmp_path / "ward-ca.pem"))
        senders = [AlertSender("127.0.0.1", await am.start(), tls=tls, ack_timeout_s=5, backoff_s=(0.01, 0.05))
                   for am in (good, rogue)]
        tasks = []
        for sender in senders:
            for e in _events("x", "start", "end"):
                sender.enqueue(e)
            tasks.append(asyncio.create_task(sender.run()))
        await _until(lambda: senders[0].pending() == 0)
        await _until(lambda: senders[1].counts["resent_no_ack"] >= 2)  # the handshake failed, twice
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for am in (good, rogue):
            await am.stop()
        return good, rogue, senders

    good, rogue, senders = asyncio.run(main())
    assert good.phases() == [("x", "start"), ("x", "end")]
    assert rogue.received == [] and senders[1].pending() == 2 and senders[1].counts["acked"] == 0


def test_a_queued_continue_is_superseded_but_never_a_start():
    sender = AlertSender("127.0.0.1", 9)
    for e in _events("x", "start", "continue", "continue", "end"):
        sender.enqueue(e)
    assert [o.event.phase for o in sender.queues["x"]] == ["start", "end"]
    assert sender.counts["superseded"] == 2


# -- the bridge on Apache Kafka ----------------------------------------------------------------------
def _kafka_settings(broker, lease_s=3.0):
    from tests.kafka_utils import isolated_settings

    s = isolated_settings(broker.bootstrap, partitions=1)
    s.episodes.open_after = 1
    s.episodes.lease_s = lease_s
    s.episodes.renew_every_s = lease_s / 3
    s.episodes.skew_allowance_s = 0.5
    return s


class Worker:
    """Episode records as a worker writes them (schema 2, each checked against
    schemas/artifact-episode.v2.schema.json and the client's decoder), written to the topic: seq from the
    clock in microseconds then one by one, a lease of episodes.lease_s from now."""

    def __init__(self, s):
        self.s = s
        self.seq: dict[str, int] = {}
        self.eid: dict[str, str] = {}

    def _doc(self, pid, state, renewal=False, reason=None) -> dict:
        from tests.kafka_utils import schema_validator

        self.seq[pid] = self.seq.get(pid, time.time_ns() // 1000) + 1
        raw = episode(pid, self.seq[pid], state, eid=self.eid[pid], at=time.time_ns(), lease_s=self.s.episodes.lease_s,
                      renewal=renewal, reason=reason)
        doc = orjson.loads(raw)
        schema_validator("artifact-episode.v2.schema.json").validate(doc)
        decode_episode(raw)
        return doc

    def open(self, pid):
        self.eid[pid] = f"{pid}:{time.time_ns()}"
        return self._doc(pid, "open")

    def renew(self, pid):
        return self._doc(pid, "open", renewal=True)

    def close(self, pid):
        return self._doc(pid, "closed", reason="clean")

    async def send(self, *docs, raw: list[tuple[bytes, bytes | None]] = ()):
        from streamer.kafka.clients import make_producer

        producer = make_producer(self.s.kafka)
        await producer.start()
        try:
            for d in docs:
                await producer.send_and_wait(self.s.kafka.episodes_topic, orjson.dumps(d),
                                             key=d["patient_id"].encode())
            for key, value in raw:
                await producer.send_and_wait(self.s.kafka.episodes_topic, value, key=key)
        finally:
            await producer.stop()


async def _bridge(s, port):
    machine = AlertMachine(int(s.episodes.lease_s / 3 * S), skew_s=s.episodes.skew_allowance_s,
                           max_lease_s=s.episodes.lease_s + s.episodes.skew_allowance_s)
    sender = AlertSender("127.0.0.1", port, ack_timeout_s=5, backoff_s=(0.01, 0.1))
    bridge = AlertBridge(s.kafka, machine, sender)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    return bridge, stop, task


async def _caught_up(bridge, task):
    await _until(lambda: bridge.caught_up.is_set() or task.done(), timeout_s=30)
    if task.done():
        task.result()  # what stopped the bridge


@pytest.mark.integration
def test_bridge_on_kafka_phases_lapse_restart_and_hostile_records(broker):
    s = _kafka_settings(broker)
    w = Worker(s)

    async def main():
        am = AlarmManager(("AE",))
        port = await am.start()
        # before the bridge starts: one episode closed, one open long ago and lapsed, one open now
        await w.send(w.open("closed-bed"), w.close("closed-bed"), w.open("old-bed"))
        await asyncio.sleep(0)  # (the old bed's lease is what lapses: its record's valid_until passes)
        old_open_until = time.time_ns() + int((s.episodes.lease_s + s.episodes.skew_allowance_s) * S)
        while time.time_ns() <= old_open_until:  # wait on the condition: the old bed's lease is over
            await asyncio.sleep(0.1)
        await w.send(w.open("bed-1"), raw=[(b"evil", b"not json"), (b"evil", None),
                                           (b"evil", orjson.dumps({"schema": 2, "patient_id": "x"}))])
        bridge, stop, task = await _bridge(s, port)
        await _caught_up(bridge, task)
        assert bridge.skipped == 3
        await _until(lambda: ("bed-1", "start") in am.phases())
        assert not any(p[0] in ("closed-bed", "old-bed") for p in am.phases())  # never a stale start
        await w.send(w.renew("bed-1"))
        await _until(lambda: am.phases().count(("bed-1", "continue")) >= 1)
        # no renewal from here on: the bridge ends the alert on its own clock when the lease lapses
        await _until(lambda: ("bed-1", "end") in am.phases(), timeout_s=15)
        end = next(m for m in am.received if _obx(m, "68481") == "end")
        assert "lapsed" in _obx(end, "68546") and _obx(end, "68482") == "inactive"
        assert len(am.received) >= 3 and not task.done()
        # a second episode, then the bridge restarts: the open one is sent again as start, nothing stale
        await w.send(w.open("bed-2"))
        await _until(lambda: ("bed-2", "start") in am.phases())
        stop.set()
        await asyncio.wait_for(task, 15)
        before = len(am.received)
        await w.send(w.renew("bed-2"))
        bridge, stop, task = await _bridge(s, port)
        await _caught_up(bridge, task)
        await _until(lambda: am.phases()[before:].count(("bed-2", "start")) == 1)
        again = am.phases()[before:]
        assert ("bed-1", "start") not in again and ("old-bed", "start") not in again
        await w.send(w.close("bed-2"))
        await _until(lambda: ("bed-2", "end") in am.phases()[before:])
        stop.set()
        await asyncio.wait_for(task, 15)
        await am.stop()
        return am

    am = asyncio.run(main())
    for bed in ("bed-1", "bed-2"):
        seq = [p for b, p in dict.fromkeys((b, p) for b, p in am.phases()) if b == bed]
        assert seq[0] == "start" and seq[-1] == "end"
