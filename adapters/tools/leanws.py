"""A minimal, cheap asyncio WebSocket client (RFC 6455) for load generation.

A load generator that holds 10,000 connections must cost far less than the server it
measures (measured here: a full client library costs as much CPU per delivery as the
server; docs/performance.md). `LeanConnection` is one `asyncio.Protocol` per connection and
nothing else: no task, no future and no queue per message. Each complete text message is
handed to ``on_text`` synchronously, from ``data_received``.

What it does (RFC sections in brackets):

* Opening handshake [4.1]: an HTTP/1.1 GET with ``Upgrade: websocket``, a random
  ``Sec-WebSocket-Key`` and the caller's extra headers; the answer must be ``101`` with
  ``Upgrade: websocket``, ``Connection: upgrade`` and the right ``Sec-WebSocket-Accept``.
  No extension and no subprotocol is offered, so an answer that selects one is refused. Any
  other status fails `connect` with `HandshakeError` carrying the status code only: the
  response body is never read into the error (a server's error text stays out of logs).
* Server frames [5.2]: must be unmasked, without RSV bits. Text and binary messages,
  fragmented ones included, are reassembled [5.4] up to ``max_size`` bytes (1009 beyond
  it); a ping is answered at once with a masked pong carrying its payload [5.5.2]; pongs
  are counted and ignored; a close frame is answered with a close frame echoing its code
  [5.5.1], after which the client waits for the server to close TCP [7.1.1], at most
  ``close_timeout`` seconds before dropping it. Text payloads are not checked for valid
  UTF-8 (the load generator's parser does that, and bytes are what it wants).
* Client frames [5.3]: always masked with a fresh 4-byte key from ``os.urandom``; the XOR
  is one big-integer operation (``int.from_bytes``), not a Python loop over bytes. Each
  frame goes to the transport in one ``write``.

A frame that breaks the protocol (masked, RSV bits, unknown opcode, a fragmented or
oversized control frame, a continuation without a start, a message over ``max_size``) fails
the connection [7.1.7]: a close frame with 1002 (or 1009) is sent and TCP is closed; the
connection reports that code and a short description as its end.

How a connection ends, as ``closed`` (and ``on_close``) report it, ``(code, reason)``:

* the server sent a close frame: its code and reason (1005 and ``""`` for an empty one),
  whoever started the closing handshake;
* this client failed the connection for a protocol error: the code it sent (1002, 1009)
  and a short description;
* no close frame at all (TCP reset or EOF, `abort`, the close timeout): ``(None, "")``.

Ordering guarantee: ``on_text`` is never called before `connect` has returned. Frames that
arrive together with the handshake answer are delivered from a callback the event loop runs
right after (``call_soon``), so ``conn = await connect(...)`` followed by storing ``conn``
happens first. A caller that wraps `connect` in another task (``asyncio.wait_for`` on 3.11)
gets its result later and must not rely on this.

An exception raised by ``on_text`` or ``on_close`` is not caught here: asyncio logs it and
closes the transport (the connection then ends with ``(None, "")``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import ssl as ssl_module
from collections.abc import Callable, Sequence
from typing import Final, cast

__all__ = ["DEFAULT_MAX_SIZE", "HandshakeError", "LeanConnection", "connect"]

#: RFC 6455 section 1.3: appended to the key before hashing it into Sec-WebSocket-Accept.
_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Largest message reassembled, in bytes (websockets' default max_size).
DEFAULT_MAX_SIZE: Final = 2**20
#: Largest HTTP response head accepted during the handshake.
_MAX_HEAD: Final = 16384

_OP_CONT, _OP_TEXT, _OP_BINARY = 0x0, 0x1, 0x2
_OP_CLOSE, _OP_PING, _OP_PONG = 0x8, 0x9, 0xA
_FIN_TEXT: Final = 0x81  # the common case: a whole text message in one frame

# Connection phases.
_HANDSHAKE, _READY, _OPEN, _CLOSED = 0, 1, 2, 3

#: Close codes that must never appear in a close frame (RFC 6455 section 7.4.1).
_UNSENDABLE: Final = frozenset({1005, 1006, 1015})


class HandshakeError(Exception):
    """The opening handshake failed. `status` is the HTTP status the server answered with,
    or None when there was no usable answer (malformed, closed early). The message never
    includes the response body."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(message)
        self.status = status


def _mask(data: bytes, key: bytes) -> bytes:
    """``data`` XOR the repeated 4-byte ``key`` (RFC 6455 section 5.3), in C speed."""
    n = len(data)
    if not n:
        return b""
    keys = (key * ((n + 3) // 4))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(keys, "big")).to_bytes(n, "big")


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame."""
    n = len(payload)
    key = os.urandom(4)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0xFF)) + n.to_bytes(8, "big")
    return head + key + _mask(payload, key)


def _close_payload(code: int, reason: str) -> bytes:
    if code in _UNSENDABLE:
        return b""
    # A control frame carries at most 125 bytes: 2 for the code, 123 for the reason.
    text = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    return code.to_bytes(2, "big") + text


class LeanConnection(asyncio.Protocol):
    """One client connection; made by `connect`, which returns it open.

    Attributes: ``closed`` resolves with ``(code, reason)`` once the connection has ended
    (module docstring: what the values mean); ``frames_received`` counts every frame read
    (data, continuation and control frames), ``pings`` the server's pings it answered. Not
    reusable after it has ended.
    """

    __slots__ = (
        "_buf",
        "_close_code",
        "_close_reason",
        "_close_sent",
        "_close_timeout",
        "_closing",
        "_expected_accept",
        "_frag_op",
        "_frag_parts",
        "_frag_size",
        "_handshake",
        "_have",
        "_head",
        "_lost",
        "_max_size",
        "_need",
        "_on_binary",
        "_on_close",
        "_on_text",
        "_phase",
        "_request",
        "_timer",
        "_transport",
        "closed",
        "frames_received",
        "pings",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        request: bytes,
        expected_accept: bytes,
        on_text: Callable[[bytes], None],
        on_binary: Callable[[bytes], None] | None,
        on_close: Callable[[int | None, str], None] | None,
        max_size: int,
        close_timeout: float,
    ) -> None:
        self._request = request
        self._expected_accept = expected_accept
        self._on_text = on_text
        self._on_binary = on_binary
        self._on_close = on_close
        self._max_size = max_size
        self._close_timeout = close_timeout
        self._transport: asyncio.Transport | None = None
        self._handshake: asyncio.Future[None] = loop.create_future()
        self._head = bytearray()
        self._phase = _HANDSHAKE
        # Unparsed input: the tail of an incomplete frame (and, before `_start`, everything
        # received after the handshake). `_need` bytes must be present to make progress.
        self._buf: list[bytes] = []
        self._have = 0
        self._need = 2
        self._frag_op: int | None = None
        self._frag_parts: list[bytes] = []
        self._frag_size = 0
        self._close_sent = False
        self._closing = False  # a close frame was received or sent: no more data frames
        self._close_code: int | None = None
        self._close_reason = ""
        self._timer: asyncio.TimerHandle | None = None
        self._lost = False  # TCP ended before `_start` ran
        self.closed: asyncio.Future[tuple[int | None, str]] = loop.create_future()
        self.frames_received = 0
        self.pings = 0

    # -- public API ------------------------------------------------------------------------

    @property
    def open(self) -> bool:
        """True until a close frame was sent or received, or the connection ended."""
        return self._phase in (_READY, _OPEN) and not self._closing

    def send_text(self, data: bytes | str) -> None:
        """Send one masked text frame, written to the transport at once. `data` must be
        valid UTF-8 (a ``str`` is encoded). Does nothing once the connection is no longer
        `open`: a load generator racing a server's close need not guard every send."""
        if self._phase in (_READY, _OPEN) and not self._closing:
            payload = data.encode("utf-8") if isinstance(data, str) else data
            assert self._transport is not None
            self._transport.write(_client_frame(_OP_TEXT, payload))

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake: send a close frame, then wait (in the background)
        for the server's close frame and its closing of TCP, dropping TCP after
        ``close_timeout`` seconds. Await ``closed`` for the outcome. Idempotent; after the
        server has sent its close frame this only waits for the end."""
        if self._phase == _CLOSED or self._close_sent:
            return
        self._send_close(code, reason)
        self._arm_close_timer()

    def abort(self) -> None:
        """Drop the TCP connection now, without a closing handshake; frames already read
        are not delivered. Idempotent."""
        if self._transport is not None and self._phase != _CLOSED:
            self._closing = True
            self._transport.abort()

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's do not subclass asyncio.Transport, hence no check.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        phase = self._phase
        if phase == _OPEN:
            self._feed(data)
        elif phase == _READY:  # delivery starts once connect() has returned
            self._buf.append(data)
            self._have += len(data)
        elif phase == _HANDSHAKE:
            self._handshake_data(data)

    def eof_received(self) -> bool | None:
        return None  # let the transport close; connection_lost reports the end

    def connection_lost(self, exc: Exception | None) -> None:
        if self._phase == _HANDSHAKE:
            self._phase = _CLOSED
            if not self._handshake.done():
                self._handshake.set_exception(
                    HandshakeError(None, "the connection closed during the opening handshake")
                )
            self._resolve(call_back=False)
            return
        if self._phase == _READY:
            # connect() has not returned yet: `_start` delivers what came, then ends.
            self._lost = True
            return
        self._phase = _CLOSED
        self._resolve(call_back=True)

    # -- opening handshake -----------------------------------------------------------------

    def _handshake_data(self, data: bytes) -> None:
        if self._handshake.done():  # refused or abandoned: the transport is going away
            return
        head = self._head
        head += data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > _MAX_HEAD:
                self._refuse(HandshakeError(None, "the HTTP response head is too large"))
            return
        rest = bytes(head[end + 4 :])
        lines = bytes(head[:end]).split(b"\r\n")
        self._head = bytearray()
        parts = lines[0].split(b" ", 2)
        try:
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
                raise ValueError
            status = int(parts[1])
        except ValueError:
            self._refuse(HandshakeError(None, "the answer to the upgrade is not HTTP/1.1"))
            return
        if status != 101:
            self._refuse(
                HandshakeError(status, f"the server answered the upgrade with HTTP {status}")
            )
            return
        fields: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            key = name.strip().decode("latin-1").lower()
            text = value.strip().decode("latin-1")
            fields[key] = f"{fields[key]}, {text}" if key in fields else text
        connection = {token.strip().lower() for token in fields.get("connection", "").split(",")}
        problem = None
        if fields.get("upgrade", "").lower() != "websocket" or "upgrade" not in connection:
            problem = "the 101 answer lacks Upgrade: websocket / Connection: upgrade"
        elif fields.get("sec-websocket-accept", "").encode("latin-1") != self._expected_accept:
            problem = "wrong Sec-WebSocket-Accept"
        elif "sec-websocket-extensions" in fields or "sec-websocket-protocol" in fields:
            problem = "the server selected an extension or subprotocol that was not offered"
        if problem is not None:
            self._refuse(HandshakeError(101, problem))
            return
        self._phase = _READY
        if rest:
            self._buf.append(rest)
            self._have = len(rest)
        if not self._handshake.done():
            self._handshake.set_result(None)

    def _refuse(self, error: HandshakeError) -> None:
        if not self._handshake.done():
            self._handshake.set_exception(error)
        if self._transport is not None:
            self._transport.abort()

    def _start(self) -> None:
        """Deliver what arrived with the handshake; from now on frames go straight through.
        Scheduled by `connect` right before it returns."""
        if self._phase != _READY:
            return
        self._phase = _OPEN
        if self._buf:
            pending = b"".join(self._buf)
            self._buf.clear()
            self._have = 0
            self._need = 2
            self._feed(pending)
        if self._lost:
            self._phase = _CLOSED
            self._resolve(call_back=True)

    def _abandon(self) -> None:
        """connect() failed or was cancelled after the transport existed: drop it."""
        if self._phase == _READY:
            self._phase = _HANDSHAKE  # connection_lost then resolves without on_close
        if self._transport is not None:
            self._transport.abort()
        elif not self.closed.done():
            self._phase = _CLOSED
            self.closed.set_result((None, ""))

    # -- frames ----------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        buf = self._buf
        if buf:
            buf.append(data)
            self._have += len(data)
            if self._have < self._need:
                return
            data = b"".join(buf)
            buf.clear()
        n = len(data)
        pos = 0
        on_text = self._on_text
        while True:
            avail = n - pos
            if avail < 2:
                need = 2
                break
            b0 = data[pos]
            b1 = data[pos + 1]
            length = b1 & 0x7F
            if length < 126:
                start = pos + 2
            elif length == 126:
                if avail < 4:
                    need = 4
                    break
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
                start = pos + 4
            else:
                if avail < 10:
                    need = 10
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                start = pos + 10
            if b1 & 0x80:
                self._fail(1002, "masked frame from the server")
                return
            if length > self._max_size:
                self._fail(1009, "frame over max_size")
                return
            end = start + length
            if end > n:
                need = end - pos
                break
            payload = data[start:end]
            pos = end
            self.frames_received += 1
            if b0 == _FIN_TEXT and self._frag_op is None and not self._closing:
                on_text(payload)
            else:
                self._frame(b0, payload)
            if self._phase != _OPEN:  # a callback closed or aborted the connection
                return
        self._have = n - pos
        self._need = need
        if self._have:
            buf.append(data[pos:] if pos else data)

    def _frame(self, b0: int, payload: bytes) -> None:
        """Every frame but an unfragmented text message (the fast path in `_feed`)."""
        opcode = b0 & 0x0F
        fin = b0 & 0x80
        if b0 & 0x70:
            self._fail(1002, "RSV bits set without an extension")
            return
        if opcode >= 0x8:
            if not fin or len(payload) > 125:
                self._fail(1002, "fragmented or oversized control frame")
            elif opcode == _OP_PING:
                if not self._closing and self._transport is not None:
                    self._transport.write(_client_frame(_OP_PONG, payload))
                    self.pings += 1
            elif opcode == _OP_CLOSE:
                self._close_frame(payload)
            elif opcode != _OP_PONG:
                self._fail(1002, f"unknown opcode {opcode:#x}")
            return
        if opcode == _OP_CONT:
            if self._frag_op is None:
                self._fail(1002, "continuation frame without a message")
                return
        elif opcode in (_OP_TEXT, _OP_BINARY):
            if self._frag_op is not None:
                self._fail(1002, "new message inside a fragmented one")
                return
            self._frag_op = opcode
        else:
            self._fail(1002, f"unknown opcode {opcode:#x}")
            return
        self._frag_size += len(payload)
        if self._frag_size > self._max_size:
            self._fail(1009, "message over max_size")
            return
        self._frag_parts.append(payload)
        if not fin:
            return
        message_op = self._frag_op
        message = b"".join(self._frag_parts)
        self._frag_op, self._frag_parts, self._frag_size = None, [], 0
        if self._closing:
            return  # data after a close frame is ignored (RFC 6455 section 5.5.1)
        if message_op == _OP_TEXT:
            self._on_text(message)
        elif self._on_binary is not None:
            self._on_binary(message)

    def _close_frame(self, payload: bytes) -> None:
        if len(payload) == 1:
            self._fail(1002, "close frame with a 1-byte payload")
            return
        if self._close_code is None:
            if payload:
                self._close_code = int.from_bytes(payload[:2], "big")
                self._close_reason = payload[2:].decode("utf-8", "replace")
            else:
                self._close_code = 1005
        self._closing = True
        if not self._close_sent:
            self._send_close(self._close_code, "")
        # The server closes TCP first (RFC 6455 section 7.1.1); don't wait forever for it.
        self._arm_close_timer()

    def _send_close(self, code: int, reason: str) -> None:
        self._close_sent = True
        self._closing = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(_client_frame(_OP_CLOSE, _close_payload(code, reason)))

    def _fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 section 7.1.7): a close frame, then close TCP."""
        if self._close_code is None:
            self._close_code, self._close_reason = code, reason
        if not self._close_sent:
            self._send_close(code, reason)
        self._phase = _CLOSED
        self._buf.clear()
        if self._transport is not None:
            self._transport.close()  # flushes the close frame, then connection_lost
        self._resolve(call_back=True)

    def _arm_close_timer(self) -> None:
        if self._timer is None and self._transport is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._close_timeout, self._transport.abort)

    def _resolve(self, *, call_back: bool) -> None:
        """Report the end once: cancel the close timer, call on_close, resolve `closed`."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.closed.done():
            return
        result = (self._close_code, self._close_reason)
        self.closed.set_result(result)
        if call_back and self._on_close is not None:
            self._on_close(*result)


def _check_header(name: str, value: str) -> None:
    for text in (name, value):
        if "\r" in text or "\n" in text:
            raise ValueError("header names and values cannot contain CR or LF")
    if not name or ":" in name:
        raise ValueError(f"bad header name {name!r}")


async def connect(
    host: str,
    port: int,
    path: str = "/ws",
    *,
    headers: Sequence[tuple[str, str]] = (),
    on_text: Callable[[bytes], None],
    on_close: Callable[[int | None, str], None] | None = None,
    timeout: float = 10.0,  # noqa: ASYNC109 (the API: one bound for TCP and the handshake)
    on_binary: Callable[[bytes], None] | None = None,
    ssl: ssl_module.SSLContext | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
    close_timeout: float = 5.0,
) -> LeanConnection:
    """Open a WebSocket connection to ``ws://host:port/path`` (``wss://`` with `ssl`).

    `path` is sent as given (a query string included). `headers` are added to the upgrade
    request (e.g. ``("Authorization", "Bearer …")``). `on_text` gets every text message's
    payload, `on_binary` every binary one's (dropped when None), `on_close` the end of a
    connection this function returned (never for a failed connect). `timeout` bounds the
    TCP connect and the handshake together.

    Raises `TimeoutError`, `OSError` (refused, unreachable, ...), `HandshakeError` (a
    status other than 101, or a 101 that is not a valid WebSocket answer) or `ValueError`
    (a header with CR/LF). A cancelled connect drops the transport and re-raises.
    """
    for name, value in headers:
        _check_header(name, value)
    loop = asyncio.get_running_loop()
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    authority = f"[{host}]" if ":" in host else host
    lines = [
        f"GET {path or '/'} HTTP/1.1",
        f"Host: {authority}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key.decode()}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers),
    ]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    conn = LeanConnection(
        loop, request, accept, on_text, on_binary, on_close, max_size, close_timeout
    )
    try:
        async with asyncio.timeout(timeout):
            await loop.create_connection(
                lambda: conn, host, port, ssl=ssl, server_hostname=host if ssl else None
            )
            await conn._handshake
    except BaseException:
        conn._abandon()
        raise
    loop.call_soon(conn._start)
    return conn
