"""The websockets transport: the listener of ``wirestate serve`` and each connection's
`Transport` for its session.

Rules of this module:

* It moves bytes and nothing else: the upgrade decision is the service's admission, the
  connection's life is its session, and what to write when is the core's.
* Writes are synchronous where websockets' own ``broadcast()`` is: a server's frames are
  unmasked, so with no extension negotiated the frame of one event is the same bytes for
  every recipient. `FrameCache` encodes it once (RFC 6455 section 5.2) and every recipient's
  write reuses it; a batch of frames leaves in one transport write. Anything unusual (an
  extension, data websockets queued itself, a fragmented message in progress) goes through
  websockets' own encoder.
* websockets' keepalive is off (the core owns keep-alive), and so is compression (a fan-out
  would compress once per subscriber).
* Closes the protocol layer decides carry the close cause as their reason: a frame over
  ``max_size`` fails with ``message_too_big``, not websockets' sentence (found by
  ``wirestate fuzz``).
* The upgrade's grants go from ``process_request`` to the handler in a weak-keyed map:
  nothing is left behind when a handshake fails between the two.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, cast

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

from wirestate.adapters.server.admission import Refusal, RefusalReason
from wirestate.adapters.server.auth import Grants, token_from_request
from wirestate.adapters.server.session import Ended, Session
from wirestate.adapters.server.transports.http import http_connection_factory
from wirestate.core.causes import PROTOCOL_CLOSES, CloseCause

if TYPE_CHECKING:
    from wirestate.adapters.server.service import WirestateServer

__all__ = ["FrameCache", "Listener", "WebsocketsTransport", "read_end"]

log = logging.getLogger("wirestate.server")

#: Encoded frames kept for reuse: the events of one burst (an event's recipients all drain
#: it within one flush or one writer wake-up).
FRAME_CACHE: Final = 64
WS_PATH: Final = "/ws"
_OPEN: Final = State.OPEN
_TEXT: Final = Opcode.TEXT
#: The opcodes RFC 6455 defines (continuation, text, binary, close, ping, pong).
_OPCODES: Final = frozenset(int(op) for op in Opcode)


class FrameCache:
    """Text frames by payload identity: every recipient of an event drains the same bytes
    object, so its frame is built once. The payload is kept beside its frame, so that an id
    is never reused while cached."""

    __slots__ = ("frames",)

    def __init__(self) -> None:
        self.frames: dict[int, tuple[bytes, bytes]] = {}

    def frame(self, payload: bytes) -> bytes:
        """The text frame (unmasked, FIN) carrying ``payload``."""
        cache = self.frames
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


def read_end(exc: ConnectionClosed) -> Ended:
    """Why the reader ended: a close the protocol layer decided (1002, 1007, 1009: its
    cause, whether or not the peer echoed the close), else the peer's close frame (whatever
    its code), else a read error (no close frame: 1006)."""
    if exc.sent is not None and exc.sent.code in PROTOCOL_CLOSES:
        return Ended(PROTOCOL_CLOSES[exc.sent.code], exc.sent.code)
    if exc.rcvd is not None:
        return Ended(CloseCause.PEER_CLOSE, exc.rcvd.code)
    return Ended(CloseCause.READ_ERROR, None)


class WebsocketsTransport:
    """A websockets connection as a session's `Transport`."""

    __slots__ = ("answered", "cache", "ws")

    keeps_alive = False
    limits_size = True  # websockets' max_size

    def __init__(self, ws: ServerConnection, cache: FrameCache) -> None:
        self.ws = ws
        self.cache = cache
        #: The payload of the last ping `ping_now` wrote, and who waits for its pong.
        self.answered: tuple[bytes, Callable[[], None]] | None = None

    def peer(self) -> tuple[str, int] | None:
        try:
            host, port = self.ws.remote_address[:2]
        except (TypeError, ValueError):
            return None
        return str(host), int(port)

    async def receive(self) -> str | bytes:
        try:
            return await self.ws.recv()
        except ConnectionClosed as exc:
            raise read_end(exc) from None

    def ready(self) -> bool:
        ws = self.ws
        return not ws.paused and ws.protocol.state is _OPEN and not ws.transport.is_closing()

    def write(self, frames: list[bytes]) -> None:
        ws = self.ws
        protocol = ws.protocol
        if protocol.writes or protocol.extensions or protocol.expect_continuation_frame:
            for frame in frames:
                protocol.send_text(frame)
            data = protocol.data_to_send()
            ws.transport.write(data[0] if len(data) == 1 else b"".join(data))
        elif len(frames) == 1:
            ws.transport.write(self.cache.frame(frames[0]))
        else:
            encode = self.cache.frame
            ws.transport.write(b"".join([encode(f) for f in frames]))

    def writable(self) -> bool:
        return not self.ws.paused

    def buffered(self) -> int:
        return int(self.ws.transport.get_write_buffer_size())

    async def drain(self) -> None:
        try:
            await self.ws.drain()
        except ConnectionClosed:
            raise Ended() from None

    async def send(self, frames: list[bytes]) -> None:
        ws = self.ws
        if ws.protocol.state is not _OPEN or ws.transport.is_closing():
            raise Ended()
        self.write(frames)

    async def ping(self) -> Awaitable[object]:
        try:
            return await self.ws.ping()
        except ConnectionClosed:
            raise Ended() from None

    def ping_now(self, answered: Callable[[], None]) -> bool:
        # The ping frame written as `write` writes events: no future, no timeout, no
        # wake-up of the writer (at 10,000 connections and 30 s, 333 pings a second). Its
        # payload is random, as websockets' own: only a peer that read the ping can answer
        # it, and a pong carrying anything else (an unsolicited one, or the answer to an
        # older ping) answers nothing.
        ws = self.ws
        if ws.protocol.writes or not self.ready():
            return False
        data = os.urandom(4)
        self.answered = (data, answered)
        ws.transport.write(b"\x89\x04" + data)
        return True

    def pong(self, data: bytes | bytearray | memoryview) -> None:
        """A pong frame arrived (from the protocol's parser)."""
        waiting = self.answered
        if waiting is not None and waiting[0] == data:
            self.answered = None
            waiting[1]()

    async def close(self, code: int, reason: str) -> None:
        # Bounded by websockets' own close_timeout (the server's close timeout).
        await self.ws.close(code, reason)

    def abort(self) -> bool:
        self.ws.transport.abort()
        return True


class _CauseProtocol(ServerProtocol):
    """websockets' protocol, with three changes. A close it decides itself (a frame over
    ``max_size``, a protocol error, invalid UTF-8: inside its parser, before any wirestate
    code runs) carries the close cause as its reason instead of websockets' own sentence.
    And a protocol ping is answered only when ``ping_hook`` admits it: pings count against
    the client's inbound rate, and no pong is queued for a peer that does not read. And each
    pong is shown to ``pong_hook`` (the transport's pings, `WebsocketsTransport.ping_now`,
    are not websockets' own). Swapped in per connection by class."""

    #: The session's check for each ping (None until the session exists: answered).
    ping_hook: Callable[[], bool] | None
    #: Told of each pong frame (None until the session exists).
    pong_hook: Callable[[bytes | bytearray | memoryview], None] | None
    #: Told at once when the protocol layer fails the connection with one of its own
    #: causes: the close is recorded now, not when the peer gets round to closing TCP.
    fail_hook: Callable[[CloseCause, int], None] | None

    def fail(self, code: CloseCode | int, reason: str = "") -> None:
        cause = PROTOCOL_CLOSES.get(int(code))
        super().fail(code, cause.value if cause is not None else reason)
        hook = self.fail_hook
        if cause is not None and hook is not None:
            hook(cause, int(code))

    def recv_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.PING:
            hook = self.ping_hook
            if hook is not None and not hook():
                return  # refused: counted by the rate limit, and no pong queued
        elif opcode is Opcode.PONG:
            pong = self.pong_hook
            if pong is not None:
                pong(frame.data)
        super().recv_frame(frame)


#: What `_admitted` answers for a connection that `process_request` never decided.
_UNDECIDED: Final = object()


class Listener:
    """The websockets server of one `WirestateServer`: ``/ws`` and, through the HTTP
    connection class, the HTTP endpoints on the same port."""

    def __init__(self, service: WirestateServer) -> None:
        self.service = service
        self.cache = FrameCache()
        self.server: Server | None = None
        #: An upgrade's decision, from ``process_request`` to the handler. Weak keys: a
        #: handshake that fails after the decision leaves nothing behind.
        self._admitted: weakref.WeakKeyDictionary[ServerConnection, tuple[Grants | None, str]] = (
            weakref.WeakKeyDictionary()
        )
        #: Connections accepted and not yet upgraded or done with (HTTP ones included):
        #: bounded by ``[limits] max_handshakes``, each by ``[server] open_timeout``.
        self.opening: set[ServerConnection] = set()

    @property
    def handshakes(self) -> int:
        return len(self.opening)

    def abort_handshakes(self) -> int:
        """Shutdown: drop every connection still in its upgrade (or an HTTP exchange) at
        once; returns how many."""
        left = list(self.opening)
        for connection in left:
            connection.transport.abort()
        return len(left)

    async def start(self) -> None:
        service = self.service
        settings = service.settings
        s = settings.server
        tls: ssl.SSLContext | None = None
        if s.certfile is not None and s.keyfile is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(s.certfile, s.keyfile)
        base = http_connection_factory(
            service.http_app,
            max_body=settings.limits.max_message_size,
            websocket_paths=(WS_PATH,),
            app_answers_plain=True,  # GET /ws: 426, or 401 for a token the upgrade refuses
        )

        listener = self
        opening = self.opening
        cap = settings.limits.max_handshakes

        class WirestateConnection(base):  # type: ignore[misc, valid-type]
            __slots__ = ("lean", "message_hook", "need", "partial")

            def __init__(self, protocol: ServerProtocol, *args: Any, **kwargs: Any) -> None:
                protocol.__class__ = _CauseProtocol
                protocol.ping_hook = None  # type: ignore[attr-defined]
                protocol.pong_hook = None  # type: ignore[attr-defined]
                protocol.fail_hook = None  # type: ignore[attr-defined]
                self.message_hook: Callable[[bytes | bytearray | memoryview], bool] | None = None
                #: Reads go through `read_frames` (set by the handler; False for good once
                #: websockets' parser must take everything).
                self.lean = False
                #: The start of a frame whose end has not arrived (lean reads only), and the
                #: length it must reach before it is parsed again (0: its head is not whole).
                #: Grown in place, so a frame arriving a byte per read costs no more than
                #: one arriving whole; bounded by max_size, past which websockets takes it.
                self.partial: bytearray | None = None
                self.need = 0
                super().__init__(protocol, *args, **kwargs)

            def data_received(self, data: bytes) -> None:
                if self.lean:
                    self.read_frames(data)
                else:
                    super().data_received(data)

            def eof_received(self) -> bool | None:
                if self.lean:
                    self.to_websockets(b"")
                return super().eof_received()  # type: ignore[no-any-return]

            def read_frames(self, data: bytes) -> None:
                # A read cut into frames here; websockets' parser gets whole frames only, so
                # it stands between frames whenever this runs. A whole masked text frame,
                # with nothing of a fragmented message or the reader's queue before it, goes
                # to the session's hook; every other frame (control, binary, fragment, one
                # the hook declines and all after it in this read, anything once the
                # protocol left OPEN) goes to websockets' own parser, consecutive ones in
                # one call. A frame websockets must fail from its head (unmasked, reserved
                # bits or opcode, over max_size) hands it everything from there on.
                partial = self.partial
                if partial is not None:
                    partial += data
                    if len(partial) < self.need:
                        return
                    data = bytes(partial)
                    self.partial = None
                protocol = self.protocol
                limit = protocol.max_message_size
                end = len(data)
                pos = 0
                need = 0
                run = -1  # where the frames waiting for websockets' parser begin
                hooked = self.message_hook is not None  # False once a text frame was declined
                while end - pos >= 2:
                    b0 = data[pos]
                    b1 = data[pos + 1]
                    if not b1 & 0x80 or b0 & 0x70 or (b0 & 0x0F) not in _OPCODES:
                        self.to_websockets(data[pos if run < 0 else run :])
                        return
                    size = b1 & 0x7F
                    at = pos + 2
                    if size == 126:
                        if end - pos < 4:
                            break
                        size = int.from_bytes(data[at : at + 2], "big")
                        at += 2
                    elif size == 127:
                        if end - pos < 10:
                            break
                        size = int.from_bytes(data[at : at + 8], "big")
                        at += 8
                    if limit is not None and size > limit:
                        self.to_websockets(data[pos if run < 0 else run :])
                        return
                    stop = at + 4 + size
                    if stop > end:
                        need = stop - pos
                        break
                    if b0 == 0x81 and hooked:
                        if run >= 0:
                            super().data_received(data[run:pos])
                            run = -1
                        if (
                            protocol.state is _OPEN
                            and protocol.current_size is None
                            and self.offer(apply_mask(data[at + 4 : stop], data[at : at + 4]))
                        ):
                            pos = stop
                            continue
                        # Declined: queued for the reader, so every frame after it is too.
                        hooked = False
                    if run < 0:
                        run = pos
                    pos = stop
                if run >= 0:
                    super().data_received(data[run:pos])
                if protocol.state is not _OPEN:
                    self.to_websockets(data[pos:])
                elif pos < end:
                    self.partial = bytearray(data[pos:])
                    self.need = need

            def to_websockets(self, rest: bytes) -> None:
                """From here on every byte goes to websockets' parser, ``rest`` first."""
                self.lean = False
                partial = self.partial
                if partial is not None:
                    self.partial = None
                    rest = bytes(partial) + rest
                if rest:
                    super().data_received(rest)

            def connection_made(self, transport: Any) -> None:
                super().connection_made(transport)
                if len(opening) >= cap:
                    listener.refuse_at_accept(transport)
                    return
                opening.add(self)

            def connection_lost(self, exc: Exception | None) -> None:
                opening.discard(self)
                super().connection_lost(exc)

            def process_event(self, event: Any) -> None:
                # The hook first: until the session exists, events include the handshake's
                # request, which has no opcode.
                if (
                    self.message_hook is not None
                    and event.opcode is _TEXT
                    and event.fin
                    and self.offer(event.data)
                ):
                    return
                super().process_event(event)

            def offer(self, payload: bytes | bytearray | memoryview) -> bool:
                """A whole text frame, from `read_frames` or websockets' parser: whether the
                session took it now, without a wake-up of its reader (Session.inline). Only
                with nothing queued for the reader before it."""
                hook = self.message_hook
                return hook is not None and not self.recv_messages.frames and hook(payload)

        self.server = await serve(
            self._handle,
            s.host,
            s.port,
            compression=None,
            ping_interval=None,  # the core owns keep-alive
            ping_timeout=None,
            close_timeout=s.close_timeout,
            open_timeout=s.open_timeout,
            max_size=settings.limits.max_message_size,
            max_queue=64,
            process_request=self._process_request,
            create_connection=WirestateConnection,
            server_header="wirestate",
            ssl=tls,
        )

    def refuse_at_accept(self, transport: Any) -> None:
        """Over ``max_handshakes``: the new connection is dropped before reading a byte,
        counted, and logged (the operator sees that the cap, not the peer, refused it)."""
        self.service.admission.refuse(503, RefusalReason.MAX_HANDSHAKES, "too many upgrades")
        transport.abort()

    @property
    def port(self) -> int:
        assert self.server is not None, "not started"
        sock = next(iter(self.server.sockets))
        return int(sock.getsockname()[1])

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?", 1)[0] != WS_PATH:
            return ws.respond(404, "no WebSocket endpoint here; connect to /ws\n")
        admission = self.service.admission
        raw = list(request.headers.raw_items())
        ip = admission.access.client_ip(_ip(ws), raw)
        decision = admission.decide(ip, raw, lambda: token_from_request(raw, request.path))
        if isinstance(decision, Refusal):
            return ws.respond(decision.status, decision.text)
        self._admitted[ws] = (decision, ip)
        return None

    def _handle(self, ws: ServerConnection) -> Coroutine[Any, Any, None]:
        """websockets' handler: the session's own coroutine (a plain function returning it,
        so that no wrapping coroutine stays suspended per connection)."""
        self.opening.discard(ws)  # upgraded: a connection now, no longer a handshake
        admitted = self._admitted.pop(ws, _UNDECIDED)
        if admitted is _UNDECIDED:  # pragma: no cover - process_request runs first
            raise AssertionError("a connection reached the handler without an upgrade decision")
        decision, ip = cast(tuple[Grants | None, str], admitted)
        transport = WebsocketsTransport(ws, self.cache)
        session = Session(self.service, transport, ws.id.hex[:16], ip, decision)
        ws.protocol.ping_hook = session.admit_ping  # type: ignore[attr-defined]
        ws.protocol.fail_hook = session.protocol_failed  # type: ignore[attr-defined]
        ws.protocol.pong_hook = transport.pong  # type: ignore[attr-defined]
        ws.message_hook = session.inline  # type: ignore[attr-defined]
        # Frames read here from now on, unless websockets' parser already holds some.
        protocol = ws.protocol
        ws.lean = (  # type: ignore[attr-defined]
            not ws.frames_seen  # type: ignore[attr-defined]
            and protocol.state is _OPEN
            and not protocol.extensions
        )
        return session.run()

    async def stop(self, grace: float) -> None:
        """Stop listening, and end whatever connection is left (handshakes in flight, HTTP
        keep-alive, a stuck handler) after ``grace`` seconds at most."""
        server = self.server
        if server is None:
            return
        server.close(close_connections=False)
        try:
            async with asyncio.timeout(grace):
                await server.wait_closed()
        except TimeoutError:
            left = list(server.all_connections)
            log.warning("aborting connections left at shutdown", extra={"count": len(left)})
            for connection in left:
                connection.transport.abort()
            for task in server.handler_tasks:
                task.cancel()
            await asyncio.wait([asyncio.ensure_future(server.wait_closed())], timeout=grace)


def _ip(ws: ServerConnection) -> str:
    try:
        return str(ws.remote_address[0])
    except (TypeError, IndexError):
        return "?"
