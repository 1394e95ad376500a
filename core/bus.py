"""A node's view of the bus that several hubs share (docs/scaling.md). Pure.

The bus sequences every topic it carries: a topic's ``seq`` and ``epoch`` are the bus's, the
same on every node, so a client resumes on any node. The adapter (``adapters/server/bus.py``)
does the I/O; this module keeps what the node knows and decides what its subscribers are
told:

- ``attach`` when the first local subscriber arrives: the topic's epoch, last seq and the
  tail of its stream go into the hub (``Hub.attach``), and ``cursor`` is where reading
  continues.
- ``entries`` read from a stream go to the hub in order (``Hub.deliver``): anything at or
  below the cursor is a duplicate and ignored; a jump owes a ``bus_outage`` gap.
- While the link is down (``lost``), the node keeps delivering what is published on it to
  its own subscribers (``publish_local``), numbered on from the last seq it had, and keeps
  those events (up to the stream's cap) for the bus. The last seq it had includes its own
  publishes the bus acknowledged (``acked``) but the node had not read back when the link
  failed: a failover may have lost them, so its subscribers are told of them as a
  ``bus_outage`` gap rather than see their seqs reused for other events.
- On recovery, each topic is reconciled (``plan`` for the adapter's one atomic script, then
  ``reconciled`` with its answer): when nobody else wrote meanwhile the local events enter
  the stream under the very seqs the local clients saw; when another node did, they are
  appended after its events and the local subscribers get a ``bus_outage`` gap as long as
  what they missed; when the bus lost the topic, the node re-seeds it with its own count.

Nothing here waits or does I/O; every input takes ``now``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from wirestate.core.frames import dumps
from wirestate.core.hub import Hub


class Reconciled(StrEnum):
    """The bus's answer to a node's reconciliation of one topic."""

    SAME = "same"  # nobody wrote meanwhile: the local events kept their seqs
    MOVED = "moved"  # others wrote meanwhile: the local events went after theirs
    EPOCH = "epoch"  # the topic counts in another epoch now


@dataclass
class TopicLink:
    """One bus topic as this node knows it."""

    cursor: int = 0  # the last seq confirmed by the bus
    #: the highest seq the bus gave one of this node's own publishes (read back or not)
    acked: int = 0
    attached: bool = False  # reading its stream
    #: events published here while the link was down, as (body, ts), oldest first
    pending: deque[tuple[bytes, str]] = field(default_factory=deque)
    skipped: int = 0  # pending events dropped past the stream's cap (counted, not sent)


@dataclass(frozen=True)
class Plan:
    """What the adapter sends to reconcile one topic: this node's epoch and count for it,
    ``skipped`` events it can no longer send, then ``events`` as (body, ts); an empty body
    is a hole: its seq is taken, nothing is written."""

    topic: str
    epoch: str
    base: int
    skipped: int
    events: tuple[tuple[bytes, str], ...]


class BusState:
    """The node's side of the bus for one hub. ``cap`` is the streams' length (the history
    size, at least 1)."""

    def __init__(self, hub: Hub, cap: int) -> None:
        self.hub = hub
        self.cap = max(1, cap)
        self.up = False  # the link is confirmed
        self.links: dict[str, TopicLink] = {}
        self.outages = 0
        self.gapped = 0  # seqs reported to local subscribers as bus_outage gaps

    def link(self, topic: str) -> TopicLink:
        link = self.links.get(topic)
        if link is None:
            link = self.links[topic] = TopicLink()
        return link

    def reading(self) -> dict[str, int]:
        """The streams to read and the cursor of each: attached topics with a subscriber
        here. A topic left without one is detached (``attach`` refreshes it later)."""
        out: dict[str, int] = {}
        topics = self.hub.topics
        for name, link in self.links.items():
            if not link.attached:
                continue
            topic = topics.get(name)
            if topic is not None and topic.subscribers:
                out[name] = link.cursor
            else:
                link.attached = False
        return out

    def forget(self, topics: Iterable[str]) -> None:
        """The hub dropped ``topics``: their links go too (the node's state for a topic must
        not outlive it), except one that still holds events to reconcile."""
        for name in topics:
            link = self.links.get(name)
            if link is not None and not link.pending and not link.skipped:
                del self.links[name]

    def attach(
        self,
        topic: str,
        epoch: str,
        seq: int,
        events: Iterable[tuple[int, bytes, str, bytes]],
        now: float,
    ) -> None:
        """The topic's state read from the bus (``events`` oldest first)."""
        self.hub.attach(topic, epoch, seq, events, now)
        link = self.link(topic)
        link.cursor = self.hub.topics[topic].seq
        link.attached = True

    def entries(
        self, topic: str, events: Iterable[tuple[int, bytes, str, bytes]], now: float
    ) -> int:
        """Events read from the topic's stream as ``(seq, body, ts, tail)`` (``Hub.deliver``),
        oldest first; returns how many were new."""
        link = self.link(topic)
        hub = self.hub
        delivered = 0
        before = hub.topics[topic].seq if topic in hub.topics else 0
        for seq, body, ts, tail in events:
            if hub.deliver(topic, seq, body, ts, now, tail):
                delivered += 1
            link.cursor = max(link.cursor, seq)
        after = hub.topics[topic].seq
        self.gapped += max(0, after - before - delivered)
        return delivered

    def acked(self, topic: str, seq: int) -> None:
        """The bus numbered one of this node's publishes ``seq``."""
        link = self.link(topic)
        link.acked = max(link.acked, seq)

    def lost(self) -> bool:
        """The link failed; True when it was up (a new outage)."""
        was = self.up
        self.up = False
        if was:
            self.outages += 1
        return was

    def publish_local(
        self,
        topic: str,
        data: Any,
        now: float,
        *,
        stale: bool = False,
        age: float | None = None,
        keep: bool = True,
    ) -> int:
        """Publish while the link is down: this node's subscribers get it now, numbered on
        from the last seq here; the bus gets it on recovery (its data: a stale flag is this
        node's clients' only). Returns the local seq.

        ``keep=False``: the bus must never get it (a shared source's leader's write, which
        only its lease may let through, and the lease cannot be checked now). It still
        holds its seq in the plan, as a hole (an empty body), so that the local numbering
        stays the bus's; other nodes' subscribers get a ``bus_outage`` gap for it."""
        body = dumps(data)
        link = self.link(topic)
        hub = self.hub
        known = hub.topics[topic].seq if topic in hub.topics else 0
        if link.acked > known:
            # Acknowledged, never read back: the local count goes on after them.
            hub.rebase(topic, link.acked, now)
            self.gapped += link.acked - known
        seq = hub.publish(topic, data, now, stale=stale, age=age)
        link.pending.append((body if keep else b"", self.hub.stamp(now)))
        if len(link.pending) > self.cap:
            link.pending.popleft()
            link.skipped += 1
        return seq

    def plans(self) -> list[Plan]:
        """One plan per topic this node has state for that the bus carries: attached ones,
        ones with a subscriber, ones published on while down."""
        plans = []
        for name, link in self.links.items():
            topic = self.hub.topics.get(name)
            epoch = topic.epoch if topic is not None else self.hub.epoch
            base = max(link.cursor, link.acked)
            if link.attached or link.pending or link.skipped:
                plans.append(Plan(name, epoch, base, link.skipped, tuple(link.pending)))
        return plans

    def reconciled(
        self, plan: Plan, status: Reconciled, epoch: str, start: int, end: int, now: float
    ) -> None:
        """The bus's answer: the topic's events before this node's now end at ``start`` and
        this node's plan took ``start + 1 .. end``."""
        link = self.link(plan.topic)
        sent = plan.skipped + len(plan.events)
        for _ in range(len(plan.events)):
            link.pending.popleft()
        link.skipped = 0
        hub = self.hub
        if status is Reconciled.EPOCH:
            hub.rebase(plan.topic, end, now, epoch=epoch)
        elif status is Reconciled.MOVED and sent:
            # The local clients saw base+1..base+sent as this node's events; in the bus those
            # seqs hold others' events, and this node's come at start+1..end. What the local
            # clients missed is what the others wrote: base+sent+1 .. end, by count.
            before = hub.topics[plan.topic].seq
            hub.rebase(plan.topic, end, now)
            self.gapped += end - before
        if sent or status is Reconciled.EPOCH:
            link.cursor = end
        # else reading goes on from the cursor: what the bus still holds is delivered, and
        # a hole (writes the bus lost) is a bus_outage gap

    def restored(self) -> None:
        self.up = True
