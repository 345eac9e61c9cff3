"""Batched scoring: 5000-sample windows -> artifact probabilities, the same code online and offline."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from streamer.logs import get_logger
from streamer.model.backends import (CPU_BATCH_CANDIDATES, ChoiceCache, CpuChoice, OrtRunner,
                                     TorchRunner, check_parity, default_cache_dir, export_onnx,
                                     measure_cpu_backends, onnxruntime_available, ort_runner, probe_images,
                                     start_probe_images)
from streamer.model.weights import load_state_dict, model_name_for
from streamer.model.errors import DeviceError
from streamer.model.preprocess import MODEL_SAMPLES, Preprocessor
from streamer.settings import ModelSettings, SettingsError

log = get_logger(__name__)

_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def demo_checkpoint_path() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / DEMO_CHECKPOINT_FILE


DEMO_CHECKPOINT_FILE = "SYNTHETIC-DEMO-not-for-clinical-use-efficientnet_b0.pth"


def refuse_demo_model(settings: ModelSettings, command: str = "streamer run") -> None:
    """Neither the worker nor offline scoring uses the synthetic demo model by default: a missing or
    mistyped checkpoint setting stops them instead (exit 2)."""
    if settings.checkpoint is None and not settings.allow_demo:
        flag = "--checkpoint PATH, " if command == "streamer score" else ""
        raise SettingsError(
            f"model.checkpoint is not set: give {flag}STREAMER_MODEL__CHECKPOINT (or [model] checkpoint in the "
            "config file) the released .pth. The bundled model is a SYNTHETIC demo, not for patients: it runs "
            f"only with `{command} --demo` or STREAMER_MODEL__ALLOW_DEMO=true")


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("model.device=cuda but CUDA is not available on this machine")
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
    backend: str = "torch"

    @property
    def model_id(self) -> str:
        return f"{self.name}@sha256:{self.sha256[:16]}"


class ArtifactScorer:
    """The released model on arrays: loads the checkpoint once; `probabilities(windows)` scores a (B, 5000)
    float32 batch. Windows (with their statuses, retries, the CPU fallback) are WindowScorer's
    (model/scoring.py); offline scoring calls this directly.

    `warm_up()` (the worker calls it; one-shot scoring does not) runs every batch size once so a
    long-running process reaches its steady memory and speed before the first real window."""

    def __init__(self, settings: ModelSettings):
        path = Path(settings.checkpoint) if settings.checkpoint else demo_checkpoint_path()
        state, digest = load_state_dict(path, settings.expected_sha256)
        self.device = resolve_device(settings.device)
        if settings.cpu_threads:
            torch.set_num_threads(settings.cpu_threads)
        self.fold_stem = settings.fold_stem
        self.memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        self.dtype = _HALF.get(settings.precision, torch.float32) if self.device.type == "cuda" else torch.float32
        self.preprocess = Preprocessor(self.device)
        self._state, self._source = state, str(path)
        self.choice: CpuChoice | None = None  # backend auto on the CPU: what was measured
        self.choice_from_cache = False
        self.cache_rejected: list[str] = []  # why stored backend entries were refused at this start
        backend = settings.backend
        if backend == "auto":
            backend = "measure" if self.device.type == "cpu" and onnxruntime_available() else "torch"
        if backend == "onnxruntime" and self.device.type != "cpu":
            raise DeviceError("model.backend=onnxruntime runs on the CPU; set model.device=cpu")
        default_batch = 256 if self.device.type == "cuda" else 16
        if backend == "measure":
            self.runner, batch = self._measured_runner(settings, digest)
        elif backend == "onnxruntime":
            self.runner = self._ort(export_onnx(self._torch_runner().net))
            batch = default_batch
        else:
            self.runner, batch = self._torch_runner(), default_batch
        del self._state
        self.device_batch = settings.device_batch or batch
        precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        self.info = ModelInfo(settings.name or model_name_for(path), digest, str(self.device), precision,
                              settings.threshold, self.runner.name)
        log.info("model_loaded", path=str(path), sha256=digest, model_id=self.info.model_id,
                 device=str(self.device), precision=precision, backend=self.runner.name,
                 device_batch=self.device_batch)

    def _torch_runner(self) -> TorchRunner:
        from streamer.model.weights import build_network
        from streamer.model.network import fold_grayscale_stem

        net = build_network(self._state, source=self._source)
        if self.fold_stem:
            net = fold_grayscale_stem(net)
        net = net.to(self.device, self.dtype).to(memory_format=self.memory_format).eval()
        return TorchRunner(net, self.dtype, self.memory_format, self.fold_stem)

    def _ort(self, onnx_model: bytes) -> OrtRunner:
        return ort_runner(onnx_model, torch.get_num_threads())

    def _measured_runner(self, settings: ModelSettings, digest: str):
        """CPU and ONNX Runtime installed: the stored choice for this machine, else measure and store.

        A stored ONNX model scores only after it matched the checkpoint's network on the start probe, at
        every start: its digests bind it to the checkpoint, but whoever can write the cache can forge
        those. One that fails is refused loudly (`backend_cache_rejected`, removed) and re-measured."""
        cache_dir = (settings.cache_dir or default_cache_dir()) if settings.backend_cache else None
        cache = ChoiceCache(cache_dir, digest, self.fold_stem, torch.get_num_threads(), settings.device_batch)
        self.cache_rejected = cache.rejected  # the cache's own list: filled as entries are refused
        stored = cache.load()
        torch_runner = None
        if stored is not None:
            choice, onnx_model = stored
            t0 = time.perf_counter()
            torch_runner = self._torch_runner()
            runner = torch_runner if onnx_model is None else self._verified_ort(cache, torch_runner, onnx_model)
            if runner is not None:
                self.choice, self.choice_from_cache = choice, True
                log.info("backend_from_cache", backend=choice.backend, device_batch=choice.device_batch,
                         path=str(cache.choice_path), check_s=round(time.perf_counter() - t0, 2))
                return runner, choice.device_batch
        t0 = time.perf_counter()
        torch_runner = torch_runner or self._torch_runner()
        onnx_model = export_onnx(torch_runner.net)
        ort = self._ort(onnx_model)
        batches = (settings.device_batch,) if settings.device_batch else CPU_BATCH_CANDIDATES
        choice = measure_cpu_backends([torch_runner, ort], probe_images(self.preprocess), batches)
        ort_kept_parity = any(rate.startswith("onnxruntime@") for rate in choice.rates)
        if choice.backend == "onnxruntime":
            choice.onnx_sha256 = cache.save_onnx(onnx_model)
        stored_choice = cache.save(choice)
        log.info("backend_measured", backend=choice.backend, device_batch=choice.device_batch,
                 rates=choice.rates, max_abs_dp=choice.max_abs_dp, seconds=round(time.perf_counter() - t0, 2),
                 adopted=stored_choice.backend if stored_choice is not choice else None)
        if stored_choice.backend == "onnxruntime" and not ort_kept_parity:
            stored_choice = CpuChoice("torch", stored_choice.device_batch, choice.rates, choice.max_abs_dp)
        self.choice = stored_choice
        runner = ort if stored_choice.backend == "onnxruntime" else torch_runner
        return runner, stored_choice.device_batch

    def _verified_ort(self, cache: ChoiceCache, torch_runner: TorchRunner, onnx_model: bytes) -> OrtRunner | None:
        """The stored ONNX model's runner if it scores the start probe as `torch_runner` does; else None,
        with the entry refused and removed."""
        try:
            ort = self._ort(onnx_model)
        except Exception as exc:  # noqa: BLE001 (onnxruntime raises its own types for bytes it cannot load)
            reason = f"onnxruntime cannot load it: {type(exc).__name__}: {str(exc)[:200]}"
        else:
            reason = check_parity(torch_runner, ort, start_probe_images(self.preprocess))
        if reason is None:
            return ort
        cache.reject(f"{cache.onnx_path.name}: {reason}")
        return None

    def warm_up(self) -> "ArtifactScorer":
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
        return self

    @property
    def net(self) -> torch.nn.Module | None:
        return getattr(self.runner, "net", None)

    @property
    def threshold(self) -> float:
        return self.info.threshold

    def images(self, windows: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.preprocess(windows)

    def probabilities(self, windows: np.ndarray | torch.Tensor) -> np.ndarray:
        """(B, 5000) float32 windows -> (B,) float64 artifact probabilities (softmax class 1).

        Runs the network in chunks of `device_batch`; a CUDA out-of-memory halves it and retries.
        """
        return self._chunked(windows, self._probabilities)

    def probabilities_of_images(self, images: torch.Tensor) -> np.ndarray:
        """The same from images made by `images()` (offline scoring makes the next batch's meanwhile)."""
        return self._chunked(images, self._from_images)

    def _chunked(self, items, score) -> np.ndarray:
        if len(items) == 0:
            return np.zeros(0, dtype=np.float64)
        out, i = [], 0
        while i < len(items):
            n = self.device_batch
            try:
                out.append(score(items[i:i + n]))
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
        net = self.runner.net.to(self.device, torch.float32).to(memory_format=self.memory_format)
        self.runner = TorchRunner(net, torch.float32, self.memory_format, self.fold_stem)
        self.preprocess = Preprocessor(self.device)
        self.device_batch = 16
        self.info = ModelInfo(self.info.name, self.info.sha256, "cpu", "fp32", self.info.threshold, "torch")
        log.error("device_fallback_to_cpu", model_id=self.info.model_id)

    @torch.inference_mode()
    def _probabilities(self, windows: np.ndarray | torch.Tensor) -> np.ndarray:
        return self._from_images(self.images(windows))

    @torch.inference_mode()
    def _from_images(self, images: torch.Tensor) -> np.ndarray:
        logits = self.runner.logits(images)
        return torch.softmax(logits, dim=1)[:, 1].double().cpu().numpy()
