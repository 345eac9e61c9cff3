"""TLS for real: worker, replay and watch over Apache Kafka's own TLS listener (a CA made by
tools/kafka_cluster.py); a wrong CA or host name fails at start with a clear message and exit 1 (no model
load, no retries until a timeout)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from streamer.kafka.broker import free_port
from streamer.offline.recordings import parse_start
from streamer.offline.replay import synthetic_fleet
from tests.kafka_utils import (expected_windows, flags_of, isolated_settings, read_topic, settings_env,
                               start_worker_process, wait_for_event)
from tests.tls import TlsFront, have_openssl, make_ca, make_server_cert

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not have_openssl(), reason="the openssl command is needed to make test certificates")]

START = "2026-11-22T12:00:00Z"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    return {"ca": make_ca(folder, "test-ca"), "other_ca": make_ca(folder, "other-ca"),
            "server": make_server_cert(folder, "test-ca", "broker", "IP:127.0.0.1,DNS:localhost"),
            "misnamed": make_server_cert(folder, "test-ca", "elsewhere", "DNS:broker.example")}


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    from tools.kafka_cluster import KafkaCluster

    cluster = KafkaCluster(tmp_path_factory.mktemp("tls-kafka"), tls=True).start()
    yield cluster
    cluster.stop()


def _cli(args: list[str], env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamer", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_worker_replay_and_watch_over_tls(tls_cluster, tmp_path):
    s = isolated_settings(tls_cluster.bootstrap, kafka=tls_cluster.client_settings(),
                          partitions=2)  # topics created over TLS
    log = tmp_path / "worker.log"
    worker = start_worker_process(s, log)
    try:
        wait_for_event(log, "worker_started", proc=worker)
        env = settings_env(s)
        sent = _cli(["replay", "--synthetic", "3", "--duration", "40", "--start", START, "--speed", "max",
                     "--encoding", "binary", "--quiet"], env)
        assert sent.returncode == 0, sent.stderr[-2000:]
        fleet = [src for src, _ in synthetic_fleet(3, 40.0, parse_start(START), seed=0)]
        want = expected_windows(fleet)
        records = asyncio.run(read_topic(s.kafka, s.kafka.flags_topic, timeout_s=90,
                                         until=lambda rs: {(f["patient_id"], f["window_start_ns"])
                                                           for f in flags_of(rs)} >= want))
        assert {(f["patient_id"], f["window_start_ns"]) for f in flags_of(records)} == want
        watched = _cli(["watch", "--seconds", "3", "--from-beginning"], env)
        assert watched.returncode == 0, watched.stderr[-2000:]
        assert sum(line.startswith("flag") for line in watched.stdout.splitlines()) >= len(want)
    finally:
        worker.terminate()
        assert worker.wait(60) == 0


@pytest.mark.parametrize("case", ["unknown_ca", "wrong_host_name", "plaintext_port"])
def test_wrong_tls_setup_fails_at_start_with_the_reason(pki, broker, tls_cluster, case):
    started = []
    try:
        if case == "plaintext_port":
            bootstrap, cafile, why = broker.bootstrap, pki["ca"], "is that port a TLS listener"
        elif case == "unknown_ca":
            bootstrap, cafile, why = (tls_cluster.bootstrap, pki["other_ca"],
                                      "unable to get local issuer certificate")
        else:  # a TLS endpoint whose certificate names another host, in front of the plaintext broker
            front = TlsFront(free_port(), int(broker.bootstrap.rsplit(":", 1)[1]), *pki["misnamed"]).start()
            started.append(front)
            bootstrap, cafile, why = f"127.0.0.1:{front.port}", pki["ca"], "certificate is not valid for"
        env = {**settings_env(isolated_settings(broker.bootstrap)), "STREAMER_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
               "STREAMER_KAFKA__SECURITY_PROTOCOL": "SSL", "STREAMER_KAFKA__SSL_CAFILE": str(cafile),
               "STREAMER_KAFKA__TLS_CHECK_TIMEOUT_S": "1.5"}
        for command in (["run"], ["replay", "--synthetic", "1", "--duration", "10", "--speed", "max", "--quiet"],
                        ["watch", "--seconds", "30"]):
            t0 = time.monotonic()
            out = _cli(command, env)
            took = time.monotonic() - t0
            assert out.returncode == 1, (command, out.returncode, out.stderr[-1500:])
            assert why in out.stderr and "Traceback" not in out.stderr, out.stderr[-1500:]
            assert took < 20, f"{command[0]} took {took:.1f}s to fail"
    finally:
        for part in started:
            part.stop()
