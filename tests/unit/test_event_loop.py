"""The worker's event_loop setting: asyncio's loop by default; uvloop's only where the package is there, and
a one-line refusal to start where it is not (never a silent fall back to another loop)."""

from __future__ import annotations

import sys

import pytest

from streamer.cli import _loop_factory


def test_asyncio_is_the_default_loop():
    from streamer.settings import Settings

    assert Settings().event_loop == "asyncio" and _loop_factory("asyncio") is None


def test_uvloop_without_its_package_is_refused_by_name(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # what an install without it looks like to `import`
    with pytest.raises(ImportError, match="uvloop package is not installed"):
        _loop_factory("uvloop")

