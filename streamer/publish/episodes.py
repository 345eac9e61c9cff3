"""Per-patient artifact episodes for alarm suppression (schemas/artifact-episode.v1.schema.json)."""

from __future__ import annotations

import time

from streamer.publish.messages import SCHEMA_VERSION, window_id
from streamer.settings import EpisodeSettings
from streamer.spec import FlagStatus
from streamer.state.patients import EpisodeState


class EpisodeTracker:
    """Hysteresis over each patient's flags, in window order.

    An episode opens after `open_after` consecutive artifact windows (it starts at the first of them) and
    closes after `close_after` consecutive clean windows (it ends at the last artifact window's end), or,
    reason `stale`, once no scored window came for `stale_after_s` (see `stale`): downstream alarm systems
    trust the last state on the compacted topic, so suppression must never stay on by itself.
    Windows without a score (insufficient data) neither open nor close an episode. A flag at or before the
    last one applied on the same grid (a re-published copy) is ignored.
    The per-patient EpisodeState is passed in (it lives in the patient's durable state), or kept here.
    """

    def __init__(self, settings: EpisodeSettings, model_id: str):
        self.s = settings
        self.model_id = model_id
        self.patients: dict[str, EpisodeState] = {}

    def update(self, flag: dict, st: EpisodeState | None = None, now_s: float | None = None,
               grid: int = 0) -> dict | None:
        """Feed one flag message; returns an episode message when an episode opens or closes."""
        if flag["status"] != FlagStatus.SCORED:
            return None
        if st is None:
            st = self.patients.setdefault(flag["patient_id"], EpisodeState())
        here = (grid, flag["window_start_ns"])
        if st.last_window is not None and st.last_window[0] == grid and here[1] <= st.last_window[1]:
            return None  # already applied
        st.last_window = here
        st.updated_at_s = time.time() if now_s is None else now_s
        p = flag["probability"]
        if flag["artifact"]:
            st.clean_streak = 0
            if st.open_start_ns is not None:
                st.peak = max(st.peak, p)
                st.last_flagged_end_ns = flag["window_end_ns"]
                st.flagged_windows += 1
                return None
            if st.flagged_streak == 0:
                st.streak_start_ns, st.streak_peak = flag["window_start_ns"], p
            st.flagged_streak += 1
            st.streak_peak = max(st.streak_peak, p)
            if st.flagged_streak >= self.s.open_after:
                st.open_start_ns, st.peak = st.streak_start_ns, st.streak_peak
                st.last_flagged_end_ns = flag["window_end_ns"]
                st.flagged_windows = st.flagged_streak
                st.flagged_streak = 0
                return self._message(flag["patient_id"], st, "open")
            return None
        st.flagged_streak = 0
        if st.open_start_ns is None:
            return None
        st.clean_streak += 1
        if st.clean_streak < self.s.close_after:
            return None
        return self._close(flag["patient_id"], st, "clean")

    def stale(self, patient_id: str, st: EpisodeState, now_s: float) -> dict | None:
        """Close an open episode that no scored window updated for stale_after_s (patient gone, monitor
        off, the owner changed); returns the closing message."""
        if st.open_start_ns is None or now_s - st.updated_at_s < self.s.stale_after_s:
            return None
        return self._close(patient_id, st, "stale")

    def _close(self, patient_id: str, st: EpisodeState, reason: str) -> dict:
        msg = self._message(patient_id, st, "closed", reason)
        last_window, updated = st.last_window, st.updated_at_s
        for name, value in vars(EpisodeState()).items():
            setattr(st, name, value)
        st.last_window, st.updated_at_s = last_window, updated
        return msg

    def _message(self, patient_id: str, st: EpisodeState, state: str, reason: str | None = None) -> dict:
        return {
            "schema": SCHEMA_VERSION,
            "patient_id": patient_id,
            "episode_id": window_id(patient_id, st.open_start_ns),
            "state": state,
            "reason": reason,
            "start_ns": st.open_start_ns,
            "end_ns": st.last_flagged_end_ns if state == "closed" else None,
            "last_flagged_end_ns": st.last_flagged_end_ns,
            "peak_probability": st.peak,
            "flagged_windows": st.flagged_windows,
            "model": self.model_id,
            "updated_at_ns": time.time_ns(),
        }
