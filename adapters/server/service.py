"""The asyncio service around the pure hub: the websockets server, HTTP, sources, shutdown.

Rules of this module (STYLE.md rules 7-9; DESIGN.md "The core speaks in decisions"):

* Every input goes to the core with ``loop.time()``; after each, ``_dispatch`` performs the
  actions the core decided (ping, close, abort), wakes the writers whose outbox filled, and
  re-arms the ticker. The adapter decides no policy.
* Per connection the handler's task runs the reader and joins a writer task (``_join``: a
  task group of two, without a ``TaskGroup``'s memory); the writer is the only code that
  writes to the socket outside a flush (frames, protocol pings, the close frame). Each pump
  reports its own end to the core from its ``finally``; the handler's ``finally`` is the one
  place that unregisters, after ``_join`` returned, so both pumps have finished.
* The writer drains the whole outbox and writes every frame in one transport write, under a
  timeout: a peer that stopped reading cannot block it (websockets' keepalive and
  ``close()`` both hang on a full write buffer; tech-notes section 6), and is aborted.
* One hub-wide ticker task serves every connection's timers (pings, pong deadlines, close
  timeouts): the core keeps them in one heap, so 10,000 connections cost one sleeping task,
  not 10,000. It also measures the loop's own lag and reports stalls to the core before
  ticking, so a busy hub does not blame its peers.
* Peer input never raises out of the reader: a bad frame becomes ``bad_input`` with a fixed
  message; exception text never reaches the wire or the logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import ipaddress
import logging
import math
import secrets
import signal
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError
from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK
from websockets.frames import CloseCode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from wirestate.adapters.server.auth import (
    OPEN,
    Authenticator,
    AuthError,
    Grants,
    origin_allowed,
    redact,
    token_from_request,
)
from wirestate.adapters.server.bus import BusUnavailable, MemoryBus, RedisBus
from wirestate.adapters.server.dashboard import Dashboard
from wirestate.adapters.server.dashboard import snapshot as dashboard_snapshot
from wirestate.adapters.server.metrics import Metrics
from wirestate.adapters.server.sources import (
    BREAKER_TOPIC,
    SourcePoller,
    breaker_config,
    breaker_event,
    poller_from_settings,
)
from wirestate.adapters.server.transports.http import (
    HttpApp,
    HttpRequest,
    HttpResponse,
    Router,
    error_response,
    http_connection_factory,
    json_response,
)
from wirestate.core.actions import Abort, Close, Ping, Reject, Unregistered
from wirestate.core.breaker import BreakerConfig, BreakerState, StateChanged
from wirestate.core.causes import CloseCause, ErrorCode
from wirestate.core.hub import BUILTIN_TOPICS, Connection, Hub, HubConfig
from wirestate.core.lifecycle import ConnState
from wirestate.models import wire
from wirestate.models.settings import Settings, SourceSettings

log = logging.getLogger("wirestate.server")
#: Grants of a connection that has not authenticated yet: nothing allowed.
NOTHING = Grants(sub="", expires_at=None)
_TOPIC: TypeAdapter[str] = TypeAdapter(wire.Topic)

#: Encoded frames kept for reuse: the events of one burst (an event's recipients all drain
#: it within one dispatch or one writer wake-up).
FRAME_CACHE = 64
#: Clients written per flush before the loop runs again (see ``_flush``).
FLUSH_CHUNK = 64
#: How often the ticker wakes at the least, to measure the loop's lag.
LAG_PROBE = 0.25
BINARY_MESSAGE = "binary frames are not supported; send JSON text frames"
TOPIC_RULE = "topic: 1-128 characters of A-Z a-z 0-9 _ . : / -"


def cid(action: Any) -> str:
    return str(action.client_id)


class _Client:
    """The adapter's side of one connection. Slots and a bare future instead of an
    ``asyncio.Event``: at 10,000 idle connections every object per connection shows."""

    __slots__ = (
        "authenticating",
        "close",
        "conn",
        "expiry",
        "grants",
        "idle",
        "pending",
        "ping_due",
        "waiter",
        "writer",
        "ws",
    )

    def __init__(self, ws: ServerConnection, conn: Connection) -> None:
        self.ws = ws
        self.conn = conn
        self.ping_due = False
        self.close: Close | None = None
        #: The writer is parked waiting for work, with nothing of its own in flight.
        self.idle = False
        self.pending = False  # work was signalled and not yet taken
        self.waiter: asyncio.Future[None] | None = None
        self.writer: asyncio.Task[None] | None = None
        self.grants: Grants = OPEN
        self.authenticating = False  # [auth] first_message: waiting for the auth message
        self.expiry: asyncio.TimerHandle | None = None  # token expiry, or the auth deadline

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
        """The core's ``Abort``: end the reader (its socket is gone) and cancel the writer,
        which may be stuck in a drain that no longer completes. Each pump still reports its
        end. An embedding transport's client (the ASGI transport's) overrides it."""
        self.ws.transport.abort()
        if self.writer is not None:
            self.writer.cancel()


@dataclasses.dataclass(frozen=True)
class Refusal:
    """An upgrade refused before it was accepted: the HTTP status, the reason counted in
    ``wirestate_connections_rejected_total{reason}``, and the body (the reason only)."""

    status: int
    reason: str
    text: str


def hub_config(settings: Settings, sources: Iterable[str] = ()) -> HubConfig:
    """The core's knobs from the validated settings; ``sources`` names the topics of
    sources added in code (``add_source``), reserved like the configured ones."""
    s = settings.server
    return HubConfig(
        ping_interval=s.ping_interval,
        ping_timeout=s.ping_timeout,
        send_queue_size=s.send_queue_size,
        close_timeout=s.close_timeout,
        history_size=settings.history.size,
        history_max_age=settings.history.max_age,
        max_subscriptions=settings.limits.max_subscriptions,
        messages_per_second=settings.limits.messages_per_second,
        overflow={topic: t.overflow for topic, t in settings.topics.items()},
        reserved_topics=BUILTIN_TOPICS | {src.topic for src in settings.sources} | set(sources),
    )


class WirestateServer:
    """A running hub: ``/ws``, the HTTP endpoints and the sources on one port.

    ::

        server = WirestateServer(load_settings())
        async with server:                      # listening once entered
            await server.publish("orders", {"id": 1})
            await server.wait_closed()          # until stop() or a signal

    ``add_source`` before entering adds an application source (an async function polled
    through its own breaker). ``stop()`` closes every client with 1001, waits up to the
    close timeout for them to flush, unregisters all, and stops.
    """

    def __init__(self, settings: Settings | None = None, *, epoch: str | None = None) -> None:
        self.settings = settings or Settings()
        self.epoch = epoch or secrets.token_hex(4)
        self.hub: Hub | None = None
        self.metrics = Metrics(self._stats, self._connection_counts)
        self._clients: dict[str, _Client] = {}
        self._per_ip: dict[str, int] = {}  # open connections per peer address
        self.auth = Authenticator.from_settings(self.settings.auth)
        secret = self.settings.auth.secret if self.settings.auth else None
        # websockets logs request lines at DEBUG, ?token= included: scrub them at the source.
        _install_redaction([secret.get_secret_value()] if secret else [])
        self._grants: dict[Any, Grants] = {}  # upgrade -> its token's grants, until handled
        self._handlers: set[asyncio.Task[Any]] = set()
        self._sources: list[
            tuple[str, Callable[[], Awaitable[Any]], float, float, BreakerConfig | None]
        ] = []
        self._pollers: list[SourcePoller] = []
        self._ticker_task: asyncio.Task[None] | None = None
        self._source_tasks: list[asyncio.Task[None]] = []
        self._ws: WsServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ticker_wake = asyncio.Event()
        self._flush_scheduled = False
        self._flush_todo: list[str] = []  # ready clients a flush has not reached yet
        self._ticker_at = math.inf
        self._closing = False
        self._closed = asyncio.Event()
        self._http_client: Any = None
        #: how events reach other nodes (issue 6): a MemoryBus or a RedisBus, set at start
        self.bus: MemoryBus | RedisBus = MemoryBus(self)
        #: id(payload) -> (payload, its wire frame); the payload is kept so the id stays valid
        self._frames: dict[int, tuple[bytes, bytes]] = {}

    # -- library API -----------------------------------------------------------------------

    def add_source(
        self,
        topic: str,
        fetch: Callable[[], Awaitable[Any]],
        *,
        interval: float,
        timeout: float = 10.0,
        breaker: BreakerConfig | None = None,
    ) -> None:
        """Poll ``fetch`` every ``interval`` seconds behind its own breaker, publishing on
        ``topic`` (stale while the breaker is open). Call before ``start``."""
        if self._loop is not None:
            raise RuntimeError("add sources before the server starts")
        self._sources.append((topic, fetch, interval, timeout, breaker))

    async def publish(
        self, topic: str, data: Any, *, stale: bool = False, age: float | None = None
    ) -> int:
        """Publish an event; returns its seq. Never waits for a subscriber. With a Redis
        bus, a topic the bus carries is numbered by Redis (this waits for its answer) and
        reaches the subscribers of every node; while the link is down the seq is this
        node's, the event reaches this node's subscribers, and the bus on recovery."""
        if self.bus.carries(topic):
            self._need_hub()
            return await self.bus.publish(topic, data)
        return self.publish_now(topic, data, stale=stale, age=age)

    def publish_now(
        self, topic: str, data: Any, *, stale: bool = False, age: float | None = None
    ) -> int:
        """Synchronous publish on this node only, for code already on the server's event
        loop (sources, node-local topics). A topic a Redis bus carries needs ``publish``."""
        if self.bus.carries(topic):
            raise ValueError(f"{topic!r} is carried by the bus: use `await publish()`")
        hub = self._need_hub()
        seq = hub.publish(topic, data, self._now(), stale=stale, age=age)
        self._dispatch()
        return seq

    @property
    def port(self) -> int:
        """The port actually bound (useful with ``port = 0``)."""
        assert self._ws is not None, "not started"
        sock = next(iter(self._ws.sockets))
        return int(sock.getsockname()[1])

    @property
    def url(self) -> str:
        s = self.settings.server
        scheme = "wss" if s.certfile is not None else "ws"
        return f"{scheme}://{s.host}:{self.port}/ws"

    async def __aenter__(self) -> WirestateServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # -- start and stop --------------------------------------------------------------------

    async def start(self) -> None:
        """Start the hub (``start_core``) and listen on the configured host and port."""
        host = self.settings.server.host
        if not self.auth.required and not _loopback(host):
            raise ValueError(
                f"refusing to serve {host} without authentication: anyone who reaches it could"
                " subscribe and publish; configure [auth] or bind 127.0.0.1"
            )
        await self.start_core()
        s = self.settings.server
        tls: ssl.SSLContext | None = None
        if s.certfile is not None and s.keyfile is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(s.certfile, s.keyfile)
        self._ws = await serve(
            self._handle,
            s.host,
            s.port,
            compression=None,
            ping_interval=None,  # the core owns keep-alive
            ping_timeout=None,
            close_timeout=s.close_timeout,
            max_size=self.settings.limits.max_message_size,
            max_queue=64,
            process_request=self._process_request,
            create_connection=_with_cause_reasons(
                http_connection_factory(
                    self._http_app(),
                    max_body=self.settings.limits.max_message_size,
                    websocket_paths=("/ws",),
                )
            ),
            server_header="wirestate",
            ssl=tls,
        )
        log.info(
            "listening",
            extra={
                "url": self.url,
                "epoch": self.epoch,
                "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
            },
        )
        if not self.auth.required:
            log.warning(
                "open mode: no [auth] configured, so every client may subscribe and publish;"
                " serving loopback only"
            )

    async def start_core(self) -> None:
        """Everything but the listener: the hub, its ticker and the sources. ``start`` calls
        it; an embedding transport (the ASGI app) calls it alone."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        # The core reads no wall clock: event timestamps are loop time plus this offset.
        wall_offset = time.time() - loop.time()
        config = hub_config(self.settings, (topic for topic, *_ in self._sources))
        self.hub = Hub(config, epoch=self.epoch, wall_offset=wall_offset)
        self._ticker_task = loop.create_task(self._ticker(), name="wirestate-ticker")
        if self.settings.bus.kind == "redis":
            bus = self.settings.bus
            self.bus = RedisBus(
                self,
                bus.url,
                local_topics=self.hub.config.reserved_topics,
                breaker=breaker_config(bus.breaker, call_timeout=None),
                on_transition=self._bus_transition,
                node=self.epoch,
            )
        await self.bus.start()
        await self._start_sources(wall_offset)

    async def stop(self) -> None:
        """Graceful shutdown: refuse new clients, close every client with 1001, wait for
        their flush and unregistration (aborting stragglers after the close timeout)."""
        if self._closing or self.hub is None:
            return
        self._closing = True
        hub = self.hub
        for task in self._source_tasks:
            task.cancel()
        hub.shutdown(self._now())
        self._dispatch()
        pending = set(self._handlers)
        if pending:
            # The core aborts clients still running after close_timeout; allow it to act.
            await asyncio.wait(pending, timeout=self.settings.server.close_timeout * 2 + 1)
        if self._ws is not None:
            self._ws.close(close_connections=False)
            await self._ws.wait_closed()
        tasks = [*self._source_tasks, *([self._ticker_task] if self._ticker_task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.bus.stop()
        if self._http_client is not None:
            await self._http_client.aclose()
        self._closed.set()
        log.info("stopped", extra={"clients_left": len(hub.clients)})

    async def _start_sources(self, wall_offset: float) -> None:
        loop = asyncio.get_running_loop()
        specs: list[SourceSettings] = list(self.settings.sources)
        if not any(src.topic == "system_status" for src in specs):
            # The built-in source (DESIGN.md): host CPU, memory, load and uptime.
            specs.append(SourceSettings(kind="system", topic="system_status", interval=5.0))
        if any(src.kind == "http" for src in specs):
            import httpx

            self._http_client = httpx.AsyncClient()
        publisher = _Publisher(self)
        for src in specs:
            self._pollers.append(
                poller_from_settings(
                    src,
                    publisher,
                    loop.time,
                    wall_offset,
                    self._http_client,
                    on_transition=self._breaker_transition,
                )
            )
        for topic, fetch, interval, timeout, config in self._sources:
            self._pollers.append(
                SourcePoller(
                    topic,
                    fetch,
                    publisher=publisher,
                    interval=interval,
                    timeout=timeout,
                    clock=loop.time,
                    wall_offset=wall_offset,
                    config=config,
                    on_transition=self._breaker_transition,
                )
            )
        for poller in self._pollers:
            name = f"wirestate-source-{poller.topic}"
            self._source_tasks.append(loop.create_task(poller.run(), name=name))

    def _bus_transition(self, change: StateChanged) -> None:
        """The bus link's breaker: metrics, and an event on ``circuit_breaker`` like any
        source's breaker."""
        self._breaker_transition(change)
        if self.hub is not None:
            self.publish_now(BREAKER_TOPIC, breaker_event(change, self.hub.wall_offset))

    def _breaker_transition(self, change: StateChanged) -> None:
        self.metrics.breaker_transition(
            change.breaker, change.from_state.value, change.to_state.value
        )
        self.metrics.breaker_state(
            change.breaker, change.to_state.value, [s.value for s in BreakerState]
        )

    # -- one connection --------------------------------------------------------------------

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?", 1)[0] != "/ws":
            return ws.respond(404, "no WebSocket endpoint here; connect to /ws\n")
        decision = self.upgrade_decision(
            _ip(ws),
            request.headers.get("Origin"),
            lambda: token_from_request(request.headers.raw_items(), request.path),
        )
        if isinstance(decision, Refusal):
            return ws.respond(decision.status, decision.text)
        if decision is not None:
            self._grants[ws] = decision
        return None

    def upgrade_decision(
        self, ip: str, origin: str | None, token: Callable[[], str | None]
    ) -> Refusal | Grants | None:
        """The checks before accepting an upgrade, the same for every transport, in order:
        shutting down (503), total and per-IP connection limits (503, 429), the Origin
        allowlist (403), the token (401). Returns the refusal (counted and logged), the
        token's grants, or None when the token is to come in the first message."""
        limits, auth = self.settings.limits, self.settings.auth
        if self._closing:
            return self.refused(Refusal(503, "shutting_down", "shutting down\n"))
        if len(self._clients) >= limits.max_connections:
            return self.refused(Refusal(503, "max_connections", "too many connections\n"))
        if self._per_ip.get(ip, 0) >= limits.max_connections_per_ip:
            return self.refused(Refusal(429, "max_connections_per_ip", "too many connections\n"))
        if auth is not None and not origin_allowed(origin, auth.allowed_origins):
            return self.refused(Refusal(403, "origin", "origin not allowed\n"))
        if not self.auth.required:
            return OPEN
        value = token()
        if value is None and auth is not None and auth.first_message:
            return None  # the token comes in the first message, within a deadline
        try:
            return self.auth.authenticate(value, now=time.time())
        except AuthError as exc:
            # The body names the reason only: never the token, never the library's text.
            return self.refused(Refusal(401, "auth", f"unauthorized: {exc.reason}\n"))

    def refused(self, refusal: Refusal) -> Refusal:
        """Count and log a refused upgrade."""
        self.metrics.rejections[refusal.reason] += 1
        log.info("upgrade refused", extra={"reason": refusal.reason, "status": refusal.status})
        return refusal

    async def _handle(self, ws: ServerConnection) -> None:
        hub = self._need_hub()
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        cid = ws.id.hex[:16]
        conn = hub.connect(cid, self._now())
        hub.accept(conn, self._now())
        client = _Client(ws, conn)
        ip = _ip(ws)
        self._register(client, self._grants.pop(ws, None), ip)
        try:
            hub.start(conn, self._now())
            log.info("connected", extra={"client_id": cid, "peer": _peer(ws)})
            self._dispatch()
            # The reader runs in this handler's own task (one task fewer per connection),
            # the writer in its own; the handler waits for the writer when the reader is
            # done, as a task group would (without one's ~0.5 KiB per idle connection).
            # No name: "Task-N" costs nothing until asked for; a name string per idle
            # connection does (the task's repr and the logs carry the client id anyway).
            writer = asyncio.get_running_loop().create_task(self._writer(client))
            client.writer = writer
            await _join(self._reader(client), writer)
        finally:
            # _join has returned: both pumps have reported their end.
            self._release(client, ip)
            self._handlers.discard(task)

    def _register(self, client: _Client, grants: Grants | None, ip: str) -> None:
        """Make an accepted connection known: its grants (None with ``[auth]
        first_message``: nothing is allowed until a valid auth message, within the
        deadline) and its peer's count. Every transport calls this, then ``_release``."""
        conn = client.conn
        self._clients[conn.client_id] = client
        if grants is not None or not self.auth.required:
            self._grant(client, grants or OPEN)
        else:
            client.grants, client.authenticating = NOTHING, True
            assert self.settings.auth is not None
            deadline = self._now() + self.settings.auth.first_message_timeout
            client.expiry = asyncio.get_running_loop().call_at(
                deadline, self._expire, conn, CloseCause.POLICY
            )
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1

    def _release(self, client: _Client, ip: str) -> None:
        """The one place that unregisters, once both pumps have reported their end; then
        the connection is forgotten."""
        hub, conn = self._need_hub(), client.conn
        if conn.state is ConnState.REGISTERING:  # the pumps never started
            hub.close(conn, CloseCause.SHUTDOWN, self._now())
        hub.unregister(conn, self._now())
        self._dispatch()
        del self._clients[conn.client_id]
        if client.expiry is not None:
            client.expiry.cancel()
        left = self._per_ip[ip] - 1
        if left:
            self._per_ip[ip] = left
        else:
            del self._per_ip[ip]

    async def _reader(self, client: _Client) -> None:
        hub, conn, ws = self._need_hub(), client.conn, client.ws
        cause, code = CloseCause.READ_ERROR, None
        try:
            # recv() rather than `async for`: no async generator kept per connection.
            while True:
                message = await ws.recv()
                now = self._now()
                if not hub.admit(conn, now):
                    self._dispatch()
                    continue
                if isinstance(message, bytes):
                    hub.bad_input(conn, ErrorCode.INVALID_MESSAGE, BINARY_MESSAGE, now)
                else:
                    attaching = self._message(conn, message, now)
                    if attaching is not None:
                        await attaching
                self._dispatch()
        except ConnectionClosed as exc:
            cause, code = _read_end(exc)
        finally:
            hub.reader_done(conn, self._now(), cause, code)
            self._dispatch()

    def _grant(self, client: _Client, grants: Grants) -> None:
        client.grants, client.authenticating = grants, False
        if client.expiry is not None:
            client.expiry.cancel()
            client.expiry = None
        if grants.expires_at is not None:
            # The token's exp on the loop's clock: the close is the core's, cause auth_expired.
            at = self._now() + max(0.0, grants.expires_at - time.time())
            client.expiry = asyncio.get_running_loop().call_at(at, self._expire, client.conn)

    def _expire(self, conn: Connection, cause: CloseCause = CloseCause.AUTH_EXPIRED) -> None:
        self._need_hub().close(conn, cause, self._now())
        self._dispatch()

    def _authenticate(self, client: _Client, msg: wire.ClientMessage, now: float) -> None:
        """The first message of an ``[auth] first_message`` connection must be ``auth``
        with a valid token; anything else, or a bad token, closes with ``policy`` (1008)."""
        hub = self._need_hub()
        if not isinstance(msg, wire.Auth):
            hub.close(client.conn, CloseCause.POLICY, now)
            return
        try:
            grants = self.auth.authenticate(msg.token, now=time.time())
        except AuthError:
            hub.close(client.conn, CloseCause.POLICY, now)
            return
        self._grant(client, grants)

    def _message(self, conn: Connection, text: str, now: float) -> Awaitable[None] | None:
        """Hand one text frame to the core. Returns an awaitable when the message must wait
        for the bus (a subscription to topics not yet read here): the reader awaits it, so
        the client's later messages still follow this one."""
        hub = self._need_hub()
        msg = wire.parse_client_message(text)
        client = self._clients[conn.client_id]
        if client.authenticating and not isinstance(msg, wire.WireError):
            self._authenticate(client, msg, now)
            return None
        grants = client.grants
        if isinstance(msg, wire.Subscribe) and not all(map(grants.may_subscribe, msg.topics)):
            hub.bad_input(conn, ErrorCode.FORBIDDEN, "a topic is outside your token's claims", now)
            return None
        if isinstance(msg, wire.Publish) and not grants.may_publish(msg.topic):
            hub.bad_input(conn, ErrorCode.FORBIDDEN, "publishing there is outside your claims", now)
            return None
        match msg:
            case wire.WireError(code=code, message=message):
                hub.bad_input(conn, ErrorCode(code), message, now)
            case wire.Subscribe(topics=topics, since=since):
                cursor: dict[str, int | tuple[int, str | None]] = {}
                for topic, value in (since or {}).items():
                    cursor[topic] = value if isinstance(value, int) else (value.seq, value.epoch)
                if self.bus.ready and any(map(self.bus.carries, topics)):
                    return self._subscribe_attached(conn, list(topics), cursor)
                hub.subscribe(conn, topics, now, since=cursor)
            case wire.Unsubscribe(topics=topics):
                hub.unsubscribe(conn, topics, now)
            case wire.Ping(id=ping_id):
                hub.app_ping(conn, ping_id, now)
            case wire.Publish(topic=topic, data=data):
                if not self.bus.carries(topic):
                    hub.client_publish(conn, topic, data, now)
                elif hub.may_publish(conn, topic, now):
                    self.bus.submit(topic, data)
            case _:  # auth outside the first message of an [auth] first_message connection
                hub.bad_input(conn, ErrorCode.FORBIDDEN, "auth is accepted only first", now)
        return None

    async def _subscribe_attached(
        self, conn: Connection, topics: list[str], since: dict[str, int | tuple[int, str | None]]
    ) -> None:
        """Subscribe once the bus has read the topics' state (epoch, seq, history)."""
        attached = await self.bus.attach(topics)
        self._need_hub().subscribe(conn, topics, self._now(), since=since)
        self._dispatch()
        if attached:
            await self.bus.wake()

    async def _writer(self, client: _Client) -> None:
        hub, conn, ws = self._need_hub(), client.conn, client.ws
        cause: CloseCause | None = None
        timeout = self.settings.server.close_timeout
        try:
            while True:
                client.idle = True
                await client.wait()
                client.idle = False
                published_at = hub.oldest_queued_at(conn)
                frames = hub.drain(conn)
                if frames:
                    self._write(ws, frames)
                    if ws.paused:
                        # The transport buffer is over its high-water mark: wait for the
                        # peer to read, but not forever (a peer that stopped reading).
                        async with asyncio.timeout(timeout):
                            await ws.drain()
                    if published_at is not None:
                        self.metrics.observe_publish_to_write(self._now() - published_at)
                if client.ping_due:
                    client.ping_due = False
                    async with asyncio.timeout(timeout):
                        pong = await ws.ping()
                    # A Future in fact; ensure_future returns it as is, typed.
                    asyncio.ensure_future(pong).add_done_callback(
                        functools.partial(self._pong, conn)
                    )
                if client.close is not None:
                    close = client.close
                    await ws.close(close.code, close.reason)
                    return
        except TimeoutError:
            # The peer stopped reading and the write buffer is full: nothing more can be
            # written, not even a close frame.
            cause = CloseCause.SLOW_CONSUMER
            ws.transport.abort()
        except ConnectionClosed:
            cause = CloseCause.WRITE_ERROR
        finally:
            hub.writer_done(conn, self._now(), cause)
            self._dispatch()

    def _write(self, ws: ServerConnection, frames: list[bytes]) -> None:
        """Frame every queued message and hand them to the transport in one write.

        Synchronous, like websockets' own ``broadcast()``: no ``send()`` per frame, no
        drain unless the buffer is over its limit (the caller then waits, bounded). A
        server's frames are unmasked, so with no extension negotiated the frame of one
        event is the same bytes for every recipient: it is encoded once (``_frame``), not
        once per connection. Anything unusual (an extension, data websockets itself has
        queued, a fragmented message in progress) goes through websockets' encoder."""
        if not _open(ws):
            raise ConnectionClosedOK(None, None)
        self._write_open(ws, frames)

    def _write_open(self, ws: ServerConnection, frames: list[bytes]) -> None:
        """``_write`` for a connection already known to be open."""
        protocol = ws.protocol
        if protocol.extensions or protocol.writes or protocol.expect_continuation_frame:
            for frame in frames:
                protocol.send_text(frame)
            data = protocol.data_to_send()
        else:
            data = [self._frame(frame) for frame in frames]
        ws.transport.write(data[0] if len(data) == 1 else b"".join(data))

    def _frame(self, payload: bytes) -> bytes:
        """The text frame (RFC 6455 section 5.2, unmasked, FIN) carrying ``payload``,
        cached by identity: every recipient of an event drains the same bytes object."""
        cache = self._frames
        hit = cache.get(id(payload))
        if hit is not None and hit[0] is payload:
            return hit[1]
        n = len(payload)
        if n < 126:
            head = bytes((0x81, n))
        elif n < 65536:
            head = bytes((0x81, 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x81, 127)) + n.to_bytes(8, "big")
        wire = head + payload
        if len(cache) >= FRAME_CACHE:
            cache.clear()
        cache[id(payload)] = (payload, wire)
        return wire

    def _pong(self, conn: Connection, fut: asyncio.Future[float]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        hub = self._need_hub()
        hub.pong_received(conn, self._now())
        self._dispatch()

    # -- the core's decisions --------------------------------------------------------------

    def _dispatch(self) -> None:
        hub = self.hub
        if hub is None:
            return
        clients = self._clients
        for action in hub.actions():
            client = clients.get(action.client_id)
            match action:
                case Ping():
                    if client is not None:
                        client.ping_due = True
                        client.wake()
                case Close():
                    log.info(
                        "closing",
                        extra={
                            "client_id": action.client_id,
                            "cause": action.cause.value,
                            "code": action.code,
                        },
                    )
                    if client is not None:
                        client.close = action
                        client.wake()
                case Abort():
                    log.warning(
                        "aborting a stuck connection", extra={"client_id": action.client_id}
                    )
                    if client is not None:
                        client.abort()
                case Unregistered():
                    log.info(
                        "disconnected",
                        extra={
                            "client_id": action.client_id,
                            "cause": action.cause.value,
                            "code": action.code,
                            "duration": round(action.duration, 3),
                        },
                    )
                case Reject():
                    log.info(
                        "rejected",
                        extra={"client_id": action.client_id, "cause": action.cause.value},
                    )
        if hub.has_ready() and not self._flush_scheduled and self._loop is not None:
            # Writes wait for the end of this loop iteration: every event published meanwhile
            # (a burst from the bus reader, several publishers' messages read in one select)
            # leaves in one transport write per connection, not one per event.
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        deadline = hub.next_deadline()
        if deadline is not None and deadline < self._ticker_at:
            self._ticker_wake.set()

    def _flush(self) -> None:
        """Hand the outboxes that filled to their sockets (or writers), FLUSH_CHUNK clients
        at a time. Between chunks the loop runs: readers, the ticker, and publishers, whose
        events then join the outboxes of the clients still waiting, which therefore get
        them in the same write. Under load a fan-out thus coalesces by itself (fewer
        syscalls per event), and a fan-out to 10,000 clients does not hold the loop for its
        whole length."""
        self._flush_scheduled = False
        hub = self.hub
        if hub is None:
            return
        todo = self._flush_todo
        todo.extend(hub.take_ready())
        batch = todo[:FLUSH_CHUNK]
        del todo[:FLUSH_CHUNK]
        clients = self._clients
        drain = hub.drain
        cache = self._frames
        open_state = State.OPEN
        sample = True  # one publish-to-write reading per flush: the histogram is not free
        for cid in batch:
            client = clients.get(cid)
            if client is None:
                continue
            ws = client.ws
            if not client.idle or client.pending or ws.paused:
                client.wake()
                continue
            protocol, transport = ws.protocol, ws.transport
            if protocol.state is not open_state or transport.is_closing():
                client.wake()
                continue
            # The writer is parked with nothing in flight, so writing here, now, on its
            # behalf keeps the socket's order and its single writer (no await: nothing can
            # interleave). It saves a task wake-up per delivery; anything that may wait (a
            # full buffer, a ping, a close) still goes through the writer.
            conn = client.conn
            published_at = hub.oldest_queued_at(conn) if sample else None
            frames = drain(conn)
            if not frames:
                continue  # listed twice: already written
            if protocol.writes or protocol.extensions or protocol.expect_continuation_frame:
                self._write_open(ws, frames)
            elif len(frames) == 1:
                payload = frames[0]
                hit = cache.get(id(payload))
                transport.write(
                    hit[1] if hit is not None and hit[0] is payload else self._frame(payload)
                )
            else:
                transport.write(b"".join([self._frame(f) for f in frames]))
            if published_at is not None:
                self.metrics.observe_publish_to_write(self._now() - published_at)
                sample = False
            if _paused(ws):  # over the high-water mark now: the writer waits, bounded
                client.wake()
        if (todo or hub.has_ready()) and not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    async def _ticker(self) -> None:
        """The hub's one timer: sleeps until the core's next deadline (or the lag probe),
        reports a stall when it woke late, then ticks."""
        hub = self._need_hub()
        loop = asyncio.get_running_loop()
        threshold = self.settings.server.loop_stall_threshold
        while True:
            deadline = hub.next_deadline()
            now = loop.time()
            target = min(deadline if deadline is not None else math.inf, now + LAG_PROBE)
            self._ticker_at = target
            self._ticker_wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(target):
                    await self._ticker_wake.wait()
            now = loop.time()
            late = now - target
            if late > 0:
                self.metrics.observe_loop_lag(late)
            if late > threshold:
                hub.loop_stalled(now, late)
                log.warning("event loop stalled", extra={"seconds": round(late, 3)})
            hub.tick(now)
            self._dispatch()

    # -- HTTP ------------------------------------------------------------------------------

    def _http_app(self) -> HttpApp:
        router = (
            Router()
            .get("/healthz", self._healthz)
            .get("/readyz", self._readyz)
            .get("/metrics", self._metrics)
            .post("/publish", self._http_publish)
        )
        # GET /, /static/<asset> and /api/snapshot: the live dashboard
        return Dashboard(self.dashboard_snapshot, self.auth).mount(router)

    def dashboard_snapshot(
        self, visible: Callable[[str], bool] = lambda topic: True
    ) -> dict[str, Any] | None:
        """What the dashboard shows now (``wirestate.adapters.server.dashboard.snapshot``), limited
        to the topics ``visible`` accepts; None before the hub starts."""
        if self.hub is None:
            return None
        return dashboard_snapshot(
            self.hub,
            self._now(),
            pollers=self._pollers,
            bus=self.bus.status(),
            bus_breaker=self.bus.breaker if isinstance(self.bus, RedisBus) else None,
            refused=self.metrics.rejections,
            visible=visible,
        )

    async def _healthz(self, request: HttpRequest) -> HttpResponse:
        return _json(200, {"status": "ok"})

    async def _readyz(self, request: HttpRequest) -> HttpResponse:
        if self._closing or self.hub is None:
            return _json(503, {"status": "shutting_down"})
        if not self.bus.ready:
            # Clients stay served locally, but a load balancer should send new ones elsewhere.
            return _json(503, {"status": "bus_down", "bus": self.bus.status()})
        return _json(
            200, {"status": "ready", "clients": len(self.hub.clients), "bus": self.bus.status()}
        )

    async def _metrics(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse(
            200,
            [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
            self.metrics.render(),
        )

    async def _http_publish(self, request: HttpRequest) -> HttpResponse:
        grants = OPEN
        if self.auth.required:
            token = token_from_request(request.headers, request.target)
            try:
                grants = self.auth.authenticate(token, now=time.time())
            except AuthError as exc:
                return _error(401, "unauthorized", f"a valid token is required ({exc.reason})")
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            return _error(400, "bad_json", "the body is not valid JSON")
        if not isinstance(body, dict) or set(body) != {"topic", "data"}:
            return _error(400, "invalid_message", 'send {"topic": "<name>", "data": <any JSON>}')
        try:
            topic = _TOPIC.validate_python(body["topic"])
        except ValidationError:
            return _error(
                400, "invalid_message", "topic: 1-128 characters of A-Z a-z 0-9 _ . : / -"
            )
        hub = self._need_hub()
        if topic in hub.config.reserved_topics:
            return _error(403, "forbidden", "only the server publishes on this topic")
        if not grants.may_publish(topic):
            return _error(403, "forbidden", "publishing there is outside your token's claims")
        try:
            seq = await self.publish(topic, body["data"])
        except BusUnavailable:
            return _error(503, "unavailable", "the node is stopping; publish on another node")
        return _json(200, {"seq": seq})

    # -- plumbing --------------------------------------------------------------------------

    def _need_hub(self) -> Hub:
        assert self.hub is not None, "the server has not started"
        return self.hub

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _stats(self) -> Any:
        return self._need_hub().stats if self.hub is not None else None

    def _connection_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        if self.hub is not None:
            for conn in self.hub.clients.values():
                counts[conn.state.value] = counts.get(conn.state.value, 0) + 1
        return counts


def _json(status: int, body: Any) -> HttpResponse:
    return json_response(body, status)


def _error(status: int, code: str, message: str) -> HttpResponse:
    return error_response(status, code, message)


class _Publisher:
    """What sources publish through: the server's synchronous publish on its own loop."""

    def __init__(self, server: WirestateServer) -> None:
        self.publish = server.publish_now


class _CauseProtocol(ServerProtocol):
    """websockets' protocol, but a frame over ``max_size`` is failed with the close cause
    ``message_too_big`` as the reason (DESIGN.md) instead of websockets' own sentence.

    websockets fails such a frame itself, inside its parser, before any wirestate code
    runs; found by ``wirestate fuzz``. Same layout as its base: swapped in per connection
    by class, at no memory cost."""

    def fail(self, code: CloseCode | int, reason: str = "") -> None:
        if code == CloseCode.MESSAGE_TOO_BIG:
            reason = CloseCause.MESSAGE_TOO_BIG.value
        super().fail(code, reason)


def _with_cause_reasons(base: type[ServerConnection]) -> type[ServerConnection]:
    class CauseConnection(base):  # type: ignore[misc, valid-type]
        def __init__(self, protocol: ServerProtocol, *args: Any, **kwargs: Any) -> None:
            protocol.__class__ = _CauseProtocol
            super().__init__(protocol, *args, **kwargs)

    return CauseConnection


class _Redact(logging.Filter):
    """Replaces tokens (and the configured secret) in a record's text before any handler
    sees it."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        clean = redact(text, self.secrets)
        if clean != text:
            record.msg, record.args = clean, None
        return True


def _install_redaction(secrets: list[str]) -> None:
    for name in ("websockets.server", "wirestate.server"):
        target = logging.getLogger(name)
        for old in [f for f in target.filters if isinstance(f, _Redact)]:
            target.removeFilter(old)
        target.addFilter(_Redact(secrets))


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _ip(ws: ServerConnection) -> str:
    try:
        return str(ws.remote_address[0])
    except (TypeError, IndexError):
        return "?"


def _peer(ws: ServerConnection) -> str:
    try:
        host, port = ws.remote_address[:2]
    except (TypeError, ValueError):
        return "?"
    return f"{host}:{port}"


def _paused(ws: ServerConnection) -> bool:
    """websockets' flag that the transport buffer is over its high-water mark (read again
    after a write: a function, so the type checker does not carry an earlier check over)."""
    return bool(ws.paused)


def _open(ws: ServerConnection) -> bool:
    return ws.protocol.state is State.OPEN and not ws.transport.is_closing()


async def _join(reader: Awaitable[None], writer: asyncio.Task[None]) -> None:
    """Run the reader here, then wait for the writer: a task group of two. An error or a
    cancellation of the reader (or of this wait) cancels the writer, and is re-raised once
    the writer has ended; a writer that failed is logged, type only."""
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


def _read_end(exc: ConnectionClosed) -> tuple[CloseCause, int | None]:
    """Why the reader ended: our 1009 for an oversized frame, else the peer's close frame
    (whatever its code), else a read error (no close frame: 1006)."""
    if exc.sent is not None and exc.sent.code == 1009:
        return CloseCause.MESSAGE_TOO_BIG, 1009
    if exc.rcvd is not None:
        return CloseCause.PEER_CLOSE, exc.rcvd.code
    return CloseCause.READ_ERROR, None


#: The young generation's threshold under ``tune_gc`` (CPython's default is 700).
GC_YOUNG = 10_000


def tune_gc() -> None:
    """The collector for many long-lived connections (docs/performance.md has the figures):

    * ``gc.freeze()`` after start-up: everything alive then (modules, settings, the hub)
      lives as long as the process; no collection walks it again;
    * a young generation of 10,000 allocations instead of 700: a handshake allocates a few
      hundred objects that mostly die young, and fewer young collections promote fewer of
      them to the old generations, whose collections walk every live connection.

    At 5,000 connections this took handshakes/s from 0.74x to 0.9x a plain websockets
    server's (which gains as much from the same tuning: it is not wirestate-specific)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG, middle, old)


async def run(settings: Settings) -> int:
    """Serve until SIGINT or SIGTERM, then shut down gracefully; returns the exit status."""
    server = WirestateServer(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        if settings.server.gc_tune:
            tune_gc()  # the service only: a library does not reach into its host's collector
        await stop.wait()
        log.info("signal received, shutting down")
    return 0
