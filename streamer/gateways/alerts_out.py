"""`streamer alerts hl7 --to HOST:PORT`: the episodes topic, read as an alarm system reads it (the client's
SuppressionView, read_committed), as IHE PCD-04 "ECG signal artifact" technical alerts over MLLP
(docs/gateways.md, "Alerts to an alarm manager").

Three parts:
- `AlertMachine` (pure, its clock passed in): per bed, `start` when the view's status becomes
  "suppressed", `continue` at each renewal and at least every `renew_ns` while it stays so, `end` when it
  is "off" or "lapsed" (closed, stale, state lost, or the lease ran out on this process's clock). Lapse is
  found by `tick` at `next_deadline()`, a timer, not only when a record arrives.
- `AlertSender`: one MLLP connection, stop-and-wait (one message awaiting its ACK at a time), per-bed FIFO
  queues. Invariants: a bed's messages leave in the order they were made; a `continue` not yet ACKed is
  dropped when a newer `continue` or the `end` of its alert is queued behind it (the newer says more);
  a `start` and an `end` are never dropped by supersession (an alarm manager that saw a start must see
  its end; a start is kept even if its end follows at once, so the manager's record of the episode is
  whole). AA/CA: done. AE/CE: resent with backoff up to `max_error_retries`, then dropped (logged,
  counted: one message the manager cannot process must not stop every bed). AR/CR: rejected, never
  resent as is (logged, counted). No ACK within `ack_timeout_s`, or a lost connection: reconnect with
  backoff and resend the same bytes (same MSH-10).
- `AlertBridge`: reads the topic from the beginning to its end before sending anything, so after a
  restart only episodes open *now* (by the view's lease) are sent, as `start`; then follows it.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field

from streamer.client import DEFAULT_MAX_LEASE_S, DEFAULT_SKEW_S, Episode, MessageError, SuppressionView, decode_episode
from streamer.errors import SettingsError
from streamer.gateways.pcd04 import AlertEvent, build_alert, check_ack
from streamer.lifecycle import stop_on_signals
from streamer.logs import get_logger, printable

log = get_logger(__name__)


# -- the alert state machine ------------------------------------------------------------------------
@dataclass
class _Bed:
    episode_id: str
    start_ns: int
    last_sent_ns: int


class AlertMachine:
    """Each bed's alert from the episodes it is fed. Invariants, at every `tick(now)`:
    - a bed has an active alert iff `view.status(bed, now) == "suppressed"`;
    - a bed's events are start (continue)* end, repeated; an alert's id is its episode's;
    - while active, two events of a bed are at most `renew_ns` apart when `tick` runs by `next_deadline`.
    `observe` feeds one decoded episode; `arrived_ns` (its arrival by our clock, default now) may be earlier
    than now: it only shortens the view's lease (the safe side)."""

    def __init__(self, renew_ns: int, skew_s: float = DEFAULT_SKEW_S, max_lease_s: float = DEFAULT_MAX_LEASE_S,
                 clock=time.time_ns):
        if renew_ns <= 0:
            raise ValueError("renew_ns must be positive")
        self.renew_ns = renew_ns
        self.clock = clock
        self.view = SuppressionView(skew_s=skew_s, clock=clock, max_lease_s=max_lease_s)
        self.active: dict[str, _Bed] = {}
        self._renewed: set[str] = set()  # beds whose open episode got a newer record since the last tick

    def observe(self, episode: Episode, arrived_ns: int | None = None) -> None:
        self.view.apply(episode, received_ns=arrived_ns)
        if episode.is_open and self.view.episode(episode.patient_id) is episode:
            self._renewed.add(episode.patient_id)

    def tick(self, now_ns: int | None = None) -> list[AlertEvent]:
        now = self.clock() if now_ns is None else now_ns
        events: list[AlertEvent] = []
        for pid in sorted(self._renewed | set(self.active)):
            events.extend(self._step(pid, now))
        self._renewed.clear()
        return events

    def settle(self) -> None:
        """Forget the renewals seen so far (after the catch-up read: what is open is sent as a start)."""
        self._renewed.clear()

    def catch_up(self, now_ns: int | None = None) -> list[AlertEvent]:
        """The starts of the beds suppressed now: after reading the topic to its end at start."""
        now = self.clock() if now_ns is None else now_ns
        self._renewed.clear()
        events = []
        for e in self.view.open_episodes(now):
            events.extend(self._step(e.patient_id, now))
        return events

    def _step(self, pid: str, now: int) -> list[AlertEvent]:
        bed = self.active.get(pid)
        episode = self.view.episode(pid)
        status = self.view.status(pid, now)
        out: list[AlertEvent] = []
        if status == "suppressed" and episode is not None:
            if bed is not None and bed.episode_id != episode.episode_id:
                out.append(self._end(pid, bed, now, "superseded"))
                bed = None
            if bed is None:
                start = episode.start_ns if episode.start_ns is not None else now
                bed = self.active[pid] = _Bed(episode.episode_id, start, now)
                out.append(AlertEvent(pid, bed.episode_id, "start", bed.start_ns, now))
            elif pid in self._renewed or now - bed.last_sent_ns >= self.renew_ns:
                bed.last_sent_ns = now
                out.append(AlertEvent(pid, bed.episode_id, "continue", bed.start_ns, now))
        elif bed is not None:
            why = "lapsed" if status == "lapsed" else (episode.reason if episode is not None and episode.reason
                                                        else "closed")
            out.append(self._end(pid, bed, now, why))
        return out

    def _end(self, pid: str, bed: _Bed, now: int, reason: str) -> AlertEvent:
        del self.active[pid]
        return AlertEvent(pid, bed.episode_id, "end", bed.start_ns, now, end_ns=now, reason=reason)

    def next_deadline(self) -> int | None:
        """When `tick` next has something to do with no record arriving: a renewal due or a lease's end."""
        due = []
        for pid, bed in self.active.items():
            due.append(bed.last_sent_ns + self.renew_ns)
            end = self.view.lease_end_ns(pid)
            if end is not None:
                due.append(end + 1)  # status is "suppressed" up to and including the lease's end
        return min(due) if due else None


# -- the MLLP sender --------------------------------------------------------------------------------
@dataclass
class Outbound:
    event: AlertEvent
    control_id: str
    text: str
    order: int
    attempts: int = 0
    errors: int = 0
    not_before: float = 0.0  # monotonic: a resend after an AE waits its backoff


@dataclass
class AlertSender:
    """Per-bed queues over one MLLP connection (see the module docstring for the ordering rules)."""

    host: str
    port: int
    tls: ssl.SSLContext | None = None
    ack_timeout_s: float = 10.0
    max_error_retries: int = 5
    backoff_s: tuple[float, float] = (0.2, 10.0)
    max_block_bytes: int = 64 * 1024
    queues: dict[str, deque[Outbound]] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)
    acked: list[AlertEvent] = field(default_factory=list)  # the last ACKed events (bounded), for tests and logs

    def __post_init__(self):
        self._order = itertools.count()
        self._wake = asyncio.Event()
        self._conn: tuple | None = None
        self._failures = 0

    def enqueue(self, event: AlertEvent, now_ns: int | None = None) -> None:
        queue = self.queues.setdefault(event.patient_id, deque())
        if event.phase in ("continue", "end"):
            # a continue not yet ACKed says less than this newer event of the same alert: drop it
            kept = [o for o in queue if not (o.event.phase == "continue" and o.event.episode_id == event.episode_id)]
            self.counts["superseded"] += len(queue) - len(kept)
            queue.clear()
            queue.extend(kept)
        control_id = uuid.uuid4().hex[:20]
        text = build_alert(event, control_id, event.at_ns if now_ns is None else now_ns)
        queue.append(Outbound(event, control_id, text, next(self._order)))
        self._wake.set()

    def pending(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def _next(self) -> tuple[Outbound | None, float | None]:
        """The ready head message made first, else the earliest time one is ready."""
        now = time.monotonic()
        ready = [q[0] for q in self.queues.values() if q and q[0].not_before <= now]
        if ready:
            return min(ready, key=lambda o: o.order), None
        waits = [q[0].not_before for q in self.queues.values() if q]
        return None, (min(waits) - now if waits else None)

    async def run(self) -> None:
        """Send until cancelled. Never raises for the network or the peer: it reconnects."""
        try:
            while True:
                item, wait = self._next()
                if item is None:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), wait if wait is not None else None)
                    except TimeoutError:
                        pass
                    continue
                await self._deliver(item)
        finally:
            self._close()

    async def _deliver(self, item: Outbound) -> None:
        from hl7.mllp import InvalidBlockError

        try:
            reader, writer = await self._connection()
            item.attempts += 1
            self.counts["sent"] += 1
            writer.writeblock(item.text.encode("utf-8"))
            await writer.drain()
            ack = await asyncio.wait_for(self._ack(reader, item.control_id), self.ack_timeout_s)
        except (OSError, EOFError, TimeoutError, ValueError, ssl.SSLError, InvalidBlockError) as exc:
            # no ACK: the connection is not to be trusted; the same bytes go again on a new one
            self.counts["resent_no_ack"] += 1
            log.warning("alert_not_acked", error=type(exc).__name__, detail=printable(str(exc)[:200]),
                        phase=item.event.phase, attempts=item.attempts)
            self._close()
            await self._backoff()
            return
        self._failures = 0
        queue = self.queues[item.event.patient_id]
        if ack.accepted:
            self.counts["acked"] += 1
            self._done(queue, item)
            self.acked.append(item.event)
            del self.acked[:-1000]
        elif ack.rejected:
            self.counts["rejected"] += 1
            log.error("alert_rejected", code=ack.code, reason=ack.reason, phase=item.event.phase)
            self._done(queue, item)
        else:
            item.errors += 1
            self.counts["errors"] += 1
            if item.errors > self.max_error_retries:
                self.counts["dropped_after_errors"] += 1
                log.error("alert_dropped", code=ack.code, reason=ack.reason, phase=item.event.phase,
                          errors=item.errors)
                self._done(queue, item)
            else:
                log.warning("alert_error_ack", code=ack.code, reason=ack.reason, phase=item.event.phase,
                            errors=item.errors)
                item.not_before = time.monotonic() + self._delay(item.errors)

    @staticmethod
    def _done(queue: deque, item: Outbound) -> None:
        if queue and queue[0] is item:
            queue.popleft()

    async def _ack(self, reader, control_id: str):
        while True:  # an ACK of another message (a late one for an earlier try) is skipped
            ack = check_ack(await reader.readblock(), control_id)
            if ack.code != "invalid":
                return ack
            self.counts["invalid_acks"] += 1
            log.warning("alert_ack_invalid", reason=ack.reason)

    async def _connection(self):
        if self._conn is None:
            from hl7.mllp import open_hl7_connection

            self._conn = await asyncio.wait_for(
                open_hl7_connection(self.host, self.port, limit=self.max_block_bytes, encoding="utf-8",
                                    ssl=self.tls, server_hostname=self.host if self.tls else None),
                self.ack_timeout_s)
            self.counts["connections"] += 1
            log.info("alarm_manager_connected", host=self.host, port=self.port, tls=self.tls is not None)
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None

    def _delay(self, n: int) -> float:
        low, high = self.backoff_s
        return min(high, low * 2 ** max(n - 1, 0))

    async def _backoff(self) -> None:
        self._failures += 1
        await asyncio.sleep(self._delay(self._failures))


def client_tls(cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext | None:
    """TLS when any --tls-* is given: the alarm manager's certificate checked against --tls-ca (else the
    system's CAs) and its host name; --tls-cert/--tls-key presented for mutual TLS."""
    if not (cert or key or ca):
        return None
    if key and not cert:
        raise SettingsError("--tls-key needs --tls-cert")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert:
            ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"--tls-cert/--tls-key/--tls-ca do not load: {exc}") from None
    return ctx


# -- the bridge -------------------------------------------------------------------------------------
class AlertBridge:
    """The episodes topic into `machine`, its events into `sender`."""

    def __init__(self, k, machine: AlertMachine, sender: AlertSender):
        self.kafka, self.machine, self.sender = k, machine, sender
        self.skipped = 0  # records the decoders refused
        self.caught_up = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        from aiokafka import TopicPartition

        from streamer.kafka.clients import check_connection, make_consumer, partition_counts, require_topics

        topic = self.kafka.episodes_topic
        await check_connection(self.kafka)
        await require_topics(self.kafka, [topic])
        count = (await partition_counts(self.kafka, [topic])).get(topic, 0)
        if count < 1:
            raise SettingsError(f"the episodes topic {topic!r} has no partitions")
        tps = [TopicPartition(topic, p) for p in range(count)]
        consumer = make_consumer(self.kafka, group_id=None, auto_offset_reset="earliest",
                                 client_id=f"{self.kafka.client_id}-alerts")
        await consumer.start()
        sending = asyncio.create_task(self.sender.run())
        try:
            consumer.assign(tps)  # every partition, no group: an alarm system reads every bed
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            # catch-up: the whole topic into the view, nothing sent, then the starts of what is open now
            while not stop.is_set() and any([await consumer.position(tp) < ends[tp] for tp in tps]):
                self._apply(await consumer.getmany(*tps, timeout_ms=200))
            self._send(self.machine.catch_up())
            log.info("alerts_caught_up", open_alerts=len(self.machine.active), skipped=self.skipped)
            self.caught_up.set()
            while not stop.is_set():
                deadline = self.machine.next_deadline()
                wait_ms = 200 if deadline is None else max(1, min(200, (deadline - time.time_ns()) // 10**6 + 1))
                self._apply(await consumer.getmany(*tps, timeout_ms=wait_ms))
                self._send(self.machine.tick())
                if sending.done():
                    sending.result()  # the sender never ends by itself: raise what stopped it
        finally:
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
            await consumer.stop()

    def _apply(self, batch) -> None:
        now = time.time_ns()
        for tp, records in batch.items():
            for r in records:
                try:
                    if r.value is None:
                        raise MessageError("episode: a null value (tombstone)")
                    episode = decode_episode(r.value, now)
                except MessageError as exc:
                    self.skipped += 1
                    if self.skipped <= 10 or self.skipped % 1000 == 0:
                        log.warning("alerts_record_skipped", topic=tp.topic, partition=tp.partition, offset=r.offset,
                                    reason=printable(str(exc)[:200]), skipped=self.skipped)
                    continue
                # the record's own time may only shorten the lease (a stale record read back at start)
                stamped = r.timestamp * 10**6 if isinstance(r.timestamp, int) and r.timestamp > 0 else now
                self.machine.observe(episode, min(now, stamped))

    def _send(self, events: list[AlertEvent]) -> None:
        for e in events:
            log.info("alert_event", phase=e.phase, reason=e.reason)
            self.sender.enqueue(e)


def run_hl7_alerts(args, settings) -> int:
    """`streamer alerts hl7`: until SIGINT/SIGTERM. Bad TLS files or options: SettingsError (exit 2)."""

    s = settings
    lease_s = s.episodes.lease_s
    renew_s = args.renew_s if args.renew_s is not None else lease_s / 3
    if not (renew_s > 0 and renew_s < lease_s):
        raise SettingsError(f"--renew-s must be above 0 and below the lease ({lease_s} s)")
    if not args.ack_timeout > 0:
        raise SettingsError("--ack-timeout must be above 0")
    host, port = args.to
    tls = client_tls(args.tls_cert, args.tls_key, args.tls_ca)
    machine = AlertMachine(int(renew_s * 1e9), skew_s=s.episodes.skew_allowance_s,
                           max_lease_s=lease_s + s.episodes.skew_allowance_s)

    async def main() -> int:
        stop = asyncio.Event()
        stop_on_signals(asyncio.get_running_loop(), stop.set)
        sender = AlertSender(host, port, tls=tls, ack_timeout_s=args.ack_timeout)
        await AlertBridge(s.kafka, machine, sender).run(stop)
        log.info("alerts_stopped", counts=dict(sender.counts), unsent=sender.pending())
        return 0

    return asyncio.run(main())
