"""The one engine: it runs both tables exactly as `transitions` itself would, and refuses
what it would not run."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from enum import Enum
from typing import Any

import pytest
from transitions import MachineError

from wirestate.core import lifecycle
from wirestate.core.breaker import Backoff, Breaker, BreakerConfig, BreakerState, SlowCallRule
from wirestate.core.breaker import table as breaker_table
from wirestate.core.causes import CloseCause
from wirestate.core.hub import Connection
from wirestate.core.lifecycle import ConnState
from wirestate.core.machine import Engine, build_machine

S = ConnState
B = BreakerState


def _both_ways(
    engine: Engine[Any], make: Callable[[], Any], trigger: str, kwargs: Callable[[], dict[str, Any]]
) -> list[tuple[Any, ...]]:
    """Fire ``trigger`` on two equal models, once through the engine and once through
    ``machine.events[trigger].trigger``, each with its own ``kwargs()``; return (error type,
    result, model, kwargs) for each."""
    results = []
    for through_engine in (True, False):
        model, kw = make(), kwargs()
        try:
            if through_engine:
                ok = engine.fire(model, trigger, **kw)
            else:
                ok = engine.machine.events[trigger].trigger(model, **kw)
            outcome: tuple[Any, ...] = (None, bool(ok))
        except MachineError as exc:
            outcome = (type(exc), None)
        results.append((*outcome, model, kw))
    return results


# -- the lifecycle table --------------------------------------------------------------


def _conn(state: ConnState) -> Callable[[], Connection]:
    def make() -> Connection:
        c = Connection("c", 0.0)
        c.state = state
        return c

    return make


@pytest.mark.parametrize(("state", "trigger"), list(itertools.product(S, lifecycle.TRIGGERS)))
@pytest.mark.parametrize("cause", [CloseCause.PEER_CLOSE, None])
def test_the_lifecycle_runs_as_transitions_runs_it(
    state: ConnState, trigger: str, cause: CloseCause | None
) -> None:
    """Same refusal or result, same fields, same actions, for every (state, trigger)."""

    def kwargs() -> dict[str, Any]:
        return {"now": 1.0, "cause": cause, "code": 1000, "out": []}

    try:
        (err_a, ok_a, ca, kw_a), (err_b, ok_b, cb, kw_b) = _both_ways(
            lifecycle.ENGINE, _conn(state), trigger, kwargs
        )
    except ValueError:  # a close without a cause: a caller error either way
        with pytest.raises(ValueError, match="CloseCause"):
            lifecycle.MACHINE.events[trigger].trigger(_conn(state)(), **kwargs())
        return
    assert (err_a, ok_a) == (err_b, ok_b)
    fields = ("state", "cause", "close_code", "accepting", "closing_at")
    assert [getattr(ca, f) for f in fields] == [getattr(cb, f) for f in fields]
    assert kw_a["out"] == kw_b["out"]


# -- the breaker table ----------------------------------------------------------------

CONFIGS = {
    "default": BreakerConfig(failure_threshold=2, reset_timeout=10.0),
    "trials": BreakerConfig(
        failure_threshold=1, reset_timeout=10.0, half_open_max_calls=2, success_threshold=2
    ),
    "slow": BreakerConfig(
        failure_threshold=3,
        reset_timeout=10.0,
        slow_call=SlowCallRule(duration=1.0, rate_threshold=50.0, min_calls=1),
        backoff=Backoff(multiplier=2.0, max=40.0),
    ),
}


def _breaker(config: BreakerConfig, state: BreakerState) -> Breaker:
    """A breaker brought into ``state`` through its public API, at time 0."""
    b = Breaker("b", config)
    if state is B.FORCED_OPEN:
        b.force_open(0.0)
    elif state is B.DISABLED:
        b.disable(0.0)
    elif state in (B.OPEN, B.HALF_OPEN):
        while b.state is not B.OPEN:
            permit = b.acquire(0.0)
            b.on_failure(permit, 0.0)  # type: ignore[arg-type]
        if state is B.HALF_OPEN:
            b.acquire(100.0)
    b.actions()
    b.call_events()
    assert b.state is state
    return b


def _fields(b: Breaker) -> dict[str, Any]:
    return {
        k: v for k, v in vars(b).items() if k not in ("_engine", "_fail_window", "_slow_window")
    }


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize(("state", "trigger"), list(itertools.product(B, breaker_table.TRIGGERS)))
@pytest.mark.parametrize(("now", "duration"), [(1.0, 0.5), (100.0, 2.0), (200.0, 0.0)])
def test_the_breaker_runs_as_transitions_runs_it(
    config: str, state: BreakerState, trigger: str, now: float, duration: float
) -> None:
    base = _breaker(CONFIGS[config], state)
    (err_a, ok_a, ba, _), (err_b, ok_b, bb, _) = _both_ways(
        breaker_table.ENGINE,
        lambda: copy.deepcopy(base),
        trigger,
        lambda: {"now": now, "duration": duration},
    )
    assert (err_a, ok_a) == (err_b, ok_b)
    assert _fields(ba) == _fields(bb)
    assert ba.snapshot(now) == bb.snapshot(now)
    assert ba.actions() == bb.actions()
    if err_a is not None:
        assert ba.state is state  # a refusal changes nothing
        assert (state, trigger) in breaker_table.REFUSED


def test_every_breaker_pair_is_a_row_or_a_documented_refusal() -> None:
    for state, trigger in itertools.product(B, breaker_table.TRIGGERS):
        listed = breaker_table.ENGINE.allows(state, trigger)
        assert listed != ((state, trigger) in breaker_table.REFUSED), (state, trigger)


# -- what the engine refuses, and what it shares --------------------------------------


class _S(Enum):
    A = "a"
    B = "b"


def _engine(rows: list[dict[str, Any]], **options: Any) -> Engine[_S]:
    return Engine(build_machine(rows, _S, _S.A, **options), _S)


def test_the_engine_refuses_what_it_would_not_run() -> None:
    with pytest.raises(ValueError, match="callables"):
        _engine([{"trigger": "go", "source": _S.A, "dest": _S.B, "after": "x"}])
    with pytest.raises(ValueError, match="callables"):
        _engine([{"trigger": "go", "source": _S.A, "dest": _S.B, "conditions": "x"}])
    with pytest.raises(ValueError, match="prepare"):
        _engine([{"trigger": "go", "source": _S.A, "dest": _S.B, "prepare": print}])
    with pytest.raises(ValueError, match="callables"):
        _engine([], after_state_change="x")
    entering = build_machine([], _S, _S.A)
    entering.states["B"].on_enter.append(print)
    with pytest.raises(ValueError, match="on_enter"):
        Engine(entering, _S)
    hooked = build_machine([], _S, _S.A)
    hooked.finalize_event = [print]
    with pytest.raises(ValueError, match="finalize_event"):
        Engine(hooked, _S)


class _M:
    def __init__(self) -> None:
        self.state = _S.A
        self.seen: list[str] = []


def test_conditions_unless_and_row_order_as_transitions() -> None:
    rows = [
        {"trigger": "go", "source": _S.A, "dest": _S.B, "conditions": lambda ev: False},
        {"trigger": "go", "source": _S.A, "dest": None, "unless": lambda ev: True},
        {
            "trigger": "go",
            "source": _S.A,
            "dest": _S.B,
            "before": lambda ev: ev.model.seen.append("before"),
            "after": lambda ev: ev.model.seen.append("after"),
        },
    ]
    engine = _engine(
        rows,
        before_state_change=lambda ev: ev.model.seen.append("machine before"),
        after_state_change=lambda ev: ev.model.seen.append("machine after"),
    )
    a, b = _M(), _M()
    assert engine.fire(a, "go") is True
    assert engine.machine.events["go"].trigger(b) is True
    assert a.state is b.state is _S.B
    assert a.seen == b.seen == ["machine before", "before", "after", "machine after"]
    with pytest.raises(MachineError):
        engine.fire(a, "go")  # no row from B
    assert a.state is _S.B


def test_rows_whose_guards_all_fail_change_nothing() -> None:
    engine = _engine(
        [{"trigger": "go", "source": _S.A, "dest": _S.B, "conditions": lambda ev: False}]
    )
    a, b = _M(), _M()
    assert engine.fire(a, "go") is False
    assert engine.machine.events["go"].trigger(b) is False
    assert a.state is b.state is _S.A


def test_a_copied_model_keeps_the_shared_engine() -> None:
    b = Breaker("b")
    assert copy.deepcopy(b)._engine is breaker_table.ENGINE
    assert copy.copy(lifecycle.ENGINE) is lifecycle.ENGINE
