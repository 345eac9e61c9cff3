"""The data path's layering: ingest -> windows -> batching -> model -> publish, and no stage module
imports a later stage (state/ and checkpointing/ sit beside the path; the worker wires it)."""

from __future__ import annotations

import ast
import gc
from pathlib import Path

import streamer

ORDER = ["ingest", "windows", "batching", "model", "publish"]
ROOT = Path(streamer.__file__).resolve().parent


def parse(path: Path) -> ast.Module:
    """ast.parse with the garbage collector paused. CPython 3.11.7's AST constructor keeps one recursion
    counter for the whole interpreter (python/cpython#106905, fixed in 3.11.8): a collection in the middle
    of a parse runs finalizers, which can hand the GIL to another thread that parses too (pytest rewriting
    a module a test's thread imports), and the counter no longer matches: a SystemError this suite met once
    in a fresh clone. With no collection, nothing runs Python code in the middle of our parse."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(path.read_text(), filename=str(path))
    finally:
        if enabled:
            gc.enable()


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
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.ImportFrom) and node.module and (other := _stage(node.module)) is not None:
                if other > me:
                    found.append(f"{module} imports {node.module}")
    assert found == []


# Every module of the package in a layer; a module may import its own layer and those below it. Commands
# sit on top: nothing of the running worker imports them (`python -m streamer run` must never pull in
# pandas, the offline readers or the web view).
LAYERS = [
    ("foundation", {"streamer._version", "streamer.errors", "streamer.spec", "streamer.settings", "streamer.logs",
                    "streamer.lifecycle", "streamer.metrics", "streamer.client", "streamer.synthetic",
                    "streamer.netaddr", "streamer.partitions"}),
    ("kafka", {"streamer.kafka", "streamer.kafka.clients", "streamer.kafka.acls", "streamer.kafka.topics",
               "streamer.kafka.partitioning"}),
    # where outputs go and when they count (both modes behind one interface): below every stage that sends
    ("delivery", {"streamer.delivery"}),
    ("data path", {"streamer.ingest", "streamer.windows", "streamer.batching", "streamer.model",
                   "streamer.publish", "streamer.state", "streamer.checkpointing"}),
    ("runtime", {"streamer.runtime", "streamer.worker"}),
    ("commands", {"streamer.cli", "streamer.__main__", "streamer.commands", "streamer.offline", "streamer.gateways",
                  "streamer.kafka.broker"}),
    # the package root: the version and the documented `streamer.score_series`, above everything
    ("package face", {"streamer"}),
]


def _layer(module: str) -> int | None:
    """The layer of a streamer module (by its longest listed prefix; the root only by its own name); None
    outside the package."""
    best = None
    for i, (_, members) in enumerate(LAYERS):
        for m in members:
            inside = module == m or (m != "streamer" and module.startswith(m + "."))
            if inside and (best is None or len(m) > len(best[1])):
                best = (i, m)
    return None if best is None else best[0]


def _imports(path: Path, module: str) -> list[str]:
    """Every streamer module `path` imports, at any depth (function-level imports included)."""
    out = []
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.ImportFrom) and node.level:  # relative: resolve against the package
            base = module.rsplit(".", node.level)[0] if path.name != "__init__.py" else module
            out.append(f"{base}.{node.module}" if node.module else base)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
    return [m for m in out if m == "streamer" or m.startswith("streamer.")]


def test_every_module_has_a_layer_and_imports_only_its_own_or_lower_ones():
    found, unplaced = [], []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(("streamer", *parts[:-1])) if parts[-1] == "__init__" else ".".join(("streamer", *parts))
        me = _layer(module)
        if me is None:
            unplaced.append(module)
            continue
        for other in _imports(path, module):
            them = _layer(other)
            if them is not None and them > me:
                found.append(f"{module} ({LAYERS[me][0]}) imports {other} ({LAYERS[them][0]})")
    assert unplaced == [], f"modules with no layer in LAYERS: {unplaced}"
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


def test_the_delivery_mode_is_known_in_one_module():
    """Publisher, dead letters, checkpoint and runtime call one interface (streamer/delivery's `Delivery` and
    `Block`); none of them asks which mode runs (`.exactly_once`, an isinstance of a mode's class): startup
    chooses it once, one module per mode implements it."""
    allowed = {ROOT / "delivery" / "at_least_once.py", ROOT / "delivery" / "exactly_once.py",
               ROOT / "delivery" / "base.py", ROOT / "runtime" / "startup.py"}
    modes = {"AtLeastOnceDelivery", "ExactlyOnceDelivery"}
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        if path in allowed:
            continue
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.Attribute) and node.attr == "exactly_once":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2 \
                    and any(getattr(n, "id", None) in modes for n in ast.walk(node.args[1])):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []
