"""Hypothesis budgets: the full one everywhere, a quarter in the inner loop's `--quick`.

`scripts/test` and CI never pass `--quick`, so every property and state machine runs its written budget
there (`tests/unit/test_budget.py` checks that .ci/run and scripts/test cannot). `--quick` only makes the
developer's inner loop (`scripts/test tests/unit tests/model --quick`) explore fewer examples per test;
no assertion changes, and a failure hypothesis once found is replayed first from its example database in
either mode.
"""

from __future__ import annotations

QUICK_SHARE = 4  # --quick runs 1/QUICK_SHARE of each budget
QUICK_FLOOR = 10  # and never fewer examples than this
quick = False  # set by tests/conftest.py's pytest_configure, before any test module is collected


def examples(written: int) -> int:
    """The max_examples a test runs: `written` in the full suite, a share of it under --quick."""
    return max(min(written, QUICK_FLOOR), written // QUICK_SHARE) if quick else written
