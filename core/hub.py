"""The hub: the registry, subscriptions, routing and bounded outboxes; the coordinator of
the core's parts. Pure.

Inputs are methods that record what happened, each with the current monotonic ``now``;
decisions come out as frozen actions (``actions()``), outgoing frames wait in each client's
bounded outbox (``drain()``), and ``next_deadline()`` says when to call ``tick()``. What the
hub coordinates lives beside it: the lifecycle table and its engine (``lifecycle``,
``machine``), topics with their history and resume (``topics``), keep-alive and close
deadlines (``timers``), the inbound rate limit (``ratelimit``) and the frames
(``frames``).

Rules and invariants (docs/state-machines.md; checked after every step by
``wirestate.core.verify.checks``):

1. Unregistration is the lifecycle table's ``unregister`` trigger, which leaves only from
   ``closed`` (both pumps finished). The adapter calls ``unregister`` in its handler's
   ``finally``; a call while a pump runs is refused (``MachineError``), a second one absorbed.
2. Every path into closing carries a `CloseCause` (enforced by the table's callback).
3. No event is queued for a client once its close has begun (``conn.accepting``); such
   events are counted as dropped with reason ``closing``. No frame is handed to a writer that
   has finished: its outbox is dropped (reason ``closed``).
4. ``clients`` (the registry) and the subscription index hold exactly the registered,
   not-yet-unregistered clients.
5. A client whose close began gets ``Abort`` once ``close_timeout`` passes with a pump
   still running, so a stuck pump cannot keep it registered.

The hot path (``publish`` to N subscribers) serializes the event once and appends the same
object to N bounded outboxes: no per-recipient object, no ``transitions`` trigger.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from wirestate.core import frames, ratelimit
from wirestate.core.actions import Abort, Action, Ping
from wirestate.core.causes import CloseCause, ErrorCode, GapReason, OverflowPolicy
from wirestate.core.connection import Connection
from wirestate.core.lifecycle import CLOSING_STATES, PUMPS, ConnState
from wirestate.core.lifecycle import ENGINE as LIFECYCLE
from wirestate.core.machine import Engine
from wirestate.core.timers import CLOSE, PING, Timers
from wirestate.core.topics import Event, Topic, TopicLimit, Topics

__all__ = [
    "BUILTIN_TOPICS",
    "PROTOCOL_VERSION",
    "Connection",
    "Hub",
    "HubConfig",
    "HubStats",
    "TopicLimit",
]

S = ConnState
PROTOCOL_VERSION: Final = 1
#: Topics the hub itself publishes on; clients may subscribe but never publish there.
BUILTIN_TOPICS: Final = frozenset({"clients", "circuit_breaker", "system_status"})


@dataclass(frozen=True)
class HubConfig:
    """The hub's policy knobs. Defaults are the service's (docs/operations.md)."""

    ping_interval: float = 30.0
    ping_timeout: float = 10.0
    send_queue_size: int = 256
    close_timeout: float = 5.0
    history_size: int = 1000
    history_max_age: float = 600.0
    max_subscriptions: int = 100
    #: consecutive invalid frames answered with ``error`` before a close with ``policy``
    bad_input_limit: int = 5
    #: inbound messages per second per client (a token bucket holding one second's worth);
    #: a client still over it after ``rate_limit_grace`` refused messages is closed (policy)
    messages_per_second: float = 50.0
    rate_limit_grace: int = 50
    default_overflow: OverflowPolicy = OverflowPolicy.DISCONNECT
    overflow: Mapping[str, OverflowPolicy] = field(default_factory=dict)
    #: may clients publish with the ``publish`` message (auth may narrow this per client)
    client_publish: bool = True
    #: topics only the server publishes on (sources add theirs); never dropped or refused
    reserved_topics: frozenset[str] = BUILTIN_TOPICS
    #: topics the hub holds at most: creating one more is refused with ``topic_limit``
    max_topics: int = 100_000
    #: bytes queued for one client (its outbox plus what its transport still buffers) past
    #: which it is a slow consumer
    max_pending_bytes: int = 1_048_576

    def __post_init__(self) -> None:
        for name in ("ping_interval", "ping_timeout", "close_timeout", "history_max_age"):
            value = getattr(self, name)
            if not value > 0:  # also rejects NaN
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if not self.messages_per_second > 0:
            raise ValueError(f"messages_per_second must be > 0, got {self.messages_per_second!r}")
        for name in (
            "send_queue_size",
            "max_subscriptions",
            "bad_input_limit",
            "rate_limit_grace",
            "max_topics",
            "max_pending_bytes",
        ):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}")
        if self.history_size < 0:
            raise ValueError(f"history_size must be >= 0, got {self.history_size!r}")

    def policy(self, topic: str) -> OverflowPolicy:
        return self.overflow.get(topic, self.default_overflow)


@dataclass
class HubStats:
    """Counters the adapter exports as metrics (metric names in comments)."""

    disconnects: Counter[str] = field(default_factory=Counter)  # wirestate_disconnects_total
    dropped: Counter[str] = field(default_factory=Counter)  # wirestate_messages_dropped_total
    sent: int = 0  # wirestate_messages_sent_total (frames handed to writers)
    published: int = 0
    pings: int = 0
    loop_stalls: int = 0
    loop_stall_seconds: float = 0.0
    stall_extensions: int = 0  # pong deadlines pushed back by a stall
    aborts: int = 0
    rate_limited: int = 0  # inbound messages refused by the token bucket
    errors: Counter[str] = field(default_factory=Counter)  # `error` messages sent, by code
    duplicates: int = 0  # bus events at or below a topic's seq, ignored (``deliver``)
    epoch_changes: int = 0  # topics whose live subscribers were moved to another epoch


def _size(entry: bytes | Event) -> int:
    """The bytes an outbox entry puts on the wire (its frame's payload)."""
    return len(entry) if isinstance(entry, bytes) else len(entry.frame)


class Hub:
    """The pure hub. Not thread-safe; one per event loop.

    ``epoch`` names this node's sequence space (the adapter passes a fresh random id at
    start): a client resuming with another epoch is told ``epoch_changed``. ``wall_offset``
    is added to ``now`` to stamp events (``ts``) without the core reading a wall clock.
    ``lifecycle`` is the engine that runs the connection table: the real one, unless a
    checker hands in a mutant to prove it would catch the bug.
    """

    def __init__(
        self,
        config: HubConfig | None = None,
        *,
        epoch: str = "0",
        wall_offset: float = 0.0,
        lifecycle: Engine[ConnState] = LIFECYCLE,
    ) -> None:
        self.config = config or HubConfig()
        self.lifecycle = lifecycle
        self.epoch = epoch
        self.wall_offset = wall_offset
        self.clients: dict[str, Connection] = {}  # the registry
        cfg = self.config
        self.topics = Topics(
            epoch,
            history_size=cfg.history_size,
            max_age=cfg.history_max_age,
            max_topics=cfg.max_topics,
            policy=cfg.policy,
            keep=cfg.reserved_topics,
        )
        self.stats = HubStats()
        self.timers = Timers(
            self.config.ping_interval, self.config.ping_timeout, self.config.close_timeout
        )
        self._actions: list[Action] = []
        self._ready: list[str] = []
        self._urgent: list[str] = []
        self._stamp = frames.WallStamp()

    # -- outputs -------------------------------------------------------------------------

    def actions(self) -> list[Action]:
        """Drain the decisions taken since the last call, in order."""
        out, self._actions = self._actions, []
        return out

    def stamp(self, now: float) -> str:
        """The ``ts`` of an event published at ``now`` (the wall clock through
        ``wall_offset``), from the hub's own formatter, which reformats the date only when
        the second changes."""
        return self._stamp(now + self.wall_offset)

    def has_ready(self) -> bool:
        """Whether some client's outbox became non-empty since the last ``take_ready``."""
        return bool(self._ready)

    def take_ready(self) -> list[str]:
        """Drain the ids of clients whose outbox became non-empty (may repeat an id)."""
        out, self._ready = self._ready, []
        return out

    def take_urgent(self) -> list[str]:
        """Drain the ids of clients whose outbox went past ``send_queue_size`` while their
        transport was taking writes (a burst): write to them now rather than at the end of
        the loop iteration, or the burst would make readers look slow. May repeat an id."""
        out, self._urgent = self._urgent, []
        return out

    def take_dropped(self) -> list[str]:
        """Drain the names of the topics dropped since the last call (idle and empty)."""
        return self.topics.take_dropped()

    def next_deadline(self) -> float | None:
        """When ``tick`` should next be called; None when no timer is armed. It may be
        early (a timer since cancelled); a tick then does nothing."""
        timers, topics = self.timers.next_deadline(), self.topics.next_deadline()
        if timers is None:
            return topics
        return timers if topics is None else min(timers, topics)

    def oldest_queued_at(self, conn: Connection) -> float | None:
        """When the oldest event still in the client's outbox was published (``now`` of
        its ``publish``), or None: the adapter's publish-to-write latency, one reading per
        write, with no per-message bookkeeping."""
        for entry in conn.outbox:
            if entry.__class__ is not bytes:
                return entry.at  # type: ignore[union-attr]
        return None

    def drain(self, conn: Connection) -> list[bytes]:
        """Everything queued for the client's writer, in order, with owed gaps in place.

        Call it from the writer only; it returns nothing once the writer has finished.
        """
        q = conn.outbox
        if not q and conn.owed is None:
            return []
        owed = conn.owed
        if owed is None:
            if len(q) == 1:  # the common case of a live fan-out: one event since the last write
                e = q[0]
                out = [e if e.__class__ is bytes else e.frame]  # type: ignore[union-attr]
            else:
                out = [e if e.__class__ is bytes else e.frame for e in q]  # type: ignore[union-attr]
        else:
            out = []
            for e in q:
                if e.__class__ is bytes:
                    out.append(e)
                    continue
                ranges = owed.get(e.topic)  # type: ignore[union-attr]
                if ranges:
                    while ranges and ranges[0][1] < e.seq:  # type: ignore[union-attr]
                        lo, hi = ranges.pop(0)
                        out.append(frames.gap(e.topic, lo, hi, GapReason.SLOW_CONSUMER))  # type: ignore[union-attr]
                out.append(e.frame)  # type: ignore[union-attr]
            for topic, ranges in owed.items():
                for lo, hi in ranges:
                    out.append(frames.gap(topic, lo, hi, GapReason.SLOW_CONSUMER))
            conn.owed = None
        q.clear()
        conn.queued_bytes = 0
        self.stats.sent += len(out)
        return out

    # -- lifecycle inputs ----------------------------------------------------------------

    def connect(self, client_id: str, now: float) -> Connection:
        """A WebSocket upgrade began. Follow with ``accept`` or ``reject``."""
        return Connection(client_id, now)

    def reject(self, conn: Connection, cause: CloseCause, now: float) -> None:
        """Refuse the handshake (auth, origin, limits, shutdown)."""
        self._fire(conn, "reject", now, cause=cause)

    def accept(self, conn: Connection, now: float) -> None:
        """The handshake succeeded: register the client and queue its welcome. Events
        published from now on are queued for it; start the pumps, then call ``start``."""
        if conn.client_id in self.clients:
            raise ValueError(f"client id {conn.client_id!r} is already registered")
        self._fire(conn, "accept", now)
        self.clients[conn.client_id] = conn
        cfg = self.config
        self._queue_control(
            conn,
            {
                "type": "welcome",
                "client_id": conn.client_id,
                "protocol": PROTOCOL_VERSION,
                "ping_interval": cfg.ping_interval,
                "ping_timeout": cfg.ping_timeout,
            },
            now,
        )
        self.publish("clients", {"event": "connected", "client_id": conn.client_id}, now)

    def start(self, conn: Connection, now: float) -> None:
        """The reader and the writer are running: the connection is open."""
        self._fire(conn, "start", now)
        if conn.state is S.OPEN:
            self.timers.opened(conn, now)

    def close(
        self, conn: Connection, cause: CloseCause, now: float, code: int | None = None
    ) -> None:
        """The server closes the connection (policy, auth expiry...). Idempotent."""
        self._fire(conn, "close", now, cause=cause, code=code)

    def reader_done(
        self, conn: Connection, now: float, cause: CloseCause, code: int | None = None
    ) -> None:
        """The reader returned. ``cause`` says why (peer_close with the peer's ``code``,
        read_error, message_too_big...); it is the close cause if none was recorded yet."""
        self._fire(conn, "reader_done", now, cause=cause, code=code)

    def writer_done(self, conn: Connection, now: float, cause: CloseCause | None = None) -> None:
        """The writer returned. From ``open`` this means a write failed (``write_error``)."""
        self._fire(conn, "writer_done", now, cause=cause or CloseCause.WRITE_ERROR, code=None)

    def unregister(self, conn: Connection, now: float) -> None:
        """Leave the registry. Call once both pumps have finished (the handler's
        ``finally``); raises ``MachineError`` while one still runs; a repeat is absorbed."""
        self._fire(conn, "unregister", now)

    def shutdown(self, now: float) -> None:
        """Close every registered client with cause ``shutdown`` (close code 1001)."""
        for conn in list(self.clients.values()):
            self._fire(conn, "close", now, cause=CloseCause.SHUTDOWN)

    # -- traffic inputs ------------------------------------------------------------------

    def pong_received(self, conn: Connection, now: float) -> None:
        """A protocol pong arrived. Unsolicited pongs are ignored (RFC 6455 section 5.5.3)."""
        self.timers.pong(conn, now)

    def written(self, conn: Connection, buffered: int, writable: bool) -> None:
        """The adapter wrote to the client: ``buffered`` bytes still wait in its transport
        (they count against ``max_pending_bytes``), and ``writable`` says whether the
        transport takes more without waiting (below its high-water mark). While it does, a
        burst may take the outbox past ``send_queue_size``: the client is reading, and the
        adapter writes to it at once (``take_urgent``)."""
        conn.buffered = buffered
        conn.writable = writable

    def admit(self, conn: Connection, now: float) -> bool:
        """Call for every inbound message before handling it; False means drop it.

        A token bucket of ``messages_per_second``, holding one second's worth. The first
        message refused after an admitted one is answered with ``rate_limited``; a client
        that keeps sending while refused (``rate_limit_grace`` messages in a row) is closed
        with ``policy`` (1008). Costs no timer: the bucket refills from ``now``."""
        rate = self.config.messages_per_second
        if ratelimit.take(conn, now, rate):
            conn.limited = 0
            return True
        conn.limited += 1
        self.stats.rate_limited += 1
        if conn.limited >= self.config.rate_limit_grace:
            self._fire(conn, "close", now, cause=CloseCause.POLICY)
        elif conn.limited == 1 and conn.accepting:
            self._error(conn, ErrorCode.RATE_LIMITED, f"at most {rate:g} messages per second", now)
        return False

    def bad_input(self, conn: Connection, code: ErrorCode, message: str, now: float) -> None:
        """The peer sent a frame that is not a valid v1 message. ``message`` must be a fixed
        text (never the input or exception text). Repeated abuse closes with ``policy``."""
        if not conn.accepting:
            return
        conn.bad_inputs += 1
        if conn.bad_inputs >= self.config.bad_input_limit:
            self._fire(conn, "close", now, cause=CloseCause.POLICY)
            return
        self._error(conn, code, message, now)

    def subscribe(
        self,
        conn: Connection,
        topics: Iterable[str],
        now: float,
        since: Mapping[str, int | tuple[int, str | None]] | None = None,
    ) -> None:
        """Subscribe; ``since[topic]`` is the last seq the client has (optionally with the
        epoch it was counted in). Queues ``subscribed``, then per topic either the events
        after ``since`` (and a ``gap`` for what history lost) or the retained latest event;
        a ``since`` of another epoch gets an ``epoch_changed`` gap, then the topic's events
        from seq 1 as far as held (after a ``history_evicted`` gap for the rest).

        ``subscribed`` names, per topic, the seq the subscription continues after (``seq``):
        a client that later resumes from it, or from the last seq it received if higher,
        misses nothing unreported. A topic the client already holds is acknowledged
        (recovered, its current position) and nothing of it is queued again, whatever
        ``since`` says: its events already flow, and none reaches a connection twice."""
        if not conn.accepting:
            return
        conn.bad_inputs = 0
        wanted = list(dict.fromkeys(topics))
        if len(conn.topics.union(wanted)) > self.config.max_subscriptions:
            self._error(
                conn,
                ErrorCode.TOO_MANY_TOPICS,
                f"at most {self.config.max_subscriptions} topics per client",
                now,
            )
            return
        if not self.admits_topics(conn, wanted, now):
            return
        since = since or {}
        recovered: dict[str, bool] = {}
        epochs: dict[str, str] = {}
        starts: dict[str, int] = {}
        plans: list[tuple[Topic, list[bytes | Event]]] = []
        for name in wanted:
            topic = self._topic(name)
            epochs[name] = topic.epoch
            if name in conn.topics:
                recovered[name] = True
                starts[name] = self._position(conn, topic)
                continue
            ok, start, entries = topic.resume_plan(
                since.get(name), now, self.config.history_max_age
            )
            recovered[name] = ok
            starts[name] = start
            plans.append((topic, entries))
        self._queue_control(
            conn,
            {
                "type": "subscribed",
                "topics": wanted,
                "recovered": recovered,
                "epoch": epochs,
                "seq": starts,
            },
            now,
        )
        for topic, entries in plans:
            if conn.cause is not None:  # an overflow while queueing began the close
                for left, _ in plans:
                    self.topics.watch(left, now)  # created for nobody: let them age out
                return
            topic.subscribers[conn.client_id] = conn
            if conn.topics.__class__ is not set:
                conn.topics = set(conn.topics)
            conn.topics.add(topic.name)
            for entry in entries:
                self._queue(conn, entry, now)

    def admits_topics(self, conn: Connection, names: Iterable[str], now: float) -> bool:
        """Whether the topics of ``names`` that do not exist yet may be created within
        ``max_topics``; if not, the client is told ``topic_limit`` and nothing changes. A
        subscription through a bus asks this before the bus attaches the topics."""
        topics = self.topics
        missing = sum(1 for n in names if n not in topics and n not in topics.keep)
        if not missing or topics.counted() + missing <= topics.max_topics:
            return True
        topics.refused += 1
        self._error(
            conn, ErrorCode.TOPIC_LIMIT, f"this hub holds at most {topics.max_topics} topics", now
        )
        return False

    def unsubscribe(self, conn: Connection, topics: Iterable[str], now: float) -> None:
        """Stop events of ``topics``; events of them still queued are withdrawn."""
        if not conn.accepting:
            return
        conn.bad_inputs = 0
        gone = conn.topics.intersection(topics)
        for name in gone:
            topic = self.topics[name]
            del topic.subscribers[conn.client_id]
            if not topic.subscribers:
                self.topics.watch(topic, now)
            if conn.owed:
                conn.owed.pop(name, None)
        conn.topics -= gone
        if gone and conn.outbox:
            conn.outbox[:] = [
                e
                for e in conn.outbox
                if e.__class__ is bytes or e.topic not in gone  # type: ignore[union-attr]
            ]
            conn.queued_bytes = sum(map(_size, conn.outbox))

    def app_ping(self, conn: Connection, ping_id: str | None, now: float) -> None:
        """The application-level ``ping`` (browsers cannot send protocol pings); the
        ``pong`` echoes its ``id`` when it had one."""
        if not conn.accepting:
            return
        conn.bad_inputs = 0
        pong = {"type": "pong", "id": ping_id} if ping_id is not None else {"type": "pong"}
        self._queue_control(conn, pong, now)

    def client_publish(self, conn: Connection, topic: str, data: Any, now: float) -> int | None:
        """A client's ``publish`` message; returns the seq, or None when refused."""
        if not self.may_publish(conn, topic, now) or not self.admits_topics(conn, (topic,), now):
            return None
        return self.publish(topic, data, now)

    def may_publish(self, conn: Connection, topic: str, now: float) -> bool:
        """Whether a client's ``publish`` on ``topic`` is accepted (an ``error`` is queued
        when it is refused). ``client_publish`` is this plus ``publish``; an adapter whose
        bus sequences the topic calls this, then publishes on the bus."""
        if not conn.accepting:
            return False
        conn.bad_inputs = 0
        if not self.config.client_publish or topic in self.config.reserved_topics:
            self._error(conn, ErrorCode.FORBIDDEN, "publishing to this topic is not allowed", now)
            return False
        return True

    # -- publishing ----------------------------------------------------------------------

    def publish(
        self,
        topic_name: str,
        data: Any,
        now: float,
        *,
        stale: bool = False,
        age: float | None = None,
    ) -> int:
        """Publish an event to every subscriber of the topic; returns its seq.

        ``data`` must be JSON-serializable (``TypeError`` otherwise, before anything
        changes); a ``stale`` value carries its ``age`` and only it does (``ValueError``
        otherwise: the protocol says so). Raises `TopicLimit` when the topic does not exist
        and ``max_topics`` do. Never waits: a full outbox is handled by the topic's overflow
        policy."""
        if stale != (age is not None):
            raise ValueError("a stale event carries its age, and only a stale one does")
        body = frames.dumps(data).decode()
        topic = self._topic(topic_name)
        seq = topic.seq + 1
        frame = frames.event(topic_name, seq, self.stamp(now), body, stale, age)
        self._emit(topic, seq, frame, now)
        return seq

    def deliver(
        self,
        topic_name: str,
        seq: int,
        body: bytes,
        ts: str,
        now: float,
        tail: bytes = frames.EVENT_TAIL,
    ) -> bool:
        """An event sequenced elsewhere (the bus): ``body`` is its data, already JSON, ``ts``
        its publisher's stamp and ``tail`` the end of its frame (``frames.event_tail``: a
        source's stale value travels with its flag and age). Returns False for a duplicate
        (``seq`` not above the topic's), which changes nothing. An event beyond the next seq
        first owes every subscriber a ``bus_outage`` gap for the hole (``rebase``)."""
        topic = self._topic(topic_name)
        if seq <= topic.seq:
            self.stats.duplicates += 1
            return False
        if seq > topic.seq + 1:
            self.rebase(topic_name, seq - 1, now)
        head = frames.event_head(topic_name, seq, ts)
        self._emit(topic, seq, head + body + tail, now)
        return True

    def rebase(self, topic_name: str, seq: int, now: float, *, epoch: str | None = None) -> None:
        """The topic's sequence moved on to ``seq`` without this node (a bus outage, or the
        reconciliation after one). Subscribers are owed a ``bus_outage`` gap for what they
        did not get; with another ``epoch`` they are told ``epoch_changed`` instead and the
        count starts again from ``seq``. The history no longer matches the new count, so it
        is dropped: a resume from before the rebase gets ``history_evicted``."""
        topic = self._topic(topic_name)
        if epoch is not None and epoch != topic.epoch:
            gap = frames.gap(topic_name, None, None, GapReason.EPOCH_CHANGED)
            topic.epoch = epoch
            topic.retained = None
            if topic.subscribers:
                self.stats.epoch_changes += 1
        elif seq > topic.seq:
            gap = frames.gap(topic_name, topic.seq + 1, seq, GapReason.BUS_OUTAGE)
        else:
            return
        topic.seq = seq
        topic.history.clear()
        for conn in list(topic.subscribers.values()):
            if conn.owed:
                # Owing a gap means a full outbox, so this gap closes the client as a slow
                # consumer (``_queue``): the older losses need not be reported after it.
                conn.owed.pop(topic_name, None)
            self._queue(conn, gap, now)

    def attach(
        self,
        topic_name: str,
        epoch: str,
        seq: int,
        events: Iterable[tuple[int, bytes, str, bytes]],
        now: float,
    ) -> None:
        """Take a topic's state from the bus: its ``epoch``, its last ``seq`` and the tail
        of its stream as ``(seq, body, ts, tail)`` (``deliver``), oldest first. Events this
        node already has are skipped (no duplicate); subscribers get the rest, after a gap
        for any hole."""
        if epoch != self._topic(topic_name).epoch:
            self.rebase(topic_name, 0, now, epoch=epoch)
        for event_seq, body, ts, tail in events:
            self.deliver(topic_name, event_seq, body, ts, now, tail)
        self.rebase(topic_name, seq, now)

    def _emit(self, topic: Topic, seq: int, frame: bytes, now: float) -> None:
        """Append one sequenced event to the topic's history and every subscriber's outbox."""
        event = Event(topic.name, seq, now, frame)
        topic.append(event, self.config.history_max_age)
        topics = self.topics
        topics.watch(topic, now)
        topics.touched(topic.name)
        self.stats.published += 1

        cfg = self.config
        limit = cfg.send_queue_size
        budget = cfg.max_pending_bytes - len(frame)
        ready = self._ready
        closing = 0
        for conn in topic.subscribers.values():
            if not conn.accepting:
                closing += 1
                continue
            q = conn.outbox
            n = len(q)
            if n < limit and conn.queued_bytes + conn.buffered <= budget:
                q.append(event)
                conn.queued_bytes += len(frame)
                if not n:
                    ready.append(conn.client_id)
            else:
                self._overflow(conn, topic, event, now)
        if closing:
            self.stats.dropped["closing"] += closing

    # -- time ----------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Fire every timer due at ``now``: pings, pong deadlines, close timeouts, and the
        topics' aging (history and retained values past ``history_max_age``, idle empty
        topics dropped)."""
        self.topics.sweep(now)
        for kind, conn in self.timers.due(now, self.clients):
            if kind == PING:
                self._actions.append(Ping(conn.client_id))
                self.stats.pings += 1
            elif kind == CLOSE:
                self._actions.append(Abort(conn.client_id))
                self.stats.aborts += 1
            else:
                self._fire(conn, "close", now, cause=CloseCause.KEEPALIVE_TIMEOUT)

    def loop_stalled(self, now: float, duration: float) -> None:
        """The adapter's event loop was blocked for ``duration`` seconds, ending at ``now``.

        Pong deadlines still pending when the stall began are extended by ``duration``.
        Report a stall before the ``tick`` that follows it."""
        if not duration > 0:
            return
        self.stats.loop_stalls += 1
        self.stats.loop_stall_seconds += duration
        self.stats.stall_extensions += self.timers.stalled(self.clients.values(), now, duration)

    # -- internals -----------------------------------------------------------------------

    def _fire(self, conn: Connection, trigger: str, now: float, **kwargs: Any) -> None:
        before = conn.state
        self.lifecycle.fire(conn, trigger, now=now, out=self._actions, **kwargs)
        after = conn.state
        if after is before:
            return
        if after in CLOSING_STATES and before not in CLOSING_STATES:
            self.timers.closing(conn, now)
        if not PUMPS[after][1] and (conn.outbox or conn.owed):
            # The writer is gone: what it never wrote is lost, and counted.
            self.stats.dropped["closed"] += len(conn.outbox)
            conn.outbox.clear()
            conn.queued_bytes = 0
            conn.owed = None
        if after is S.UNREGISTERED and self.clients.get(conn.client_id) is conn:
            del self.clients[conn.client_id]
            for name in conn.topics:
                topic = self.topics[name]
                topic.subscribers.pop(conn.client_id, None)
                if not topic.subscribers:
                    self.topics.watch(topic, now)
            cause = conn.cause.value if conn.cause else None
            self.stats.disconnects[cause or "unknown"] += 1
            self.publish(
                "clients",
                {
                    "event": "disconnected",
                    "client_id": conn.client_id,
                    "cause": cause,
                    "code": conn.close_code,
                    "duration": round(now - conn.opened_at, 6),
                },
                now,
            )

    @staticmethod
    def _position(conn: Connection, topic: Topic) -> int:
        """Where a topic the client holds stands for it once a frame queued now is read:
        every event queued before that frame has been read too, so the topic's newest seq;
        but events dropped from a full outbox are owed as a gap that may come after the
        frame, so then the seq before the first of them."""
        owed = conn.owed.get(topic.name) if conn.owed else None
        return owed[0][0] - 1 if owed else topic.seq

    def _topic(self, name: str) -> Topic:
        """The topic, created if need be (`TopicLimit` past ``max_topics``)."""
        topic = self.topics.get(name)
        if topic is None:
            topic = self.topics.create(name)
        return topic

    def _error(self, conn: Connection, code: ErrorCode, message: str, now: float) -> None:
        self.stats.errors[code.value] += 1
        self._queue_control(conn, {"type": "error", "code": code.value, "message": message}, now)

    def _queue_control(self, conn: Connection, msg: dict[str, Any], now: float) -> None:
        self._queue(conn, frames.control(msg), now)

    def _queue(self, conn: Connection, entry: bytes | Event, now: float) -> None:
        """Queue one entry for a client outside the publish loop (control frames, replay)."""
        if not conn.accepting:
            self.stats.dropped["closing"] += 1
            return
        q = conn.outbox
        n = len(q)
        size = _size(entry)
        cfg = self.config
        if n < cfg.send_queue_size and conn.queued_bytes + conn.buffered + size <= (
            cfg.max_pending_bytes
        ):
            q.append(entry)
            conn.queued_bytes += size
            if not n:
                self._ready.append(conn.client_id)
        elif self._takes_burst(conn, size):
            q.append(entry)
            conn.queued_bytes += size
        elif entry.__class__ is bytes:
            # A client that will not read its own replies is a slow consumer.
            self.stats.dropped["slow_consumer"] += 1
            self._fire(conn, "close", now, cause=CloseCause.SLOW_CONSUMER)
        else:
            topic = self.topics[entry.topic]  # type: ignore[union-attr]
            self._overflow(conn, topic, entry, now)  # type: ignore[arg-type]

    def _takes_burst(self, conn: Connection, size: int) -> bool:
        """Past ``send_queue_size``, whether the client still takes ``size`` more bytes: it
        does while its transport takes writes and it is within ``max_pending_bytes``, so a
        burst arriving at once spares a client that reads (the adapter writes at once)."""
        if conn.writable and conn.queued_bytes + conn.buffered + size <= (
            self.config.max_pending_bytes
        ):
            self._urgent.append(conn.client_id)
            return True
        return False

    def _overflow(self, conn: Connection, topic: Topic, event: Event, now: float) -> None:
        """The outbox is full (by count or by bytes): a burst to a reading client is taken;
        otherwise the topic's policy applies. Lossy policies owe a ``gap``."""
        size = len(event.frame)
        if self._takes_burst(conn, size):
            conn.outbox.append(event)
            conn.queued_bytes += size
            return
        policy = topic.policy
        self.stats.dropped["slow_consumer"] += 1
        if policy is OverflowPolicy.DISCONNECT:
            self._fire(conn, "close", now, cause=CloseCause.SLOW_CONSUMER)
            return
        q = conn.outbox
        budget = self.config.max_pending_bytes - conn.buffered - size
        limit = self.config.send_queue_size
        keep_latest = topic.name if policy is OverflowPolicy.KEEP_LATEST else None
        while len(q) >= limit or conn.queued_bytes > budget:
            victim = self._victim(q, keep_latest)
            if victim is None:
                # Only control frames queued: the new event itself is the loss.
                self._owe(conn, event.topic, event.seq)
                return
            q.remove(victim)
            conn.queued_bytes -= len(victim.frame)
            self._owe(conn, victim.topic, victim.seq)
        q.append(event)
        conn.queued_bytes += size

    @staticmethod
    def _victim(q: list[Event | bytes], topic: str | None) -> Event | None:
        """The event to drop from a full outbox: the oldest of ``topic`` when given
        (``keep_latest``), else the oldest event."""
        if topic is not None:
            for e in q:
                if e.__class__ is not bytes and e.topic == topic:  # type: ignore[union-attr]
                    return e  # type: ignore[return-value]
        for e in q:
            if e.__class__ is not bytes:
                return e  # type: ignore[return-value]
        return None

    def _owe(self, conn: Connection, topic: str, seq: int) -> None:
        if conn.owed is None:
            conn.owed = {}
        ranges = conn.owed.setdefault(topic, [])
        for r in ranges:
            if r[1] + 1 == seq:
                r[1] = seq
                break
        else:
            ranges.append([seq, seq])
            ranges.sort()
