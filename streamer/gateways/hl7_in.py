"""`streamer gateway hl7`: an MLLP receiver (python-hl7's asyncio streams) that turns IHE PCD-01 waveform
messages into input records (docs/gateways.md).

Invariants:
- `MSA|AA` is written only after `ConfirmedSink.deliver` returned: the brokers hold every sample of the
  message. A message it cannot use is answered AE/AR with an ERR naming the reason (and dead-lettered when
  it holds patient data); when Kafka refuses, the message is answered AE "not stored" and the gateway
  stops with exit 1 and a one-line reason. No message, however built, ends a connection's handler by an
  exception or the server.
- Memory is bounded: a connection holds at most about twice --max-message-bytes (python-hl7's reader is an
  asyncio StreamReader with that limit: it pauses reading beyond it, and an oversize frame is dropped,
  answered AR and the connection closed, since its framing is lost); at most --max-connections are served
  (one more is closed at once and counted); a silent one is closed after --idle-timeout; the segment
  state is an LRU of at most --max-beds beds.
- Segments (`Segments`): a bed's segment_start_ns moves only where its signal really breaks: a gap of more
  than half a sample period, another rate, the first valid data after an INOP or invalid status, a wave
  before the segment's first sample. A resent message (all its samples already covered) and a partial
  overlap keep the segment's start, so the worker's window grid never shifts for a resend.
- Restart: before listening, each bed's segment is resumed from the newest --resume-records records of each
  input partition (read_committed, no group; a record that does not decode is skipped). A read that fails
  (no READ ACL on the input, brokers unreachable) is logged as an error, counted, and the gateway serves
  anyway: each bed's first message then starts a new segment, as without resume. A gateway that cannot
  resume must still take a bed's data; a shifted window grid costs a truncated window, a refused
  monitor costs the signal.
- SIGINT/SIGTERM: stop accepting, close idle connections, let messages in flight finish (delivered and
  ACKed), close the producer, exit 0.
"""

from __future__ import annotations

import asyncio
import sys
import ssl
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass

from streamer.errors import SettingsError
from streamer.gateways.pcd01 import Header, Pcd01, Refusal, holds_patient_data, parse_pcd01, read_header
from streamer.gateways.sink import ConfirmedSink, SinkFailed
from streamer.ingest.contract import Chunk
from streamer.netaddr import is_loopback
from streamer.lifecycle import stop_on_signals
from streamer.logs import get_logger, json_logs, patient_ref
from streamer.settings import Settings

log = get_logger("streamer.gateways.hl7")

DEFAULT_RESUME_RECORDS = 2000  # per input partition: 8 partitions hold 16000 bed-seconds of 1 s messages

# HL7 table 0357 (message error condition codes) for ERR-3
_ERR_CODES = {"AR": ("200", "Unsupported message type"), "AE": ("207", "Application internal error")}
_ERR_BY_REASON = {"not_hl7": ("100", "Segment sequence error"), "no_patient": ("101", "Required field missing"),
                  "no_patient_or_bed": ("101", "Required field missing"), "no_rate": ("101", "Required field missing"),
                  "no_time": ("101", "Required field missing"), "unknown_unit": ("103", "Table value not found"),
                  "bad_value": ("102", "Data type error"), "bad_time": ("102", "Data type error"),
                  "unsupported_message": ("200", "Unsupported message type")}


def tls_context(args) -> ssl.SSLContext | None:
    """The server's TLS context from --tls-cert/--tls-key (and --tls-ca: client certificates required);
    SettingsError (exit 2) for a half configuration, a file that does not load, or a bind beyond loopback
    without TLS unless --allow-plain-mllp."""
    host = args.listen[0]
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SettingsError("--tls-cert and --tls-key go together")
    if args.tls_ca and not args.tls_cert:
        raise SettingsError("--tls-ca (client certificates) needs --tls-cert and --tls-key")
    if not args.tls_cert:
        if not is_loopback(host) and not getattr(args, "allow_plain_mllp", False):
            raise SettingsError(f"--listen {host} takes patient data from beyond this machine: it needs --tls-cert "
                                "and --tls-key (and --tls-ca for client certificates), or --allow-plain-mllp on a "
                                "network that is itself protected (docs/security.md)")
        return None
    try:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        if args.tls_ca:
            ctx.load_verify_locations(cafile=args.tls_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"--tls-cert/--tls-key/--tls-ca do not load: {exc}") from None
    return ctx


@dataclass(slots=True)
class _Segment:
    start_ns: int  # its first sample: every chunk of it carries this segment_start_ns
    next_t0_ns: int  # where the next sample is due: the end of what it covered so far
    fs: float
    broken: bool = False  # an INOP or invalid wave came since: the next valid data starts a segment


# segments remembered per bed: the current one and the one before it, so that a lone message back in time
# (which starts a segment of its own) does not cut the bed's stream when the next message continues it
_REMEMBERED = 2


class Segments:
    """Each bed's segment, an LRU of at most `cap` beds (a bed forgotten starts a new segment, which is
    always correct: only a needless one).

    A lead-II wave is placed against the bed's remembered segments at its rate (newest first), `half` being
    half a sample period:
    - it continues a segment when its first sample is due there (within `half`), or when it starts inside
      what the segment covered and ends past it (a partial overlap): same segment start, the segment
      extended to the wave's end; not after an INOP or invalid wave (the segment is broken);
    - it is a resend when all its samples fall within what a segment covered (from its start to its end,
      within `half`): same segment start, the segment unchanged (the worker takes duplicate samples once,
      first write wins). A central station resends a message whose ACK it missed, and one the gateway
      stored before it died;
    - anything else starts a new segment at its first sample: a gap of more than half a sample, another
      rate, the first valid data after an INOP, or a wave that begins before the segment's first sample
      (a clock stepped back, a backfill: the worker refuses it as an older timeline until enough records
      confirm it). The segment it replaces is still remembered, so when the next message continues that
      one, the bed's stream is not cut by a lone outlier.
    Times alone cannot tell a resend from a monitor clock stepped back by less than the segment covered:
    such samples are placed as resends (the worker counts them as duplicates) and the segment continues.

    `resume` rebuilds the segments from the newest input records (a gateway restart), so a bed's first
    message after a restart continues its segment as if the gateway had not stopped."""

    def __init__(self, cap: int):
        self.cap = cap
        self._beds: OrderedDict[str, list[_Segment]] = OrderedDict()  # newest segment first
        self.forgotten = 0
        self.resends = 0  # waves wholly within what their segment covered

    def chunks(self, pcd: Pcd01) -> list[Chunk]:
        """The message's lead-II waves as chunks; updates the bed's segments. Call in delivery order."""
        out = []
        for wave in pcd.waves:
            segs = self._beds.get(pcd.key)
            if wave.samples_mv is None:
                for seg in segs or ():
                    seg.broken = True
                continue
            n = len(wave.samples_mv)
            end_ns = wave.t0_ns + round(n * 1e9 / wave.fs)
            seg = self._place(segs or [], wave.t0_ns, end_ns, wave.fs)
            if seg is None:
                seg = _Segment(wave.t0_ns, end_ns, wave.fs)
            self._remember(pcd.key, seg)
            out.append(Chunk(pcd.key, "II", wave.t0_ns, wave.fs, wave.samples_mv, None, seg.start_ns))
        self._bound()
        return out

    def _place(self, segs: list[_Segment], t0_ns: int, end_ns: int, fs: float) -> _Segment | None:
        """The remembered segment the wave [t0_ns, end_ns) belongs to (extended when it continues one), or
        None: it starts a new one."""
        half = 0.5e9 / fs
        for seg in segs:
            if seg.fs != fs or t0_ns < seg.start_ns - half:
                continue
            if end_ns <= seg.next_t0_ns + half:
                self.resends += 1
                return seg  # a resend: already covered, nothing moves
            if not seg.broken and t0_ns <= seg.next_t0_ns + half:
                seg.next_t0_ns = end_ns  # due here, or a partial overlap that ends past the covered range
                return seg
        return None

    def _remember(self, key: str, seg: _Segment) -> None:
        segs = self._beds.get(key)
        if segs is None:
            segs = self._beds[key] = []
        if not segs or segs[0] is not seg:
            segs[:] = [seg, *(g for g in segs if g is not seg)][:_REMEMBERED]
        self._beds.move_to_end(key)

    def _bound(self) -> None:
        while len(self._beds) > self.cap:
            self._beds.popitem(last=False)
            self.forgotten += 1

    def resume(self, chunk: Chunk) -> bool:
        """Take one input record (decoded, of the newest ones, in each partition's order) as what this
        gateway last stored of its bed: its segment becomes the bed's current one, covering up to the
        record's end (or further, when records of it before reached further, e.g. a resend came last).
        A record the HL7 gateway would not have written (another lead, no segment start, a segment start
        after its first sample) is not taken: False."""
        if chunk.lead != "II" or chunk.segment_start_ns is None or not len(chunk.samples):
            return False
        half = 0.5e9 / chunk.fs
        if chunk.segment_start_ns > chunk.t0_ns + half:
            return False
        end_ns = chunk.t0_ns + round(len(chunk.samples) * 1e9 / chunk.fs)
        segs = self._beds.get(chunk.patient_id) or []
        seg = next((g for g in segs if g.start_ns == chunk.segment_start_ns and g.fs == chunk.fs), None)
        if seg is None:
            seg = _Segment(chunk.segment_start_ns, end_ns, chunk.fs)
        else:
            seg.next_t0_ns = max(seg.next_t0_ns, end_ns)
        self._remember(chunk.patient_id, seg)
        self._bound()
        return True


async def resume_segments(s: Settings, segments: Segments, per_partition: int, idle_timeout_s: float = 30.0,
                          topic: str | None = None) -> Counter[str]:
    """Feed `segments` the newest `per_partition` records of each partition of the input topic this gateway
    writes (read_committed, no consumer group, nothing committed), in each partition's order (a bed's
    records are in one partition). Records are hostile: one that does not decode is skipped and counted.
    Returns counts (records, resumed, skipped); raises what the brokers raise (KafkaError: no READ ACL,
    unreachable), or TimeoutError after `idle_timeout_s` without progress."""
    from aiokafka import TopicPartition

    from streamer.ingest.contract import InvalidMessage, decode
    from streamer.kafka.clients import make_consumer, partition_counts

    k = s.kafka
    topic = topic or k.input_topics[0]
    counts: Counter[str] = Counter()
    if per_partition <= 0:
        return counts
    count = (await asyncio.wait_for(partition_counts(k, [topic]), idle_timeout_s)).get(topic, 0)
    tps = [TopicPartition(topic, p) for p in range(count)]
    if not tps:
        return counts
    consumer = make_consumer(k, group_id=None, auto_offset_reset="earliest", client_id=f"{k.client_id}-hl7-resume")
    await asyncio.wait_for(consumer.start(), idle_timeout_s)
    beds: set[str] = set()
    try:
        consumer.assign(tps)
        firsts = await asyncio.wait_for(consumer.beginning_offsets(tps), idle_timeout_s)
        ends = await asyncio.wait_for(consumer.end_offsets(tps), idle_timeout_s)  # read_committed: stable ends
        remaining = set()
        for tp in tps:
            if ends[tp] > firsts[tp]:
                consumer.seek(tp, max(firsts[tp], ends[tp] - per_partition))
                remaining.add(tp)
        deadline = time.monotonic() + idle_timeout_s
        while remaining:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no progress for {idle_timeout_s:g} s reading the input's tail "
                                   f"({len(remaining)} partitions unfinished)")
            batch = await consumer.getmany(*remaining, timeout_ms=200)
            now_ns = time.time_ns()
            for tp, records in batch.items():
                deadline = time.monotonic() + idle_timeout_s
                for r in records:
                    if r.offset >= ends[tp]:
                        break
                    counts["records"] += 1
                    try:
                        chunk = decode(r.key, r.value, s.windows, now_ns)
                    except InvalidMessage:
                        counts["skipped"] += 1
                        continue
                    if segments.resume(chunk):
                        beds.add(chunk.patient_id)
                    else:
                        counts["skipped"] += 1
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()
    counts["resumed"] = len(beds)
    return counts


def _escape(text: str) -> str:
    """Text put into an ACK field (our own separators |^~\\&)."""
    out = text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\").replace("&", "\\T\\")
    return "".join(c for c in out.replace("~", "\\R\\") if c.isprintable())


def _now_dtm() -> str:
    t = time.time()
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}+0000"


class Hl7Gateway:
    def __init__(self, sink: ConfirmedSink, s: Settings, key_by: str = "patient", max_connections: int = 256,
                 max_message_bytes: int = 1 << 20, idle_timeout_s: float = 300.0, max_beds: int = 10000,
                 naive_times: str = "refuse"):
        self.sink = sink
        self.windows = s.windows
        self.key_by = key_by
        self.max_connections = max_connections
        self.max_message_bytes = max_message_bytes
        self.idle_timeout_s = idle_timeout_s
        self.naive_times = naive_times
        self.segments = Segments(max_beds)
        self.counts: Counter[str] = Counter()  # messages by outcome, refusals by reason, connections refused
        self.failure: str | None = None  # why the gateway stops with exit 1
        self.stopping = asyncio.Event()
        self._connections: dict[asyncio.Task, list] = {}  # task -> [writer, busy]
        self._acks = 0

    # -- one message ---------------------------------------------------------------------------------
    async def handle(self, raw: bytes, peer: str) -> bytes:
        """The ACK for one MLLP block; never raises (but cancellation)."""
        header = read_header(raw)
        try:
            pcd = parse_pcd01(raw, self.key_by, time.time_ns(), self.windows.max_clock_skew_s,
                              self.windows.min_rate_hz, self.windows.max_rate_hz, self.naive_times)
        except Refusal as refusal:
            return await self._refuse(raw, header, refusal, peer)
        try:
            chunks = self.segments.chunks(pcd)
        except Exception as exc:  # noqa: BLE001 - a message must never end the handler
            return await self._refuse(raw, header, Refusal("AE", "internal_error", type(exc).__name__), peer)
        if chunks:
            if self.failure is not None:
                return self.ack(header, "AE", "not_stored", "the gateway is stopping: Kafka refused a message")
            try:
                await self.sink.deliver(chunks)
            except SinkFailed as exc:
                self._fail(f"Kafka refused the input records ({exc}); nothing after the last ACK is stored")
                self.counts["not_stored"] += 1
                return self.ack(header, "AE", "not_stored", "Kafka refused the records: not stored")
        for chunk in chunks:
            if chunk.segment_start_ns == chunk.t0_ns:
                log.info("hl7_segment_started", patient=patient_ref(chunk.patient_id), peer=peer)
        self.counts["accepted"] += 1
        self.counts["samples"] += sum(len(c.samples) for c in chunks)
        if any(w.samples_mv is None for w in pcd.waves):
            self.counts["invalid_waves"] += sum(w.samples_mv is None for w in pcd.waves)
        return self.ack(header, "AA")

    async def _refuse(self, raw: bytes, header: Header, refusal: Refusal, peer: str) -> bytes:
        self.counts[f"refused:{refusal.reason}"] += 1
        log.warning("hl7_refused", code=refusal.code, reason=refusal.reason, detail=refusal.detail, peer=peer,
                    control_id=header.control_id[:40])
        if holds_patient_data(raw):
            try:
                await self.sink.dead_letter(raw, None, refusal.reason, refusal.detail, f"hl7:{peer}")
            except SinkFailed as exc:
                self._fail(f"Kafka refused a dead letter ({exc})")
                return self.ack(header, "AE", "not_stored", "Kafka refused the dead letter: not stored")
        return self.ack(header, refusal.code, refusal.reason, refusal.detail)

    def ack(self, h: Header, code: str, reason: str = "", detail: str = "") -> bytes:
        """ACK^R01: MSH with sending and receiving application and facility swapped, MSA, and for AE/AR an
        ERR (table 0357 code, severity E, the reason and detail in ERR-8)."""
        self._acks += 1
        msh = (f"MSH|^~\\&|{h.receiving_app or 'STREAMER'}|{h.receiving_facility}|{h.sending_app}|"
               f"{h.sending_facility}|{_now_dtm()}||ACK^R01^ACK|STREAMER{time.time_ns()}-{self._acks}|"
               f"{h.processing_id or 'P'}|{h.version or '2.6'}")
        text = f"{reason}: {detail}" if detail else reason
        lines = [msh, f"MSA|{code}|{h.control_id}" + (f"|{_escape(text)[:200]}" if code != "AA" else "")]
        if code != "AA":
            err_code, err_text = _ERR_BY_REASON.get(reason, _ERR_CODES.get(code, _ERR_CODES["AE"]))
            lines.append(f"ERR|||{err_code}^{err_text}^HL70357|E||||{_escape(text)[:250]}")
        return ("\r".join(lines) + "\r").encode("utf-8")

    def _fail(self, why: str) -> None:
        if self.failure is None:
            self.failure = why
            log.error("hl7_gateway_failing", error=why, effect="stops: connections closed, exit 1")
            self.stopping.set()

    # -- connections ----------------------------------------------------------------------------------
    async def serve_connection(self, reader, writer) -> None:
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername)
        if len(self._connections) >= self.max_connections or self.stopping.is_set():
            self.counts["connections_refused"] += 1
            log.warning("hl7_connection_refused", peer=peer, why="stopping" if self.stopping.is_set() else
                        f"{self.max_connections} connections already served")
            writer.transport.abort()
            return
        task = asyncio.current_task()
        slot = [writer, False]
        self._connections[task] = slot
        self.counts["connections"] += 1
        log.info("hl7_connected", peer=peer, tls=writer.get_extra_info("sslcontext") is not None)
        why = "closed by peer"
        try:
            while not self.stopping.is_set():
                try:
                    raw = await asyncio.wait_for(reader.readblock(), self.idle_timeout_s)
                except asyncio.TimeoutError:
                    why = "idle"
                    self.counts["idle_closed"] += 1
                    break
                except asyncio.IncompleteReadError as exc:
                    why = "closed by peer" if not exc.partial else "closed mid-message"
                    break
                except ValueError:  # python-hl7: the frame outgrew --max-message-bytes; the buffer was dropped
                    self.counts["refused:too_large"] += 1
                    why = "message too large"
                    writer.writeblock(self.ack(Header(), "AR", "too_large",
                                               f"a message over {self.max_message_bytes} bytes"))
                    await asyncio.wait_for(writer.drain(), 10.0)
                    break
                except Exception as exc:  # noqa: BLE001 - InvalidBlockError: bytes outside <VT>...<FS><CR>
                    if type(exc).__name__ != "InvalidBlockError":
                        raise
                    self.counts["refused:bad_frame"] += 1
                    raw = None
                if raw is None:
                    ack = self.ack(Header(), "AR", "bad_frame", "bytes outside an MLLP block <VT>...<FS><CR>")
                else:
                    slot[1] = True
                    ack = await self.handle(raw, peer)
                writer.writeblock(ack)
                await asyncio.wait_for(writer.drain(), self.idle_timeout_s)
                slot[1] = False
        except (ConnectionError, asyncio.TimeoutError, ssl.SSLError) as exc:
            why = type(exc).__name__
        except Exception as exc:  # noqa: BLE001 - the last line of defence: one connection, never the server
            why = f"internal error {type(exc).__name__}"
            self.counts["internal_errors"] += 1
            log.error("hl7_connection_failed", peer=peer, error=type(exc).__name__)
        finally:
            self._connections.pop(task, None)
            if why == "message too large":
                writer.transport.abort()  # the rest of the frame may still come: do not read it
            else:
                writer.close()
            log.info("hl7_disconnected", peer=peer, why=why)

    async def serve(self, host: str, port: int, tls: ssl.SSLContext | None):
        from hl7.mllp import start_hl7_server

        return await start_hl7_server(self.serve_connection, host, port, limit=self.max_message_bytes, ssl=tls,
                                      ssl_handshake_timeout=10.0 if tls else None, encoding="utf-8")

    async def close_connections(self, timeout_s: float = 30.0) -> None:
        """Idle connections are closed now; busy ones once their message is answered."""
        for writer, busy in list(self._connections.values()):
            if not busy:
                writer.close()
        tasks = list(self._connections)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)


async def _run(args, s: Settings, tls: ssl.SSLContext | None) -> int:
    host, port = args.listen
    sink = await ConfirmedSink.open(s.kafka, encoding=getattr(args, "encoding", "json"))
    gateway = Hl7Gateway(sink, s, args.key_by, args.max_connections, args.max_message_bytes, args.idle_timeout,
                         getattr(args, "max_beds", 10000), getattr(args, "naive_times", "refuse"))
    stop_on_signals(asyncio.get_running_loop(), gateway.stopping.set)
    await _resume(gateway, s, getattr(args, "resume_records", DEFAULT_RESUME_RECORDS))
    try:
        server = await gateway.serve(host, port, tls)
    except OSError as exc:
        await sink.close()
        raise SettingsError(f"--listen {host}:{port}: cannot listen ({exc.strerror or exc})") from None
    bound = server.sockets[0].getsockname()
    print(f"listening={bound[0]}:{bound[1]}", flush=True)
    log.info("hl7_gateway_ready", host=bound[0], port=bound[1], tls=tls is not None,
             client_certificates=bool(tls and tls.verify_mode == ssl.CERT_REQUIRED), key_by=args.key_by,
             topic=s.kafka.input_topics[0])
    if tls is None and not is_loopback(host):
        log.warning("hl7_plain_mllp", host=host, risk="anyone on this network can read and forge patient "
                    "waveforms: use TLS with client certificates (--tls-cert, --tls-key, --tls-ca)")
    try:
        await gateway.stopping.wait()
    finally:
        server.close()
        await gateway.close_connections()
        await sink.close()
    gateway.counts["resent_waves"] = gateway.segments.resends
    summary = _log_safe(gateway.counts)
    if gateway.failure is not None:
        log.error("hl7_gateway_stopped", error=gateway.failure, exit_code=1, **summary)
        if not json_logs():
            print(f"streamer gateway hl7: {gateway.failure}", file=sys.stderr, flush=True)
        return 1
    log.info("hl7_gateway_stopped", exit_code=0, **summary)
    return 0


async def _resume(gateway: Hl7Gateway, s: Settings, per_partition: int, idle_timeout_s: float = 30.0) -> None:
    """Resume each bed's segment from the input's tail; on any failure log it loudly, count it and go on
    (the module's invariants say why a gateway serves without its segments rather than not at all)."""
    if per_partition <= 0:
        log.info("hl7_resume_disabled", effect="each bed's first message starts a new segment")
        return
    started = time.monotonic()
    try:
        counts = await resume_segments(s, gateway.segments, per_partition, idle_timeout_s)
    except Exception as exc:  # noqa: BLE001 - whatever stops the resume must not stop the gateway
        from streamer.kafka.acls import authorization_fix

        gateway.counts["resume_failed"] += 1
        fix = authorization_fix(exc, s.kafka, "gateway")
        log.error("hl7_resume_failed", error=f"{type(exc).__name__}: {str(exc)[:200]}", **({"fix": fix} if fix else {}),
                  effect="serving without resumed segments: each bed's first message starts a new segment, "
                         "the worker reports the window across it truncated and cuts later ones on a new grid")
        return
    gateway.counts["resumed_beds"] = counts["resumed"]
    gateway.counts["resume_skipped"] = counts["skipped"]
    log.info("hl7_segments_resumed", beds=counts["resumed"], records=counts["records"], skipped=counts["skipped"],
             seconds=round(time.monotonic() - started, 2))


def _log_safe(counts: dict) -> dict:
    return {k.replace(":", "_"): v for k, v in counts.items()}


def run_hl7_gateway(args, s: Settings) -> int:
    tls = tls_context(args)
    return asyncio.run(_run(args, s, tls))


