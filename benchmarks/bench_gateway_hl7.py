"""`streamer gateway hl7` under load: N simulated monitors at 500 Hz, each sending one PCD-01 message (lead
II as counts with a resolution, lead I and pleth beside it, hl7apy-built and validated once per bed) every
`--period` seconds over its own loopback MLLP connection into one gateway process on Apache Kafka.

Measured per N: messages/s and lead-II samples/s ACKed (AA: Kafka acknowledged them), the added latency
from a message written to its ACK read (p50/p99), the gateway's CPU; N is carried when the ACK rate keeps up
with the send rate (>= 95 %) and the p99 stays under one period. Prints one JSON document.

    python -m benchmarks.bench_gateway_hl7 --beds 10,40,80 --seconds 20 [--period 1.0] [--bootstrap HOST:PORT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import commit, machine


def _templates(beds: int, samples: int) -> list[tuple[str, str]]:
    """Per bed: the validated message with {cid} {t} {values} holes, and its lead-II values text."""
    from tests.hl7_fixtures import ecg_mv, lead_ii_message

    out = []
    for b in range(beds):
        raw, _ = lead_ii_message("CIDHOLE", 1_790_000_000_000_000_000, ecg_mv(samples, seed=b), shape="counts",
                                 patient=f"BENCH-{b}", others=True)
        text = raw.decode()
        values = text.split("|1.1.1.1002|", 1)[1].split("|", 1)[0]
        when = text.split("|F|||", 1)[1].split("\r", 1)[0]
        out.append((text.replace("CIDHOLE", "{cid}").replace(values, "{values}", 1).replace(when, "{t}"), values))
    return out


async def _monitor(port: int, template: str, values: str, period: float, until: float, lat: list, counts: dict):
    from hl7.mllp import open_hl7_connection

    from tests.hl7_fixtures import dtm

    reader, writer = await open_hl7_connection("127.0.0.1", port, encoding="utf-8")
    t_data = time.time_ns() // 10**6 * 10**6 - 5 * 10**9
    step = int(period * 1e9)
    next_send = time.monotonic()
    i = 0
    while next_send < until:
        await asyncio.sleep(max(0.0, next_send - time.monotonic()))
        msg = template.format(cid=f"{id(writer)}-{i}", t=dtm(t_data + i * step, digits=3), values=values)
        sent = time.perf_counter()
        writer.writeblock(msg.encode())
        await writer.drain()
        ack = await reader.readmessage()
        took = time.perf_counter() - sent
        counts["sent"] += 1
        if str(ack.segment("MSA")[1]) == "AA":
            counts["acked"] += 1
            lat.append(took)
        i += 1
        next_send += period
    writer.close()


async def _load(port: int, templates, period: float, seconds: float) -> tuple[list, dict, float]:
    lat: list[float] = []
    counts = {"sent": 0, "acked": 0}
    start = time.monotonic()
    until = start + seconds
    await asyncio.gather(*(_monitor(port, t, v, period, until + (k % 10) * period / 10, lat, counts)
                           for k, (t, v) in enumerate(templates)))
    return lat, counts, time.monotonic() - start


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(beds_list: list[int], seconds: float, period: float, bootstrap: str | None) -> dict:
    from streamer.settings import settings_to_env
    from tests.kafka_utils import isolated_settings

    cluster = None
    if bootstrap is None:
        from tools.kafka_cluster import KafkaCluster

        cluster = KafkaCluster(Path(tempfile.mkdtemp(prefix="bench-hl7-"))).start()
        bootstrap = cluster.bootstrap
    results = []
    try:
        for beds in beds_list:
            s = isolated_settings(bootstrap, partitions=8)
            env = {**os.environ, **settings_to_env(s), "STREAMER_LOG_FORMAT": "json", "STREAMER_LOG_LEVEL": "warning"}
            proc = subprocess.Popen([sys.executable, "-m", "streamer", "gateway", "hl7", "--listen", "127.0.0.1:0",
                                     "--encoding", "binary"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    env=env, text=True)
            try:
                port = int(proc.stdout.readline().strip().rsplit(":", 1)[1])
                samples = int(500 * period)
                templates = _templates(beds, samples)
                cpu0 = _cpu_s(proc.pid)
                lat, counts, took = asyncio.run(_load(port, templates, period, seconds))
                cpu = _cpu_s(proc.pid) - cpu0
            finally:
                proc.terminate()
                proc.wait(30)
            offered = beds / period
            msgs = counts["acked"] / took
            p = np.percentile(lat, [50, 99]) * 1e3 if lat else [float("nan")] * 2
            results.append({"beds": beds, "offered_msgs_per_s": round(offered, 1), "acked_msgs_per_s": round(msgs, 1),
                            "samples_per_s": round(msgs * samples), "latency_ms_p50": round(float(p[0]), 1),
                            "latency_ms_p99": round(float(p[1]), 1), "gateway_cpu_percent": round(100 * cpu / took),
                            "nak": counts["sent"] - counts["acked"],
                            "keeps_up": bool(msgs >= 0.95 * offered and p[1] < period * 1e3)})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    finally:
        if cluster is not None:
            cluster.stop()
    carried = [r["beds"] for r in results if r["keeps_up"]]
    return {"benchmark": "gateway_hl7", "machine": machine(), "commit": commit(), "period_s": period,
            "seconds": seconds, "rate_hz": 500, "message": "PCD-01: lead II counts+resolution, lead I, pleth",
            "results": results, "largest_beds_kept_up": max(carried) if carried else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--beds", default="10,40,80", help="comma-separated bed counts, each a run")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--period", type=float, default=1.0, help="seconds of signal per message")
    ap.add_argument("--bootstrap", help="an Apache Kafka to use (default: start one, tools.kafka_cluster)")
    a = ap.parse_args()
    print(json.dumps(run([int(b) for b in a.beds.split(",")], a.seconds, a.period, a.bootstrap), indent=1))


if __name__ == "__main__":
    main()
