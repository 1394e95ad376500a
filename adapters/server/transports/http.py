"""Plain HTTP/1.1 beside ``/ws`` on the WebSocket server's own port.

websockets 17.4 answers GETs through ``process_request`` but never reads a request body
(``Request.parse`` leaves it in the stream and refuses ``Transfer-Encoding``), so POST
/publish cannot go through it (checked with websockets 17.4). This module gives
``serve(create_connection=...)`` a `ServerConnection` subclass that looks at each
connection's first request head before websockets sees a byte of it:

* a request whose ``Upgrade`` header names ``websocket`` (and, when ``websocket_paths`` is
  given, whose path is one of them) goes on to websockets untouched: the exact bytes
  buffered so far are handed to ``ServerConnection.data_received``, however many reads
  the head took;
* anything else is plain HTTP: h11 parses it (Content-Length and chunked bodies, split
  reads, keep-alive, pipelining, ``Expect: 100-continue``), the `HttpApp` answers, and the
  connection writes the response on the transport itself.

Rules:

* The wire never carries input or exception text. Errors are JSON
  ``{"error": code, "message": fixed text}``; an app that raises gets a 500 and one log
  line naming the exception type only.
* Peer misbehaviour ends the connection after an answer: a malformed head is 400, a body
  over ``max_body`` is 413 (decided from Content-Length before reading, or while reading a
  chunked body), a request that does not arrive within ``request_timeout`` is 408 (or a
  silent close when nothing of it had arrived). Closing is a lingering close: write EOF,
  discard input until the peer's EOF (bounded), then close, so the answer is not destroyed
  by a TCP reset over unread input.
* No extra task: the HTTP exchange runs in the handler task websockets already created
  for the connection, inside the ``handshake()`` override, so websockets' own teardown
  (abort after ``handshake`` if the connection never opened) stays the only teardown.
  Consequence: websockets' ``open_timeout`` bounds the whole life of a plain-HTTP
  connection. Keep-alive therefore ends after ``max_age`` seconds (the response then carries
  ``Connection: close``); keep ``max_age`` plus the slowest app call under ``open_timeout``.
* Reading is paused while the app runs or a response is written, so a pipelining client
  cannot grow the buffer: at most one socket read is held beyond the request in progress.
* ``process_request``/``process_response`` given to ``serve()`` apply to upgrades only;
  authentication of plain-HTTP endpoints is the app's job.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import h11
from websockets.asyncio.server import ServerConnection
from websockets.http11 import SERVER, Request, Response

from wirestate.adapters.server.routes import (
    HttpApp,
    HttpRequest,
    HttpResponse,
    error_response,
    phrase,
)

__all__ = ["HttpServerConnection", "HttpSettings", "http_connection_factory"]

log = logging.getLogger(__name__)

#: How often an idle keep-alive connection checks whether the server stopped serving.
#: websockets' ``Server.close()`` gives connections that never opened no signal, and its
#: ``wait_closed()`` waits for their handler tasks.
_SHUTDOWN_POLL: Final = 0.25
#: Bound on a lingering close and on the final flush.
_LINGER: Final = 1.0
#: Headers the connection owns: framing and persistence are decided here, not by the app.
_HOP_BY_HOP: Final = frozenset({"content-length", "transfer-encoding", "connection"})


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """What `http_connection_factory` binds into its connection class.

    Kept in one object (not as class attributes one by one) so that a plain function given
    as ``app`` is not turned into a bound method by attribute lookup."""

    app: HttpApp
    max_body: int = 65536
    max_head: int = 16384
    request_timeout: float = 5.0
    max_age: float = 5.0
    websocket_paths: frozenset[str] | None = None
    #: A plain request to a websocket path goes to ``app`` (else it is answered 426 here).
    app_answers_plain: bool = False


class _Mode(enum.Enum):
    UNDECIDED = enum.auto()  # the first head is still arriving
    WEBSOCKET = enum.auto()  # websockets owns the connection
    HTTP = enum.auto()  # this module owns the connection


class _Wait(enum.Enum):
    DATA = enum.auto()
    TIMEOUT = enum.auto()
    GONE = enum.auto()  # peer gone, peer's EOF, or the server stopped while idle


class HttpServerConnection(ServerConnection):
    """A websockets `ServerConnection` that also serves plain HTTP/1.1.

    Use `http_connection_factory` to bind an app; this base class has no ``settings``.

    Overrides: ``data_received`` (classify the first head, then route bytes),
    ``eof_received`` (keep the write side open for a half-closed HTTP client),
    ``connection_lost`` (wake the HTTP exchange) and ``handshake`` (run the HTTP exchange in
    the handler task instead of the WebSocket handshake).
    """

    settings: ClassVar[HttpSettings]
    # Slots keep these out of the instance dict, which websockets' own attributes already
    # fill: without them every connection's dict grows by ~760 bytes (10,000 idle
    # WebSocket connections: 7 MB for fields only plain HTTP uses).
    __slots__ = (
        "_bad_head",
        "_born",
        "_eof",
        "_first",
        "_head",
        "_http_chosen",
        "_lingering",
        "_mode",
        "_parser",
        "_waiter",
        "frames_seen",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        s = getattr(self, "settings", None)
        if s is None:
            raise TypeError(
                "bind an app first: serve(create_connection=http_connection_factory(app))"
            )
        super().__init__(*args, **kwargs)
        self._mode = _Mode.UNDECIDED
        #: made on the first head that is not plainly an upgrade (``_sniff``)
        self._parser: h11.Connection | None = None
        self._head = bytearray()  # raw bytes of the undecided head, for websockets
        self._first: h11.Request | None = None  # the head that decided HTTP
        self._bad_head = False  # the first head was malformed
        self._http_chosen: asyncio.Future[None] = self.loop.create_future()
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._lingering = False
        self._born = self.loop.time()
        #: Bytes past the upgrade request reached websockets' frame parser (with the request,
        #: or in a later read): where that parser stands is then its own business.
        self.frames_seen = False

    # -- asyncio.Protocol ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        mode = self._mode
        if mode is _Mode.WEBSOCKET:
            self.frames_seen = True
            super().data_received(data)
            return
        parser = self._parser
        if mode is _Mode.HTTP:
            assert parser is not None
            if self._lingering:
                return  # discarded: the answer is sent, only the peer's EOF matters
            parser.receive_data(data)
            if not self._wake():
                # The exchange is busy (app or write): hold this read, take no more.
                self.transport.pause_reading()
            return
        self._head += data
        if parser is None:
            verdict = self._sniff()
            if verdict is None:
                return  # the head is not complete yet
            if verdict:
                self._upgrade()
                return
            parser = self._parser = h11.Connection(
                h11.SERVER, max_incomplete_event_size=self.settings.max_head
            )
            parser.receive_data(bytes(self._head))
        else:
            parser.receive_data(data)
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError:
            self._choose_http(None)
            return
        if event is h11.NEED_DATA:
            return  # h11 bounds the incomplete head by max_head
        if isinstance(event, h11.Request) and self._wants_websocket(event):
            self._upgrade()
            return
        self._choose_http(event if isinstance(event, h11.Request) else None)

    def _upgrade(self) -> None:
        """The head is a WebSocket upgrade: websockets takes it, and the connection."""
        self._mode = _Mode.WEBSOCKET
        head, self._head, self._parser = bytes(self._head), bytearray(), None
        self.frames_seen = len(head) > head.find(b"\r\n\r\n") + 4
        super().data_received(head)

    def eof_received(self) -> bool | None:  # type: ignore[override]
        # websockets' signature says None, asyncio's says bool | None: returning True keeps
        # the write side open, so a client that half-closed after its request still gets the
        # response.
        if self._mode is not _Mode.HTTP:
            super().eof_received()
            return None
        if not self._eof:
            self._eof = True
            if not self._lingering:
                assert self._parser is not None
                self._parser.receive_data(b"")
            self._wake()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._wake()

    # -- websockets -----------------------------------------------------------------------

    async def handshake(
        self,
        process_request: (
            Callable[[ServerConnection, Request], Awaitable[Response | None] | Response | None]
            | None
        ) = None,
        process_response: (
            Callable[
                [ServerConnection, Request, Response],
                Awaitable[Response | None] | Response | None,
            ]
            | None
        ) = None,
        server_header: str | None = SERVER,
    ) -> None:
        """Serve plain HTTP until the connection ends, or perform the WebSocket handshake.

        Returning with the protocol not OPEN makes websockets abort the transport, so the
        HTTP path returns only after the transport is closed (or the flush bound expired)."""
        await asyncio.wait(
            [self.request_rcvd, self._http_chosen, self.connection_lost_waiter],
            return_when=asyncio.FIRST_COMPLETED,
        )
        if self._mode is _Mode.HTTP:
            await self._serve_http()
            return
        await super().handshake(process_request, process_response, server_header)

    # -- classification -------------------------------------------------------------------

    def _wants_websocket(self, request: h11.Request) -> bool:
        if _head_size(request) > self.settings.max_head or _has_body(request):
            return False  # answered over HTTP: 431, or 400 for an upgrade with a body
        upgrade = any(
            name == b"upgrade"
            and any(token.strip().lower() == b"websocket" for token in value.split(b","))
            for name, value in request.headers
        )
        if not upgrade:
            return False
        paths = self.settings.websocket_paths
        return paths is None or _split_target(request.target)[0] in paths

    def _sniff(self) -> bool | None:
        """The common upgrade, told without h11 (it costs a parse per connection): a
        complete head ``GET <websocket path> HTTP/1.1`` with an ``Upgrade: websocket`` line.
        True: it is one (websockets validates the rest); False: let h11 decide (anything
        else, a malformed head included); None: the head is not complete yet."""
        head = self._head
        end = head.find(b"\r\n\r\n")
        if end < 0:
            return None if len(head) <= self.settings.max_head else False
        if end + 4 > self.settings.max_head:
            return False  # a head over the limit: h11's path answers 431, whatever it asks
        line = bytes(head[: head.find(b"\r\n")]).split(b" ")
        if len(line) != 3 or line[0] != b"GET" or line[2] != b"HTTP/1.1":
            return False
        paths = self.settings.websocket_paths
        if paths is not None and _split_target(line[1])[0] not in paths:
            return False
        lines = bytes(head[: end + 2]).lower()
        if b"\r\ncontent-length:" in lines or b"\r\ntransfer-encoding:" in lines:
            return False  # an upgrade with a body: h11's path answers 400
        return b"\r\nupgrade: websocket\r\n" in lines

    def _choose_http(self, first: h11.Request | None) -> None:
        self._mode = _Mode.HTTP
        self._first = first
        self._bad_head = first is None
        self._head = bytearray()
        # The exchange resumes reading when it needs more; until then nothing is buffered.
        self.transport.pause_reading()
        self._http_chosen.set_result(None)

    def _wake(self) -> bool:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return False
        waiter.set_result(None)
        return True

    # -- the HTTP exchange ----------------------------------------------------------------

    async def _serve_http(self) -> None:
        parser = self._parser
        assert parser is not None
        while True:
            received = await self._read_request(parser)
            if received is None:
                break
            if isinstance(received, HttpResponse):
                await self._write(parser, received, close=True, head_only=False)
                break
            response = await self._answer(received)
            close = (
                not self.server.is_serving()
                or self.loop.time() - self._born >= self.settings.max_age
            )
            if not await self._write(
                parser, response, close=close, head_only=received.method == "HEAD"
            ):
                break
            if parser.our_state is not h11.DONE or parser.their_state is not h11.DONE:
                break  # h11 decided to close (HTTP/1.0, Connection: close, or ours)
            parser.start_next_cycle()
        await self._finish()

    async def _read_request(self, parser: h11.Connection) -> HttpRequest | HttpResponse | None:
        """The next complete request, an error response to send before closing, or None
        when the connection should just close."""
        s = self.settings
        deadline = self.loop.time() + s.request_timeout
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event: Any
            if self._first is not None:
                event, self._first = self._first, None
            elif self._bad_head:
                self._bad_head = False
                return error_response(400)
            else:
                try:
                    event = parser.next_event()
                except h11.RemoteProtocolError:
                    return error_response(400)
            if event is h11.NEED_DATA:
                partial = head is not None or bool(parser.trailing_data[0])
                waited = await self._wait_data(deadline, idle=not partial)
                if waited is _Wait.DATA:
                    continue
                return error_response(408) if waited is _Wait.TIMEOUT and partial else None
            if isinstance(event, h11.Request):
                head = event
                refusal = _refused_head(event, s.max_head)
                if refusal is not None:
                    return refusal
                length = _content_length(event)
                if length is not None and length > s.max_body:
                    return error_response(413)
                if parser.they_are_waiting_for_100_continue:
                    self.transport.write(
                        parser.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                    )
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > s.max_body:
                    return error_response(413)
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return self._request(head, bytes(body))
            else:
                return None  # ConnectionClosed: the peer ended cleanly between requests

    async def _wait_data(self, deadline: float, *, idle: bool) -> _Wait:
        while True:
            if self._eof or self.connection_lost_waiter.done():
                return _Wait.GONE
            if idle and not self.server.is_serving():
                return _Wait.GONE
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                return _Wait.TIMEOUT
            waiter: asyncio.Future[None] = self.loop.create_future()
            self._waiter = waiter
            self.transport.resume_reading()
            try:
                await asyncio.wait(
                    [waiter], timeout=min(remaining, _SHUTDOWN_POLL) if idle else remaining
                )
            finally:
                self._waiter = None
            if waiter.done():
                return _Wait.DATA

    def _request(self, head: h11.Request, body: bytes) -> HttpRequest:
        target = head.target.decode("latin-1")
        path, query = _split_target(target)
        peer = self.remote_address
        client = (
            (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) and len(peer) >= 2 else None
        )
        return HttpRequest(
            method=head.method.decode("ascii"),
            target=target,
            path=path,
            query=query,
            headers=tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in head.headers),
            body=body,
            client=client,
        )

    async def _answer(self, request: HttpRequest) -> HttpResponse:
        paths = self.settings.websocket_paths
        if paths is not None and request.path in paths and not self.settings.app_answers_plain:
            return error_response(426, headers=(("upgrade", "websocket"),))
        try:
            return await self.settings.app(request)
        except Exception as exc:
            # The type name only: exception text may carry request data or secrets.
            log.error("HTTP app raised %s", type(exc).__name__)
            return error_response(500)

    async def _write(
        self, parser: h11.Connection, response: HttpResponse, *, close: bool, head_only: bool
    ) -> bool:
        """Send ``response``; False when the transport is gone."""
        if self.transport.is_closing():
            return False
        try:
            event, body = _h11_response(response, close=close)
        except (h11.LocalProtocolError, UnicodeEncodeError, ValueError):
            # A status or header h11 refuses is a bug in the app: answer 500, not garbage.
            log.error("HTTP app returned an invalid response (status %d)", response.status)
            event, body = _h11_response(error_response(500), close=close)
        if head_only or event.status_code in (204, 304):
            body = b""
        chunks = [parser.send(event) or b""]
        if body:
            chunks.append(parser.send(h11.Data(data=body)) or b"")
        chunks.append(parser.send(h11.EndOfMessage()) or b"")
        self.transport.write(b"".join(chunks))
        try:
            await self.drain()
        except OSError:
            return False
        return not self.transport.is_closing()

    async def _finish(self) -> None:
        """Lingering close: half-close, discard input until the peer's EOF, close, flush."""
        transport = self.transport
        if not transport.is_closing():
            if not self._eof and transport.can_write_eof():
                self._lingering = True
                transport.write_eof()
                transport.resume_reading()
                deadline = self.loop.time() + _LINGER
                while not self._eof and not self.connection_lost_waiter.done():
                    remaining = deadline - self.loop.time()
                    if remaining <= 0:
                        break
                    waiter: asyncio.Future[None] = self.loop.create_future()
                    self._waiter = waiter
                    try:
                        await asyncio.wait([waiter], timeout=remaining)
                    finally:
                        self._waiter = None
            transport.close()
        # Never cancel connection_lost_waiter (websockets relies on it): wait, don't wait_for.
        await asyncio.wait([self.connection_lost_waiter], timeout=_LINGER)


def http_connection_factory(
    app: HttpApp,
    *,
    max_body: int = 65536,
    max_head: int = 16384,
    request_timeout: float = 5.0,
    max_age: float = 5.0,
    websocket_paths: Collection[str] | None = None,
    app_answers_plain: bool = False,
) -> type[HttpServerConnection]:
    """A connection class for ``serve(create_connection=...)`` that serves ``app``.

    ``max_body``: largest request body (413 beyond). ``max_head``: largest request head,
    also the most buffered before deciding WebSocket or HTTP (400 beyond).
    ``request_timeout``: seconds a client has to deliver each complete request once the
    connection is ready for it. ``max_age``: keep-alive ends after this many seconds; keep
    it below serve()'s ``open_timeout``. ``websocket_paths``: when given, only upgrades to
    these paths reach websockets (others go to ``app``), and a plain request to one of them
    gets 426, or goes to ``app`` with ``app_answers_plain``."""
    settings = HttpSettings(
        app=app,
        max_body=max_body,
        max_head=max_head,
        request_timeout=request_timeout,
        max_age=max_age,
        websocket_paths=frozenset(websocket_paths) if websocket_paths is not None else None,
        app_answers_plain=app_answers_plain,
    )

    class BoundHttpServerConnection(HttpServerConnection):
        pass

    BoundHttpServerConnection.settings = settings
    return BoundHttpServerConnection


def _split_target(target: str | bytes) -> tuple[str, str]:
    text = target.decode("latin-1") if isinstance(target, bytes) else target
    path, _, query = text.partition("?")
    return path, query


def _head_size(request: h11.Request) -> int:
    """The bytes of a request head (near enough: the line and every header line)."""
    return (
        len(request.method)
        + len(request.target)
        + 12
        + sum(len(name) + len(value) + 4 for name, value in request.headers)
    )


def _has_body(request: h11.Request) -> bool:
    return any(name in (b"content-length", b"transfer-encoding") for name, _ in request.headers)


def _refused_head(request: h11.Request, max_head: int) -> HttpResponse | None:
    """A head answered with an error and the connection closed (RFC 9112): over the head
    limit (431, whatever path it arrived by); both Content-Length and Transfer-Encoding
    (400: section 6.1, a sign of request smuggling); a WebSocket upgrade with a body (400)."""
    if _head_size(request) > max_head:
        return error_response(431)
    names = {name for name, _ in request.headers}
    if b"content-length" in names and b"transfer-encoding" in names:
        return error_response(400, "bad_request", "both Content-Length and Transfer-Encoding")
    upgrade = any(
        name == b"upgrade" and b"websocket" in value.lower() for name, value in request.headers
    )
    if upgrade and _has_body(request):
        return error_response(400, "bad_request", "a WebSocket upgrade carries no body")
    return None


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)  # h11 has checked it is a single run of digits
    return None


def _h11_response(response: HttpResponse, *, close: bool) -> tuple[h11.Response, bytes]:
    headers = [
        (name.encode("latin-1"), value.encode("latin-1"))
        for name, value in response.headers
        if name.lower() not in _HOP_BY_HOP
    ]
    if response.status not in (204, 304):
        headers.append((b"content-length", str(len(response.body)).encode("ascii")))
    if close:
        headers.append((b"connection", b"close"))
    reason = phrase(response.status).encode("ascii")
    event = h11.Response(status_code=response.status, headers=headers, reason=reason)
    return event, response.body
