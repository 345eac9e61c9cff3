"""The inner loop's --quick budget (tests/budget.py) never reaches the full suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import budget

ROOT = Path(__file__).resolve().parents[2]


def test_the_full_suite_runs_every_written_budget():
    """CI calls scripts/test, which passes its own arguments and no --quick: the written budgets run."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test" in ci and "--quick" not in ci
    assert "--quick" not in (ROOT / "scripts" / "test").read_text()


@pytest.mark.parametrize(("written", "full", "quick"), [(400, 400, 100), (60, 60, 15), (40, 40, 10), (20, 20, 10),
                                                       (5, 5, 5)])
def test_quick_is_a_share_with_a_floor_and_full_is_the_written_budget(monkeypatch, written, full, quick):
    monkeypatch.setattr(budget, "quick", False)
    assert budget.examples(written) == full
    monkeypatch.setattr(budget, "quick", True)
    assert budget.examples(written) == quick
