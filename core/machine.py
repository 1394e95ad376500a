"""The one engine behind every state machine of the core: a `transitions` table compiled
into a dispatch dict.

Rules of this module:

* A table is data: a list of `transitions` rows whose guards and callbacks are callables
  (never names resolved on the model), read by the diagrams, the table tests and the
  checkers through `Engine.machine`, the `transitions.Machine` built from it.
* `Engine.fire` runs a trigger exactly as ``machine.events[trigger].trigger(model, **kw)``
  would, for the features it accepts: the rows of the model's state are tried in order and
  the first whose conditions all hold runs (machine-level ``before_state_change``, the row's
  ``before``, the state change unless the row is internal, the row's ``after``, machine-level
  ``after_state_change``), with one ``EventData`` whose ``transition`` is the row that ran.
  A (state, trigger) pair with no row raises ``MachineError`` and changes nothing; rows
  whose conditions all fail change nothing and return False.
* `Engine` refuses, at construction, every feature it would not run (``prepare``, state
  ``on_enter``/``on_exit``, ``prepare_event``, ``finalize_event``, ``on_exception``,
  callbacks named by strings), so the dict can never silently differ from the machine. The
  table tests fire every (state, trigger) pair both ways and require identical results.

Why not ``machine.events[...].trigger``: on these hosts one such call costs 12-15 us (it
resolves every callback by name and logs at DEBUG), and a connection's life takes five of
them; the compiled dict costs about 1 us. Why not `add_model`: it is O(n) per model and keeps
reference cycles; one `Machine` built with ``model=None`` serves every model, which only
needs a ``state`` attribute.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from enum import Enum
from typing import Any, Generic, TypeVar

from transitions import EventData, Machine, MachineError
from transitions.core import Transition

__all__ = ["Engine", "MachineError", "build_machine"]

StateT = TypeVar("StateT", bound=Enum)
Callback = Callable[[EventData], Any]

# transitions logs every trigger at DEBUG and refusals at WARNING; neither belongs in a
# hub's logs (refusals are reported by their callers), and the level check is the cheap path.
logging.getLogger("transitions").setLevel(logging.ERROR)


def build_machine(
    transitions: Iterable[Mapping[str, Any]],
    states: type[Enum],
    initial: Enum,
    **options: Any,
) -> Machine:
    """A shared, model-less `Machine` for a table, built the house way: no generated
    ``to_<state>`` triggers (they would bypass guards), no ignored triggers, EventData passed
    to every callback. ``options`` adds machine-level callbacks (``after_state_change``)."""
    return Machine(
        model=None,
        states=states,
        transitions=[dict(row) for row in transitions],
        initial=initial,
        auto_transitions=False,
        send_event=True,
        **options,
    )


class _Row:
    """One compiled row: what `Engine.fire` runs when it is chosen."""

    __slots__ = ("after", "before", "conditions", "dest", "transition")

    def __init__(
        self,
        transition: Transition,
        dest: Enum | None,
        conditions: tuple[tuple[Callback, bool], ...],
        before: tuple[Callback, ...],
        after: tuple[Callback, ...],
    ) -> None:
        self.transition = transition
        self.dest = dest
        self.conditions = conditions
        self.before = before
        self.after = after


def _callables(what: str, callbacks: Iterable[Any]) -> tuple[Callback, ...]:
    out = tuple(callbacks)
    for cb in out:
        if not callable(cb):
            raise ValueError(f"callbacks must be callables, not names ({what}: {cb!r})")
    return out


class Engine(Generic[StateT]):
    """A `transitions` machine compiled for `fire` (see the module docstring).

    ``machine`` stays available unchanged: it is the table as `transitions` holds it, for
    diagrams, table walks and the equivalence tests. An engine is immutable and shared by
    every model of its table; checkers build engines from mutated tables and hand them to
    the code under test."""

    __slots__ = ("_events", "_rows", "_states", "machine", "states")

    def __init__(self, machine: Machine, states: type[StateT]) -> None:
        unsupported = (
            machine.prepare_event,
            machine.finalize_event,
            machine.on_exception,
        )
        if any(unsupported):
            raise ValueError("the engine does not run prepare_event, finalize_event, on_exception")
        for state in machine.states.values():
            if state.on_enter or state.on_exit:
                raise ValueError(f"the engine does not run on_enter/on_exit (state {state.name})")
        before_change = _callables("before_state_change", machine.before_state_change)
        after_change = _callables("after_state_change", machine.after_state_change)
        self.machine = machine
        self.states = states
        self._states = {member: machine.states[member.name] for member in states}
        self._events = dict(machine.events)
        rows: dict[tuple[StateT, str], tuple[_Row, ...]] = {}
        for name, event in machine.events.items():
            for source, listed in event.transitions.items():
                compiled = []
                for t in listed:
                    if t.prepare:
                        raise ValueError(f"the engine does not run prepare ({name} from {source})")
                    what = f"{name} from {source}"
                    conditions = tuple(
                        (_callables(what, [c.func])[0], bool(c.target)) for c in t.conditions
                    )
                    dest = None if t.dest is None else states[t.dest]
                    compiled.append(
                        _Row(
                            t,
                            dest,
                            conditions,
                            before_change + _callables(what, t.before),
                            _callables(what, t.after) + after_change,
                        )
                    )
                rows[(states[source], name)] = tuple(compiled)
        self._rows = rows

    def __copy__(self) -> Engine[StateT]:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Engine[StateT]:
        # Immutable and shared: a copied model (the breaker explorer deep-copies breakers)
        # runs on the same engine.
        return self

    def allows(self, state: StateT, trigger: str) -> bool:
        """Does the table list ``trigger`` from ``state`` (else firing it is refused)?"""
        return (state, trigger) in self._rows

    def pairs(self) -> Mapping[tuple[StateT, str], tuple[StateT | None, ...]]:
        """Every listed (state, trigger) and the destinations of its rows, in order (None
        for an internal row): for walks over the table."""
        return {key: tuple(row.dest for row in rows) for key, rows in self._rows.items()}  # type: ignore[misc]

    def fire(self, model: Any, trigger: str, **kwargs: Any) -> bool:
        """Run ``trigger`` on ``model`` (see the module docstring). Returns True when a row
        ran; raises ``MachineError`` (state unchanged) for a pair the table does not list."""
        source = model.state
        rows = self._rows.get((source, trigger))
        if rows is None:
            raise MachineError(f"Can't trigger event {trigger} from state {source.name}!")
        ev = EventData(self._states[source], self._events[trigger], self.machine, model, (), kwargs)
        for row in rows:
            ev.transition = row.transition
            conditions = row.conditions
            if conditions and not all(check(ev) == target for check, target in conditions):
                continue
            for cb in row.before:
                cb(ev)
            if row.dest is not None:
                model.state = row.dest
            for cb in row.after:
                cb(ev)
            ev.result = True
            return True
        return False
