"""Short versions of the reliability campaigns (benchmarks/campaigns/ has the full ones). The short crash
campaign is tests/integration/test_integration_faults.py::test_kill_9_at_random_moments_loses_no_window."""

from __future__ import annotations

import orjson
import pytest

from benchmarks.campaigns.broker_faults import stall_campaign
from benchmarks.campaigns.input_faults import clock_campaign, fuzz_campaign, hostile_messages
from benchmarks.campaigns.load import soak_campaign
from streamer.ingest.contract import InvalidMessage, decode
from streamer.settings import WindowSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_every_hostile_message_is_rejected_by_the_decoder():
    s = WindowSettings()
    kinds = set()
    for key, value, kind in hostile_messages(3000, ["bed-0000"], seed=1):
        kinds.add(kind)
        with pytest.raises(InvalidMessage):
            decode(key, value, s)
    assert len(kinds) == 20


def test_fuzz_short(broker, checkpoint, tmp_path):
    r = fuzz_campaign(broker.bootstrap, messages=1500, beds=4, checkpoint=checkpoint, workdir=tmp_path)
    print(r)
    assert r["crashes"] == 0
    assert r["dead_lettered"] == r["hostile"], r["reasons"]
    assert r["lost"] == 0
    for reason in ("missing_key", "bad_gain"):
        assert r["reasons"].get(reason), f"no {reason} dead letter among {r['reasons']}"
    assert r["uv_as_mv_scored"] == 0, "microvolts sent as millivolts must never be scored"
    assert r["uv_as_mv_reported_implausible"] == r["uv_as_mv_windows"] == 4
    assert r["noisy_rate_scored"] == r["noisy_rate_windows"] == 4, "float-noise rates are one stream"


def test_broker_stall_short(broker, checkpoint, tmp_path):
    r = stall_campaign(broker, stall_s=5.0, beds=8, checkpoint=checkpoint, workdir=tmp_path, seconds=26.0)
    print(r)
    assert r["worker_alive"] and r["exit_code"] == 0
    assert r["lost"] == 0



def test_soak_short(broker, checkpoint, tmp_path):
    """The soak's per-interval sampling on a short run: every interval has figures, nothing piles up.
    (Not pinned: pinning would move the shared test broker and this process onto one CPU.)"""
    r = soak_campaign(broker, beds=12, seconds=30, checkpoint=checkpoint, warmup_s=15, interval_s=10,
                      workdir=tmp_path)
    print(r)
    assert r["exit_code"] == 0
    assert r["patients_buffered"] == (12, 12)  # every bed has started by 15 s (stagger <= 10 s); none piles up
    assert r["max_pending"] < 64
    assert abs(r["rss_growth_pct"]) < 10
    rows = (tmp_path / "soak.jsonl").read_text().splitlines()
    assert len(rows) >= 3 and sum(orjson.loads(row)["windows"] for row in rows) >= 12 * 2


def test_clock_events_short(broker, checkpoint, tmp_path):
    r = clock_campaign(broker.bootstrap, beds=10, kills=1, checkpoint=checkpoint, workdir=tmp_path, stale_after_s=5.0)
    print(r)
    assert r["old_timeline_windows"] > 0 and r["new_timeline_windows"] > 0 and r["healthy_windows"] > 0
    assert r["lost"] == 0, r
    assert r["episodes_left_open"] == 0, r
    assert r["exit_code"] == 0


@pytest.mark.parametrize("clock, campaign", [("+2h", "crash"), ("-30m", "zombie"), ("+2h", "rebalance")])
def test_campaigns_with_a_skewed_worker_clock_short(broker, checkpoint, tmp_path, monkeypatch, clock, campaign):
    """Issue 32: the workers' clock hours ahead or behind (libfaketime) while they are killed, fenced as
    zombies or rebalanced: every window once (read_committed), no episode seq going backwards."""
    from benchmarks.campaigns import common, worker_faults as campaigns

    monkeypatch.setattr(common, "WORKER_CLOCK", clock)
    if campaign == "crash":
        r = campaigns.crash_campaign(broker.bootstrap, beds=6, kills=2, seconds=40, speed=2, checkpoint=checkpoint,
                                     workdir=tmp_path)
    elif campaign == "zombie":
        r = campaigns.zombie_campaign(broker.bootstrap, beds=6, seconds=40, speed=2, checkpoint=checkpoint,
                                      workdir=tmp_path)
    else:
        r = campaigns.rebalance_campaign(broker.bootstrap, beds=6, moves=2, seconds=40, speed=2, checkpoint=checkpoint,
                                         workdir=tmp_path)
    print(r)
    assert r["lost"] == 0 and r["duplicate_ids"] == 0, r
    assert r["seq_regressions"] == 0, r


def test_flood_short(broker, checkpoint, tmp_path):
    """Issue 45, item 2: an id flood beside real beds; the full one (100,000 ids, 50 beds) is in RESULTS.md."""
    from benchmarks.campaigns.input_faults import flood_campaign

    r = flood_campaign(broker.bootstrap, ids=3000, beds=4, seconds=40, checkpoint=checkpoint, workdir=tmp_path,
                       flood_at_s=10.0, max_patients=500)
    print(r)
    assert r["crashes"] == 0 and r["lost"] == 0
    assert r["lateness_p99_s"] < 35.0, "the real beds' flags within the suppression lease"
    assert r["flood_flags"] == 0, "an id with one record is never flagged"
    assert r["dead_letters"].get("too_many_patients", 0) >= 3000 - 500
    assert r["patients_after"] <= 500 and r["states_after"] <= 4
