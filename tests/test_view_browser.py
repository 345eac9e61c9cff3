"""The ward view in a real browser: headless Chromium (Debian's) opens `streamer view` during a live
run, waits for pushed updates, and finds every bed, its latest flag and an open episode in the DOM."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from streamer.kafka.broker import free_port
from streamer.offline.recordings import Recording, parse_start
from streamer.offline.replay import Source, replay
from streamer.synthetic import generate
from tests.kafka_utils import isolated_settings, settings_env, start_worker_process, wait_for_event

pytestmark = pytest.mark.integration

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium; installed here when missing (as root with apt), else the test is skipped."""
    path = shutil.which("chromium")
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, timeout=900)
        path = shutil.which("chromium")
    if path is None:
        pytest.skip("no chromium: install Debian's `chromium` package (apt-get was not available or failed)")
    pytest.importorskip("playwright.sync_api", reason="the playwright package drives the browser")
    return path


def _beds(start_ns: int) -> list[Source]:
    """Two clean beds and one whose lead is pure noise from start to end (its episode opens and stays open)."""
    out = []
    for i, pid in enumerate(["clean-1", "clean-2", "noisy-1"]):
        ecg = generate(50.0, fs=500, seed=20 + i, artifact_fraction=0.0)
        values = ecg.values.copy()
        if pid.startswith("noisy"):
            values += np.random.default_rng(i).normal(0.0, 1.5, len(values))
        times = start_ns + (np.arange(len(values)) * 2_000_000).astype(np.int64)
        out.append(Source(pid, Recording(times, values, 500.0)))
    return out


def test_ward_page_shows_beds_flags_and_an_open_episode(chromium, broker, tmp_path):
    from playwright.sync_api import sync_playwright

    s = isolated_settings(broker.bootstrap, partitions=2)
    worker = start_worker_process(s, tmp_path / "worker.log")
    port = free_port()
    view = subprocess.Popen([sys.executable, "-m", "streamer", "view", "--port", str(port), "--from-beginning"],
                            env=settings_env(s), stdout=open(tmp_path / "view.log", "wb"), stderr=subprocess.STDOUT)
    try:
        wait_for_event(tmp_path / "worker.log", "partition_assigned", proc=worker)
        wait_for_event(tmp_path / "view.log", "view_listening", proc=view)
        sources = _beds(parse_start("2026-11-22T13:00:00Z"))
        feeder = threading.Thread(target=lambda: asyncio.run(replay(s.kafka, sources, speed=5.0, chunk_s=0.25)))
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.goto(f"http://127.0.0.1:{port}/")
            feeder.start()  # after the page is open: what it shows arrives as live pushes
            page.wait_for_selector('[data-bed="noisy-1"] .episode.open', timeout=120_000)
            for pid in ("clean-1", "clean-2"):
                page.wait_for_selector(f'[data-bed="{pid}"] .latest[data-status="scored"]', timeout=120_000)
            assert "suppression ON" in page.inner_text('[data-bed="noisy-1"] .episode')
            assert page.get_attribute('[data-bed="noisy-1"] .latest', "data-artifact") == "true"
            # the ward is sorted by beds in artifact: the noisy bed comes first
            assert page.eval_on_selector("#ward", "w => w.children[0].dataset.bed") == "noisy-1"
            assert "model: " in page.inner_text("#model") and "@sha256:" in page.inner_text("#model")
            assert page.inner_text("#live").startswith("live, updated")  # a pushed delta arrived
            page.screenshot(path=str(tmp_path / "ward.png"), full_page=True)
            page.click('[data-bed="noisy-1"]')
            page.wait_for_selector("#d-flags tr")
            assert page.is_visible("#detail") and "artifact" in page.inner_text("#d-flags")
            page.screenshot(path=str(tmp_path / "ward-detail.png"))
            browser.close()
        feeder.join(60)
    finally:
        view.terminate()
        worker.terminate()
        assert view.wait(20) == 0
        assert worker.wait(60) == 0
    print(f"screenshots: {tmp_path / 'ward.png'} {tmp_path / 'ward-detail.png'}")
