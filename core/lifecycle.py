"""The connection lifecycle: one `transitions` table shared by every connection.

Rules of this module (the checker in `wirestate.core.verify.explore` and the Hypothesis machine in
`wirestate.core.verify.stateful` enforce them on the running hub, not only on this table):

* The state says which pumps run. ``open`` and ``closing`` have both the reader and the
  writer running; ``closing_reader_done`` only the writer; ``closing_writer_done`` only the
  reader; ``closed`` neither. ``registering`` has none yet (the adapter starts them and
  reports ``start``).
* ``unregister`` leaves only from ``closed``: a client is unregistered only after both of its
  pumps have finished, and only once (``unregistered`` absorbs every later input). This is
  the guard the original Go handler lacked: it unregistered when ``readPump`` returned,
  whatever its writer was doing.
* Every transition into a closing state records a `CloseCause` (``record_cause``); the first
  cause wins, later ones are ignored. A transition without one is a caller error.
* ``accepting`` (may events be queued for this client?) is true only in ``registering`` and
  ``open``; it drops when closing begins and never comes back.
* Pairs of (state, trigger) not in the table are refusals: the trigger raises
  ``transitions.MachineError`` and the state is unchanged. They are caller misuse (for
  example reporting the writer finished twice); peers cannot cause them, because the hub
  only fires triggers for inputs its adapter observed.

The table runs on the core's one engine (`wirestate.core.machine.Engine`): ``ENGINE`` is
compiled from ``TRANSITIONS`` and shared by every connection, which is a plain object with a
``state`` attribute; a hub is handed another engine only by the checkers, to plant a bug.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from transitions import EventData

from wirestate.core.actions import Close, Reject, Unregistered
from wirestate.core.causes import CLOSE_CODE, CloseCause
from wirestate.core.machine import Engine, build_machine


class ConnState(StrEnum):
    HANDSHAKING = "handshaking"
    REJECTED = "rejected"
    REGISTERING = "registering"
    OPEN = "open"
    CLOSING = "closing"  # close begun; reader and writer still run
    CLOSING_READER_DONE = "closing_reader_done"  # only the writer still runs
    CLOSING_WRITER_DONE = "closing_writer_done"  # only the reader still runs
    CLOSED = "closed"  # neither pump runs; unregistration is now allowed
    UNREGISTERED = "unregistered"

    # Enum's own __hash__ is Python code (hash of the name); str's is C and agrees with
    # StrEnum equality (S.OPEN == "open"). The hub hashes states on every transition.
    __hash__ = str.__hash__


S = ConnState

#: States in which events may be queued for the client (invariant 3).
ACCEPTING = frozenset({S.REGISTERING, S.OPEN})
#: States in which the client is in the registry and the subscription index (invariant 4).
REGISTERED = frozenset(
    {S.REGISTERING, S.OPEN, S.CLOSING, S.CLOSING_READER_DONE, S.CLOSING_WRITER_DONE, S.CLOSED}
)
#: States a close has begun in (invariant 2: each carries a cause).
CLOSING_STATES = frozenset({S.CLOSING, S.CLOSING_READER_DONE, S.CLOSING_WRITER_DONE, S.CLOSED})
#: Which pumps run in each state (reader, writer).
PUMPS: dict[ConnState, tuple[bool, bool]] = {
    S.HANDSHAKING: (False, False),
    S.REJECTED: (False, False),
    S.REGISTERING: (False, False),
    S.OPEN: (True, True),
    S.CLOSING: (True, True),
    S.CLOSING_READER_DONE: (False, True),
    S.CLOSING_WRITER_DONE: (True, False),
    S.CLOSED: (False, False),
    S.UNREGISTERED: (False, False),
}
TERMINAL = frozenset({S.REJECTED, S.UNREGISTERED})


def record_cause(ev: EventData) -> None:
    """Entering a closing state: record the cause, stop accepting, queue the close.

    Only rows that leave a state without a cause run it (later rows into closing have no
    ``before``), so the first cause always stands."""
    conn: Any = ev.model
    conn.accepting = False
    cause = ev.kwargs.get("cause")
    if not isinstance(cause, CloseCause):
        # A caller bug, not a peer's: every path into closing must say why.
        raise ValueError(f"a close needs a CloseCause, got {cause!r}")
    code = ev.kwargs.get("code")
    conn.cause = cause
    conn.close_code = code if code is not None else CLOSE_CODE[cause]
    conn.closing_at = ev.kwargs["now"]
    out = ev.kwargs["out"]
    if conn.state is S.HANDSHAKING:  # before-callback: still the source state
        out.append(Reject(conn.client_id, cause))
    else:
        out.append(Close(conn.client_id, conn.close_code, cause, cause.value))


def start_accepting(ev: EventData) -> None:
    conn: Any = ev.model
    conn.accepting = True


def report_unregistered(ev: EventData) -> None:
    conn: Any = ev.model
    ev.kwargs["out"].append(
        Unregistered(conn.client_id, conn.cause, conn.close_code, ev.kwargs["now"] - conn.opened_at)
    )


#: The table. Order matters only where a trigger has several rows for one source (none do).
TRANSITIONS: list[dict[str, Any]] = [
    {"trigger": "accept", "source": S.HANDSHAKING, "dest": S.REGISTERING, "after": start_accepting},
    {"trigger": "reject", "source": S.HANDSHAKING, "dest": S.REJECTED, "before": record_cause},
    {"trigger": "start", "source": S.REGISTERING, "dest": S.OPEN},
    # A close the server decides (keep-alive, overflow, policy, shutdown...).
    {"trigger": "close", "source": S.HANDSHAKING, "dest": S.REJECTED, "before": record_cause},
    {"trigger": "close", "source": S.REGISTERING, "dest": S.CLOSED, "before": record_cause},
    {"trigger": "close", "source": S.OPEN, "dest": S.CLOSING, "before": record_cause},
    # Already closing: the first cause stands; nothing changes.
    {
        "trigger": "close",
        "source": [S.CLOSING, S.CLOSING_READER_DONE, S.CLOSING_WRITER_DONE, S.CLOSED],
        "dest": None,
    },
    # The reader finished: the peer closed, or reading failed. From open this begins the close.
    {
        "trigger": "reader_done",
        "source": S.OPEN,
        "dest": S.CLOSING_READER_DONE,
        "before": record_cause,
    },
    {"trigger": "reader_done", "source": S.CLOSING, "dest": S.CLOSING_READER_DONE},
    {"trigger": "reader_done", "source": S.CLOSING_WRITER_DONE, "dest": S.CLOSED},
    # The writer finished: a failed write from open, or its normal end once closing.
    {
        "trigger": "writer_done",
        "source": S.OPEN,
        "dest": S.CLOSING_WRITER_DONE,
        "before": record_cause,
    },
    {"trigger": "writer_done", "source": S.CLOSING, "dest": S.CLOSING_WRITER_DONE},
    {"trigger": "writer_done", "source": S.CLOSING_READER_DONE, "dest": S.CLOSED},
    # The guarded transition: only once both pumps have finished.
    {
        "trigger": "unregister",
        "source": S.CLOSED,
        "dest": S.UNREGISTERED,
        "after": report_unregistered,
    },
    # Terminal states absorb every later input.
    *(
        {"trigger": t, "source": [S.REJECTED, S.UNREGISTERED], "dest": None}
        for t in ("accept", "reject", "start", "close", "reader_done", "writer_done", "unregister")
    ),
]

TRIGGERS: tuple[str, ...] = (
    "accept",
    "reject",
    "start",
    "close",
    "reader_done",
    "writer_done",
    "unregister",
)

#: Where each trigger may be fired and what it means (the table test checks that every
#: (state, trigger) pair not in the table is one of these refusals and leaves the state as is).
REFUSALS: dict[tuple[ConnState, str], str] = {
    **{(s, "accept"): "only a handshaking connection can be accepted" for s in REGISTERED},
    **{(s, "reject"): "only a handshake can be rejected" for s in REGISTERED},
    **{(s, "start"): "pumps start once, after registering" for s in REGISTERED - {S.REGISTERING}},
    (S.HANDSHAKING, "start"): "pumps start after registering",
    **{
        (s, t): "no pump runs here"
        for s in (S.HANDSHAKING, S.REGISTERING, S.CLOSING_READER_DONE, S.CLOSED)
        for t in ("reader_done",)
    },
    **{
        (s, t): "no pump runs here"
        for s in (S.HANDSHAKING, S.REGISTERING, S.CLOSING_WRITER_DONE, S.CLOSED)
        for t in ("writer_done",)
    },
    **{
        (s, "unregister"): "unregistration waits for both pumps to finish"
        for s in (
            S.HANDSHAKING,
            S.REGISTERING,
            S.OPEN,
            S.CLOSING,
            S.CLOSING_READER_DONE,
            S.CLOSING_WRITER_DONE,
        )
    },
}


def build_engine(transitions: list[dict[str, Any]]) -> Engine[ConnState]:
    """An engine for a lifecycle table: `ENGINE` for `TRANSITIONS`; the verification kit
    builds mutants with it (``wirestate.core.verify.mutants``)."""
    return Engine(build_machine(transitions, ConnState, S.HANDSHAKING), ConnState)


#: The lifecycle every hub runs unless it is handed another (the checkers' mutants).
ENGINE = build_engine(TRANSITIONS)
#: The table as `transitions` holds it: for the diagrams and the table tests.
MACHINE = ENGINE.machine
