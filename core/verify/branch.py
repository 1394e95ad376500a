"""Copies of a hub and its connections, for checkers that explore several futures of one
state (``wirestate.core.verify.explore``, the Hypothesis machine through it).

They live beside the explorers rather than on the runtime classes: the service never needs
a copy. A copy goes through the hub's public parts only (a shallow copy whose registry, topics,
timers and pending outputs are then replaced), and `clone` copies every slot of a `Connection`
(``tests/core/verify/test_branch.py`` fails when a slot is added and not copied here).
"""

from __future__ import annotations

from wirestate.core.connection import Connection
from wirestate.core.hub import Hub
from wirestate.core.topics import Topic


def clone(conn: Connection) -> Connection:
    """An independent copy of ``conn``: every slot, its containers copied. Spelled out slot
    by slot: the explorers clone millions of connections, and a loop over ``__slots__``
    with getattr/setattr costs them a third of their speed."""
    other = Connection.__new__(Connection)
    other.client_id = conn.client_id
    other.state = conn.state
    other.accepting = conn.accepting
    other.cause = conn.cause
    other.close_code = conn.close_code
    other.opened_at = conn.opened_at
    other.closing_at = conn.closing_at
    other.close_deadline = conn.close_deadline
    other.outbox = conn.outbox.copy()
    other.queued_bytes = conn.queued_bytes
    other.buffered = conn.buffered
    other.writable = conn.writable
    other.owed = {k: [r.copy() for r in v] for k, v in conn.owed.items()} if conn.owed else None
    other.topics = conn.topics.copy()
    other.next_ping_at = conn.next_ping_at
    other.ping_sent_at = conn.ping_sent_at
    other.pong_deadline = conn.pong_deadline
    other.rtt = conn.rtt
    other.bad_inputs = conn.bad_inputs
    other.tokens = conn.tokens
    other.tokens_at = conn.tokens_at
    other.limited = conn.limited
    return other


def branch(hub: Hub) -> Hub:
    """An independent copy of ``hub`` and its registered connections, with no pending
    actions or ready clients. Two things are shared, not copied: the counters (``stats``)
    and each topic's history and retained event, which the explorers never read (none of
    their inputs resumes with ``since``) and which cost a third of a copy."""
    other = Hub.__new__(Hub)
    vars(other).update(vars(hub))  # config, engine, epoch, stamp and stats: shared
    other.actions()  # rebinds the copy's pending actions and ready list to fresh ones,
    other.take_ready()  # leaving the original's as they are
    other.take_urgent()
    other.timers = hub.timers.copy()
    clients = {cid: clone(c) for cid, c in hub.clients.items()}
    other.clients = clients
    topics = hub.topics.fork()
    for name, t in hub.topics.items():
        nt = Topic.__new__(Topic)
        nt.name, nt.epoch, nt.seq, nt.policy = t.name, t.epoch, t.seq, t.policy
        nt.history, nt.retained, nt.size, nt.due = t.history, t.retained, t.size, t.due
        nt.subscribers = {cid: clients[cid] for cid in t.subscribers}
        topics[name] = nt
    other.topics = topics
    return other
