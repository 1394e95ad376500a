"""Copies for the explorers: a clone copies every slot of a connection, shares none of its
containers, and a branched hub evolves independently of its original."""

from __future__ import annotations

from wirestate.core.causes import CloseCause
from wirestate.core.connection import Connection
from wirestate.core.hub import Hub, HubConfig
from wirestate.core.lifecycle import ConnState
from wirestate.core.verify.branch import branch, clone


def _distinct(conn: Connection) -> None:
    """Give every slot a value no fresh connection has."""
    conn.state = ConnState.CLOSING
    conn.accepting = True
    conn.cause = CloseCause.POLICY
    conn.close_code = 1008
    conn.opened_at = 1.5
    conn.closing_at = 2.5
    conn.close_deadline = 3.5
    conn.outbox = [b"frame"]
    conn.owed = {"t": [[1, 2]]}
    conn.topics = {"t"}
    conn.next_ping_at = 4.5
    conn.ping_sent_at = 5.5
    conn.pong_deadline = 6.5
    conn.rtt = 0.25
    conn.bad_inputs = 3
    conn.tokens = 7.0
    conn.tokens_at = 8.5
    conn.limited = 2
    conn.queued_bytes = 5
    conn.buffered = 9
    conn.writable = True


def test_a_clone_copies_every_slot() -> None:
    fresh = Connection("c", 0.0)
    original = Connection("c", 0.0)
    _distinct(original)
    # a slot added to Connection and not set above fails here: it would go uncopied unseen
    unchanged = [
        s
        for s in Connection.__slots__
        if s != "client_id" and getattr(original, s) == getattr(fresh, s)
    ]
    assert unchanged == []
    twin = clone(original)
    for name in Connection.__slots__:
        assert getattr(twin, name) == getattr(original, name), name


def test_a_clone_shares_no_container() -> None:
    original = Connection("c", 0.0)
    _distinct(original)
    twin = clone(original)
    twin.outbox.append(b"more")
    assert twin.owed is not None
    twin.owed["t"][0][1] = 9
    assert isinstance(twin.topics, set)
    twin.topics.add("u")
    assert original.outbox == [b"frame"]
    assert original.owed == {"t": [[1, 2]]}
    assert original.topics == {"t"}


def test_a_branch_evolves_apart_from_its_original() -> None:
    hub = Hub(HubConfig(ping_interval=1.0, ping_timeout=0.5), epoch="e")
    conn = hub.connect("c1", 0.0)
    hub.accept(conn, 0.0)
    hub.start(conn, 0.0)
    hub.subscribe(conn, ["t"], 0.0)
    hub.drain(conn)
    hub.actions()
    other = branch(hub)
    assert other.lifecycle is hub.lifecycle
    assert other.epoch == "e"
    twin = other.clients["c1"]
    assert twin is not conn
    assert other.topics["t"].subscribers["c1"] is twin
    other.publish("t", {"n": 1}, 0.1)
    other.tick(1.0)  # the branch pings; the original has not ticked
    assert len(twin.outbox) == 1
    assert conn.outbox == []
    assert hub.topics["t"].seq == 0
    assert other.timers.heap != hub.timers.heap
    assert hub.actions() == []
