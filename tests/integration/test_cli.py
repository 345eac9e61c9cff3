"""The command line and settings as a deployer meets them: the demo model only when asked, a mistyped
variable refused with the nearest name, --version, options on either side of the subcommand, help on
every flag, a sentence (exit 2) for every bad value, an explicit time unit, JSON-only log lines."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from streamer.cli import build_parser, main
from streamer.errors import SettingsError
from streamer.offline.recordings import RecordingError, load_recording
from streamer.settings import check_environment, setting_variables
from streamer.kafka.broker import free_port
from streamer.synthetic import generate


def _streamer(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([sys.executable, "-m", "streamer", *args], capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=timeout)


# -- the demo model only when asked ---------------------------------------------------------------
def test_run_refuses_the_demo_model_unless_asked():
    r = _streamer("run")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "STREAMER_MODEL__CHECKPOINT" in r.stderr and "--demo" in r.stderr and "SYNTHETIC" in r.stderr
    assert "model_loaded" not in r.stderr, "refused before any model is loaded"


def test_asked_for_the_demo_model_the_worker_goes_on_and_every_log_line_is_json():
    """--demo passes the refusal; the worker then meets a closed port. Every line it wrote, aiokafka's
    connection errors included, is one JSON object with logger, service and version."""
    r = _streamer("run", "--demo", "--bootstrap", f"127.0.0.1:{free_port()}", env={"STREAMER_LOG_FORMAT": "json"})
    assert r.returncode == 1, r.stderr[-2000:]
    lines = [json.loads(line) for line in r.stderr.splitlines() if line.strip()]  # raises on any other line
    assert all({"event", "level", "logger", "timestamp"} <= set(e) for e in lines)
    assert all(e["service"] == "streamer" and e["version"] == importlib.metadata.version("streamer")
               for e in lines)
    assert any(e["logger"].startswith("aiokafka") for e in lines), "the library's own lines are JSON too"
    assert any(e["event"] == "model_loaded" and "SYNTHETIC-DEMO" in e["path"] for e in lines)
    assert lines[-1]["event"] == "startup_failed" and "broker unreachable" in lines[-1]["error"]


def test_score_refuses_the_demo_model_unless_asked_and_draws_no_bar_into_a_pipe(tmp_path):
    """Issue 33, case 7: `streamer score` without a checkpoint silently used the SYNTHETIC demo model; it
    refuses as `run` does, naming --checkpoint and --demo. Asked with --demo it scores, and with stderr a
    pipe (a log collector) it writes no progress bar there."""
    rec = tmp_path / "rec.csv"
    pd.DataFrame({"II": np.sin(np.arange(250 * 21) / 40.0)}).to_csv(rec, index=False)
    r = _streamer("score", str(rec), "--fs", "250", "--out", str(tmp_path / "o.csv"))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--checkpoint" in r.stderr and "streamer score --demo" in r.stderr and "SYNTHETIC" in r.stderr
    assert not (tmp_path / "o.csv").exists()
    r = _streamer("score", str(rec), "--fs", "250", "--demo", "--out", str(tmp_path / "o.csv"),
                  env={"STREAMER_MODEL__BACKEND": "torch"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(pd.read_csv(tmp_path / "o.csv")) == 2
    assert "scoring" not in r.stderr and "\r" not in r.stderr, r.stderr[-500:]


# -- STREAMER_* variables -------------------------------------------------------------------------
def test_a_mistyped_variable_stops_the_process_naming_the_nearest_one():
    r = _streamer("run", env={"STREAMER_MODEL_CHECKPOINT": "/models/released.pth"})
    assert r.returncode == 2
    assert "STREAMER_MODEL_CHECKPOINT" in r.stderr and "did you mean STREAMER_MODEL__CHECKPOINT" in r.stderr


@pytest.mark.parametrize("var, nearest", [
    ("STREAMER_KAFKA__BOOTSTRAP_SERVER", "STREAMER_KAFKA__BOOTSTRAP_SERVERS"),
    ("STREAMER_EPISODES__LEASE", "STREAMER_EPISODES__LEASE_S"),
    ("STREAMER_METRICS_PROT", "STREAMER_METRICS_PORT"),
])
def test_check_environment_suggests(var, nearest):
    with pytest.raises(SettingsError, match=f"unknown environment variable {var}; did you mean {nearest}"):
        check_environment({var: "x"})


def test_every_setting_and_tool_variable_is_accepted():
    names = setting_variables()
    assert names["STREAMER_MODEL__CHECKPOINT"] == "model.checkpoint"
    assert names["STREAMER_KAFKA__SASL_OAUTH_TOKEN_FILE"] == "kafka.sasl_oauth_token_file"
    check_environment({**{v: "x" for v in names}, "STREAMER_CONFIG": "c.toml", "STREAMER_VENV": "/v",
                       "STREAMER_KAFKA__PRODUCER_OPTIONS": "{}", "PATH": "/bin", "OTHER_THING": "1"})


# -- the parser -----------------------------------------------------------------------------------
def _subparsers(parser: argparse.ArgumentParser | None = None, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every command, nested ones (`gateway hl7`) included, by its words."""
    found = {}
    for action in (parser or build_parser())._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[prefix + name] = sub
                found.update(_subparsers(sub, prefix + name + " "))
    return found


def test_version_is_the_installed_distribution(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"streamer {importlib.metadata.version('streamer')}"


def test_global_options_work_on_either_side_of_the_subcommand():
    parser = build_parser()
    after = parser.parse_args(["run", "--config", "prod.toml", "--bootstrap", "kafka:9093"])
    assert (after.config, after.bootstrap) == ("prod.toml", "kafka:9093")
    before = parser.parse_args(["--config", "prod.toml", "watch", "--seconds", "3"])
    assert (before.config, before.bootstrap, before.seconds) == ("prod.toml", None, 3.0)
    both = parser.parse_args(["--bootstrap", "a:1", "replay", "--synthetic", "1", "--bootstrap", "b:2"])
    assert both.bootstrap == "b:2", "the option nearer the end wins"


def test_every_flag_of_every_command_has_help():
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}"
               for name, sub in _subparsers().items() for a in sub._actions
               if not a.help and not isinstance(a, argparse._HelpAction)]
    assert missing == []


@pytest.mark.parametrize("argv, says", [
    (["replay", "--speed", "fast"], "'fast' is not a speed"),
    (["replay", "--speed", "0"], "is not a speed"),
    (["replay", "--rates", "500,abc"], "'abc' is not a number"),
    (["replay", "--chunk-s", "-1"], "must be above 0"),
    (["replay", "--synthetic", "two"], "'two' is not a whole number"),
    (["score", "r.csv", "--out", "o.csv", "--batch-size", "0"], "is below 1"),
    (["score", "r.csv", "--out", "o.csv", "--fs", "nan"], "'nan' is not a number"),
    (["score", "r.csv", "--out", "o.csv", "--time-unit", "min"], "invalid choice: 'min'"),
    (["view", "--port", "http"], "'http' is not a port number"),
    (["demo", "--beds", "-3"], "is below 1"),
])
def test_bad_values_exit_2_with_a_sentence(argv, says, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2 and says in err and "Traceback" not in err


# -- time units of recordings ---------------------------------------------------------------------
FS = 500.0
EPOCH_S = 1_764_000_000.0  # 2025-11-24T16:00:00Z


def _csv(tmp_path, times) -> str:
    path = tmp_path / "rec.csv"
    pd.DataFrame({"time": times, "II": np.zeros(len(times))}).to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize("unit, scale", [("s", 1), ("ms", 1e3), ("us", 1e6)])
def test_epoch_times_in_any_unit_start_when_they_say(tmp_path, unit, scale):
    times = (EPOCH_S + np.arange(1000) / FS) * scale
    path = _csv(tmp_path, times if unit != "us" else times.astype(np.int64))
    for given in (None, unit):  # inferred from the 2 ms step, or said
        rec = load_recording(path, time_unit=given)
        assert rec.start_ns == int(EPOCH_S * 1e9), (unit, given)
        assert pd.Timestamp(rec.start_ns, tz="UTC").year == 2025 and rec.fs == pytest.approx(FS)


def test_relative_times_start_at_start(tmp_path):
    rec = load_recording(_csv(tmp_path, np.arange(1000) * 2.0), start="2026-03-01T00:00:00Z")  # ms offsets
    assert rec.start_ns == pd.Timestamp("2026-03-01T00:00:00Z").value and rec.fs == pytest.approx(FS)


def test_an_ambiguous_time_unit_is_refused_and_a_stated_one_is_used(tmp_path):
    path = _csv(tmp_path, np.arange(1000) * 0.05)  # a 0.05 step: 20 Hz in s or 20 kHz in ms, no ECG rate
    with pytest.raises(RecordingError, match="--time-unit"):
        load_recording(path)
    assert load_recording(path, time_unit="ms").fs == pytest.approx(20000.0)


def test_cli_refuses_an_ambiguous_recording_with_exit_2(tmp_path, capsys):
    path = _csv(tmp_path, np.arange(1000) * 0.05)
    assert main(["replay", path, "--patient", "bed-1", "--bootstrap", "127.0.0.1:1"]) == 2
    assert "--time-unit" in capsys.readouterr().err


@pytest.mark.parametrize("fraction", ["%03d", "%06d"])
def test_iso_text_times_with_ms_or_us_and_a_time_zone_are_read_by_their_unit(tmp_path, fraction):
    """Issue 33, case 1: pandas 3 parses ISO strings to datetime64[us]; read as nanoseconds they made a
    250 Hz, 60 s recording 250 kHz and 0.06 s long (zero windows, exit 0)."""
    n, fs = 250 * 60, 250.0
    start = pd.Timestamp("2026-03-01T08:00:00+01:00")
    scale = 1000 if fraction == "%03d" else 1_000_000
    stamps = [(start + pd.Timedelta(milliseconds=4 * i)).strftime("%Y-%m-%dT%H:%M:%S.")
              + fraction % ((4 * i % 1000) * scale // 1000) + "+01:00" for i in range(n)]
    path = tmp_path / "iso.csv"
    pd.DataFrame({"time": stamps, "II": np.zeros(n)}).to_csv(path, index=False)
    rec = load_recording(path)
    assert rec.start_ns == start.value and rec.fs == pytest.approx(fs)
    assert (rec.times_ns[-1] - rec.times_ns[0]) / 1e9 == pytest.approx(60 - 1 / fs)


def test_a_wfdb_record_in_microvolts_reads_as_the_same_record_in_millivolts(tmp_path):
    """Issue 33, case 2: the header's unit is applied (a uV record was scored as mV: every window p=1.0);
    a lead in a unit that is no voltage is refused, naming it."""
    import wfdb

    x = np.sin(np.arange(5000) / 50.0)[:, None]
    wfdb.wrsamp("r_mv", fs=500, units=["mV"], sig_name=["II"], p_signal=x, fmt=["16"], write_dir=str(tmp_path))
    wfdb.wrsamp("r_uv", fs=500, units=["uV"], sig_name=["II"], p_signal=x * 1000, fmt=["16"], write_dir=str(tmp_path))
    wfdb.wrsamp("r_v", fs=500, units=["V"], sig_name=["II"], p_signal=x / 1000, fmt=["16"], write_dir=str(tmp_path))
    mv = load_recording(tmp_path / "r_mv.hea")
    for other in ("r_uv", "r_v"):
        rec = load_recording(tmp_path / f"{other}.hea")
        assert np.abs(rec.values - mv.values).max() < 1e-3 * np.abs(mv.values).max(), other
    wfdb.wrsamp("r_bpm", fs=500, units=["bpm"], sig_name=["II"], p_signal=x, fmt=["16"], write_dir=str(tmp_path))
    with pytest.raises(RecordingError, match="'bpm', not a voltage unit"):
        load_recording(tmp_path / "r_bpm.hea")


def test_a_nan_gap_costs_only_the_windows_it_touches(tmp_path, scorer):
    """Issue 33, case 3: a WFDB record with missing samples was refused whole. Now, as the stream handles
    holes: a window with a 50-sample gap is insufficient_data (gap_too_long), one with 3 missing samples is
    scored after the stream's linear fill, and every other window scores exactly as the clean record."""
    import wfdb

    from streamer.offline.score import score_recording

    fs = 250
    x = generate(61.0, fs=fs, seed=4).values
    gappy = x.copy()
    gappy[2600:2650] = np.nan  # window 1
    gappy[7600:7603] = np.nan  # window 3
    for name, sig in (("clean", x), ("gappy", gappy)):
        wfdb.wrsamp(name, fs=fs, units=["mV"], sig_name=["II"], p_signal=sig[:, None], fmt=["16"],
                    adc_gain=[2000.0], baseline=[0], write_dir=str(tmp_path))
    clean = score_recording(load_recording(tmp_path / "clean.hea"), scorer)
    rec = load_recording(tmp_path / "gappy.hea")
    assert np.isnan(rec.values).sum() == 53, "WFDB's missing-sample value reads as NaN"
    got = score_recording(rec, scorer)
    assert len(got) == len(clean) == 6
    assert got.loc[1, "status"] == "insufficient_data" and got.loc[1, "reason"] == "gap_too_long"
    assert np.isnan(got.loc[1, "probability"])
    assert got.loc[3, "status"] == "scored" and got.loc[3, "interpolated"] == 3
    away = [0, 2, 4, 5]
    np.testing.assert_array_equal(got.loc[away, "probability"].to_numpy(), clean.loc[away, "probability"].to_numpy())
    # the filled window is what the stream's rule makes of it
    from streamer.windows.buffer import fill_gaps
    from streamer.offline.recordings import Recording

    w = rec.values[7500:10000].copy()
    mask = np.isfinite(w)
    w[~mask] = 0.0
    assert fill_gaps(w, mask, 5, 0.05) is None
    alone = score_recording(Recording(rec.times_ns[7500:10001], np.r_[w, rec.values[10000]], fs), scorer)
    assert alone.loc[0, "probability"] == got.loc[3, "probability"]


def _edf(path, mv: np.ndarray, fs: int, unit: str = "uV", label: str = "ECG II", annotations=()):
    import datetime

    import edfio

    scale = {"uV": 1000.0, "mV": 1.0, "V": 1e-3}[unit]
    signal = edfio.EdfSignal(mv * scale, fs, label=label, physical_dimension=unit)
    edf = edfio.Edf([signal], recording=edfio.Recording(startdate=datetime.date(2026, 3, 1)),
                    starttime=datetime.time(8, 0, 0), data_record_duration=1.0,
                    annotations=[edfio.EdfAnnotation(*a) for a in annotations])
    edf.write(path)
    return path


def test_an_edf_recording_scores_as_the_same_values_given_as_npy(tmp_path, scorer):
    """Issue 33, case 4: EDF was unsupported. The lead is found by its label (ECG II), its unit (uV) read
    from the header, its start from the header; scored, it equals the same millivolts given as .npy."""
    from streamer.offline.score import score_recording

    fs = 250
    x = generate(41.0, fs=fs, seed=5).values
    rec = load_recording(_edf(tmp_path / "r.edf", x, fs))
    assert rec.lead == "ECG II" and rec.fs == fs
    assert rec.start_ns == pd.Timestamp("2026-03-01T08:00:00Z").value
    assert np.abs(rec.values - x).max() < 2e-3 * np.abs(x).max(), "uV to mV, within EDF's 16-bit steps"
    np.save(tmp_path / "r.npy", rec.values)
    same = load_recording(tmp_path / "r.npy", fs=fs, start="2026-03-01T08:00:00Z")
    a, b = score_recording(rec, scorer), score_recording(same, scorer)
    assert len(a) == 4
    np.testing.assert_array_equal(a["probability"].to_numpy(), b["probability"].to_numpy())


def test_an_edf_plus_d_gap_is_missing_samples_and_its_annotations_are_labels(tmp_path):
    """EDF+D: the data records after a pause carry later onsets; they land at their own time on the lead's
    grid, the pause reads as missing samples (NaN). EDF+ annotations with a duration are artifact
    intervals for `validate --labels file.edf`."""
    from streamer.offline.recordings import edf_annotations

    fs = 200
    path = _edf(tmp_path / "d.edf", generate(30.0, fs=fs, seed=6).values, fs, unit="mV",
                annotations=[(12.0, 5.0, "motion"), (20.0, None, "note")])
    raw = bytearray(path.read_bytes())
    raw[192:197] = b"EDF+D"  # the header's reserved field, then records 20..29 moved 5 s later
    for k in range(29, 19, -1):
        old = f"+{k}\x14\x14".encode()
        at = raw.index(old)
        raw[at:at + len(old)] = f"+{k + 5}\x14\x14".encode()
    path.write_bytes(bytes(raw))
    rec = load_recording(path)
    assert len(rec.values) == 35 * fs
    assert np.isnan(rec.values[20 * fs:25 * fs]).all() and np.isfinite(rec.values[:20 * fs]).all()
    assert np.isfinite(rec.values[25 * fs:]).all()
    labels = edf_annotations(path)
    t0 = pd.Timestamp("2026-03-01T08:00:00Z").value
    assert labels.to_dict("records") == [{"start_ns": t0 + 12 * 10**9, "end_ns": t0 + 17 * 10**9, "kind": "motion"}]


def test_a_recording_in_the_wrong_unit_is_refused_naming_units(tmp_path):
    """A CSV in microvolts read as the default mV: refused, naming --units; with --units uV it loads, and a
    header that names another unit than --units is refused."""
    x = generate(20.0, fs=250, seed=7).values
    pd.DataFrame({"II": x * 1000}).to_csv(tmp_path / "uv.csv", index=False)
    with pytest.raises(RecordingError, match="--units uV"):
        load_recording(tmp_path / "uv.csv", fs=250)
    rec = load_recording(tmp_path / "uv.csv", fs=250, units="uV")
    assert np.abs(rec.values - x).max() < 1e-9
    path = _edf(tmp_path / "u.edf", x, 250)
    with pytest.raises(RecordingError, match="'uV' by its header, not --units 'mV'"):
        load_recording(path, units="mV")


def test_a_bdf_recording_reads_with_its_24_bit_resolution(tmp_path):
    """BDF (24-bit) through the same reader: lead by label (EKG-II), unit V, values to mV within 24-bit steps."""
    import datetime

    import edfio

    x = generate(20.0, fs=256, seed=8).values
    edfio.Bdf([edfio.BdfSignal(x / 1000.0, 256, label="EKG-II", physical_dimension="V")],
              recording=edfio.Recording(startdate=datetime.date(2026, 3, 1)), starttime=datetime.time(9, 30),
              data_record_duration=1.0).write(tmp_path / "r.bdf")
    rec = load_recording(tmp_path / "r.bdf")
    assert rec.lead == "EKG-II" and rec.start_ns == pd.Timestamp("2026-03-01T09:30:00Z").value
    assert np.abs(rec.values - x).max() < 1e-5 * np.abs(x).max()
