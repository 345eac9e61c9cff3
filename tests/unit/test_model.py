"""The released model path: checkpoint loading errors, digest pinning, probability parity."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from streamer.model.weights import CheckpointError, build_network, load_state_dict
from streamer.model.errors import DeviceError
from streamer.model.infer import ArtifactScorer
from streamer.model.network import ArtifactNet
from streamer.settings import ModelSettings
from streamer.windows.resample import to_model_samples
from tests import reference_impl as ref


def test_released_layout_has_362_tensors_with_prefix():
    keys = list(ArtifactNet().state_dict())
    assert len(keys) == 362
    assert all(k.startswith("efficientnet.") for k in keys)
    assert "efficientnet.classifier.0.weight" in keys and "efficientnet.classifier.3.bias" in keys


@pytest.fixture(scope="module")
def per_window_reference(checkpoint, windows_by_kind) -> np.ndarray:
    """The offline path, one window at a time: torch.stft per window (as the released offline path), numpy
    dB/8-bit, Pillow resize, plain 3-channel NCHW fp32 model, batch 1. Computed once for every backend."""
    state, _ = load_state_dict(checkpoint)
    plain = build_network(state)
    per_window = []
    with torch.no_grad():
        for ws in windows_by_kind.values():
            for w in ws:
                img = torch.from_numpy(ref.image(ref.resample_5000(w), fft="torch"))[None]
                per_window.append(torch.softmax(plain(img), 1)[0, 1].item())
    return np.array(per_window)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "auto"])
def test_batched_probabilities_equal_per_window_reference(checkpoint, windows_by_kind, per_window_reference,
                                                          backend):
    """The batched, folded-stem, channels_last scorer of each backend equals the per-window offline path."""
    scorer = ArtifactScorer(ModelSettings(checkpoint=checkpoint, backend=backend, device="cpu"))
    raw = [w for ws in windows_by_kind.values() for w in ws]
    batched = scorer.probabilities(np.stack([to_model_samples(w) for w in raw]))
    dp = np.abs(batched - per_window_reference)
    assert dp.max() <= 1e-5, f"max |dp| {dp.max():.2e}"
    assert np.ptp(batched) > 1e-3, "the calibrated test model must respond to its input"


def test_threshold_default_and_model_id(checkpoint):
    scorer = ArtifactScorer(ModelSettings(checkpoint=checkpoint))
    assert scorer.threshold == 0.20802117884159088  # the released operating point, not just the constant
    assert ArtifactScorer(ModelSettings(checkpoint=checkpoint, threshold=0.5, backend="torch")).threshold == 0.5
    assert scorer.info.model_id.startswith("test-model@sha256:")
    assert len(scorer.info.sha256) == 64


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "nope.pth")


def test_not_a_torch_file(tmp_path):
    p = tmp_path / "junk.pth"
    p.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch file"):
        load_state_dict(p)


def test_not_a_state_dict(tmp_path):
    p = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], p)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_state_dict(p)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path):
    p = tmp_path / "evil.pth"
    with open(p, "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(CheckpointError, match="weights_only|not a readable"):
        load_state_dict(p)
    p2 = tmp_path / "evil2.pth"
    torch.save({"efficientnet.x": _Evil()}, p2)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_state_dict(p2)


def test_missing_and_unexpected_keys(checkpoint):
    state, _ = load_state_dict(checkpoint)
    unprefixed = {k.removeprefix("efficientnet."): v for k, v in state.items()}
    with pytest.raises(CheckpointError, match="prefix"):
        build_network(unprefixed)
    partial = dict(state)
    partial.pop("efficientnet.classifier.3.bias")
    with pytest.raises(CheckpointError, match="1 missing key"):
        build_network(partial)


def test_wrong_shapes(checkpoint):
    state, _ = load_state_dict(checkpoint)
    state = dict(state)
    state["efficientnet.classifier.3.weight"] = torch.zeros(3, 256)
    with pytest.raises(CheckpointError, match="wrong tensor shapes"):
        build_network(state)


def test_digest_pin(checkpoint):
    _, digest = load_state_dict(checkpoint)
    load_state_dict(checkpoint, expected_sha256=digest.upper())
    with pytest.raises(CheckpointError, match="refusing"):
        load_state_dict(checkpoint, expected_sha256="0" * 64)


def test_cuda_requested_without_cuda(checkpoint):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceError, match="CUDA is not available"):
        ArtifactScorer(ModelSettings(checkpoint=checkpoint, device="cuda"))


def test_onnxruntime_backend_keeps_parity(checkpoint, windows_by_kind):
    pytest.importorskip("onnxruntime")
    raw = [w for ws in windows_by_kind.values() for w in ws]
    x = np.stack([to_model_samples(w) for w in raw])
    torch_p = ArtifactScorer(ModelSettings(checkpoint=checkpoint, backend="torch")).probabilities(x)
    ort_p = ArtifactScorer(ModelSettings(checkpoint=checkpoint, backend="onnxruntime", device="cpu")).probabilities(x)
    assert np.abs(ort_p - torch_p).max() <= 1e-5


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])  # auto picks one of these two
def test_cpu_threads_limits_inference_threads(checkpoint, windows_by_kind, backend):
    """model.cpu_threads caps torch's CPU threads, and onnxruntime's that follow them (for hosts shared with
    other busy processes), and the scores do not depend on it."""
    before = torch.get_num_threads()
    x = np.stack([to_model_samples(w) for ws in windows_by_kind.values() for w in ws[:1]])
    try:
        one = ArtifactScorer(ModelSettings(checkpoint=checkpoint, backend=backend, device="cpu", cpu_threads=1))
        assert torch.get_num_threads() == 1
        if backend == "onnxruntime":
            assert one.runner.session.get_session_options().intra_op_num_threads == 1
        p_one = one.probabilities(x)
    finally:
        torch.set_num_threads(before)
    p_all = ArtifactScorer(ModelSettings(checkpoint=checkpoint, backend=backend, device="cpu")).probabilities(x)
    assert np.abs(p_one - p_all).max() <= 1e-5


def test_the_flag_decision_is_one_function_online_and_offline():
    """A probability at the threshold is artifact (the released operating point's rule), for one window and
    for an array of them alike."""
    import numpy as np

    from streamer.model.decision import is_artifact
    from streamer.spec import RELEASED_THRESHOLD

    assert is_artifact(RELEASED_THRESHOLD, RELEASED_THRESHOLD) and not is_artifact(0.2080211, RELEASED_THRESHOLD)
    p = np.array([0.0, RELEASED_THRESHOLD, 0.9])
    assert is_artifact(p, RELEASED_THRESHOLD).tolist() == [False, True, True]


def test_a_checkpoint_with_a_nan_or_an_infinity_is_refused_at_load(checkpoint, tmp_path):
    """Every probability would be NaN: the worker refuses such a file at start, naming the tensor."""
    state, _ = load_state_dict(checkpoint)
    for bad in (float("nan"), float("inf"), 1e39):  # 1e39 in float64: inf once cast to the network's float32
        broken = dict(state)
        key = "efficientnet.features.3.0.block.1.1.running_var"
        broken[key] = broken[key].to(torch.float64)
        broken[key][5] = bad
        path = tmp_path / "broken.pth"
        torch.save(broken, path)
        with pytest.raises(CheckpointError, match=f"NaN or infinite values in 1 tensor.*{key}"):
            ArtifactScorer(ModelSettings(checkpoint=str(path), backend="torch", device="cpu"))


def test_scores_that_are_not_finite_are_counted_and_their_windows_reported_unscored(checkpoint, windows_by_kind):
    """A model that gives NaN at run time (an fp16 overflow on a GPU; here the loaded network's weights
    broken in memory, past the load's check): the scorer counts them and logs once a batch, and the
    verdicts are unscored with reason score_not_finite, never clean."""
    from streamer.metrics import Metrics
    from streamer.model.decision import decide
    from streamer.model.scoring import WindowScorer
    from streamer.spec import FlagStatus, NoScoreReason
    from streamer.windows.buffer import SCORABLE, EmittedWindow

    scorer = ArtifactScorer(ModelSettings(checkpoint=checkpoint, backend="torch", device="cpu"))
    with torch.no_grad():
        next(scorer.runner.net.parameters()).fill_(float("nan"))
    metrics = Metrics()
    window_scorer = WindowScorer(scorer, cpu_fallback=False, metrics=metrics)
    wins = [EmittedWindow("bed-1", 0, 10**18 + i * 10**10, 10**18 + (i + 1) * 10**10, 500.0, SCORABLE, None, w, 0, 0,
                          None, 0.0) for i, w in enumerate(windows_by_kind["ecg_500hz"][:3])]
    probs = window_scorer(wins)
    assert len(probs) == 3 and all(p != p for p in probs)
    assert metrics.scores_not_finite._value.get() == 3
    verdicts = [decide(w, p, scorer.threshold, scorer.info.model_id) for w, p in zip(wins, probs)]
    assert {(v.status, v.reason, v.artifact) for v in verdicts} == {
        (FlagStatus.INSUFFICIENT, NoScoreReason.SCORE_NOT_FINITE, None)}
