"""The GPU check, one prepared run for a lent GPU machine (run it as `benchmarks/device_check`).

In at most ~8 minutes it measures, and writes into --out (the device tool's $OUT) as it goes:
1. parity: CUDA vs the CPU fp32 reference on real-shaped windows (synthetic ECG with artifact, 360 Hz
   resampled to 500 Hz, as the worker sees them), in fp32, bf16 and fp16: max and mean |dp| and flag flips;
2. throughput per batch size (64..4096): the network alone and the whole path (raw windows from the host,
   preprocessing, network, probabilities back), eager vs CUDA graphs, pageable vs pinned host buffers;
3. preprocessing (spectrogram and Pillow-exact image steps) on the GPU vs the CPU: time and max |diff|;
   and the resize alone, int32 two taps vs the float64 matrix products it replaced, each against the CPU;
4. end to end on the embedded broker: N simulated beds in real time into one worker process on the GPU:
   flag latency p50/p99, windows/s and GPU utilisation.
Each section is timed and its failure recorded without losing the others; device_check.json is rewritten
after every section, so a run cut short still brings back what it measured. `--record` appends the rows
to benchmarks/RESULTS.md; `--from-json FILE` records the rows of an earlier run (one that came back from
the GPU machine) without measuring. `--cpu-dry-run` runs every section on the CPU at tiny sizes, so the
suite proves the script works (tests/integration/test_device_check.py).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from pathlib import Path

import numpy as np
import orjson

BATCHES = (64, 128, 256, 512, 1024, 2048, 4096)
DRY_BATCHES = (4, 8)
COMPILE_BATCHES, DRY_COMPILE_BATCHES = (256, 512, 1024), (4,)  # each divides the largest: parity in whole chunks
PROCESS_COUNTS, DRY_PROCESS_COUNTS = (1, 2, 4), (1, 2)
PROCESS_BATCH_CAP = 1024  # four processes at 4096 would need ~4 x 30 GB of activations
COMPILE_MODE = "reduce-overhead"
COMPILE_MODE_WHY = (
    "reduce-overhead: Inductor's fused kernels replayed as CUDA graphs, compiled in about the time of the default "
    "mode, so one compile per precision fits the section's budget; its figures sit beside the hand-captured "
    "graphs (graphs alone) and eager. max-autotune-no-cudagraphs benchmarks Triton templates for every "
    "convolution shape, minutes for EfficientNet-B0 per precision, more than a 15-minute lease can give "
    "(--compile-mode max-autotune-no-cudagraphs tries it on a longer one)")
ROOT = Path(__file__).resolve().parents[1]
CHILD_MARK = "@@gpu_check "  # the lines of a child's stdout that are messages; the rest is log, kept as a tail


# -- the sections -------------------------------------------------------------------------------------
def environment(device: str) -> dict:
    import torch

    from benchmarks.common import commit, machine

    out = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
           "cpu_count": os.cpu_count(), "machine": machine(), "commit": commit()}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    return out


def real_shaped_windows(n: int, seed: int = 4) -> np.ndarray:
    """(n, 5000) float32: synthetic lead-II ECG with artifact at 360 Hz, resampled as the worker does."""
    from streamer.synthetic import generate
    from streamer.windows.resample import to_model_samples

    g = generate(10.0 * n, fs=360, seed=seed)
    return np.stack([to_model_samples(w) for w in g.values[:n * 3600].reshape(n, 3600)]).astype(np.float32)


def scorer(device: str, precision: str):
    from streamer.model.infer import ArtifactScorer
    from streamer.settings import ModelSettings

    return ArtifactScorer(ModelSettings(device=device, precision=precision, backend="torch", backend_cache=False))


def parity(device: str, n: int) -> dict:
    x = real_shaped_windows(n)
    ref = scorer("cpu", "fp32")
    p_ref = ref.probabilities(x)
    out = {"windows": n, "threshold": ref.threshold, "reference": "cpu fp32 (torch)",
           "artifact_share": float((p_ref >= ref.threshold).mean())}
    for precision in ("fp32", "bf16", "fp16"):
        if device == "cpu" and precision != "fp32":
            out[precision] = "half precision runs on CUDA only"
            continue
        s = scorer(device, precision)
        p = s.probabilities(x)
        dp = np.abs(p - p_ref)
        out[precision] = {"max_abs_dp": float(dp.max()), "mean_abs_dp": float(dp.mean()),
                          "flips": int(((p >= ref.threshold) != (p_ref >= ref.threshold)).sum())}
    return out


def _timed(fn, sync, min_s: float, min_iters: int = 3) -> float:
    """Seconds per call (after two warm-up calls), over at least min_s and min_iters calls."""
    for _ in range(2):
        fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - t0 < min_s:
        fn()
        n += 1
    sync()
    return (time.perf_counter() - t0) / n


def throughput(device: str, batches, precision: str, min_s: float) -> list[dict]:
    import torch

    s = scorer(device, precision)
    net, pre = s.runner, s.preprocess
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    rng = np.random.default_rng(0)
    for b in batches:
        host = torch.from_numpy(rng.normal(0, 0.5, (b, 5000)).astype(np.float32))
        pinned = host.pin_memory() if device == "cuda" else host
        row: dict = {"batch": b, "precision": precision}
        try:
            with torch.inference_mode():
                images = pre(host.to(device))
                row["network_eager"] = b / _timed(lambda images=images: net.logits(images), sync, min_s)
                for name, buf in (("pageable", host), ("pinned", pinned)):
                    def whole(buf=buf):
                        x = buf.to(device, non_blocking=True)
                        return torch.softmax(net.logits(pre(x)), dim=1)[:, 1].double().cpu()
                    row[f"path_eager_{name}"] = b / _timed(whole, sync, min_s)
            if device == "cuda":
                row.update(_graphs(net, pre, images, pinned, b, sync, min_s))
        except torch.cuda.OutOfMemoryError as exc:
            row["error"] = f"out of memory: {exc}"[:200]
            torch.cuda.empty_cache()
        rows.append({k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()})
    return rows


def _graphs(net, pre, images, pinned, b: int, sync, min_s: float) -> dict:
    """The network, and the whole device part of the path, replayed as CUDA graphs (static buffers)."""
    import torch

    out = {}
    static_in = images.clone()
    stream = torch.cuda.Stream()
    with torch.inference_mode():
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                net.logits(static_in)
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            net.logits(static_in)
        out["network_graph"] = b / _timed(g.replay, sync, min_s)
        try:  # preprocessing too (cuFFT under capture): recorded as an error where it cannot be captured
            raw = torch.empty((b, 5000), device="cuda")
            with torch.cuda.stream(stream):
                for _ in range(3):
                    net.logits(pre(raw))
            torch.cuda.current_stream().wait_stream(stream)
            g2 = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g2):
                probs = torch.softmax(net.logits(pre(raw)), dim=1)[:, 1]

            def whole():
                raw.copy_(pinned, non_blocking=True)
                g2.replay()
                return probs.double().cpu()
            out["path_graph_pinned"] = b / _timed(whole, sync, min_s)
        except Exception as exc:  # noqa: BLE001 - a measurement, not the product
            out["path_graph_error"] = repr(exc)[:200]
    return out


def preprocessing(device: str, n: int, min_s: float) -> dict:
    import torch

    from streamer.model.preprocess import Preprocessor

    x = torch.from_numpy(real_shaped_windows(n))
    cpu = Preprocessor("cpu")
    ref = cpu(x)
    out = {"windows": n, "cpu_windows_per_s": round(n / _timed(lambda: cpu(x), lambda: None, min_s), 1)}
    if device == "cuda":
        gpu = Preprocessor("cuda")
        xd = x.cuda()
        img = gpu(xd).cpu()
        out["gpu_windows_per_s"] = round(n / _timed(lambda: gpu(xd), torch.cuda.synchronize, min_s), 1)
        out["max_abs_diff_vs_cpu"] = float((img - ref).abs().max())
        out["differing_pixels"] = int((img != ref).sum())
    out.update(resize(device, cpu.spectrogram_u8(x), min_s))
    return out


def resize(device: str, spec_u8, min_s: float) -> dict:
    """The image step's resize alone on `device`: the int32 two-tap resize the worker runs against the
    float64 matrix products it replaced (issue 48, item 5); both must give the CPU's integers."""
    import torch

    from streamer.model.preprocess import Preprocessor
    from tests.resize_float64 import Float64Resize

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    n = len(spec_u8)
    want = Preprocessor("cpu").resize_u8(spec_u8)
    pre, float64 = Preprocessor(device), Float64Resize(device)
    s32, s64 = spec_u8.to(device), spec_u8.to(device, torch.float64)
    got32, got64 = pre.resize_u8(s32).cpu(), float64(s64).cpu().to(torch.int32)
    return {"resize_int32_windows_per_s": round(n / _timed(lambda: pre.resize_u8(s32), sync, min_s), 1),
            "resize_float64_windows_per_s": round(n / _timed(lambda: float64(s64), sync, min_s), 1),
            "resize_int32_differing_pixels_vs_cpu": int((got32 != want).sum()),
            "resize_float64_differing_pixels_vs_cpu": int((got64 != want).sum())}


class GpuUtilisation:
    """Samples GPU utilisation and memory every 0.5 s (NVML, from nvidia-ml-py) while it runs."""

    def __init__(self):
        self.samples: list[tuple[int, int]] = []
        self.times: list[float] = []  # time.monotonic() of each sample
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001 - no NVML: utilisation is reported as unknown
            return self

        def loop():
            while not self._stop.wait(0.5):
                u = pynvml.nvmlDeviceGetUtilizationRates(handle)
                m = pynvml.nvmlDeviceGetMemoryInfo(handle)
                self.samples.append((u.gpu, m.used // 2**20))
                self.times.append(time.monotonic())

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    def between(self, t0: float, t1: float) -> float | None:
        """Mean utilisation (%) of the samples taken between two time.monotonic() instants."""
        u = [u for (u, _), t in zip(self.samples, self.times) if t0 <= t <= t1]
        return round(float(np.mean(u)), 1) if u else None

    def summary(self) -> dict:
        if not self.samples:
            return {"gpu_utilisation": "unknown (no NVML)"}
        util = np.array([u for u, _ in self.samples])
        return {"gpu_util_mean_pct": round(float(util.mean()), 1), "gpu_util_p95_pct": float(np.percentile(util, 95)),
                "gpu_memory_max_mib": int(max(m for _, m in self.samples))}


def end_to_end(device: str, beds: int, seconds: float, max_batch: int) -> dict:
    from benchmarks.bench_e2e import run

    os.environ["STREAMER_MODEL__DEVICE"] = device
    os.environ.setdefault("STREAMER_MODEL__PRECISION", "bf16" if device == "cuda" else "fp32")
    with GpuUtilisation() as util:
        t0 = time.monotonic()
        r = asyncio.run(run(beds, seconds, max_batch, 200.0, "binary", "torch", broker_kind="embedded"))
        wall = time.monotonic() - t0
    return {"beds": beds, "stream_seconds": seconds, "max_batch": max_batch,
            "precision": os.environ["STREAMER_MODEL__PRECISION"], "expected": r["expected"],
            "flagged": r["flagged"], "latency_p50_ms": round(r["p50"] * 1000, 1),
            "latency_p99_ms": round(r["p99"] * 1000, 1), "latency_max_ms": round(r["max"] * 1000, 1),
            "windows_per_s": round(r["flagged"] / seconds, 1), "wall_s": round(wall, 1),
            **(util.summary() if device == "cuda" else {})}


# -- sections in child processes: bounded by killing them, so they cannot eat the lease ------------------
_CHILDREN: set["Child"] = set()  # alive children, for the run's last-resort stop


class Child:
    """One measuring subprocess of this script (`--child KIND`) in a session of its own.

    Its stdout lines that start with CHILD_MARK are JSON messages, read by a thread into a queue (None: the
    child's stdout closed); any other line is log, of which the last 20 are kept to say why it failed.
    `stop()` kills its whole process group (Inductor's compile workers included) and reaps it."""

    def __init__(self, kind: str, spec: dict, env: dict | None = None):
        env = dict(os.environ if env is None else env)
        env.setdefault("STREAMER_LOG_LEVEL", "warning")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.gpu_check", "--child", kind, "--spec", orjson.dumps(spec).decode()],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace", start_new_session=True)
        self.messages: queue.Queue = queue.Queue()
        self.tail: deque[str] = deque(maxlen=20)
        _CHILDREN.add(self)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(CHILD_MARK):
                try:
                    self.messages.put(orjson.loads(line[len(CHILD_MARK):]))
                    continue
                except orjson.JSONDecodeError:
                    pass
            self.tail.append(line.rstrip()[:300])
        self.messages.put(None)

    def next(self, deadline: float) -> dict | None:
        """The next message; None once the child's stdout closed; TimeoutError at `deadline` (monotonic)."""
        try:
            return self.messages.get(timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            raise TimeoutError from None

    def send(self, message) -> None:
        self.proc.stdin.write(orjson.dumps(message).decode() + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        # the group before the reap: while the leader is unreaped its id cannot name another group
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        _CHILDREN.discard(self)

    def why(self) -> str:
        return f"child exit {self.proc.returncode}: " + " | ".join(list(self.tail)[-4:])[-600:]


_emit_lock = threading.Lock()


def emit(**message) -> None:
    """A child's message to its parent (one line, whole even when two threads emit)."""
    with _emit_lock:
        sys.stdout.write(CHILD_MARK + orjson.dumps(message, option=orjson.OPT_SERIALIZE_NUMPY).decode() + "\n")
        sys.stdout.flush()


def _parity(p: np.ndarray, p_ref: np.ndarray, threshold: float) -> dict:
    dp = np.abs(p - p_ref)
    return {"max_abs_dp": float(dp.max()), "mean_abs_dp": float(dp.mean()),
            "flips": int(((p >= threshold) != (p_ref >= threshold)).sum())}


def _eager_path(s, device: str):
    """Host windows -> probabilities on the host, as the worker scores a batch (pinned copy, eager)."""
    import torch

    def run(chunk):
        with torch.inference_mode():
            x = chunk.to(device, non_blocking=True)
            return torch.softmax(s.runner.logits(s.preprocess(x)), dim=1)[:, 1].double().cpu().numpy()
    return run


def _graph_path(s, b: int):
    """The same at batch `b` replayed as one CUDA graph (preprocessing + network + softmax on static buffers),
    or the network alone where preprocessing cannot be captured. Returns (run, what the graph covers)."""
    import torch

    net, pre = s.runner, s.preprocess
    raw = torch.zeros((b, 5000), device="cuda")
    stream = torch.cuda.Stream()
    with torch.inference_mode():
        try:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    net.logits(pre(raw))
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                probs = torch.softmax(net.logits(pre(raw)), dim=1)[:, 1]
            covers = "preprocessing + network"
            images = None
        except Exception as exc:  # noqa: BLE001 - cuFFT or a host sync under capture: graph the network alone
            torch.cuda.synchronize()
            covers = f"network only (preprocessing not capturable: {exc!r}"[:160] + ")"
            images = pre(raw).clone()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    net.logits(images)
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                probs = torch.softmax(net.logits(images), dim=1)[:, 1]

    def run(chunk):
        with torch.inference_mode():
            if images is None:
                raw.copy_(chunk, non_blocking=True)
            else:
                images.copy_(pre(chunk.to("cuda", non_blocking=True)))
            g.replay()
            return probs.double().cpu().numpy()
    return run, covers


def _variant_row(run, precision: str, variant: str, b: int, host, p_ref, threshold: float, sync, min_s: float) -> dict:
    """Windows/s of `run` at batch b, and its parity against the fp32 eager reference on every window."""
    p = np.concatenate([run(host[i:i + b]) for i in range(0, len(host), b)])
    rate = b / _timed(lambda: run(host[:b]), sync, min_s)
    return {"precision": precision, "variant": variant, "batch": b, "windows_per_s": round(rate, 1),
            **_parity(p, p_ref, threshold)}


def _give_up_after(seconds: float, precision: str) -> threading.Timer:
    """A compile cannot be interrupted from inside: past its budget the child says so and exits (the parent
    then kills its compile workers with its process group)."""
    def fire():
        emit(gave_up=f"the compile of {precision} was not done after {seconds:.0f} s, its budget; stopped there",
             precision=precision)
        os._exit(0)
    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


def compiled_child(spec: dict) -> None:
    """Child of the `compiled` section: eager, CUDA graphs and torch.compile on the same real-shaped windows,
    per precision and batch, each against fp32 eager on the same device; rows are emitted as measured, the
    cheap certain ones (eager, graphs) before any compile."""
    import torch

    started = time.monotonic()
    deadline = started + spec["limit_s"]
    device, batches, min_s = spec["device"], spec["batches"], spec["min_s"]
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    assert all(max(batches) % b == 0 for b in batches), batches
    emit(stage="loading the model and the windows")
    host = torch.from_numpy(real_shaped_windows(max(batches)))
    host = host.pin_memory() if cuda else host
    ref = scorer(device, "fp32")
    p_ref = ref.probabilities(host.numpy())
    threshold = ref.threshold
    emit(reference=f"{device} fp32 eager", windows=len(host), threshold=threshold,
         artifact_share=float((p_ref >= threshold).mean()))
    scorers = {}
    for precision in spec["precisions"]:
        s = ref if precision == "fp32" else scorer(device, precision)
        scorers[precision] = s
        emit(stage=f"{precision}: eager and CUDA graphs")
        for b in batches:
            emit(row=_variant_row(_eager_path(s, device), precision, "eager", b, host, p_ref, threshold, sync, min_s))
        for b in batches:
            if not cuda:
                emit(row={"precision": precision, "variant": "graph", "batch": b,
                          "skipped": "CUDA graphs run on CUDA only"})
                continue
            try:
                run, covers = _graph_path(s, b)
                emit(row={**_variant_row(run, precision, "graph", b, host, p_ref, threshold, sync, min_s),
                          "covers": covers})
            except Exception as exc:  # noqa: BLE001 - out of memory, or a capture refused: a row that says so
                emit(row={"precision": precision, "variant": "graph", "batch": b, "error": repr(exc)[:200]})
                torch.cuda.empty_cache()
    measure_s = len(batches) * (min_s + 1.0)  # what the compiled rows need once compiled (a guess, generous)
    last_compile_s = 0.0
    for precision, s in scorers.items():
        left = deadline - time.monotonic() - measure_s
        budget = min(spec["compile_budget_s"], left)
        if budget < max(1.2 * last_compile_s, 2.0):
            took = f", the last compile took {last_compile_s:.0f} s" if last_compile_s else ""
            emit(compile={"precision": precision,
                          "skipped": f"not started: {max(left, 0):.0f} s of the section left after measuring{took}"})
            continue
        emit(stage=f"{precision}: compiling ({spec['mode']}, backend {spec['backend']}), budget {budget:.0f} s")
        timer = _give_up_after(budget, precision)  # from here: torch.compile's own imports count too
        t0 = time.monotonic()
        try:
            fn = _compile(s, device, spec["mode"], spec["backend"])
            fn(host[:batches[0]])
            sync()
        except Exception as exc:  # noqa: BLE001 - a compile that fails is a figure, not the end of the run
            timer.cancel()
            emit(compile={"precision": precision, "failed": repr(exc)[:300]})
            continue
        timer.cancel()
        last_compile_s = time.monotonic() - t0
        emit(compile={"precision": precision, "seconds": round(last_compile_s, 1)})
        for b in batches:
            t1 = time.monotonic()
            fn(host[:b])  # a new shape: a recompile if the batch was specialised, a graph recorded per shape
            first_call_s = round(time.monotonic() - t1, 2)
            row = _variant_row(fn, precision, "compiled", b, host, p_ref, threshold, sync, min_s)
            emit(row={**row, "first_call_s": first_call_s})
    emit(done=True)


def _compile(s, device: str, mode: str, backend: str):
    """Host windows -> probabilities, the network and softmax under torch.compile with the batch dimension
    marked dynamic, so one compile serves every batch size; preprocessing stays eager (measured on its own)."""
    import torch

    net = s.runner

    def probs(images):
        return torch.softmax(net.logits(images), dim=1)[:, 1]
    # mode is Inductor's: another backend would be handed it as an argument it does not take
    compiled = torch.compile(probs, backend=backend, **({"mode": mode} if backend == "inductor" else {}))

    def run(chunk):
        # no_grad rather than inference_mode: the mode compiled graphs are documented and tested under
        with torch.no_grad():
            images = s.preprocess(chunk.to(device, non_blocking=True))
            torch._dynamo.maybe_mark_dynamic(images, 0)
            torch.compiler.cudagraph_mark_step_begin()  # each call a new step: the last output is already copied
            return compiled(images).double().cpu().numpy()
    return run


def compiled(device: str, precisions, batches, min_s: float, mode: str, backend: str, compile_budget_s: float,
             limit_s: float, progress) -> dict:
    """Parent of compiled_child: everything it reported, even when it is stopped at `limit_s` or crashes."""
    out: dict = {"mode": mode, "backend": backend, "limit_s": round(limit_s),
                 "compile_budget_s": round(compile_budget_s), "compile": {}, "rows": []}
    spec = {"device": device, "precisions": list(precisions), "batches": list(batches), "min_s": min_s, "mode": mode,
            "backend": backend, "compile_budget_s": compile_budget_s, "limit_s": limit_s}
    deadline = time.monotonic() + limit_s
    child, stage, done = Child("compiled", spec), "starting", False
    try:
        while True:
            try:
                msg = child.next(deadline)
            except TimeoutError:
                out["gave_up"] = f"stopped at the section's limit ({limit_s:.0f} s) while {stage}"
                break
            if msg is None:
                break
            if "row" in msg:
                out["rows"].append(msg["row"])
            elif "compile" in msg:
                c = dict(msg["compile"])
                out["compile"][c.pop("precision")] = c
            elif "stage" in msg:
                stage = msg["stage"]
                print(f"           compiled: {stage}", flush=True)
            elif "gave_up" in msg:
                out["gave_up"] = msg["gave_up"]
                out["compile"][msg["precision"]] = {"gave_up": msg["gave_up"]}
            elif msg.get("done"):
                done = True
            else:
                out.update(msg)
            progress(out)
    finally:
        child.stop()
    if not done and "gave_up" not in out:
        out["error"] = child.why()
    for precision in precisions:
        if precision not in out["compile"]:
            out["compile"][precision] = {"skipped": f"not done: {out.get('gave_up') or out.get('error', '?')}"[:300]}
    out["why_mode"] = COMPILE_MODE_WHY
    return out


def worker_child(spec: dict) -> None:
    """Child of the `processes` section: one scoring process at its batch, as a worker would run it; waits
    for its phases ([K, start, end] on the shared monotonic clock) on stdin and reports each."""
    from streamer.model.infer import ArtifactScorer
    from streamer.settings import ModelSettings

    b = spec["batch"]
    s = ArtifactScorer(ModelSettings(device=spec["device"], precision=spec["precision"], backend="torch",
                                     backend_cache=False, device_batch=b, cpu_threads=spec.get("cpu_threads")))
    base = real_shaped_windows(min(b, 64), seed=4 + spec["index"])
    x = np.ascontiguousarray(np.tile(base, (math.ceil(b / len(base)), 1))[:b])
    for _ in range(2):
        s.probabilities(x)
    emit(ready=True, pid=os.getpid())
    line = sys.stdin.readline()
    for k, start, end in orjson.loads(line) if line else []:
        time.sleep(max(start - time.monotonic(), 0.0))  # the phase's shared start on the machine's monotonic clock
        latencies = []
        while time.monotonic() < end:
            t0 = time.monotonic()
            s.probabilities(x)
            latencies.append(time.monotonic() - t0)
        ms = np.array(latencies) * 1000 if latencies else np.zeros(1)
        emit(phase=k, batches=len(latencies), windows=len(latencies) * b, start=start, finish=time.monotonic(),
             p50_ms=round(float(np.percentile(ms, 50)), 1), p99_ms=round(float(np.percentile(ms, 99)), 1),
             max_ms=round(float(ms.max()), 1), device_batch=s.device_batch)
    emit(done=True)


class PrivateMps:
    """A user-level MPS control daemon of this run's own, as NVIDIA documents for one user: its own pipe and
    log folders, no root, the GPU's compute mode left as it is. Started in the foreground as our child (we
    know its process group), quit after the round, killed if it does not quit."""

    def __init__(self, binary: str):
        self.binary = binary
        self.root = Path(tempfile.mkdtemp(prefix="gpu-check-mps-"))
        self.env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=str(self.root / "pipe"),
                        CUDA_MPS_LOG_DIRECTORY=str(self.root / "log"))
        self.proc: subprocess.Popen | None = None

    def start(self, wait_s: float = 5.0) -> str | None:
        """None once its control pipe is there, else why not (and nothing left running)."""
        for d in ("pipe", "log"):
            (self.root / d).mkdir(mode=0o700)
        self.proc = subprocess.Popen([self.binary, "-f"], env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        until = time.monotonic() + wait_s
        while time.monotonic() < until and self.proc.poll() is None:
            if (self.root / "pipe" / "control").exists():
                return None
            time.sleep(0.1)  # polling a daemon's start, bounded by wait_s
        self.stop()
        return (f"the private MPS daemon did not open its control pipe within {wait_s:.0f} s "
                f"(exit {self.proc.returncode})")

    def ask(self, command: str) -> str:
        try:
            r = subprocess.run([self.binary], input=command + "\n", env=self.env, capture_output=True, text=True,
                               timeout=5)
            return (r.stdout + r.stderr).strip()[:200]
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"no answer: {exc!r}"[:200]

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.ask("quit")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        try:  # the daemon's server too, should either outlive the quit
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


def mps_plan(device: str) -> tuple[str, str]:
    """('private' | 'system' | 'none', what to say about MPS)."""
    binary = shutil.which("nvidia-cuda-mps-control")
    pipe = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"))
    if device != "cuda":
        return "none", f"not used: CPU dry run (nvidia-cuda-mps-control {'found' if binary else 'not found'})"
    if binary is None:
        return "none", "not used: nvidia-cuda-mps-control not found on this machine; processes time-slice the GPU"
    if (pipe / "control").exists():
        return "system", (f"an MPS daemon was already running (pipe {pipe}): every process ran as its client; "
                          "neither started nor stopped here")
    return "private", ("used for the 'mps' round: a user-level daemon of this run's own (private pipe and log "
                       "folders, no root, compute mode untouched), quit after it; the 'time_sliced' round ran without")


def compute_mode() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        mode = pynvml.nvmlDeviceGetComputeMode(pynvml.nvmlDeviceGetHandleByIndex(0))
        return {0: "default", 1: "exclusive thread", 2: "prohibited", 3: "exclusive process"}.get(mode, str(mode))
    except Exception as exc:  # noqa: BLE001 - only reported
        return f"unknown ({type(exc).__name__})"


def _process_round(device: str, counts, batch: int, precision: str, phase_s: float, deadline: float,
                   env: dict | None, util: GpuUtilisation, mps: PrivateMps | None = None) -> dict:
    """max(counts) workers load at once; then phase K runs workers 0..K-1 together for phase_s, K by K."""
    n, gap = max(counts), (0.5 if device == "cuda" else 0.2)
    spec = {"device": device, "precision": precision, "batch": batch,
            "cpu_threads": 1 if device == "cpu" else None}
    t0 = time.monotonic()
    children = [Child("worker", {**spec, "index": i}, env) for i in range(n)]
    out: dict = {"processes_started": n}
    try:
        for c in children:
            msg = c.next(deadline)
            if not (msg and msg.get("ready")):
                out["error"] = f"a worker did not start: {c.why()}"
                return out
        out["startup_s"] = round(time.monotonic() - t0, 1)
        if mps is not None:
            out["mps_servers"] = mps.ask("get_server_list")  # a server's pid: the workers really are its clients
        start = time.monotonic() + 0.5
        if start + len(counts) * (phase_s + gap) > deadline:
            out["error"] = f"no time left for the phases after a {out['startup_s']} s start"
            return out
        phases = [(k, start + j * (phase_s + gap), start + j * (phase_s + gap) + phase_s) for j, k in enumerate(counts)]
        for i, c in enumerate(children):
            c.send([p for p in phases if i < p[0]])
        reports: dict[int, list[dict]] = {k: [] for k in counts}
        for c in children:
            while (msg := c.next(deadline)) is not None and not msg.get("done"):
                reports[msg["phase"]].append(msg)
        out["phases"] = []
        for k, begin, end in phases:
            got = reports[k]
            if len(got) < k:
                out["phases"].append({"k": k, "error": f"{len(got)} of {k} workers reported"})
                continue
            span = max(r["finish"] for r in got) - begin
            out["phases"].append({
                "k": k, "windows_per_s": round(sum(r["windows"] for r in got) / span, 1),
                "p99_ms_max": max(r["p99_ms"] for r in got), "gpu_util_mean_pct": util.between(begin, end),
                "per_process": [{"windows_per_s": round(r["windows"] / (r["finish"] - begin), 1),
                                 **{f: r[f] for f in ("batches", "p50_ms", "p99_ms", "max_ms", "device_batch")}}
                                for r in got]})
    except TimeoutError:
        out["error"] = f"stopped at the section's limit; workers' last words: {children[0].why()}"
    except Exception as exc:  # noqa: BLE001 - a worker gone (a broken pipe, ...): this round's error, not the section's
        out["error"] = f"{exc!r}"[:200] + f"; workers' last words: {children[0].why()}"
    finally:
        for c in children:
            c.stop()
    return out


def processes(device: str, counts, batch: int, batch_from: str, precision: str, phase_s: float, limit_s: float,
              progress) -> dict:
    """K worker processes sharing the device (K = counts): the aggregate windows/s and each one's batch
    latency, time-sliced and, where MPS is there, under MPS."""
    deadline = time.monotonic() + limit_s
    how, said = mps_plan(device)
    out: dict = {"counts": list(counts), "batch": batch, "batch_from": batch_from, "precision": precision,
                 "phase_s": phase_s, "limit_s": round(limit_s), "mps": said, "rounds": {}}
    if device == "cuda":
        out["compute_mode"] = compute_mode()
    with GpuUtilisation() as util:
        t0 = time.monotonic()
        first = "mps_system" if how == "system" else "time_sliced"
        out["rounds"][first] = _process_round(device, counts, batch, precision, phase_s, deadline, None, util)
        progress(out)
        took = time.monotonic() - t0
        if how == "private":
            if deadline - time.monotonic() < took + 5:
                out["rounds"]["mps"] = {"skipped": f"{deadline - time.monotonic():.0f} s left, the first round "
                                                   f"took {took:.0f} s"}
            else:
                daemon = PrivateMps(shutil.which("nvidia-cuda-mps-control"))
                try:
                    why = daemon.start()
                    out["rounds"]["mps"] = ({"skipped": why} if why else _process_round(
                        device, counts, batch, precision, phase_s, deadline, daemon.env, util, daemon))
                finally:
                    daemon.stop()
    if all("error" in r for r in out["rounds"].values() if "skipped" not in r):
        out["error"] = "no round measured: " + "; ".join(r["error"] for r in out["rounds"].values() if "error" in r)
    return out


def best_batch(results: dict, cap: int, fallback: int) -> tuple[int, str]:
    """The batch of the highest whole-path rate in throughput_bf16 (pinned buffers), at most `cap`."""
    rows = results["sections"].get("throughput_bf16", {}).get("result")
    rates = {r["batch"]: r["path_eager_pinned"] for r in rows or [] if isinstance(r, dict)
             and r.get("batch", cap + 1) <= cap and isinstance(r.get("path_eager_pinned"), float)}
    if not rates:
        return fallback, f"{fallback}: throughput_bf16 gave no whole-path rate up to {cap}"
    b = max(rates, key=rates.get)
    return b, f"throughput_bf16's best whole-path batch up to {cap} ({rates[b]:.0f} windows/s alone)"


# -- the run ------------------------------------------------------------------------------------------
# (seconds, hard): the planned time per section on a GPU and in the dry run. Hard ones run in child
# processes stopped at their limit (less where the budget left is short); the others are estimates, and
# end_to_end runs only if it fits what is left of --budget-s.
PLAN = {"environment": (5, 2, False), "parity": (25, 15, False), "preprocessing": (15, 2, False),
        "throughput_bf16": (60, 15, False), "throughput_fp16": (25, 0, False), "throughput_fp32": (25, 0, False),
        "processes": (80, 40, True), "compiled": (95, 40, True)}
MIN_USEFUL = {"processes": (30, 10), "compiled": (40, 10)}  # below this a bounded section is skipped


def plan_line(dry: bool, e2e_s: float, budget_s: float, compile_budget_s: float) -> str:
    i = 1 if dry else 0
    parts = [f"{name} {'<=' if hard else '~'}{v[i]}" for name, (*v, hard) in PLAN.items() if v[i]]
    total = sum(v[i] for *v, _ in PLAN.values()) + e2e_s + 90
    return (f"plan (s): {', '.join(parts)} (each compile <={compile_budget_s:.0f}), end_to_end ~{e2e_s + 90:.0f} "
            f"if it fits {budget_s:.0f} s; total ~{total:.0f}")


def measure(args) -> dict:
    import torch

    dry = args.cpu_dry_run
    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        raise SystemExit("device_check: no CUDA device here (use --cpu-dry-run to try the script on a CPU)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    plan = plan_line(dry, args.e2e_seconds, args.budget_s, args.compile_budget_s)
    results: dict = {"date": time.strftime("%Y-%m-%d"), "dry_run": dry, "plan": plan, "sections": {}}
    print(plan, flush=True)
    write_lock = threading.Lock()

    def write() -> None:
        with write_lock:  # the watchdog may write while a section does
            (out_dir / "device_check.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))

    def last_resort() -> None:
        """Past --hard-limit-s, whatever runs: say so in the JSON, stop our children, exit (the lease is short)."""
        running = [k for k, v in results["sections"].items() if v.get("partial")]
        results["stopped"] = (f"past the hard limit of {args.hard_limit_s:.0f} s "
                              f"(running: {running or 'an in-process section'})")
        write()
        for child in list(_CHILDREN):
            child.stop()
        print(f"device_check: {results['stopped']}", file=sys.stderr, flush=True)
        os._exit(3)

    watchdog = threading.Timer(args.hard_limit_s, last_resort)
    watchdog.daemon = True
    watchdog.start()

    def section(name: str, fn, *a, progress: bool = False):
        """Runs one section; its result (or its error) is written at once, partial results as they come."""
        t0 = time.monotonic()

        def partial(value) -> None:
            results["sections"][name] = {"seconds": round(time.monotonic() - t0, 1), "result": value, "partial": True}
            write()
        try:
            value = fn(*a, partial) if progress else fn(*a)
        except Exception as exc:  # noqa: BLE001 - one section's failure must not lose the others
            value = {"error": repr(exc)[:300], "traceback": traceback.format_exc()[-1500:]}
        results["sections"][name] = {"seconds": round(time.monotonic() - t0, 1), "result": value}
        write()
        print(f"[{time.monotonic() - started:6.1f}s] {name}: {orjson.dumps(value).decode()[:600]}", flush=True)

    e2e_need = args.e2e_seconds + 90

    def limit(name: str, *later: str) -> float:
        """The section's planned limit, less what the budget left must keep for the sections after it."""
        left = args.budget_s - (time.monotonic() - started) - e2e_need - sum(MIN_USEFUL[n][dry] for n in later)
        return min(PLAN[name][1 if dry else 0], left)

    def bounded(name: str, fn, *a, later: tuple = ()) -> None:
        lim = limit(name, *later)
        if lim < MIN_USEFUL[name][dry]:
            results["sections"][name] = {"seconds": 0, "result": {"skipped": f"{lim:.0f} s of budget for it"}}
            write()
            print(f"[{time.monotonic() - started:6.1f}s] {name}: skipped, {lim:.0f} s of budget for it", flush=True)
            return
        section(name, fn, *a, lim, progress=True)

    min_s = 0.05 if dry else 0.4
    section("environment", environment, device)
    section("parity", parity, device, 8 if dry else 1024)
    section("preprocessing", preprocessing, device, 8 if dry else 1024, min_s)
    batches = DRY_BATCHES if dry else BATCHES
    section("throughput_bf16", throughput, device, batches, "fp32" if dry else "bf16", min_s)
    if not dry:
        section("throughput_fp16", throughput, device, (256, 1024, 4096), "fp16", min_s)
        section("throughput_fp32", throughput, device, (256, 1024, 4096), "fp32", min_s)
        torch.cuda.empty_cache()  # the children need the memory this process's allocator keeps
    batch, batch_from = best_batch(results, min(DRY_BATCHES) if dry else PROCESS_BATCH_CAP, 4 if dry else 512)
    compile_args = ("compiled", compiled, device, ("fp32",) if dry else ("bf16", "fp16"),
                    DRY_COMPILE_BATCHES if dry else COMPILE_BATCHES, min_s, args.compile_mode, args.compile_backend,
                    args.compile_budget_s)
    # the dry run's figures are not measurements: there the two child-process sections overlap, which keeps
    # it short; on the GPU they run one after the other
    overlapped = threading.Thread(target=bounded, args=compile_args, daemon=True) if dry else None
    if overlapped:
        overlapped.start()
    bounded("processes", processes, device, DRY_PROCESS_COUNTS if dry else PROCESS_COUNTS, batch, batch_from,
            "fp32" if dry else "bf16", args.phase_seconds, later=() if dry else ("compiled",))
    if overlapped:
        overlapped.join()
    else:
        bounded(*compile_args)
    left = args.budget_s - (time.monotonic() - started)
    if left > e2e_need:
        section("end_to_end", end_to_end, device, args.beds, args.e2e_seconds, args.max_batch)
    else:
        results["sections"]["end_to_end"] = {"seconds": 0, "result": {"skipped": f"{left:.0f} s of budget left"}}
    watchdog.cancel()
    results["total_s"] = round(time.monotonic() - started, 1)
    write()
    return results


def rows(results: dict) -> list[tuple[str, str]]:
    """(figure, value) rows for RESULTS.md."""
    s = {k: v["result"] for k, v in results["sections"].items()}
    env = s.get("environment", {})
    where = env.get("gpu", "CPU dry run")
    out = []
    par = s.get("parity", {})
    if "error" not in par:
        for prec in ("fp32", "bf16", "fp16"):
            if isinstance(par.get(prec), dict):
                p = par[prec]
                out.append((f"device check: {prec} on {where} vs CPU fp32, {par['windows']} real-shaped windows",
                            f"max abs dp {p['max_abs_dp']:.2e}, mean {p['mean_abs_dp']:.2e}, flips {p['flips']}"))
    pre = s.get("preprocessing", {})
    if "gpu_windows_per_s" in pre:
        out.append((f"device check: preprocessing (spectrogram + image steps) on {where} vs CPU",
                    f"{pre['gpu_windows_per_s']:.0f} vs {pre['cpu_windows_per_s']:.0f} windows/s; max abs diff "
                    f"{pre['max_abs_diff_vs_cpu']:.1e} ({pre['differing_pixels']} pixels differ)"))
    if "resize_int32_windows_per_s" in pre:
        out.append((f"device check: image resize alone on {where}, int32 two taps vs float64 matmuls, "
                    f"{pre['windows']} windows",
                    f"{pre['resize_int32_windows_per_s']:.0f} vs {pre['resize_float64_windows_per_s']:.0f} "
                    f"windows/s; pixels differing from the CPU's int32: "
                    f"{pre['resize_int32_differing_pixels_vs_cpu']} / {pre['resize_float64_differing_pixels_vs_cpu']}"))
    for name in ("throughput_bf16", "throughput_fp16", "throughput_fp32"):
        for r in s.get(name, []) if isinstance(s.get(name), list) else []:
            parts = [f"{k} {v:.0f}" for k, v in r.items() if isinstance(v, float)]
            out.append((f"device check: windows/s at batch {r['batch']} ({r['precision']}, {where})",
                        ", ".join(parts) or r.get("error", "?")))
    out += _compiled_rows(s.get("compiled", {}), where)
    proc = s.get("processes", {})
    for name, r in proc.get("rounds", {}).items():
        ks = [f"K={p['k']} {p['windows_per_s']:.0f} windows/s, p99 batch {p['p99_ms_max']:.0f} ms"
              + (f", GPU {p['gpu_util_mean_pct']}%" if p.get("gpu_util_mean_pct") is not None else "")
              for p in r.get("phases", []) if "windows_per_s" in p]
        out.append((f"device check: K worker processes sharing {where} ({name}), batch {proc['batch']} "
                    f"{proc['precision']}, {proc['phase_s']:g} s each; MPS: {proc['mps'].split(':')[0]}",
                    "; ".join(ks) or r.get("error", r.get("skipped", "?"))[:200]))
    e2e = s.get("end_to_end", {})
    if "flagged" in e2e:
        gpu = (f", GPU utilisation mean {e2e['gpu_util_mean_pct']}% (p95 {e2e['gpu_util_p95_pct']}%)"
               if "gpu_util_mean_pct" in e2e else "")
        out.append((f"device check: end to end, embedded broker, {e2e['beds']} beds real time "
                    f"{e2e['stream_seconds']:.0f} s, {e2e['precision']} on {where}",
                    f"flagged {e2e['flagged']}/{e2e['expected']}, latency p50 {e2e['latency_p50_ms']:.0f} ms, "
                    f"p99 {e2e['latency_p99_ms']:.0f} ms, {e2e['windows_per_s']:.0f} windows/s{gpu}"))
    return out


def _compiled_rows(c: dict, where: str) -> list[tuple[str, str]]:
    """One row per precision and batch (eager, CUDA graph, compiled: windows/s and parity), one for compiles."""
    if "mode" not in c:
        return []
    out, by = [], {}
    for r in c.get("rows", []):
        by.setdefault((r["precision"], r["batch"]), []).append(r)
    for (precision, b), rs in by.items():
        parts = [f"{r['variant']} {r['windows_per_s']:.0f}/s (max abs dp {r['max_abs_dp']:.1e}, {r['flips']} flips)"
                 for r in rs if "windows_per_s" in r]
        out.append((f"device check: whole path at batch {b}, {precision} on {where}, vs {c.get('reference', '?')} "
                    f"on {c.get('windows', '?')} windows", "; ".join(parts) or "; ".join(
                        f"{r['variant']}: {r.get('skipped') or r.get('error')}" for r in rs)))
    compiles = [f"{p} " + (f"{v['seconds']:.0f} s" if "seconds" in v else
                          next(iter(v.values()))[:150]) for p, v in c.get("compile", {}).items()]
    stop = c.get("gave_up") or c.get("error")
    out.append((f"device check: torch.compile time ({c['mode']}, {c['backend']}) on {where}, "
                f"budget {c['compile_budget_s']} s a compile",
                "; ".join(compiles + ([f"stopped: {stop[:150]}"] if stop and stop not in str(compiles) else []))
                or "no compile started"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="benchmarks/device_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="every section on the CPU at tiny sizes")
    ap.add_argument("--out", default=os.environ.get("OUT", "device-check-out"),
                    help="folder for device_check.json (default: $OUT, else ./device-check-out)")
    ap.add_argument("--record", action="store_true", help="append the rows to benchmarks/RESULTS.md")
    ap.add_argument("--from-json", default=None, help="record the rows of an earlier run's device_check.json")
    ap.add_argument("--beds", type=int, default=None, help="end to end: simulated beds (2000; dry run 6)")
    ap.add_argument("--e2e-seconds", type=float, default=None, help="end to end: stream length (60; dry run 12)")
    ap.add_argument("--max-batch", type=int, default=None, help="end to end: batching.max_batch (512; dry run 8)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="the whole run's budget: end to end is skipped "
                    "if it would not finish within it, and the bounded sections shrink to leave it room")
    ap.add_argument("--hard-limit-s", type=float, default=None, help="past this, the run records where it was "
                    "and exits 3 (default: --budget-s + 60)")
    ap.add_argument("--compile-mode", default=COMPILE_MODE,
                    choices=("reduce-overhead", "max-autotune-no-cudagraphs", "default"), help="torch.compile's mode")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile's backend (the tests: eager)")
    ap.add_argument("--compile-budget-s", type=float, default=None, help="each compile's budget (60; dry run 2)")
    ap.add_argument("--phase-seconds", type=float, default=None, help="processes: seconds per K (6; dry run 0.5)")
    ap.add_argument("--child", choices=("compiled", "worker"), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        (compiled_child if args.child == "compiled" else worker_child)(orjson.loads(args.spec))
        return
    dry = args.cpu_dry_run
    args.hard_limit_s = args.hard_limit_s or args.budget_s + 60
    args.compile_budget_s = args.compile_budget_s or (2.0 if dry else 60.0)
    args.phase_seconds = args.phase_seconds or (0.5 if dry else 6.0)
    args.beds = args.beds or (6 if dry else 2000)
    args.e2e_seconds = args.e2e_seconds or (12.0 if dry else 60.0)
    args.max_batch = args.max_batch or (8 if dry else 512)
    if args.from_json:
        results = orjson.loads(Path(args.from_json).read_bytes())
    else:
        results = measure(args)
    table = rows(results)
    for figure, value in table:
        print(f"{figure}: {value}")
    if args.record:
        from benchmarks.common import record

        command = "benchmarks/device_check" + (" --cpu-dry-run" if results.get("dry_run") else "")
        env = results["sections"].get("environment", {}).get("result", {})
        where = (results["date"], env.get("machine", "?"), env.get("commit", "?"))
        for figure, value in table:
            record(figure, value, command=command, where=where)
    failed = [k for k, v in results["sections"].items() if isinstance(v["result"], dict) and "error" in v["result"]]
    if failed:
        print(f"device_check: sections failed: {failed}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
