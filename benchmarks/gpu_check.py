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
import os
import platform
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import orjson

BATCHES = (64, 128, 256, 512, 1024, 2048, 4096)
DRY_BATCHES = (4, 8)


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

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

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


# -- the run ------------------------------------------------------------------------------------------
def measure(args) -> dict:
    import torch

    dry = args.cpu_dry_run
    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        raise SystemExit("device_check: no CUDA device here (use --cpu-dry-run to try the script on a CPU)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results: dict = {"date": time.strftime("%Y-%m-%d"), "dry_run": dry, "sections": {}}

    def section(name: str, fn, *a):
        t0 = time.monotonic()
        try:
            value = fn(*a)
        except Exception as exc:  # noqa: BLE001 - one section's failure must not lose the others
            value = {"error": repr(exc)[:300], "traceback": traceback.format_exc()[-1500:]}
        results["sections"][name] = {"seconds": round(time.monotonic() - t0, 1), "result": value}
        (out_dir / "device_check.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
        print(f"[{time.monotonic() - started:6.1f}s] {name}: {orjson.dumps(value).decode()[:600]}", flush=True)

    min_s = 0.05 if dry else 0.4
    section("environment", environment, device)
    section("parity", parity, device, 8 if dry else 1024)
    section("preprocessing", preprocessing, device, 8 if dry else 1024, min_s)
    batches = DRY_BATCHES if dry else BATCHES
    section("throughput_bf16", throughput, device, batches, "fp32" if dry else "bf16", min_s)
    if not dry:
        section("throughput_fp16", throughput, device, (256, 1024, 4096), "fp16", min_s)
        section("throughput_fp32", throughput, device, (256, 1024, 4096), "fp32", min_s)
    left = args.budget_s - (time.monotonic() - started)
    if left > args.e2e_seconds + 90:
        section("end_to_end", end_to_end, device, args.beds, args.e2e_seconds, args.max_batch)
    else:
        results["sections"]["end_to_end"] = {"seconds": 0, "result": {"skipped": f"{left:.0f} s of budget left"}}
    results["total_s"] = round(time.monotonic() - started, 1)
    (out_dir / "device_check.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
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
    e2e = s.get("end_to_end", {})
    if "flagged" in e2e:
        gpu = (f", GPU utilisation mean {e2e['gpu_util_mean_pct']}% (p95 {e2e['gpu_util_p95_pct']}%)"
               if "gpu_util_mean_pct" in e2e else "")
        out.append((f"device check: end to end, embedded broker, {e2e['beds']} beds real time "
                    f"{e2e['stream_seconds']:.0f} s, {e2e['precision']} on {where}",
                    f"flagged {e2e['flagged']}/{e2e['expected']}, latency p50 {e2e['latency_p50_ms']:.0f} ms, "
                    f"p99 {e2e['latency_p99_ms']:.0f} ms, {e2e['windows_per_s']:.0f} windows/s{gpu}"))
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
    ap.add_argument("--budget-s", type=float, default=450.0, help="the end-to-end section is skipped if it "
                    "would not finish within this many seconds of the start")
    args = ap.parse_args()
    dry = args.cpu_dry_run
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
