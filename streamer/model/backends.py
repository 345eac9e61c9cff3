"""Where the network runs: PyTorch, or ONNX Runtime on the CPU, chosen by measuring both at load.

On a CPU the faster runtime and batch size depend on the machine (measured: ONNX Runtime 110 vs PyTorch
66 windows/s on a 2-core EPYC, 83 vs 22 on a 2-core Xeon), so `model.backend = "auto"` scores the same
probe batch with every candidate, keeps the fastest whose probabilities agree with PyTorch's within
PARITY_TOLERANCE, and remembers the choice (and the exported ONNX model) in a cache directory keyed by
checkpoint digest, library versions, CPU and thread count: later starts on the same machine skip the
measurement and the export, and every process there makes the same choice.

The cache is not trusted: a stored ONNX model scores only after it has matched the checkpoint's own
network on the start probe (`start_probe_images`, `check_parity`) at every start, and a cache directory
that another user can write is refused (`private_cache_dir`).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import platform
import stat
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from streamer.logs import get_logger
from streamer.model.errors import CacheError, DeviceError

log = get_logger(__name__)

PARITY_TOLERANCE = 1e-5  # max |dp| between ONNX Runtime and PyTorch on the probe batch
LOGIT_TOLERANCE = 1e-3  # and max |dlogit|: saturated probabilities alone could hide a broken export
CPU_BATCH_CANDIDATES = (4, 8, 16)
PROBE_WINDOWS = 16
START_PROBE_STRIDE = 3  # the start probe takes every third probe window: 6 of 16
CACHE_FORMAT = 2  # 2: the ONNX model's name carries the checkpoint digest; choices parsed strictly


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


def start_probe_images(preprocess) -> torch.Tensor:
    """The parity probe of every start that takes a stored ONNX model: 6 of the 16 windows the measurement
    gated that model on (every third: clean, artifact and in between), so an export that passed there
    passes here on the same inputs. Fixed, not drawn at random: on synthetic ECG outside
    the probe a genuine export strayed past PARITY_TOLERANCE (1.1e-5 in 1 window of 60), and a flat line
    puts the logits near +-225 where float32 rounding alone moves them by 0.1."""
    from streamer.synthetic import generate

    ecg = generate(10.0 * PROBE_WINDOWS, fs=500, seed=3).values.reshape(PROBE_WINDOWS, 5000)
    return preprocess(ecg[::START_PROBE_STRIDE].astype(np.float32))


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
    """(max |dp|, max |dlogit|) between two logit batches; infinite for batches of different shapes."""
    if candidate.shape != reference.shape:
        return math.inf, math.inf
    dp = (torch.softmax(candidate, 1)[:, 1] - torch.softmax(reference, 1)[:, 1]).abs().max().item()
    return dp, (candidate - reference).abs().max().item()


def parity_ok(max_abs_dp: float, max_abs_dlogit: float) -> bool:
    """Within both tolerances; NaN never is (a comparison with NaN is always false)."""
    return max_abs_dp <= PARITY_TOLERANCE and max_abs_dlogit <= LOGIT_TOLERANCE


def check_parity(torch_runner, candidate, images: torch.Tensor) -> str | None:
    """None if `candidate` scores `images` as the checkpoint's torch network does, within PARITY_TOLERANCE
    and LOGIT_TOLERANCE (the gate `auto` applies to a fresh export); otherwise why not."""
    reference = logits_of(torch_runner, images)
    try:
        got = logits_of(candidate, images)
    except Exception as exc:  # noqa: BLE001 (onnxruntime raises its own types for a graph it cannot run)
        return f"it does not run on the parity probe: {type(exc).__name__}: {str(exc)[:200]}"
    if got.shape != reference.shape:
        return f"it returns shape {tuple(got.shape)} where the checkpoint's network returns {tuple(reference.shape)}"
    dp, dlogit = parity(got, reference)
    if not parity_ok(dp, dlogit):
        return (f"its scores differ from the checkpoint's network on the parity probe (max |dp| {dp:.3g}, "
                f"max |dlogit| {dlogit:.3g}; tolerance {PARITY_TOLERANCE:g}, {LOGIT_TOLERANCE:g})")
    return None


@dataclass
class CpuChoice:
    backend: str
    device_batch: int
    rates: dict[str, float] = field(default_factory=dict)  # "backend@batch" -> windows/s
    max_abs_dp: float | None = None  # ONNX Runtime vs PyTorch on the probe batch
    onnx_sha256: str | None = None


CHOICE_FIELDS = frozenset(CpuChoice.__dataclass_fields__)


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
            if not parity_ok(max_abs_dp, max_abs_dlogit):
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
MAX_CHOICE_BYTES = 64 * 1024  # a stored choice is ~300 bytes
MAX_ONNX_BYTES = 1 << 30  # the exported B0 is ~17 MB; anything near this is not an export of it
_SHA256_HEX = frozenset("0123456789abcdef")


class UntrustedEntry(Exception):
    """A cache file that must not be used; the message says why (logged, and the file is removed)."""


def default_cache_dir() -> Path:
    """A folder of its own under streamer's cache (which also holds the test suite's Kafka jars, made with
    the user's umask): only this one must be private, so a group-writable parent made by other tools never
    stops a worker; a parent others can write could swap this folder, which then fails the ownership check."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "streamer" / "model"


def private_cache_dir(directory: Path) -> Path | None:
    """`directory` (created 0700 if missing) once it is proven private: a directory this user owns that
    neither group nor others can write. CacheError otherwise: anyone who can write it could plant the model
    that scores. None (warned; the cache is off, so every start measures) if it cannot be created."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(directory)  # follows a link: the directory it names is the one that must be private
    except OSError as exc:
        log.warning("backend_cache_unwritable", path=str(directory), error=str(exc))
        return None
    fix = (f"run `chmod 700 {directory}` as its owner, or set model.cache_dir to a private directory "
           "(or model.backend_cache = false)")
    if st.st_uid != os.geteuid():
        raise CacheError(f"model cache directory {directory} belongs to uid {st.st_uid}, not this user "
                         f"(uid {os.geteuid()}): a file planted there would score. Use a directory of your "
                         f"own: {fix}")
    if st.st_mode & 0o022:
        raise CacheError(f"model cache directory {directory} is writable by group or others (mode "
                         f"{stat.S_IMODE(st.st_mode):o}): a file planted there would score; {fix}")
    return directory


def read_private_file(path: Path, limit: int) -> bytes | None:
    """The bytes of a cache file, None if there is none. UntrustedEntry for a link, anything but a regular
    file, a file of another user or writable by group or others, or more than `limit` bytes."""
    try:  # O_NOFOLLOW: a link is refused, not followed; O_NONBLOCK: a FIFO planted here cannot hang the open
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UntrustedEntry(f"{path.name} is a symbolic link") from None
        raise UntrustedEntry(f"{path.name} cannot be opened: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedEntry(f"{path.name} is not a regular file")
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise UntrustedEntry(f"{path.name} belongs to another user or is writable by group or others")
        if st.st_size > limit:
            raise UntrustedEntry(f"{path.name} has {st.st_size} bytes, more than {limit}")
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise UntrustedEntry(f"{path.name} grew past {limit} bytes while read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _finite_number(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def parse_choice(raw: bytes, key: dict, batches: tuple[int, ...]) -> CpuChoice | None:
    """The stored choice in `raw` if it is one for `key`, with a batch from `batches`; None for anything
    else, whatever the bytes (never raises). An onnxruntime choice must name its model's sha256 and a
    measured parity within PARITY_TOLERANCE."""
    try:
        stored = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
        return None
    if not isinstance(stored, dict) or set(stored) != {"key", "choice"}:
        return None
    fields = stored["choice"]
    if stored["key"] != key or not isinstance(fields, dict) or set(fields) != CHOICE_FIELDS:
        return None
    backend, batch, rates = fields["backend"], fields["device_batch"], fields["rates"]
    max_abs_dp, onnx_sha256 = fields["max_abs_dp"], fields["onnx_sha256"]
    if backend not in ("torch", "onnxruntime") or type(batch) is not int or batch not in batches:
        return None
    if not isinstance(rates, dict) or len(rates) > 64 or not all(
            isinstance(k, str) and len(k) <= 64 and _finite_number(v) for k, v in rates.items()):
        return None
    if max_abs_dp is not None and not (_finite_number(max_abs_dp) and max_abs_dp >= 0):
        return None
    if backend == "onnxruntime":
        if max_abs_dp is None or max_abs_dp > PARITY_TOLERANCE:
            return None
        if not (isinstance(onnx_sha256, str) and len(onnx_sha256) == 64 and set(onnx_sha256) <= _SHA256_HEX):
            return None
    elif onnx_sha256 is not None:
        return None
    return CpuChoice(backend, batch, dict(rates), max_abs_dp, onnx_sha256)


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
    measured at the same time adopts the stored choice, so every process on a machine scores alike.

    Nothing read back is trusted. The directory must be private (CacheError at construction otherwise);
    a file is read only if it is a regular file of this user, not a link; the choice must parse as this
    key's (checkpoint digest, versions, CPU, threads) and the ONNX model's name carries the checkpoint's
    digest and its bytes must have the sha256 the choice recorded. Whether the model computes what the
    checkpoint's network computes is the caller's parity probe (model/infer.py): the digests only bind
    the entry to the checkpoint, and whoever writes the directory can write matching ones. A file that
    fails a check is logged (`backend_cache_rejected`, with the reason) and removed, so the next good
    measurement can be stored."""

    def __init__(self, directory: Path | None, digest: str, folded_stem: bool, threads: int,
                 pinned_batch: int | None):
        directory = private_cache_dir(directory) if directory is not None else None
        self.directory = directory
        import onnxruntime  # only built when it is installed

        key = {"format": CACHE_FORMAT, "checkpoint": digest, "folded_stem": folded_stem, "threads": threads,
               "batch": pinned_batch, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
               "cpu": _cpu_name(), "cores": os.cpu_count()}
        self.key = key
        self.batches = (pinned_batch,) if pinned_batch else CPU_BATCH_CANDIDATES
        self.rejected: list[str] = []  # why entries were refused, in order (also logged)
        tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        model_tag = hashlib.sha256(f"{digest}|{folded_stem}|{torch.__version__}".encode()).hexdigest()[:20]
        self.choice_path = directory / f"cpu-choice-{tag}.json" if directory else None
        self.onnx_path = directory / f"model-{digest[:16]}-{model_tag}.onnx" if directory else None

    def load(self) -> tuple[CpuChoice, bytes | None] | None:
        """The stored choice and, for onnxruntime, the model bytes it names; None if there is none or it
        failed a check (then removed)."""
        if self.choice_path is None:
            return None
        try:
            raw = read_private_file(self.choice_path, MAX_CHOICE_BYTES)
            if raw is None:
                return None
            choice = parse_choice(raw, self.key, self.batches)
            if choice is None:
                raise UntrustedEntry(f"{self.choice_path.name} is not a valid choice for this checkpoint "
                                     "and machine")
        except UntrustedEntry as exc:
            self.reject(str(exc), model_too=False)
            return None
        if choice.backend != "onnxruntime":
            return choice, None
        model = self.load_onnx(choice.onnx_sha256)
        return (choice, model) if model is not None else None

    def load_onnx(self, sha256: str | None) -> bytes | None:
        if self.onnx_path is None or not sha256:
            return None
        try:
            data = read_private_file(self.onnx_path, MAX_ONNX_BYTES)
            if data is None:
                raise UntrustedEntry(f"{self.onnx_path.name}, which the choice names, is missing")
            if hashlib.sha256(data).hexdigest() != sha256:
                raise UntrustedEntry(f"{self.onnx_path.name} is not the bytes that were measured (sha256)")
        except UntrustedEntry as exc:
            self.reject(str(exc))
            return None
        return data

    def reject(self, reason: str, model_too: bool = True) -> None:
        """Log why the stored entry is refused and remove it (the choice; with `model_too`, the model)."""
        self.rejected.append(reason)
        log.warning("backend_cache_rejected", reason=reason, path=str(self.directory))
        for path in (self.choice_path, self.onnx_path if model_too else None):
            if path is not None:
                try:
                    path.unlink(missing_ok=True)  # a link is removed, never what it points to
                except OSError as exc:
                    log.warning("backend_cache_unremovable", path=str(path), error=str(exc))

    def save_onnx(self, model: bytes) -> str:
        """Stores the exported model once; returns the sha256 of the bytes on disk (an equivalent export
        by another process may have landed first)."""
        if self.onnx_path is not None and not self._write_once(self.onnx_path, model):
            try:
                data = read_private_file(self.onnx_path, MAX_ONNX_BYTES)
                if data is not None:
                    return hashlib.sha256(data).hexdigest()
            except UntrustedEntry:
                pass  # the next start refuses it and measures again
        return hashlib.sha256(model).hexdigest()

    def save(self, choice: CpuChoice) -> CpuChoice:
        """Store `choice` unless another process stored one first; returns the stored one."""
        if self.choice_path is None:
            return choice
        if choice.max_abs_dp is not None and not math.isfinite(choice.max_abs_dp):
            choice.max_abs_dp = None  # NaN is not JSON, and parse_choice would refuse the file
        body = json.dumps({"key": self.key, "choice": asdict(choice)}, indent=1).encode()
        for _ in range(2):  # a second try if what was there failed its checks (and was removed)
            if self._write_once(self.choice_path, body):
                return choice
            stored = self.load()
            if stored is not None:
                return stored[0]
        return choice

    def _write_once(self, path: Path, data: bytes) -> bool:
        """Atomic create: a temporary file linked into place, never overwriting. False if it existed."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.unlink(missing_ok=True)  # a leftover of a crashed process with this pid
            # O_EXCL | O_NOFOLLOW: never written through a link planted at the temporary name
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                with os.fdopen(fd, "wb", closefd=False) as f:
                    f.write(data)
            finally:
                os.close(fd)
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
