"""Issue 45, item 4: a file in the backend cache cannot defeat the checkpoint pin.

With `model.backend = "auto"` a stored ONNX model scores only after it has matched the pinned checkpoint's
network on the start probe; a stored choice is parsed as hostile bytes; a cache directory another user can
write is refused at start (`streamer run` and `streamer score` alike)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings as hsettings, strategies as st

from streamer.metrics import Metrics
from streamer.model import backends
from streamer.model.backends import ChoiceCache, CpuChoice
from streamer.model.errors import ModelError
from streamer.model.infer import ArtifactScorer, demo_checkpoint_path
from streamer.model.scoring import WindowScorer
from streamer.offline.score import score_file
from streamer.settings import ModelSettings
from streamer.synthetic import generate
from streamer.windows.buffer import SCORABLE, EmittedWindow

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

DEMO = demo_checkpoint_path()
DEMO_SHA256 = hashlib.sha256(DEMO.read_bytes()).hexdigest()


def _settings(cache_dir, checkpoint=DEMO, sha256=DEMO_SHA256, **kw) -> ModelSettings:
    """As an operator pins it: the checkpoint, its digest, backend auto on the CPU, the cache given."""
    return ModelSettings(checkpoint=checkpoint, expected_sha256=sha256, allow_demo=True, device="cpu",
                         backend="auto", cache_dir=cache_dir, **kw)


def _cache(cache_dir, sha256=DEMO_SHA256, batch=None) -> ChoiceCache:
    """The cache entry names ArtifactScorer will look up for this checkpoint on this machine."""
    return ChoiceCache(cache_dir, sha256, True, torch.get_num_threads(), batch)


def _always_artifact_onnx() -> bytes:
    """The planted model of the report (~700 bytes): logits (-20, 20) for every image, p(artifact) = 1.000."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["image"], ["mean"], axes=[2, 3], keepdims=0),  # (N, 1)
         helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
         helper.make_node("Add", ["nothing", "always"], ["logits"])],  # broadcast to (N, 2)
        "planted",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]),
         helper.make_tensor("always", TensorProto.FLOAT, [1, 2], [-20.0, 20.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _plant(cache_dir, model: bytes, sha256=DEMO_SHA256, batch=None) -> ChoiceCache:
    """`model` where the cache keeps the exported one, with the choice that makes `auto` take it: every
    digest consistent, as anyone who can write the directory can make them."""
    cache = _cache(cache_dir, sha256, batch)
    cache.onnx_path.write_bytes(model)
    choice = CpuChoice("onnxruntime", 4, {"onnxruntime@4": 999.0, "torch@4": 1.0}, 0.0,
                       hashlib.sha256(model).hexdigest())
    cache.choice_path.write_text(json.dumps({"key": cache.key, "choice": choice.__dict__}))
    return cache


def _clean_windows(n: int = 11) -> np.ndarray:
    return generate(10.0 * n, fs=500, seed=45, artifact_fraction=0.0).values.reshape(n, 5000)


@pytest.fixture(scope="module")
def torch_scores() -> np.ndarray:
    """The pinned checkpoint's own network on the clean windows: what any backend must reproduce."""
    return ArtifactScorer(ModelSettings(checkpoint=DEMO, backend="torch", device="cpu")).probabilities(
        _clean_windows().astype(np.float32))


def _worker_scores(settings: ModelSettings) -> tuple[ArtifactScorer, np.ndarray]:
    """As the worker scores: ArtifactScorer(...).warm_up() behind a WindowScorer, windows as emitted."""
    scorer = ArtifactScorer(settings).warm_up()
    window_scorer = WindowScorer(scorer, cpu_fallback=False, metrics=Metrics())
    windows = [EmittedWindow(patient_id="bed-1", partition=0, start_ns=k * 10**10, end_ns=(k + 1) * 10**10,
                             fs=500.0, status=SCORABLE, reason=None, samples=w, missing=0, interpolated=0,
                             min_offset=k, completed_at=0.0, k=k)
               for k, w in enumerate(_clean_windows())]
    return scorer, np.array(window_scorer(windows), dtype=np.float64)


@pytest.mark.parametrize("planted", ["always_artifact", "another_checkpoints_export"])
def test_a_planted_model_never_scores(tmp_path, planted, checkpoint, torch_scores):
    """The report: a 736-byte model planted in the cache flagged 11 of 11 clean windows (p = 1.000) under
    the pinned checkpoint's name. Also a genuine export of another checkpoint, renamed: every digest
    matches, only the probe tells. Either way the start refuses it, says why, removes it and scores with
    the pinned network (or an export of its own that keeps parity)."""
    if planted == "always_artifact":
        model = _always_artifact_onnx()
    else:
        other = ArtifactScorer(ModelSettings(checkpoint=checkpoint, backend="torch", device="cpu"))
        model = backends.export_onnx(other.net)
    cache = _plant(tmp_path, model)

    scorer, got = _worker_scores(_settings(tmp_path))
    assert scorer.info.sha256 == DEMO_SHA256
    assert not scorer.choice_from_cache, "the planted entry was used"
    assert len(scorer.cache_rejected) == 1 and "parity probe" in scorer.cache_rejected[0]
    np.testing.assert_allclose(got, torch_scores, rtol=0, atol=backends.PARITY_TOLERANCE)
    assert (got < 0.5).all(), "clean windows are clean for the demo model"
    if cache.onnx_path.exists():  # onnxruntime won the measurement: the file is this start's own export
        assert hashlib.sha256(cache.onnx_path.read_bytes()).hexdigest() != hashlib.sha256(model).hexdigest()

    # `streamer score`'s path, on a second planting: refused the same way (a pinned network batch, as
    # an operator may set it: the entry names differ, the checks do not)
    _plant(tmp_path, model, batch=4)
    rec = tmp_path / "clean.npy"
    np.save(rec, _clean_windows().reshape(-1))
    df = score_file(rec, _settings(tmp_path, device_batch=4), fs=500, progress=False)
    assert len(df) >= 10  # the last window ends past the recording's last sample
    np.testing.assert_allclose(df["probability"].to_numpy(), torch_scores[:len(df)], rtol=0,
                               atol=backends.PARITY_TOLERANCE)


def test_a_genuine_export_is_used_after_the_probe(tmp_path, torch_scores):
    """No false refusal: the checkpoint's own export, stored as `auto` stores it, is taken from the cache
    (no measurement), after the probe, without a torch network kept for scoring."""
    cache = _cache(tmp_path)
    net = ArtifactScorer(ModelSettings(checkpoint=DEMO, backend="torch", device="cpu")).net
    sha = cache.save_onnx(backends.export_onnx(net))
    cache.save(CpuChoice("onnxruntime", 4, {"onnxruntime@4": 100.0}, 1e-8, sha))
    assert cache.onnx_path.name.startswith(f"model-{DEMO_SHA256[:16]}-"), "the name binds the checkpoint"

    scorer, got = _worker_scores(_settings(tmp_path))
    assert scorer.choice_from_cache and scorer.runner.name == "onnxruntime" and scorer.net is None
    assert scorer.cache_rejected == []
    np.testing.assert_allclose(got, torch_scores, rtol=0, atol=backends.PARITY_TOLERANCE)


def test_a_linked_model_file_is_not_followed(tmp_path):
    """A symbolic link where the model belongs is refused and removed (never what it points to); the
    start measures again (one pinned batch size)."""
    cache = _cache(tmp_path, batch=4)
    net = ArtifactScorer(ModelSettings(checkpoint=DEMO, backend="torch", device="cpu")).net
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = elsewhere / "model.onnx"
    target.write_bytes(backends.export_onnx(net))
    os.symlink(target, cache.onnx_path)
    sha = hashlib.sha256(target.read_bytes()).hexdigest()
    cache.choice_path.write_text(json.dumps({"key": cache.key, "choice": CpuChoice(
        "onnxruntime", 4, {"onnxruntime@4": 100.0}, 1e-8, sha).__dict__}))

    scorer = ArtifactScorer(_settings(tmp_path, device_batch=4))
    assert not scorer.choice_from_cache
    assert any("symbolic link" in r for r in scorer.cache_rejected)
    assert not cache.onnx_path.is_symlink() and target.exists()


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777, 0o1777])
def test_a_cache_directory_others_can_write_is_refused(tmp_path, mode):
    cache_dir = tmp_path / "shared-cache"
    cache_dir.mkdir()
    cache_dir.chmod(mode)
    with pytest.raises(ModelError) as refused:
        ArtifactScorer(_settings(cache_dir))
    message = str(refused.value)
    assert "\n" not in message and str(cache_dir) in message and "chmod 700" in message
    assert list(cache_dir.iterdir()) == [], "nothing read or written there"


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory of another user needs root")
def test_a_cache_directory_of_another_user_is_refused(tmp_path):
    cache_dir = tmp_path / "theirs"
    cache_dir.mkdir(mode=0o700)
    os.chown(cache_dir, 4242, -1)
    with pytest.raises(ModelError, match="belongs to uid 4242"):
        ArtifactScorer(_settings(cache_dir))


def test_a_missing_cache_directory_is_made_private(tmp_path):
    cache_dir = tmp_path / "a" / "new" / "cache"
    ArtifactScorer(_settings(cache_dir, device_batch=4))
    assert stat.S_IMODE(cache_dir.stat().st_mode) & 0o077 == 0
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in cache_dir.iterdir())


def test_score_refuses_a_group_writable_cache_in_one_line(tmp_path):
    """`streamer score`, as a person runs it: exit 2, one line naming the directory and the fix."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    cache_dir.chmod(0o775)
    rec = tmp_path / "clean.npy"
    np.save(rec, _clean_windows(2).reshape(-1))
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "STREAMER_MODEL__CACHE_DIR": str(cache_dir),
           "STREAMER_MODEL__DEVICE": "cpu", "STREAMER_LOG_FORMAT": "json"}
    r = subprocess.run([sys.executable, "-m", "streamer", "score", str(rec), "--fs", "500", "--demo",
                        "--out", str(tmp_path / "out.csv")], capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 2, r.stderr[-2000:]
    said = [line for line in r.stderr.splitlines() if line.startswith("streamer score:")]
    assert len(said) == 1 and str(cache_dir) in said[0] and "chmod 700" in said[0]
    assert "Traceback" not in r.stderr and not (tmp_path / "out.csv").exists()


# -- the choice file: hostile bytes ---------------------------------------------------------------
@pytest.mark.parametrize("body", [
    b"[" * 100_000,  # deeper than the parser's stack: RecursionError
    b"[1, 2]",
    "torch batch 0: a network call of no windows, forever",
    "onnxruntime without parity",
])
def test_a_malformed_choice_is_measured_again(tmp_path, body):
    """Never a crash, never trusted: the start measures again and stores a good choice over it (with a
    pinned network batch, so that the measurement is one batch size: the checks are the same)."""
    cache = _cache(tmp_path, batch=4)
    if isinstance(body, str):
        choice = {"torch batch 0: a network call of no windows, forever": CpuChoice("torch", 0),
                  "onnxruntime without parity": CpuChoice("onnxruntime", 4, {}, 0.5, "0" * 64)}[body]
        body = json.dumps({"key": cache.key, "choice": choice.__dict__}).encode()
    cache.choice_path.write_bytes(body)
    scorer = ArtifactScorer(_settings(tmp_path, device_batch=4))
    assert not scorer.choice_from_cache and scorer.device_batch == 4
    assert scorer.cache_rejected, "the refusal is logged with its reason"
    assert ArtifactScorer(_settings(tmp_path, device_batch=4)).choice_from_cache, "and a good one stored over it"


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=4), max_leaves=12)
_FIELDS = st.fixed_dictionaries({}, optional={
    "backend": st.sampled_from(["torch", "onnxruntime", "cuda", ""]) | _JSON,
    "device_batch": st.sampled_from([0, -1, 4, 8, 16, 3, True, 4.0, 10**30]) | _JSON,
    "rates": st.dictionaries(st.text(max_size=12), st.floats() | st.integers()) | _JSON,
    "max_abs_dp": st.sampled_from([None, 0.0, 1e-6, 1.0, -1.0]) | st.floats() | _JSON,
    "onnx_sha256": st.sampled_from([None, "0" * 64, "g" * 64, "0" * 63]) | _JSON,
    "extra": _JSON})


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=300)
       | _JSON.map(lambda v: json.dumps(v).encode())
       | _FIELDS.map(lambda f: json.dumps({"key": "KEY", "choice": f}).encode()))
@example(raw=b"[" * 50_000)
@example(raw=b'{"key": "KEY", "choice": []}')
@example(raw=b'{"key": "KEY", "choice": {"backend": "torch", "device_batch": 0, "rates": {}, '
             b'"max_abs_dp": null, "onnx_sha256": null}}')
def test_any_bytes_in_the_choice_file_are_never_trusted(raw):
    """Hypothesis over the choice file's bytes, read through ChoiceCache.load (what every start calls).
    It never raises; what it returns is a choice ArtifactScorer can run (a known backend, a candidate
    batch, an ONNX model whose bytes carry the digest the choice names); anything else is removed."""
    with tempfile.TemporaryDirectory() as d:
        cache = _cache(Path(d))
        cache.choice_path.write_bytes(raw.replace(b'"KEY"', json.dumps(cache.key).encode()))
        loaded = cache.load()
        if loaded is None:
            assert not cache.choice_path.exists(), "a choice refused is removed, so a good one can be stored"
            return
        choice, model = loaded
        assert choice.backend in ("torch", "onnxruntime")
        assert type(choice.device_batch) is int and choice.device_batch in backends.CPU_BATCH_CANDIDATES
        assert model is None and choice.backend == "torch", "no model file was ever written here"
