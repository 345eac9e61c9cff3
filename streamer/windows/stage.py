"""All patients' buffers: routing, idle eviction and the memory cap.

Each partition's streams and flow clock live on its `OwnedPartition` (`windows`, a `PartitionWindows`),
found through the registry the state store holds; `release` (one of the partition's closers) drops them.
The stage's own indexes are of patients, across partitions: the LRU order that eviction and the memory cap
walk, and the patient cap's provisional states.
"""

from __future__ import annotations

from collections import OrderedDict
from fractions import Fraction
from typing import Collection, Hashable

from streamer.ingest.contract import Chunk
from streamer.logs import get_logger, patient_ref
from streamer.partitions import OwnedPartition
from streamer.settings import WindowSettings
from streamer.state.patients import PatientState
from streamer.state.store import StateStore
from streamer.windows.buffer import AcceptResult, EmittedWindow, PatientStream


log = get_logger("streamer.windows")

FLOW_GAP_CAP_S = 10.0  # monitors send <= 1 s chunks: a longer silence of a whole partition is an outage


Marker = tuple[int, int, Fraction, int]  # (natural anchor, anchor, rate, k): where a window lies on its grid


class PartitionWindows:
    """What the window stage keeps of one owned partition."""
    __slots__ = ("streams", "flowed_s", "last_s", "emitted")

    def __init__(self, now: float) -> None:
        # its patients' streams: a checkpoint asks for one partition's streams several times a second
        self.streams: dict[str, PatientStream] = {}
        # (seconds it has been flowing, wall time of its last record). Gaps between its records count at
        # most FLOW_GAP_CAP_S, so a broker or upstream outage hardly advances it and, right after one, a
        # patient whose backlog comes a little later does not look idle.
        self.flowed_s = 0.0
        self.last_s = now
        # Windows emitted when a stream closed (eviction, memory cap) that the durable state may not know yet
        # (their flags in flight): a stream reopened meanwhile starts after them, never reporting one twice.
        self.emitted: dict[str, list[Marker]] = {}

    def flow(self, now: float) -> float:
        self.flowed_s += min(max(now - self.last_s, 0.0), FLOW_GAP_CAP_S)
        self.last_s = now
        return self.flowed_s


class WindowStage:
    """`store`: the patients' states, and the registry of owned partitions their pieces hang on (a stage
    used alone makes a store, with a registry, of its own)."""

    def __init__(self, settings: WindowSettings, store: StateStore | None = None):
        self.settings = settings
        self.store = store if store is not None else StateStore()  # what each patient already reported
        self.owned = self.store.owned
        # least recently active first, so eviction and the memory cap look at the front only
        self.streams: OrderedDict[tuple[Hashable, str], PatientStream] = OrderedDict()
        self.nbytes = 0  # bytes held by open windows, kept up to date on every change
        self.patient_clock: dict[tuple[Hashable, str], float] = {}  # partition flow time at its last record
        # (partition, ref, reason, detail) of held records refused when their stream closed (take_rejected)
        self.rejected: list[tuple[Hashable, object, str, str]] = []
        # per patient: (its oldest open window, partition flow time when it became the oldest)
        self.oldest_since: dict[tuple[Hashable, str], tuple[int, float]] = {}
        self.expired_windows = 0  # streams closed because a window outlived max_window_life_s
        # New patients' states, kept out of the store until their stream sets a timeline: an id that never
        # does (one record of a flood, a bed that sent one chunk) leaves no state and no flag behind.
        self.unadopted: dict[tuple[Hashable, str], PatientState] = {}
        self.refused_patients = 0  # new ids refused at max_patients since the last `take_refused_patients`

    def accept(self, partition: Hashable, offset: int, chunk: Chunk, now: float, ref: object = None) -> AcceptResult:
        """`ref` (the Kafka record) comes back in a result's dead_letters, or from take_rejected, if the
        record is refused."""
        windows = self._windows(partition, now)
        flowed = windows.flow(now)
        key = (partition, chunk.patient_id)
        stream = self.streams.get(key)
        if stream is None:
            state = self.store.lookup(partition, chunk.patient_id)
            if state is None:
                if self.patients() >= self.settings.max_patients:
                    # refuse the newcomer, never evict a bed that is streaming (an id flood must cost the
                    # flood, not the ward)
                    self.refused_patients += 1
                    return AcceptResult([], rejected="too_many_patients", dead_letters=[(ref, "too_many_patients",
                                                           f"this worker holds windows.max_patients "
                                                           f"({self.settings.max_patients}) patients")])
                state = self.unadopted[key] = self.store.new_state(partition, chunk.patient_id)
            stream = self.streams[key] = PatientStream(chunk.patient_id, partition, self.settings,
                                                       self._state_after_emitted(key, state))
            windows.streams[chunk.patient_id] = stream
            self.patient_clock[key] = flowed
        before = stream.nbytes
        result = stream.accept(chunk, offset, now, ref)
        self.nbytes += stream.nbytes - before
        if stream.segment is not None and key in self.unadopted:
            self.store.adopt(partition, self.unadopted.pop(key))  # a timeline is set: the patient is real
        if result.activity:  # a bed whose records are all rejected is not alive: it can go idle
            self.patient_clock[key] = flowed
            self.streams.move_to_end(key)
        if stream.segment is None and not stream.nbytes and not stream.candidates and not stream.held:
            self._forget(key)
        return result

    def _windows(self, partition: Hashable, now: float) -> PartitionWindows:
        """The partition's windows, made with its first record. Raises for a partition not held: a record
        of it must not be let in."""
        task = self.owned.held(partition)
        if task is None:
            raise KeyError(f"partition {partition!r} is not held: none of its records may be windowed")
        if task.windows is None:
            task.windows = PartitionWindows(now)
        return task.windows

    def windows_of(self, partition: Hashable) -> PartitionWindows | None:
        task = self.owned.held(partition)
        return task.windows if task is not None else None

    def _flow_times(self) -> dict[Hashable, float]:
        """Each held partition's flow time: looked up once per pass over the streams, not once per stream."""
        return {t.tp: t.windows.flowed_s for t in self.owned.every_held() if t.windows is not None}

    def _forget(self, key: tuple[Hashable, str]) -> PatientStream:
        del self.windows_of(key[0]).streams[key[1]]
        return self._unindex(key)

    def _unindex(self, key: tuple[Hashable, str]) -> PatientStream:
        """Drop the patient from the stage's indexes (not from its partition's streams)."""
        stream = self.streams.pop(key)
        self.patient_clock.pop(key, None)
        self.oldest_since.pop(key, None)
        self.unadopted.pop(key, None)
        return stream

    def patients(self) -> int:
        """Patients held: every state, and every provisional stream of a patient without one (the count
        `windows.max_patients` caps; what a patient costs beyond its buffers hangs off one of these)."""
        return self.store.count() + len(self.unadopted)

    def take_refused_patients(self) -> int:
        out, self.refused_patients = self.refused_patients, 0
        return out

    def flowing(self, partitions, now: float) -> None:
        """These partitions are fetched and caught up with their high watermark: silence there is real
        time passing (a patient alone on its partition can go idle), unlike a broker outage."""
        for p in partitions:
            if self.owned.held(p) is not None:
                self._windows(p, now).flow(now)

    def evict(self, now: float) -> list[EmittedWindow]:
        """Close idle patients, then the least recently active ones while above the memory cap.

        A patient is idle when its partition went on flowing for idle_evict_s without it (see
        PartitionWindows.flowed_s). Candidates are only those silent that long by the wall clock (the LRU front).
        """
        out: list[EmittedWindow] = []
        idle_s = self.settings.idle_evict_s
        idle = []
        flow_times = self._flow_times()
        for key, stream in self.streams.items():
            if now - stream.last_activity < idle_s:
                break  # LRU order (only accepted records move a patient back): the rest were active later
            flowed = flow_times.get(key[0], 0.0)
            if flowed - self.patient_clock.get(key, flowed) >= idle_s:
                idle.append(key)
        self.forget_acknowledged()
        for key in idle + self._outlived(flow_times):
            if key in self.streams:
                out.extend(self._close(key, now))
        while self.streams and self.nbytes > self.settings.max_buffer_bytes:
            out.extend(self._close(next(iter(self.streams)), now))
        return out

    def _outlived(self, flow_times: dict[Hashable, float]) -> list[tuple[Hashable, str]]:
        """Patients whose oldest open window has stayed open max_window_life_s of partition flow time: a
        monitor clock crawling (records that each add a few samples) would otherwise pin the commit for ever."""
        life = self.settings.max_window_life_s
        out = []
        for key, stream in self.streams.items():
            k = stream.oldest_open()
            if k is None:
                self.oldest_since.pop(key, None)
                continue
            flowed = flow_times.get(key[0], 0.0)
            since = self.oldest_since.get(key)
            if since is None or since[0] != k:
                self.oldest_since[key] = (k, flowed)
            elif flowed - since[1] >= life:
                out.append(key)
        if out:
            self.expired_windows += len(out)
            log.warning("window_life_exceeded", patients=[patient_ref(pid) for _, pid in out[:10]],
                        count=len(out), max_window_life_s=life)
        return out

    def _close(self, key: tuple[Hashable, str], now: float) -> list[EmittedWindow]:
        new_patient = key in self.unadopted
        stream = self._forget(key)
        self.nbytes -= stream.nbytes
        if stream.segment is None and new_patient:
            # a new id whose stream never set a timeline (fewer than provisional_records agreeing records
            # before it went silent): no window of it is trusted, so none is reported; its held records are
            # dead letters, and no state is kept for it. A known patient's reopened stream closes as before.
            self.rejected.extend((key[0], *d) for d in stream.abandon())
            return []
        out = stream.close(now)
        self.rejected.extend((key[0], *d) for d in stream.take_dead())
        for w in out:
            w.by_clock = True
        if out:
            self.windows_of(key[0]).emitted.setdefault(key[1], []).extend(
                (w.natural_anchor_ns, w.anchor_ns, w.rate, w.k) for w in out)
        return out

    def take_rejected(self) -> list[tuple[Hashable, object, str, str]]:
        """Records a closing stream refused (its provisional first records that did not agree), to
        dead-letter."""
        out, self.rejected = self.rejected, []
        return out

    def _state_after_emitted(self, key, state):
        """The patient's state as a new stream must see it: with the windows its closed streams emitted,
        acknowledged or not. A copy when some are still unknown to it (the durable state moves only on
        acknowledgement: a crash before then must replay them); the state itself otherwise."""
        windows = self.windows_of(key[0])
        emitted = windows.emitted.get(key[1]) if windows is not None else None  # until the state has them
        if not emitted:
            return state
        import copy

        view = copy.deepcopy(state)
        changed = False
        for natural, anchor, rate, k in emitted:
            changed |= view.reported(natural, anchor, rate, k)
        return view if changed else state

    def forget_acknowledged(self) -> None:
        """Drop the markers of closed streams whose windows the state now records (their flags were
        acknowledged), so they do not outlive their use."""
        for task in self.owned.every_held():
            if task.windows is None or not task.windows.emitted:
                continue
            emitted, states = task.windows.emitted, task.states
            for pid in [pid for pid, ws in emitted.items() if not any(_unknown_to_state(states, pid, w) for w in ws)]:
                del emitted[pid]

    def min_open_offsets(self, partitions: Collection[Hashable] | None = None) -> dict[Hashable, int]:
        """Per partition (of `partitions`, else of all), the smallest input offset that an open (unemitted)
        window still needs. A checkpoint asks for the partitions it commits only, and walks only their streams:
        it runs per partition, and filtering every stream each time cost 8% of the event loop at 600 beds."""
        out: dict[Hashable, int] = {}
        if partitions is None:
            every = [(t.tp, t.windows) for t in self.owned.every_held() if t.windows is not None]
        else:
            every = [(p, self.windows_of(p)) for p in partitions]
        for partition, windows in every:
            if windows is None:
                continue
            offsets = [off for stream in windows.streams.values() if (off := stream.min_open_offset()) is not None]
            if offsets:
                out[partition] = min(offsets)
        return out

    def release(self, task: OwnedPartition) -> int:
        """A closed partition's buffers forgotten (its new owner rebuilds them from the committed offset);
        returns how many patients' streams it held. Runs once the registry let the partition go: it works
        on the object alone."""
        windows, task.windows = task.windows, None
        if windows is None:
            return 0
        for pid in windows.streams:
            self.nbytes -= self._unindex((task.tp, pid)).nbytes
        return len(windows.streams)

    def close_all(self, now: float) -> list[EmittedWindow]:
        out: list[EmittedWindow] = []
        for (partition, _), stream in self.streams.items():
            out.extend(stream.close(now))
            self.rejected.extend((partition, *d) for d in stream.take_dead())
        self.streams.clear()
        for task in self.owned.every_held():
            if task.windows is not None:
                task.windows.streams.clear()
        self.patient_clock.clear()
        self.oldest_since.clear()
        self.nbytes = 0
        return out


def _unknown_to_state(states, patient_id: str, marker: Marker) -> bool:
    """Whether the partition's states (a PartitionStates, or None) do not yet record the marked window."""
    st = states.by_patient.get(patient_id) if states is not None else None
    if st is None:
        return states is not None  # forgotten state: keep until the patient's next stream or the revoke
    _, anchor, rate, k = marker
    grid = st.grid(anchor, rate)
    return grid is None or grid.next_k <= k
