"""Damaged or hostile recording files given to `streamer score`, `replay` and `validate` (issue 45, item 8).

Every fixture is built here, with the real writers (pyarrow, wfdb, edfio, numpy, zipfile) or raw bytes for
what they refuse to write, and given to the real command. Each must be refused with exit 2 and one line on
stderr that names the file, no traceback; the files whose header claims a huge length are refused before
their data are read, in seconds and a bounded memory."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from streamer.cli import main
from streamer.offline.recordings import RecordingError, RecordingLimits, load_recording
from streamer.settings import WindowSettings
from streamer.spec import WINDOW_NS
from streamer.synthetic import generate

FS = 250


@pytest.fixture(autouse=True)
def _json_logs(monkeypatch):
    """Log lines as JSON objects, so that the one sentence a command says is told apart from its logging."""
    monkeypatch.setenv("STREAMER_LOG_FORMAT", "json")
T0 = 946_684_800_000_000_000  # 2000-01-01, the default start of relative recordings

# Runs a command in a child and prints, last, its exit code (124: killed after 90 s) and peak RSS in KiB:
# the wrapper's only child, so no earlier subprocess of the test session can leak into the figure.
_MEASURED = """
import resource, subprocess, sys
try:
    code = subprocess.run(sys.argv[1:], timeout=90).returncode
except subprocess.TimeoutExpired:
    code = 124
print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
"""


def _streamer(*args: str) -> tuple[int, list[str], int]:
    """`python -m streamer ARGS` as a user runs it: (exit code, stderr lines, peak RSS in MiB)."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "STREAMER_LOG_FORMAT": "json"}
    r = subprocess.run([sys.executable, "-c", _MEASURED, sys.executable, "-m", "streamer", *args],
                       capture_output=True, text=True, env=env, timeout=150)
    lines = r.stderr.splitlines()
    code, rss_kib = (int(v) for v in lines[-1].split())
    return code, lines[:-1], rss_kib // 1024


def _ecg(seconds: float = 25.0) -> np.ndarray:
    return generate(seconds, fs=FS, seed=5).values


# -- the hostile files ----------------------------------------------------------------------------
def parquet_text_cell(d: Path) -> tuple[Path, list[str]]:
    cells = [f"{v:.4f}" for v in _ecg()]
    cells[1234] = "lead-off"
    path = d / "text.parquet"
    pq.write_table(pa.table({"II": pa.array(cells)}), path)
    return path, ["--fs", str(FS)]


def csv_lead_off(d: Path) -> tuple[Path, list[str]]:
    values = [f"{v:.4f}" for v in _ecg()]
    values[2000] = "lead-off"
    path = d / "lead_off.csv"
    path.write_text("II\n" + "\n".join(values) + "\n")
    return path, ["--fs", str(FS)]


def object_npy(d: Path) -> tuple[Path, list[str]]:
    path = d / "objects.npy"
    np.save(path, np.array([0.1, "x", {"a": 1}, None], dtype=object), allow_pickle=True)
    return path, ["--fs", str(FS)]


def truncated_parquet(d: Path) -> tuple[Path, list[str]]:
    path = d / "truncated.parquet"
    pq.write_table(pa.table({"II": _ecg()}), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, ["--fs", str(FS)]


def directory(d: Path) -> tuple[Path, list[str]]:
    path = d / "folder.csv"
    path.mkdir()
    return path, ["--fs", str(FS)]


def _wfdb(d: Path, name: str = "rec") -> Path:
    import wfdb

    d.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(name, fs=FS, units=["mV"], sig_name=["II"], p_signal=_ecg()[:, None], fmt=["16"], write_dir=str(d))
    return d / f"{name}.hea"


def _renamed_signal_file(hea: Path, name: str) -> None:
    """The header's signal file name replaced by `name` (wfdb writes only names beside the header)."""
    lines = hea.read_text().splitlines()
    lines[1] = " ".join([name, *lines[1].split()[1:]])
    hea.write_text("\n".join(lines) + "\n")


def wfdb_parent_path(d: Path) -> tuple[Path, list[str]]:
    _wfdb(d / "other")  # a readable signal file, in another folder
    hea = _wfdb(d / "mine")
    _renamed_signal_file(hea, "../other/rec.dat")
    return hea, []


def wfdb_absolute_path(d: Path) -> tuple[Path, list[str]]:
    elsewhere = _wfdb(d / "other").with_suffix(".dat")
    hea = _wfdb(d / "mine")
    _renamed_signal_file(hea, str(elsewhere.resolve()))
    return hea, []


def wfdb_symlink_out(d: Path) -> tuple[Path, list[str]]:
    elsewhere = _wfdb(d / "other").with_suffix(".dat")
    hea = _wfdb(d / "mine")
    (d / "mine" / "linked.dat").symlink_to(elsewhere.resolve())
    _renamed_signal_file(hea, "linked.dat")
    return hea, []


def wfdb_huge_rate(d: Path) -> tuple[Path, list[str]]:
    """fs = 1e12 Hz and 1e11 samples claimed over a 50-byte signal file."""
    (d / "huge.dat").write_bytes(np.zeros(25, dtype="<i2").tobytes())
    hea = d / "huge.hea"
    hea.write_text("huge 1 1000000000000 100000000000\nhuge.dat 16 200/mV 16 0 0 0 0 II\n")
    return hea, []


def edf_forged_records(d: Path) -> tuple[Path, list[str]]:
    """A real EDF of 2.5 s whose header then claims 10,000,000 data records."""
    import edfio

    path = d / "forged.edf"
    x = _ecg(2.5)
    edfio.Edf([edfio.EdfSignal(x, sampling_frequency=FS, label="ECG II", physical_dimension="mV",
                               physical_range=(-10, 10))], data_record_duration=0.5).write(path)
    data = bytearray(path.read_bytes())
    data[236:244] = b"10000000"
    path.write_bytes(bytes(data))
    return path, []


def npz_bomb(d: Path) -> tuple[Path, list[str]]:
    """About 1.8 MB on disk that inflate to 200 million samples: zeros, deflated, with a real 'fs'."""
    from numpy.lib import format as npformat

    n, path = 200_000_000, d / "bomb.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("signal.npy", "w", force_zip64=True) as f:
            npformat.write_array_header_1_0(f, {"descr": "<i2", "fortran_order": False, "shape": (n,)})
            block = bytes(1 << 24)
            for left in range(n * 2, 0, -len(block)):
                f.write(block[:left])
        with zf.open("fs.npy", "w") as f:
            npformat.write_array(f, np.array(float(FS)))
    assert path.stat().st_size < 4_000_000
    return path, []


def wfdb_short_signal_file(d: Path) -> tuple[Path, list[str]]:
    """A real record whose signal file lost its second half."""
    hea = _wfdb(d)
    dat = hea.with_suffix(".dat")
    dat.write_bytes(dat.read_bytes()[: dat.stat().st_size // 2])
    return hea, []


def npy_forged_length(d: Path) -> tuple[Path, list[str]]:
    """A real .npy whose header then claims 100 times the samples its file holds."""
    path = d / "forged.npy"
    np.save(path, _ecg())
    data = path.read_bytes()
    forged = data.replace(b"(6250,), }  ", b"(625000,), }", 1)  # the header's padding keeps its length
    assert forged != data
    path.write_bytes(forged)
    return path, ["--fs", str(FS)]


HOSTILE = [parquet_text_cell, csv_lead_off, object_npy, truncated_parquet, directory, wfdb_parent_path,
           wfdb_absolute_path, wfdb_symlink_out, wfdb_huge_rate, edf_forged_records, wfdb_short_signal_file,
           npy_forged_length]
LARGE_CLAIMS = [wfdb_huge_rate, edf_forged_records, npz_bomb]


def _refused_in_one_line(code: int, lines: list[str], path: Path, command: str) -> str:
    """Exit 2 and one line naming the file. Structured log lines (JSON objects, e.g. the notice that patient
    ids are hashed) are the logger's, not the refusal: a person sees exactly one sentence."""
    assert code == 2, lines[-30:]
    assert not any("Traceback" in line for line in lines), lines[-30:]
    said = [line for line in lines if not line.startswith("{")]
    assert len(said) == 1, lines
    assert said[0].startswith(f"streamer {command}: ") and str(path) in said[0], lines
    return said[0]


# -- score --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", HOSTILE, ids=lambda f: f.__name__)
def test_score_refuses_a_hostile_recording_in_one_line(make, tmp_path, capsys):
    """In process, as tests/unit/test_validate.py runs commands (any traceback would be an exception here)."""
    path, extra = make(tmp_path)
    code = main(["score", str(path), *extra, "--demo", "--out", str(tmp_path / "o.csv")])
    _refused_in_one_line(code, capsys.readouterr().err.splitlines(), path, "score")
    assert not (tmp_path / "o.csv").exists()


def test_score_refuses_as_a_user_runs_it(tmp_path):
    """The same through `python -m streamer score`: the exit code and the stderr a person sees."""
    path, extra = csv_lead_off(tmp_path)
    code, lines, _ = _streamer("score", str(path), *extra, "--demo", "--out", str(tmp_path / "o.csv"))
    assert "'lead-off' at row 2000" in _refused_in_one_line(code, lines, path, "score")


@pytest.mark.parametrize("make", LARGE_CLAIMS, ids=lambda f: f.__name__)
def test_a_huge_claim_is_refused_before_the_data_are_read(make, tmp_path):
    """The 1.8 MB .npz once inflated to 200 M samples (6.2 GB, 80 s) and score ran past 240 s; a WFDB header
    at 1e12 Hz and an EDF header of 10 M records passed with "0 windows". Each is refused from its header:
    the whole command within its timeout, and in about what the interpreter, pandas and torch take alone
    (about 1 GiB; the .npz's samples alone would add 3.2 GB as timestamps and float64)."""
    path, extra = make(tmp_path)
    code, lines, rss_mib = _streamer("score", str(path), *extra, "--demo", "--out", str(tmp_path / "o.csv"))
    line = _refused_in_one_line(code, lines, path, "score")
    assert rss_mib < 1500, f"peak RSS {rss_mib} MiB: the data were inflated ({line})"


def test_a_wide_parquet_file_inflates_only_the_columns_read(tmp_path):
    """A Parquet file of a few MB: lead II beside 800 columns of zeros, 1.6 GB once decompressed. Only the
    columns a recording uses are read: the lead, in about what the interpreter and pandas take alone."""
    rows, path = 250_000, tmp_path / "wide.parquet"
    zeros = pa.array(np.zeros(rows))  # one buffer, shared by every column while writing
    columns = {f"lead_{i}": zeros for i in range(800)}
    pq.write_table(pa.table({**columns, "II": pa.array(np.resize(_ecg(), rows))}), path)
    assert path.stat().st_size < 20_000_000
    probe = "import sys; from streamer.offline.recordings import load_recording; " \
            "print(len(load_recording(sys.argv[1], fs=250).values), file=sys.stderr)"
    r = subprocess.run([sys.executable, "-c", _MEASURED, sys.executable, "-c", probe, str(path)],
                       capture_output=True, text=True, timeout=150)
    lines = r.stderr.splitlines()
    code, rss_kib = (int(v) for v in lines[-1].split())
    assert code == 0 and lines[-2] == str(rows), lines[-20:]
    assert rss_kib // 1024 < 700, f"peak RSS {rss_kib // 1024} MiB: every column was read"


def test_the_reasons_say_what_is_wrong(tmp_path):
    """The one line says the problem, not only that there is one."""
    expected = {parquet_text_cell: "'lead-off' at row 1234", csv_lead_off: "'lead-off' at row 2000",
                object_npy: "object values", truncated_parquet: "not a readable Parquet file",
                directory: "is a directory", wfdb_parent_path: "outside its folder",
                wfdb_absolute_path: "outside its folder", wfdb_symlink_out: "outside its folder",
                wfdb_huge_rate: "outside the [50, 10000] Hz", edf_forged_records: "claims 10,000,000 data records",
                npz_bomb: "200,000,000 samples, more than the 172,800,000 --max-recording-hours 48 allows",
                wfdb_short_signal_file: "claims 6,250 samples, more than its signal file 'rec.dat' holds",
                npy_forged_length: "header claims (625000,) float64 values, more than its"}
    for make, reason in expected.items():
        d = tmp_path / make.__name__
        d.mkdir()
        path, extra = make(d)
        fs = float(extra[1]) if extra else None
        with pytest.raises(RecordingError) as caught:
            load_recording(path, fs=fs)
        assert reason in str(caught.value) and str(path) in str(caught.value), (make.__name__, str(caught.value))


# -- replay and validate read recordings the same way ---------------------------------------------
@pytest.mark.parametrize("make", [csv_lead_off, object_npy, wfdb_parent_path, edf_forged_records],
                         ids=lambda f: f.__name__)
def test_replay_refuses_before_any_broker_is_contacted(make, tmp_path, capsys):
    path, extra = make(tmp_path)
    code = main(["replay", str(path), *extra, "--patient", "p1", "--bootstrap", "127.0.0.1:9"])
    _refused_in_one_line(code, capsys.readouterr().err.splitlines(), path, "replay")


def _flags_and_labels(tmp_path: Path) -> list[str]:
    rows = [{"window_start_ns": T0 + k * WINDOW_NS, "window_end_ns": T0 + (k + 1) * WINDOW_NS,
             "probability": k / 4, "threshold": 0.5, "model": "m", "status": "scored"} for k in range(4)]
    pd.DataFrame(rows).to_csv(tmp_path / "flags.csv", index=False)
    pd.DataFrame({"start_ns": [T0], "end_ns": [T0 + WINDOW_NS]}).to_csv(tmp_path / "labels.csv", index=False)
    return ["--flags", str(tmp_path / "flags.csv"), "--labels", str(tmp_path / "labels.csv"),
            "--bootstrap-samples", "20", "--report", str(tmp_path / "r" / "v.md")]


@pytest.mark.parametrize("make", [parquet_text_cell, truncated_parquet, directory, wfdb_symlink_out],
                         ids=lambda f: f.__name__)
def test_validate_refuses_a_hostile_recording_in_one_line(make, tmp_path, capsys):
    path, extra = make(tmp_path)
    code = main(["validate", *_flags_and_labels(tmp_path), "--recording", str(path), *extra])
    _refused_in_one_line(code, capsys.readouterr().err.splitlines(), path, "validate")


def test_validate_names_a_forged_edf_labels_file(tmp_path, capsys):
    path, _ = edf_forged_records(tmp_path)
    args = _flags_and_labels(tmp_path)
    args[3] = str(path)  # --labels: an EDF+ file's annotations
    _refused_in_one_line(main(["validate", *args]), capsys.readouterr().err.splitlines(), path, "validate")


# -- the bound is a flag, and valid files read as before -------------------------------------------
def test_max_recording_hours_bounds_and_raises_the_length(tmp_path, capsys):
    """25 s at 250 Hz: refused under a 20 s bound (before its data are read), read under the default."""
    hea = _wfdb(tmp_path / "ok")
    limits = RecordingLimits.of(WindowSettings(), max_hours=20 / 3600)
    with pytest.raises(RecordingError, match="spans 0.006944 h, more than --max-recording-hours 0.00555556"):
        load_recording(hea, limits=limits)
    assert len(load_recording(hea).values) == 25 * FS
    out = str(tmp_path / "o.csv")
    assert main(["score", str(hea), "--demo", "--out", out, "--max-recording-hours", str(20 / 3600)]) == 2
    assert "--max-recording-hours" in capsys.readouterr().err
    assert "--max-recording-hours" in subprocess.run([sys.executable, "-m", "streamer", "score", "--help"],
                                                     capture_output=True, text=True, timeout=60).stdout


def test_the_rate_range_is_the_streams_own_setting(tmp_path):
    """The range comes from windows.min_rate_hz / max_rate_hz: a worker configured for 20 kHz, and the
    offline reader with those settings, accept a 20 kHz recording; the default refuses it."""
    x = _ecg()
    np.save(tmp_path / "r.npy", x)
    with pytest.raises(RecordingError, match="outside the \\[50, 10000\\] Hz"):
        load_recording(tmp_path / "r.npy", fs=20_000)
    wide = RecordingLimits.of(WindowSettings(max_rate_hz=20_000))
    assert load_recording(tmp_path / "r.npy", fs=20_000, limits=wide).fs == 20_000


def test_valid_recordings_in_every_format_read_as_before(tmp_path):
    """The checks refuse nothing valid: the same samples through .npy, .npz (fs and times_ns), CSV,
    Parquet, WFDB (two leads, one picked) and EDF."""
    import datetime

    import edfio
    import wfdb

    x = _ecg()
    ref = load_recording(_npy(tmp_path, x), fs=FS)
    np.savez(tmp_path / "a.npz", signal=x, fs=np.array(float(FS)))
    np.savez_compressed(tmp_path / "b.npz", ecg=x, times_ns=ref.times_ns)
    pd.DataFrame({"II": x}).to_csv(tmp_path / "c.csv", index=False, float_format="%.17g")
    pq.write_table(pa.table({"time_ns": ref.times_ns, "II": x}), tmp_path / "d.parquet")
    wfdb.wrsamp("w", fs=FS, units=["mV", "mV"], sig_name=["V1", "II"], p_signal=np.stack([x / 2, x], axis=1),
                fmt=["16", "16"], write_dir=str(tmp_path))
    edfio.Edf([edfio.EdfSignal(x, sampling_frequency=FS, label="EKG II", physical_dimension="mV")],
              recording=edfio.Recording(startdate=datetime.date(2000, 1, 1)), starttime=datetime.time(0, 0, 0)
              ).write(tmp_path / "e.edf")
    for path, kwargs, tolerance in [("a.npz", {}, 0), ("b.npz", {}, 0), ("c.csv", {"fs": FS}, 0),
                                    ("d.parquet", {}, 0), ("w.hea", {}, 1e-2), ("e.edf", {}, 1e-2)]:
        rec = load_recording(tmp_path / path, **kwargs)
        np.testing.assert_array_equal(rec.times_ns, ref.times_ns, err_msg=path)
        np.testing.assert_allclose(rec.values, x, atol=tolerance, err_msg=path)
        assert rec.fs == FS, path


def _npy(tmp_path: Path, x: np.ndarray) -> Path:
    np.save(tmp_path / "r.npy", x)
    return tmp_path / "r.npy"


# -- fuzz: any bytes, and damaged valid files -----------------------------------------------------
def _valid_files(d: Path) -> dict[str, bytes]:
    """One small valid file of each format, as bytes (WFDB: header and signal file, joined by a marker)."""
    import datetime

    import edfio
    import wfdb

    x = generate(12.0, fs=FS, seed=9).values
    np.save(d / "v.npy", x)
    np.savez(d / "v.npz", signal=x, fs=np.array(float(FS)))
    pd.DataFrame({"II": x}).to_csv(d / "v.csv", index=False)
    pq.write_table(pa.table({"II": x}), d / "v.parquet")
    edfio.Edf([edfio.EdfSignal(x, sampling_frequency=FS, label="II", physical_dimension="mV")],
              recording=edfio.Recording(startdate=datetime.date(2026, 3, 1)), starttime=datetime.time(8, 0, 0),
              data_record_duration=1.0).write(d / "v.edf")
    wfdb.wrsamp("v", fs=FS, units=["mV"], sig_name=["II"], p_signal=x[:, None], fmt=["16"], write_dir=str(d))
    files = {s: (d / f"v{s}").read_bytes() for s in (".npy", ".npz", ".csv", ".parquet", ".edf")}
    files[".hea"] = (d / "v.hea").read_bytes() + _WFDB_SPLIT + (d / "v.dat").read_bytes()
    return files


_WFDB_SPLIT = b"\0--dat--\0"
_SUFFIXES = [".csv", ".npy", ".npz", ".parquet", ".edf", ".hea"]


@st.composite
def _damaged(draw, valid: dict[str, bytes]) -> tuple[str, bytes]:
    suffix = draw(st.sampled_from(_SUFFIXES))
    if draw(st.booleans()):
        return suffix, draw(st.binary(max_size=600))
    data = bytearray(valid[suffix])
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["byte", "digits", "cut"]))
        if action == "byte":
            data[at] = draw(st.integers(0, 255))
        elif action == "digits":  # a number in a header made huge, negative or odd
            data[at:at + 4] = draw(st.sampled_from([b"9999", b"-1  ", b"1e12", b"0   ", b"nan ", b"../."]))
        else:
            del data[at:]
            break
    return suffix, bytes(data)


_VALID: dict[str, bytes] = {}


@pytest.mark.timeout(600)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_recordings_load_plausibly_or_are_refused_in_one_line(tmp_path_factory, data):
    """Arbitrary bytes and damaged valid files of every format, through the reader every command uses:
    a recording whose content is plausible, or a RecordingError of one line naming the file. Nothing else
    (no other exception), and each within seconds."""
    if not _VALID:
        _VALID.update(_valid_files(tmp_path_factory.mktemp("valid")))
    suffix, raw = data.draw(_damaged(_VALID))
    d = tmp_path_factory.mktemp("fuzz")
    path = d / f"v{suffix}"
    if suffix == ".hea":
        header, _, signal = raw.partition(_WFDB_SPLIT)
        path.write_bytes(header)
        (d / "v.dat").write_bytes(signal)
    else:
        path.write_bytes(raw)
    limits = RecordingLimits()
    try:
        rec = load_recording(path, fs=FS if suffix in (".csv", ".npy", ".parquet") else None)
    except RecordingError as exc:
        message = str(exc)
        assert "\n" not in message and str(path) in message and len(message) <= 400, message
        event(f"{suffix} refused: {message.removeprefix(str(path) + ': ')[:30]}")
        return
    event(f"{suffix} read")
    n = len(rec.values)
    assert 0 < n <= limits.max_samples and rec.times_ns.dtype == np.int64 and len(rec.times_ns) == n
    assert np.all(np.diff(rec.times_ns) > 0)
    assert not np.isinf(rec.values).any() and np.isfinite(rec.values).any()
    assert rec.fs is None or rec.fs > 0
