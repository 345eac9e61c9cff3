"""benchmarks/device_check cannot rot: its CPU dry run runs every section (parity, preprocessing,
throughput, K worker processes, eager/graphs/torch.compile, end to end on the embedded broker) at tiny sizes
and records rows from its own JSON. The compiled section's measuring after a compile, which the dry run's
2 s compile budget rarely reaches on a CPU, and its hard limit are tested on their own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def test_cpu_dry_run_measures_every_section_and_records_rows(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, STREAMER_LOG_LEVEL="warning")
    run = subprocess.run([str(ROOT / "benchmarks" / "device_check"), "--cpu-dry-run", "--out", str(out)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = orjson.loads((out / "device_check.json").read_bytes())
    sections = {k: v["result"] for k, v in results["sections"].items()}
    assert set(sections) == {"environment", "parity", "preprocessing", "throughput_bf16", "processes", "compiled",
                             "end_to_end"}
    assert results["plan"].startswith("plan (s): ") and results["plan"] in run.stdout
    assert sections["parity"]["fp32"] == {"max_abs_dp": 0.0, "mean_abs_dp": 0.0, "flips": 0}
    assert [r["batch"] for r in sections["throughput_bf16"]] == [4, 8]
    assert all(r["network_eager"] > 0 and r["path_eager_pinned"] > 0 for r in sections["throughput_bf16"])
    assert sections["preprocessing"]["resize_int32_windows_per_s"] > 0, sections["preprocessing"]
    assert sections["preprocessing"]["resize_int32_differing_pixels_vs_cpu"] == 0
    e2e = sections["end_to_end"]
    assert e2e["flagged"] == e2e["expected"] > 0, e2e
    # K processes: every phase measured by every one of its K workers
    proc = sections["processes"]
    assert proc["mps"].startswith("not used: CPU dry run"), proc
    phases = proc["rounds"]["time_sliced"]["phases"]
    assert [p["k"] for p in phases] == [1, 2], proc
    assert all(len(p["per_process"]) == p["k"] and p["windows_per_s"] > 0 for p in phases), proc
    assert all(w["p99_ms"] >= w["p50_ms"] > 0 and w["batches"] > 0 for p in phases for w in p["per_process"]), proc
    # compiled: eager measured against the fp32 reference whatever the compile did; the compile has either
    # its time or the reason it has none (on a CPU it mostly gives up at its 2 s budget), and the run went on
    comp = sections["compiled"]
    eager = [r for r in comp["rows"] if r["variant"] == "eager"]
    assert [r["batch"] for r in eager] == [4] and eager[0]["windows_per_s"] > 0 and eager[0]["flips"] == 0, comp
    assert eager[0]["max_abs_dp"] < 1e-5, comp
    fp32 = comp["compile"]["fp32"]
    assert fp32.get("seconds", 0) > 0 or any(isinstance(v, str) and v for v in fp32.values()), comp
    if "seconds" in fp32:
        assert any(r["variant"] == "compiled" and r["windows_per_s"] > 0 for r in comp["rows"]), comp
    assert "error" not in comp, comp
    # the rows a GPU run would bring back are recorded here from its JSON, with its machine and date
    results_md = tmp_path / "RESULTS.md"
    shutil.copy(ROOT / "benchmarks" / "RESULTS.md", results_md)
    code = ("import sys, benchmarks.common as c, pathlib; c.RESULTS = pathlib.Path(sys.argv[1]); "
            "sys.argv = ['device_check', '--from-json', sys.argv[2], '--record']; "
            "import benchmarks.gpu_check as g; g.main()")
    rec = subprocess.run([sys.executable, "-c", code, str(results_md), str(out / "device_check.json")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert rec.returncode == 0, rec.stderr[-2000:]
    added = results_md.read_text()[len((ROOT / "benchmarks" / "RESULTS.md").read_text()):]
    # parity fp32, 2 batches, the resize, processes, compiled at batch 4 and its compile row, end to end
    assert added.count("device check:") == 8, added
    assert "torch.compile time (reduce-overhead, inductor)" in added and "K=2 " in added, added
    assert results["sections"]["environment"]["result"]["machine"] in added


def test_compiled_section_measures_after_a_compile_and_keeps_what_came_before(tmp_path):
    """After a compile (dynamo without Inductor here: seconds, not minutes, on a CPU): the compiled rows at
    two batch sizes, each against the fp32 reference on every window, beside eager; reported as they come."""
    from benchmarks import gpu_check

    seen = []
    out = gpu_check.compiled("cpu", ("fp32",), (2, 4), 0.05, "reduce-overhead", "eager", 120, 300,
                             lambda value: seen.append(orjson.loads(orjson.dumps(value))))
    assert "error" not in out and "gave_up" not in out, out
    assert out["compile"]["fp32"]["seconds"] > 0, out
    by = {(r["variant"], r["batch"]): r for r in out["rows"]}
    for variant in ("eager", "compiled"):
        for b in (2, 4):
            r = by[(variant, b)]
            assert r["windows_per_s"] > 0 and r["flips"] == 0 and r["max_abs_dp"] < 1e-5, r
    assert by[("graph", 2)]["skipped"] == "CUDA graphs run on CUDA only"
    # partial results went out before the compile: eager rows were there while compiled ones were not
    assert any(any(r["variant"] == "eager" for r in v["rows"]) and not v["compile"] for v in seen), seen


def test_compiled_section_is_stopped_at_its_limit_with_the_reason():
    from benchmarks import gpu_check

    t0 = time.monotonic()
    out = gpu_check.compiled("cpu", ("fp32",), (4,), 0.05, "reduce-overhead", "inductor", 60, 1.5, lambda v: None)
    assert time.monotonic() - t0 < 15, "the child was not stopped at the limit"
    assert out["gave_up"].startswith("stopped at the section's limit (2 s) while "), out
    assert "error" not in out


def test_past_its_hard_limit_the_run_records_where_it_was_and_exits(tmp_path):
    """The lease is short: a run that overstays stops by itself, keeping what it measured and saying where."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), STREAMER_LOG_LEVEL="warning")
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--cpu-dry-run", "--out", str(out),
                          "--hard-limit-s", "4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, run.stdout[-2000:] + run.stderr[-2000:]
    results = orjson.loads((out / "device_check.json").read_bytes())
    assert results["stopped"].startswith("past the hard limit of 4 s"), results
    assert results["sections"]["environment"]["result"]["device"] == "cpu"
    assert "past the hard limit" in run.stderr
