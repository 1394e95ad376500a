"""The lean client against the real wirestate server, a real websockets server (which
refuses unmasked client frames), and, for split reads and protocol errors, a fake transport
fed by hand."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from wirestate.adapters.server.service import WirestateServer
from wirestate.adapters.tools import leanws
from wirestate.adapters.tools.leanws import HandshakeError, LeanConnection, connect
from wirestate.models.settings import Settings
from wirestate.testing.net import WAIT, free_port, server_settings, until


@pytest.fixture
async def server() -> AsyncIterator[WirestateServer]:
    async with WirestateServer(server_settings(), epoch="lean") as srv:
        yield srv


class Inbox:
    """Collects text messages; `next()` waits for one, bounded."""

    def __init__(self) -> None:
        self.items: list[bytes] = []
        self.closes: list[tuple[int | None, str]] = []
        self._event = asyncio.Event()
        self._read = 0

    def on_text(self, payload: bytes) -> None:
        self.items.append(payload)
        self._event.set()

    def on_close(self, code: int | None, reason: str) -> None:
        self.closes.append((code, reason))

    async def next(self) -> bytes:
        async with asyncio.timeout(WAIT):
            while self._read >= len(self.items):
                self._event.clear()
                await self._event.wait()
        self._read += 1
        return self.items[self._read - 1]

    async def next_json(self) -> dict[str, Any]:
        msg: dict[str, Any] = orjson.loads(await self.next())
        return msg


async def lean(port: int, inbox: Inbox, path: str = "/ws", **kw: Any) -> LeanConnection:
    return await connect(
        "127.0.0.1", port, path, on_text=inbox.on_text, on_close=inbox.on_close, **kw
    )


async def ended(conn: LeanConnection) -> tuple[int | None, str]:
    async with asyncio.timeout(WAIT):
        return await conn.closed


# -- against the wirestate server --------------------------------------------------------


async def test_welcome_subscribe_events_and_a_clean_close(server: WirestateServer) -> None:
    inbox = Inbox()
    conn = await lean(server.port, inbox)
    welcome = await inbox.next_json()
    assert welcome["type"] == "welcome"
    assert welcome["protocol"] == 1
    conn.send_text(b'{"type": "subscribe", "topics": ["orders"]}')
    assert (await inbox.next_json())["type"] == "subscribed"
    for i in range(3):
        await server.publish("orders", {"id": i})
    events = [await inbox.next_json() for _ in range(3)]
    assert [(e["type"], e["seq"], e["data"]["id"]) for e in events] == [
        ("event", 1, 0),
        ("event", 2, 1),
        ("event", 3, 2),
    ]
    conn.send_text('{"type": "ping", "id": "é"}')  # a str is sent as UTF-8
    assert await inbox.next_json() == {"type": "pong", "id": "é"}
    assert conn.frames_received >= 6
    conn.close()
    assert await ended(conn) == (1000, "")
    assert inbox.closes == [(1000, "")]
    assert not conn.open
    conn.send_text("ignored after the close")  # no error: a no-op once closed
    await until(lambda: server.hub is not None and not server.hub.clients)


async def test_server_pings_are_answered_so_the_connection_stays_open(
    server: WirestateServer,
) -> None:
    assert server.hub is not None
    inbox = Inbox()
    conn = await lean(server.port, inbox)
    await inbox.next()  # welcome
    pings = server.hub.stats.pings
    # ping_interval 0.05 s, ping_timeout 0.1 s: an unanswered ping would close it with 1011.
    await until(lambda: server.hub is not None and server.hub.stats.pings >= pings + 20)
    assert conn.open
    assert not conn.closed.done()
    assert len(server.hub.clients) == 1
    conn.close()
    assert await ended(conn) == (1000, "")


async def test_the_servers_close_code_and_cause_are_surfaced(server: WirestateServer) -> None:
    inbox = Inbox()
    conn = await lean(server.port, inbox)
    await inbox.next()
    await server.stop()
    assert await ended(conn) == (1001, "shutdown")
    assert inbox.closes == [(1001, "shutdown")]


async def test_a_refused_upgrade_fails_with_the_status_only() -> None:
    limited = Settings.model_validate(
        {"server": {"port": 0}, "limits": {"max_connections_per_ip": 1}}
    )
    async with WirestateServer(limited) as server:
        first = await lean(server.port, Inbox())
        with pytest.raises(HandshakeError) as refused:
            await lean(server.port, Inbox())
        assert refused.value.status == 429
        assert "too many" not in str(refused.value)  # the body stays out of the error
        first.abort()
        assert await ended(first) == (None, "")


# -- against a plain websockets server ---------------------------------------------------


@pytest.fixture
async def echo() -> AsyncIterator[int]:
    """websockets echoes each message back; after "close-me" it closes with 4000 "bye"."""

    async def handler(ws: ServerConnection) -> None:
        async for message in ws:
            if message == "close-me":
                await ws.close(4000, "bye")
                return
            if message == "fragments":
                await ws.send(["frag", "mented ", "message"])
                await ws.send([b"\x00\x01", b"\x02"])
                continue
            await ws.send(message)

    async with serve(handler, "127.0.0.1", 0, compression=None, max_size=None) as server:
        yield next(iter(server.sockets)).getsockname()[1]


async def test_masked_frames_of_every_length_are_accepted_and_echoed(echo: int) -> None:
    inbox = Inbox()
    conn = await lean(echo, inbox, path="/")
    # websockets fails the connection on an unmasked client frame: every echo proves the
    # masking; the sizes cover the 7-bit, 16-bit and 64-bit length forms both ways.
    for size in (0, 1, 125, 126, 65535, 65536, 200_000):
        payload = bytes(ord("a") + i % 26 for i in range(size))
        conn.send_text(payload)
        assert await inbox.next() == payload
    conn.close()
    assert await ended(conn) == (1000, "")


async def test_fragmented_messages_are_reassembled(echo: int) -> None:
    inbox = Inbox()
    binaries: list[bytes] = []
    conn = await lean(echo, inbox, path="/", on_binary=binaries.append)
    conn.send_text("fragments")
    assert await inbox.next() == b"fragmented message"
    await until(lambda: bool(binaries))
    assert binaries == [b"\x00\x01\x02"]
    conn.close()
    await ended(conn)


async def test_a_server_close_with_a_code_and_reason(echo: int) -> None:
    inbox = Inbox()
    conn = await lean(echo, inbox, path="/")
    conn.send_text("close-me")
    assert await ended(conn) == (4000, "bye")
    assert inbox.closes == [(4000, "bye")]


async def test_non_101_answers_and_bad_accepts_are_refused() -> None:
    def answer(ws: ServerConnection, request: Request) -> Response | None:
        if request.path == "/secret":
            return ws.respond(403, "secret body text\n")
        return None

    def tamper(ws: ServerConnection, request: Request, response: Response) -> Response:
        if request.path == "/bad-accept":
            del response.headers["Sec-WebSocket-Accept"]
            response.headers["Sec-WebSocket-Accept"] = "AAAAAAAAAAAAAAAAAAAAAAAAAAA="
        return response

    async def handler(ws: ServerConnection) -> None:
        await ws.wait_closed()

    async with serve(
        handler, "127.0.0.1", 0, process_request=answer, process_response=tamper
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        with pytest.raises(HandshakeError) as forbidden:
            await lean(port, Inbox(), path="/secret")
        assert forbidden.value.status == 403
        assert "secret body" not in str(forbidden.value)
        with pytest.raises(HandshakeError) as bad:
            await lean(port, Inbox(), path="/bad-accept")
        assert bad.value.status == 101
        assert "Accept" in str(bad.value)


async def test_refused_and_timed_out_connects() -> None:
    with pytest.raises(ConnectionRefusedError):
        await lean(free_port(), Inbox())

    silent: list[asyncio.StreamWriter] = []

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)

    server = await asyncio.start_server(never_answers, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(TimeoutError):
            await lean(port, Inbox(), timeout=0.1)
        for writer in silent:
            writer.close()


def test_headers_with_line_breaks_are_refused() -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        asyncio.run(
            connect(
                "127.0.0.1",
                1,
                headers=[("X-Evil", "a\r\nInjected: 1")],
                on_text=lambda _: None,
            )
        )


# -- the parser, fed by hand -------------------------------------------------------------


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.state = "open"

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.state != "open"

    def close(self) -> None:
        self.state = "closed"

    def abort(self) -> None:
        self.state = "aborted"


def server_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = False) -> bytes:
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    m = 0x80 if mask else 0
    if n < 126:
        head = bytes((first, m | n))
    elif n < 65536:
        head = bytes((first, m | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, m | 127)) + n.to_bytes(8, "big")
    if mask:
        return head + b"\x00\x00\x00\x00" + payload
    return head + payload


def unmask(frame: bytes) -> tuple[int, bytes]:
    """(first byte, payload) of a client frame; asserts it is masked."""
    assert frame[1] & 0x80, "client frames must be masked"
    n = frame[1] & 0x7F
    at = 2
    if n == 126:
        n, at = int.from_bytes(frame[2:4], "big"), 4
    elif n == 127:
        n, at = int.from_bytes(frame[2:10], "big"), 10
    key = frame[at : at + 4]
    data = frame[at + 4 : at + 4 + n]
    return frame[0], bytes(b ^ key[i % 4] for i, b in enumerate(data))


class Harness:
    """A LeanConnection on a fake transport, past a valid handshake."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.inbox = Inbox()
        key = base64.b64encode(b"0123456789abcdef")
        accept = base64.b64encode(hashlib.sha1(key + leanws._GUID).digest())
        self.conn = LeanConnection(
            loop, b"GET / HTTP/1.1\r\n\r\n", accept, self.inbox.on_text, None,
            self.inbox.on_close, 2**20, 5.0,
        )  # fmt: skip
        self.transport = FakeTransport()
        self.conn.connection_made(self.transport)
        self.accept = accept

    def handshake(self, extra: bytes = b"") -> None:
        self.conn.data_received(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + self.accept + b"\r\n\r\n" + extra
        )

    def sent(self) -> list[tuple[int, bytes]]:
        return [unmask(frame) for frame in self.transport.written[1:]]


async def test_frames_split_across_reads_are_parsed() -> None:
    h = Harness()
    big = bytes(range(256)) * 300  # 76,800 bytes: the 8-byte length form
    medium = b"m" * 300  # the 2-byte length form
    stream = (
        server_frame(0x1, b"hello")
        + server_frame(0x1, big)
        + server_frame(0x9, b"p!")
        + server_frame(0x1, medium)
        + server_frame(0x1, b"")
    )
    # The first frame arrives with the handshake answer: held until _start (connect's
    # call_soon), so on_text never runs before connect() has returned.
    h.handshake(stream[:3])
    assert h.inbox.items == []
    h.conn._start()
    rest = stream[3:]  # then pieces of every size, cutting headers and payloads
    pieces = [rest[:1], rest[1:2], rest[2:4], rest[4:9], rest[9:4000], rest[4000:70_000]]
    pieces.append(rest[70_000:])
    for piece in pieces:
        h.conn.data_received(piece)
    assert h.inbox.items == [b"hello", big, medium, b""]
    assert h.conn.frames_received == 5
    assert h.sent() == [(0x8A, b"p!")]  # the ping answered by a masked pong


async def test_every_byte_in_its_own_read() -> None:
    h = Harness()
    h.handshake()
    h.conn._start()
    stream = server_frame(0x1, b"a" * 200) + server_frame(0x1, b"b")
    for i in range(len(stream)):
        h.conn.data_received(stream[i : i + 1])
    assert h.inbox.items == [b"a" * 200, b"b"]


async def test_a_masked_server_frame_fails_the_connection_with_1002() -> None:
    h = Harness()
    h.handshake()
    h.conn._start()
    h.conn.data_received(server_frame(0x1, b"x", mask=True) + server_frame(0x1, b"after"))
    assert h.inbox.items == []
    assert h.transport.state == "closed"
    (first, payload), *_ = h.sent()
    assert first == 0x88
    assert int.from_bytes(payload[:2], "big") == 1002
    assert h.conn.closed.result() == (1002, "masked frame from the server")
    assert h.inbox.closes == [(1002, "masked frame from the server")]
    h.conn.connection_lost(None)  # reported once
    assert len(h.inbox.closes) == 1


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        (server_frame(0x3, b""), 1002),  # reserved opcode
        (server_frame(0x0, b"x"), 1002),  # continuation with no message
        (server_frame(0x9, b"p", fin=False), 1002),  # fragmented control frame
        (server_frame(0x1, b"a", fin=False) + server_frame(0x1, b"b"), 1002),
        (bytes((0xC1, 1)) + b"x", 1002),  # RSV1 without an extension
        (server_frame(0x8, b"\x03"), 1002),  # a 1-byte close payload
    ],
)
async def test_protocol_errors_close_with_1002(frames: bytes, code: int) -> None:
    h = Harness()
    h.handshake()
    h.conn._start()
    h.conn.data_received(frames)
    assert h.conn.closed.result()[0] == code


async def test_a_message_over_max_size_closes_with_1009() -> None:
    h = Harness()
    h.handshake()
    h.conn._start()
    h.conn.data_received(bytes((0x81, 127)) + (2**20 + 1).to_bytes(8, "big"))
    assert h.conn.closed.result()[0] == 1009


async def test_a_close_frame_is_answered_and_the_end_waits_for_tcp() -> None:
    h = Harness()
    h.handshake()
    h.conn._start()
    h.conn.data_received(server_frame(0x8, (1013).to_bytes(2, "big") + b"slow_consumer"))
    assert h.sent() == [(0x88, (1013).to_bytes(2, "big"))]  # the code echoed
    assert not h.conn.closed.done()  # the server closes TCP first
    h.conn.data_received(server_frame(0x1, b"late"))  # data after a close is ignored
    h.conn.connection_lost(None)
    assert h.conn.closed.result() == (1013, "slow_consumer")
    assert h.inbox.items == []


async def test_an_empty_close_frame_reports_1005() -> None:
    h = Harness()
    h.handshake()
    h.conn._start()
    h.conn.data_received(server_frame(0x8, b""))
    assert h.sent() == [(0x88, b"")]
    h.conn.connection_lost(None)
    assert h.conn.closed.result() == (1005, "")


async def test_a_connection_lost_before_start_still_delivers_what_came() -> None:
    h = Harness()
    h.handshake(server_frame(0x1, b"welcome"))
    h.conn.connection_lost(None)
    assert not h.conn.closed.done()
    h.conn._start()
    assert h.inbox.items == [b"welcome"]
    assert h.conn.closed.result() == (None, "")


def test_mask_matches_the_definition() -> None:
    key = b"\x01\x82\x7f\xff"
    for n in (0, 1, 3, 4, 5, 127, 1000):
        data = bytes(i * 7 % 256 for i in range(n))
        assert leanws._mask(data, key) == bytes(b ^ key[i % 4] for i, b in enumerate(data))
