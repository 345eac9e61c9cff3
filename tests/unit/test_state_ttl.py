"""state.ttl_s: which patient states are forgotten, and when their tombstones go out."""

from __future__ import annotations

from streamer.state.patients import EpisodeState, EpisodeTransition, PatientState
from streamer.state.store import StateStore


def _store(now):
    store = StateStore(clock=lambda: now[0])
    store.load(store.owned.open(0), {})
    return store


def test_only_unchanged_closed_idle_patients_expire():
    now = [1000.0]
    store = _store(now)
    for pid in ("idle", "open-episode", "pending", "streaming", "changed"):
        store.patient(0, pid)
    store.patient(0, "open-episode").episode.open_start_ns = 5
    store.patient(0, "pending").episode.pending = EpisodeTransition("pending", 1, "closed", False, "state_lost", None,
                                                                    None, None, None, 0, "m", 0, None, None)
    now[0] += 100
    store.changed(0, "changed")  # changed, not yet written: never forgotten before its write
    assert store.expire_idle(0, now[0], ttl_s=50, busy=lambda pid: pid == "streaming") == ["idle"]
    assert set(store.states_of(0)) == {"open-episode", "pending", "streaming", "changed"}
    assert store.take_expired({0}) == {0: ["idle"]} and store.take_expired({0}) == {}


def test_a_write_renews_the_time_to_live_and_a_returning_patient_cancels_its_tombstone():
    now = [0.0]
    store = _store(now)
    store.patient(0, "bed")
    now[0] = 40.0
    store.changed(0, "bed")
    (st,) = store.take_dirty({0})[0]
    assert st.seen_at_s == 40.0
    assert store.expire_idle(0, 80.0, ttl_s=50, busy=lambda pid: False) == []
    assert store.expire_idle(0, 91.0, ttl_s=50, busy=lambda pid: False) == ["bed"]
    store.patient(0, "bed")  # back before the checkpoint wrote the tombstone
    assert store.take_expired({0}) == {}


def test_states_of_older_versions_get_a_fresh_time_to_live_at_restore():
    import orjson

    old = PatientState("bed", episode=EpisodeState()).to_bytes("in")
    doc = orjson.loads(old)
    doc["v"] = 2
    del doc["seen_at_s"]
    topic, st = PatientState.from_bytes(orjson.dumps(doc))
    assert topic == "in" and st.seen_at_s is None
    store = StateStore(clock=lambda: 123.0)
    store.load(store.owned.open(0), {"bed": st})
    assert st.seen_at_s == 123.0
    st.seen_at_s = 7.5
    assert PatientState.from_bytes(st.to_bytes("in"))[1].seen_at_s == 7.5
