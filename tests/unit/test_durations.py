"""tools/durations.py reads pytest's own JUnit XML into the tier table kept in tests/DURATIONS.md."""

from __future__ import annotations

import subprocess
import sys

from tools.durations import read, render, tier_of


def test_a_real_pytest_report_is_read_by_tier(tmp_path):
    (tmp_path / "tests" / "unit").mkdir(parents=True)
    for d in ("tests", "tests/unit"):
        (tmp_path / d / "__init__.py").write_text("")
    (tmp_path / "tests" / "unit" / "test_a.py").write_text(
        "import pytest\n\ndef test_ok():\n    pass\n\n@pytest.mark.skip\ndef test_skipped():\n    pass\n\n"
        "class TestK:\n    def test_m(self):\n        pass\n")
    junit = tmp_path / "junit.xml"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                           "tests"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    cases = read(junit)
    assert sorted((tier, test, outcome) for tier, test, _, outcome in cases) == [
        ("unit", "tests/unit/test_a.py::test_m", "passed"),
        ("unit", "tests/unit/test_a.py::test_ok", "passed"),
        ("unit", "tests/unit/test_a.py::test_skipped", "skipped")]
    table = render(cases, "here", "abc1234", 12.0)
    assert "| unit | 3 |" in table and "| all | 3 |" in table and "Whole suite, wall clock: 12 s." in table


def test_tiers_are_the_folders_under_tests():
    assert tier_of("tests.integration.test_x") == "integration"
    assert tier_of("tests.model.test_delivery_model.TestDeliveryModel") == "model"
    assert tier_of("tests.test_x") == "(top level)"
