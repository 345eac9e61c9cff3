"""The Docker files cannot run here (no Docker engine): check that what they use exists in the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from streamer.cli import build_parser
from streamer.settings import load_settings

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def _subcommands() -> set[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return set(action.choices)


def _check_env(env: dict[str, str], monkeypatch) -> None:
    for k, v in env.items():
        if k.startswith("STREAMER_"):
            monkeypatch.setenv(k, str(v))
    load_settings()  # unknown or invalid STREAMER_* names fail here


def test_compose_services_use_real_commands_env_and_ports(monkeypatch):
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"kafka", "topics", "worker", "replayer", "prometheus"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    for name in ("worker", "replayer"):
        svc = services[name]
        assert svc["command"][0] in _subcommands()
        assert (DOCKER.parent / svc["build"]["dockerfile"]).is_file()
        with monkeypatch.context() as m:
            _check_env(svc["environment"], m)
    worker_env = services["worker"]["environment"]
    assert worker_env["STREAMER_METRICS_PORT"] in services["worker"]["expose"]
    assert "ports" not in services["worker"], "metrics are not published on the host"
    assert all(p.startswith("127.0.0.1:") for svc in services.values() for p in svc.get("ports", [])), \
        "anything published on the host binds its loopback"
    # the topics come from the same plan as `streamer topics` prints (streamer/kafka/topics.py)
    topics = services["topics"]
    assert topics["command"][:2] == ["topics", "--create"] and topics["command"][0] in _subcommands()
    build_parser().parse_args(topics["command"])
    with monkeypatch.context() as m:
        _check_env(topics["environment"], m)
    # one Apache Kafka version everywhere: compose runs what the suite proves (tools/kafka/pom.xml)
    pom = (DOCKER.parent / "tools" / "kafka" / "pom.xml").read_text()
    proven = re.search(r"<kafka.version>([^<]+)</kafka.version>", pom).group(1)
    assert services["kafka"]["image"] == f"apache/kafka:{proven}"
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"worker:{worker_env['STREAMER_METRICS_PORT']}"]


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_non_root_entrypoint_and_env(dockerfile, monkeypatch):
    text = (DOCKER / dockerfile).read_text()
    assert re.search(r"^USER streamer$", text, re.M), "runs as a non-root user"
    assert text.count("FROM ") >= 2, "multi-stage"
    assert 'ENTRYPOINT ["streamer"]' in text
    assert "--require-hashes --no-deps -r requirements.lock" in text, "installs exactly what the lock pins"
    lock = (DOCKER.parent / "requirements.lock").read_text()
    assert re.search(r"^torch==2\.14\.1 ", lock, re.M) and re.search(r"^torchvision==0\.29\.1 ", lock, re.M)
    assert ".pth" not in text, "the checkpoint is mounted, not baked in"
    env = dict(re.findall(r"(STREAMER_[A-Z_]+)=(\S+)", text))
    assert env, "the image configures the worker through STREAMER_* variables"
    monkeypatch.delenv("STREAMER_MODEL__DEVICE", raising=False)
    env.pop("STREAMER_MODEL__DEVICE", None)  # cuda is checked at model load, not in settings
    _check_env(env, monkeypatch)
    cmd = re.search(r'^CMD \["(\w+)"\]', text, re.M).group(1)
    assert cmd in _subcommands()
    # hermetic: the local packages are built with the lock's setuptools, nothing fetched unpinned
    assert "--no-deps --no-build-isolation ./client ." in text and re.search(r"^setuptools==", lock, re.M)


def test_the_cuda_image_base_matches_the_cuda_of_the_locked_torch():
    text = (DOCKER / "Dockerfile.cuda").read_text()
    base = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-", text, re.M)
    lock = (DOCKER.parent / "requirements.lock").read_text()
    runtime = re.search(r"^nvidia-cuda-runtime(?:-cu\d+)?==(\d+)\.(\d+)\.", lock, re.M)
    assert base and runtime and base.groups() == runtime.groups(), (base and base.groups(), runtime.groups())
