"""IHE PCD-01 `ORU^R01` waveform messages (Waveform Content Module) built with hl7apy and validated against
HL7 v2.6 (strict), in the shapes monitor gateways send: counts with an MDC_ATTR_NU_MSMT_RES resolution,
mV floats, name-only codes (0^MDC_ECG_ELEC_POTL_II), vendor names, grouped waves (lead II, another lead and
pleth in one message, told apart by dotted OBX-4 sub-ids), INOP. Generated, never copied from captures."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

MV = "266418^MDC_DIM_MILLI_VOLT^MDC"
UV = "266419^MDC_DIM_MICRO_VOLT^MDC"
DIMLESS = "262656^MDC_DIM_DIMLESS^MDC"
PER_SEC = "264608^MDC_DIM_PER_SEC^MDC"
LEAD_II = "131330^MDC_ECG_ELEC_POTL_II^MDC"
LEAD_II_NAME_ONLY = "0^MDC_ECG_ELEC_POTL_II^MDC"
LEAD_I = "131329^MDC_ECG_ELEC_POTL_I^MDC"
PLETH = "150452^MDC_PULS_OXIM_PLETH^MDC"


def dtm(t_ns: int, offset_minutes: int = 0, digits: int = 4) -> str:
    """HL7 DTM of an epoch time in ns, in the local time of `offset_minutes` east of UTC, with `digits`
    fractional digits (t_ns must be a multiple of 10**(9-digits))."""
    assert t_ns % 10 ** (9 - digits) == 0, "the fixture's time needs more digits"
    local = t_ns + offset_minutes * 60 * 10**9
    seconds, frac = divmod(local, 10**9)
    sign = "+" if offset_minutes >= 0 else "-"
    hh, mm = divmod(abs(offset_minutes), 60)
    text = time.strftime("%Y%m%d%H%M%S", time.gmtime(seconds))
    if digits:
        text += "." + str(frac).rjust(9, "0")[:digits]
    return f"{text}{sign}{hh:02d}{mm:02d}"


@dataclass
class WaveSpec:
    """One NA OBX and its attribute OBXs (rate, resolution, INOP) as dotted children of `subid`."""

    code: str
    values: list[str]
    subid: str = "1.1.1.1"
    unit: str = MV
    rate: str | None = "500"
    rate_code: str = "0^MDC_ATTR_SAMP_RATE^MDC"
    resolution: str | None = None
    resolution_unit: str = MV
    inop: bool = False
    status: str = "F"
    time: str | None = None  # OBX-14


@dataclass
class MessageSpec:
    control_id: str
    waves: list[WaveSpec] = field(default_factory=list)
    patient: str | None = "MRN-1001"
    bed: str | None = "ICU^12^1"
    msh_time: str = "20260101120000+0000"
    obr_time: str | None = None


def build(spec: MessageSpec, validate: bool = True) -> bytes:
    """The ER7 bytes of a validated ORU^R01 (segments separated by CR, as MLLP carries them)."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.core import Message

    m = Message("ORU_R01", version="2.6",
                validation_level=VALIDATION_LEVEL.STRICT if validate else VALIDATION_LEVEL.TOLERANT)
    m.msh.msh_3 = "CENTRAL^0012A1FFFE001234^EUI-64"
    m.msh.msh_4 = "ICU-NORTH"
    m.msh.msh_5 = "STREAMER"
    m.msh.msh_6 = "HOSPITAL"
    m.msh.msh_7 = spec.msh_time
    m.msh.msh_9 = "ORU^R01^ORU_R01"
    m.msh.msh_10 = spec.control_id
    m.msh.msh_11 = "P"
    m.msh.msh_21 = "IHE_PCD_001^IHE PCD^1.3.6.1.4.1.19376.1.6.1.1.1^ISO"
    result = m.add_group("ORU_R01_PATIENT_RESULT")
    patient = result.add_group("ORU_R01_PATIENT")
    patient.pid.pid_3 = f"{spec.patient or ''}^^^HOSP^MR"
    patient.pid.pid_5 = "Doe^Jane"
    if spec.bed is not None:
        visit = patient.add_group("ORU_R01_VISIT")
        visit.pv1.pv1_2 = "I"
        visit.pv1.pv1_3 = spec.bed
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    order.obr.obr_1 = "1"
    order.obr.obr_3 = f"{spec.control_id}^CENTRAL"
    order.obr.obr_4 = "69122^MDC_DEV_ANALY_CARD_VMD^MDC"
    if spec.obr_time:
        order.obr.obr_7 = spec.obr_time
    n = 0

    def obx(value_type: str, code: str, subid: str, value: str, unit: str | None, status: str,
            when: str | None = None) -> None:
        nonlocal n
        n += 1
        o = order.add_group("ORU_R01_OBSERVATION").obx
        o.obx_1, o.obx_2, o.obx_3, o.obx_4 = str(n), value_type, code, subid
        if value:
            o.obx_5 = value
        if unit:
            o.obx_6 = unit
        o.obx_11 = status
        if when:
            o.obx_14 = when

    for w in spec.waves:
        obx("NA", w.code, w.subid, "^".join(w.values), w.unit, w.status, w.time)
        k = 0
        if w.rate is not None:
            k += 1
            obx("NM", w.rate_code, f"{w.subid}.{k}", w.rate, PER_SEC, "F")
        if w.resolution is not None:
            k += 1
            obx("NM", "0^MDC_ATTR_NU_MSMT_RES^MDC", f"{w.subid}.{k}", w.resolution, w.resolution_unit, "F")
        if w.inop:
            k += 1
            obx("ST", "196660^MDC_EVT_INOP^MDC", f"{w.subid}.{k}", "MDC_EVT_ECG_LEAD_OFF", None, "F")
    if validate:
        assert m.validate()
    return m.to_er7().encode("utf-8")


def ecg_mv(n: int, seed: int = 0, start: int = 0) -> np.ndarray:
    """A plausible lead-II trace in mV, rounded to the microvolt (what monitors resolve)."""
    rng = np.random.default_rng(seed)
    t = (np.arange(n) + start) / 500.0
    beat = np.exp(-((t % 0.8) - 0.3) ** 2 / 0.0004) * 1.2 - 0.1 * np.sin(2 * np.pi * 0.3 * t)
    return np.round(beat + rng.normal(0, 0.01, n), 3)


def mv_text(samples_mv: np.ndarray) -> list[str]:
    return [f"{v:.3f}" for v in samples_mv]


def counts_text(samples_mv: np.ndarray, resolution_mv: float) -> list[str]:
    return [str(int(c)) for c in np.round(samples_mv / resolution_mv)]


def lead_ii_message(control_id: str, t0_ns: int, samples_mv: np.ndarray, shape: str = "mv",
                    patient: str | None = "MRN-1001", fs: float = 500.0, inop: bool = False,
                    others: bool = False, offset_minutes: int = 0, **kw) -> tuple[bytes, np.ndarray]:
    """A message carrying lead II from t0, in one of the shapes (`mv`: mV floats with the MDC code;
    `counts`: integer counts with a 0.005 mV resolution, unit MDC_DIM_DIMLESS; `name_only`: code 0 and the
    MDC name; `vendor`: the name "ECG II"; `uv`: microvolt integers), and with `others` lead I and pleth
    around it in sibling OBX-4 groups with their own (different) rate and resolution. Returns the bytes and
    the mV values the gateway must deliver."""
    when = dtm(t0_ns, offset_minutes)
    rate = f"{fs:g}"
    if shape == "counts":
        res = 0.005
        text = counts_text(samples_mv, res)
        expected = np.array([int(c) for c in text], dtype=np.float64) * res
        wave = WaveSpec(LEAD_II, text, "1.1.1.1002", DIMLESS, rate, resolution=f"{res}", time=when, inop=inop)
    elif shape == "uv":
        text = [str(int(round(v * 1000))) for v in samples_mv]
        expected = np.array([int(v) for v in text], dtype=np.float64) * 1e-3
        wave = WaveSpec(LEAD_II, text, "1.1.1.1002", UV, rate, time=when, inop=inop)
    else:
        text = mv_text(samples_mv)
        expected = np.array([float(v) for v in text])
        code = {"mv": LEAD_II, "name_only": LEAD_II_NAME_ONLY, "vendor": "ECG II"}[shape]
        wave = WaveSpec(code, text, "1.1.1.1002", MV, rate, time=when, inop=inop)
    waves = [wave]
    if others:
        lead_i = WaveSpec(LEAD_I, counts_text(samples_mv[::-1], 0.01), "1.1.1.1001", DIMLESS, "250",
                          resolution="0.01", time=when)
        pleth = WaveSpec(PLETH, [str(i % 97) for i in range(len(samples_mv) // 4)], "1.2.1.1",
                         DIMLESS, "125", resolution="0.5", resolution_unit=DIMLESS, time=when)
        waves = [lead_i, wave, pleth]
    spec = MessageSpec(control_id, waves, patient=patient, **kw)
    # v2.6 requires PID-3.1: a message without a patient id (a bed-keyed monitor) cannot pass validation
    return build(spec, validate=patient is not None), (None if inop else expected)
