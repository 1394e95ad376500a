"""Planted bugs that prove the checkers bite.

Each mutant is a context manager that swaps one small piece of the real core for a broken
one and puts it back on exit. Both ``wirestate check --plant NAME`` and the Hypothesis state
machines must catch every one of them with a short trace (tests/core/verify/test_mutants.py).
They are shipped so that anyone can watch the checkers find the original service's bug.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from transitions import EventData

from wirestate.core import lifecycle
from wirestate.core.lifecycle import ConnState

S = ConnState


def _swap_table(edit: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> Any:
    @contextmanager
    def planted() -> Iterator[None]:
        saved = lifecycle.MACHINE
        lifecycle.MACHINE = lifecycle.build_machine(edit([dict(t) for t in lifecycle.TRANSITIONS]))
        try:
            yield
        finally:
            lifecycle.MACHINE = saved

    return planted


def _early_unregister(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # The Go handler: `client.readPump(); h.hub.unregister <- client`, writer or not.
    return [
        *table,
        {
            "trigger": "unregister",
            "source": S.CLOSING_READER_DONE,
            "dest": S.UNREGISTERED,
            "after": lifecycle._unregistered,
        },
    ]


def _double_unregister(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
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
            "after": lifecycle._unregistered,
        }
    )
    return out


def _close_without_cause(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # One path into closing that forgot to record why.
    return [
        {k: v for k, v in row.items() if k != "before"}
        if row["trigger"] == "close" and row["source"] == S.OPEN
        else row
        for row in table
    ]


def _keeps_accepting(ev: EventData) -> None:
    lifecycle._record_cause(ev)
    conn: Any = ev.model
    conn.accepting = True


def _queue_after_closing(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Closing begins but the connection still takes events.
    return [
        {**row, "before": _keeps_accepting} if row.get("before") is lifecycle._record_cause else row
        for row in table
    ]


@contextmanager
def _early_half_open() -> Iterator[None]:
    from wirestate.core.breaker import Breaker

    saved = Breaker._wait_elapsed

    def half_time(self: Breaker, now: float) -> bool:
        # Half-opens once half of the wait has passed.
        return bool(self._open_elapsed(now) * 2 >= self._wait)

    Breaker._wait_elapsed = half_time  # type: ignore[method-assign]
    try:
        yield
    finally:
        Breaker._wait_elapsed = saved  # type: ignore[method-assign]


#: name -> (what the bug is, which checker target it concerns, the context manager)
MUTANTS: dict[str, tuple[str, str, Callable[[], Any]]] = {
    "early_unregister": (
        "unregister as soon as the reader ends, while the writer still runs "
        "(the original Go handler's shape)",
        "lifecycle",
        _swap_table(_early_unregister),
    ),
    "double_unregister": (
        "a second unregister unregisters again",
        "lifecycle",
        _swap_table(_double_unregister),
    ),
    "close_without_cause": (
        "a server-side close that records no cause",
        "lifecycle",
        _swap_table(_close_without_cause),
    ),
    "queue_after_closing": (
        "events are still queued after closing began",
        "lifecycle",
        _swap_table(_queue_after_closing),
    ),
    "early_half_open": (
        "a breaker that half-opens before its reset timeout",
        "breaker",
        _early_half_open,
    ),
}


def planted(name: str) -> Any:
    """``with planted("early_unregister"): ...`` runs the block with that bug in the core."""
    try:
        return MUTANTS[name][2]()
    except KeyError:
        known = ", ".join(MUTANTS)
        raise ValueError(f"no mutant named {name!r}; known: {known}") from None
