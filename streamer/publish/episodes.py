"""Per-patient artifact episodes for alarm suppression (schemas/artifact-episode.v2.schema.json).

Suppression fails safe: an open episode is a lease. Every open and renewal message says until when it
suppresses (`valid_until_ns`, and `lease_ns` for consumers that bound it by their own clock); the owner
renews each open episode every `renew_every_s`, so if every worker stops, consumers drop the suppression
within one lease. Messages are numbered per patient (`seq`, kept in the patient state across closes and
hand-overs) and consumers apply the highest number: no wall clock orders them.
"""

from __future__ import annotations

import time

from streamer.model.decision import Verdict
from streamer.settings import EpisodeSettings
from streamer.spec import FlagStatus, NoScoreReason
from streamer.state.patients import EpisodeState, EpisodeTransition


def next_seq(st: EpisodeState, now_s: float) -> int:
    """The patient's next message number: one above the stored counter, which starts at the highest number
    the episodes topic holds for the patient (read back at assignment, state/changelog.read_episode_seqs),
    so after a lost or expired state the numbers continue above every one readers saw, whatever the
    worker's clock says. Only a patient with no message anywhere to be found starts from the clock in
    microseconds: any start is above nothing, and this one also stays above the numbers earlier releases
    took from the clock, should such a patient's messages lie in a partition that was not read back."""
    if st.seq <= 0:
        st.seq = int(now_s * 1_000_000)
    st.seq += 1
    return st.seq


class EpisodeTracker:
    """Hysteresis over each patient's verdicts, in window order.

    An episode opens after `open_after` consecutive artifact windows (it starts at the first of them) and
    closes after `close_after` consecutive clean windows (it ends at the last artifact window's end), or,
    reason `stale`, once no scored window came for `stale_after_s` (see `stale`), or at once on a window the
    model gave no finite score (`score_not_finite`: a model failure must not keep alarms suppressed).
    Other windows without a score (insufficient data) neither open nor close an episode. A verdict at or before
    the last one applied on the same grid (a re-published copy) is ignored.
    It consumes verdicts (model.decision) and returns transitions (state.patients.EpisodeTransition), which
    publish.messages encodes. Every transition made here is also left in the state as `pending` until the
    caller knows it is published (publish.publisher); the state lives in the patient's durable state, or
    here when none is passed.
    """

    def __init__(self, settings: EpisodeSettings, model_id: str):
        self.settings = settings
        self.model_id = model_id
        self.patients: dict[str, EpisodeState] = {}

    def update(self, v: Verdict, st: EpisodeState | None = None, now_s: float | None = None,
               grid: int = 0) -> EpisodeTransition | None:
        """Feed one verdict; returns the transition when an episode opens or closes."""
        if v.status != FlagStatus.SCORED and v.reason != NoScoreReason.SCORE_NOT_FINITE:
            return None
        if st is None:
            st = self.patients.setdefault(v.patient_id, EpisodeState())
        now_s = time.time() if now_s is None else now_s
        here = (grid, v.start_ns)
        if st.last_window is not None and st.last_window[0] == grid and here[1] <= st.last_window[1]:
            return None  # already applied
        st.last_window = here
        if v.status != FlagStatus.SCORED:
            # the model failed on this window (a NaN, an overflow): nothing says the ECG is still noisy, so
            # an open suppression ends now (reason stale: no usable score), not stale_after_s later, and
            # no episode opens across it
            st.flagged_streak = 0
            # (a window from before the episode began, late from an older grid, says nothing about it)
            if st.open_start_ns is None or v.end_ns <= st.open_start_ns:
                return None
            return self._close(v.patient_id, st, "stale", now_s)
        st.updated_at_s = now_s
        p = v.probability
        if v.artifact:
            st.clean_streak = 0
            if st.open_start_ns is not None:
                st.peak = max(st.peak, p)
                st.last_flagged_end_ns = v.end_ns
                st.flagged_windows += 1
                return None
            if st.flagged_streak == 0:
                st.streak_start_ns, st.streak_peak = v.start_ns, p
            st.flagged_streak += 1
            st.streak_peak = max(st.streak_peak, p)
            if st.flagged_streak >= self.settings.open_after:
                st.open_start_ns, st.peak = st.streak_start_ns, st.streak_peak
                st.last_flagged_end_ns = v.end_ns
                st.flagged_windows = st.flagged_streak
                st.flagged_streak = 0
                return self._message(v.patient_id, st, "open", now_s)
            return None
        st.flagged_streak = 0
        if st.open_start_ns is None:
            return None
        st.clean_streak += 1
        if st.clean_streak < self.settings.close_after:
            return None
        return self._close(v.patient_id, st, "clean", now_s)

    def stale(self, patient_id: str, st: EpisodeState, now_s: float) -> EpisodeTransition | None:
        """Close an open episode that no scored window updated for stale_after_s (patient gone, monitor
        off, inference stalled); returns the closing message."""
        if st.open_start_ns is None:
            return None
        if now_s < st.updated_at_s:
            # this clock is behind the one that stamped the state (a step back, or a new owner's clock):
            # count from now, so the close comes at most stale_after_s later instead of never
            st.updated_at_s = now_s
        if now_s - st.updated_at_s < self.settings.stale_after_s:
            return None
        return self._close(patient_id, st, "stale", now_s)

    def renew(self, patient_id: str, st: EpisodeState, now_s: float) -> EpisodeTransition | None:
        """A renewal of an open episode's lease when one is due (or this clock went back since the last)."""
        if st.open_start_ns is None:
            return None
        if 0 <= now_s - st.renewed_at_s < self.settings.renew_every_s:
            return None
        return self._message(patient_id, st, "open", now_s, renewal=True)

    def tend(self, patient_id: str, st: EpisodeState, now_s: float) -> EpisodeTransition | None:
        """The stale close if one is due, else a renewal if one is due, else None."""
        return self.stale(patient_id, st, now_s) or self.renew(patient_id, st, now_s)

    def due(self, st: EpisodeState, now_s: float) -> bool:
        """Whether `stale` or `renew` has something to do for this state now (reads only)."""
        if st.open_start_ns is None:
            return False
        return (now_s < st.updated_at_s or now_s - st.updated_at_s >= self.settings.stale_after_s
                or not 0 <= now_s - st.renewed_at_s < self.settings.renew_every_s)

    def lost(self, patient_id: str, st: EpisodeState, now_s: float) -> EpisodeTransition:
        """The conservative close for a patient whose state could not be read (`st` is its fresh state):
        whatever episode the lost state held is over (no episode id: none is known)."""
        msg = EpisodeTransition(patient_id, next_seq(st, now_s), "closed", False, "state_lost", None, None, None,
                                None, 0, self.model_id, int(now_s * 1e9), None, None)
        st.pending = msg
        return msg

    def _close(self, patient_id: str, st: EpisodeState, reason: str, now_s: float) -> EpisodeTransition:
        msg = self._message(patient_id, st, "closed", now_s, reason)
        kept = {name: getattr(st, name) for name in ("last_window", "updated_at_s", "seq", "pending")}
        for name, value in vars(EpisodeState()).items():
            setattr(st, name, value)
        for name, value in kept.items():
            setattr(st, name, value)
        return msg

    def _message(self, patient_id: str, st: EpisodeState, state: str, now_s: float, reason: str | None = None,
                 renewal: bool = False) -> EpisodeTransition:
        now_ns = int(now_s * 1e9)
        lease_ns = int(self.settings.lease_s * 1e9) if state == "open" else None
        if state == "open":
            st.renewed_at_s = now_s
        msg = EpisodeTransition(
            patient_id=patient_id,
            seq=next_seq(st, now_s),
            state=state,
            renewal=renewal,
            reason=reason,
            start_ns=st.open_start_ns,
            end_ns=st.last_flagged_end_ns if state == "closed" else None,
            last_flagged_end_ns=st.last_flagged_end_ns,
            peak_probability=st.peak,
            flagged_windows=st.flagged_windows,
            model=self.model_id,
            updated_at_ns=now_ns,
            valid_until_ns=now_ns + lease_ns if lease_ns is not None else None,
            lease_ns=lease_ns,
        )
        st.pending = msg
        return msg
