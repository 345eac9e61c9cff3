"""IHE PCD ACM PCD-04 (`ORU^R40^ORU_R40`, HL7 v2.6): one message per phase of a bed's "ECG signal artifact"
technical alert, and the check of the alarm manager's ACK. Pure: no I/O, no clock (times are passed in).

Content (docs/gateways.md, "Alerts to an alarm manager"):
- MSH: ORU^R40^ORU_R40, processing ID P, version 2.6, accept ACK AL, application ACK NE, UTF-8, and the
  IHE PCD ACM profile id in MSH-21.
- PID-3 the patient id (the episodes topic's key), PV1-2 "I" (the bed is the patient id's business:
  the gateways key by patient, or by bed where the site chose that).
- OBR-2/3 the alert's unique id (one per episode: a digest of its episode id, so a hostile id cannot
  lengthen or shape it), OBR-4 196616^MDC_EVT_ALARM^MDC, OBR-7 the episode's start, OBR-8 its end.
- OBX facets, sub-ids 1.0.0.0.n: the alert (a LOCAL code, `ECG_SIGNAL_ARTIFACT^ECG signal artifact^
  99STREAMER`: we found no MDC event code for "ECG signal artifact", so none is claimed), 68481
  MDC_ATTR_EVENT_PHASE (start / continue / end), 68482 MDC_ATTR_ALARM_STATE (active / inactive), 68483
  MDC_ATTR_ALARM_INACTIVATION_STATE (enabled), 68484 MDC_ATTR_ALARM_PRIORITY (PL: low, never a patient
  alarm), 68485 MDC_ATTR_ALERT_TYPE (ST: technical; SP is physiological, SA advisory), 68546
  MDC_ATTR_ALERT_TEXT.

Every text that came from the topic goes through `escape` (HL7 2.10.4: the five delimiters, and every
control character as a \\Xhh\\ hex escape), so no value can end a field, a component or a segment.
hl7apy 1.3.5 has no ORU_R40 structure in any version; PCD-04 uses ORU_R01's groups (PID, PV1, OBR, OBX),
so each message is built as ORU_R01 v2.6 under hl7apy's STRICT validation (required fields, datatypes,
cardinality) before MSH-9 names it ORU^R40^ORU_R40."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from streamer.logs import printable

PROFILE_ID = "IHE_PCD_ACM_001^IHE PCD^1.3.6.1.4.1.19376.1.6.4.4^ISO"
ALERT_CODE = "ECG_SIGNAL_ARTIFACT^ECG signal artifact^99STREAMER"  # local code: no MDC one exists for it
ALERT_TEXT = "ECG signal artifact (lead II): hold this bed's ECG alarm notifications while active"
SENDING_APP = "STREAMER"
PHASES = ("start", "continue", "end")
_ESCAPES = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\"}
MAX_ACK_BYTES = 64 * 1024  # an ACK is a few hundred bytes: anything longer is refused by the reader


def escape(text: str) -> str:
    """`text` as HL7 v2 field content: the delimiters as escape sequences, control characters (CR, LF, the
    MLLP framing bytes 0x0B and 0x1C) as \\Xhh\\. The result holds none of |^~\\& CR LF unescaped."""
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0:
            out.append(f"\\X{ord(ch):02X}\\")
        else:
            out.append(ch)
    return "".join(out)


def alert_id(episode_id: str) -> str:
    """The alert's id, one per episode: a digest (a hostile episode id neither lengthens nor shapes it)."""
    return "ECGART-" + hashlib.sha256(episode_id.encode("utf-8", "replace")).hexdigest()[:24]


def hl7_time(ns: int) -> str:
    """HL7 DTM to the millisecond, UTC (+0000)."""
    ns = max(ns, 0)
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(ns // 10**9)) + f".{ns // 10**6 % 1000:03d}+0000"


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """One phase of one bed's alert. `episode_id` names the episode (its alert id derives from it);
    `start_ns` is the episode's start (or when the bridge first saw it open, when the record gives none);
    `end_ns` is set for `end`; `reason` says why an alert ends (clean, stale, lapsed, state_lost, ...)."""

    patient_id: str
    episode_id: str
    phase: str
    start_ns: int
    at_ns: int
    end_ns: int | None = None
    reason: str | None = None

    @property
    def active(self) -> bool:
        return self.phase != "end"


def build_alert(event: AlertEvent, control_id: str, now_ns: int) -> str:
    """The PCD-04 message of `event` (ER7, segments joined by CR), validated STRICT as ORU_R01 v2.6.
    `control_id` is MSH-10: the same id for every resend of one message, so a receiver can de-duplicate."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.core import Message

    if event.phase not in PHASES:
        raise ValueError(f"unknown event phase {event.phase!r}")
    m = Message("ORU_R01", version="2.6", validation_level=VALIDATION_LEVEL.STRICT)
    m.msh.msh_3 = SENDING_APP
    m.msh.msh_7 = hl7_time(now_ns)
    m.msh.msh_9 = "ORU^R01^ORU_R01"  # validated as ORU_R01 (hl7apy knows no ORU_R40), renamed below
    m.msh.msh_10 = escape(control_id)
    m.msh.msh_11 = "P"
    m.msh.msh_12 = "2.6"
    m.msh.msh_15 = "AL"
    m.msh.msh_16 = "NE"
    m.msh.msh_18 = "UNICODE UTF-8"
    m.msh.msh_21 = PROFILE_ID
    result = m.add_group("ORU_R01_PATIENT_RESULT")
    patient = result.add_group("ORU_R01_PATIENT")
    pid = patient.add_segment("PID")
    pid.pid_3 = f"{escape(event.patient_id)}^^^{SENDING_APP}^PI"
    pid.pid_5 = "^^^^^^U"  # name unknown to the bridge (required by v2.6: name type U, unspecified)
    patient.add_group("ORU_R01_VISIT").add_segment("PV1").pv1_2 = "I"
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    ident = f"{alert_id(event.episode_id)}^{SENDING_APP}"
    order.obr.obr_1 = "1"
    order.obr.obr_2 = ident
    order.obr.obr_3 = ident
    order.obr.obr_4 = "196616^MDC_EVT_ALARM^MDC"
    order.obr.obr_7 = hl7_time(event.start_ns)
    if event.end_ns is not None:
        order.obr.obr_8 = hl7_time(event.end_ns)
    facets = [
        (ALERT_CODE, ALERT_TEXT),
        ("68481^MDC_ATTR_EVENT_PHASE^MDC", event.phase),
        ("68482^MDC_ATTR_ALARM_STATE^MDC", "active" if event.active else "inactive"),
        ("68483^MDC_ATTR_ALARM_INACTIVATION_STATE^MDC", "enabled"),
        ("68484^MDC_ATTR_ALARM_PRIORITY^MDC", "PL"),
        ("68485^MDC_ATTR_ALERT_TYPE^MDC", "ST"),
        ("68546^MDC_ATTR_ALERT_TEXT^MDC", ALERT_TEXT if event.reason is None
         else f"{ALERT_TEXT} (ended: {escape(event.reason[:40])})"),
    ]
    for n, (code, value) in enumerate(facets, start=1):
        obx = order.add_group("ORU_R01_OBSERVATION").obx
        obx.obx_1 = str(n)
        obx.obx_2 = "ST"
        obx.obx_3 = code
        obx.obx_4 = f"1.0.0.0.{n}"
        obx.obx_5 = value
        obx.obx_11 = "F" if event.phase == "end" else "R"
        obx.obx_14 = hl7_time(event.at_ns)
    m.validate()  # raises hl7apy's ValidationError: a message this module built wrong is never sent
    m.msh.msh_9 = "ORU^R40^ORU_R40"
    return m.to_er7()


@dataclass(frozen=True, slots=True)
class Ack:
    """What an ACK said: `code` AA/CA (accepted), AE/CE (error: resend), AR/CR (rejected: do not resend
    the same), or "invalid" (not an ACK of ours: unparsable, no MSA, or another control id)."""

    code: str
    reason: str

    @property
    def accepted(self) -> bool:
        return self.code in ("AA", "CA")

    @property
    def rejected(self) -> bool:
        return self.code in ("AR", "CR")

    @property
    def error(self) -> bool:
        return self.code in ("AE", "CE")


def check_ack(block: bytes, control_id: str) -> Ack:
    """Read an MLLP block from the alarm manager as the ACK of `control_id`. The block is hostile: any
    parse failure is an "invalid" Ack (never an exception), and the reason is cut and made printable."""
    import hl7
    from hl7.exceptions import HL7Exception

    if len(block) > MAX_ACK_BYTES:
        return Ack("invalid", "ACK too long")
    try:
        msg = hl7.parse(block.decode("utf-8", "replace"))
        msa = msg.segment("MSA")
        code = str(msa[1]).strip().upper()
        acked = str(msa[2]).strip() if len(msa) > 2 else ""
        text = str(msa[3]) if len(msa) > 3 else ""
        if len(text) == 0:
            try:
                text = str(msg.segment("ERR")[8] if len(msg.segment("ERR")) > 8 else msg.segment("ERR"))
            except (KeyError, IndexError):
                text = ""
    except (HL7Exception, KeyError, IndexError, ValueError, TypeError) as exc:  # all mean "not an ACK"
        return Ack("invalid", f"unparsable ACK ({type(exc).__name__})")
    if acked != control_id:
        return Ack("invalid", "ACK of another message")
    if code not in ("AA", "AE", "AR", "CA", "CE", "CR"):
        return Ack("invalid", f"unknown acknowledgment code {printable(code[:8])!r}")
    return Ack(code, printable(text[:200]))
