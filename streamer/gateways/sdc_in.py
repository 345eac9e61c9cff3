"""`streamer gateway sdc`: an IEEE 11073 SDC consumer (sdc11073) that subscribes to each device's lead-II
waveform and turns every waveform report into an input record (docs/gateways.md, "SDC").

Invariants:
- Only a RealTimeSampleArrayMetric whose Type is MDC_ECG_ELEC_POTL_II (131330, MDC coding system) is read,
  in mV (MDC_DIM_MILLI_VOLT) or converted from uV (MDC_DIM_MICRO_VOLT); any other unit is refused loudly and
  nothing of that device is sent.
- A report's DeterminationTime is the time of its first sample (BICEPS SampleArrayValue, NOTE 1; sdc11073's
  consumer and tutorial provider read it so too). Within a segment the times are exact: a report is
  contiguous when its first sample is within half a sample (at least the 1 ms a pm:Timestamp resolves) of
  where the previous one ended, and then its t0 is segment start + samples so far / fs, whatever the jitter.
- A new segment starts after anything that may hide missing or foreign samples: a report out of line, a
  validity other than Vld/Vldated or an activation other than On (those reports are not sent), no
  associated patient (not sent), a patient change, a reconnect, a new MDIB SequenceId, reports dropped
  because the queue to Kafka was full.
- sdc11073 calls back on its own HTTP threads: a callback only copies the report (under the MDIB's lock,
  so the patient and the samples belong together) into a bounded per-device inbox and wakes the event loop;
  it never waits on Kafka. A full inbox drops the report, counted and logged, and the gap starts a segment.
- Samples and patient ids never reach a log line but through streamer.logs.patient_ref.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamer.gateways.sink import ConfirmedSink, SinkFailed
from streamer.ingest.contract import MAX_PATIENT_ID, MIN_TIMESTAMP_NS, Chunk
from streamer.lifecycle import stop_on_signals
from streamer.logs import get_logger, patient_ref

log = get_logger("streamer.gateways.sdc")

MDC_ECG_ELEC_POTL_II = "131330"
MDC_DIM_MILLI_VOLT = "266418"
MDC_DIM_MICRO_VOLT = "266419"  # 11073-10101: volt 266400 + the micro prefix (19); milli is + 18
# BICEPS: no CodingSystem means MDC (ISO/IEEE 11073-10101); some devices name it explicitly
MDC_CODING_SYSTEMS = {None, "", "urn:oid:1.2.840.10004.1.1.1.0.0.1", "MDC"}
MV_PER_UNIT = {MDC_DIM_MILLI_VOLT: 1.0, MDC_DIM_MICRO_VOLT: 1e-3}
VALID = {"Vld", "Vldated"}
LEAD = "II"


class UnusableDevice(RuntimeError):
    """The device's MDIB offers no lead II we may read (none, ambiguous, a unit or rate we refuse)."""


@dataclass(frozen=True, slots=True)
class Waveform:
    """The lead-II metric of one MDIB."""
    handle: str
    fs: float
    mv_per_unit: float
    unit: str


def _is_mdc(coded, codes: set[str]) -> bool:
    return coded is not None and str(coded.Code) in codes and coded.CodingSystem in MDC_CODING_SYSTEMS


def find_lead_ii(mdib, min_rate_hz: float, max_rate_hz: float) -> Waveform:
    """The RealTimeSampleArrayMetric of lead II, by MDC codes; raises UnusableDevice saying why not."""
    from sdc11073.xml_types import pm_qnames as pm

    found = [d for d in mdib.descriptions.NODETYPE.get(pm.RealTimeSampleArrayMetricDescriptor, [])
             if _is_mdc(d.Type, {MDC_ECG_ELEC_POTL_II})]
    if not found:
        raise UnusableDevice("no RealTimeSampleArrayMetric with Type MDC_ECG_ELEC_POTL_II (131330)")
    if len(found) > 1:
        # two lead-II waves (two ECG modules): which one the bed's alarms use is not ours to guess
        raise UnusableDevice(f"{len(found)} lead-II waveforms ({', '.join(sorted(d.Handle for d in found))[:200]})")
    d = found[0]
    unit = str(d.Unit.Code) if d.Unit is not None and d.Unit.CodingSystem in MDC_CODING_SYSTEMS else None
    if unit not in MV_PER_UNIT:
        raise UnusableDevice(f"lead II {d.Handle!r} is in unit {unit!r}: only MDC_DIM_MILLI_VOLT (266418) or "
                             f"MDC_DIM_MICRO_VOLT (266419) are read"[:300])
    period = d.SamplePeriod  # sdc11073 parses the xsd duration into seconds
    if not (isinstance(period, (int, float)) and math.isfinite(period) and period > 0):
        raise UnusableDevice(f"lead II {d.Handle!r} has no usable SamplePeriod")
    fs = 1.0 / period
    if not min_rate_hz <= fs <= max_rate_hz:
        raise UnusableDevice(f"lead II sample rate {fs:.3f} Hz outside [{min_rate_hz}, {max_rate_hz}]")
    return Waveform(d.Handle, fs, MV_PER_UNIT[unit], unit)


def _usable_key(text) -> str | None:
    if not isinstance(text, str):
        return None
    text = text.strip()
    return text if 0 < len(text) <= MAX_PATIENT_ID and text.isprintable() else None


def bed_key(mdib, key_by: str) -> str | None:
    """The record key of the device's bed now: the associated PatientContextState's Identification
    Extension (key_by "patient") or the associated LocationContextState's PoC/Room/Bed ("location").
    None when nothing, or more than one state, is associated (never a guess). Call under the MDIB lock."""
    from sdc11073.xml_types import pm_qnames as pm

    from sdc11073.xml_types.pm_types import ContextAssociation

    nodetype = pm.PatientContextState if key_by == "patient" else pm.LocationContextState
    associated = [s for s in mdib.context_states.objects
                  if s.NODETYPE == nodetype and s.ContextAssociation == ContextAssociation.ASSOCIATED]
    if len(associated) != 1:
        return None
    state = associated[0]
    if key_by == "location" and state.LocationDetail is not None:
        parts = [p for p in (state.LocationDetail.PoC, state.LocationDetail.Room, state.LocationDetail.Bed) if p]
        if parts:
            return _usable_key("/".join(parts))
    for ident in state.Identification or []:
        key = _usable_key(ident.Extension)
        if key is not None:
            return key
    return None


@dataclass(slots=True)
class Report:
    """One waveform report as the gateway's thread copied it (never sdc11073's live containers)."""
    samples: list  # Decimals, as the provider wrote them
    first_sample_s: float | None
    valid: bool
    active: bool
    key: str | None
    received_ns: int
    after_loss: bool = False


class Inbox:
    """Reports of one device from sdc11073's threads to the event loop: bounded, never blocking the
    producer; a report that does not fit is dropped, counted, and the next one marks the gap."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_reports: int):
        self._loop = loop
        self._max = max_reports
        self._items: deque[Report] = deque()
        self._lock = threading.Lock()
        self._ready = asyncio.Event()
        self._signalled = False
        self._lost = False
        self.dropped = 0
        self.closed = False

    def put(self, report: Report) -> None:
        """From any thread."""
        with self._lock:
            if len(self._items) >= self._max:
                self.dropped += 1
                first = not self._lost
                self._lost = True
            else:
                first = False
                report.after_loss, self._lost = self._lost, False
                self._items.append(report)
            wake = not self._signalled
            self._signalled = True
        if first:
            log.error("sdc_reports_dropped", effect="samples lost; a new segment starts after the gap",
                      queued=self._max, hint="Kafka is slower than the devices (an outage?)")
        if wake:
            self._loop.call_soon_threadsafe(self._ready.set)

    def close(self) -> None:
        """From the loop: no more reports will come; take() returns what is left, then []."""
        self.closed = True
        self._ready.set()

    async def take(self) -> list[Report]:
        while True:
            with self._lock:
                items = list(self._items)
                self._items.clear()
                self._signalled = False
                self._ready.clear()
            if items or self.closed:
                return items
            await self._ready.wait()


@dataclass
class Timeline:
    """One device's reports -> chunks with exact, contiguous times; a gap or a change starts a segment.
    Pure (no I/O but a log line at each gap), so its rules are tested without a device."""
    device: str
    waveform: Waveform | None = None
    sequence_id: str | None = None
    key: str | None = None
    segment_start_ns: int | None = None
    samples_in_segment: int = 0
    next_seq: int = 0
    gap_reason: str | None = None  # why the current gap began (None: inside a segment)
    gaps: dict[str, int] = field(default_factory=dict)
    reports: int = 0
    samples: int = 0

    def connected(self, waveform: Waveform, sequence_id: str | None) -> None:
        if sequence_id != self.sequence_id and self.sequence_id is not None:
            log.warning("sdc_mdib_reloaded", device=self.device, reason="sequence_id_changed",
                        effect="a new segment starts")
        self.waveform, self.sequence_id = waveform, sequence_id
        self.gap("reconnected")

    def gap(self, reason: str) -> None:
        if self.segment_start_ns is not None or self.gap_reason is None:
            self.gaps[reason] = self.gaps.get(reason, 0) + 1
            level = log.info if reason in ("reconnected", "stopped") else log.warning
            level("sdc_gap", device=self.device, reason=reason, patient=patient_ref(self.key) if self.key else None)
        self.segment_start_ns = None
        self.gap_reason = reason

    def take(self, r: Report) -> Chunk | None:
        """The report's chunk, or None (a gap, or nothing to send)."""
        w = self.waveform
        self.reports += 1
        if w is None:
            return None
        if r.after_loss:
            self.gap("dropped")
        if not r.active:
            self.gap("not_active")
            return None
        if not r.valid:
            self.gap("invalid")
            return None
        if r.key is None:
            self.gap("no_patient")
            return None
        if r.first_sample_s is None or not math.isfinite(r.first_sample_s):
            self.gap("no_time")
            return None
        n = len(r.samples)
        if n == 0:
            return None
        if n > 10 * w.fs:
            self.gap("oversized")
            return None
        try:
            values = np.array([float(x) for x in r.samples], dtype=np.float64) * w.mv_per_unit
        except (TypeError, ValueError, ArithmeticError):
            self.gap("bad_samples")
            return None
        if not np.isfinite(values).all():
            self.gap("bad_samples")
            return None
        t_ns = int(round(r.first_sample_s * 1e9))
        if t_ns < MIN_TIMESTAMP_NS:
            self.gap("bad_time")
            return None
        if r.key != self.key:
            if self.key is not None:
                log.info("sdc_patient_changed", device=self.device, patient=patient_ref(r.key),
                         previous=patient_ref(self.key), effect="a new segment starts")
                self.gap("patient_changed")
            self.key = r.key
        if self.segment_start_ns is not None:
            expected = self.segment_start_ns + round(self.samples_in_segment * 1e9 / w.fs)
            tolerance = max(0.5e9 / w.fs, 1_000_000)  # a pm:Timestamp has 1 ms steps
            if abs(t_ns - expected) <= tolerance:
                t_ns = expected
            else:
                self.gap("discontinuous")
        if self.segment_start_ns is None:
            if self.gap_reason is not None:
                log.info("sdc_segment_started", device=self.device, patient=patient_ref(r.key),
                         after=self.gap_reason)
            self.segment_start_ns, self.samples_in_segment, self.gap_reason = t_ns, 0, None
        chunk = Chunk(r.key, LEAD, t_ns, w.fs, values, self.next_seq, self.segment_start_ns)
        self.next_seq += 1
        self.samples_in_segment += n
        self.samples += n
        return chunk


class DeviceLink:
    """One connection to one provider (sdc11073 threads): consumer started and subscribed, MDIB loaded,
    lead II found, reports copied into the inbox. Blocking methods: call them in a worker thread."""

    def __init__(self, url: str, ssl_contexts, inbox: Inbox, key_by: str, min_rate_hz: float, max_rate_hz: float):
        self.url, self.ssl, self.inbox, self.key_by = url, ssl_contexts, inbox, key_by
        self.rates = (min_rate_hz, max_rate_hz)
        self.consumer = None
        self.mdib = None
        self.waveform: Waveform | None = None
        self.sequence_changed = False
        self.last_report = time.monotonic()
        self.last_active = False
        self.callback_errors = 0

    def open(self) -> None:
        from sdc11073 import observableproperties as properties
        from sdc11073.consumer.consumerimpl import SdcConsumer
        from sdc11073.definitions_sdc import SdcV1Definitions
        from sdc11073.mdib.consumermdib import ConsumerMdib
        from sdc11073.xml_types.actions import periodic_actions

        consumer = SdcConsumer(self.url, SdcV1Definitions, self.ssl, force_ssl_connect=self.ssl is not None,
                               socket_timeout=5)
        self.consumer = consumer
        try:
            # periodic reports repeat what the episodic ones said: not worth a subscription per device
            consumer.start_all(not_subscribed_actions=periodic_actions)
            mdib = ConsumerMdib(consumer)
            mdib.init_mdib()
            self.mdib = mdib
            self.waveform = find_lead_ii(mdib, *self.rates)
            properties.strongbind(mdib, waveform_by_handle=self._on_waveform)
            properties.strongbind(mdib, sequence_or_instance_id_changed_event=self._on_sequence_changed)
        except BaseException:
            self.close(unsubscribe=True)
            raise
        self.last_report = time.monotonic()

    @property
    def sequence_id(self) -> str | None:
        return None if self.mdib is None else self.mdib.sequence_id

    def _on_sequence_changed(self, _changed) -> None:
        self.sequence_changed = True

    def _on_waveform(self, states_by_handle: dict) -> None:
        """On sdc11073's HTTP thread, under the MDIB lock: copy, hand over, return."""
        try:
            state = states_by_handle.get(self.waveform.handle)
            if state is None:
                return
            value = state.MetricValue
            activation = state.ActivationState  # BICEPS: implied "On"
            active = activation is None or str(getattr(activation, "value", activation)) == "On"
            if value is None:
                report = Report([], None, False, active, None, time.time_ns())
            else:
                validity = value.MetricQuality.Validity if value.MetricQuality is not None else None
                report = Report(list(value.Samples or ()), value.DeterminationTime,
                                str(getattr(validity, "value", validity)) in VALID, active,
                                bed_key(self.mdib, self.key_by), time.time_ns())
            self.last_report = time.monotonic()
            self.last_active = active
            self.inbox.put(report)
        except Exception as exc:  # noqa: BLE001 -- a callback must not break sdc11073's thread
            self.callback_errors += 1
            if self.callback_errors == 1:
                log.error("sdc_report_unreadable", device=self.url, error=type(exc).__name__)

    def lost(self, silence_s: float) -> str | None:
        """Why this connection must be made again, or None."""
        if self.consumer is None:
            return "closed"
        if self.sequence_changed:
            return "sequence_id_changed"
        if not self.consumer.is_connected:
            return "subscription_ended"
        if self.last_active and time.monotonic() - self.last_report > silence_s:
            return "silent"
        return None

    def close(self, unsubscribe: bool) -> None:
        if self.consumer is not None:
            try:
                self.consumer.stop_all(unsubscribe=unsubscribe)
            except Exception as exc:  # noqa: BLE001 -- the device may be gone: nothing to tell it
                log.info("sdc_close_incomplete", device=self.url, error=type(exc).__name__)
            self.consumer = None


@dataclass
class GatewayOptions:
    devices: list[str]
    key_by: str = "patient"
    ssl_contexts: object | None = None
    max_queued_reports: int = 300
    silence_s: float = 5.0
    retry_max_s: float = 30.0


class SdcGateway:
    """Every device's reports into one ConfirmedSink; `stop()` unsubscribes, delivers what is queued and
    returns from `run()`."""

    def __init__(self, options: GatewayOptions, sink: ConfirmedSink, min_rate_hz: float = 50.0,
                 max_rate_hz: float = 10000.0):
        self.options = options
        self.sink = sink
        self.rates = (min_rate_hz, max_rate_hz)
        self.timelines: dict[str, Timeline] = {}
        self.inboxes: dict[str, Inbox] = {}
        self.connects: dict[str, int] = {}
        self.connect_failures: dict[str, int] = {}  # attempts that failed (unreachable, TLS refused, ...)
        self.latencies_ns: deque[int] = deque(maxlen=100_000)  # report received -> brokers acknowledged
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        tasks = []
        for url in self.options.devices:
            inbox = Inbox(loop, self.options.max_queued_reports)
            timeline = Timeline(url)
            self.inboxes[url], self.timelines[url] = inbox, timeline
            tasks.append(asyncio.create_task(self._deliver(inbox, timeline), name=f"sdc-deliver {url}"))
            tasks.append(asyncio.create_task(self._connect(url, inbox, timeline), name=f"sdc-connect {url}"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()
        finally:
            self._stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _pause(self, seconds: float) -> bool:
        """Wait, or return True at once when stopping."""
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except asyncio.TimeoutError:
            pass
        return self._stop.is_set()

    async def _connect(self, url: str, inbox: Inbox, timeline: Timeline) -> None:
        retry_s = 1.0
        try:
            while not self._stop.is_set():
                link = DeviceLink(url, self.options.ssl_contexts, inbox, self.options.key_by, *self.rates)
                try:
                    await asyncio.to_thread(link.open)
                except UnusableDevice as exc:
                    log.error("sdc_device_unusable", device=url, reason=str(exc), effect="nothing of it is sent",
                              retry_in_s=60)
                    if await self._pause(60):
                        return
                    continue
                except Exception as exc:  # noqa: BLE001 -- sdc11073 raises what its HTTP, SOAP and TLS layers raise
                    self.connect_failures[url] = self.connect_failures.get(url, 0) + 1
                    log.warning("sdc_connect_failed", device=url, error=f"{type(exc).__name__}: {exc}"[:300],
                                retry_in_s=retry_s)
                    if await self._pause(retry_s):
                        return
                    retry_s = min(retry_s * 2, self.options.retry_max_s)
                    continue
                retry_s = 1.0
                self.connects[url] = self.connects.get(url, 0) + 1
                timeline.connected(link.waveform, link.sequence_id)
                log.info("sdc_connected", device=url, sequence_id=link.sequence_id, fs=link.waveform.fs,
                         unit=link.waveform.unit, key_by=self.options.key_by,
                         tls=self.options.ssl_contexts is not None)
                reason = None
                while reason is None and not await self._pause(0.5):
                    reason = link.lost(self.options.silence_s)
                if reason is not None:
                    log.warning("sdc_connection_lost", device=url, reason=reason, effect="reconnecting")
                await asyncio.to_thread(link.close, reason is None)  # unsubscribe only when stopping
        finally:
            inbox.close()

    async def _deliver(self, inbox: Inbox, timeline: Timeline) -> None:
        while True:
            reports = await inbox.take()
            if not reports:
                if inbox.closed:
                    return
                continue
            chunks = [c for c in map(timeline.take, reports) if c is not None]
            if not chunks:
                continue
            await self.sink.deliver(chunks)
            acked = time.time_ns()
            self.latencies_ns.extend(acked - r.received_ns for r in reports)


def _read_devices(args) -> list[str]:
    devices = list(args.device)
    if args.devices_file:
        for line in Path(args.devices_file).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                devices.append(line)
    return list(dict.fromkeys(devices))


def _ssl_contexts(args):
    """sdc11073's context pair (client: to the device; server: the notifications it sends us), both
    requiring a certificate from --tls-ca: mutual TLS as SDPi asks. None without TLS options."""
    given = [args.tls_cert, args.tls_key, args.tls_ca]
    if not any(given):
        return None
    if not all(given):
        raise ValueError("mutual TLS needs all of --tls-cert, --tls-key and --tls-ca")
    import ssl

    from sdc11073.certloader import mk_ssl_contexts

    contexts = mk_ssl_contexts(Path(args.tls_key), Path(args.tls_cert), Path(args.tls_ca))
    for context in (contexts.client_context, contexts.server_context):
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_REQUIRED
    return contexts


def _check_devices(devices: list[str], tls: bool) -> None:
    if not devices:
        raise ValueError("no device: give --device URL or --devices-file")
    for url in devices:
        if url.startswith("urn:"):
            raise ValueError(f"{url[:80]!r}: discovery of an EPR is not supported yet; give the device's "
                             "https://HOST:PORT/PATH")
        scheme = url.split(":", 1)[0]
        if scheme not in ("http", "https") or len(url) > 2000:
            raise ValueError(f"{url[:80]!r} is not an http(s) device URL")
        if (scheme == "https") != tls:
            raise ValueError(f"{url[:80]!r}: https needs --tls-cert/--tls-key/--tls-ca, and TLS options need "
                             "https device URLs")


def run_sdc_gateway(args, settings) -> int:
    """The command: exit 0 after SIGINT/SIGTERM (unsubscribed, everything queued delivered), 1 when the
    brokers refuse the records (cli.cmd_gateway words it), 2 on bad options."""
    from aiokafka.errors import KafkaError

    try:
        devices = _read_devices(args)
        ssl_contexts = _ssl_contexts(args)
        _check_devices(devices, ssl_contexts is not None)
    except (ValueError, OSError) as exc:
        print(f"streamer gateway sdc: {exc}", file=sys.stderr)
        return 2
    if ssl_contexts is None:
        log.warning("sdc_plain_http", effect="waveforms and patient ids cross the network unencrypted and "
                    "unauthenticated", hint="SDPi requires mutual TLS: give --tls-cert, --tls-key and --tls-ca")
    logging.getLogger("sdc").setLevel(logging.WARNING)  # sdc11073 logs every request at INFO
    options = GatewayOptions(devices, key_by=args.key_by, ssl_contexts=ssl_contexts,
                             max_queued_reports=getattr(args, "max_queued_reports", 300),
                             silence_s=getattr(args, "silence_s", 5.0))

    async def main() -> None:
        sink = await ConfirmedSink.open(settings.kafka)
        try:
            gateway = SdcGateway(options, sink, settings.windows.min_rate_hz, settings.windows.max_rate_hz)
            stop_on_signals(asyncio.get_running_loop(), gateway.stop)
            log.info("sdc_gateway_started", devices=len(devices), key_by=args.key_by, tls=ssl_contexts is not None)
            try:
                await gateway.run()
            except SinkFailed:
                if isinstance(sink.failed, KafkaError):
                    raise sink.failed from None  # cli.cmd_gateway names the fix in one line
                raise
            for url, t in gateway.timelines.items():
                log.info("sdc_gateway_stopped", device=url, reports=t.reports, samples=t.samples, gaps=t.gaps,
                         dropped=gateway.inboxes[url].dropped, connects=gateway.connects.get(url, 0))
        finally:
            await sink.close()

    try:
        asyncio.run(main())
    except SinkFailed as exc:
        print(f"streamer gateway sdc: {exc}", file=sys.stderr)
        return 1
    return 0
