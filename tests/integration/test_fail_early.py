"""Fail loudly and early: each bad start exits non-zero with its message; device faults at run time."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from streamer.kafka.broker import free_port
from streamer.model.infer import ArtifactScorer
from streamer.settings import ModelSettings, Settings
from streamer.windows.resample import to_model_samples
from tests.kafka_utils import isolated_settings, settings_env


def _run(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamer", "run", *args], env=env, capture_output=True,
                          text=True, timeout=180)


def test_missing_model_file(tmp_path):
    env = settings_env(Settings(), STREAMER_MODEL__CHECKPOINT=str(tmp_path / "nope.pth"))
    r = _run(env)
    assert r.returncode == 1 and "checkpoint not found" in r.stderr


def test_corrupt_model_file(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00" * 100)
    r = _run(settings_env(Settings(), STREAMER_MODEL__CHECKPOINT=str(bad)))
    assert r.returncode == 1 and "not a readable torch file" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_but_absent():
    r = _run(settings_env(Settings(), STREAMER_MODEL__DEVICE="cuda"))
    assert r.returncode == 1 and "CUDA is not available" in r.stderr


def test_broker_unreachable():
    env = settings_env(Settings(), STREAMER_KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}")
    r = _run(env)
    assert r.returncode == 1 and "broker unreachable" in r.stderr


@pytest.mark.integration
def test_topics_missing(broker):
    s = isolated_settings(broker.bootstrap)
    s.kafka.flags_topic = "never-created"
    s.kafka.create_topics = False
    r = _run(settings_env(s))
    assert r.returncode == 1 and "topics missing" in r.stderr and "never-created" in r.stderr


def test_out_of_memory_halves_the_device_batch(checkpoint, windows_by_kind):
    scorer = ArtifactScorer(ModelSettings(checkpoint=checkpoint, device_batch=16))
    x = np.stack([to_model_samples(w) for ws in windows_by_kind.values() for w in ws][:20])
    want = scorer.probabilities(x)
    real = scorer._probabilities

    def small_device(batch):  # fault injection: this "device" holds at most 4 windows
        if len(batch) > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(batch)

    scorer._probabilities = small_device
    got = scorer.probabilities(x)
    assert scorer.device_batch == 4
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_repeated_device_failure_raises_unless_fallback_allowed(checkpoint, windows_by_kind):
    from streamer.metrics import Metrics
    from streamer.model.scoring import WindowScorer

    s = Settings()
    s.model.checkpoint = checkpoint
    x = np.stack([to_model_samples(w) for w in windows_by_kind["ecg_500hz"]])
    scorer = WindowScorer(ArtifactScorer(s.model), cpu_fallback=False, metrics=Metrics())
    calls = []

    def broken(batch):
        calls.append(len(batch))
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")

    scorer.scorer._probabilities = broken
    with pytest.raises(RuntimeError, match="illegal memory access"):
        scorer._score(x)
    assert len(calls) == 3
