"""Short versions of the reliability campaigns (benchmarks/campaigns.py has the full ones).
The short crash campaign is tests/test_integration_faults.py::test_kill_9_at_random_moments_loses_no_window."""

from __future__ import annotations

import pytest

from benchmarks.campaigns import fuzz_campaign, hostile_messages, stall_campaign
from streamer.ingest.contract import InvalidMessage, decode
from streamer.settings import WindowSettings

pytestmark = pytest.mark.integration


def test_every_hostile_message_is_rejected_by_the_decoder():
    s = WindowSettings()
    kinds = set()
    for key, value, kind in hostile_messages(3000, ["bed-0000"], seed=1):
        kinds.add(kind)
        with pytest.raises(InvalidMessage):
            decode(key, value, s)
    assert len(kinds) == 16


def test_fuzz_short(broker, checkpoint, tmp_path):
    r = fuzz_campaign(broker.bootstrap, messages=1500, beds=4, checkpoint=checkpoint, workdir=tmp_path)
    print(r)
    assert r["crashes"] == 0
    assert r["dead_lettered"] == r["hostile"], r["reasons"]
    assert r["lost"] == 0


def test_broker_stall_short(broker, checkpoint, tmp_path):
    r = stall_campaign(broker, stall_s=5.0, beds=8, checkpoint=checkpoint, workdir=tmp_path)
    print(r)
    assert r["worker_alive"] and r["exit_code"] == 0
    assert r["lost"] == 0

