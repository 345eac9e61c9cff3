"""The data path's layering: ingest -> windows -> batching -> model -> publish, and no stage module
imports a later stage (state/ and checkpointing/ sit beside the path; the worker wires it)."""

from __future__ import annotations

import ast
from pathlib import Path

import streamer

ORDER = ["ingest", "windows", "batching", "model", "publish"]
ROOT = Path(streamer.__file__).resolve().parent


def _stage(module: str) -> int | None:
    parts = module.split(".")
    return ORDER.index(parts[1]) if len(parts) > 1 and parts[0] == "streamer" and parts[1] in ORDER else None


def test_no_stage_imports_a_later_stage():
    found = []
    for path in ROOT.rglob("*.py"):
        module = ".".join(("streamer", *path.relative_to(ROOT).with_suffix("").parts))
        me = _stage(module)
        if me is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and (other := _stage(node.module)) is not None:
                if other > me:
                    found.append(f"{module} imports {node.module}")
    assert found == []


def test_the_runtime_package_ships_no_test_or_training_code():
    names = {p.stem for p in ROOT.rglob("*.py")}
    assert not names & {"training", "conftest"}
    text = "\n".join(p.read_text() for p in ROOT.rglob("*.py"))
    assert "test_inference_delay" not in text and "import pytest" not in text


def test_the_code_passes_the_projects_lint():
    """ruff with pyproject.toml's rules (pycodestyle, pyflakes, bugbear, blind excepts) over everything."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff comes with the test extra (scripts/test installs it)"
    repo = ROOT.parent
    done = subprocess.run([ruff, "check", "--no-cache", "."], cwd=repo, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
