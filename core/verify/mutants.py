"""Planted bugs that prove the checkers bite.

Each mutant is a mutated table: the lifecycle's or the breaker's rows with one small change,
compiled into an engine of its own (`Mutant.engine`). The code under test is handed that
engine (``Hub(lifecycle=...)``, ``Breaker(engine=...)``, ``explore(lifecycle=...)``,
``LifecycleMachine.with_engine(...)``): nothing global is swapped, so a mutant cannot leak
into another test. ``wirestate check --plant NAME`` and the Hypothesis state machines must
catch every one of them with a short trace (tests/core/verify/test_mutants.py). They ship so
that anyone can watch the checkers find the original service's bug.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from transitions import EventData

from wirestate.core import lifecycle
from wirestate.core.breaker import table as breaker_table
from wirestate.core.lifecycle import ConnState
from wirestate.core.machine import Engine

S = ConnState
Rows = list[dict[str, Any]]


def _early_unregister(table: Rows) -> Rows:
    # The Go handler: `client.readPump(); h.hub.unregister <- client`, writer or not.
    return [
        *table,
        {
            "trigger": "unregister",
            "source": S.CLOSING_READER_DONE,
            "dest": S.UNREGISTERED,
            "after": lifecycle.report_unregistered,
        },
    ]


def _double_unregister(table: Rows) -> Rows:
    # Unregistration that is not idempotent: a repeated call unregisters again.
    out = []
    for row in table:
        if row["trigger"] == "unregister" and row["dest"] is None:
            row = {**row, "source": [S.REJECTED]}
        out.append(row)
    out.append(
        {
            "trigger": "unregister",
            "source": S.UNREGISTERED,
            "dest": S.UNREGISTERED,
            "after": lifecycle.report_unregistered,
        }
    )
    return out


def _close_without_cause(table: Rows) -> Rows:
    # One path into closing that forgot to record why.
    return [
        {k: v for k, v in row.items() if k != "before"}
        if row["trigger"] == "close" and row["source"] == S.OPEN
        else row
        for row in table
    ]


def _keeps_accepting(ev: EventData) -> None:
    lifecycle.record_cause(ev)
    conn: Any = ev.model
    conn.accepting = True


def _queue_after_closing(table: Rows) -> Rows:
    # Closing begins but the connection still takes events.
    return [
        {**row, "before": _keeps_accepting} if row.get("before") is lifecycle.record_cause else row
        for row in table
    ]


def _half_the_wait(ev: EventData) -> bool:
    # Half-opens once half of the wait has passed (read through the breaker's public view).
    breaker: Any = ev.model
    snap = breaker.snapshot(ev.kwargs["now"])
    return bool(snap.retry_after * 2 <= snap.wait)


def _early_half_open(table: Rows) -> Rows:
    return [
        {**row, "conditions": _half_the_wait}
        if row.get("conditions") is breaker_table.probe_due
        else row
        for row in table
    ]


@dataclass(frozen=True)
class Mutant:
    """One planted bug: what it is, which table it mutates, and how."""

    name: str
    description: str
    target: Literal["lifecycle", "breaker"]
    edit: Callable[[Rows], Rows]

    def engine(self) -> Engine[Any]:
        """The mutated table's engine (built once, then shared)."""
        return _engine(self.name)


_LIST: tuple[Mutant, ...] = (
    Mutant(
        "early_unregister",
        "unregister as soon as the reader ends, while the writer still runs "
        "(the original Go handler's shape)",
        "lifecycle",
        _early_unregister,
    ),
    Mutant(
        "double_unregister",
        "a second unregister unregisters again",
        "lifecycle",
        _double_unregister,
    ),
    Mutant(
        "close_without_cause",
        "a server-side close that records no cause",
        "lifecycle",
        _close_without_cause,
    ),
    Mutant(
        "queue_after_closing",
        "events are still queued after closing began",
        "lifecycle",
        _queue_after_closing,
    ),
    Mutant(
        "early_half_open",
        "a breaker that half-opens before its reset timeout",
        "breaker",
        _early_half_open,
    ),
)

#: Every planted bug by name.
MUTANTS: dict[str, Mutant] = {m.name: m for m in _LIST}


@functools.cache
def _engine(name: str) -> Engine[Any]:
    m = MUTANTS[name]
    if m.target == "lifecycle":
        return lifecycle.build_engine(m.edit([dict(row) for row in lifecycle.TRANSITIONS]))
    return breaker_table.build_engine(m.edit([dict(row) for row in breaker_table.TRANSITIONS]))


def mutant(name: str) -> Mutant:
    """The planted bug called ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return MUTANTS[name]
    except KeyError:
        known = ", ".join(MUTANTS)
        raise ValueError(f"no mutant named {name!r}; known: {known}") from None
