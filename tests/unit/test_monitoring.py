"""Monitoring as code: the alert rules pass promtool's checks and unit tests (firing and quiet cases for
worker down, lag, dead letters, stalled inference, long episodes, lost states); the Prometheus config
loads with them; the Grafana dashboard asks only for metrics a worker exports; compose wires it all."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from streamer.metrics import Metrics
from tools.promtool import promtool

DOCKER = Path(__file__).resolve().parents[2] / "docker"
MONITORING = DOCKER / "monitoring"


@pytest.fixture(scope="module")
def tool() -> Path:
    return promtool()


def _run(tool: Path, *args: str, cwd: Path = MONITORING) -> str:
    done = subprocess.run([str(tool), *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_alert_rules_are_valid_and_their_unit_tests_pass(tool):
    assert "SUCCESS: 14 rules found" in _run(tool, "check", "rules", "alerts.yml")
    assert "SUCCESS" in _run(tool, "test", "rules", "alerts.test.yml")


def test_every_alert_has_a_unit_test_that_fires_it():
    rules = {r["alert"] for g in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    tests = yaml.safe_load((MONITORING / "alerts.test.yml").read_text())["tests"]
    fired = {t["alertname"] for case in tests for t in case["alert_rule_test"] if t.get("exp_alerts")}
    quiet = {t["alertname"] for case in tests for t in case["alert_rule_test"] if not t.get("exp_alerts")}
    assert fired == rules and quiet == rules, (rules - fired, rules - quiet)


def test_prometheus_config_loads_with_the_rules(tool, tmp_path):
    config = (DOCKER / "prometheus.yml").read_text().replace("/etc/prometheus/alerts.yml",
                                                              str(MONITORING / "alerts.yml"))
    (tmp_path / "prometheus.yml").write_text(config)
    _run(tool, "check", "config", str(tmp_path / "prometheus.yml"), cwd=tmp_path)


def _exported() -> set[str]:
    families = dict(re.findall(r"^# TYPE (\S+) (\S+)", Metrics().render().decode(), re.M))
    names = set(families) | {"up"}
    for name, kind in families.items():
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def _metric_names(expr: str) -> set[str]:
    words = set(re.findall(r"\b([a-z_][a-z0-9_]*)\b(?!\s*\()", re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", "", expr)))
    keywords = {"by", "without", "on", "ignoring", "and", "or", "unless", "le", "sum", "max", "min", "avg"}
    return {w for w in words - keywords if "_" in w or w == "up"}


def test_the_dashboard_and_the_rules_ask_only_for_exported_metrics():
    exported = _exported()
    dash = json.loads((MONITORING / "grafana" / "dashboards" / "streamer.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [r["expr"] for g in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    unknown = {(name, e) for e in exprs for name in _metric_names(e) if name not in exported}
    assert not unknown, unknown
    assert all(p["datasource"]["uid"] == "prometheus" for p in dash["panels"])


def test_compose_mounts_the_rules_and_provisions_grafana():
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    mounts = services["prometheus"]["volumes"] + services["grafana"]["volumes"]
    for mount in mounts:
        assert (DOCKER / mount.split(":")[0]).exists(), mount
    assert any(m.endswith(":/etc/prometheus/alerts.yml:ro") for m in mounts)
    assert all(p.startswith("127.0.0.1:") for p in services["grafana"]["ports"])
