"""Backend auto: measured once per machine, cached, gated on parity; the cache cannot be poisoned."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from streamer.model import backends
from streamer.model.backends import ChoiceCache, CpuChoice, OrtRunner, measure_cpu_backends, probe_images
from streamer.model.infer import ArtifactScorer
from streamer.settings import ModelSettings
from streamer.windows.resample import to_model_samples

pytest.importorskip("onnxruntime")


def _windows(windows_by_kind) -> np.ndarray:
    return np.stack([to_model_samples(w) for ws in windows_by_kind.values() for w in ws[:2]])


def test_auto_measures_once_then_reuses_the_stored_choice(checkpoint, windows_by_kind, tmp_path):
    settings = ModelSettings(checkpoint=checkpoint, device="cpu", cache_dir=tmp_path)
    first = ArtifactScorer(settings)
    assert first.choice is not None and first.choice.rates and not first.choice_from_cache
    assert first.info.backend == first.choice.backend == first.runner.name
    assert first.device_batch == first.choice.device_batch
    assert f"{first.choice.backend}@{first.choice.device_batch}" in first.choice.rates
    stored = json.loads(next(tmp_path.glob("cpu-choice-*.json")).read_text())
    assert stored["choice"]["backend"] == first.choice.backend
    assert stored["choice"]["max_abs_dp"] <= backends.PARITY_TOLERANCE

    second = ArtifactScorer(settings)
    assert second.choice_from_cache
    assert second.runner.name == first.runner.name and second.device_batch == first.device_batch
    x = _windows(windows_by_kind)
    assert np.array_equal(first.probabilities(x), second.probabilities(x))
    if second.runner.name == "onnxruntime":
        assert second.net is None, "a cached ONNX choice needs no torch network"


def test_auto_without_cache_measures_and_stores_nothing(checkpoint, tmp_path):
    scorer = ArtifactScorer(ModelSettings(checkpoint=checkpoint, device="cpu", cache_dir=tmp_path,
                                          backend_cache=False))
    assert scorer.choice is not None and scorer.choice.rates and not scorer.choice_from_cache
    assert list(tmp_path.iterdir()) == []


def test_pinned_device_batch_is_kept(checkpoint, tmp_path):
    scorer = ArtifactScorer(ModelSettings(checkpoint=checkpoint, device="cpu", cache_dir=tmp_path, device_batch=3))
    assert scorer.device_batch == 3
    assert set(scorer.choice.rates) <= {"torch@3", "onnxruntime@3"}


def test_a_tampered_onnx_file_is_not_loaded(checkpoint, tmp_path):
    settings = ModelSettings(checkpoint=checkpoint, device="cpu", cache_dir=tmp_path)
    first = ArtifactScorer(settings)
    # Pretend ONNX Runtime won, and swap the stored model for other bytes of the same name.
    path = next(tmp_path.glob("cpu-choice-*.json"))
    stored = json.loads(path.read_text())
    if stored["choice"]["backend"] != "onnxruntime":
        onnx = next(tmp_path.glob("model-*.onnx"), None)
        assert onnx is None
        cache = ChoiceCache(tmp_path, first.info.sha256, True, torch.get_num_threads(), None)
        stored["choice"].update(backend="onnxruntime",
                                onnx_sha256=cache.save_onnx(backends.export_onnx(ArtifactScorer(
                                    ModelSettings(checkpoint=checkpoint, backend="torch")).net)))
        path.write_text(json.dumps(stored))
    onnx = next(tmp_path.glob("model-*.onnx"))
    onnx.write_bytes(onnx.read_bytes()[:-10] + b"0123456789")
    again = ArtifactScorer(settings)
    assert not again.choice_from_cache, "measured again instead of loading other bytes"
    assert ArtifactScorer(settings).choice_from_cache, "and stored a good pair again"


class _Shifted:
    """A real runner whose logits are moved by `delta`: an export that lost parity."""

    name = "onnxruntime"

    def __init__(self, runner: OrtRunner, delta: float):
        self.runner, self.delta = runner, delta

    def logits(self, images):
        return self.runner.logits(images) + torch.tensor([0.0, self.delta])


@pytest.mark.parametrize("delta,chosen_possible", [(0.5, False), (1e-7, True)])
def test_parity_gate(checkpoint, delta, chosen_possible):
    scorer = ArtifactScorer(ModelSettings(checkpoint=checkpoint, backend="torch"))
    ort = backends.ort_runner(backends.export_onnx(scorer.net), torch.get_num_threads())
    images = probe_images(scorer.preprocess)
    choice = measure_cpu_backends([scorer.runner, _Shifted(ort, delta)], images, (4,))
    assert choice.max_abs_dp is not None
    if chosen_possible:
        assert choice.max_abs_dp <= backends.PARITY_TOLERANCE and "onnxruntime@4" in choice.rates
    else:
        assert choice.max_abs_dp > backends.PARITY_TOLERANCE
        assert choice.backend == "torch" and set(choice.rates) == {"torch@4"}


def test_probe_batch_is_not_saturated(checkpoint):
    """The parity gate compares probabilities: a probe scored all 0 or all 1 would pass any export."""
    scorer = ArtifactScorer(ModelSettings(checkpoint=checkpoint, backend="torch"))
    with torch.inference_mode():
        p = torch.softmax(scorer.runner.logits(probe_images(scorer.preprocess)), 1)[:, 1].numpy()
    assert ((p > 0.01) & (p < 0.99)).any()


def test_first_stored_choice_wins(tmp_path):
    cache = ChoiceCache(tmp_path, "ab" * 32, True, 2, None)
    a = cache.save(CpuChoice("torch", 4, {"torch@4": 60.0}))
    b = cache.save(CpuChoice("torch", 8, {"torch@8": 61.0}))
    assert a.device_batch == 4 and b.device_batch == 4
    assert cache.load()[0].device_batch == 4


def test_a_cache_of_another_machine_is_ignored(tmp_path):
    cache = ChoiceCache(tmp_path, "ab" * 32, True, 2, None)
    cache.save(CpuChoice("torch", 4, {"torch@4": 60.0}))
    path = next(tmp_path.glob("cpu-choice-*.json"))
    stored = json.loads(path.read_text())
    stored["key"]["cpu"] = "another CPU"
    path.write_text(json.dumps(stored))
    assert cache.load() is None
