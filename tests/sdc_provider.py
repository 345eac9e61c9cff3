"""A loopback IEEE 11073 SDC provider built from sdc11073's own classes (SdcProvider, ProviderMdib): one
lead-II RealTimeSampleArrayMetric at 500 Hz, a PatientContext and a LocationContext, streaming a known
synthetic ECG as ~50 samples every 100 ms, as sdc11073's tutorial waveform provider does (DeterminationTime
= the time of a report's first sample: BICEPS SampleArrayValue, NOTE 1).

The MDIB below was written for these tests (no capture of any device). Discovery is left out: the gateway
is given the device's URL, so the provider is handed a stand-in that only names the loopback address.
Every report the provider sends is recorded (`sent`), so a test compares what reached Kafka with it."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal

import numpy as np
from sdc11073.httpserver.httpserverimpl import HttpServerThreadBase, _ThreadingHTTPServer
from sdc11073.mdib import ProviderMdib
from sdc11073.provider import SdcProvider
from sdc11073.xml_types import pm_types
from sdc11073.xml_types.dpws_types import ThisDeviceType, ThisModelType

ECG_HANDLE = "ecg.ii"
PATIENT_DESCRIPTOR = "pc.mds0"
LOCATION_DESCRIPTOR = "lc.mds0"

MDIB_XML = b"""<?xml version="1.0" encoding="UTF-8"?>
<msg:GetMdibResponse xmlns:msg="http://standards.ieee.org/downloads/11073/11073-10207-2017/message"
  xmlns:pm="http://standards.ieee.org/downloads/11073/11073-10207-2017/participant"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" SequenceId="urn:uuid:SEQUENCE">
 <msg:Mdib SequenceId="urn:uuid:SEQUENCE">
  <pm:MdDescription>
   <pm:Mds Handle="mds0" SafetyClassification="MedA">
    <pm:Type Code="69837" CodingSystem="urn:oid:1.2.840.10004.1.1.1.0.0.1"/>
    <pm:SystemContext Handle="sc.mds0">
     <pm:PatientContext Handle="pc.mds0"/>
     <pm:LocationContext Handle="lc.mds0"/>
    </pm:SystemContext>
    <pm:Vmd Handle="vmd.ecg">
     <pm:Type Code="69798"/>
     <pm:Channel Handle="ch.ecg">
      <pm:Type Code="69799"/>
      <pm:Metric xsi:type="pm:NumericMetricDescriptor" Handle="hr" Resolution="1" MetricCategory="Msrmt"
         MetricAvailability="Cont">
       <pm:Type Code="147842"/>
       <pm:Unit Code="264864"/>
      </pm:Metric>
      <pm:Metric xsi:type="pm:RealTimeSampleArrayMetricDescriptor" Handle="ecg.v5" Resolution="0.001"
         MetricCategory="Msrmt" MetricAvailability="Cont" SamplePeriod="PT0.002S">
       <pm:Type Code="131389"/>
       <pm:Unit Code="266418"/>
      </pm:Metric>
      <pm:Metric xsi:type="pm:RealTimeSampleArrayMetricDescriptor" Handle="ecg.ii" Resolution="0.001"
         MetricCategory="Msrmt" MetricAvailability="Cont" SamplePeriod="PT0.002S">
       <pm:Type Code="131330" CodingSystem="urn:oid:1.2.840.10004.1.1.1.0.0.1"/>
       <pm:Unit Code="UNIT"/>
      </pm:Metric>
     </pm:Channel>
    </pm:Vmd>
   </pm:Mds>
  </pm:MdDescription>
 </msg:Mdib>
</msg:GetMdibResponse>
"""


def make_mdib(sequence_id: str, unit_code: str = "266418") -> ProviderMdib:
    """MDIB_XML as a ProviderMdib, with this SequenceId and lead II's unit."""
    from sdc11073.definitions_sdc import SdcV1Definitions

    xml = MDIB_XML.replace(b"urn:uuid:SEQUENCE", sequence_id.encode()).replace(b'Code="UNIT"',
                                                                               f'Code="{unit_code}"'.encode())
    return ProviderMdib.from_string(xml, SdcV1Definitions)


class _NoDiscovery:
    """What SdcProvider asks of WS-Discovery when nobody discovers it: the address to serve on."""

    def __init__(self, address: str):
        self.active_address = address

    def publish_service(self, *args, **kwargs) -> None:
        pass

    def clear_service(self, *args, **kwargs) -> None:
        pass


class _ReusableHttpServer(_ThreadingHTTPServer):
    allow_reuse_address = True  # a restart binds the port again while the old connections linger


class _PortHttpServer(HttpServerThreadBase):
    """sdc11073's HTTP server thread on a chosen port (0: the OS picks), so a restarted provider answers at
    the URL the gateway was given, as a device with a configured port does."""

    def __init__(self, address: str, port: int, ssl_context, logger):
        super().__init__(address, ssl_context, supported_encodings=[], logger=logger)
        self._port = port

    def run(self) -> None:
        self._stop_requested = False
        self.httpd = _ReusableHttpServer(self.logger, (self._my_ipaddress, self._port), 0, self.supported_encodings)
        scheme = "http"
        if self._ssl_context:
            self.httpd.socket = self._ssl_context.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.base_url = f"{scheme}://{self._my_ipaddress}:{self.server_port}/"
        self.started_evt.set()
        self.httpd.serve_forever()


@dataclass
class SentReport:
    t0_s: float  # DeterminationTime: the first sample's time
    values: np.ndarray  # the samples as sent (decimals, as floats)
    valid: bool
    patient: str | None


class EcgProvider:
    """`start()` serves the MDIB and streams `signal` (mV, looping) at `fs`; `restart()` stops everything
    and serves a new MDIB (new SequenceId) at the same URL; `stop()` ends it."""

    def __init__(self, signal: np.ndarray, fs: float = 500.0, per_report: int = 50, interval_s: float = 0.1,
                 address: str = "127.0.0.1", ssl_context_container=None, unit_code: str = "266418",
                 patient: str | None = "MRN-0001", bed: str = "Bed7"):
        self.signal = np.asarray(signal, dtype=np.float64)
        self.fs, self.per_report, self.interval_s = fs, per_report, interval_s
        self.address, self.ssl = address, ssl_context_container
        self.unit_code = unit_code
        self.epr = uuid.uuid4().hex
        self.port = 0
        self.patient, self.bed = patient, bed
        self.valid = True
        self.sent: list[SentReport] = []
        self.sequence_id = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._provider: SdcProvider | None = None
        self._http: _PortHttpServer | None = None
        self._position = 0  # next sample of `signal`
        self._next_t_s: float | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl else "http"
        return f"{scheme}://{self.address}:{self.port}/{self.epr}"

    @property
    def mdib(self) -> ProviderMdib:
        return self._provider.mdib

    def start(self) -> "EcgProvider":
        import logging

        self.sequence_id = f"urn:uuid:{uuid.uuid4()}"
        mdib = make_mdib(self.sequence_id, self.unit_code)
        self._http = _PortHttpServer(self.address, self.port, self.ssl.server_context if self.ssl else None,
                                     logging.getLogger("sdc_provider.http"))
        self._http.start()
        if not self._http.started_evt.wait(10):
            raise RuntimeError("the provider's HTTP server did not start")
        self.port = self._http.server_port
        this_model = ThisModelType(manufacturer="streamer tests", manufacturer_url="https://example.invalid",
                                   model_name="EcgProvider", model_number="1", model_url="https://example.invalid",
                                   presentation_url="https://example.invalid")
        this_device = ThisDeviceType(friendly_name="EcgProvider", firmware_version="1", serial_number="1")
        self._provider = SdcProvider(_NoDiscovery(self.address), this_model, this_device, mdib, epr=self.epr,
                                     ssl_context_container=self.ssl, max_subscription_duration=15)
        self._provider.start_all(start_rtsample_loop=False, shared_http_server=self._http)
        self._set_patient(self.patient)
        self._set_location(self.bed)
        with self.mdib.rt_sample_state_transaction() as mgr:
            state = mgr.get_state(ECG_HANDLE)
            state.ActivationState = pm_types.ComponentActivation.ON
        self._stop.clear()
        self._thread = threading.Thread(target=self._stream, name="ecg-provider", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        # The server closes first, as a device shutting down stops answering: a consumer told by the
        # SubscriptionEnd could otherwise subscribe again while sdc11073's provider iterates its
        # subscriptions outside their lock (stop_all: "Set changed size during iteration").
        if self._http is not None:
            self._http.stop()
            self._http = None
        if self._provider is not None:
            self._provider.stop_all()
            self._provider = None

    def restart(self) -> None:
        """A reboot: the device goes away (subscriptions ended), comes back at the same URL with a new
        SequenceId, and its clock keeps running (the samples it missed are a gap)."""
        self.stop()
        self._next_t_s = None
        self.start()

    # -- what a test changes ------------------------------------------------------------------
    def set_valid(self, valid: bool) -> None:
        with self._lock:
            self.valid = valid

    def set_patient(self, patient: str | None) -> None:
        with self._lock:
            self.patient = patient
            self._set_patient(patient)

    def _set_patient(self, patient: str | None) -> None:
        with self.mdib.context_state_transaction() as mgr:
            for old in self.mdib.context_states.descriptor_handle.get(PATIENT_DESCRIPTOR, []):
                if old.ContextAssociation == pm_types.ContextAssociation.ASSOCIATED:
                    state = mgr.get_context_state(old.Handle)
                    state.ContextAssociation = pm_types.ContextAssociation.DISASSOCIATED
            if patient is not None:
                state = mgr.mk_context_state(PATIENT_DESCRIPTOR, set_associated=True)
                state.Identification = [pm_types.InstanceIdentifier(root="1.2.3.4", extension_string=patient)]

    def _set_location(self, bed: str) -> None:
        with self.mdib.context_state_transaction() as mgr:
            state = mgr.mk_context_state(LOCATION_DESCRIPTOR, set_associated=True)
            state.LocationDetail = pm_types.LocationDetail(poc="ICU1", room="R3", bed=bed, facility="HOSP")

    # -- the waveform ---------------------------------------------------------------------------
    def _stream(self) -> None:
        if self._next_t_s is None:
            self._next_t_s = time.time()
        report = 0
        next_send = time.monotonic()
        while not self._stop.is_set():
            # 47..53 samples, as monitors' report sizes vary; the times stay contiguous
            n = self.per_report + (report % 7) - 3
            report += 1
            idx = (self._position + np.arange(n)) % len(self.signal)
            values = np.round(self.signal[idx], 4)
            samples = [Decimal(f"{v:.4f}") for v in values]
            t0 = self._next_t_s
            with self._lock:
                valid, patient = self.valid, self.patient
                validity = pm_types.MeasurementValidity.VALID if valid else pm_types.MeasurementValidity.INVALID
                with self.mdib.rt_sample_state_transaction() as mgr:
                    state = mgr.get_state(ECG_HANDLE)
                    if state.MetricValue is None:
                        state.mk_metric_value()
                    state.MetricValue.Samples = samples
                    state.MetricValue.DeterminationTime = t0
                    state.MetricValue.MetricQuality.Validity = validity
                self.sent.append(SentReport(t0, np.array([float(s) for s in samples]), valid, patient))
            self._position += n
            self._next_t_s = t0 + n / self.fs
            next_send += self.interval_s
            self._stop.wait(max(0.0, next_send - time.monotonic()))

    def sent_where(self, pred) -> list[SentReport]:
        with self._lock:
            return [r for r in self.sent if pred(r)]
