"""A deterministic simulation of the hub's lifecycle and delivery, for testing reconnect logic.

Exported as ``wirestate.testing``. A `Simulation` owns a real `Hub`, a fake clock that only
the simulation moves, and N simulated clients; a seeded scheduler picks one action per
`Simulation.step`: publish, a client's writer draining its outbox into the client, a cut
(the transport dies: no close frame, the outbox is lost), a slow reader (its writer stops
draining and its pongs go unanswered, so the overflow policy and keep-alive act), time
passing to the next deadline, or a node restart (a new hub with a new epoch, every
connection lost). A client that is down reconnects when the scheduler next picks it,
subscribing with whatever ``since`` its own logic (`Client.resume_since`) chooses.

Rules of this module:

* Pure and deterministic: no clock, no ``random`` import. All randomness comes from the
  injected ``rng`` (``random.Random(seed).random`` in tests); the same ``rng`` sequence gives
  the same trace and the same `Report`.
* The simulation plays the adapter honestly: it unregisters only after both pumps have
  finished, answers pings unless the reader is slow, and on a ``Close`` action flushes what
  the writer holds before the close.
* The simulation judges what the client *received*, not what the client object believes: an
  observer beside each client parses every frame delivered to it. The client logic only
  decides the ``since`` of each reconnect, which is what users get to test.

Properties (`Simulation.check`), per client and per (epoch, topic):

1. received seqs are strictly increasing (a repeat is reported as a duplicate);
2. every seq after the position the client's first ``subscribed`` in that epoch named (its
   ``seq``: 0 when the client came from another epoch, whose numbering it then gets from
   the start) is received or inside a ``gap`` it was sent (an ``epoch_changed`` gap covers
   everything after the cursor the client resumed from, in the old epoch). Before
   `Simulation.settle` this is checked up to what the client has heard of; after, up to the
   last seq published in that epoch (a restart ends an epoch, and so does a topic dropped
   and created again);
3. after `Simulation.settle`, every client is connected, subscribed to every topic in the
   topic's current epoch, and has nothing left in its outbox.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from wirestate.core.actions import Close, Ping
from wirestate.core.causes import CloseCause, GapReason
from wirestate.core.hub import Connection, Hub, HubConfig
from wirestate.core.lifecycle import ConnState

Since = Mapping[str, int | tuple[int, str | None]]
Key = tuple[str, str]  # (epoch, topic)
Gap = tuple[int | None, int | None, str]  # (from_seq, to_seq, reason); to_seq None: open

#: Small numbers so overflows, evictions and keep-alive timeouts happen within a few steps.
#: The outbox holds a full replay (welcome, subscribed, gap, history) so a resume fits.
SIM_CONFIG = HubConfig(
    ping_interval=5.0,
    ping_timeout=2.0,
    close_timeout=1.0,
    send_queue_size=8,
    history_size=4,
)


class Client(Protocol):
    """What the simulation needs of a client's logic."""

    def on_frame(self, msg: dict[str, Any]) -> None:
        """One parsed frame the client's connection delivered (welcome, subscribed, event,
        gap...), in order."""

    def resume_since(self) -> Since:
        """The ``since`` to subscribe with on (re)connect: ``{topic: (seq, epoch)}``."""


class ResumingClient:
    """The default reconnect logic: resume every topic from the last seq it knows, in the
    epoch it was counted in. Subclass it to test your own handling.

    ``last[topic]`` is the highest seq the client has received or been told it lost (a gap),
    or where ``subscribed`` said the subscription took effect if higher; ``epochs[topic]``
    the epoch it counts in. A ``subscribed`` that refuses the resume into a new epoch is
    followed by an ``epoch_changed`` gap: the client adopts the new epoch (its count from
    ``subscribed``'s ``seq``) only when that gap arrives, so a cut between the two resumes
    in the old epoch again and is told again.
    """

    def __init__(self) -> None:
        self.last: dict[str, int] = {}
        self.epochs: dict[str, str] = {}
        self.pending: dict[str, tuple[str, int]] = {}  # epoch and seq its gap will adopt

    def on_frame(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == "subscribed":
            for topic, epoch in msg["epoch"].items():
                seq = msg["seq"][topic]
                if topic in self.epochs and not msg["recovered"][topic]:
                    # An epoch_changed gap may follow: it alone moves the count to (epoch, seq).
                    self.pending[topic] = (epoch, seq)
                    if epoch != self.epochs[topic]:
                        continue
                else:
                    self.pending.pop(topic, None)
                if self.epochs.get(topic) != epoch:
                    self.epochs[topic] = epoch
                    self.last[topic] = 0
                self.last[topic] = max(self.last[topic], seq)
        elif kind == "event":
            self.last[msg["topic"]] = msg["seq"]
        elif kind == "gap" and msg["reason"] == GapReason.EPOCH_CHANGED:
            topic = msg["topic"]
            self.epochs[topic], self.last[topic] = self.pending.pop(topic, (self.epochs[topic], 0))
        elif kind == "gap":
            topic = msg["topic"]
            self.last[topic] = max(self.last[topic], msg["to_seq"])

    def resume_since(self) -> Since:
        return {t: (seq, self.epochs[t]) for t, seq in self.last.items()}


@dataclass(frozen=True)
class Rates:
    """Probability of each kind of step; the rest is a client's turn (deliver or reconnect)."""

    publish: float = 0.4
    cut: float = 0.05
    slow: float = 0.05
    tick: float = 0.05
    restart: float = 0.0

    def __post_init__(self) -> None:
        values = (self.publish, self.cut, self.slow, self.tick, self.restart)
        if any(not 0 <= v <= 1 for v in values) or sum(values) > 1:
            raise ValueError(f"rates must be in [0, 1] and sum to at most 1: {self!r}")


@dataclass(frozen=True)
class ClientReport:
    """What one client received: seqs and gaps per (epoch, topic), and its reconnects."""

    name: str
    received: dict[Key, tuple[int, ...]]
    gaps: dict[Key, tuple[Gap, ...]]
    reconnects: int


@dataclass(frozen=True)
class Report:
    clients: tuple[ClientReport, ...]
    steps: int
    published: int
    delivered: int  # events delivered to clients
    gaps: int  # gap frames delivered to clients
    cuts: int
    slow_readers: int
    server_closes: int  # closes the hub decided (slow consumer, keep-alive)
    restarts: int


@dataclass
class _Slot:
    """One simulated client: its logic, its live connection, and the observer's records."""

    name: str
    client: Client
    conn: Connection | None = None
    slow: int = 0  # steps left during which the reader does not read
    ping_owed: bool = False
    connects: int = 0
    since: dict[str, tuple[int, str | None]] = field(default_factory=dict)  # of this conn
    epoch: dict[str, str] = field(default_factory=dict)  # topic -> epoch last subscribed
    resumed_from: dict[str, tuple[str, int]] = field(default_factory=dict)
    entering: dict[str, int] = field(default_factory=dict)  # owed after this from its gap on
    obliged: dict[Key, int] = field(default_factory=dict)  # owed every seq after this
    received: dict[Key, list[int]] = field(default_factory=dict)
    gaps: dict[Key, list[Gap]] = field(default_factory=dict)


class Simulation:
    """A hub, a fake clock and ``clients`` simulated clients, driven by ``rng``.

    ``rng`` returns floats in [0, 1) (``random.Random(seed).random``). Every client connects
    and subscribes to all ``topics`` at construction. Drive it with `step` or `run`, then
    call `settle` and `check`; `report` summarizes what each client received.
    """

    def __init__(
        self,
        rng: Callable[[], float],
        *,
        clients: int = 3,
        topics: Sequence[str] = ("t",),
        config: HubConfig = SIM_CONFIG,
        client_factory: Callable[[], Client] = ResumingClient,
        max_slow_steps: int = 20,
        trace_size: int = 20,
    ) -> None:
        if clients < 1 or not topics:
            raise ValueError("a simulation needs at least one client and one topic")
        self.rng = rng
        self.topics = tuple(topics)
        self.config = config
        self.max_slow_steps = max_slow_steps
        self.now = 0.0
        self.hub = Hub(config, epoch="e0")
        self.trace: list[str] = []  # the last ``trace_size`` steps, for failure messages
        self._trace_size = trace_size
        self._finals: dict[Key, int] = {}  # the last seq published per (epoch, topic)
        self._settled = False
        self.steps = self.published = self.delivered = self.gaps = 0
        self.cuts = self.slow_readers = self.server_closes = self.restarts = 0
        self.slots = [_Slot(f"c{i}", client_factory()) for i in range(clients)]
        for slot in self.slots:
            self._connect(slot)

    # -- driving -------------------------------------------------------------------------

    def step(self, rates: Rates | None = None) -> None:
        """One seeded action, then the hub's decisions are carried out."""
        rates = rates or Rates()
        self._settled = False
        self.steps += 1
        for slot in self.slots:
            if slot.slow:
                slot.slow -= 1
                if not slot.slow:
                    self._answer_ping(slot)
        r = self.rng()
        if r < rates.publish:
            self.publish(self.topics[self._pick(len(self.topics))])
            return
        r -= rates.publish
        if r < rates.tick:
            deadline = self.hub.next_deadline()
            self.now = max(self.now, self.now + 1.0 if deadline is None else deadline)
            self._log(f"tick {self.now}")
            self.hub.tick(self.now)
            self._after()
            return
        r -= rates.tick
        if r < rates.restart:
            self.restart()
            return
        r -= rates.restart
        slot = self.slots[self._pick(len(self.slots))]
        if slot.conn is None:
            self._connect(slot)
        elif r < rates.cut:
            self.cut(slot.name)
        elif r < rates.cut + rates.slow:
            slot.slow = 1 + self._pick(self.max_slow_steps)
            self.slow_readers += 1
            self._log(f"slow {slot.name} {slot.slow}")
        elif not slot.slow:
            self._deliver(slot)
        self._after()

    def run(
        self,
        steps: int,
        *,
        publish_rate: float = 0.4,
        cut_rate: float = 0.05,
        slow_rate: float = 0.05,
        tick_rate: float = 0.05,
        restart_rate: float = 0.0,
    ) -> Simulation:
        """``steps`` seeded steps with these probabilities; returns the simulation."""
        rates = Rates(publish_rate, cut_rate, slow_rate, tick_rate, restart_rate)
        for _ in range(steps):
            self.step(rates)
        return self

    def publish(self, topic: str) -> int:
        """Publish one event on ``topic`` now; returns its seq."""
        seq = self.hub.publish(topic, {"step": self.steps}, self.now)
        self._finals[(self.hub.topics[topic].epoch, topic)] = seq
        self.published += 1
        self._log(f"publish {topic} {seq}")
        self._after()
        return seq

    def cut(self, name: str) -> None:
        """The client's transport dies: the reader fails, the writer stops, the handler
        unregisters. What the outbox held is lost; the client reconnects later."""
        slot = self._slot(name)
        conn = slot.conn
        if conn is None:
            return
        self.cuts += 1
        self._log(f"cut {name}")
        slot.conn = None
        self.hub.reader_done(conn, self.now, CloseCause.READ_ERROR)
        self.hub.writer_done(conn, self.now)
        self.hub.unregister(conn, self.now)
        self._after()

    def restart(self) -> None:
        """The node restarts without a persistent bus: a new hub with a new epoch, every
        connection lost, every topic's sequence restarted."""
        self.restarts += 1
        self.hub = Hub(self.config, epoch=f"e{self.restarts}")
        self._log(f"restart e{self.restarts}")
        for slot in self.slots:
            slot.conn = None
            slot.ping_owed = False

    def settle(self, max_rounds: int = 50) -> Simulation:
        """Stop the faults: every reader reads again, every client reconnects and drains
        its outbox, until nothing changes (or ``max_rounds``); `check` then also requires
        every client to be current. Returns the simulation."""
        for slot in self.slots:
            slot.slow = 0
            self._answer_ping(slot)
        for _ in range(max_rounds):
            busy = False
            for slot in self.slots:
                if slot.conn is None:
                    self._connect(slot)
                    busy = True
                elif slot.conn.outbox or slot.conn.owed:
                    self._deliver(slot)
                    busy = True
                self._after()
            if not busy:
                break
        self._settled = True
        return self

    # -- judging -------------------------------------------------------------------------

    def report(self) -> Report:
        return Report(
            clients=tuple(
                ClientReport(
                    s.name,
                    {k: tuple(v) for k, v in sorted(s.received.items())},
                    {k: tuple(v) for k, v in sorted(s.gaps.items())},
                    s.connects - 1,
                )
                for s in self.slots
            ),
            steps=self.steps,
            published=self.published,
            delivered=self.delivered,
            gaps=self.gaps,
            cuts=self.cuts,
            slow_readers=self.slow_readers,
            server_closes=self.server_closes,
            restarts=self.restarts,
        )

    def check(self) -> None:
        """Raise ``AssertionError`` naming the client, epoch and topic of the first property
        that fails (see the module docstring), with the last steps of the trace."""
        for slot in self.slots:
            problem = self._problem(slot)
            if problem is not None:
                raise AssertionError(
                    f"client {slot.name}: {problem} (after {self.steps} steps; last steps: "
                    f"{'; '.join(self.trace)})"
                )

    def _problem(self, slot: _Slot) -> str | None:
        for (epoch, topic), seqs in sorted(slot.received.items()):
            for i in range(1, len(seqs)):
                if seqs[i] <= seqs[i - 1]:
                    what = "a duplicate" if seqs[i] in seqs[:i] else "out of order"
                    return (
                        f"topic {topic!r} epoch {epoch!r}: seq {seqs[i]} received after "
                        f"{seqs[i - 1]} is {what}"
                    )
        if self._settled:
            conn = slot.conn
            if conn is None or conn.state is not ConnState.OPEN or conn.outbox or conn.owed:
                return "not connected and drained after settle()"
            for topic in self.topics:
                # A topic dropped and created again counts in an epoch of its own.
                held = self.hub.topics.get(topic)
                epoch = self.hub.epoch if held is None else held.epoch
                if slot.epoch.get(topic) != epoch or topic not in conn.topics:
                    return f"topic {topic!r} not subscribed in epoch {epoch!r}"
        for key, start in sorted(slot.obliged.items()):
            epoch, topic = key
            final = self._finals.get(key, 0)
            received = set(slot.received.get(key, ()))
            gaps = slot.gaps.get(key, [])
            heard = max([0, *received, *(hi if hi is not None else final for _, hi, _ in gaps)])
            upto = final if self._settled else min(final, heard)
            for seq in range(start + 1, upto + 1):
                if seq not in received and not any(_covers(g, seq) for g in gaps):
                    return (
                        f"topic {topic!r} epoch {epoch!r}: seq {seq} published while "
                        "subscribed was neither received nor inside a gap"
                    )
        return None

    # -- internals -----------------------------------------------------------------------

    def _pick(self, n: int) -> int:
        return min(int(self.rng() * n), n - 1)

    def _log(self, line: str) -> None:
        self.trace.append(f"{self.steps}: {line}")
        del self.trace[: -self._trace_size]

    def _slot(self, name: str) -> _Slot:
        for slot in self.slots:
            if slot.name == name:
                return slot
        raise KeyError(name)

    def _connect(self, slot: _Slot) -> None:
        hub, now = self.hub, self.now
        slot.connects += 1
        self._log(f"connect {slot.name}")
        conn = slot.conn = hub.connect(slot.name, now)
        hub.accept(conn, now)
        hub.start(conn, now)
        since = slot.client.resume_since()
        slot.since = {t: v if isinstance(v, tuple) else (v, None) for t, v in since.items()}
        hub.subscribe(conn, self.topics, now, since=since)
        slot.ping_owed = False
        self._after()

    def _deliver(self, slot: _Slot) -> None:
        assert slot.conn is not None
        frames = self.hub.drain(slot.conn)
        self._log(f"deliver {slot.name} {len(frames)}")
        for frame in frames:
            msg = orjson.loads(frame)
            self._observe(slot, msg)
            slot.client.on_frame(msg)

    def _observe(self, slot: _Slot, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == "subscribed":
            for topic, epoch in msg["epoch"].items():
                seq, since_epoch = slot.since.get(topic, (0, None))
                old = since_epoch or slot.epoch.get(topic)
                if old is not None and old != epoch:
                    slot.resumed_from[topic] = (old, seq)
                else:
                    slot.resumed_from.pop(topic, None)
                slot.entering.pop(topic, None)
                if old is not None and old != epoch and not msg["recovered"][topic]:
                    # The client enters the new epoch with its epoch_changed gap: cut before
                    # it, the client never was in this epoch and is owed nothing of it.
                    slot.entering[topic] = msg["seq"][topic]
                else:
                    slot.obliged.setdefault((epoch, topic), msg["seq"][topic])
                slot.epoch[topic] = epoch
        elif kind == "event":
            self.delivered += 1
            key = (slot.epoch[msg["topic"]], msg["topic"])
            slot.received.setdefault(key, []).append(msg["seq"])
        elif kind == "gap":
            self.gaps += 1
            topic = msg["topic"]
            lo, hi = msg["from_seq"], msg["to_seq"]
            epoch = slot.epoch[topic]
            if msg["reason"] == GapReason.EPOCH_CHANGED:
                # Everything after the cursor the client resumed from, in the epoch it
                # resumed from. Resuming beyond the head of the *same* epoch covers nothing.
                cursor = slot.resumed_from.get(topic)
                start = slot.entering.pop(topic, None)
                if start is not None:
                    slot.obliged.setdefault((epoch, topic), start)
                epoch, lo, hi = (cursor[0], cursor[1] + 1, None) if cursor else (epoch, None, None)
            slot.gaps.setdefault((epoch, topic), []).append((lo, hi, msg["reason"]))

    def _answer_ping(self, slot: _Slot) -> None:
        if slot.ping_owed and slot.conn is not None:
            self.hub.pong_received(slot.conn, self.now)
        slot.ping_owed = False

    def _after(self) -> None:
        """Carry out the hub's decisions, as the adapter would, until none is left."""
        hub = self.hub
        hub.take_ready()
        while actions := hub.actions():
            for action in actions:
                # Unregistered, Reject and Abort need nothing: pumps end as soon as asked.
                if isinstance(action, Ping):
                    slot = self._slot(action.client_id)
                    slot.ping_owed = True
                    if not slot.slow:
                        self._answer_ping(slot)
                elif isinstance(action, Close):
                    slot = self._slot(action.client_id)
                    if slot.conn is not None:  # None: a cut already ended both pumps
                        self._server_close(slot, action)

    def _server_close(self, slot: _Slot, action: Close) -> None:
        """The hub closed the client: the writer flushes what it holds and sends the close
        frame; the client's reader sees it and the handler unregisters."""
        conn = slot.conn
        assert conn is not None
        self.server_closes += 1
        self._log(f"close {slot.name} {action.cause.value}")
        self._deliver(slot)
        slot.conn = None
        self.hub.writer_done(conn, self.now)
        self.hub.reader_done(conn, self.now, CloseCause.PEER_CLOSE, action.code)
        self.hub.unregister(conn, self.now)


def _covers(gap: Gap, seq: int) -> bool:
    lo, hi, _ = gap
    return lo is not None and lo <= seq and (hi is None or seq <= hi)
