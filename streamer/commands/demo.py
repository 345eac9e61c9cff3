"""The end-to-end demo: embedded broker, a worker process, synthetic beds replayed, flags printed live.

Everything runs on 127.0.0.1 and stops by itself. Uses the SYNTHETIC demo checkpoint unless
STREAMER_MODEL__CHECKPOINT points at the released file.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson

from streamer.client import MessageError, decode_episode, decode_flag
from streamer.commands.watch import format_episode, format_flag
from streamer.kafka.broker import EmbeddedBroker, free_port
from streamer.kafka.clients import ensure_topics, make_consumer
from streamer.offline.evaluation import auroc, confusion
from streamer.offline.recordings import parse_start
from streamer.offline.replay import replay, synthetic_fleet
from streamer.settings import load_settings
from streamer.synthetic import ARTIFACT_SHARE
from streamer.windows.segmentation import segment

OUT = Path(os.environ.get("STREAMER_DEMO_OUT", "demo-out"))


async def _collect(k, expected: int, stop: asyncio.Event, flags: list, episodes: list) -> None:
    consumer = make_consumer(k, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    consumer.subscribe([k.flags_topic, k.episodes_topic])
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200)
            for tp, records in batch.items():
                for r in records:
                    try:  # the readers' checks: the demo's own worker wrote these, but a topic is a topic
                        decoded = (decode_flag if tp.topic == k.flags_topic else decode_episode)(r.value)
                    except MessageError as exc:
                        print(f"unreadable record at {tp.topic}[{tp.partition}]@{r.offset}: {exc}", flush=True)
                        continue
                    doc = orjson.loads(r.value)
                    if tp.topic == k.flags_topic:
                        flags.append(doc)
                        print(format_flag(decoded), flush=True)
                    elif not doc.get("renewal"):  # lease renewals change nothing on screen
                        episodes.append(doc)
                        print(format_episode(decoded), flush=True)
            if len({(f["patient_id"], f["window_start_ns"]) for f in flags}) >= expected:
                return
    finally:
        await consumer.stop()


def run_demo(beds: int = 6, duration_s: float = 90.0, speed: float = 4.0, seed: int = 1) -> int:
    OUT.mkdir(exist_ok=True)
    settings = load_settings()
    k = settings.kafka
    print(f"== streamer demo: {beds} synthetic beds x {duration_s:.0f}s at {speed:g}x real time ==", flush=True)
    with EmbeddedBroker(log_path=OUT / "broker.log") as broker:
        k.bootstrap_servers = broker.bootstrap
        asyncio.run(ensure_topics(k, partitions=4))
        print(f"broker   {broker.bootstrap} (embedded Tansu, memory storage)", flush=True)
        env = dict(os.environ, STREAMER_MODEL__ALLOW_DEMO="true",  # the demo asks for the demo model
                   STREAMER_KAFKA__BOOTSTRAP_SERVERS=broker.bootstrap, STREAMER_LOG_FORMAT="json",
                   STREAMER_BATCHING__MAX_WAIT_MS="100")
        log = open(OUT / "worker.log", "wb")
        view = None
        worker = subprocess.Popen([sys.executable, "-m", "streamer", "run"], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            if not _wait_for(OUT / "worker.log", b"partition_assigned", worker, 120):
                print("worker did not start; see demo-out/worker.log", file=sys.stderr)
                return 1
            model_line = next(ln for ln in (OUT / "worker.log").read_bytes().splitlines() if b"model_loaded" in ln)
            print(f"worker   pid {worker.pid}, model {orjson.loads(model_line)['model_id']}", flush=True)
            view_port = free_port()
            view = subprocess.Popen([sys.executable, "-m", "streamer", "view", "--port", str(view_port)], env=env,
                                    stdout=open(OUT / "view.log", "wb"), stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
            if _wait_for(OUT / "view.log", b"ward view: http", view, 60):  # its one line with this start's token
                url = next(ln for ln in (OUT / "view.log").read_bytes().splitlines() if ln.startswith(b"ward view: "))
                print(f"view     {url[11:].decode()}  (the ward page, live while the demo runs)", flush=True)
            fleet = synthetic_fleet(beds, duration_s, parse_start(time.strftime("%Y-%m-%dT%H:%M:%SZ")),
                                    seed=seed, rates=(500.0, 360.0, 250.0))
            truth = {}  # the windows docs/preprocessing.md's segmentation makes, labelled by injected artifacts
            for src, ecg in fleet:
                for w in segment(src.recording.times_ns):
                    share = ecg.artifact_mask[w.first:w.stop].mean()
                    truth[(src.patient_id, w.start_ns)] = bool(share >= ARTIFACT_SHARE)

            async def main():
                flags, episodes = [], []
                stop = asyncio.Event()
                collector = asyncio.create_task(_collect(k, len(truth), stop, flags, episodes))
                await replay(k, [src for src, _ in fleet], speed=speed, chunk_s=0.25)
                try:
                    await asyncio.wait_for(asyncio.shield(collector), 120)
                except asyncio.TimeoutError:
                    pass
                stop.set()
                await collector
                return flags, episodes

            flags, episodes = asyncio.run(main())
        finally:
            if view is not None:
                view.send_signal(signal.SIGTERM)
                try:
                    view.wait(10)
                except subprocess.TimeoutExpired:
                    view.kill()
            worker.send_signal(signal.SIGTERM)
            try:
                code = worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
                code = -9
    return _summary(flags, episodes, truth, code)


def _wait_for(path: Path, needle: bytes, proc: subprocess.Popen, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_bytes():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False


def _summary(flags: list, episodes: list, truth: dict, worker_code: int) -> int:
    scored = {(f["patient_id"], f["window_start_ns"]): f for f in flags if f["status"] == "scored"}
    matched = [key for key in truth if key in scored]
    y = np.array([truth[key] for key in matched])
    p = np.array([scored[key]["probability"] for key in matched])
    c = confusion(y, p >= flags[0]["threshold"]) if flags else None
    print("\n== summary ==")
    print(f"windows expected {len(truth)}, flagged {len(matched)}, lost {len(truth) - len(matched)}; "
          f"episodes published {len(episodes)}; worker exit code {worker_code}")
    if c is not None and len(matched):
        print(f"agreement with injected artifacts: AU-ROC {auroc(y, p):.3f}, sensitivity {c.sensitivity:.2f}, "
              f"specificity {c.specificity:.2f}, accuracy {c.accuracy:.2f} (chance: {max(y.mean(), 1 - y.mean()):.2f})")
        lat = np.array([f["latency_ms"] for f in flags])
        print(f"flag latency (last sample received -> flag produced): p50 {np.percentile(lat, 50):.0f} ms, "
              f"p99 {np.percentile(lat, 99):.0f} ms")
    ok = len(matched) == len(truth) and worker_code == 0
    print("demo OK" if ok else "demo FAILED", flush=True)
    return 0 if ok else 1
