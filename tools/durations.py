"""The suite's durations as kept in the repository (tests/DURATIONS.md): per tier (tests/unit, model,
integration, campaigns) the test count and total seconds, and the slowest tests, from the JUnit XML that
scripts/test writes (.test-results/junit.xml).

    python -m tools.durations .test-results/junit.xml --machine "2-core AMD EPYC VM" > tests/DURATIONS.md
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import xml.etree.ElementTree as ET  # noqa: S405 (our own test run's report, not input from elsewhere)
from pathlib import Path

TIERS = ("unit", "model", "integration", "campaigns")


def tier_of(classname: str) -> str:
    """`tests.unit.test_x` -> unit; a test module directly under tests/ -> "(top level)"."""
    parts = classname.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "tests" and parts[1] in TIERS else "(top level)"


def read(junit: Path) -> list[tuple[str, str, float, str]]:
    """(tier, test id, seconds, outcome) of every test case in the report."""
    cases = []
    for case in ET.parse(junit).iter("testcase"):  # noqa: S314
        cls, name = case.get("classname", ""), case.get("name", "")
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        module = cls.rsplit(".", 1)[0] if cls.rsplit(".", 1)[-1][:1].isupper() else cls
        cases.append((tier_of(cls), f"{module.replace('.', '/')}.py::{name}", float(case.get("time", 0)), outcome))
    return cases


def render(cases, machine: str, commit: str, wall_s: float | None) -> str:
    totals: dict[str, list[float]] = collections.defaultdict(list)
    for tier, _, seconds, _ in cases:
        totals[tier].append(seconds)
    lines = ["# Test durations", "",
             f"Machine: {machine}. Commit: {commit}. Written by `python -m tools.durations` from the JUnit XML "
             "of `scripts/test` (docs/development.md, \"Test tiers\").", ""]
    if wall_s is not None:
        lines += [f"Whole suite, wall clock: {wall_s:.0f} s.", ""]
    lines += ["| tier | tests | seconds (sum of test times) |", "|---|---:|---:|"]
    for tier in (*TIERS, "(top level)"):
        if totals.get(tier):
            lines.append(f"| {tier} | {len(totals[tier])} | {sum(totals[tier]):.0f} |")
    lines.append(f"| all | {len(cases)} | {sum(s for _, _, s, _ in cases):.0f} |")
    lines += ["", "Slowest 40:", "", "| seconds | tier | test | outcome |", "|---:|---|---|---|"]
    for tier, test, seconds, outcome in sorted(cases, key=lambda c: -c[2])[:40]:
        lines.append(f"| {seconds:.1f} | {tier} | `{test}` | {outcome} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("junit", type=Path, help="JUnit XML of a test run")
    p.add_argument("--machine", required=True, help="where it ran (cores, CPU)")
    p.add_argument("--wall-s", type=float, help="the run's wall-clock seconds")
    args = p.parse_args(argv)
    try:
        cases = read(args.junit)
    except (OSError, ET.ParseError) as exc:
        print(f"durations: cannot read {args.junit}: {exc}", file=sys.stderr)
        return 2
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    sys.stdout.write(render(cases, args.machine, commit or "unknown", args.wall_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
