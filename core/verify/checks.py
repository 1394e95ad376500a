"""The lifecycle invariants, checked after every step by both checkers.

`Referee` is the small reference model both ``wirestate check`` (``core/verify/explore.py``) and the
Hypothesis state machine (``core/verify/stateful.py``) keep beside the hub. It holds the adapter's
truth, which the hub cannot fake: which pumps the adapter started and which it saw finish,
which pings went out, how long the loop stalled. After each input the checker hands it the
actions the hub emitted; it raises `InvariantViolation` naming the broken invariant.

The five invariants (docs/state-machines.md):

1. A client is unregistered only after it was registered, only once, and only when its
   reader and its writer have both finished.
2. Nothing closes a connection without a cause; a peer that answers pings stays open (a
   keep-alive close needs a ping unanswered for ``ping_timeout`` of unstalled time).
3. No event is queued after closing begins; nothing is left for a writer that finished.
4. The registry and the subscription index hold exactly the registered, not-yet-unregistered
   clients.
5. Every client whose close began is aborted once ``close_timeout`` passes with a pump
   still running, so it reaches unregistered even when a pump is stuck.
"""

from __future__ import annotations

from wirestate.core.actions import Abort, Action, Close, Ping, Reject, Unregistered
from wirestate.core.causes import CloseCause
from wirestate.core.hub import Connection, Hub
from wirestate.core.lifecycle import CLOSING_STATES, PUMPS, REGISTERED, ConnState

S = ConnState


class InvariantViolation(AssertionError):
    """An invariant broke: ``invariant`` is the lifecycle invariant's number (1-5) or the
    name of another machine's rule set (``"breaker"``); the message says how."""

    def __init__(self, invariant: int | str, message: str) -> None:
        name = f"invariant {invariant}" if isinstance(invariant, int) else invariant
        super().__init__(f"{name}: {message}")
        self.invariant = invariant


class ClientTruth:
    """What the adapter knows about one client, independent of the hub's own bookkeeping."""

    __slots__ = (
        "aborted",
        "outbox_at_close",
        "ping_at",
        "reader",
        "registered",
        "stalled",
        "unregistered",
        "writer",
    )

    def __init__(self) -> None:
        self.reader = False
        self.writer = False
        self.registered = False
        self.unregistered = 0
        self.aborted = False
        self.outbox_at_close: int | None = None
        self.ping_at: float | None = None  # a protocol ping is outstanding since then
        self.stalled = 0.0  # seconds of loop stall while that ping was outstanding

    def copy(self) -> ClientTruth:
        n = ClientTruth.__new__(ClientTruth)
        n.reader, n.writer, n.registered = self.reader, self.writer, self.registered
        n.unregistered, n.aborted = self.unregistered, self.aborted
        n.outbox_at_close, n.ping_at, n.stalled = self.outbox_at_close, self.ping_at, self.stalled
        return n

    def key(self) -> tuple[object, ...]:
        return (
            self.reader,
            self.writer,
            self.registered,
            self.unregistered,
            self.aborted,
            self.outbox_at_close,
            self.ping_at is not None,
        )


class Referee:
    """Reference model and invariant checks for one hub and its connections."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.truth: dict[str, ClientTruth] = {}

    def copy(self, hub: Hub) -> Referee:
        other = Referee(hub)
        other.truth = {k: v.copy() for k, v in self.truth.items()}
        return other

    # -- what the adapter did ------------------------------------------------------------

    def pumps_started(self, conn: Connection) -> None:
        t = self._t(conn)
        t.reader = t.writer = True

    def reader_finished(self, conn: Connection) -> None:
        self._t(conn).reader = False

    def writer_finished(self, conn: Connection) -> None:
        self._t(conn).writer = False

    def pong_answered(self, conn: Connection) -> None:
        self._t(conn).ping_at = None

    def loop_stalled(self, duration: float) -> None:
        for t in self.truth.values():
            if t.ping_at is not None:
                t.stalled += duration

    # -- what the hub decided ------------------------------------------------------------

    def step(self, conns: list[Connection | None], actions: list[Action], now: float) -> None:
        """Check the emitted actions and every invariant; raises `InvariantViolation`."""
        for action in actions:
            self._action(action, now)
        live = [c for c in conns if c is not None]
        for conn in live:
            self._client(conn, now)
        self._registry(live)

    def _action(self, action: Action, now: float) -> None:
        hub = self.hub
        if isinstance(action, Unregistered):
            t = self.truth.setdefault(action.client_id, ClientTruth())
            if not t.registered:
                raise InvariantViolation(1, f"{action.client_id} unregistered, never registered")
            if t.unregistered:
                raise InvariantViolation(1, f"{action.client_id} unregistered a second time")
            if t.reader or t.writer:
                running = " and ".join(
                    n for n, on in (("reader", t.reader), ("writer", t.writer)) if on
                )
                raise InvariantViolation(
                    1, f"{action.client_id} unregistered while its {running} still runs"
                )
            t.unregistered += 1
        elif isinstance(action, Close | Reject):
            if not isinstance(action.cause, CloseCause):
                raise InvariantViolation(2, f"{action.client_id} closed without a cause")
            if action.cause is CloseCause.KEEPALIVE_TIMEOUT:
                t = self.truth.setdefault(action.client_id, ClientTruth())
                timeout = hub.config.ping_timeout
                if t.ping_at is None or now - t.ping_at - t.stalled < timeout:
                    raise InvariantViolation(
                        2, f"{action.client_id} closed for keep-alive with no overdue pong"
                    )
        elif isinstance(action, Ping):
            t = self.truth.setdefault(action.client_id, ClientTruth())
            t.ping_at, t.stalled = now, 0.0
        elif isinstance(action, Abort):
            self.truth.setdefault(action.client_id, ClientTruth()).aborted = True

    def _client(self, conn: Connection, now: float) -> None:
        t = self._t(conn)
        state = conn.state
        cid = conn.client_id
        if state in REGISTERED:
            t.registered = True
        if t.unregistered and state is not S.UNREGISTERED:
            raise InvariantViolation(1, f"{cid} left unregistered for {state}")
        if (state in CLOSING_STATES or state is S.REJECTED) and not isinstance(
            conn.cause, CloseCause
        ):
            raise InvariantViolation(2, f"{cid} is {state} without a cause")
        if state not in (S.HANDSHAKING, S.REGISTERING, S.REJECTED) and (
            state is not S.UNREGISTERED or t.reader or t.writer
        ):
            reader, writer = PUMPS[state]
            if (reader, writer) != (t.reader, t.writer):
                raise InvariantViolation(
                    1,
                    f"{cid} is {state} but its pumps are reader={t.reader} writer={t.writer}",
                )
        if state in CLOSING_STATES or state is S.UNREGISTERED:
            queued = len(conn.outbox)
            if t.outbox_at_close is not None and queued > t.outbox_at_close:
                raise InvariantViolation(3, f"{cid} had a frame queued after its close began")
            t.outbox_at_close = queued
            if not PUMPS[state][1] and queued:
                raise InvariantViolation(3, f"{cid} has frames queued but no writer")
            if (
                conn.closing_at is not None
                and (t.reader or t.writer)
                and now > conn.closing_at + self.hub.config.close_timeout
                and not t.aborted
            ):
                raise InvariantViolation(
                    5, f"{cid} still has a pump running past the close timeout, not aborted"
                )

    def _registry(self, live: list[Connection]) -> None:
        expected = {
            c.client_id
            for c in live
            if self.truth[c.client_id].registered and not self.truth[c.client_id].unregistered
        }
        registry = set(self.hub.clients)
        if registry != expected:
            raise InvariantViolation(
                4, f"registry holds {sorted(registry)}, expected {sorted(expected)}"
            )
        for topic in self.hub.topics.values():
            stray = set(topic.subscribers) - expected
            if stray:
                raise InvariantViolation(
                    4, f"topic {topic.name} indexes unregistered {sorted(stray)}"
                )
        for c in live:
            if c.client_id in expected:
                for name in c.topics:
                    if self.hub.topics[name].subscribers.get(c.client_id) is not c:
                        raise InvariantViolation(4, f"{c.client_id} missing from {name} index")

    def _t(self, conn: Connection) -> ClientTruth:
        t = self.truth.get(conn.client_id)
        if t is None:
            t = self.truth[conn.client_id] = ClientTruth()
        return t
