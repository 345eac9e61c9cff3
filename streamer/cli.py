"""`streamer` command line: broker, run, replay, score, validate, watch, view, demo."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from streamer.errors import SettingsError
from streamer.lifecycle import EarlyStop, ignore_further_stops, install_early_stop, stop_requested

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


def _install_stop(loop: asyncio.AbstractEventLoop, stop) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)


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
def cmd_run(args) -> int:
    """The worker. A stop signal before it consumes anything exits 0 at once (see streamer.lifecycle)."""
    s = _settings(args)
    if args.create_topics:
        s.kafka.create_topics = True
    _log().info("worker_starting", group=s.kafka.group_id, topics=s.kafka.input_topics)
    from streamer.model.errors import ModelError
    from streamer.worker import StartupError, Worker

    worker = Worker(s)

    async def main() -> int:
        _install_stop(asyncio.get_running_loop(), worker.stop)  # from here on the loop owns the signals
        if stop_requested.is_set():
            worker.stop()
        return await worker.run()

    try:
        code = asyncio.run(main())
    except (StartupError, ModelError) as exc:
        _log().error("startup_failed", error=str(exc))
        print(f"streamer run: {exc}", file=sys.stderr)
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
    from streamer.offline.recordings import load_recording, parse_start
    from streamer.offline.replay import Source, replay, synthetic_fleet

    s = _settings(args)
    speed = None if args.speed == "max" else float(args.speed)
    start = args.start or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    sources: list[Source] = []
    if args.synthetic:
        rates = tuple(float(r) for r in args.rates.split(","))
        sources = [src for src, _ in synthetic_fleet(args.synthetic, args.duration, parse_start(start),
                                                     seed=args.seed, rates=rates)]
    for i, path in enumerate(args.recordings):
        rec = load_recording(path, fs=args.fs, start=start, channel=args.channel)
        pid = args.patient[i] if i < len(args.patient) else f"{args.patient[0] if args.patient else Path(path).stem}-{i}"
        sources.append(Source(pid, rec))
    if not sources:
        print("streamer replay: give RECORDING(s) with --patient, or --synthetic N", file=sys.stderr)
        return 2
    sent = asyncio.run(replay(s.kafka, sources, speed=speed, chunk_s=args.chunk_s, encoding=args.encoding,
                              progress=not args.quiet))
    _log().info("replay_done", chunks=sent, sources=len(sources))
    return 0


# -- score ----------------------------------------------------------------------------------------
def cmd_score(args) -> int:
    from streamer.model.errors import ModelError
    from streamer.offline.recordings import RecordingError
    from streamer.offline.score import score_file

    s = _settings(args)
    if args.checkpoint:
        s.model.checkpoint = Path(args.checkpoint)
    if args.threshold is not None:
        s.model.threshold = args.threshold
    try:
        df = score_file(args.recording, s.model, fs=args.fs, start=args.start, channel=args.channel,
                        overlap_s=args.overlap, batch_size=args.batch_size, progress=not args.quiet)
    except (RecordingError, ModelError) as exc:
        print(f"streamer score: {exc}", file=sys.stderr)
        return 2
    if args.patient:
        df.insert(0, "patient_id", args.patient)
    out = Path(args.out)
    df.to_csv(out, index=False)
    print(f"{len(df)} windows, {int(df['artifact'].sum())} flagged as artifact -> {out}")
    return 0


# -- validate -------------------------------------------------------------------------------------
def cmd_validate(args) -> int:
    from streamer.validate import main as validate_main

    s = _settings(args)
    return validate_main(args, s.kafka)


def cmd_synth(args) -> int:
    from streamer.offline.dataset import write_dataset

    paths = write_dataset(Path(args.out), args.patients, args.duration, args.fs, args.seed, args.start,
                          args.artifact_fraction)
    print(f"{len(paths['recordings'])} recordings, labels in {paths['window_labels']} and {paths['intervals']}")
    return 0


# -- watch ----------------------------------------------------------------------------------------
def cmd_watch(args) -> int:
    from streamer.watch import watch

    s = _settings(args)
    return asyncio.run(watch(s.kafka, seconds=args.seconds, from_beginning=args.from_beginning,
                             skew_s=s.episodes.skew_allowance_s))


def cmd_view(args) -> int:
    from streamer.view import ViewServer, Ward

    s = _settings(args)
    server = ViewServer(s.kafka, host=args.host, port=args.port, from_beginning=args.from_beginning,
                        ward=Ward(strip_s=args.strip_s, max_beds=args.max_beds,
                                  skew_s=s.episodes.skew_allowance_s))

    async def main() -> int:
        stop = asyncio.Event()
        _install_stop(asyncio.get_running_loop(), stop.set)
        await server.run(stop)
        return 0

    return asyncio.run(main())


def cmd_acls(args) -> int:
    from streamer.kafka.acls import kafka_acls_commands

    s = _settings(args)
    for line in kafka_acls_commands(s.kafka, args.principal, bootstrap=s.kafka.bootstrap_servers,
                                    config=args.command_config):
        print(line)
    return 0


def cmd_demo(args) -> int:
    from streamer.demo import run_demo

    return run_demo(beds=args.beds, duration_s=args.duration, speed=args.speed, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamer", description=__doc__)
    p.add_argument("--config", help="TOML settings file (else STREAMER_CONFIG)")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (overrides settings)")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("broker", help="start the embedded Kafka-compatible broker on 127.0.0.1")
    b.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    b.add_argument("--partitions", type=int, default=None, help="partitions per topic created")
    b.set_defaults(func=cmd_broker)

    r = sub.add_parser("run", help="run the streaming worker")
    r.add_argument("--create-topics", action="store_true", help="create missing topics (demo/tests)")
    r.set_defaults(func=cmd_run)

    rp = sub.add_parser("replay", help="publish recordings or a synthetic fleet to the input topic")
    rp.add_argument("recordings", nargs="*", help="CSV, .npy, .npz, .parquet or WFDB record")
    rp.add_argument("--patient", action="append", default=[], help="patient id (one per recording)")
    rp.add_argument("--fs", type=float, help="sample rate for recordings without timestamps")
    rp.add_argument("--start", help="ISO time of the first sample (default: now)")
    rp.add_argument("--channel", help="column / lead to use")
    rp.add_argument("--speed", default="1", help="1 = real time, X = X times real time, max = no pacing")
    rp.add_argument("--synthetic", type=int, default=0, metavar="N", help="also replay N synthetic beds")
    rp.add_argument("--duration", type=float, default=60.0, help="seconds per synthetic bed")
    rp.add_argument("--rates", default="500", help="synthetic sample rates, comma separated")
    rp.add_argument("--seed", type=int, default=0)
    rp.add_argument("--chunk-s", type=float, default=0.25, help="seconds per message")
    rp.add_argument("--encoding", choices=["json", "binary", "binary-int16"], default="json")
    rp.add_argument("--quiet", action="store_true")
    rp.set_defaults(func=cmd_replay)

    sc = sub.add_parser("score", help="score a recording offline with the same windows and model path")
    sc.add_argument("recording")
    sc.add_argument("--checkpoint", help="checkpoint .pth (default: settings, else the demo checkpoint)")
    sc.add_argument("--fs", type=float)
    sc.add_argument("--start", help="ISO time of the first sample for recordings with relative time")
    sc.add_argument("--channel", help="column / lead (WFDB: default II, then MLII)")
    sc.add_argument("--overlap", type=float, default=0.0, help="window overlap in seconds")
    sc.add_argument("--threshold", type=float)
    sc.add_argument("--batch-size", type=int, default=64)
    sc.add_argument("--patient", help="patient id written in a patient_id column")
    sc.add_argument("--out", required=True, help="output CSV")
    sc.add_argument("--quiet", action="store_true")
    sc.set_defaults(func=cmd_score)

    v = sub.add_parser("validate", help="metrics, parity and threshold retuning from flags and labels")
    v.add_argument("--flags", required=True, nargs="+",
                   help="flags CSV(s) of streamer score, JSON lines of the flags topic, or kafka:TOPIC")
    v.add_argument("--labels", required=True, help="CSV of window labels or intervals")
    v.add_argument("--patient", default="recording", help="patient id of flags that carry none")
    v.add_argument("--offline", help="streamer score CSV of the same recording(s), for stream/offline parity")
    v.add_argument("--target-sensitivity", type=float)
    v.add_argument("--target-specificity", type=float)
    v.add_argument("--bootstrap-samples", type=int, default=1000)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--report", default="validation.md", help="Markdown report (PNG plots beside it)")
    v.add_argument("--config-out", help="write the retuned threshold as a TOML snippet")
    v.add_argument("--recording", help="the recording, for an ECG strip with flagged windows shaded")
    v.add_argument("--fs", type=float)
    v.add_argument("--start", help="ISO start of the recording (as given to score/replay)")
    v.set_defaults(func=cmd_validate)

    sy = sub.add_parser("synth", help="write seeded synthetic lead-II recordings with artifact labels")
    sy.add_argument("--patients", type=int, default=4)
    sy.add_argument("--duration", type=float, default=300.0, help="seconds per patient")
    sy.add_argument("--fs", type=float, default=500.0)
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--artifact-fraction", type=float, default=0.3)
    sy.add_argument("--start", default="2026-01-01T00:00:00Z")
    sy.add_argument("--out", default="synthetic", help="output folder")
    sy.set_defaults(func=cmd_synth)

    w = sub.add_parser("watch", help="print flags and episodes as they arrive")
    w.add_argument("--seconds", type=float, default=None, help="stop after this long")
    w.add_argument("--from-beginning", action="store_true")
    w.set_defaults(func=cmd_watch)

    vw = sub.add_parser("view", help="live web page of every bed: ECG strip, flags, episodes (127.0.0.1)")
    vw.add_argument("--host", default="127.0.0.1", help="address to serve on (loopback by default)")
    vw.add_argument("--port", type=int, default=8765, help="0 = a free port")
    vw.add_argument("--strip-s", type=float, default=60.0, help="seconds of ECG kept and drawn per bed")
    vw.add_argument("--max-beds", type=int, default=1000)
    vw.add_argument("--from-beginning", action="store_true")
    vw.set_defaults(func=cmd_view)

    a = sub.add_parser("acls", help="print the kafka-acls.sh commands that grant a worker its minimal ACLs")
    a.add_argument("--principal", default="User:streamer", help="the worker's principal (default User:streamer)")
    a.add_argument("--command-config", default="admin.properties", help="the admin client's properties file")
    a.set_defaults(func=cmd_acls)

    d = sub.add_parser("demo", help="end to end on an embedded broker: broker, worker, synthetic beds, flags")
    d.add_argument("--beds", type=int, default=6)
    d.add_argument("--duration", type=float, default=90.0, help="seconds of signal per bed")
    d.add_argument("--speed", type=float, default=4.0, help="times real time")
    d.add_argument("--seed", type=int, default=1)
    d.set_defaults(func=cmd_demo)
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
        print(f"streamer {args.command}: {exc}", file=sys.stderr)
        return 1
    except SettingsError as exc:
        print(f"streamer {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
