"""Where the network runs: PyTorch, or ONNX Runtime on the CPU, chosen by measuring both at load.

On a CPU the faster runtime and batch size depend on the machine (measured: ONNX Runtime 110 vs PyTorch
66 windows/s on a 2-core EPYC, 83 vs 22 on a 2-core Xeon), so `model.backend = "auto"` scores the same
probe batch with every candidate, keeps the fastest whose probabilities agree with PyTorch's within
PARITY_TOLERANCE, and remembers the choice (and the exported ONNX model) in a cache directory keyed by
checkpoint digest, library versions, CPU and thread count: later starts on the same machine skip the
measurement, the export and the torchvision import, and every process there makes the same choice.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from streamer.logs import get_logger
from streamer.model.errors import DeviceError

log = get_logger(__name__)

PARITY_TOLERANCE = 1e-5  # max |dp| between ONNX Runtime and PyTorch on the probe batch
LOGIT_TOLERANCE = 1e-3  # and max |dlogit|: saturated probabilities alone could hide a broken export
CPU_BATCH_CANDIDATES = (4, 8, 16)
PROBE_WINDOWS = 16
CACHE_FORMAT = 1


class TorchRunner:
    name = "torch"

    def __init__(self, net: torch.nn.Module, dtype: torch.dtype, memory_format: torch.memory_format,
                 folded_stem: bool):
        self.net, self.dtype, self.memory_format, self.folded_stem = net, dtype, memory_format, folded_stem

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        x = images if self.folded_stem else images.expand(-1, 3, -1, -1)
        x = x.to(self.dtype).contiguous(memory_format=self.memory_format)
        return self.net(x).float()


class OrtRunner:
    name = "onnxruntime"

    def __init__(self, session):
        self.session = session

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"image": images.numpy()})[0]).float()


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def export_onnx(net: torch.nn.Module) -> bytes:
    """The fp32 CPU network as an ONNX model with a dynamic batch axis."""
    in_channels = net.efficientnet.features[0][0].in_channels
    cpu_net = net.to(memory_format=torch.contiguous_format)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(cpu_net, (torch.zeros(1, in_channels, 224, 224),), buf, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}}, dynamo=False)
    return buf.getvalue()


def ort_runner(onnx_model: bytes, threads: int) -> OrtRunner:
    try:
        import onnxruntime as ort
    except ImportError:
        raise DeviceError("model.backend=onnxruntime needs onnxruntime (`pip install onnxruntime onnx`)") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return OrtRunner(ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"]))


# -- measurement ----------------------------------------------------------------------------------
def probe_images(preprocess) -> torch.Tensor:
    """A fixed probe batch of synthetic ECG, clean and with artifact: probabilities spread between 0 and 1
    (noise alone saturates them at 1, where a parity check on probabilities would see nothing)."""
    from streamer.synthetic import generate

    ecg = generate(10.0 * PROBE_WINDOWS, fs=500, seed=3)
    return preprocess(ecg.values.reshape(PROBE_WINDOWS, 5000).astype(np.float32))


def windows_per_second(runner, images: torch.Tensor, batch: int, repeats: int = 1) -> float:
    with torch.inference_mode():
        runner.logits(images[:batch])  # first call at this shape: allocation, kernel choice
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for i in range(0, len(images), batch):
                runner.logits(images[i:i + batch])
            best = min(best, time.perf_counter() - t0)
    return len(images) / best


def logits_of(runner, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return runner.logits(images).double()


def parity(candidate: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max |dp|, max |dlogit|) between two logit batches."""
    dp = (torch.softmax(candidate, 1)[:, 1] - torch.softmax(reference, 1)[:, 1]).abs().max().item()
    return dp, (candidate - reference).abs().max().item()


@dataclass
class CpuChoice:
    backend: str
    device_batch: int
    rates: dict[str, float] = field(default_factory=dict)  # "backend@batch" -> windows/s
    max_abs_dp: float | None = None  # ONNX Runtime vs PyTorch on the probe batch
    onnx_sha256: str | None = None


def measure_cpu_backends(runners: list, images: torch.Tensor, batches: tuple[int, ...]) -> CpuChoice:
    """Time every (runner, batch) on the probe batch; ONNX Runtime only counts if it keeps parity."""
    torch_runner = next(r for r in runners if r.name == "torch")
    reference = logits_of(torch_runner, images)
    rates: dict[str, float] = {}
    best: tuple[float, str, int] | None = None
    max_abs_dp = None
    for runner in runners:
        if runner.name != "torch":
            max_abs_dp, max_abs_dlogit = parity(logits_of(runner, images), reference)
            if max_abs_dp > PARITY_TOLERANCE or max_abs_dlogit > LOGIT_TOLERANCE:
                log.warning("backend_parity_failed", backend=runner.name, max_abs_dp=max_abs_dp,
                            max_abs_dlogit=max_abs_dlogit, tolerance=PARITY_TOLERANCE)
                continue
        own_best = 0.0
        for b in batches:
            r = windows_per_second(runner, images, b)
            rates[f"{runner.name}@{b}"] = round(r, 1)
            if best is None or r > best[0]:
                best = (r, runner.name, b)
            if r < 0.8 * own_best:
                break  # past this backend's cache-friendly size: larger batches only get slower
            own_best = max(own_best, r)
    assert best is not None
    return CpuChoice(best[1], best[2], rates, max_abs_dp)


# -- cache ----------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "streamer"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class ChoiceCache:
    """The measured CPU choice and the exported ONNX model, on disk. First writer wins: a process that
    measured at the same time adopts the stored choice, so every process on a machine scores alike."""

    def __init__(self, directory: Path | None, digest: str, folded_stem: bool, threads: int,
                 pinned_batch: int | None):
        self.directory = directory
        import onnxruntime  # only built when it is installed

        key = {"format": CACHE_FORMAT, "checkpoint": digest, "folded_stem": folded_stem, "threads": threads,
               "batch": pinned_batch, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
               "cpu": _cpu_name(), "cores": os.cpu_count()}
        self.key = key
        tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        model_tag = hashlib.sha256(f"{digest}|{folded_stem}|{torch.__version__}".encode()).hexdigest()[:20]
        self.choice_path = directory / f"cpu-choice-{tag}.json" if directory else None
        self.onnx_path = directory / f"model-{model_tag}.onnx" if directory else None

    def load(self) -> tuple[CpuChoice, bytes | None] | None:
        if self.choice_path is None:
            return None
        try:
            stored = json.loads(self.choice_path.read_text())
            if stored.get("key") != self.key:
                return None
            choice = CpuChoice(**stored["choice"])
        except (OSError, ValueError, TypeError, KeyError):
            return None
        if choice.backend != "onnxruntime":
            return choice, None
        model = self.load_onnx(choice.onnx_sha256)
        return (choice, model) if model is not None else None

    def load_onnx(self, sha256: str | None) -> bytes | None:
        if self.onnx_path is None or not sha256:
            return None
        try:
            data = self.onnx_path.read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != sha256:
            # Not the bytes that were measured: drop both files so this process stores a good pair.
            log.warning("backend_cache_mismatch", path=str(self.onnx_path))
            for path in (self.onnx_path, self.choice_path):
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    pass
            return None
        return data

    def save_onnx(self, model: bytes) -> str:
        """Stores the exported model once; returns the sha256 of the bytes on disk (an equivalent export
        by another process may have landed first)."""
        if self.onnx_path is not None and not self._write_once(self.onnx_path, model):
            try:
                return hashlib.sha256(self.onnx_path.read_bytes()).hexdigest()
            except OSError:
                pass
        return hashlib.sha256(model).hexdigest()

    def save(self, choice: CpuChoice) -> CpuChoice:
        """Store `choice` unless another process stored one first; returns the stored one."""
        if self.choice_path is None:
            return choice
        body = json.dumps({"key": self.key, "choice": asdict(choice)}, indent=1).encode()
        if self._write_once(self.choice_path, body):
            return choice
        stored = self.load()
        return stored[0] if stored is not None else choice

    def _write_once(self, path: Path, data: bytes) -> bool:
        """Atomic create: a temporary file linked into place, never overwriting. False if it existed."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("backend_cache_unwritable", path=str(path), error=str(exc))
            return True  # nothing stored; the caller keeps its own
