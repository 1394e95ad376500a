"""The lifecycle table itself: reachability, no traps, refusals, causes. (That the engine
runs it exactly as `transitions` would is tests/core/test_machine.py.)"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from transitions import MachineError

from wirestate.core import lifecycle
from wirestate.core.actions import Close, Reject, Unregistered
from wirestate.core.causes import CloseCause
from wirestate.core.hub import Connection
from wirestate.core.lifecycle import ENGINE, REFUSALS, TERMINAL, TRIGGERS, ConnState

S = ConnState
KW: dict[str, Any] = {"now": 1.0, "cause": CloseCause.PEER_CLOSE, "code": 1000}


def _conn(state: ConnState) -> Connection:
    c = Connection("c", 0.0)
    c.state = state
    return c


def _edges() -> dict[ConnState, set[ConnState]]:
    out: dict[ConnState, set[ConnState]] = {s: set() for s in S}
    for (source, _trigger), dests in ENGINE.pairs().items():
        out[source].update(d for d in dests if d is not None)
    return out


def test_every_state_is_reachable_from_handshaking() -> None:
    edges = _edges()
    seen, todo = {S.HANDSHAKING}, [S.HANDSHAKING]
    while todo:
        for nxt in edges[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(S)


def test_no_trap_state_every_state_reaches_a_terminal_one() -> None:
    edges = _edges()
    for start in S:
        seen, todo = {start}, [start]
        while todo:
            for nxt in edges[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert seen & TERMINAL, f"{start} cannot reach a terminal state"


def test_terminal_states_absorb_every_trigger() -> None:
    for state, trigger in itertools.product(TERMINAL, TRIGGERS):
        c = _conn(state)
        out: list[object] = []
        ENGINE.fire(c, trigger, out=out, **KW)
        assert c.state is state
        assert out == []


@pytest.mark.parametrize(("state", "trigger"), list(itertools.product(S, TRIGGERS)))
def test_every_pair_is_a_destination_or_a_documented_refusal(
    state: ConnState, trigger: str
) -> None:
    listed = ENGINE.allows(state, trigger)
    documented = (state, trigger) in REFUSALS
    assert listed != documented, "exactly one of: in the table, or a documented refusal"
    if documented:
        c = _conn(state)
        with pytest.raises(MachineError):
            ENGINE.fire(c, trigger, out=[], **KW)
        assert c.state is state


def test_every_path_into_closing_records_its_cause_and_queues_a_close() -> None:
    for (source, trigger), (dest,) in ENGINE.pairs().items():
        if dest is None or dest not in lifecycle.CLOSING_STATES | {S.REJECTED}:
            continue
        if source in lifecycle.CLOSING_STATES:
            continue  # already closing: the first cause stands
        c = _conn(source)
        out: list[object] = []
        ENGINE.fire(c, trigger, out=out, now=2.0, cause=CloseCause.POLICY, code=None)
        assert c.cause is CloseCause.POLICY, (source, trigger)
        assert c.close_code == 1008
        assert len(out) == 1
        assert isinstance(out[0], Close | Reject)


def test_a_close_without_a_cause_is_a_caller_error_and_changes_nothing() -> None:
    c = _conn(S.OPEN)
    with pytest.raises(ValueError, match="CloseCause"):
        ENGINE.fire(c, "close", out=[], now=1.0)
    assert c.state is S.OPEN
    assert c.cause is None


def test_the_first_cause_wins() -> None:
    c = _conn(S.OPEN)
    out: list[object] = []
    ENGINE.fire(c, "close", out=out, now=1.0, cause=CloseCause.KEEPALIVE_TIMEOUT)
    ENGINE.fire(c, "reader_done", out=out, now=2.0, cause=CloseCause.PEER_CLOSE, code=1000)
    assert c.cause is CloseCause.KEEPALIVE_TIMEOUT
    assert c.close_code == 1011
    assert [type(a) for a in out] == [Close]


def test_unregister_only_from_closed_and_it_reports_once() -> None:
    c = _conn(S.CLOSED)
    c.cause = CloseCause.PEER_CLOSE
    out: list[object] = []
    ENGINE.fire(c, "unregister", out=out, now=3.0)
    ENGINE.fire(c, "unregister", out=out, now=4.0)
    assert out == [Unregistered("c", CloseCause.PEER_CLOSE, None, 3.0)]


def test_pumps_table_matches_the_state_names() -> None:
    assert lifecycle.PUMPS[S.OPEN] == (True, True)
    assert lifecycle.PUMPS[S.CLOSING_READER_DONE] == (False, True)
    assert lifecycle.PUMPS[S.CLOSING_WRITER_DONE] == (True, False)
    assert lifecycle.PUMPS[S.CLOSED] == (False, False)
    assert set(lifecycle.PUMPS) == set(S)
