"""Batched scoring: 5000-sample windows -> artifact probabilities, the same code online and offline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from streamer.logs import get_logger
from streamer.model.checkpoint import (CheckpointError, build_network, load_state_dict,
                                       model_name_for)
from streamer.model.network import fold_grayscale_stem
from streamer.model.preprocess import MODEL_SAMPLES, Preprocessor
from streamer.settings import ModelSettings

log = get_logger(__name__)

_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def demo_checkpoint_path() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / DEMO_CHECKPOINT_FILE


DEMO_CHECKPOINT_FILE = "SYNTHETIC-DEMO-not-for-clinical-use-efficientnet_b0.pth"


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("model.device=cuda but CUDA is not available on this machine")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    sha256: str
    device: str
    precision: str
    threshold: float

    @property
    def model_id(self) -> str:
        return f"{self.name}@sha256:{self.sha256[:16]}"


class ArtifactScorer:
    """Loads the checkpoint once; `probabilities(windows)` scores a (B, 5000) float32 batch."""

    def __init__(self, settings: ModelSettings):
        path = Path(settings.checkpoint) if settings.checkpoint else demo_checkpoint_path()
        state, digest = load_state_dict(path, settings.expected_sha256)
        self.device = resolve_device(settings.device)
        if settings.cpu_threads:
            torch.set_num_threads(settings.cpu_threads)
        net = build_network(state, source=str(path))
        if settings.fold_stem:
            net = fold_grayscale_stem(net)
        self.dtype = _HALF.get(settings.precision, torch.float32) if self.device.type == "cuda" else torch.float32
        net = net.to(self.device, self.dtype)
        self.memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        self.net = net.to(memory_format=self.memory_format).eval()
        self.ort_session = None
        if settings.backend == "onnxruntime":
            if self.device.type != "cpu":
                raise CheckpointError("model.backend=onnxruntime runs on the CPU; set model.device=cpu")
            self.ort_session = _onnx_session(net)
        self.fold_stem = settings.fold_stem
        self.device_batch = settings.device_batch or (256 if self.device.type == "cuda" else 16)
        self.preprocess = Preprocessor(self.device)
        precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        self.info = ModelInfo(settings.name or model_name_for(path), digest, str(self.device), precision,
                              settings.threshold)
        self._warm_up()
        log.info("model_loaded", path=str(path), sha256=digest, model_id=self.info.model_id,
                 device=str(self.device), precision=precision, device_batch=self.device_batch)

    def _warm_up(self) -> None:
        """Score flat windows at every network batch size before the first real window, so memory and
        kernel selection reach their steady state at start: no slow first flags, and no RSS steps later.

        Measured on the CPU: glibc keeps the heap each new batch shape grows into (825 -> 1237 MB the first
        time sizes 1-16 are seen, flat afterwards), so a worker that met a new size after an hour looked
        like a leak. A fixed malloc mmap threshold avoids the growth but made inference 3x slower.
        On CUDA, powers of two up to device_batch: host memory does not depend on the GPU batch shape.
        """
        n = self.device_batch
        sizes = range(n, 0, -1) if self.device.type == "cpu" else sorted({n, *(1 << i for i in range(n.bit_length()))})
        for b in sizes:
            self._probabilities(np.zeros((b, MODEL_SAMPLES), dtype=np.float32))

    @property
    def threshold(self) -> float:
        return self.info.threshold

    def images(self, windows: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.preprocess(windows)

    def probabilities(self, windows: np.ndarray | torch.Tensor) -> np.ndarray:
        """(B, 5000) float32 windows -> (B,) float64 artifact probabilities (softmax class 1).

        Runs the network in chunks of `device_batch`; a CUDA out-of-memory halves it and retries.
        """
        if len(windows) == 0:
            return np.zeros(0, dtype=np.float64)
        out, i = [], 0
        while i < len(windows):
            n = self.device_batch
            try:
                out.append(self._probabilities(windows[i:i + n]))
            except torch.cuda.OutOfMemoryError:
                if n == 1:
                    raise
                self.device_batch = max(n // 2, 1)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                log.warning("device_out_of_memory", device_batch_was=n, device_batch=self.device_batch)
                continue
            i += n
        return np.concatenate(out)

    def fall_back_to_cpu(self) -> None:
        """Move the model to the CPU in fp32 (after repeated device failures, if allowed)."""
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.net = self.net.to(self.device, torch.float32).to(memory_format=self.memory_format)
        self.preprocess = Preprocessor(self.device)
        self.device_batch = 16
        self.info = ModelInfo(self.info.name, self.info.sha256, "cpu", "fp32", self.info.threshold)
        log.error("device_fallback_to_cpu", model_id=self.info.model_id)

    @torch.inference_mode()
    def _probabilities(self, windows: np.ndarray | torch.Tensor) -> np.ndarray:
        x = self.images(windows)
        if self.ort_session is not None:
            logits = torch.from_numpy(self.ort_session.run(None, {"image": x.numpy()})[0])
            return torch.softmax(logits.float(), dim=1)[:, 1].double().numpy()
        if not self.fold_stem:
            x = x.expand(-1, 3, -1, -1)
        x = x.to(self.dtype).contiguous(memory_format=self.memory_format)
        logits = self.net(x).float()
        return torch.softmax(logits, dim=1)[:, 1].double().cpu().numpy()


def _onnx_session(net: torch.nn.Module):
    """The network (folded stem, fp32) exported to ONNX in memory and loaded into ONNX Runtime."""
    import io
    import warnings

    try:
        import onnxruntime as ort
    except ImportError:
        raise CheckpointError("model.backend=onnxruntime needs `pip install onnxruntime onnx` "
                              "(the project's [onnx] extra)") from None
    buf = io.BytesIO()
    in_channels = net.efficientnet.features[0][0].in_channels
    cpu_net = net.to(memory_format=torch.contiguous_format)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(cpu_net, (torch.zeros(1, in_channels, 224, 224),), buf, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}}, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])
