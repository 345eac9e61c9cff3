"""Settings precedence (defaults < TOML file < STREAMER_* env < explicit) and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from streamer.settings import SettingsError, load_settings

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_file_then_env_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "s.toml"
    cfg.write_text('[kafka]\nbootstrap_servers = "file:1"\ngroup_id = "from-file"\n[batching]\nmax_batch = 7\n')
    monkeypatch.setenv("STREAMER_KAFKA__GROUP_ID", "from-env")
    s = load_settings(cfg)
    assert s.kafka.bootstrap_servers == "file:1"  # file beats default
    assert s.kafka.group_id == "from-env"  # env beats file
    assert s.batching.max_batch == 7
    assert load_settings(cfg, log_level="debug").log_level == "debug"  # explicit beats all


def test_env_only_and_lists(monkeypatch):
    monkeypatch.setenv("STREAMER_KAFKA__INPUT_TOPICS", '["a", "b"]')
    monkeypatch.setenv("STREAMER_WINDOWS__OVERLAP_S", "2.5")
    s = load_settings()
    assert s.kafka.input_topics == ["a", "b"] and s.windows.overlap_s == 2.5


def test_bad_value_names_the_setting(monkeypatch):
    monkeypatch.setenv("STREAMER_BATCHING__MAX_BATCH", "0")
    with pytest.raises(SettingsError, match=r"batching\.max_batch"):
        load_settings()


def test_unknown_setting_in_file_is_refused(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text("[kafka]\nbootstrap_server = 'typo:1'\n")
    with pytest.raises(SettingsError, match="bootstrap_server"):
        load_settings(cfg)


def test_a_typo_in_the_file_gets_the_nearest_setting_named(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[kafka]\nbootstrap_server = "x:1"\n[model]\ntreshold = 0.3\n[windows]\nzzzz = 1\n')
    with pytest.raises(SettingsError) as err:
        load_settings(cfg)
    text = str(err.value)
    assert "did you mean kafka.bootstrap_servers?" in text and "did you mean model.threshold?" in text
    assert "windows.zzzz: Extra inputs are not permitted\n" in text + "\n"  # nothing near: no guess, no value


def test_sasl_needs_credentials(monkeypatch):
    monkeypatch.setenv("STREAMER_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(SettingsError, match="sasl_mechanism"):
        load_settings()


def test_password_never_printed(monkeypatch):
    monkeypatch.setenv("STREAMER_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("STREAMER_KAFKA__SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("STREAMER_KAFKA__SASL_USERNAME", "u")
    monkeypatch.setenv("STREAMER_KAFKA__SASL_PASSWORD", "hunter2")
    s = load_settings()
    assert "hunter2" not in repr(s) and s.kafka.password() == "hunter2"


def test_shipped_configs_are_valid(monkeypatch):
    assert load_settings(CONFIGS / "local.toml").kafka.create_topics is True
    prod = load_settings(CONFIGS / "production.toml")
    assert prod.kafka.security_protocol == "SASL_SSL" and prod.kafka.sasl_mechanism == "SCRAM-SHA-512"


def test_cli_exits_2_with_the_setting_named():
    r = subprocess.run([sys.executable, "-m", "streamer", "run"], capture_output=True, text=True,
                       env={"STREAMER_WINDOWS__OVERLAP_S": "20", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 2
    assert "overlap_s must be smaller" in r.stderr


def test_every_subcommand_has_help():
    for cmd in ("broker", "run", "replay", "score", "validate", "watch", "demo"):
        r = subprocess.run([sys.executable, "-m", "streamer", cmd, "--help"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and "usage: streamer" in r.stdout


def test_settings_round_trip_through_the_environment(monkeypatch, tmp_path):
    from streamer.settings import Settings, settings_to_env

    s = Settings()
    s.kafka.input_topics = ["x", "y"]
    s.kafka.create_topics = True
    s.model.checkpoint = tmp_path / "m.pth"
    s.windows.overlap_s = 2.5
    s.episodes.open_after = 3
    for k, v in settings_to_env(s).items():
        monkeypatch.setenv(k, v)
    assert load_settings() == s


def test_kafka_client_options_are_checked():
    from streamer.kafka.clients import make_consumer, make_producer
    from streamer.settings import KafkaSettings

    with pytest.raises(ValueError, match="acks=1 needs kafka.delivery=at_least_once"):
        KafkaSettings(acks="1")
    assert KafkaSettings(acks="1", delivery="at_least_once").acks == "1"
    with pytest.raises(SettingsError, match="producer_options.request_timeout is not an aiokafka"):
        make_producer(KafkaSettings(producer_options={"request_timeout": 5}))
    with pytest.raises(SettingsError, match="consumer_options.isolation_level is set by streamer"):
        make_consumer(KafkaSettings(consumer_options={"isolation_level": "read_uncommitted"}))
    with pytest.raises(SettingsError, match="producer_options.sasl_plain_password is set by streamer"):
        make_producer(KafkaSettings(producer_options={"sasl_plain_password": "x"}))
    with pytest.raises(ValueError, match="sasl_oauth_token_file is required"):
        KafkaSettings(security_protocol="SASL_SSL", sasl_mechanism="OAUTHBEARER")


# -- nothing echoes a secret (issue 45, item 7) --------------------------------------------------------
SECRET = "Hunter2-very-secret"


@pytest.mark.parametrize("toml, named", [
    (f'[kafka]\nsasl_pasword = "{SECRET}"\n', "kafka.sasl_pasword"),
    (f'patient_id_log_kee = "{SECRET}"\n', "patient_id_log_kee"),
    (f'[episodes]\nlease_z = "{SECRET}"\n', "episodes.lease_z"),  # any unknown key, not only secret-looking ones
])
def test_a_mistyped_key_in_the_file_never_echoes_its_value(tmp_path, toml, named):
    cfg = tmp_path / "s.toml"
    cfg.write_text(toml)
    with pytest.raises(SettingsError) as e:
        load_settings(cfg)
    assert named in str(e.value) and SECRET not in str(e.value)


def test_a_mistyped_key_in_the_environment_never_echoes_its_value(monkeypatch):
    monkeypatch.setenv("STREAMER_KAFKA__SASL_PASWORD", SECRET)
    with pytest.raises(SettingsError) as e:
        load_settings()
    assert "STREAMER_KAFKA__SASL_PASWORD" in str(e.value) and SECRET not in str(e.value)
    monkeypatch.delenv("STREAMER_KAFKA__SASL_PASWORD")
    monkeypatch.setenv("STREAMER_PATIENT_ID_LOG_KEE", SECRET)
    with pytest.raises(SettingsError) as e:
        load_settings()
    assert "STREAMER_PATIENT_ID_LOG_KEE" in str(e.value) and SECRET not in str(e.value)


def test_a_bad_value_of_a_plain_setting_is_still_shown():
    with pytest.raises(SettingsError, match=r"log_level: .*\(got 'loud'\)"):
        load_settings(log_level="loud")


def test_the_cli_never_echoes_a_mistyped_secret(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'[kafka]\nsasl_pasword = "{SECRET}"\npatient_id_log_kee = "{SECRET}"\n')
    for env in ({"STREAMER_CONFIG": str(cfg)}, {"STREAMER_KAFKA__SASL_PASWORD": SECRET}):
        done = subprocess.run([sys.executable, "-m", "streamer", "watch", "--seconds", "1"], capture_output=True,
                              text=True, timeout=60, env={"PATH": "/usr/bin:/bin", **env})
        assert done.returncode == 2 and "sasl_pasword" in done.stderr.lower(), done.stderr
        assert SECRET not in done.stderr + done.stdout


# -- episodes.lease_s is bounded; patient ids hashed by default (issue 45, items 5 and 7) ----------------
def test_the_lease_is_bounded_to_what_readers_accept():
    from streamer.client import MAX_LEASE_NS

    assert load_settings(episodes={"lease_s": MAX_LEASE_NS / 1e9}).episodes.lease_s == 600
    with pytest.raises(SettingsError, match=r"episodes\.lease_s"):
        load_settings(episodes={"lease_s": 1e9})
    with pytest.raises(SettingsError, match=r"episodes\.skew_allowance_s"):
        load_settings(episodes={"skew_allowance_s": 1e6})


def test_patient_ids_are_hashed_by_default_with_a_process_key_when_none_is_set(capsys):
    from streamer import logs

    s = load_settings()
    assert s.patient_id_in_logs == "hashed" and s.patient_log_key() is None
    try:
        logs.configure_logging("json", "info", s.patient_id_in_logs, s.patient_log_key())
        ref = logs.patient_ref("MRN-0012345")
        assert ref is not None and "MRN" not in ref and ref == logs.patient_ref("MRN-0012345")
        logs.configure_logging("json", "info", "hashed", None)
        assert logs.patient_ref("MRN-0012345") == ref, "one key for the whole process"
        assert capsys.readouterr().err.count("patient_ids_hashed_with_process_key") <= 1
        logs.configure_logging("json", "info", "hashed", b"configured-key")
        assert logs.patient_ref("MRN-0012345") != ref
    finally:
        logs.configure_logging("console", "info", "plain")


def test_each_process_draws_its_own_key_and_says_so_once():
    probe = ("from streamer import logs\nlogs.configure_logging('json', 'info', 'hashed', None)\n"
             "logs.configure_logging('json', 'info', 'hashed', None)\nprint(logs.patient_ref('MRN-0012345'))\n")
    runs = [subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60) for _ in range(2)]
    refs = [r.stdout.strip() for r in runs]
    assert all(len(ref) == 16 and "MRN" not in ref for ref in refs) and refs[0] != refs[1]
    assert all(r.stderr.count("patient_ids_hashed_with_process_key") == 1 for r in runs), runs[0].stderr
