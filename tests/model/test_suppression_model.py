"""Alarm suppression seen from the consumer's side: a model-based test (hypothesis stateful).

The real Publisher, Checkpointer (at least once), AtLeastOnceDelivery, StateStore, EpisodeTracker, the
changelog reader and streamer.client.SuppressionView run on one event loop against an in-memory broker
whose sends complete only when the test says so. Hypothesis interleaves flags, lease renewals, stale
checks, checkpoints, broker acknowledgements, crashes between any two of those steps (what was in flight
may or may not have landed), a zombie owner that keeps publishing after a takeover, restarts, unreadable
state records, publisher clock steps of +/- 1 h, and deliveries to the consumer out of order and twice
(each first delivery within DELAY_S of landing). Invariants:
- the consumer reports suppression only on an open message that landed at most lease + skew + delay
  ago: so never later than that after the last owner stopped;
- once everything in flight landed and was delivered, a patient whose owner holds no open episode is not
  suppressed (no close is ever lost), and without zombies or lost states the consumer shows exactly the
  owner's open episode;
- no message stays pending in a settled state.
Forged episode records (a producer past the topic's ACL: any seq, lease, validity and state, in range or
not) arrive among them too: the decoder refuses what is out of range, and whatever it lets through
suppresses no longer than the reader's cap (lease + skew) after it arrived, by the first invariant.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from fractions import Fraction
from types import SimpleNamespace

import orjson
from aiokafka import TopicPartition
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from tests.budget import examples

from streamer.checkpointing import Checkpointer, OffsetsLedger
from streamer.delivery import AtLeastOnceDelivery
from streamer.client import MAX_LEASE_NS, MAX_SEQ, SEQ_LEAD_NS, MessageError, SuppressionView, decode_episode
from streamer.metrics import Metrics
from streamer.publish.episodes import EpisodeTracker
from streamer.publish.messages import window_id
from streamer.publish.publisher import Publisher
from streamer.settings import EpisodeSettings, KafkaSettings, WindowSettings
from streamer.state.changelog import _apply
from streamer.partitions import OwnedPartitions
from streamer.state.store import StateStore
from streamer.windows.buffer import SCORABLE, EmittedWindow
from streamer.windows.stage import WindowStage

P = TopicPartition("in", 0)
PATIENTS = ["a", "b"]
WINDOWS = 30  # per patient
LEASE_S, RENEW_S, STALE_S, SKEW_S, DELAY_S = 30.0, 10.0, 60.0, 5.0, 2.0
EPISODES = EpisodeSettings(open_after=2, close_after=2, stale_after_s=STALE_S, lease_s=LEASE_S,
                           renew_every_s=RENEW_S, skew_allowance_s=SKEW_S)
K = KafkaSettings(flags_topic="flags", episodes_topic="episodes", state_topic="state")
T_START = 1_795_000_000.0
NS = 10**9


@dataclass
class InFlight:
    owner: "Owner"
    topic: str
    key: bytes | None
    value: bytes
    future: asyncio.Future


@dataclass
class Landed:
    doc: dict
    value: bytes
    at: float  # true time it landed
    owner: "Owner"
    delivered: bool = False


class Broker:
    def __init__(self, model: "SuppressionModel"):
        self.m = model
        self.changelog: dict[bytes, bytes] = {}  # compacted: the latest value per key
        self.episodes: list[Landed] = []
        self.inflight: list[InFlight] = []

    def land(self, item: InFlight) -> None:
        if item.topic == K.state_topic:
            self.changelog[item.key] = item.value
        else:
            self.episodes.append(Landed(orjson.loads(item.value), item.value, self.m.T, item.owner))

    def landable(self) -> list[InFlight]:
        """Episode records in any order; an owner's state records in its send order (idempotent producer)."""
        out, seen = [], set()
        for item in self.inflight:
            if item.topic == K.state_topic:
                if id(item.owner) in seen:
                    continue
                seen.add(id(item.owner))
            out.append(item)
        return out


class MemoryProducer:
    """aiokafka's producer.send, as AtLeastOnceDelivery uses it: a future the broker resolves later."""

    def __init__(self, broker: Broker, owner: "Owner"):
        self.broker, self.owner = broker, owner

    async def send(self, topic, value, key=None, headers=None, partition=None, timestamp_ms=None):
        fut = asyncio.get_running_loop().create_future()
        if topic == K.flags_topic:
            fut.set_result(None)  # flags are not what this test is about: they land at once
        else:
            self.broker.inflight.append(InFlight(self.owner, topic, key, value, fut))
        return fut


class Committer:
    async def commit(self, points):
        pass


class Owner:
    """One worker process owning the partition: its real publishing and checkpointing parts."""

    def __init__(self, model: "SuppressionModel", offset_s: float):
        self.m, self.offset_s, self.alive = model, offset_s, True
        owned = OwnedPartitions()  # this process's registry: the store's and the ledger's pieces hang there
        self.store, self.ledger = StateStore(owned=owned), OffsetsLedger(owned)
        self.delivery = AtLeastOnceDelivery(MemoryProducer(model.broker, self))
        self.checkpointer = Checkpointer(self.ledger, WindowStage(WindowSettings(), self.store), self.store,
                                         Committer(), self.delivery, K.state_topic, "g")
        self.publisher = Publisher(K, self.delivery, self.ledger, self.store, EpisodeTracker(EPISODES, "m"), Metrics(),
                                   asyncio.Event(), persist=self.checkpointer.persist, clock=self.now)
        self.publisher.background.on_failure = model.failures.append
        self.tasks: set[asyncio.Task] = set()
        self.publishing: asyncio.Task | None = None
        self.position: dict[str, int] = {}
        self.lost_any = False

    def now(self) -> float:
        return self.m.T + self.offset_s

    def restore(self) -> None:
        wanted, lost = {P: {}}, {}
        for offset, (key, value) in enumerate(self.m.broker.changelog.items()):
            _apply(SimpleNamespace(topic=K.state_topic, partition=0, offset=offset, key=key, value=value), 0,
                   wanted, lost)
        self.store.load(self.ledger.start_partition(P, None), wanted[P])
        lost_patients = [u.patient_id for u in lost.values() if u.patient_id is not None]
        self.lost_any = bool(lost_patients)
        self.publisher.resume(P, lost_patients, self.now())
        for pid in PATIENTS:  # the windowing stage skips what the state says was reported
            stt = wanted[P].get(pid)
            self.position[pid] = max((s.next_k for s in stt.segments), default=0) if stt else 0

    def spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def publish_next(self, pid: str) -> None:
        if self.publishing is not None and not self.publishing.done():
            return  # the publish loop is sequential
        k = self.position.get(pid, 0)
        if k >= WINDOWS:
            return
        self.position[pid] = k + 1
        w = EmittedWindow(pid, P, k * 10 * NS, (k + 1) * 10 * NS, 50.0, SCORABLE, None, None, 0, 0, k, 0.0, k=k,
                          anchor_ns=0, natural_anchor_ns=0, rate=Fraction(50))
        w.hold = self.ledger.hold(P, k)
        prob = 0.9 if self.m.pattern[pid][k] else 0.1
        self.publishing = asyncio.create_task(self.publisher.flags([w], [prob], 0.5, "m"))
        self.tasks.add(self.publishing)

    def all_tasks(self) -> set:
        return self.tasks | self.publisher.background.tasks

    def busy(self) -> bool:
        return any(not t.done() for t in self.all_tasks())

    def kill(self, lands: list[bool]) -> None:
        """kill -9: what it had in flight lands or not; nothing else of it runs again."""
        self.alive = False
        mine = [i for i in self.m.broker.inflight if i.owner is self]
        for item, landed in zip(mine, lands + [False] * len(mine)):
            if landed:
                self.m.broker.land(item)
        self.m.broker.inflight = [i for i in self.m.broker.inflight if i.owner is not self]
        for t in self.all_tasks():
            t.cancel()


@st.composite
def artifact_runs(draw) -> list[bool]:
    """Per window, artifact or clean, in runs (so episodes open and close)."""
    out: list[bool] = []
    flagged = draw(st.booleans())
    while len(out) < WINDOWS:
        out += [flagged] * draw(st.integers(1, 6))
        flagged = not flagged
    return out[:WINDOWS]


class SuppressionModel(RuleBasedStateMachine):
    @initialize(pattern=st.lists(artifact_runs(), min_size=2, max_size=2),
                offset_s=st.sampled_from([0.0, 3600.0, -3600.0]))
    def setup(self, pattern, offset_s):
        self.loop = asyncio.new_event_loop()
        self.T = T_START
        self.failures: list = []
        self.broker = Broker(self)
        self.pattern = dict(zip(PATIENTS, pattern))
        self.view = SuppressionView(skew_s=SKEW_S)
        self.received: dict[str, float] = {}
        self.owner: Owner | None = None
        self.zombie: Owner | None = None
        self.zombie_ever = self.lost_ever = self.forged_ever = False
        self._act(self._start_owner, offset_s)

    # -- plumbing ---------------------------------------------------------------------------------
    def _act(self, fn, *args):
        async def go():
            result = fn(*args)
            for _ in range(40):  # let every task run until it waits on the broker
                await asyncio.sleep(0)
            return result

        return self.loop.run_until_complete(go())

    def _start_owner(self, offset_s: float) -> None:
        self.owner = Owner(self, offset_s)
        self.owner.restore()
        self.lost_ever |= self.owner.lost_any

    def _deliver(self, landed: Landed) -> None:
        first = not landed.delivered
        landed.delivered = True
        episode = decode_episode(landed.value)
        self.view.apply(episode, received_ns=int(self.T * NS))
        if first and self.view.episode(episode.patient_id) is episode:
            self.received[episode.patient_id] = landed

    def _deliver_overdue(self, order: list[int]) -> None:
        due = [x for x in self.broker.episodes if not x.delivered and x.at + DELAY_S <= self.T]
        for i in order[:len(due)] + list(range(len(due)))[len(order):]:
            if i < len(due) and not due[i].delivered:
                self._deliver(due[i])
        for x in due:
            if not x.delivered:
                self._deliver(x)

    # -- rules: the owners ------------------------------------------------------------------------
    @precondition(lambda self: self.owner is not None)
    @rule(pid=st.sampled_from(PATIENTS))
    def publish(self, pid):
        self._act(self.owner.publish_next, pid)

    @precondition(lambda self: self.owner is not None)
    @rule()
    def tend(self):
        self._act(self.owner.publisher.tend_episodes, self.owner.now())

    @precondition(lambda self: self.owner is not None)
    @rule()
    def checkpoint(self):
        self._act(lambda: self.owner.spawn(self.owner.checkpointer.checkpoint({P})))

    @precondition(lambda self: self.zombie is not None)
    @rule(pid=st.sampled_from(PATIENTS), what=st.sampled_from(["publish", "tend", "checkpoint"]))
    def zombie_acts(self, pid, what):
        z = self.zombie
        if what == "publish":
            self._act(z.publish_next, pid)
        elif what == "tend":
            self._act(z.publisher.tend_episodes, z.now())
        else:
            self._act(lambda: z.spawn(z.checkpointer.checkpoint({P})))

    @precondition(lambda self: self.broker.inflight)
    @rule(data=st.data())
    def broker_acknowledges(self, data):
        item = data.draw(st.sampled_from(self.broker.landable()))
        self.broker.inflight.remove(item)
        self.broker.land(item)

        def resolve():
            if not item.future.done():
                item.future.set_result(None)

        self._act(resolve)

    @precondition(lambda self: self.broker.inflight)
    @rule()
    def broker_catches_up(self):
        """Everything in flight lands and is acknowledged, in send order (and what that sets off)."""
        for _ in range(20):
            if not self.broker.inflight:
                break
            items, self.broker.inflight = self.broker.inflight, []
            for item in items:
                self.broker.land(item)
            self._act(lambda items=items: [i.future.set_result(None) for i in items if not i.future.done()])

    @precondition(lambda self: self.owner is not None)
    @rule(lands=st.lists(st.booleans(), max_size=6), restart=st.booleans(),
          offset_s=st.sampled_from([0.0, 3600.0, -3600.0]))
    def crash(self, lands, restart, offset_s):
        self._act(self.owner.kill, lands)
        self.owner = None
        if restart:
            self._act(self._start_owner, offset_s)

    @precondition(lambda self: self.owner is None)
    @rule(offset_s=st.sampled_from([0.0, -3600.0]))
    def restart(self, offset_s):
        self._act(self._start_owner, offset_s)

    @precondition(lambda self: self.owner is not None and self.zombie is None)
    @rule(offset_s=st.sampled_from([0.0, -3600.0]))
    def takeover_leaving_a_zombie(self, offset_s):
        """The owner stalls past its session timeout, another takes the partition, the old one resumes
        believing it still owns it (at least once: nothing fences it)."""
        self.zombie, self.zombie_ever = self.owner, True
        self._act(self._start_owner, offset_s)

    @precondition(lambda self: self.zombie is not None)
    @rule(lands=st.lists(st.booleans(), max_size=6))
    def zombie_dies(self, lands):
        self._act(self.zombie.kill, lands)
        self.zombie = None

    @precondition(lambda self: self.owner is not None)
    @rule(step=st.sampled_from([3600.0, -3600.0]))
    def owner_clock_steps(self, step):
        self.owner.offset_s += step

    @rule(pid=st.sampled_from(PATIENTS))
    def state_record_corrupted(self, pid):
        key = f"{P.topic}:{pid}".encode()
        if key in self.broker.changelog:
            self.broker.changelog[key] = b"\x00 not a state"

    # -- rules: time and the consumer -------------------------------------------------------------
    @rule(seconds=st.sampled_from([1.0, 5.0, 10.0, 25.0]), order=st.permutations(range(6)))
    def time_passes(self, seconds, order):
        # first deliveries are due within DELAY_S of landing: deliver what would be overdue, in any order
        end = self.T + seconds
        while self.T < end:
            self.T = min(end, self.T + DELAY_S / 2)
            self._deliver_overdue(list(order))

    @rule(order=st.permutations(range(6)))
    def every_worker_stalls_for_a_lease(self, order):
        """Nothing publishes for longer than a lease (workers stopped, stalled or cut off)."""
        self.time_passes(LEASE_S + SKEW_S + DELAY_S + 1, order)

    @precondition(lambda self: any(not x.delivered for x in self.broker.episodes))
    @rule(data=st.data())
    def consumer_reads_one(self, data):
        self._deliver(data.draw(st.sampled_from([x for x in self.broker.episodes if not x.delivered])))

    @precondition(lambda self: any(x.delivered for x in self.broker.episodes))
    @rule(data=st.data())
    def consumer_reads_a_duplicate(self, data):
        self._deliver(data.draw(st.sampled_from([x for x in self.broker.episodes if x.delivered])))

    @rule(pid=st.sampled_from(PATIENTS), data=st.data())
    def forged_record_arrives(self, pid, data):
        """A forged episode for a bed, delivered at once: a huge lease, a validity years ahead, a seq far
        ahead (up to 2**63-1), a close, or in range but claiming the longest lease a worker may write."""
        now_ns = int(self.T * NS)
        seen = [x.doc["seq"] for x in self.broker.episodes if x.doc["patient_id"] == pid]
        top = max(seen, default=int(self.T * 1e6))
        seq = data.draw(st.sampled_from([top - 1, top, top + 1, (now_ns + SEQ_LEAD_NS) // 1000, MAX_SEQ, 2**63 - 1]))
        lease = data.draw(st.sampled_from([1, int(LEASE_S * NS), MAX_LEASE_NS, 10**18]))
        until = now_ns + data.draw(st.sampled_from([lease, 32 * 365 * 86400 * NS]))
        state = data.draw(st.sampled_from(["open", "closed"]))
        doc = {"schema": 2, "patient_id": pid, "episode_id": data.draw(st.sampled_from([f"{pid}:forged", None])),
               "seq": seq, "state": state, "renewal": False, "reason": None if state == "open" else "clean",
               "start_ns": 0, "end_ns": None if state == "open" else 1, "last_flagged_end_ns": 1,
               "peak_probability": 1.0, "flagged_windows": 1, "model": "m", "updated_at_ns": now_ns,
               "valid_until_ns": until if state == "open" else None, "lease_ns": lease if state == "open" else None}
        value = orjson.dumps(doc)
        try:
            episode = decode_episode(value, now_ns=now_ns)
        except MessageError:
            return
        self.forged_ever = True
        self.view.apply(episode, received_ns=now_ns)
        if self.view.episode(pid) is episode:
            self.received[pid] = Landed(doc, value, self.T, None, delivered=True)

    @rule()
    def settle(self):
        self._settle()

    # -- invariants -------------------------------------------------------------------------------
    @invariant()
    def suppression_only_on_a_recent_lease(self):
        if not hasattr(self, "view"):
            return
        assert not self.failures, f"a background send failed: {self.failures[0]!r}"
        now_ns = int(self.T * NS)
        for pid in PATIENTS:
            if self.view.suppressed(pid, now_ns):
                shown = self.view.episode(pid)
                assert shown.is_open
                landed = self.received[pid]
                assert self.T <= landed.at + LEASE_S + SKEW_S + DELAY_S, \
                    f"{pid} suppressed {self.T - landed.at:.0f} s after its last lease landed"

    def _settle(self) -> None:
        """Stop any zombie, let everything in flight land, deliver it all, then check the owner and the
        consumer agree (closed: never suppressed; open: the same episode when no zombie or lost state)."""
        if self.zombie is not None:
            self._act(self.zombie.kill, [])
            self.zombie = None
        if self.owner is None:
            self._act(self._start_owner, 0.0)
        for _ in range(100):
            if self.broker.inflight:
                item = self.broker.inflight.pop(0)
                self.broker.land(item)
                self._act(lambda item=item: item.future.done() or item.future.set_result(None))
                continue
            if not self.owner.busy() and not any(s.episode.pending for _, s in self.owner.store):
                break
            self._act(lambda: None)
        for x in self.broker.episodes:
            if not x.delivered:
                self._deliver(x)
        assert not self.broker.inflight and not self.owner.busy(), "settling did not finish"
        now_ns = int(self.T * NS)
        for pid in PATIENTS:
            stt = self.owner.store.lookup(P, pid)
            assert stt is None or stt.episode.pending is None, f"{pid}: a message still pending"
            if stt is None or stt.episode.open_start_ns is None:
                # only a zombie's lease (or one numbered above a lost state's restart) may outlive the
                # owner's close, and only until it lapses (the invariant above)
                if self.view.suppressed(pid, now_ns):
                    assert (self.zombie_ever or self.lost_ever or self.forged_ever) \
                        and self.received[pid].owner is not self.owner, \
                        f"{pid}: closed by its owner, suppressed downstream"
            elif not (self.zombie_ever or self.lost_ever or self.forged_ever):
                shown = self.view.episode(pid)
                assert shown is not None and shown.is_open and \
                    shown.episode_id == window_id(pid, stt.episode.open_start_ns), f"{pid}: open, shown {shown}"

    def teardown(self):
        if hasattr(self, "loop"):
            try:
                self._settle()
            finally:
                for owner in (self.owner, self.zombie):
                    if owner is not None:
                        for t in owner.all_tasks():
                            t.cancel()
                self.loop.run_until_complete(asyncio.sleep(0))
                self.loop.close()


TestSuppressionModel = SuppressionModel.TestCase
TestSuppressionModel.settings = settings(max_examples=examples(300), stateful_step_count=60, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
