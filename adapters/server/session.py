"""One connection's session, written once for every transport.

A `Session` runs one accepted WebSocket connection from registration to unregistration:
first-message auth and its deadline, a reader (inbound frames to the core), a writer (the
outbox to the socket, pings, the close), message handling (claims, the bus), and release.
It talks to its connection only through a `Transport`: the websockets transport and the ASGI
transport each implement that small interface and nothing else.

Rules of this module:

* ``run`` is the whole life of a connection, in the task the transport gave it. The reader
  runs in that task and the writer in one task of its own, joined as a task group of two
  (`join`): an error or a cancellation of either side ends the other, and ``run`` returns
  only once both have ended. Each pump reports its own end to the core from its
  ``finally``; the ``finally`` of ``run`` is the one place that unregisters, after `join`
  returned, so both pumps have finished (lifecycle invariant 1).
* Registration re-checks shutdown: a connection whose upgrade was decided just before
  `WirestateServer.stop` began is closed with 1001 and never registered.
* Every input goes to the core with the service's clock; after each, the service performs
  what the core decided (``dispatch``). The session decides no policy.
* The writer is the only code that writes to the connection outside the service's
  coalesced flush, which writes for it only while it is parked with nothing in flight
  (``idle``): one writer per socket at any moment. Every wait in it is bounded by the close
  timeout: a peer that stopped reading is cut off as a slow consumer.
* Peer input never raises out of the reader: a bad frame becomes ``bad_input`` with a fixed
  message; exception text never reaches the wire or the logs.
* A transport may hand a complete text frame over as it parses it (``inline``), while the
  reader waits with nothing queued and no subscription is attaching: the message is then
  handled there, exactly as the reader would, without waking the reader's task. Anything
  else (a frame while the reader is busy, during first-message auth, text that is not
  UTF-8) goes the reader's way, so messages keep their order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, Protocol

from wirestate.adapters.server.auth import OPEN, AuthError, Grants
from wirestate.core.actions import Close
from wirestate.core.causes import CloseCause, ErrorCode
from wirestate.core.connection import Connection
from wirestate.core.lifecycle import ConnState
from wirestate.models import wire

if TYPE_CHECKING:
    from wirestate.adapters.server.service import WirestateServer

__all__ = ["Ended", "Session", "Transport", "join"]

log = logging.getLogger("wirestate.server")

#: Grants of a connection that has not authenticated yet: nothing allowed.
NOTHING: Final = Grants(sub="", expires_at=None)
BINARY_MESSAGE: Final = "binary frames are not supported; send JSON text frames"


class Ended(Exception):
    """The connection has ended: raised by a transport's ``receive`` (with why, for the
    reader's report) and by its ``send`` (a write on a closed connection)."""

    def __init__(self, cause: CloseCause = CloseCause.WRITE_ERROR, code: int | None = None):
        super().__init__(cause.value)
        self.cause = cause
        self.code = code


class Transport(Protocol):
    """What a session needs of its connection. Only its session calls it, from the
    session's own tasks; every method but ``receive`` returns or raises promptly or is
    bounded by the caller."""

    #: The transport watches the peer itself (an ASGI server's keep-alive): the session
    #: answers the core's pings in its writer's turn instead of sending a protocol ping.
    keeps_alive: bool
    #: The transport refuses frames over ``[limits] max_message_size`` itself.
    limits_size: bool

    def peer(self) -> tuple[str, int] | None:
        """The peer's address, when known."""

    async def receive(self) -> str | bytes:
        """The next message; raises `Ended` with the cause and code once the connection
        ended (peer close, read error, a frame over the limit...)."""

    def ready(self) -> bool:
        """Whether ``write`` may be called now: open, and nothing to wait for."""

    def write(self, frames: list[bytes]) -> None:
        """Write ``frames`` at once, without waiting; only after ``ready()``."""

    def writable(self) -> bool:
        """Whether the connection takes more without waiting (below its high-water mark)."""

    def buffered(self) -> int:
        """Bytes written and not yet taken by the peer's side, as far as the transport knows."""

    async def drain(self) -> None:
        """Wait until the connection takes writes again (``writable()``); raises `Ended` when
        it is closed. The caller bounds the wait."""

    async def send(self, frames: list[bytes]) -> None:
        """Write ``frames``; raises `Ended` when the connection is closed. It may wait for
        the peer only where the transport cannot do otherwise (ASGI's ``send``)."""

    async def ping(self) -> Awaitable[object]:
        """Send a protocol ping; the awaitable it returns completes when its pong arrives."""

    def ping_now(self, answered: Callable[[], None]) -> bool:
        """Write a protocol ping at once, without waiting, and call ``answered`` when its
        pong arrives; False when it cannot be written so (the writer then uses ``ping``)."""

    async def close(self, code: int, reason: str) -> None:
        """The closing handshake, bounded by the transport."""

    def abort(self) -> bool:
        """Drop the connection now. True when this also ends a pending ``receive``."""


async def join(reader: Coroutine[Any, Any, None], writer: asyncio.Task[None]) -> None:
    """Run the reader here, then wait for the writer: a task group of two, without a
    ``TaskGroup``'s memory (0.37 KiB per idle connection). An error or a cancellation of the
    reader (or of this wait) cancels the writer, and is re-raised once the writer has ended;
    a writer that failed is logged, type only."""
    try:
        await reader
        await asyncio.wait((writer,))
    except BaseException:
        writer.cancel()
        await asyncio.wait((writer,))
        raise
    finally:
        if writer.done() and not writer.cancelled() and writer.exception() is not None:
            log.error("writer failed: %s", type(writer.exception()).__name__)


class Session:
    """One connection (see the module docstring). Slots and a bare future instead of an
    ``asyncio.Event``: at 10,000 idle connections every object per connection shows."""

    __slots__ = (
        "aborted",
        "attaching",
        "authenticating",
        "client_id",
        "close",
        "conn",
        "expiry",
        "grants",
        "idle",
        "ip",
        "parked",
        "pending",
        "ping_due",
        "service",
        "task",
        "transport",
        "waiter",
        "writer",
    )

    def __init__(
        self,
        service: WirestateServer,
        transport: Transport,
        client_id: str,
        ip: str,
        grants: Grants | None,
    ) -> None:
        """``grants``: the token's, from the upgrade; None with ``[auth] first_message``
        when the token is to come in the first message."""
        self.service = service
        self.transport = transport
        self.client_id = client_id
        self.ip = ip
        if grants is None and not service.auth.required:
            grants = OPEN
        self.grants: Grants = grants if grants is not None else NOTHING
        self.authenticating = grants is None
        self.conn: Connection | None = None
        self.ping_due = False
        self.close: Close | None = None
        #: The writer is parked waiting for work, with nothing of its own in flight.
        self.idle = False
        self.pending = False  # work was signalled and not yet taken
        self.waiter: asyncio.Future[None] | None = None
        self.writer: asyncio.Task[None] | None = None
        self.task: asyncio.Task[Any] | None = None
        self.aborted = False  # the core's Abort cancelled this session's own task
        #: The reader waits in ``receive`` (messages may be handled ``inline``).
        self.parked = False
        #: A subscription waiting for the bus, taken inline: the reader awaits it before
        #: the next message, and nothing is handled inline meanwhile.
        self.attaching: asyncio.Future[None] | None = None
        self.expiry: asyncio.TimerHandle | None = None  # token expiry, or the auth deadline

    # -- the whole life ------------------------------------------------------------------

    async def run(self) -> None:
        """Register, run both pumps, unregister. Returns when the connection is over."""
        service = self.service
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        service.handlers.add(task)  # stop() waits for it, and cancels it should it outlive that
        # One coroutine for the whole life (no helper coroutine awaited from here): at
        # 10,000 idle connections each suspended frame costs.
        try:
            if service.admission.closing:
                # Decided just before shutdown began: never registered, told why.
                await self.transport.close(1001, CloseCause.SHUTDOWN.value)
                return
            hub = service.hub
            assert hub is not None, "the server has not started"
            now = service.now()
            conn = hub.connect(self.client_id, now)
            hub.accept(conn, now)
            self.conn = conn
            self._register()
            try:
                hub.start(conn, service.now())
                log.info("connected", extra={"client_id": self.client_id, "peer": self._peer()})
                service.dispatch()
                # No name: "Task-N" costs nothing until asked for; a name string per idle
                # connection does (the task's repr and the logs carry the client id anyway).
                writer = asyncio.get_running_loop().create_task(self._write())
                self.writer = writer
                try:
                    await join(self._read(), writer)
                except asyncio.CancelledError:
                    # The core's Abort on a transport that cannot end a pending receive
                    # cancels this task; any other cancellation is re-raised.
                    if not self.aborted or task.uncancel() > 0:
                        raise
            finally:
                self._release()
        finally:
            service.handlers.discard(task)

    def _register(self) -> None:
        service, conn = self.service, self.conn
        assert conn is not None
        service.sessions[self.client_id] = self
        service.admission.admitted(self.ip)
        if not self.authenticating:
            self._grant(self.grants)
        else:
            auth = service.settings.auth
            assert auth is not None
            deadline = service.now() + auth.first_message_timeout
            self.expiry = asyncio.get_running_loop().call_at(
                deadline, self._expire, CloseCause.POLICY
            )

    def _release(self) -> None:
        """The one place that unregisters, once both pumps have reported their end; then
        the connection is forgotten."""
        service, conn = self.service, self.conn
        hub = service.hub
        assert hub is not None
        assert conn is not None
        if conn.state is ConnState.REGISTERING:  # the pumps never started
            hub.close(conn, CloseCause.SHUTDOWN, service.now())
        hub.unregister(conn, service.now())
        service.dispatch()
        del service.sessions[self.client_id]
        if self.expiry is not None:
            self.expiry.cancel()
        service.admission.released(self.ip)

    # -- the writer's wake-ups -----------------------------------------------------------

    def wake(self) -> None:
        self.pending = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until ``wake`` (at once if it was called since the last wait)."""
        if not self.pending:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        self.pending = False

    def abort(self) -> None:
        """The core's ``Abort``: drop the connection and cancel the writer, which may be
        stuck in a wait that no longer completes. A transport that cannot end a pending
        receive has the reader cancelled instead. Each pump still reports its end."""
        self._cut()
        if self.writer is not None:
            self.writer.cancel()

    def admit_ping(self) -> bool:
        """A protocol ping arrived: whether to answer it. It counts against the client's
        inbound rate like a message (a flood ends in a close with ``policy``), and it is not
        answered while the client is over its budget or not reading (no pong piles up)."""
        service, conn = self.service, self.conn
        hub = service.hub
        if conn is None or hub is None:
            return True  # before registration: websockets' own answer
        admitted = hub.admit(conn, service.now())
        service.dispatch()
        if not admitted:
            return False
        transport = self.transport
        limit = service.settings.server.max_pending_bytes
        return transport.writable() and transport.buffered() + conn.queued_bytes < limit

    def protocol_failed(self, cause: CloseCause, code: int) -> None:
        """The transport's protocol layer failed the connection (a protocol error, invalid
        UTF-8, a frame too big) and sent its close: record the cause now. The peer may never
        close its side; the core's close timeout then aborts it."""
        service, conn = self.service, self.conn
        if conn is not None and service.hub is not None:
            service.hub.close(conn, cause, service.now(), code)
            service.dispatch()

    def _cut(self) -> None:
        if not self.transport.abort() and self.task is not None and not self.task.done():
            self.aborted = True
            self.task.cancel()

    # -- the reader ----------------------------------------------------------------------

    async def _read(self) -> None:
        service, conn, transport = self.service, self.conn, self.transport
        hub = service.hub
        assert hub is not None
        assert conn is not None
        cause, code = CloseCause.READ_ERROR, None
        try:
            # receive() rather than iteration: no async generator kept per connection.
            while True:
                self.parked = True
                message = await transport.receive()
                self.parked = False
                if self.attaching is not None:
                    await self.attaching
                    self.attaching = None
                attaching = self._take(message, service.now())
                if attaching is not None:
                    await attaching
                service.dispatch()
        except Ended as end:
            cause, code = end.cause, end.code
        finally:
            if self.attaching is not None:
                self.attaching.cancel()
            hub.reader_done(conn, service.now(), cause, code)
            service.dispatch()

    def inline(self, data: bytes | bytearray | memoryview) -> bool:
        """A complete text frame, from the transport's parser: handle it now if the reader
        would take it next (module docstring). False: queue it for the reader instead."""
        if not self.parked or self.attaching is not None or self.authenticating:
            return False
        try:
            text = str(data, "utf-8")
        except UnicodeDecodeError:
            return False  # the transport's own close (1007) follows from the reader
        service = self.service
        try:
            attaching = self._take(text, service.now())
            if attaching is not None:
                task = asyncio.ensure_future(attaching)
                task.add_done_callback(self._attached)
                self.attaching = task
            service.dispatch()
        except Exception as exc:
            self._failed(exc)
        return True

    def _take(self, message: str | bytes, now: float) -> Awaitable[None] | None:
        """One message from the peer, from the reader or inline: its size (where the
        transport does not limit it), the rate limit, then the core. Returns what must be
        awaited before the next message (`_message`). The caller dispatches."""
        service, conn = self.service, self.conn
        hub = service.hub
        assert hub is not None
        assert conn is not None
        if not self.transport.limits_size and _too_big(
            message, service.settings.limits.max_message_size
        ):
            # What the websockets transport's max_size does: close 1009.
            hub.close(conn, CloseCause.MESSAGE_TOO_BIG, now)
            return None
        if not hub.admit(conn, now):
            return None
        if isinstance(message, bytes):
            hub.bad_input(conn, ErrorCode.INVALID_MESSAGE, BINARY_MESSAGE, now)
            return None
        return self._message(message, now)

    def _attached(self, task: asyncio.Future[None]) -> None:
        """A subscription taken inline has attached (or failed): what the reader does after
        awaiting one."""
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._failed(exc)
            return
        self.service.dispatch()

    def _failed(self, exc: BaseException) -> None:
        """Inline handling failed (a bug, not peer input): the session ends, as it would had
        the reader raised; the type is logged, never the text."""
        log.error("message handling failed: %s", type(exc).__name__)
        self.transport.abort()

    def _message(self, text: str, now: float) -> Awaitable[None] | None:
        """Hand one text frame to the core. Returns an awaitable when the message must wait
        for the bus (a subscription to topics not yet read here): the reader awaits it, so
        the client's later messages still follow this one."""
        service, conn = self.service, self.conn
        hub = service.hub
        assert hub is not None
        assert conn is not None
        msg = wire.parse_client_message(text)
        if self.authenticating and not isinstance(msg, wire.WireError):
            self._authenticate(msg, now)
            return None
        grants = self.grants
        if isinstance(msg, wire.Subscribe) and not all(map(grants.may_subscribe, msg.topics)):
            hub.bad_input(conn, ErrorCode.FORBIDDEN, "a topic is outside your token's claims", now)
            return None
        if isinstance(msg, wire.Publish) and not grants.may_publish(msg.topic):
            hub.bad_input(conn, ErrorCode.FORBIDDEN, "publishing there is outside your claims", now)
            return None
        bus = service.bus
        match msg:
            case wire.WireError(code=code, message=message):
                hub.bad_input(conn, ErrorCode(code), message, now)
            case wire.Subscribe(topics=topics, since=since):
                cursor: dict[str, int | tuple[int, str | None]] = {}
                for topic, value in (since or {}).items():
                    cursor[topic] = value if isinstance(value, int) else (value.seq, value.epoch)
                if bus.ready and any(map(bus.carries, topics)):
                    if not hub.admits_topics(conn, topics, now):
                        return None
                    return self._subscribe_attached(list(topics), cursor)
                hub.subscribe(conn, topics, now, since=cursor)
            case wire.Unsubscribe(topics=topics):
                hub.unsubscribe(conn, topics, now)
            case wire.Ping(id=ping_id):
                hub.app_ping(conn, ping_id, now)
            case wire.Publish(topic=topic, data=data):
                if not bus.carries(topic):
                    hub.client_publish(conn, topic, data, now)
                elif hub.may_publish(conn, topic, now):
                    bus.submit(topic, data)
            case wire.Auth() if grants is service.auth.anonymous and _first_message(service):
                self._authenticate(msg, now)  # a token's claims replace the anonymous ones
            case _:  # auth outside the first message of an [auth] first_message connection
                hub.bad_input(conn, ErrorCode.FORBIDDEN, "auth is accepted only first", now)
        return None

    async def _subscribe_attached(
        self, topics: list[str], since: dict[str, int | tuple[int, str | None]]
    ) -> None:
        """Subscribe once the bus has read the topics' state (epoch, seq, history)."""
        service = self.service
        attached = await service.bus.attach(topics)
        hub = service.hub
        assert hub is not None
        assert self.conn is not None
        hub.subscribe(self.conn, topics, service.now(), since=since)
        service.dispatch()
        if attached:
            await service.bus.wake()

    # -- auth ----------------------------------------------------------------------------

    def _grant(self, grants: Grants) -> None:
        self.grants, self.authenticating = grants, False
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        if grants.expires_at is not None:
            # The token's exp on the loop's clock: the close is the core's, cause auth_expired.
            at = self.service.now() + max(0.0, grants.expires_at - time.time())
            self.expiry = asyncio.get_running_loop().call_at(at, self._expire)

    def _expire(self, cause: CloseCause = CloseCause.AUTH_EXPIRED) -> None:
        service = self.service
        assert service.hub is not None
        assert self.conn is not None
        service.hub.close(self.conn, cause, service.now())
        service.dispatch()

    def _authenticate(self, msg: wire.ClientMessage, now: float) -> None:
        """The first message of an ``[auth] first_message`` connection must be ``auth``
        with a valid token (so may a later one of an anonymous connection); anything else,
        or a bad token, closes with ``policy`` (1008)."""
        service = self.service
        assert service.hub is not None
        assert self.conn is not None
        if not isinstance(msg, wire.Auth):
            service.hub.close(self.conn, CloseCause.POLICY, now)
            return
        try:
            grants = service.auth.authenticate(msg.token, now=time.time())
        except AuthError:
            service.hub.close(self.conn, CloseCause.POLICY, now)
            return
        self._grant(grants)

    # -- the writer ----------------------------------------------------------------------

    async def _write(self) -> None:
        service, conn, transport = self.service, self.conn, self.transport
        hub = service.hub
        assert hub is not None
        assert conn is not None
        cause: CloseCause | None = None
        timeout = service.settings.server.close_timeout
        try:
            while True:
                self.idle = True
                await self.wait()
                self.idle = False
                if not transport.writable():
                    # Nothing is written past the high-water mark: wait for the peer to read
                    # first, bounded (a peer that stopped reading cannot hold the writer).
                    # Meanwhile the outbox fills, within the client's budget, in the core.
                    async with asyncio.timeout(timeout):
                        await transport.drain()
                published_at = hub.oldest_queued_at(conn)
                frames = hub.drain(conn)
                if frames:
                    async with asyncio.timeout(timeout):
                        await transport.send(frames)
                    hub.written(conn, transport.buffered(), transport.writable())
                    if published_at is not None:
                        service.metrics.observe_publish_to_write(service.now() - published_at)
                if self.ping_due:
                    self.ping_due = False
                    if transport.keeps_alive:
                        # The transport watches the peer (module docstring of the ASGI
                        # transport): the core's ping is answered here, in the writer's turn.
                        hub.pong_received(conn, service.now())
                    else:
                        async with asyncio.timeout(timeout):
                            pong = await transport.ping()
                        asyncio.ensure_future(pong).add_done_callback(self._ponged)
                if self.close is not None:
                    close = self.close
                    await transport.close(close.code, close.reason)
                    return
        except TimeoutError:
            # The peer stopped reading: nothing more can be written, not even a close frame.
            cause = CloseCause.SLOW_CONSUMER
            self._cut()
        except Ended:
            cause = CloseCause.WRITE_ERROR
        finally:
            hub.writer_done(conn, service.now(), cause)
            service.dispatch()

    def ping_now(self) -> bool:
        """The core's ping, written here and now when the writer is parked with nothing in
        flight (as the flush writes events on its behalf): no writer wake-up, no future, no
        timeout per ping. False: the writer sends it (``ping_due``)."""
        if not self.idle or self.pending or self.transport.keeps_alive:
            return False
        return self.transport.ping_now(self._answered)

    def _ponged(self, fut: asyncio.Future[object]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self._answered()

    def _answered(self) -> None:
        """The pong of the core's last ping arrived."""
        service = self.service
        if service.hub is not None and self.conn is not None:
            service.hub.pong_received(self.conn, service.now())
            service.dispatch()

    def _peer(self) -> str:
        """The client's address as logged: the peer's, or what a trusted proxy forwarded."""
        peer = self.transport.peer()
        if peer is None or peer[0] != self.ip:
            return self.ip
        return f"{peer[0]}:{peer[1]}"


def _first_message(service: WirestateServer) -> bool:
    auth = service.settings.auth
    return auth is not None and auth.first_message


def _too_big(message: str | bytes, limit: int) -> bool:
    if isinstance(message, str):
        # Encoded only when the character count alone cannot decide (UTF-8: 1-4 bytes each).
        n = len(message)
        return n > limit or (n * 4 > limit and len(message.encode()) > limit)
    return len(message) > limit
