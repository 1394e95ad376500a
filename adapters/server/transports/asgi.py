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

Rules of this module: it moves ASGI messages and nothing else. Each accepted WebSocket is
one `Session` (``wirestate.adapters.server.session``) over an `AsgiTransport`, in the task
the ASGI server gave the connection, exactly as on the websockets transport: the same
reader, writer, message handling, auth and the one place that unregisters.

* Upgrade checks are the service's admission, in the same order, each refusal counted; the
  refusal is a real HTTP status through the ASGI ``websocket.http.response`` extension when
  the server offers it (uvicorn does), else a ``websocket.close`` before accept (the server
  then answers 403) with 1008, or 1013 for limits and shutdown.
* Open mode (no ``[auth]``) serves loopback only, as ``WirestateServer.start`` does: the
  ASGI server's bind address is not known here, so a request that arrived on a non-loopback
  address (``scope["server"]``) is refused with 403, reason ``open_mode``.
* A frame over ``[limits] max_message_size`` closes with 1009 (the session checks the
  size: ASGI servers apply their own, larger limit).
* ASGI cannot abort a connection: the core's ``Abort``, or a writer whose send outlived the
  close timeout, cancels the session's reader instead, which ends the connection's handler.
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
from typing import Any, Final

from wirestate.adapters.server.admission import Refusal, RefusalReason, loopback
from wirestate.adapters.server.auth import token_from_request
from wirestate.adapters.server.logs import install_redaction
from wirestate.adapters.server.routes import HttpRequest, HttpResponse, error_response
from wirestate.adapters.server.service import WirestateServer
from wirestate.adapters.server.session import Ended, Session
from wirestate.core.causes import PROTOCOL_CLOSES, CloseCause
from wirestate.models.settings import Settings

__all__ = ["AsgiTransport", "WirestateASGI", "disconnect_cause", "route_path"]

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
OPEN_MODE: Final = (
    "open mode (no [auth]) serves loopback only; configure [auth],"
    " or set [server] open_beyond_loopback"
)
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
        secret = self.server.settings.auth.secret if self.server.settings.auth else None
        install_redaction(_LOGGERS, [secret.get_secret_value()] if secret else [])

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
        # A plain request to /ws is the router's (426, or 401 for a token the upgrade refuses).
        path = route_path(scope)
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
            response = await server.http_app(request)
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
        admission = server.admission
        if server.hub is None:
            refusal = admission.refuse(503, RefusalReason.NOT_STARTED, NOT_STARTED)
            await _deny(scope, send, refusal.status, refusal.text)
            return
        if route_path(scope) != WS_PATH:
            await _deny(scope, send, 404, "no WebSocket endpoint here; connect to /ws\n")
            return
        if _exposed(server, scope):
            refusal = admission.refuse(403, RefusalReason.OPEN_MODE, OPEN_MODE)
            await _deny(scope, send, refusal.status, refusal.text)
            return
        headers = [(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in scope["headers"]]
        query = scope.get("query_string", b"").decode("latin-1")
        ip = admission.access.client_ip(_ip(scope), headers)
        decision = admission.decide(ip, headers, lambda: token_from_request(headers, f"?{query}"))
        if isinstance(decision, Refusal):
            await _deny(scope, send, decision.status, decision.text)
            return
        try:
            await send({"type": "websocket.accept"})
        except OSError:
            return  # gone during the upgrade: never registered
        transport = AsgiTransport(scope, receive, send, server.settings.server.close_timeout)
        # decision None: with [auth] first_message, the token comes in the first message
        await Session(server, transport, secrets.token_hex(8), ip, decision).run()


class AsgiTransport:
    """An accepted ASGI WebSocket as a session's `Transport` (the module docstring says
    what differs from the websockets transport)."""

    __slots__ = ("_receive", "_send", "disconnected", "scope", "timeout")

    keeps_alive = True  # the ASGI server's keep-alive watches the peer
    limits_size = False  # the ASGI server's own limit is larger: the session checks

    def __init__(self, scope: Scope, receive: Receive, send: Send, timeout: float) -> None:
        self.scope = scope
        self._receive = receive
        self._send = send
        self.timeout = timeout
        #: ``websocket.disconnect`` was received: nothing may be sent any more
        self.disconnected = False

    def peer(self) -> tuple[str, int] | None:
        client = self.scope.get("client")
        return (str(client[0]), int(client[1])) if client else None

    async def receive(self) -> str | bytes:
        while True:
            message = await self._receive()
            kind = message["type"]
            if kind == "websocket.disconnect":
                self.disconnected = True
                raise Ended(*disconnect_cause(message.get("code", 1005)))
            if kind != "websocket.receive":
                continue
            text: str | None = message.get("text")
            if text is not None:
                return text
            data: bytes | None = message.get("bytes")
            return data if data is not None else b""

    def ready(self) -> bool:
        return False  # every send may wait: the writer does it

    def write(self, frames: list[bytes]) -> None:  # pragma: no cover - ready() is False
        raise AssertionError("an ASGI connection is written by its writer only")

    def writable(self) -> bool:
        # The ASGI server buffers as it sees fit and says nothing: a send that blocks is
        # the only sign, and the writer's bound on it is what cuts a peer that stopped.
        return not self.disconnected

    def buffered(self) -> int:
        return 0

    async def drain(self) -> None:
        return None

    async def send(self, frames: list[bytes]) -> None:
        if self.disconnected:
            return  # the peer's close already ended it; the reader reports why
        try:
            for frame in frames:
                await self._send({"type": "websocket.send", "text": frame.decode()})
        except OSError:  # the ASGI spec's error for a send on a closed connection
            raise Ended() from None

    async def ping(self) -> Awaitable[object]:  # pragma: no cover - keeps_alive
        raise AssertionError("an ASGI connection is kept alive by its server")

    def ping_now(self, answered: Callable[[], None]) -> bool:  # pragma: no cover - keeps_alive
        raise AssertionError("an ASGI connection is kept alive by its server")

    async def close(self, code: int, reason: str) -> None:
        if self.disconnected:
            return
        try:
            async with asyncio.timeout(self.timeout):
                await self._send({"type": "websocket.close", "code": code, "reason": reason})
        except OSError:
            raise Ended() from None

    def abort(self) -> bool:
        return False  # ASGI has no abort: the session cancels its reader


def disconnect_cause(code: int) -> tuple[CloseCause, int]:
    """The close cause of a ``websocket.disconnect`` with ``code`` (module docstring)."""
    if code in (1005, 1006):
        return CloseCause.READ_ERROR, code
    if code in PROTOCOL_CLOSES:  # the ASGI server's protocol layer decided it
        return PROTOCOL_CLOSES[code], code
    if code == 1012:
        return CloseCause.SHUTDOWN, code
    return CloseCause.PEER_CLOSE, code


def _exposed(server: WirestateServer, scope: Scope) -> bool:
    """Open mode, and the request arrived on a non-loopback address that
    ``open_beyond_loopback`` does not allow."""
    if server.auth.required or server.settings.server.open_beyond_loopback:
        return False
    local = scope.get("server")
    return local is not None and not loopback(str(local[0]))


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
