"""Topics: per-topic sequence, epoch, bounded history, retained latest event, subscribers,
and the resume plan of a subscriber that says what it already has. Pure.

Rules of this module:

* ``seq`` strictly increases by one per event within an ``epoch``; an `Event` is appended to
  the history and becomes the retained event in one step (``Topic.append``).
* The history is bounded by count (the deque's ``maxlen``) and by age (``trim``): an event
  older than ``max_age`` is dropped the next time the topic is written or read for a resume.
* A resume never sends an event twice and never leaves a hole unreported: the plan is the
  events after ``since`` still in the history, preceded by a ``history_evicted`` gap for the
  ones no longer there, or an ``epoch_changed`` gap when the client counted in another
  sequence space.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from wirestate.core import frames
from wirestate.core.causes import GapReason, OverflowPolicy

if TYPE_CHECKING:
    from wirestate.core.connection import Connection

#: What a subscriber says it has of a topic: a seq, or a seq and the epoch it was counted in.
Since = int | tuple[int, str | None]


class Event:
    """One published event: serialized once, shared by every outbox and the history."""

    __slots__ = ("at", "frame", "seq", "topic")

    def __init__(self, topic: str, seq: int, at: float, frame: bytes) -> None:
        self.topic = topic
        self.seq = seq
        self.at = at
        self.frame = frame


class Topic:
    """Per-topic sequence, epoch, bounded history, retained latest event and subscribers."""

    __slots__ = ("epoch", "history", "name", "policy", "retained", "seq", "subscribers")

    def __init__(self, name: str, epoch: str, size: int, policy: OverflowPolicy) -> None:
        self.name = name
        self.epoch = epoch
        self.seq = 0
        self.history: deque[Event] = deque(maxlen=size)
        self.retained: Event | None = None
        self.policy = policy
        self.subscribers: dict[str, Connection] = {}

    def append(self, event: Event, max_age: float) -> None:
        """``event`` is the topic's next: its seq, its newest history entry, its retained
        value. History older than ``max_age`` at the event's time is dropped."""
        self.seq = event.seq
        history = self.history
        history.append(event)
        horizon = event.at - max_age
        while history and history[0].at < horizon:
            history.popleft()
        self.retained = event

    def trim(self, now: float, max_age: float) -> None:
        """Drop history older than ``max_age`` at ``now``."""
        history = self.history
        horizon = now - max_age
        while history and history[0].at < horizon:
            history.popleft()

    def resume_plan(
        self, since: Since | None, now: float, max_age: float
    ) -> tuple[bool, list[bytes | Event]]:
        """(recovered, entries to queue) for a subscriber that has everything up to
        ``since``: the retained event for a new subscriber (``since`` None); else the events
        after ``since`` still in the history, after a gap for what it no longer holds."""
        if since is None:
            return True, [self.retained] if self.retained else []
        seq, epoch = since if isinstance(since, tuple) else (since, None)
        if (epoch is not None and epoch != self.epoch) or seq > self.seq:
            # Another sequence space (a restarted node): the client cannot resume into it.
            gap = frames.gap(self.name, None, None, GapReason.EPOCH_CHANGED)
            return False, [gap, *([self.retained] if self.retained else [])]
        self.trim(now, max_age)
        if seq >= self.seq:
            return True, []
        history = self.history
        first = history[0].seq if history else self.seq + 1
        entries: list[bytes | Event] = []
        recovered = first <= seq + 1
        if not recovered:
            entries.append(frames.gap(self.name, seq + 1, first - 1, GapReason.HISTORY_EVICTED))
        entries.extend(e for e in history if e.seq > seq)
        return recovered, entries
