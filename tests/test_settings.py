"""Settings precedence (defaults < TOML file < STREAMER_* env < explicit) and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from streamer.settings import SettingsError, load_settings

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


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
    assert "windows.zzzz: Extra inputs are not permitted (got 1)\n" in text + "\n"  # nothing near: no guess


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
