"""A reconnecting subscriber for protocol v1: events in order, exactly once, or a typed gap.

Paste-able example (a hub from ``wirestate serve`` on the default port)::

    import asyncio

    from wirestate.adapters.client.subscriber import Backoff, Event, Gap, connect


    async def main() -> None:
        backoff = Backoff(base=0.1, cap=5.0, attempts=None)  # None: retry forever
        async with connect("ws://127.0.0.1:12080/ws", topics=["orders"], backoff=backoff) as sub:
            async for item in sub:
                match item:
                    case Event(topic=topic, seq=seq, data=data):
                        print(topic, seq, data)
                    case Gap(topic=topic, from_seq=None, reason=reason):
                        print(f"{topic}: the sequence restarted ({reason}); resync from a snapshot")
                    case Gap(topic=topic, from_seq=lo, to_seq=hi, reason=reason):
                        print(f"{topic}: events {lo}..{hi} are lost ({reason})")


    asyncio.run(main())

Contract:

- ``async with connect(...)`` returns once the first connection is subscribed (``welcome``
  then ``subscribed``), retrying with `Backoff`; it raises `ConnectionLost` after
  ``backoff.attempts`` consecutive failed attempts and `SubscriptionRefused` when the server
  answers the subscription with ``forbidden`` or ``too_many_topics`` (not retried).
- Iterating yields `Event` and `Gap` values, per topic in sequence order: every event once, or
  a `Gap` that names what will not come (``to_seq`` inclusive; no range for
  ``epoch_changed``). Events with ``seq <= last_seq`` of the same epoch are dropped (a
  defensive check: the server's resume does not send them). `last_seq` and `epochs` say what
  the application has been given.
- A dropped connection is re-established behind the iterator: after a connection that reached
  ``welcome`` the attempt count restarts at 0, each failed attempt waits
  ``Backoff.delay(attempt, rng)`` (full jitter). The new subscription carries
  ``since = {topic: {"seq": max(position, last_seq), "epoch": epoch}}`` for every topic,
  where `positions` holds where the last ``subscribed`` said the subscription took effect:
  the server replays what was missed or sends the gap, also for a topic that has delivered
  nothing yet (subscribed, cut, events published meanwhile: they all arrive). When the
  topic's epoch changed, the server's ``epoch_changed`` gap is yielded and only then is the
  new epoch adopted (its ``last_seq`` and position forgotten, the new numbering following
  from its start): a connection cut between ``subscribed`` and that gap resumes in the old
  epoch, and the server says so again.
- Dead-server detection: an application ``ping`` every ``ping_interval``; when no frame at all
  arrives within ``ping_interval + ping_timeout`` (the server's values from ``welcome``
  unless given), the connection is dropped (TCP abort: a dead peer will not answer a close
  frame) and re-established.
- One task, no other: the connection is read, pinged and re-established by whichever task
  awaits the iterator, so the window above is measured while the application is waiting for
  the next item, never against time it spent handling the previous one. Cancelling that task
  or leaving the ``async with`` closes the websocket with 1000 (bounded by
  ``close_timeout``); `asyncio.CancelledError` propagates.

A server from before ``subscribed`` carried ``seq`` names no position: a topic that has
delivered nothing yet is then resubscribed without ``since`` and starts again from the
server's retained latest event, so events published while the connection was down can be
missed without a gap. Every wirestate server sends it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self, TypeAlias

from pydantic import JsonValue
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.uri import parse_uri

from wirestate.adapters.client.urls import safe_url
from wirestate.core.causes import CloseCode, ErrorCode, GapReason
from wirestate.models import wire

__all__ = [
    "Backoff",
    "ConnectionLost",
    "Event",
    "Gap",
    "Item",
    "Subscription",
    "SubscriptionError",
    "SubscriptionRefused",
    "connect",
]

log = logging.getLogger(__name__)

#: Close code for a server that broke protocol v1 (RFC 6455 section 7.4.1).
_PROTOCOL_ERROR = 1002

#: Server error codes that mean the subscription itself will never be accepted.
_REFUSALS = frozenset({ErrorCode.FORBIDDEN, ErrorCode.TOO_MANY_TOPICS})


@dataclass(frozen=True, slots=True)
class Event:
    """One event of `topic`. `stale` events carry a source's cached value, `age` seconds old."""

    topic: str
    seq: int
    ts: str
    data: JsonValue
    stale: bool = False
    age: float | None = None


@dataclass(frozen=True, slots=True)
class Gap:
    """Events `from_seq`..`to_seq` (inclusive) of `topic` will not be delivered, because of
    `reason`. For ``epoch_changed`` both bounds are None: the topic's sequence restarted."""

    topic: str
    from_seq: int | None
    to_seq: int | None
    reason: GapReason


Item: TypeAlias = Event | Gap


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect policy: exponential backoff with full jitter.

    The wait before attempt ``n`` (0 right after a working connection dropped, then 1, 2, …
    for each failed attempt in a row) is uniform in ``[0, min(cap, base * 2**n)]``.
    `attempts` None retries forever; otherwise `ConnectionLost` is raised after that many
    consecutive failed attempts.
    """

    base: float = 0.1
    cap: float = 5.0
    attempts: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.base) and self.base > 0):
            raise ValueError("base must be a positive, finite number of seconds")
        if not (math.isfinite(self.cap) and self.cap >= self.base):
            raise ValueError("cap must be finite and at least base")
        if self.attempts is not None and self.attempts < 1:
            raise ValueError("attempts must be None (forever) or at least 1")

    def ceiling(self, attempt: int) -> float:
        """The longest wait before attempt number `attempt` (>= 0)."""
        if attempt < 0:
            raise ValueError("attempt must be >= 0")
        # ldexp(base, n) is base * 2**n; the exponent is clamped so it cannot overflow.
        return min(self.cap, math.ldexp(self.base, min(attempt, 1000)))

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """Full jitter: ``rng() * ceiling(attempt)``; `rng` returns a float in [0, 1)."""
        return rng() * self.ceiling(attempt)


class SubscriptionError(Exception):
    """Base of the errors the subscriber raises on its own account."""


class ConnectionLost(SubscriptionError):
    """`attempts` connection attempts in a row failed; `cause` names the last failure
    (``refused``, ``timeout``, ``handshake``, ``http_503``, ``closed``, ``protocol_error``…)."""

    def __init__(self, url: str, attempts: int, cause: str) -> None:
        super().__init__(f"no connection to {url} after {attempts} attempts (last: {cause})")
        self.url = url
        self.attempts = attempts
        self.cause = cause


class SubscriptionRefused(SubscriptionError):
    """The server refused the subscription (``forbidden``, ``too_many_topics``); retrying
    would not help. `message` is the server's fixed text."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"the server refused the subscription: {code.value}")
        self.code = code
        self.message = message


class _ProtocolError(Exception):
    """The server sent something protocol v1 does not allow; the connection is dropped."""


def _cause(exc: BaseException) -> str:
    """A short word for a failed attempt (logs and `ConnectionLost`): never exception text."""
    if isinstance(exc, _ProtocolError):
        return "protocol_error"
    if isinstance(exc, ConnectionClosed):
        return "closed"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, InvalidStatus):
        return f"http_{exc.response.status_code}"
    if isinstance(exc, InvalidHandshake):
        return "handshake"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    return "os_error"


_RETRYABLE = (OSError, TimeoutError, InvalidHandshake, ConnectionClosed, _ProtocolError)


class Subscription:
    """A subscription that survives reconnects; see the module docstring. Made by `connect`;
    entered once with ``async with``; iterate it inside. Not usable after the block."""

    def __init__(
        self,
        url: str,
        topics: Sequence[str],
        *,
        backoff: Backoff,
        rng: Callable[[], float],
        open_timeout: float,
        close_timeout: float,
        ping_interval: float | None,
        ping_timeout: float | None,
    ) -> None:
        if isinstance(topics, str):
            raise TypeError("topics is a list of topic names, not one string")
        parse_uri(url)  # raises InvalidURI: caller misuse, not a connection failure
        self._subscribe = wire.Subscribe(topics=tuple(dict.fromkeys(topics)))  # validates names
        for name, value in (("open_timeout", open_timeout), ("close_timeout", close_timeout)):
            if not value > 0:
                raise ValueError(f"{name} must be positive")
        self.url = url
        self.topics: tuple[str, ...] = self._subscribe.topics
        self._backoff = backoff
        self._rng = rng
        self._open_timeout = open_timeout
        self._close_timeout = close_timeout
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        #: The last seq given to the application, per topic.
        self.last_seq: dict[str, int] = {}
        #: The epoch each topic's `last_seq` is counted in (from ``subscribed``, or for a
        #: resume moved to another epoch from the ``epoch_changed`` gap that follows it).
        self.epochs: dict[str, str] = {}
        #: Topics whose last ``subscribed`` moved them to another epoch, not yet adopted:
        #: the epoch and position their ``epoch_changed`` gap brings in.
        self._moving: dict[str, tuple[str, int | None]] = {}
        #: Where each topic's subscription took effect, in `epochs` (the last ``subscribed``'s
        #: ``seq``): a resume starts from the higher of it and `last_seq`.
        self.positions: dict[str, int] = {}
        #: Connections that reached ``welcome`` so far (1 after the first connect).
        self.connections = 0
        #: Frames dropped as already delivered (seq or gap range at or below `last_seq`).
        self.duplicates = 0
        self.client_id: str | None = None
        self._ws: ClientConnection | None = None
        #: The close code of the connection open when the ``async with`` was left (1000 from
        #: this side, unless the server's close crossed it); None when none was open.
        self.closed_with: int | None = None
        self._failures = 0  # consecutive failed attempts since the last welcome
        self._interval = 0.0
        self._timeout = 0.0
        self._heard_at = 0.0
        self._next_ping = 0.0
        self._pings = 0
        self._entered = False
        self._exited = False

    # -- async context manager and iterator --------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("a Subscription is entered only once")
        self._entered = True
        await self._establish()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exited = True
        ws, self._ws = self._ws, None
        if ws is not None:
            # Idempotent; websockets bounds it by close_timeout, then drops TCP.
            await ws.close(CloseCode.NORMAL)
            self.closed_with = ws.close_code

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Item:
        if not self._entered:
            raise RuntimeError("use `async with connect(...) as sub` before iterating")
        if self._exited:
            raise StopAsyncIteration
        while True:
            ws = self._ws
            if ws is None:
                # The connection that dropped had reached welcome: attempt 0.
                await asyncio.sleep(self._backoff.delay(0, self._rng))
                await self._establish()
                continue
            item = await self._receive(ws)
            if item is not None:
                return item

    # -- connecting ---------------------------------------------------------------------------

    async def _establish(self) -> None:
        """Until a connection is subscribed. Raises ConnectionLost after `attempts` failed
        attempts in a row, SubscriptionRefused as soon as the server refuses."""
        while True:
            try:
                self._ws = await self._open()
                return
            except _RETRYABLE as exc:
                cause = _cause(exc)
                self._failures += 1
                attempts = self._backoff.attempts
                if attempts is not None and self._failures >= attempts:
                    log.warning(
                        "subscriber_gave_up",
                        extra={
                            "url": safe_url(self.url),
                            "attempts": self._failures,
                            "cause": cause,
                        },
                    )
                    raise ConnectionLost(safe_url(self.url), self._failures, cause) from exc
                delay = self._backoff.delay(self._failures, self._rng)
                log.info(
                    "subscriber_retry",
                    extra={"attempt": self._failures, "cause": cause, "retry_in": round(delay, 3)},
                )
            await asyncio.sleep(delay)

    async def _open(self) -> ClientConnection:
        """One attempt: handshake, ``welcome``, ``subscribe`` (with ``since``), ``subscribed``.
        Closes what it opened on every failure, cancellation included."""
        ws = await ws_connect(
            self.url,
            compression=None,
            ping_interval=None,  # dead-server detection is the application ping below
            open_timeout=self._open_timeout,
            close_timeout=self._close_timeout,
        )
        code: int = CloseCode.NORMAL
        try:
            async with asyncio.timeout(self._open_timeout):
                welcome = self._parse(await ws.recv())
                if not isinstance(welcome, wire.Welcome):
                    raise _ProtocolError
                self._failures = 0
                self.connections += 1
                self.client_id = welcome.client_id
                self._interval = self._ping_interval or welcome.ping_interval
                self._timeout = self._ping_timeout or welcome.ping_timeout
                await ws.send(self._subscribe_frame())
                while True:
                    msg = self._parse(await ws.recv())
                    if isinstance(msg, wire.Subscribed):
                        self._on_subscribed(msg)
                        break
                    if isinstance(msg, wire.ErrorMessage):
                        if msg.code in _REFUSALS:
                            raise SubscriptionRefused(msg.code, msg.message)
                        log.warning("subscriber_server_error", extra={"code": msg.code.value})
                    elif not isinstance(msg, wire.Pong):
                        raise _ProtocolError
        except BaseException as exc:
            if isinstance(exc, _ProtocolError):
                code = _PROTOCOL_ERROR
            await ws.close(code)
            raise
        now = asyncio.get_running_loop().time()
        self._heard_at = now
        self._next_ping = now + self._interval
        log.info(
            "subscriber_connected",
            extra={"client_id": self.client_id, "connection": self.connections},
        )
        return ws

    def _subscribe_frame(self) -> str:
        since = {}
        for topic in self.topics:
            epoch = self.epochs.get(topic)
            known = [d[topic] for d in (self.last_seq, self.positions) if topic in d]
            if epoch is not None and known:
                since[topic] = wire.SinceCursor(seq=max(known), epoch=epoch)
        return wire.Subscribe(topics=self.topics, since=since or None).model_dump_json()

    # -- the live connection ------------------------------------------------------------------

    async def _receive(self, ws: ClientConnection) -> Item | None:
        """The next item from `ws`, or None once it has been dropped (then ``self._ws`` is
        None). Pings when due; drops the connection when nothing was heard in the window."""
        loop = asyncio.get_running_loop()
        listening_since = loop.time()
        window = self._interval + self._timeout
        while True:
            now = loop.time()
            dead_at = max(self._heard_at, listening_since) + window
            if now >= dead_at:
                await self._drop(ws, "keepalive_timeout")
                return None
            try:
                if now >= self._next_ping:
                    self._next_ping = now + self._interval
                    self._pings += 1
                    async with asyncio.timeout_at(dead_at):
                        await ws.send(wire.Ping(id=str(self._pings)).model_dump_json())
                async with asyncio.timeout_at(min(dead_at, self._next_ping)):
                    raw = await ws.recv()
            except TimeoutError:
                continue  # a ping is due or the window is over: the top of the loop decides
            except ConnectionClosed:
                await self._drop(ws, "closed")
                return None
            self._heard_at = loop.time()
            try:
                item = self._accept(raw)
            except _ProtocolError:
                await self._drop(ws, "protocol_error")
                return None
            if item is not None:
                return item

    async def _drop(self, ws: ClientConnection, cause: str) -> None:
        self._ws = None
        log.info("subscriber_disconnected", extra={"client_id": self.client_id, "cause": cause})
        if cause == "keepalive_timeout":
            # A dead peer will not answer a close frame: don't wait close_timeout for it.
            ws.transport.abort()
        elif cause == "protocol_error":
            await ws.close(_PROTOCOL_ERROR)

    def _parse(self, raw: str | bytes) -> wire.ServerMessage:
        if isinstance(raw, bytes):
            raise _ProtocolError
        msg = wire.parse_server_message(raw)
        if isinstance(msg, wire.WireError):
            raise _ProtocolError
        return msg

    def _accept(self, raw: str | bytes) -> Item | None:
        """What one frame of the live connection gives the application, if anything."""
        msg = self._parse(raw)
        match msg:
            case wire.Event():
                return self._on_event(msg)
            case wire.Gap():
                return self._on_gap(msg)
            case wire.Subscribed():
                self._on_subscribed(msg)
            case wire.ErrorMessage():
                log.warning("subscriber_server_error", extra={"code": msg.code.value})
            case wire.Welcome():
                raise _ProtocolError
        return None

    def _on_subscribed(self, msg: wire.Subscribed) -> None:
        for topic, epoch in msg.epoch.items():
            if topic not in self.topics:
                continue
            old = self.epochs.get(topic)
            position = msg.seq.get(topic)
            if old is not None and old != epoch and not msg.recovered.get(topic, True):
                # The epoch_changed gap that follows moves the topic: until it arrives the
                # application still counts in the old epoch, and a resume says so.
                self._moving[topic] = (epoch, position)
                continue
            self._moving.pop(topic, None)
            self._adopt(topic, epoch, position)

    def _adopt(self, topic: str, epoch: str, position: int | None) -> None:
        if self.epochs.get(topic, epoch) != epoch:
            # Another sequence space: the old last_seq means nothing in it.
            self.last_seq.pop(topic, None)
            self.positions.pop(topic, None)
        self.epochs[topic] = epoch
        if position is not None:
            self.positions[topic] = position

    def _on_event(self, msg: wire.Event) -> Event | None:
        if msg.topic not in self.topics:
            return None
        last = self.last_seq.get(msg.topic)
        if last is not None and msg.seq <= last:
            self.duplicates += 1
            return None
        if last is not None and msg.seq != last + 1:
            # A hole the server did not announce: a protocol violation, surfaced in the log.
            log.warning(
                "subscriber_seq_jump",
                extra={"topic": msg.topic, "expected": last + 1, "got": msg.seq},
            )
        self.last_seq[msg.topic] = msg.seq
        return Event(msg.topic, msg.seq, msg.ts, msg.data, msg.stale, msg.age)

    def _on_gap(self, msg: wire.Gap) -> Gap | None:
        if msg.topic not in self.topics:
            return None
        if msg.from_seq is None or msg.to_seq is None:  # epoch_changed: no range
            moving = self._moving.pop(msg.topic, None)
            if moving is not None:
                self._adopt(msg.topic, *moving)
            self.last_seq.pop(msg.topic, None)
            return Gap(msg.topic, None, None, msg.reason)
        last = self.last_seq.get(msg.topic)
        if last is not None and msg.to_seq <= last:
            self.duplicates += 1
            return None
        lo = msg.from_seq if last is None else max(msg.from_seq, last + 1)
        self.last_seq[msg.topic] = msg.to_seq
        return Gap(msg.topic, lo, msg.to_seq, msg.reason)


def connect(
    url: str,
    topics: Sequence[str],
    *,
    backoff: Backoff | None = None,
    rng: Callable[[], float] = random.random,
    open_timeout: float = 10.0,
    close_timeout: float = 2.0,
    ping_interval: float | None = None,
    ping_timeout: float | None = None,
) -> Subscription:
    """A `Subscription` to `topics` at `url` (``ws://host:port/ws``), to enter with
    ``async with``; nothing is connected before that.

    `backoff` defaults to ``Backoff()`` (0.1 s base, 5 s cap, forever); `rng` is the jitter's
    source of floats in [0, 1). `open_timeout` bounds the opening handshake and, separately,
    the wait for ``welcome`` and ``subscribed``. `ping_interval` and `ping_timeout` override
    the server's values from ``welcome``. Raises ValueError (or pydantic's ValidationError, a
    ValueError) for a bad topic name or timeout, and websockets' InvalidURI for a bad URL.
    """
    return Subscription(
        url,
        topics,
        backoff=backoff if backoff is not None else Backoff(),
        rng=rng,
        open_timeout=open_timeout,
        close_timeout=close_timeout,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
    )
