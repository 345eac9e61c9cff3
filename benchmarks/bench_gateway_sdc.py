"""SDC gateway figures (issue 47): BEDS loopback providers (sdc11073's provider classes, tests/sdc_provider.py,
500 Hz, ~50 samples every 100 ms) into one gateway process and Apache Kafka; prints reports/s, samples/s,
report -> Kafka-ack latency percentiles and the gateway's share of CPU. The providers run in this process
too, so the CPU figure is an upper bound for the gateway alone.

    .venv/bin/python -m benchmarks.bench_gateway_sdc [BEDS] [SECONDS]
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time

import numpy as np


async def _run(bootstrap: str, beds: int, seconds: float) -> None:
    from streamer.gateways.sdc_in import GatewayOptions, SdcGateway
    from streamer.gateways.sink import ConfirmedSink
    from streamer.synthetic import clean_ecg
    from tests.kafka_utils import isolated_settings
    from tests.sdc_provider import EcgProvider

    s = await asyncio.to_thread(isolated_settings, bootstrap, partitions=4)
    providers = [EcgProvider(clean_ecg(20.0, 500.0, np.random.default_rng(i)), patient=f"MRN-{i:04d}").start()
                 for i in range(beds)]
    sink = await ConfirmedSink.open(s.kafka)
    gateway = SdcGateway(GatewayOptions([p.url for p in providers]), sink)
    run = asyncio.create_task(gateway.run())
    await asyncio.sleep(3)  # connect and settle (a benchmark, not a test)
    gateway.latencies_ns.clear()
    before = {u: (t.reports, t.samples) for u, t in gateway.timelines.items()}
    cpu0, t0 = time.process_time(), time.monotonic()
    await asyncio.sleep(seconds)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
    reports = sum(t.reports - before[u][0] for u, t in gateway.timelines.items())
    samples = sum(t.samples - before[u][1] for u, t in gateway.timelines.items())
    lat = np.array(gateway.latencies_ns) / 1e6
    dropped = sum(i.dropped for i in gateway.inboxes.values())
    gateway.stop()
    await run
    await sink.close()
    for p in providers:
        await asyncio.to_thread(p.stop)
    print(f"beds={beds} seconds={wall:.1f} reports/s={reports / wall:.0f} samples/s={samples / wall:.0f} "
          f"latency_ms p50={np.percentile(lat, 50):.1f} p99={np.percentile(lat, 99):.1f} max={lat.max():.1f} "
          f"cpu_share={cpu / wall:.2f} dropped={dropped}")


def main() -> None:
    from tools.kafka_cluster import KafkaCluster

    beds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 20.0
    with tempfile.TemporaryDirectory() as folder:
        cluster = KafkaCluster(folder).start()
        try:
            asyncio.run(_run(cluster.bootstrap, beds, seconds))
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
