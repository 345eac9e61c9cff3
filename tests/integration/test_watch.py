"""`streamer watch` against Apache Kafka: a malformed flag or episode between good ones is one line naming
its topic, partition and offset, and watching goes on (issue 45, item 1: it used to exit 1 with a
traceback on a flag without `reason`)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import orjson
import pytest

from streamer.kafka.clients import make_producer
from streamer.publish.episodes import EpisodeTracker
from streamer.model.decision import Verdict, decide
from streamer.publish.messages import episode_doc, flag_doc
from streamer.settings import EpisodeSettings
from streamer.windows.buffer import SCORABLE, EmittedWindow
from tests.kafka_utils import isolated_settings, settings_env

MODEL = "test-model@sha256:0123456789abcdef"


def _verdict(pid: str, start_ns: int, p: float) -> Verdict:
    w = EmittedWindow(patient_id=pid, partition=0, start_ns=start_ns, end_ns=start_ns + 10**10, fs=500.0,
                      status=SCORABLE, reason=None, samples=None, missing=0, interpolated=0, min_offset=None,
                      completed_at=0.0)
    return decide(w, p, 0.2, MODEL)


def _flag(pid: str, start_ns: int, p: float) -> dict:
    return dict(flag_doc(_verdict(pid, start_ns, p)))


@pytest.mark.integration
def test_watch_reports_a_malformed_record_in_one_line_and_goes_on(broker):
    s = isolated_settings(broker.bootstrap, partitions=1)
    t0 = (time.time_ns() // 10**10 - 100) * 10**10
    good_before = _flag("bed-good1", t0, 0.9)
    no_reason = {k: v for k, v in _flag("bed-bad", t0, 0.9).items() if k != "reason"}
    no_reason.update(status="insufficient_data", probability=None, artifact=None)  # and no reason: malformed
    good_after = _flag("bed-good2", t0, 0.1)
    tracker = EpisodeTracker(EpisodeSettings(open_after=1), MODEL)
    opened = episode_doc(tracker.update(_verdict("bed-ep", t0, 0.9), now_s=time.time()))
    forged = {**opened, "patient_id": "bed-forged", "lease_ns": 10**18, "valid_until_ns": 2**62, "seq": 2**63 - 1}

    async def produce():
        producer = make_producer(s.kafka)
        await producer.start()
        try:
            sent = {}
            for name, topic, doc in (("flag1", s.kafka.flags_topic, good_before),
                                     ("bad_flag", s.kafka.flags_topic, no_reason),
                                     ("flag2", s.kafka.flags_topic, good_after),
                                     ("bad_episode", s.kafka.episodes_topic, forged),
                                     ("episode", s.kafka.episodes_topic, opened)):
                meta = await producer.send_and_wait(topic, orjson.dumps(doc), key=doc["patient_id"].encode())
                sent[name] = meta
            return sent
        finally:
            await producer.stop()

    sent = asyncio.run(produce())
    done = subprocess.run([sys.executable, "-m", "streamer", "watch", "--from-beginning", "--seconds", "8"],
                          env={**settings_env(s), "STREAMER_LOG_FORMAT": "console"}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    lines = done.stdout.splitlines()
    assert any("bed-good1" in line and "ARTIFACT" in line for line in lines), done.stdout
    assert any("bed-good2" in line and "clean" in line for line in lines), done.stdout
    assert any("bed-ep" in line and "opened" in line for line in lines), done.stdout
    bad = [line for line in lines if line.startswith("unreadable record")]
    flag_at = f"{s.kafka.flags_topic}[0]@{sent['bad_flag'].offset}"
    episode_at = f"{s.kafka.episodes_topic}[0]@{sent['bad_episode'].offset}"
    assert len(bad) == 2 and flag_at in bad[0] + bad[1] and episode_at in bad[0] + bad[1], done.stdout
    assert any("'reason' is missing" in line for line in bad) and any("out of range" in line for line in bad)
    assert "bed-bad" not in done.stdout.replace(flag_at, "") and "bed-forged" not in done.stdout


def test_a_records_text_cannot_write_escape_sequences_to_the_terminal():
    """Review of issue 45: a forged flag's patient id and reason pass the decoder's type checks; watch
    escapes what is not printable, so no ANSI or OSC sequence reaches an operator's terminal."""
    from streamer.client import decode_flag
    from streamer.commands.watch import format_flag

    flag = _flag("bed-1", 1_795_000_000_000_000_000, 0.5)
    hostile = {**flag, "patient_id": "p\x1b[2K\r\x1b]0;pwn\x07", "status": "insufficient_data",
               "reason": "x\x1b[31m", "probability": None, "artifact": None}
    line = format_flag(decode_flag(orjson.dumps(hostile)))
    assert line.isprintable() and "\x1b" not in line and "\\x1b[2K" in line and "\\x07" in line
