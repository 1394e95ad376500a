"""Exhaustive interleaving explorer behind ``wirestate check``.

It runs the real hub (not a model of it) for N clients through every interleaving of the
inputs an adapter can feed it, breadth first up to a depth, and checks the lifecycle
invariants (`wirestate.core.verify.checks.Referee`) after every step. Breadth first means the first
violation found has a shortest trace.

Inputs per client: the handshake accepted or rejected, the pumps starting, subscribe,
unsubscribe, an application ping, an invalid frame, a server-side close, a pong, the writer
draining its outbox, the peer closing, a read error, a write error, and the handler asking to
unregister (at any time: the hub must refuse while a pump runs). Global inputs: publish,
a burst of publishes that overflows outboxes, time passing to the next deadline, an event
loop stall, and shutdown.

States are merged when their key is equal: each client's lifecycle state, cause, outbox
depth, owed gaps, subscriptions, keep-alive flags, deadlines relative to ``now`` and the
referee's truth. Sequence numbers and absolute times are left out of the key (they grow
without bound and do not change which transitions are possible).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from transitions import MachineError

from wirestate.core.causes import CloseCause, ErrorCode, OverflowPolicy
from wirestate.core.hub import Connection, Hub, HubConfig
from wirestate.core.lifecycle import ENGINE as LIFECYCLE
from wirestate.core.lifecycle import ConnState
from wirestate.core.machine import Engine
from wirestate.core.verify.branch import branch, clone
from wirestate.core.verify.checks import InvariantViolation, Referee

S = ConnState

#: Deliberately small numbers so every deadline and overflow is reachable in a few steps.
EXPLORE_CONFIG = HubConfig(
    ping_interval=3.0,
    ping_timeout=1.0,
    close_timeout=2.0,
    send_queue_size=2,
    history_size=4,
    bad_input_limit=2,
    overflow={"k": OverflowPolicy.KEEP_LATEST},
)
STALL = 1.5

Label = tuple[Any, ...]


class World:
    """One explored state: the hub, the client slots and the referee beside them."""

    __slots__ = ("conns", "hub", "now", "referee")

    def __init__(
        self, hub: Hub, conns: list[Connection | None], referee: Referee, now: float = 0.0
    ) -> None:
        self.hub = hub
        self.conns = conns
        self.referee = referee
        self.now = now

    @classmethod
    def initial(
        cls,
        clients: int,
        config: HubConfig = EXPLORE_CONFIG,
        lifecycle: Engine[ConnState] = LIFECYCLE,
    ) -> World:
        hub = Hub(config, epoch="x", lifecycle=lifecycle)
        return cls(hub, [None] * clients, Referee(hub))

    def clone(self) -> World:
        hub = branch(self.hub)
        registered = hub.clients
        conns: list[Connection | None] = [
            None if c is None else registered.get(c.client_id) or clone(c) for c in self.conns
        ]
        return World(hub, conns, self.referee.copy(hub), self.now)

    def key(self) -> tuple[Any, ...]:
        now = self.now
        parts: list[Any] = []
        for c in self.conns:
            if c is None:
                parts.append(None)
                continue
            parts.append(
                (
                    c.state,
                    c.cause,
                    len(c.outbox),
                    tuple(sorted((k, len(v)) for k, v in c.owed.items())) if c.owed else (),
                    tuple(sorted(c.topics)),
                    c.bad_inputs,
                    _rel(c.next_ping_at, now),
                    _rel(c.pong_deadline, now),
                    _rel(c.close_deadline, now),
                    self.referee.truth[c.client_id].key(),
                )
            )
        return tuple(parts)


def _rel(t: float | None, now: float) -> float | None:
    # Explored times are sums of a few binary fractions (0.5, 1.5, 2, 3): exact floats.
    return None if t is None else t - now


def inputs(w: World) -> Iterator[Label]:
    """Every input an adapter could feed the hub in this state."""
    truth = w.referee.truth
    for i, c in enumerate(w.conns):
        if c is None:
            yield ("accept", i)
            yield ("reject", i)
            continue
        t = truth[c.client_id]
        if c.state is S.REGISTERING:
            yield ("start", i)
        if c.accepting:
            yield ("subscribe", i, "t") if "t" not in c.topics else ("unsubscribe", i, "t")
            if "k" not in c.topics:
                yield ("subscribe", i, "k")
            yield ("app_ping", i)
            yield ("bad_input", i)
            yield ("close", i)
        if t.ping_at is not None and c.state is S.OPEN:
            yield ("pong", i)
        if t.writer and (c.outbox or c.owed):
            yield ("write", i)
        if t.reader:
            yield ("peer_close", i)
            yield ("read_error", i)
        if t.writer:
            yield ("write_error", i)
        if c.state not in (S.HANDSHAKING, S.REJECTED):
            yield ("unregister", i)
    yield ("publish", "t")
    yield ("publish", "k")
    yield ("burst", "t")
    if w.hub.next_deadline() is not None:
        yield ("tick",)
    if any(t.ping_at is not None for t in truth.values()):
        yield ("stall",)
    if w.hub.clients:
        yield ("shutdown",)


def apply(w: World, label: Label) -> list[bytes]:
    """Feed one input to the hub and check every invariant; raises `InvariantViolation`.

    Returns the frames a ``write`` input drained (empty for every other input)."""
    hub, ref = w.hub, w.referee
    now = w.now
    kind = label[0]
    written: list[bytes] = []
    conn = w.conns[label[1]] if len(label) > 1 and isinstance(label[1], int) else None
    if kind == "accept":
        conn = w.conns[label[1]] = hub.connect(f"c{label[1]}", now)
        hub.accept(conn, now)
    elif kind == "reject":
        conn = w.conns[label[1]] = hub.connect(f"c{label[1]}", now)
        hub.reject(conn, CloseCause.POLICY, now)
    elif conn is not None:
        written = _client_input(w, conn, kind, label, now)
    elif kind == "publish":
        hub.publish(label[1], {"n": 1}, now)
    elif kind == "burst":
        for _ in range(hub.config.send_queue_size + 1):
            hub.publish(label[1], {"n": 1}, now)
    elif kind == "tick":
        deadline = hub.next_deadline()
        assert deadline is not None
        w.now = now = max(now, deadline)
        hub.tick(now)
    elif kind == "stall":
        w.now = now = now + STALL
        ref.loop_stalled(STALL)
        hub.loop_stalled(now, STALL)
        hub.tick(now)
    elif kind == "shutdown":
        hub.shutdown(now)
    ref.step(w.conns, hub.actions(), now)
    hub.take_ready()
    return written


def _client_input(w: World, conn: Connection, kind: str, label: Label, now: float) -> list[bytes]:
    hub, ref = w.hub, w.referee
    if kind == "start":
        ref.pumps_started(conn)
        hub.start(conn, now)
    elif kind == "subscribe":
        hub.subscribe(conn, [label[2]], now)
    elif kind == "unsubscribe":
        hub.unsubscribe(conn, [label[2]], now)
    elif kind == "app_ping":
        hub.app_ping(conn, "p", now)
    elif kind == "bad_input":
        hub.bad_input(conn, ErrorCode.BAD_JSON, "invalid JSON", now)
    elif kind == "close":
        hub.close(conn, CloseCause.AUTH_EXPIRED, now)
    elif kind == "pong":
        ref.pong_answered(conn)
        hub.pong_received(conn, now)
    elif kind == "write":
        return hub.drain(conn)
    elif kind in ("peer_close", "read_error"):
        ref.reader_finished(conn)
        if kind == "peer_close":
            hub.reader_done(conn, now, CloseCause.PEER_CLOSE, 1000)
        else:
            hub.reader_done(conn, now, CloseCause.READ_ERROR)
    elif kind == "write_error":
        ref.writer_finished(conn)
        hub.writer_done(conn, now)
    elif kind == "unregister":
        before = conn.state
        try:
            hub.unregister(conn, now)
        except MachineError:
            if conn.state is not before:
                raise InvariantViolation(1, "a refused unregister changed the state") from None
    return []


def _refused_unregister(w: World, label: Label) -> bool:
    """An unregister the table refuses raises before any change: no need to run it."""
    if label[0] != "unregister":
        return False
    conn = w.conns[label[1]]
    assert conn is not None
    return not w.hub.lifecycle.allows(conn.state, "unregister")


def describe(label: Label) -> str:
    kind, *args = label
    who = f"c{args[0]}" if args and isinstance(args[0], int) else ""
    rest = [str(a) for a in args[1:]] if who else [str(a) for a in args]
    return " ".join([kind, *([who] if who else []), *rest])


@dataclass
class Result:
    """What an exploration found: ``violation`` is None when every invariant held."""

    states: int
    transitions: int
    depth: int
    seconds: float
    violation: InvariantViolation | None = None
    trace: list[str] = field(default_factory=list)
    complete: bool = False  # the whole reachable space was explored within the depth

    @property
    def states_per_second(self) -> float:
        return self.states / max(self.seconds, 1e-9)


class Explorable(Protocol):
    """What the search needs of a world: an independent copy and a merge key."""

    def clone(self) -> Any: ...

    def key(self) -> tuple[Any, ...]: ...


def search(
    root: Explorable,
    inputs: Callable[[Any], Iterable[Label]],
    apply: Callable[[Any, Label], object],
    *,
    depth: int,
    clock: Callable[[], float],
    describe: Callable[[Label], str] = describe,
    skip: Callable[[Any, Label], bool] | None = None,
    max_states: int | None = None,
) -> Result:
    """Breadth-first search from ``root``; stops at the first `InvariantViolation`.

    ``skip(world, label)`` may declare an input a self-loop without running it (for inputs
    the table refuses before anything changes). ``clock`` measures the run's own duration
    for the report (callers pass ``time.perf_counter``; the core reads no clock itself).

    The cyclic garbage collector is paused during the search: worlds hold no reference
    cycles, so reference counting frees them, while full collections over the growing table
    of visited states cost over a third of the run.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _bfs(root, inputs, apply, depth, clock, describe, skip, max_states)
    finally:
        if enabled:
            gc.enable()


def _bfs(
    root: Explorable,
    inputs: Callable[[Any], Iterable[Label]],
    apply: Callable[[Any, Label], object],
    depth: int,
    clock: Callable[[], float],
    describe: Callable[[Label], str],
    skip: Callable[[Any, Label], bool] | None,
    max_states: int | None,
) -> Result:
    started = clock()
    root_key = root.key()
    parents: dict[tuple[Any, ...], tuple[tuple[Any, ...] | None, Label | None]] = {
        root_key: (None, None)
    }
    frontier: list[tuple[tuple[Any, ...], Any]] = [(root_key, root)]
    edges = 0
    level = 0
    while frontier and level < depth:
        level += 1
        nxt: list[tuple[tuple[Any, ...], Any]] = []
        for key, world in frontier:
            for label in inputs(world):
                edges += 1
                if skip is not None and skip(world, label):
                    continue
                child = world.clone()
                try:
                    apply(child, label)
                except InvariantViolation as exc:
                    trace = [*_trace(parents, key, describe), describe(label)]
                    return Result(len(parents), edges, level, clock() - started, exc, trace)
                ckey = child.key()
                if ckey in parents:
                    continue
                parents[ckey] = (key, label)
                nxt.append((ckey, child))
                if max_states is not None and len(parents) >= max_states:
                    return Result(len(parents), edges, level, clock() - started)
        frontier = nxt
    return Result(len(parents), edges, level, clock() - started, complete=not frontier)


def explore(
    clients: int = 3,
    depth: int = 8,
    *,
    config: HubConfig = EXPLORE_CONFIG,
    max_states: int | None = None,
    clock: Callable[[], float],
    lifecycle: Engine[ConnState] = LIFECYCLE,
) -> Result:
    """Every interleaving of inputs for ``clients`` clients of the real hub, to ``depth``.
    ``lifecycle``: the table's engine, a mutant's to show that the search catches it."""
    return search(
        World.initial(clients, config, lifecycle),
        inputs,
        apply,
        depth=depth,
        clock=clock,
        skip=_refused_unregister,
        max_states=max_states,
    )


def _trace(
    parents: dict[tuple[Any, ...], tuple[tuple[Any, ...] | None, Label | None]],
    key: tuple[Any, ...],
    describe: Callable[[Label], str],
) -> list[str]:
    out: list[str] = []
    k: tuple[Any, ...] | None = key
    while k is not None:
        parent, label = parents[k]
        if label is not None:
            out.append(describe(label))
        k = parent
    return out[::-1]
