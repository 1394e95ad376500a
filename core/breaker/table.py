"""The circuit breaker's transition table: its states, its triggers and the one shared Machine.

Rules of this module (BREAKER.md, DESIGN.md "Circuit breaker", STYLE.md rules 3-5):

- It is data. Every guard and callback is named by a string and resolved on the model (a
  `wirestate.core.breaker.Breaker`) each time a trigger fires, so the table can be walked,
  drawn and validated without a breaker, and a test that monkeypatches a guard on the class
  (`Breaker._wait_elapsed`) changes what the table does.
- ONE `Machine` for every breaker, built with `model=None`: breakers are plain objects with a
  `state` attribute, fired with `MACHINE.events[trigger].trigger(breaker, now=...)`, never
  registered with `add_model` (which is O(n) and keeps reference cycles).
- `auto_transitions=False`: a generated `to_half_open()` would bypass the wait guard. No
  `ignore_invalid_triggers`: a trigger without a row for the current state raises
  `transitions.MachineError` and changes nothing. `REFUSED` lists those pairs, so that every
  (state, trigger) pair is either a row or a documented refusal.
- For one trigger and source, rows are tried in order and the first whose guard passes wins:
  the row that trips comes before the row that only counts.
- Guards are pure predicates. Callbacks only change the breaker's fields and append actions;
  none fires another trigger (follow-ups are computed after the trigger returns).
- The machine-level `after_state_change` callback records exactly one `StateChanged` per row
  whose `dest` is not None, after the row's own callbacks; rows with `dest=None` are internal
  (same-state requests and counting) and never emit.

Invariants the table encodes: CLOSED never goes to HALF_OPEN (only OPEN does, and only through
the `probe` row guarded by `_wait_elapsed`); FORCED_OPEN never leaves by itself (only `reset`
and `disable` leave it); DISABLED records nothing (no success/failure rows); every state can
reach CLOSED through `reset`.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Final

from transitions import Machine


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
        "conditions": "_trips_on_failure",
        "before": "_count_failure",
        "after": "_enter_open",
    },
    {"trigger": "failure", "source": _C, "dest": None, "after": "_count_failure"},
    # Any counted failure of a trial reopens with a fresh timer (BREAKER.md semantics 4).
    {
        "trigger": "failure",
        "source": _H,
        "dest": _O,
        "before": "_count_failure",
        "after": "_enter_open",
    },
    # A counted success. In CLOSED only the optional slow-call rule can trip on it.
    {
        "trigger": "success",
        "source": _C,
        "dest": _O,
        "conditions": "_trips_on_success",
        "before": "_count_success",
        "after": "_enter_open",
    },
    {"trigger": "success", "source": _C, "dest": None, "after": "_count_success"},
    {
        "trigger": "success",
        "source": _H,
        "dest": _C,
        "conditions": "_trials_suffice",
        "after": "_enter_closed",
    },
    {"trigger": "success", "source": _H, "dest": None, "after": "_count_trial_success"},
    # Fired lazily by acquire(); the one guard deciding OPEN -> HALF_OPEN (inclusive boundary).
    {
        "trigger": "probe",
        "source": _O,
        "dest": _H,
        "conditions": "_probe_due",
        "after": "_enter_half_open",
    },
    # A trial lease ran out without being settled: HALF_OPEN cannot get stuck.
    {
        "trigger": "expire",
        "source": _H,
        "dest": _O,
        "before": "_count_failure",
        "after": "_enter_open",
    },
    # Manual control. Same-state requests are internal rows: no event, nothing cleared.
    {
        "trigger": "force_open",
        "source": [_C, _O, _H, _D],
        "dest": _F,
        "after": "_enter_forced_open",
    },
    {"trigger": "force_open", "source": _F, "dest": None},
    {"trigger": "disable", "source": [_C, _O, _H, _F], "dest": _D, "after": "_enter_disabled"},
    {"trigger": "disable", "source": _D, "dest": None},
    {"trigger": "reset", "source": [_O, _H, _F, _D], "dest": _C, "after": "_enter_closed"},
    # reset() while CLOSED clears the counters and starts a new generation, without an event.
    {"trigger": "reset", "source": _C, "dest": None, "after": "_enter_closed"},
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
        # Only OPEN may half-open (BREAKER.md S23: CLOSED -> HALF_OPEN is illegal).
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

MACHINE: Final = Machine(
    model=None,
    states=BreakerState,
    transitions=TRANSITIONS,
    initial=INITIAL,
    auto_transitions=False,
    send_event=True,
    after_state_change="_record_change",
)
