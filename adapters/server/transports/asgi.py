"""The hub as an ASGI 3 application: ``/ws`` and the HTTP endpoints, to mount in Starlette,
FastAPI or any ASGI server, over the same core as the websockets server (which stays the
default transport: ``wirestate serve``).

::

    hub = WirestateASGI(load_settings())
    app = Starlette(routes=[Mount("/hub", app=hub)], lifespan=hub.lifespan)
    # ws://host/hub/ws, GET /hub/healthz /hub/readyz /hub/metrics, POST /hub/publish

Starting and stopping. Served on its own (``uvicorn module:hub``) the app answers the ASGI
``lifespan`` scope: startup starts the hub, its ticker and its sources
(``WirestateServer.start_core``), shutdown runs ``WirestateServer.stop``. Mounted, it gets
no lifespan (Starlette's ``Mount`` does not forward it): enter ``hub.running()`` from the
parent's lifespan, or pass ``hub.lifespan`` as the parent's ``lifespan=``. Nothing starts
on a first request: until the hub runs, every request is answered 503 ``not_started``.

Rules of this module (those of ``wirestate.adapters.server``, over ASGI messages):

* One connection is one handler (the ASGI server's task for it). A ``TaskGroup`` runs the
  reader (``receive()`` to the core) and the writer (the outbox to ``send()``, the only task
  that sends once the upgrade is accepted); each reports its own end to the core from its
  ``finally``, and the handler's ``finally`` is the one place that unregisters, after the
  group has ended, so both pumps have finished (lifecycle invariant 1). The core's ``Abort``
  cancels both pumps.
* Inbound messages go through the server's own code (``admit``, ``_message``: auth, claims,
  the bus), binary frames are ``bad_input``, a frame over ``[limits] max_message_size``
  closes with 1009; ``_dispatch`` runs after every core input. No policy is decided here.
* Upgrade checks, in the websockets server's order: shutting down (503), connection limits
  (503, or 429 per IP), Origin allowlist (403), token from ``Authorization: Bearer`` or
  ``?token=`` (401), each counted in ``wirestate_connections_rejected_total{reason}``. The
  refusal is a real HTTP status through the ASGI ``websocket.http.response`` extension when
  the server offers it (uvicorn does), else a ``websocket.close`` before accept (the server
  then answers 403) with 1008, or 1013 for limits and shutdown.
* Open mode (no ``[auth]``) serves loopback only, as ``WirestateServer.start`` does: the
  ASGI server's bind address is not known here, so a request that arrived on a non-loopback
  address (``scope["server"]``) is refused with 403, reason ``open_mode``.
* Nothing from the peer or from an exception reaches the wire: errors are fixed texts; an
  endpoint that raises is a 500 and one log line naming the exception type. Logs go to the
  ``wirestate.asgi`` logger; tokens are scrubbed from it and from uvicorn's loggers, which
  print request paths with their ``?token=``.

Keep-alive. ASGI has no ping: the application can neither send a protocol ping nor see a
pong. Watching the peer is therefore the ASGI server's job (uvicorn: ``ws_ping_interval``
and ``ws_ping_timeout``, 20 s each by default; keep them on). The core still schedules its
pings (``ping_interval``) and the writer answers each in its turn by reporting the pong
itself: one keep-alive watches the peer, the ASGI server's, as one does on the websockets
transport, the core's. Consequences, both tested:

* when the ASGI server's keep-alive gives up, the application sees an ordinary
  ``websocket.disconnect``: uvicorn closes with 1011 but reports 1005 (or 1006) to the
  application, so the client is recorded as ``read_error`` with that code, not as
  ``keepalive_timeout``;
* a writer blocked in ``send()`` (a peer that stopped reading) cannot answer the core's ping,
  so such a peer is closed with ``keepalive_timeout`` after ``ping_timeout``, or with
  ``slow_consumer`` when the send's own bound (``close_timeout``) expires first, as on the
  websockets transport.

Close codes of ``websocket.disconnect``, mapped to close causes: 1005 and 1006 (the
connection ended without a close status: a dropped TCP connection, the server's keep-alive,
or a close frame carrying no code, which ASGI cannot tell apart) are ``read_error``; 1009
(the ASGI server's own frame size limit, uvicorn's ``ws_max_size``) is ``message_too_big``;
1012 (what uvicorn sends every connection when it shuts down, before the lifespan shutdown
reaches the app) is ``shutdown``; any other code is ``peer_close`` with that code.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Final, cast

from websockets.asyncio.server import ServerConnection

from wirestate.adapters.server.auth import Grants, token_from_request
from wirestate.adapters.server.service import (
    BINARY_MESSAGE,
    Refusal,
    WirestateServer,
    _Client,
    _loopback,
    _Redact,
)
from wirestate.adapters.server.transports.http import HttpRequest, HttpResponse, error_response
from wirestate.core.causes import CloseCause, ErrorCode
from wirestate.core.hub import Connection
from wirestate.models.settings import Settings

__all__ = ["WirestateASGI", "disconnect_cause", "route_path"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("wirestate.asgi")

WS_PATH: Final = "/ws"
NOT_STARTED: Final = (
    "the wirestate hub is not running: start it from the application's lifespan"
    " (async with hub.running(), or lifespan=hub.lifespan)"
)
OPEN_MODE: Final = "open mode (no [auth]) serves loopback only; configure [auth]"
#: Headers the ASGI server owns (framing and persistence).
_HOP_BY_HOP: Final = frozenset({"content-length", "transfer-encoding", "connection"})
#: Close codes of an upgrade refused without the response extension: policy (auth, origin,
#: path), try again later (limits, shutdown).
_POLICY, _AGAIN = 1008, 1013
_LOGGERS: Final = ("wirestate.asgi", "uvicorn.error", "uvicorn.access")


def route_path(scope: Scope) -> str:
    """The path below the mount point: ``scope["path"]`` minus ``scope["root_path"]``.

    Starlette's ``Mount`` (since 0.33) and uvicorn's ``--root-path`` leave the full path in
    ``path`` and put the mount point in ``root_path``; older routers passed the remainder in
    ``path``. A ``path`` that does not start with ``root_path`` (at a segment boundary) is
    therefore already relative and is returned as it is."""
    path: str = scope["path"]
    root: str = scope.get("root_path") or ""
    if not root or not path.startswith(root):
        return path
    rest = path[len(root) :]
    if not rest:
        return "/"
    return rest if rest.startswith("/") else path


class _AsgiClient(_Client):
    """A connection served over ASGI, in the server's registry beside websockets' own.

    It has no websockets connection: ``ws`` is None. ``WirestateServer._dispatch`` reads
    ``ws`` only for a writer parked as ``idle`` (to write on its behalf without a wake-up);
    this client's writer never sets ``idle``, so every delivery wakes it, and ``abort`` is
    overridden to cancel both pumps instead of aborting a transport."""

    __slots__ = ("disconnected", "reader")

    def __init__(self, conn: Connection) -> None:
        super().__init__(cast(ServerConnection, None), conn)
        self.reader: asyncio.Task[None] | None = None
        #: the reader saw ``websocket.disconnect``: nothing may be sent any more
        self.disconnected = False

    def abort(self) -> None:
        for task in (self.reader, self.writer):
            if task is not None:
                task.cancel()


class WirestateASGI:
    """An ASGI 3 application serving one `WirestateServer`'s hub (see the module docstring).

    ``server``: an existing, not yet started server (to ``add_source`` on it first, or to
    read its ``hub`` and ``metrics``); else one is built from ``settings``. The app starts it
    (``start_core``, no listener of its own) and stops it: through the ASGI lifespan, or
    ``running()`` / ``lifespan`` when mounted. A server runs once: start it once.
    """

    def __init__(
        self, settings: Settings | None = None, *, server: WirestateServer | None = None
    ) -> None:
        if server is not None and settings is not None:
            raise ValueError("pass settings or a server, not both")
        self.server = server or WirestateServer(settings)
        self._router = self.server._http_app()
        secret = self.server.settings.auth.secret if self.server.settings.auth else None
        _install_redaction([secret.get_secret_value()] if secret else [])

    # -- starting and stopping -------------------------------------------------------------

    async def start(self) -> None:
        """Start the hub, its ticker and its sources. Raises ``RuntimeError`` when the
        server was started before (a server runs once)."""
        if self.server.hub is not None:
            raise RuntimeError("this wirestate server was already started (a server runs once)")
        await self.server.start_core()
        log.info("started", extra={"epoch": self.server.epoch})
        if not self.server.auth.required:
            log.warning(
                "open mode: no [auth] configured, so every client may subscribe and publish;"
                " requests that arrive on a non-loopback address are refused"
            )

    async def stop(self) -> None:
        """``WirestateServer.stop``: close every client with 1001 (cause ``shutdown``), wait
        for them to be unregistered (bounded), stop the ticker and the sources."""
        await self.server.stop()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """``start`` on entry, ``stop`` on exit: for the lifespan of an application that
        mounts this one (Starlette's ``Mount`` does not forward the lifespan scope)."""
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    def lifespan(self, app: object) -> AbstractAsyncContextManager[None]:
        """``running()`` in the shape of Starlette's and FastAPI's ``lifespan=`` argument."""
        return self.running()

    # -- ASGI ------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:  # the ASGI spec: raise on a scope type the application does not know
            raise ValueError(f"unsupported ASGI scope type {kind!r}")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception:
                    # Our own startup, not peer input: the traceback belongs in the log.
                    log.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": "see the log"})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- HTTP ------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = self.server
        head_only = scope["method"] == "HEAD"
        if server.hub is None:
            await _respond(send, error_response(503, "not_started", NOT_STARTED), head_only)
            return
        if _exposed(server, scope):
            await _respond(send, error_response(403, "open_mode", OPEN_MODE), head_only)
            return
        path = route_path(scope)
        if path == WS_PATH:
            await _respond(send, error_response(426, headers=(("upgrade", "websocket"),)), False)
            return
        headers = tuple(
            (name.decode("latin-1").lower(), value.decode("latin-1"))
            for name, value in scope.get("headers", ())
        )
        limit = server.settings.limits.max_message_size
        body = await _read_body(receive, headers, limit)
        if body is _Body.GONE:  # the client left before its body arrived: nobody to answer
            return
        if body is _Body.TOO_LARGE:
            await _respond(send, error_response(413), head_only)
            return
        query = scope.get("query_string", b"").decode("latin-1")
        client = scope.get("client")
        request = HttpRequest(
            method=scope["method"],
            target=f"{path}?{query}" if query else path,
            path=path,
            query=query,
            headers=headers,
            body=body,
            client=(str(client[0]), int(client[1])) if client else None,
        )
        try:
            response = await self._router(request)
        except Exception as exc:
            # The type name only: exception text may carry request data or secrets.
            log.error("HTTP endpoint raised %s", type(exc).__name__)
            response = error_response(500)
        await _respond(send, response, head_only)

    # -- WebSocket -------------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return  # gone before the upgrade was considered
        server = self.server
        if server.hub is None:
            await _refuse(server, scope, send, Refusal(503, "not_started", NOT_STARTED + "\n"))
            return
        if route_path(scope) != WS_PATH:
            await _deny(scope, send, 404, "no WebSocket endpoint here; connect to /ws\n")
            return
        if _exposed(server, scope):
            await _refuse(server, scope, send, Refusal(403, "open_mode", OPEN_MODE + "\n"))
            return
        headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in scope["headers"]]
        query = scope.get("query_string", b"").decode("latin-1")
        decision = server.upgrade_decision(
            _ip(scope),
            next((v for n, v in headers if n.lower() == "origin"), None),
            lambda: token_from_request(headers, f"?{query}"),
        )
        if isinstance(decision, Refusal):
            await _deny(scope, send, decision.status, decision.text)
            return
        task = asyncio.current_task()
        assert task is not None
        server._handlers.add(task)  # stop() waits for this handler
        try:
            try:
                await send({"type": "websocket.accept"})
            except OSError:
                return  # gone during the upgrade: never registered
            if server._closing:  # stop() began while the upgrade was being accepted
                with contextlib.suppress(OSError):
                    await send({"type": "websocket.close", "code": 1001, "reason": "shutdown"})
                return
            # None: with [auth] first_message, the token comes in the first message, in time
            await self._serve(scope, receive, send, decision)
        finally:
            server._handlers.discard(task)

    async def _serve(
        self, scope: Scope, receive: Receive, send: Send, grants: Grants | None
    ) -> None:
        """One accepted connection, from registration to unregistration."""
        server = self.server
        hub = server._need_hub()
        now = server._now()
        cid = secrets.token_hex(8)
        conn = hub.connect(cid, now)
        hub.accept(conn, now)
        client = _AsgiClient(conn)
        ip = _ip(scope)
        server._register(client, grants, ip)
        try:
            hub.start(conn, server._now())
            log.info("connected", extra={"client_id": cid, "peer": _peer(scope)})
            server._dispatch()
            async with asyncio.TaskGroup() as tg:
                client.reader = tg.create_task(self._reader(client, receive), name=f"r-{cid}")
                client.writer = tg.create_task(self._writer(client, send), name=f"w-{cid}")
        finally:
            # The task group has ended: both pumps have reported their end.
            server._release(client, ip)

    async def _reader(self, client: _AsgiClient, receive: Receive) -> None:
        server = self.server
        hub, conn = server._need_hub(), client.conn
        limit = server.settings.limits.max_message_size
        cause, code = CloseCause.READ_ERROR, None
        try:
            while True:
                message = await receive()
                kind = message["type"]
                if kind == "websocket.disconnect":
                    client.disconnected = True
                    cause, code = disconnect_cause(message.get("code", 1005))
                    return
                if kind != "websocket.receive":
                    continue
                now = server._now()
                text: str | None = message.get("text")
                data: bytes | None = message.get("bytes") if text is None else None
                if _too_big(text, data, limit):
                    # What websockets' max_size does on the other transport: close 1009.
                    hub.close(conn, CloseCause.MESSAGE_TOO_BIG, now)
                    server._dispatch()
                    continue
                if not hub.admit(conn, now):
                    server._dispatch()
                    continue
                if text is None:
                    hub.bad_input(conn, ErrorCode.INVALID_MESSAGE, BINARY_MESSAGE, now)
                else:
                    attaching = server._message(conn, text, now)
                    if attaching is not None:  # the bus reads the topics first
                        await attaching
                server._dispatch()
        finally:
            hub.reader_done(conn, server._now(), cause, code)
            server._dispatch()

    async def _writer(self, client: _AsgiClient, send: Send) -> None:
        """The one task that sends after the upgrade: frames, then the close. Every send is
        bounded by the close timeout: a peer that stopped reading blocks ``send()``."""
        server = self.server
        hub, conn = server._need_hub(), client.conn
        timeout = server.settings.server.close_timeout
        cause: CloseCause | None = None
        try:
            while True:
                await client.wait()  # never marked idle: see _AsgiClient
                published_at = hub.oldest_queued_at(conn)
                frames = hub.drain(conn)
                if frames and not client.disconnected:
                    async with asyncio.timeout(timeout):
                        for frame in frames:
                            await send({"type": "websocket.send", "text": frame.decode()})
                    if published_at is not None:
                        server.metrics.observe_publish_to_write(server._now() - published_at)
                if client.ping_due:
                    # No ping in ASGI: the ASGI server's keep-alive watches the peer (module
                    # docstring), so the core's ping is answered here, in the writer's turn.
                    client.ping_due = False
                    hub.pong_received(conn, server._now())
                if client.close is not None:
                    close = client.close
                    if not client.disconnected:  # else the peer's close already ended it
                        async with asyncio.timeout(timeout):
                            await send(
                                {
                                    "type": "websocket.close",
                                    "code": close.code,
                                    "reason": close.reason,
                                }
                            )
                    return
        except TimeoutError:
            # The peer stopped reading. ASGI cannot abort the transport, which is what ends
            # the reader on the websockets transport: end it here, so the handler returns
            # and the ASGI server closes the connection.
            cause = CloseCause.SLOW_CONSUMER
            if client.reader is not None:
                client.reader.cancel()
        except OSError:  # the ASGI spec's error for a send on a closed connection
            cause = CloseCause.WRITE_ERROR
        finally:
            hub.writer_done(conn, server._now(), cause)
            server._dispatch()


def disconnect_cause(code: int) -> tuple[CloseCause, int]:
    """The close cause of a ``websocket.disconnect`` with ``code`` (module docstring)."""
    if code in (1005, 1006):
        return CloseCause.READ_ERROR, code
    if code == 1009:
        return CloseCause.MESSAGE_TOO_BIG, code
    if code == 1012:
        return CloseCause.SHUTDOWN, code
    return CloseCause.PEER_CLOSE, code


def _too_big(text: str | None, data: bytes | None, limit: int) -> bool:
    if text is not None:
        # Encoded only when the character count alone cannot decide (UTF-8: 1-4 bytes each).
        return len(text) > limit or (len(text) * 4 > limit and len(text.encode()) > limit)
    return data is not None and len(data) > limit


def _exposed(server: WirestateServer, scope: Scope) -> bool:
    """Open mode, and the request arrived on a non-loopback address."""
    if server.auth.required:
        return False
    local = scope.get("server")
    return local is not None and not _loopback(str(local[0]))


def _ip(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "?"


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


class _Body(enum.Enum):
    GONE = enum.auto()  # the client disconnected
    TOO_LARGE = enum.auto()  # over the limit: 413


async def _read_body(
    receive: Receive, headers: tuple[tuple[str, str], ...], limit: int
) -> bytes | _Body:
    """The request body, or TOO_LARGE as soon as that is known (from Content-Length, or
    once the chunks read pass ``limit``; the rest is not read), or GONE."""
    for name, value in headers:
        if name == "content-length" and value.strip().isdigit() and int(value) > limit:
            return _Body.TOO_LARGE
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return _Body.GONE
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return _Body.TOO_LARGE
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(send: Send, response: HttpResponse, head_only: bool) -> None:
    headers = [
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in response.headers
        if name.lower() not in _HOP_BY_HOP
    ]
    headers.append((b"content-length", str(len(response.body)).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head_only else response.body})


async def _refuse(server: WirestateServer, scope: Scope, send: Send, refusal: Refusal) -> None:
    server.refused(refusal)
    await _deny(scope, send, refusal.status, refusal.text)


async def _deny(scope: Scope, send: Send, status: int, text: str) -> None:
    """Answer an upgrade with an HTTP status, or close it before accepting."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8")],
            }
        )
        await send({"type": "websocket.http.response.body", "body": text.encode()})
    else:
        code = _AGAIN if status in (429, 503) else _POLICY
        await send({"type": "websocket.close", "code": code})


def _install_redaction(secrets: list[str]) -> None:
    for name in _LOGGERS:
        target = logging.getLogger(name)
        for old in [f for f in target.filters if isinstance(f, _Redact)]:
            target.removeFilter(old)
        target.addFilter(_Redact(secrets))
