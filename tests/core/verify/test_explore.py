"""The explorer and its referee: the clean core passes, and each invariant check bites."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import pytest

from wirestate.core.actions import Abort, Close, Ping, Unregistered
from wirestate.core.breaker import (
    Backoff,
    BreakerConfig,
    BreakerState,
    StateChanged,
    TransitionCause,
)
from wirestate.core.causes import CloseCause
from wirestate.core.hub import Connection, Hub, HubConfig
from wirestate.core.lifecycle import ConnState
from wirestate.core.verify.checks import InvariantViolation, Referee
from wirestate.core.verify.explore import World, apply, describe, explore, inputs, search
from wirestate.core.verify.explore_breaker import (
    BREAKER_CONFIG,
    BreakerWorld,
    breaker_apply,
    explore_breaker,
)

S = ConnState


def test_the_clean_core_holds_every_invariant_for_three_clients() -> None:
    result = explore(3, 6, clock=time.perf_counter)
    assert result.violation is None
    assert result.states > 10_000
    assert result.transitions > result.states
    assert result.depth == 6


def test_two_clients_explored_to_completion_of_a_depth() -> None:
    shallow = explore(2, 3, clock=time.perf_counter)
    deeper = explore(2, 4, clock=time.perf_counter)
    assert shallow.states < deeper.states
    assert not deeper.complete  # the space keeps growing with depth (time, seqs)


def test_max_states_stops_the_search() -> None:
    result = explore(3, 10, max_states=500, clock=time.perf_counter)
    assert result.states == 500
    assert result.violation is None


def test_states_per_second_is_reported_even_for_an_instant_run() -> None:
    ticks = iter([10.0, 12.0])
    result = explore(1, 1, clock=lambda: next(ticks))
    assert result.seconds == 2.0
    assert result.states_per_second == result.states / 2.0


def test_the_whole_space_of_a_tiny_world_is_reported_complete() -> None:
    class Counter:
        def __init__(self, n: int = 0) -> None:
            self.n = n

        def clone(self) -> Counter:
            return Counter(self.n)

        def key(self) -> tuple[int]:
            return (self.n,)

    def step(w: Counter, label: tuple[str]) -> None:
        w.n = min(w.n + 1, 3)

    def one(w: Counter) -> Iterator[tuple[str]]:
        yield ("inc",)

    result = search(Counter(), one, step, depth=10, clock=time.perf_counter)
    assert result.complete
    assert result.states == 4


def test_a_world_clone_is_independent() -> None:
    w = World.initial(2)
    apply(w, ("accept", 0))
    apply(w, ("start", 0))
    apply(w, ("subscribe", 0, "t"))
    twin = w.clone()
    apply(twin, ("publish", "t"))
    apply(twin, ("peer_close", 0))
    original = w.conns[0]
    assert original is not None
    assert original.state is S.OPEN
    assert len(original.outbox) == 2  # welcome and subscribed, not the clone's event
    assert w.key() != twin.key()
    assert twin.hub.topics["t"].subscribers["c0"] is twin.conns[0]


def test_inputs_offer_only_what_an_adapter_could_do() -> None:
    w = World.initial(1)
    assert ("start", 0) not in inputs(w)
    apply(w, ("accept", 0))
    offered = list(inputs(w))
    assert ("start", 0) in offered
    assert ("peer_close", 0) not in offered  # no reader yet
    apply(w, ("start", 0))
    assert ("peer_close", 0) in list(inputs(w))


def test_describe_reads_like_a_script() -> None:
    assert describe(("accept", 0)) == "accept c0"
    assert describe(("subscribe", 2, "t")) == "subscribe c2 t"
    assert describe(("burst", "t")) == "burst t"
    assert describe(("tick",)) == "tick"


def test_the_breaker_explorer_passes_the_clean_breaker() -> None:
    result = explore_breaker(8, clock=time.perf_counter)
    assert result.violation is None
    assert result.states > 500


@pytest.mark.parametrize(
    "config",
    [
        BreakerConfig(failure_threshold=1, reset_timeout=2.0),
        BreakerConfig(failure_threshold=1, reset_timeout=9.0, backoff=Backoff(base=2.0, max=4.0)),
    ],
    ids=["no backoff", "backoff with its own base"],
)
def test_the_breaker_explorer_computes_the_wait_itself(config: BreakerConfig) -> None:
    result = explore_breaker(9, config=config, clock=time.perf_counter)
    assert result.violation is None


# -- the referee: each check fails on a world that breaks it ----------------------------


def _world() -> tuple[Hub, Referee, Connection]:
    hub = Hub(HubConfig(ping_timeout=1.0, close_timeout=2.0))
    ref = Referee(hub)
    conn = hub.connect("c0", 0.0)
    hub.accept(conn, 0.0)
    ref.pumps_started(conn)
    hub.start(conn, 0.0)
    ref.step([conn], hub.actions(), 0.0)
    return hub, ref, conn


def test_referee_unregistered_while_a_pump_runs() -> None:
    _hub, ref, conn = _world()
    with pytest.raises(InvariantViolation, match="while its reader and writer still runs"):
        ref.step([conn], [Unregistered("c0", CloseCause.PEER_CLOSE, 1000, 1.0)], 1.0)


def test_referee_unregistered_twice_or_never_registered() -> None:
    _hub, ref, conn = _world()
    ref.reader_finished(conn)
    ref.writer_finished(conn)
    gone = Unregistered("c0", CloseCause.PEER_CLOSE, 1000, 1.0)
    ref._action(gone, 1.0)
    with pytest.raises(InvariantViolation, match="second time"):
        ref._action(gone, 1.0)
    with pytest.raises(InvariantViolation, match="never registered"):
        ref._action(Unregistered("zz", CloseCause.PEER_CLOSE, 1000, 1.0), 1.0)


def test_referee_close_without_cause() -> None:
    _hub, ref, conn = _world()
    with pytest.raises(InvariantViolation, match="without a cause"):
        ref.step([conn], [Close("c0", 1000, None, "")], 1.0)  # type: ignore[arg-type]
    conn.state = S.CLOSING
    with pytest.raises(InvariantViolation, match="closing without a cause"):
        ref.step([conn], [], 1.0)


def test_referee_keepalive_close_needs_an_overdue_ping() -> None:
    _hub, ref, _conn = _world()
    ka = Close("c0", 1011, CloseCause.KEEPALIVE_TIMEOUT, "keepalive_timeout")
    with pytest.raises(InvariantViolation, match="no overdue pong"):
        ref._action(ka, 5.0)
    ref._action(Ping("c0"), 5.0)
    ref.loop_stalled(0.5)
    with pytest.raises(InvariantViolation, match="no overdue pong"):
        ref._action(ka, 6.2)  # 1.2 s after the ping, 0.5 of it stalled
    ref._action(ka, 6.5)


def test_referee_pumps_must_match_the_state() -> None:
    _hub, ref, conn = _world()
    ref.reader_finished(conn)
    with pytest.raises(InvariantViolation, match="pumps are reader=False writer=True"):
        ref.step([conn], [], 1.0)


def test_referee_no_frame_queued_after_close_and_none_without_writer() -> None:
    hub, ref, conn = _world()
    hub.close(conn, CloseCause.POLICY, 1.0)
    ref.step([conn], hub.actions(), 1.0)
    conn.outbox.append(b"late")
    with pytest.raises(InvariantViolation, match="queued after its close began"):
        ref.step([conn], [], 1.0)
    hub2, ref2, conn2 = _world()
    ref2.writer_finished(conn2)
    hub2.writer_done(conn2, 1.0)
    conn2.outbox.append(b"orphan")
    with pytest.raises(InvariantViolation, match="no writer"):
        ref2.step([conn2], hub2.actions(), 1.0)


def test_referee_abort_after_the_close_timeout() -> None:
    hub, ref, conn = _world()
    hub.close(conn, CloseCause.POLICY, 1.0)
    ref.step([conn], hub.actions(), 1.0)
    with pytest.raises(InvariantViolation, match="past the close timeout"):
        ref.step([conn], [], 3.5)
    ref.step([conn], [Abort("c0")], 3.5)


def test_referee_registry_and_index_hold_exactly_the_registered() -> None:
    hub, ref, conn = _world()
    hub.subscribe(conn, ["t"], 0.0)
    del hub.clients["c0"]
    with pytest.raises(InvariantViolation, match="registry holds"):
        ref.step([conn], [], 1.0)
    hub.clients["c0"] = conn
    hub.topics["t"].subscribers["ghost"] = conn
    with pytest.raises(InvariantViolation, match="indexes unregistered"):
        ref.step([conn], [], 1.0)
    del hub.topics["t"].subscribers["ghost"]
    del hub.topics["t"].subscribers["c0"]
    with pytest.raises(InvariantViolation, match="missing from t index"):
        ref.step([conn], [], 1.0)


def test_referee_unregistered_is_terminal() -> None:
    _hub, ref, conn = _world()
    ref.truth["c0"].unregistered = 1
    with pytest.raises(InvariantViolation, match="left unregistered"):
        ref.step([conn], [], 1.0)


def test_a_refused_unregister_that_changed_state_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from transitions import MachineError

    w = World.initial(1)
    apply(w, ("accept", 0))
    apply(w, ("start", 0))

    def sloppy(conn: Connection, now: float) -> None:
        conn.state = S.CLOSED
        raise MachineError("refused, but too late")

    monkeypatch.setattr(w.hub, "unregister", sloppy)
    with pytest.raises(InvariantViolation, match="refused unregister changed the state"):
        apply(w, ("unregister", 0))


def _breaker_world() -> BreakerWorld:
    return BreakerWorld(BREAKER_CONFIG)


def _changed(frm: BreakerState, to: BreakerState, at: float) -> StateChanged:
    return StateChanged("explored", frm, to, at, 0, None, TransitionCause.RESET)


def test_breaker_referee_state_must_follow_the_events() -> None:
    w = _breaker_world()
    w.state = BreakerState.OPEN
    with pytest.raises(InvariantViolation, match="its events say open"):
        breaker_apply(w, ("wait", 1.0))


def test_breaker_referee_rejection_in_closed_and_a_pass_while_open() -> None:
    w = _breaker_world()
    w.breaker.force_open(0.0)
    w.breaker.actions()  # the reference never hears of it
    with pytest.raises(InvariantViolation, match="rejected in closed"):
        breaker_apply(w, ("acquire",))
    w = _breaker_world()
    w.state, w.opened_at, w.openings = BreakerState.OPEN, 0.0, 1
    with pytest.raises(InvariantViolation, match="let through while OPEN"):
        breaker_apply(w, ("acquire",))


@pytest.mark.parametrize(
    ("events", "message"),
    [
        ([(BreakerState.OPEN, BreakerState.CLOSED)], "but the state was closed"),
        ([(BreakerState.CLOSED, BreakerState.CLOSED)], "same-state request"),
        ([(BreakerState.CLOSED, BreakerState.HALF_OPEN)], "closed half-opened"),
    ],
)
def test_breaker_referee_event_rules(
    monkeypatch: pytest.MonkeyPatch,
    events: list[tuple[BreakerState, BreakerState]],
    message: str,
) -> None:
    w = _breaker_world()
    fake = [_changed(a, b, 0.0) for a, b in events]
    monkeypatch.setattr(w.breaker, "actions", lambda: fake)
    with pytest.raises(InvariantViolation, match=message):
        breaker_apply(w, ("reset",))


def test_breaker_referee_trials_in_flight_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    w = _breaker_world()
    real = w.breaker.snapshot

    def crowded(now: float) -> Any:
        return dataclasses.replace(real(now), trials_in_flight=99)

    monkeypatch.setattr(w.breaker, "snapshot", crowded)
    with pytest.raises(InvariantViolation, match="99 trials in flight"):
        breaker_apply(w, ("wait", 1.0))
