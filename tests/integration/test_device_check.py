"""benchmarks/device_check cannot rot: its CPU dry run runs every section (parity, preprocessing,
throughput, end to end on the embedded broker) at tiny sizes and records rows from its own JSON."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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
    assert set(sections) == {"environment", "parity", "preprocessing", "throughput_bf16", "end_to_end"}
    assert sections["parity"]["fp32"] == {"max_abs_dp": 0.0, "mean_abs_dp": 0.0, "flips": 0}
    assert [r["batch"] for r in sections["throughput_bf16"]] == [4, 8]
    assert all(r["network_eager"] > 0 and r["path_eager_pinned"] > 0 for r in sections["throughput_bf16"])
    assert sections["preprocessing"]["resize_int32_windows_per_s"] > 0, sections["preprocessing"]
    assert sections["preprocessing"]["resize_int32_differing_pixels_vs_cpu"] == 0
    e2e = sections["end_to_end"]
    assert e2e["flagged"] == e2e["expected"] > 0, e2e
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
    assert added.count("device check:") == 5, added  # parity fp32, 2 batches, the resize, end to end
    assert results["sections"]["environment"]["result"]["machine"] in added
