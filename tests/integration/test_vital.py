"""VitalDB (.vital) recordings in `streamer score`, `replay` and `validate --recording` (issue 47, item 4).

Every fixture is written by vitaldb itself (VitalFile.add_track, to_vital) from synthetic ECG, never a
copied capture; hostile files are vitaldb's files damaged afterwards, or raw gzip streams. A .vital file
must read as the same samples, times, unit and holes as any other format: `streamer score` of it gives
the flags CSV that `streamer score` gives of the same samples as CSV."""

from __future__ import annotations

import asyncio
import gzip
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer.cli import main
from streamer.offline.recordings import RecordingError, RecordingLimits, choose_vital_track, load_recording
from streamer.settings import WindowSettings
from streamer.synthetic import generate
from streamer.windows.grid import NS
from tests.integration.test_hostile_recordings import _MEASURED

FS = 500
T0_S = 1_700_000_000  # the first record's dt, epoch seconds: 2023-11-14 22:13:20 UTC
T0_ISO = "2023-11-14T22:13:20Z"


@pytest.fixture(autouse=True)
def _json_logs(monkeypatch):
    """Log lines as JSON objects, so that the one sentence a command says is told apart from its logging."""
    monkeypatch.setenv("STREAMER_LOG_FORMAT", "json")


def _ecg(seconds: float, seed: int = 3) -> np.ndarray:
    """Synthetic lead II in mV as float32, the format vitaldb writes a wave track in."""
    return generate(seconds, fs=FS, seed=seed).values.astype(np.float32)


def write_vital(path: Path, tracks: dict[str, dict], packed: bool = True) -> Path:
    """A .vital file written by vitaldb: per track name, `recs` ([{'dt': epoch s, 'val': samples}]) and
    the add_track keywords (srate, unit); `fmt`, `gain`, `offset` or `srate_after` change the track vitaldb
    made before it writes it (add_track writes float tracks only; srate_after forges the stored rate)."""
    import vitaldb

    vf = vitaldb.VitalFile()
    vf.dtstart = min(r["dt"] for t in tracks.values() for r in t["recs"] if math.isfinite(r["dt"]))
    vf.dtend = vf.dtstart
    for name, t in tracks.items():
        trk = vf.add_track(name, t["recs"], srate=t.get("srate", 0), unit=t.get("unit", ""))
        for field in ("fmt", "gain", "offset"):
            if field in t:
                setattr(trk, field, t[field])
        if "srate_after" in t:
            trk.srate = t["srate_after"]
    assert vf.to_vital(str(path), packed=packed)
    return path


def lead_ii(path: Path, x: np.ndarray, name: str = "SNUADC/ECG_II", unit: str = "mV", **extra) -> Path:
    """A VitalDB-like case: lead II (one record from T0_S), a pressure wave and a numeric heart rate."""
    return write_vital(path, {
        "SNUADC/ART": {"recs": [{"dt": float(T0_S), "val": (x * 40 + 80).astype(np.float32)}], "srate": FS,
                       "unit": "mmHg"},
        name: {"recs": [{"dt": float(T0_S), "val": x}], "srate": FS, "unit": unit},
        "Solar8000/HR": {"recs": [{"dt": float(T0_S + k), "val": 60.0} for k in range(5)], "unit": "/min"},
    }, **extra)


def _score(tmp_path: Path, name: str, *args: str) -> str:
    out = tmp_path / f"{name}.flags.csv"
    assert main(["score", *args, "--demo", "--out", str(out)]) == 0
    return out.read_text()


def _csv(path: Path, values: np.ndarray) -> Path:
    """The samples as a one-column CSV (an empty cell where one is missing), exactly as float64 holds them."""
    pd.DataFrame({"II": values.astype(np.float64)}).to_csv(path, index=False, float_format="%.17g")
    return path


# -- (1) the same flags as the same samples in CSV ---------------------------------------------------
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_score_of_a_vital_file_is_score_of_its_samples_as_csv(tmp_path, packed):
    """Epoch times from the record's dt, lead II picked among a case's tracks, mV as stored: the flags CSV
    is byte for byte the CSV's (given its rate and start)."""
    x = _ecg(35.0)
    vital = lead_ii(tmp_path / "case.vital", x, packed=packed)
    flags = _score(tmp_path, "vital", str(vital))
    assert flags == _score(tmp_path, "csv", str(_csv(tmp_path / "case.csv", x)), "--fs", str(FS), "--start", T0_ISO)
    rows = pd.read_csv(tmp_path / "vital.flags.csv")
    assert len(rows) == 3 and rows["window_start_ns"].iloc[0] == T0_S * NS


# -- (2) a gap between records is a hole ---------------------------------------------------------------
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_a_gap_between_records_gives_the_windows_of_a_csv_with_a_hole(tmp_path, packed):
    """Three records: 0-12 s, 16-24 s (its dt off the grid by 0.3 sample: rounded onto it), 24.004-40 s
    (a hole of 2 samples, which the stream interpolates). The holes are NaN, never interpolated by the
    reader: the flags equal those of a CSV with empty cells there. vitaldb's packed writer fills the holes
    with NaN itself; unpacked, the reader makes them from the records' times."""
    x = _ecg(40.0, seed=8)
    cuts = [(0, 12 * FS), (16 * FS, 24 * FS), (24 * FS + 2, 40 * FS)]
    recs = [{"dt": T0_S + a / FS + (0.3 / FS if k == 1 else 0.0), "val": x[a:b]} for k, (a, b) in enumerate(cuts)]
    vital = write_vital(tmp_path / "gaps.vital", {"SNUADC/ECG_II": {"recs": recs, "srate": FS, "unit": "mV"}},
                        packed=packed)
    holed = np.full(len(x), np.nan, dtype=np.float64)
    for a, b in cuts:
        holed[a:b] = x[a:b]
    rec = load_recording(vital)
    np.testing.assert_array_equal(rec.values, holed)  # NaN where no record is, the samples as stored
    flags = _score(tmp_path, "vital", str(vital))
    assert flags == _score(tmp_path, "csv", str(_csv(tmp_path / "gaps.csv", holed)), "--fs", str(FS),
                           "--start", T0_ISO)
    rows = pd.read_csv(tmp_path / "vital.flags.csv")
    assert (rows["status"] == "insufficient_data").sum() == 1  # the 4 s hole: 10 s - 20 s
    assert rows["interpolated"].iloc[2] == 2  # the 2-sample hole at 24 s: filled by the stream's rule


def test_records_that_overlap_are_refused(tmp_path):
    x = _ecg(12.0)
    recs = [{"dt": float(T0_S), "val": x[:3000]}, {"dt": T0_S + 5.0, "val": x[3000:]}]  # the first runs to 6 s
    vital = write_vital(tmp_path / "overlap.vital", {"SNUADC/ECG_II": {"recs": recs, "srate": FS, "unit": "mV"}},
                        packed=False)
    with pytest.raises(RecordingError, match="records of track 'SNUADC/ECG_II' overlap in time"):
        load_recording(vital)


def test_start_replaces_the_files_time(tmp_path):
    """As for WFDB and EDF headers: --start names the first record's time (replay always gives one)."""
    vital = lead_ii(tmp_path / "s.vital", _ecg(12.0))
    assert load_recording(vital).start_ns == T0_S * NS
    assert load_recording(vital, start="2030-01-01T00:00:00Z").start_ns == 1_893_456_000 * NS


# -- (3) units ----------------------------------------------------------------------------------------
def test_a_microvolt_track_is_read_in_millivolts(tmp_path):
    x = _ecg(12.0)
    vital = lead_ii(tmp_path / "uv.vital", (x.astype(np.float64) * 1000).astype(np.float32), unit="uV")
    np.testing.assert_allclose(load_recording(vital).values, x, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(load_recording(vital, units="uV").values, x, rtol=1e-6, atol=1e-9)
    with pytest.raises(RecordingError, match="is in 'uV' by its header, not --units 'mV'"):
        load_recording(vital, units="mV")


def test_a_track_without_unit_needs_units_and_a_pressure_is_refused(tmp_path):
    x = _ecg(12.0)
    blank = lead_ii(tmp_path / "blank.vital", x, unit="")
    with pytest.raises(RecordingError, match="names no unit: give it with --units"):
        load_recording(blank)
    np.testing.assert_array_equal(load_recording(blank, units="mV").values, x)
    with pytest.raises(RecordingError, match="is in 'mmHg', not a voltage unit"):
        load_recording(blank, channel="SNUADC/ART")


def test_an_integer_track_is_read_through_its_gain_and_offset(tmp_path):
    """fmt 5 (int16) at 1 uV a count, offset 0.5 mV; -32768, vitaldb's gap marker of int16, is missing."""
    x = _ecg(12.0)
    counts = np.round((x.astype(np.float64) - 0.5) / 0.001).astype(np.int16)
    counts[100:110] = -32768
    vital = write_vital(tmp_path / "int.vital", {"SNUADC/ECG_II": {
        "recs": [{"dt": float(T0_S), "val": counts}], "srate": FS, "unit": "mV", "fmt": 5, "gain": 0.001,
        "offset": 0.5}}, packed=False)
    values = load_recording(vital).values
    expected = counts * 0.001 + 0.5
    expected[100:110] = np.nan
    np.testing.assert_array_equal(values, expected)


# -- (4) which track ----------------------------------------------------------------------------------
def _waves(path: Path, names: list[str]) -> Path:
    x = _ecg(12.0)
    return write_vital(path, {n: {"recs": [{"dt": float(T0_S), "val": x * (k + 1)}], "srate": FS, "unit": "mV"}
                              for k, n in enumerate(names)})


def test_the_track_is_lead_ii_by_default_or_the_channel(tmp_path, capsys):
    x = _ecg(12.0)
    other = _waves(tmp_path / "philips.vital", ["SNUADC/ECG_V5", "SNUADC/ECG_III", "Intellivue/ECG_II"])
    rec = load_recording(other)
    assert rec.lead == "Intellivue/ECG_II" and np.array_equal(rec.values, (x * 3).astype(np.float64))
    both = _waves(tmp_path / "both.vital", ["Intellivue/ECG_II", "SNUADC/ECG_II"])
    assert load_recording(both).lead == "SNUADC/ECG_II"  # VitalDB's own lead II first
    assert load_recording(other, channel="ECG_V5").lead == "SNUADC/ECG_V5"  # the track name alone
    assert load_recording(other, channel="SNUADC/ECG_III").lead == "SNUADC/ECG_III"

    none = _waves(tmp_path / "none.vital", ["SNUADC/ECG_V5", "SNUADC/ECG_III"])
    code = main(["score", str(none), "--demo", "--out", str(tmp_path / "o.csv")])
    line = _refused_in_one_line(code, capsys.readouterr(), none, "score")
    assert "its tracks are ['SNUADC/ECG_V5', 'SNUADC/ECG_III']: name one with --channel" in line
    with pytest.raises(RecordingError, match="has no track 'aVR'; its tracks are"):
        load_recording(other, channel="aVR")
    with pytest.raises(RecordingError, match="'Solar8000/HR' is a numeric or text track, not a wave"):
        load_recording(lead_ii(tmp_path / "case.vital", x), channel="Solar8000/HR")


_NAMES = st.one_of(st.sampled_from(["SNUADC/ECG_II", "SNUADC/ECG_III", "ECG_II", "II", "MLII", "Intellivue/II",
                                    "ECG_V5", "SNUADC/ART", "Solar8000/HR", "a/b/II", "/II", "II/", ""]),
                   st.text(min_size=0, max_size=12))


def _is_lead_ii(track: str) -> bool:
    """The rule as documented: the name after the device, upper case, without ECG/EKG/LEAD and separators."""
    own = track.rsplit("/", 1)[-1].upper()
    for word in ("ECG", "EKG", "LEAD", "-", "_", " ", ":"):
        own = own.replace(word, "")
    return own in ("II", "MLII", "2")


@settings(max_examples=300, deadline=None)
@given(tracks=st.dictionaries(_NAMES, st.booleans(), max_size=8), channel=st.one_of(st.none(), _NAMES))
def test_track_choice_over_any_names(tracks, channel):
    """Whatever the file names its tracks: the choice is one of them; by default VitalDB's SNUADC/ECG_II
    when it is a wave, else the first wave (in file order) whose own name is lead II, never ECG_III; a
    --channel naming a track exactly is that track, else the one track whose own name it is."""
    chosen = choose_vital_track(tracks, channel)
    if channel is None:
        leads = [n for n, wave in tracks.items() if wave and _is_lead_ii(n)]
        if tracks.get("SNUADC/ECG_II"):
            assert chosen == "SNUADC/ECG_II"
        else:
            assert chosen == (leads[0] if leads else None)
    elif channel in tracks:
        assert chosen == channel
    else:
        named = [n for n in tracks if n.rsplit("/", 1)[-1] == channel]
        assert chosen == (named[0] if len(named) == 1 else None)


# -- (5) hostile files ------------------------------------------------------------------------------
def _valid(d: Path) -> Path:
    return lead_ii(d / "valid.vital", _ecg(12.0))


def corrupt(d: Path) -> Path:
    path = d / "corrupt.vital"
    path.write_bytes(np.random.default_rng(1).bytes(5000))
    return path


def truncated(d: Path) -> Path:
    """vitaldb alone takes the end of a cut gzip stream as the end of the file, and reads less in silence."""
    data = _valid(d).read_bytes()
    path = d / "truncated.vital"
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def empty(d: Path) -> Path:
    path = d / "empty.vital"
    path.write_bytes(b"")
    return path


def empty_stream(d: Path) -> Path:
    path = d / "nothing.vital"
    path.write_bytes(gzip.compress(b""))
    return path


def not_vital(d: Path) -> Path:
    path = d / "other.vital"
    path.write_bytes(gzip.compress(b"PK\x03\x04 a zip, gzipped" * 100))
    return path


def bomb(d: Path) -> Path:
    """A valid file's stream followed by 64 MB of zeros: about 60 kB on disk."""
    path = d / "bomb.vital"
    path.write_bytes(gzip.compress(gzip.decompress(_valid(d).read_bytes()) + bytes(64 << 20), compresslevel=9))
    assert path.stat().st_size < 200_000
    return path


def _lead(d: Path, name: str, recs: list[dict], packed: bool = False, **track) -> Path:
    return write_vital(d / f"{name}.vital", {"SNUADC/ECG_II": {"recs": recs, "srate": FS, "unit": "mV", **track}},
                       packed=packed)


def rate_zero(d: Path) -> Path:
    return _lead(d, "rate0", [{"dt": float(T0_S), "val": _ecg(12.0)}], srate_after=0.0)


def rate_nan(d: Path) -> Path:
    return _lead(d, "ratenan", [{"dt": float(T0_S), "val": _ecg(12.0)}], srate_after=float("nan"))


def dt_far(d: Path) -> Path:
    """A second record 10^8 s (three years) on: the grid between them must never be allocated."""
    x = _ecg(12.0)
    return _lead(d, "far", [{"dt": float(T0_S), "val": x[:3000]}, {"dt": T0_S + 1e8, "val": x[3000:]}])


def dt_huge(d: Path) -> Path:
    return _lead(d, "huge", [{"dt": 1e300, "val": _ecg(12.0)}])


def dt_negative(d: Path) -> Path:
    return _lead(d, "negative", [{"dt": -5.0, "val": _ecg(12.0)}])


def dt_nan(d: Path) -> Path:
    x = _ecg(12.0)
    return _lead(d, "nan", [{"dt": float(T0_S), "val": x[:3000]}, {"dt": float("nan"), "val": x[3000:]}])


HOSTILE = {corrupt: "not a readable .vital (gzip) file", truncated: "Compressed file ended before",
           empty: "its gzip stream is empty", empty_stream: "its gzip stream is empty",
           not_vital: "not a readable .vital file (no VITA signature)",
           bomb: "inflates to more than 9,216,000 bytes, more than --max-recording-hours 0.16 allows",
           rate_zero: "rate 0 Hz is outside the [50, 10000] Hz", rate_nan: "rate nan Hz is outside",
           dt_far: "spans 2.778e+04 h, more than --max-recording-hours 0.16",
           dt_huge: "starts at dt 1e+300, no epoch time", dt_negative: "starts at dt -5, no epoch time",
           dt_nan: "starts at dt nan, no epoch time"}


def _refused_in_one_line(code: int, captured, path: Path, command: str) -> str:
    """Exit 2, one line naming the file, no traceback, and nothing on stdout (vitaldb prints its errors)."""
    lines = captured.err.splitlines()
    assert code == 2, lines[-30:]
    assert not any("Traceback" in line for line in lines), lines[-30:]
    said = [line for line in lines if not line.startswith("{")]
    assert len(said) == 1, lines
    assert said[0].startswith(f"streamer {command}: ") and str(path) in said[0], lines
    assert captured.out == "", captured.out
    return said[0]


@pytest.mark.parametrize("make", list(HOSTILE), ids=lambda f: f.__name__)
def test_score_refuses_a_hostile_vital_file_in_one_line(make, tmp_path, capsys):
    path = make(tmp_path)
    capsys.readouterr()
    code = main(["score", str(path), "--demo", "--out", str(tmp_path / "o.csv"), "--max-recording-hours", "0.16"])
    line = _refused_in_one_line(code, capsys.readouterr(), path, "score")
    assert HOSTILE[make] in line, line
    assert not (tmp_path / "o.csv").exists()


def test_replay_and_validate_refuse_a_hostile_vital_file(tmp_path, capsys):
    path = truncated(tmp_path)
    capsys.readouterr()
    code = main(["replay", str(path), "--patient", "p1", "--bootstrap", "127.0.0.1:9"])
    _refused_in_one_line(code, capsys.readouterr(), path, "replay")
    rows = [{"window_start_ns": T0_S * NS, "window_end_ns": (T0_S + 10) * NS, "probability": 0.5,
             "threshold": 0.5, "model": "m", "status": "scored"}]
    pd.DataFrame(rows).to_csv(tmp_path / "flags.csv", index=False)
    pd.DataFrame({"start_ns": [T0_S * NS], "end_ns": [(T0_S + 10) * NS]}).to_csv(tmp_path / "labels.csv", index=False)
    code = main(["validate", "--flags", str(tmp_path / "flags.csv"), "--labels", str(tmp_path / "labels.csv"),
                 "--bootstrap-samples", "20", "--report", str(tmp_path / "r" / "v.md"), "--recording", str(path)])
    _refused_in_one_line(code, capsys.readouterr(), path, "validate")


def test_a_gzip_bomb_is_refused_before_vitaldb_inflates_it(tmp_path):
    """A valid packed file's packets, then one packet that claims 4 GB and holds 1 GB of zeros: about 1 MB
    on disk. vitaldb reads a packed file's packet whole, whatever its length (its 1 MB bound is for
    unpacked files), so alone it takes over a gigabyte; the stream is counted first and refused under a
    half-hour bound (28.8 MB), in what the interpreter and pandas take alone."""
    path = tmp_path / "bomb.vital"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(gzip.decompress(_valid(tmp_path).read_bytes()))
        f.write(b"\x01" + (0xFFFF_FFF0).to_bytes(4, "little"))  # a record packet, as vitaldb frames them
        block = bytes(16 << 20)
        for _ in range(64):
            f.write(block)
    assert path.stat().st_size < 8_000_000
    probe = ("import sys\nfrom streamer.offline.recordings import RecordingError, RecordingLimits, load_recording\n"
             "try:\n    load_recording(sys.argv[1], limits=RecordingLimits(max_hours=0.5))\n"
             "except RecordingError as e:\n    print(e)")
    # measured as the only child of a fresh interpreter: Linux keeps a process's peak RSS across exec, so
    # a child forked from this test session would report the session's
    r = subprocess.run([sys.executable, "-c", _MEASURED, sys.executable, "-c", probe, str(path)],
                       capture_output=True, text=True, timeout=150)
    code, rss_kib = (int(v) for v in r.stderr.splitlines()[-1].split())
    assert code == 0 and "inflates to more than 28,800,000 bytes, more than --max-recording-hours 0.5" in r.stdout, \
        r.stdout + r.stderr[-2000:]
    assert rss_kib // 1024 < 600, f"peak RSS {rss_kib // 1024} MiB"


def _decompressed(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_vital_files_are_read_or_refused_never_raise(tmp_path_factory, data):
    """vitaldb's parser through the real path on a valid file's packets, damaged (bytes replaced, a cut,
    bytes inserted) and gzipped again: a Recording within the limits, or a RecordingError; never another
    exception, never a print on stdout."""
    d = tmp_path_factory.mktemp("fuzz")
    raw = bytearray(_decompressed(lead_ii(d / "v.vital", _ecg(12.0), packed=data.draw(st.booleans()))))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        how = data.draw(st.sampled_from(["replace", "cut", "insert"]))
        chunk = data.draw(st.binary(min_size=1, max_size=8))
        if how == "replace":
            raw[at:at + len(chunk)] = chunk
        elif how == "cut":
            del raw[at:]
            if not raw:
                break
        else:
            raw[at:at] = chunk
    path = d / "damaged.vital"
    path.write_bytes(gzip.compress(bytes(raw)))
    import contextlib
    import io

    out = io.StringIO()
    limits = RecordingLimits.of(WindowSettings(), max_hours=1.0)
    with contextlib.redirect_stdout(out):
        try:
            rec = load_recording(path, limits=limits)
        except RecordingError as exc:
            assert "\n" not in str(exc)
        else:
            assert 0 < len(rec.values) <= limits.max_samples
            assert (rec.times_ns[-1] - rec.times_ns[0]) / NS <= 3600
    assert out.getvalue() == ""


# -- (6) replay to Kafka ----------------------------------------------------------------------------
@pytest.mark.integration
def test_replay_of_a_vital_file_sends_its_samples_and_holes(broker, tmp_path):
    """`streamer replay` of a .vital file with a hole between its records: the input topic holds every
    sample of the records at its time (--start moves the first record there), and none in the hole."""
    from streamer.ingest.contract import decode_json
    from streamer.kafka.clients import read_records
    from streamer.offline.recordings import regular_times
    from tests.kafka_utils import isolated_settings, settings_env

    s = isolated_settings(broker.bootstrap, partitions=1)
    x = _ecg(20.0, seed=11)
    recs = [{"dt": float(T0_S), "val": x[:8 * FS]}, {"dt": T0_S + 12.0, "val": x[12 * FS:]}]
    vital = write_vital(tmp_path / "bed.vital", {"SNUADC/ECG_II": {"recs": recs, "srate": FS, "unit": "mV"}},
                        packed=False)
    start = "2031-05-01T10:00:00Z"
    done = subprocess.run([sys.executable, "-m", "streamer", "replay", str(vital), "--patient", "bed-v",
                           "--start", start, "--speed", "max", "--quiet"], env=settings_env(s),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    times = regular_times(len(x), FS, pd.Timestamp(start).value)
    expected = {int(t): float(v) for k, (t, v) in enumerate(zip(times, x)) if not 8 * FS <= k < 12 * FS}

    def received(records) -> dict[int, float]:
        got: dict[int, float] = {}
        for r in records:
            c = decode_json(r.value)
            assert c.patient_id == "bed-v" and r.key == b"bed-v"
            for t, v in zip(regular_times(len(c.samples), c.fs, c.t0_ns), c.samples):
                if np.isfinite(v):
                    got[int(t)] = float(v)
        return got

    records = asyncio.run(read_records(s.kafka, s.kafka.input_topics, timeout_s=60,
                                       until=lambda rs: len(received(rs)) >= len(expected)))
    assert received(records) == expected
