"""streamer-client, the downstream reader, is its own distribution: installed alone into a fresh virtual
environment it brings orjson and nothing heavy (no torch, numpy or pydantic), and it reads what the
worker's publisher writes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _site_bytes(env_dir: Path) -> int:
    site = next(env_dir.glob("lib/python*/site-packages"))
    skip = ("pip", "setuptools", "_distutils_hack", "distutils-precedence.pth")
    return sum(f.stat().st_size for top in site.iterdir() if not top.name.startswith(skip)
               for f in ([top] if top.is_file() else top.rglob("*")) if f.is_file())


@pytest.mark.integration
def test_the_client_installs_without_torch_numpy_or_pydantic(tmp_path):
    env_dir = tmp_path / "alarm-system"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    source = tmp_path / "client"  # a copy: building writes build/ and egg-info beside the sources
    shutil.copytree(REPO / "client", source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    done = subprocess.run([py, "-m", "pip", "install", "-q", str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    probe = """
import importlib.util, json, time, streamer_client
from streamer_client import MessageError, SuppressionView, decode_episode
heavy = [m for m in ("torch", "numpy", "pydantic", "pandas", "aiokafka") if importlib.util.find_spec(m)]
now = time.time_ns()
msg = {"schema": 2, "episode_id": "bed-1:1", "patient_id": "bed-1", "seq": 7, "state": "open", "renewal": False,
       "reason": None, "start_ns": 1, "end_ns": None, "last_flagged_end_ns": 2, "peak_probability": 0.9,
       "flagged_windows": 2, "model": "m@sha256:0", "updated_at_ns": now, "valid_until_ns": now + 30 * 10**9,
       "lease_ns": 30 * 10**9}
view = SuppressionView()
view.apply(decode_episode(json.dumps(msg).encode()))
forged = {**msg, "patient_id": "bed-2", "lease_ns": 10**18, "valid_until_ns": now + 10**18}
try:
    decode_episode(json.dumps(forged).encode())
    refused = False
except MessageError:
    refused = True
from streamer_client.frames import encode_frame  # a gateway's binary frames, standard library only
frames = [encode_frame("bed-7", 1_764_000_000 * 10**9, 500.0, [0.125, -1.5, 2.0], seq=3).hex(),
          encode_frame("Zoë-2", 1_764_000_000 * 10**9, 250.0, [-200, 0, 400.4], lead="MLII", counts_gain=200.0,
                       baseline=0.0, segment_start_ns=1_763_999_990 * 10**9).hex()]
print(json.dumps({"heavy": heavy, "suppressed": view.suppressed("bed-1"), "version": streamer_client.__version__,
                  "forged_refused": refused, "capped": view.lease_end_ns("bed-1") - now <= 35 * 10**9 + 10**9,
                  "frames": frames}))
"""
    out = subprocess.run([py, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    got = json.loads(out.stdout)
    assert got["heavy"] == [] and got["suppressed"] is True and got["version"] == "0.1.0"
    assert got["forged_refused"] and got["capped"], "the installed client checks ranges and caps the lease"
    # the gateway's frames decode in the worker exactly as its own encoder's
    from streamer.ingest.contract import Chunk, decode_binary, encode_binary

    first, second = (bytes.fromhex(f) for f in got["frames"])
    chunk = decode_binary(first)
    assert (chunk.patient_id, chunk.lead, chunk.fs, chunk.seq) == ("bed-7", "II", 500.0, 3)
    assert chunk.segment_start_ns is None
    assert list(chunk.samples) == [0.125, -1.5, 2.0]
    assert first == encode_binary(Chunk("bed-7", "II", 1_764_000_000 * 10**9, 500.0, chunk.samples, seq=3))
    counts = decode_binary(second)
    assert (counts.patient_id, counts.lead, counts.segment_start_ns) == ("Zoë-2", "MLII", 1_763_999_990 * 10**9)
    assert list(counts.samples) == [-1.0, 0.0, 2.0]  # (counts - baseline) / gain, counts rounded
    size = _site_bytes(env_dir)
    print(f"streamer-client installed size: {size / 1e6:.2f} MB")  # recorded in the issue note
    assert size < 5e6, f"{size / 1e6:.1f} MB: the client must stay small"


def test_the_worker_package_reexports_the_client():
    import streamer.client
    import streamer_client

    assert streamer.client.SuppressionView is streamer_client.SuppressionView
    assert set(streamer_client.__all__) <= set(dir(streamer.client))


def test_an_offline_command_without_its_extra_names_it(monkeypatch, capsys):
    """A worker-only install (no `offline` extra): `streamer score` says which extra to install."""
    from streamer.cli import main

    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now raises ModuleNotFoundError
    for name in [m for m in sys.modules if m.startswith("streamer.offline")]:
        monkeypatch.delitem(sys.modules, name)
    assert main(["score", "rec.csv", "--out", "o.csv"]) == 2
    assert "pip install 'streamer[offline]'" in capsys.readouterr().err


def test_the_client_frame_encoder_refuses_what_it_cannot_send_faithfully():
    from streamer_client.frames import encode_frame

    with pytest.raises(ValueError, match="int16"):
        encode_frame("bed-1", 1, 500.0, [40000], counts_gain=200.0)  # never clipped silently
    with pytest.raises(ValueError, match="patient_id"):
        encode_frame("", 1, 500.0, [0.0])
    with pytest.raises(ValueError, match="fs"):
        encode_frame("bed-1", 1, float("nan"), [0.0])
