"""The circuit breaker's transition table: its states, its triggers, and the engine that runs it.

Rules of this module (docs/breaker.md gives the semantics and the scenarios S01-S33):

- It is data: rows of the `transitions` format whose guards and effects are the callables
  below. Each is a one-line step of the breaker's own bookkeeping (`Breaker`'s methods,
  listed in `Model`), so that the table can be walked, drawn and validated without a
  breaker, and a checker can hand a breaker an engine built from a mutated table
  (``wirestate.core.verify.mutants``).
- The table runs on the core's one engine (`wirestate.core.machine.Engine`), shared by
  every breaker: breakers are plain objects with a `state` attribute.
- No generated ``to_<state>`` triggers: one would bypass the wait guard. No ignored
  triggers: a trigger without a row for the current state raises `transitions.MachineError`
  and changes nothing. `REFUSED` lists those pairs, so that every (state, trigger) pair is
  either a row or a documented refusal.
- For one trigger and source, rows are tried in order and the first whose guard passes wins:
  the row that trips comes before the row that only counts.
- Guards are pure predicates. Effects only change the breaker's fields and append actions;
  none fires another trigger (follow-ups are computed after the trigger returns).
- The machine-level `after_state_change` effect records exactly one `StateChanged` per row
  whose `dest` is not None, after the row's own effects; rows with `dest=None` are internal
  (same-state requests and counting) and never emit.

Invariants the table encodes: CLOSED never goes to HALF_OPEN (only OPEN does, and only through
the `probe` row guarded by `probe_due`); FORCED_OPEN never leaves by itself (only `reset`
and `disable` leave it); DISABLED records nothing (no success/failure rows); every state can
reach CLOSED through `reset`.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Final, Protocol, cast

from transitions import EventData

from wirestate.core.machine import Engine, build_machine


class BreakerState(Enum):
    """The breaker's states. The values are the names used on the wire and in metrics."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    DISABLED = "disabled"

    def __str__(self) -> str:
        return self.value


_C, _O, _H, _F, _D = (
    BreakerState.CLOSED,
    BreakerState.OPEN,
    BreakerState.HALF_OPEN,
    BreakerState.FORCED_OPEN,
    BreakerState.DISABLED,
)


class Model(Protocol):
    """What the table's guards and effects use of a breaker (`wirestate.core.breaker.Breaker`):
    its bookkeeping steps, each named for the row that calls it. Only the table calls them."""

    state: BreakerState

    def _wait_elapsed(self, now: float) -> bool: ...
    def _trips_on_failure(self, duration: float) -> bool: ...
    def _slow_trips(self, duration: float) -> bool: ...
    def _trials_suffice(self) -> bool: ...
    def _count_failure(self, duration: float) -> None: ...
    def _count_success(self, duration: float) -> None: ...
    def _count_trial_success(self) -> None: ...
    def _enter_open(self, now: float) -> None: ...
    def _enter_half_open(self) -> None: ...
    def _enter_closed(self) -> None: ...
    def _enter_forced_open(self) -> None: ...
    def _record_change(self, source: BreakerState, trigger: str, now: float) -> None: ...


def _of(ev: EventData) -> Model:
    return cast(Model, ev.model)


def _duration(ev: EventData) -> float:
    return float(ev.kwargs.get("duration", 0.0))


# Guards: pure predicates.


def probe_due(ev: EventData) -> bool:
    """THE guard of OPEN -> HALF_OPEN: the open duration has passed, boundary included."""
    return _of(ev)._wait_elapsed(ev.kwargs["now"])


def trips_on_failure(ev: EventData) -> bool:
    return _of(ev)._trips_on_failure(_duration(ev))


def trips_on_success(ev: EventData) -> bool:
    return _of(ev)._slow_trips(_duration(ev))


def trials_suffice(ev: EventData) -> bool:
    return _of(ev)._trials_suffice()


# Effects: they change the breaker's fields and append actions, nothing else.


def count_failure(ev: EventData) -> None:
    _of(ev)._count_failure(_duration(ev))


def count_success(ev: EventData) -> None:
    _of(ev)._count_success(_duration(ev))


def count_trial_success(ev: EventData) -> None:
    _of(ev)._count_trial_success()


def enter_open(ev: EventData) -> None:
    _of(ev)._enter_open(ev.kwargs["now"])


def enter_half_open(ev: EventData) -> None:
    _of(ev)._enter_half_open()


def enter_closed(ev: EventData) -> None:
    _of(ev)._enter_closed()


def enter_forced_open(ev: EventData) -> None:
    _of(ev)._enter_forced_open()


def record_change(ev: EventData) -> None:
    """Machine-level, after every row: one `StateChanged` when the row changed the state."""
    row, event = ev.transition, ev.event
    # The engine (and transitions) set both before any callback runs.
    assert row is not None
    assert event is not None
    if row.dest is None:
        return
    _of(ev)._record_change(BreakerState[row.source], event.name, ev.kwargs["now"])


#: Every trigger of the table. Each needs `now=` (monotonic seconds); `success` and `failure`
#: also take `duration=` (forward seconds since the permit was issued, for the slow-call rule).
TRIGGERS: Final = ("failure", "success", "probe", "expire", "force_open", "disable", "reset")

TRANSITIONS: Final[list[dict[str, Any]]] = [
    # A counted failure (a current-generation permit). In CLOSED it trips when the trip rule
    # says so, counting it first; otherwise it is only counted.
    {
        "trigger": "failure",
        "source": _C,
        "dest": _O,
        "conditions": trips_on_failure,
        "before": count_failure,
        "after": enter_open,
    },
    {"trigger": "failure", "source": _C, "dest": None, "after": count_failure},
    # Any counted failure of a trial reopens with a fresh timer (docs/breaker.md, rule 4).
    {
        "trigger": "failure",
        "source": _H,
        "dest": _O,
        "before": count_failure,
        "after": enter_open,
    },
    # A counted success. In CLOSED only the optional slow-call rule can trip on it.
    {
        "trigger": "success",
        "source": _C,
        "dest": _O,
        "conditions": trips_on_success,
        "before": count_success,
        "after": enter_open,
    },
    {"trigger": "success", "source": _C, "dest": None, "after": count_success},
    {
        "trigger": "success",
        "source": _H,
        "dest": _C,
        "conditions": trials_suffice,
        "after": enter_closed,
    },
    {"trigger": "success", "source": _H, "dest": None, "after": count_trial_success},
    # Fired lazily by acquire(); the one guard deciding OPEN -> HALF_OPEN (inclusive boundary).
    {
        "trigger": "probe",
        "source": _O,
        "dest": _H,
        "conditions": probe_due,
        "after": enter_half_open,
    },
    # A trial lease ran out without being settled: HALF_OPEN cannot get stuck.
    {
        "trigger": "expire",
        "source": _H,
        "dest": _O,
        "before": count_failure,
        "after": enter_open,
    },
    # Manual control. Same-state requests are internal rows: no event, nothing cleared.
    {
        "trigger": "force_open",
        "source": [_C, _O, _H, _D],
        "dest": _F,
        "after": enter_forced_open,
    },
    {"trigger": "force_open", "source": _F, "dest": None},
    {"trigger": "disable", "source": [_C, _O, _H, _F], "dest": _D, "after": enter_forced_open},
    {"trigger": "disable", "source": _D, "dest": None},
    {"trigger": "reset", "source": [_O, _H, _F, _D], "dest": _C, "after": enter_closed},
    # reset() while CLOSED clears the counters and starts a new generation, without an event.
    {"trigger": "reset", "source": _C, "dest": None, "after": enter_closed},
]

#: (state, trigger) pairs with no row: firing them raises `MachineError`, state unchanged.
#: The public Breaker API never fires them; each is a request that makes no sense there.
REFUSED: Final[frozenset[tuple[BreakerState, str]]] = frozenset(
    {
        # Outcomes reach the table only for current-generation permits, and OPEN and
        # FORCED_OPEN issue none; DISABLED records nothing by design.
        (_O, "failure"),
        (_F, "failure"),
        (_D, "failure"),
        (_O, "success"),
        (_F, "success"),
        (_D, "success"),
        # Only OPEN may half-open (docs/breaker.md S23: CLOSED -> HALF_OPEN is illegal).
        (_C, "probe"),
        (_H, "probe"),
        (_F, "probe"),
        (_D, "probe"),
        # Only trial permits have leases.
        (_C, "expire"),
        (_O, "expire"),
        (_F, "expire"),
        (_D, "expire"),
    }
)

#: The state a breaker starts in (and is restored into only from a persisted snapshot).
INITIAL: Final = _C


def build_engine(transitions: list[dict[str, Any]]) -> Engine[BreakerState]:
    """An engine for a breaker table: `ENGINE` for `TRANSITIONS`; the verification kit
    builds mutants with it."""
    machine = build_machine(transitions, BreakerState, INITIAL, after_state_change=record_change)
    return Engine(machine, BreakerState)


#: The table every breaker runs unless it is handed another (the checkers' mutants).
ENGINE: Final = build_engine(TRANSITIONS)
#: The table as `transitions` holds it: for the diagrams and the table tests.
MACHINE: Final = ENGINE.machine
