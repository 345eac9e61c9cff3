"""promtool (Prometheus' rule and config checker) for the tests: from PATH, else from Debian's prometheus
package, fetched with `apt-get download` (no root) and unpacked with `dpkg-deb -x` into the user's cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "streamer" / "prometheus-deb"


def promtool() -> Path:
    found = shutil.which("promtool")
    if found:
        return Path(found)
    unpacked = CACHE / "usr" / "bin" / "promtool"
    if unpacked.is_file():
        return unpacked
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        raise RuntimeError("promtool is not on PATH and apt-get/dpkg-deb are missing: install Debian's prometheus")
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(["apt-get", "download", "prometheus"], cwd=tmp, capture_output=True, text=True,
                             timeout=300)
        debs = list(Path(tmp).glob("prometheus_*.deb"))
        if got.returncode != 0 or not debs:
            raise RuntimeError(f"apt-get download prometheus failed: {(got.stdout + got.stderr)[-800:]}")
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=CACHE.parent))  # beside the cache: the rename stays on one disk
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(staging)], check=True, timeout=300)
        if not CACHE.exists():
            staging.rename(CACHE)  # whole, or not at all: a half-unpacked cache is never used
        else:
            shutil.rmtree(staging, ignore_errors=True)
    return unpacked
