"""Topics: per-topic sequence, epoch, bounded history, retained latest event, subscribers,
and the resume plan of a subscriber that says what it already has. Pure.

Rules of this module:

* ``seq`` strictly increases by one per event within an ``epoch``; an `Event` is appended to
  the history and becomes the retained event in one step (``Topic.append``).
* The history is bounded by count (the deque's ``maxlen``) and by age (``trim``): an event
  older than ``max_age`` is dropped the next time the topic is written or read for a resume.
* A resume never sends an event twice and never leaves a hole unreported: the plan is the
  events after ``since`` still in the history, preceded by a ``history_evicted`` gap for the
  ones no longer there. A client that counted in another sequence space gets an
  ``epoch_changed`` gap, then this one from seq 1 the same way: what is still held, with a
  ``history_evicted`` gap for each run that is not (after a rebase the history is empty and
  the retained event may be older than ``seq``).
* Every plan names the seq the subscription continues after (``subscribed``'s ``seq``): each
  later event of the topic is either in the plan, or comes live, or is in a gap. A new
  subscriber starts after the topic's newest seq (its retained event is the current value,
  not a missed one); a resume starts after its ``since`` (the replay follows), or after 0
  when it is moved to another numbering (it has nothing of it: all of it follows).
* Topics have a life cycle (`Topics`): the history and the retained event age by
  ``max_age`` without waiting for traffic on the topic (``sweep``, on the hub's timer), and a
  topic with no subscriber that holds nothing any more is dropped. At most ``max_topics``
  exist; creating one more raises `TopicLimit`. A topic created again after a drop counts in
  a new epoch, so a seq is never reused for a different event within an epoch.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from wirestate.core import frames
from wirestate.core.causes import GapReason, OverflowPolicy

if TYPE_CHECKING:
    from wirestate.core.connection import Connection

#: The history of every topic that has none yet (never appended to: see `Topic.append`).
NO_HISTORY: deque[Event] = deque(maxlen=0)

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

    __slots__ = (
        "due",
        "epoch",
        "history",
        "name",
        "policy",
        "retained",
        "seq",
        "size",
        "subscribers",
    )

    def __init__(self, name: str, epoch: str, size: int, policy: OverflowPolicy) -> None:
        self.name = name
        self.epoch = epoch
        self.seq = 0
        self.size = size
        # Shared and empty until the first event: a topic that only has subscribers (or
        # none) holds no deque of its own (an empty bounded deque costs ~600 bytes).
        self.history: deque[Event] = NO_HISTORY
        self.retained: Event | None = None
        self.policy = policy
        self.subscribers: dict[str, Connection] = {}
        #: When `Topics.sweep` looks at this topic next (None: not arranged).
        self.due: float | None = None

    def append(self, event: Event, max_age: float) -> None:
        """``event`` is the topic's next: its seq, its newest history entry, its retained
        value. History older than ``max_age`` at the event's time is dropped."""
        self.seq = event.seq
        history = self.history
        if history is NO_HISTORY:
            history = self.history = deque(maxlen=self.size)
        history.append(event)
        now = event.at
        while history and history[0].at + max_age <= now:
            history.popleft()
        self.retained = event

    def trim(self, now: float, max_age: float) -> None:
        """Drop history (and the retained event) ``max_age`` old or older at ``now``. (Ages
        are compared as ``at + max_age <= now``, the same sum `next_aging` schedules, so an
        event is gone exactly when its deadline comes.)"""
        history = self.history
        while history and history[0].at + max_age <= now:
            history.popleft()
        retained = self.retained
        if retained is not None and retained.at + max_age <= now:
            self.retained = None

    def next_aging(self, now: float, max_age: float, keep: bool) -> float | None:
        """When this topic next changes by age alone: its oldest event ages out, or (idle,
        holding nothing, not ``keep``) it may be dropped now. None: nothing to wait for."""
        if self.history:
            return self.history[0].at + max_age
        if self.retained is not None:
            return self.retained.at + max_age
        if not self.subscribers and not keep:
            return now
        return None

    def resume_plan(
        self, since: Since | None, now: float, max_age: float
    ) -> tuple[bool, int, list[bytes | Event]]:
        """(recovered, start, entries to queue) for a subscriber that has everything up to
        ``since``: the retained event for a new subscriber (``since`` None); else the events
        after ``since`` still in the history, after a gap for what it no longer holds; for a
        ``since`` of another numbering, an ``epoch_changed`` gap and this one from seq 1.
        ``start`` is the seq the subscription continues after (see the module docstring):
        resuming later from it, or from any seq received since, loses nothing unreported."""
        self.trim(now, max_age)
        retained: list[bytes | Event] = [self.retained] if self.retained else []
        if since is None:
            return True, self.seq, retained
        seq, epoch = since if isinstance(since, tuple) else (since, None)
        if (epoch is not None and epoch != self.epoch) or seq > self.seq:
            # Another sequence space (a restarted node): the client has nothing of this one,
            # so it gets this numbering from its start, as far as the topic still holds it.
            gap = frames.gap(self.name, None, None, GapReason.EPOCH_CHANGED)
            return False, 0, [gap, *self._replay_from_start()]
        if seq >= self.seq:
            return True, seq, []
        history = self.history
        first = history[0].seq if history else self.seq + 1
        entries: list[bytes | Event] = []
        recovered = first <= seq + 1
        if not recovered:
            entries.append(frames.gap(self.name, seq + 1, first - 1, GapReason.HISTORY_EVICTED))
        entries.extend(e for e in history if e.seq > seq)
        return recovered, seq, entries

    def _replay_from_start(self) -> list[bytes | Event]:
        """Seqs 1..``seq`` as far as held, in order, with a ``history_evicted`` gap for each
        run no longer held. Held is the history, or with none the retained event (which
        may be older than ``seq`` after a rebase; the history, when not empty, runs
        contiguously up to ``seq``)."""
        held = list(self.history) if self.history else [self.retained] if self.retained else []
        entries: list[bytes | Event] = []
        after = 0
        for event in held:
            if event.seq > after + 1:
                entries.append(
                    frames.gap(self.name, after + 1, event.seq - 1, GapReason.HISTORY_EVICTED)
                )
            entries.append(event)
            after = event.seq
        if after < self.seq:
            entries.append(frames.gap(self.name, after + 1, self.seq, GapReason.HISTORY_EVICTED))
        return entries


#: How many recently published topics `Topics.recent` remembers.
RECENT = 256


class TopicLimit(Exception):
    """Creating one more topic would pass ``max_topics``: the publish or subscribe that asked
    for it is refused (error ``topic_limit``); nothing else is disturbed."""


class Topics(dict[str, "Topic"]):
    """The hub's topics by name, with their life cycle (see the module docstring).

    ``keep`` names topics that are never dropped (the built-in and reserved ones), never
    refused and not counted against ``max_topics``; ``policy`` gives a new topic's overflow
    policy."""

    def __init__(
        self,
        epoch: str,
        *,
        history_size: int,
        max_age: float,
        max_topics: int,
        policy: Callable[[str], OverflowPolicy],
        keep: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__()
        self.epoch = epoch
        self.history_size = history_size
        self.max_age = max_age
        self.max_topics = max_topics
        self.policy = policy
        self.keep = keep
        #: Topics dropped so far; a topic created after any drop counts in a new epoch.
        self.drops = 0
        self.refused = 0  # creations refused at max_topics
        self.dropped: list[str] = []  # names dropped since the last `take_dropped`
        #: The `RECENT` topics published to last, oldest first: what a view of the busiest
        #: topics reads, at a cost that does not grow with the number of topics.
        self.recent: dict[str, None] = {}
        self._due: list[tuple[float, int, str]] = []
        self._seq = 0

    def fork(self) -> Topics:
        """An empty registry with this one's settings, counters and schedule (for copies
        made by the verification kit, which fills in copies of the topics)."""
        other = Topics(
            self.epoch,
            history_size=self.history_size,
            max_age=self.max_age,
            max_topics=self.max_topics,
            policy=self.policy,
            keep=self.keep,
        )
        other.drops, other.refused = self.drops, self.refused
        other._due, other._seq = self._due.copy(), self._seq
        return other

    def create(self, name: str) -> Topic:
        """A new, empty topic; raises `TopicLimit` when ``max_topics`` exist already."""
        keep = name in self.keep
        if not keep and self.counted() >= self.max_topics:
            self.refused += 1
            raise TopicLimit(name)
        epoch = self.epoch if self.drops == 0 else f"{self.epoch}.{self.drops}"
        topic = Topic(name, epoch, self.history_size, self.policy(name))
        self[name] = topic
        return topic

    def touched(self, name: str) -> None:
        """``name`` was just published to."""
        recent = self.recent
        recent.pop(name, None)
        recent[name] = None
        if len(recent) > RECENT:
            del recent[next(iter(recent))]

    def counted(self) -> int:
        """The topics that count against ``max_topics`` (all but the kept ones)."""
        return len(self) - sum(1 for name in self.keep if name in self)

    def watch(self, topic: Topic, now: float) -> None:
        """Arrange for `sweep` to look at ``topic`` when it next changes by age (once: a
        topic already arranged for is left as it is, and `sweep` re-arranges it)."""
        if topic.due is not None:
            return
        when = topic.next_aging(now, self.max_age, topic.name in self.keep)
        if when is None:
            return
        topic.due = when
        self._seq += 1
        heapq.heappush(self._due, (when, self._seq, topic.name))

    def next_deadline(self) -> float | None:
        return self._due[0][0] if self._due else None

    def sweep(self, now: float) -> None:
        """Age every topic due at ``now`` and drop those left idle and empty."""
        due, max_age = self._due, self.max_age
        while due and due[0][0] <= now:
            _, _, name = heapq.heappop(due)
            # One entry per topic: `watch` arranges one only when none is (``due`` None),
            # and only this loop drops a topic, after popping its entry.
            topic = self[name]
            topic.due = None
            topic.trim(now, max_age)
            if (
                not topic.subscribers
                and not topic.history
                and topic.retained is None
                and name not in self.keep
            ):
                del self[name]
                self.recent.pop(name, None)
                self.drops += 1
                self.dropped.append(name)
            else:
                self.watch(topic, now)

    def take_dropped(self) -> list[str]:
        """The names dropped since the last call (a bus forgets its state for them)."""
        out, self.dropped = self.dropped, []
        return out
