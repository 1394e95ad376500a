"""Plain HTTP beside /ws on one websockets port, over real loopback sockets.

Each test starts ``websockets.asyncio.server.serve`` with the connection class from
`http_connection_factory`, talks raw HTTP/1.1 through ``asyncio.open_connection`` and checks
what comes back on the wire. Every read is bounded by ``asyncio.wait_for``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from wirestate.adapters.server.routes import (
    HttpApp,
    HttpRequest,
    HttpResponse,
    Router,
    error_response,
    json_response,
)
from wirestate.adapters.server.transports.http import HttpServerConnection, http_connection_factory

WAIT = 3.0  # bound on every read; generous for a loaded CI box, never reached when passing
SECRET = "hunter2-do-not-echo"


async def _echo_ws(ws: ServerConnection) -> None:
    try:
        async for message in ws:
            await ws.send(message)
    except ConnectionClosed:
        pass  # raw-socket tests drop the TCP connection without a close frame


async def _healthz(request: HttpRequest) -> HttpResponse:
    return json_response({"status": "ok"})


async def _echo(request: HttpRequest) -> HttpResponse:
    return json_response(
        {
            "body": orjson.loads(request.body) if request.body else None,
            "length": len(request.body),
            "query": request.query_param("q"),
            "type": request.header("Content-Type"),
        }
    )


async def _boom(request: HttpRequest) -> HttpResponse:
    raise RuntimeError(SECRET)


async def _bad_header(request: HttpRequest) -> HttpResponse:
    return HttpResponse(200, [("x-bad", "line\r\nbreak")], b"{}")


async def _client(request: HttpRequest) -> HttpResponse:
    return json_response({"client": request.client})


def _router() -> Router:
    return (
        Router()
        .get("/healthz", _healthz)
        .post("/echo", _echo)
        .get("/boom", _boom)
        .get("/bad-header", _bad_header)
        .get("/client", _client)
    )


Start = Callable[..., Any]


#: Sizes of the reads every test server's connections saw, to prove reads were split.
READS: list[int] = []
#: Set on every read by a test server's connection, for `_until`.
ACTIVITY: list[asyncio.Event] = []


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Starts servers on 127.0.0.1 with ephemeral ports; closes them all at the end."""
    servers: list[Server] = []
    READS.clear()
    ACTIVITY[:] = [asyncio.Event()]

    async def _start(
        app: HttpApp | None = None, *, open_timeout: float = 10.0, **options: Any
    ) -> Server:
        class Counting(http_connection_factory(app or _router(), **options)):  # type: ignore[misc]
            def data_received(self, data: bytes) -> None:
                READS.append(len(data))
                ACTIVITY[0].set()
                super().data_received(data)

        server = await serve(
            _echo_ws,
            "127.0.0.1",
            0,
            create_connection=Counting,
            open_timeout=open_timeout,
            compression=None,
            ping_interval=None,
        )
        servers.append(server)
        return server

    yield _start
    for server in servers:
        server.close()
        await asyncio.wait_for(server.wait_closed(), WAIT)


def _port(server: Server) -> int:
    return int(server.sockets[0].getsockname()[1])


@pytest.fixture
async def port(start: Start) -> int:
    return _port(await start(max_body=1024))


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)


async def _read_reply(reader: asyncio.StreamReader, *, head_only: bool = False) -> Reply:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        assert name.lower() not in headers, f"duplicate header {name}"
        headers[name.lower()] = value.strip()
    length = 0 if head_only else int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), WAIT)
    return Reply(int(status_line.split(" ")[1]), headers, body)


async def _at_eof(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(1), WAIT) == b""


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    # The server may have reset after its answer; the test already has what it needs.
    with contextlib.suppress(ConnectionError):
        await asyncio.wait_for(writer.wait_closed(), WAIT)


async def _send_in_pieces(writer: asyncio.StreamWriter, data: bytes, size: int) -> None:
    """Writes ``data`` ``size`` bytes at a time, each its own segment and its own read.

    Client and server share the loop: two yields let the server's read run before the
    next write (no Nagle coalescing with TCP_NODELAY)."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i in range(0, len(data), size):
        writer.write(data[i : i + size])
        await writer.drain()
        await asyncio.sleep(0)
        await asyncio.sleep(0)


async def _until(condition: Callable[[], bool]) -> None:
    """Waits, bounded, until ``condition`` holds after some server read."""

    async def wait() -> None:
        while not condition():
            ACTIVITY[0].clear()
            await ACTIVITY[0].wait()

    await asyncio.wait_for(wait(), WAIT)


async def _request(port: int, *chunks: bytes) -> Reply:
    reader, writer = await _open(port)
    try:
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
        return await _read_reply(reader)
    finally:
        await _close(writer)


def _post(path: str, body: bytes, *extra: str) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: t",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


GET_HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"


# -- plain requests --------------------------------------------------------------------------


async def test_get_healthz(port: int) -> None:
    reply = await _request(port, GET_HEALTHZ)
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {"status": "ok"}


async def test_post_json_body_split_byte_by_byte(port: int) -> None:
    message = _post("/echo?q=a%20b", b'{"topic": "t", "data": [1, 2]}')
    reader, writer = await _open(port)
    try:
        await _send_in_pieces(writer, message, 1)
        reply = await _read_reply(reader)
    finally:
        await _close(writer)
    assert len(READS) > len(message) // 2  # the head and the body came in many reads
    assert reply.status == 200
    assert reply.json() == {
        "body": {"topic": "t", "data": [1, 2]},
        "length": 30,
        "query": "a b",
        "type": "application/json",
    }


async def test_two_requests_on_one_keep_alive_connection(port: int) -> None:
    reader, writer = await _open(port)
    try:
        writer.write(GET_HEALTHZ)
        first = await _read_reply(reader)
        writer.write(_post("/echo", b"[3]"))
        second = await _read_reply(reader)
        # pipelined: both requests in one write, answered in order
        writer.write(_post("/echo", b"[4]") + GET_HEALTHZ)
        third, fourth = await _read_reply(reader), await _read_reply(reader)
    finally:
        await _close(writer)
    assert first.json() == {"status": "ok"}
    assert "connection" not in first.headers
    assert second.json()["body"] == [3]
    assert third.json()["body"] == [4]
    assert fourth.json() == {"status": "ok"}


def _gate() -> tuple[Router, asyncio.Event, asyncio.Event, list[str]]:
    """A router whose POST /wait blocks until released; GET /healthz answers at once."""
    entered, release = asyncio.Event(), asyncio.Event()
    finished: list[str] = []

    async def wait(request: HttpRequest) -> HttpResponse:
        entered.set()
        await release.wait()
        finished.append(request.path)
        return json_response({"waited": True})

    return Router().post("/wait", wait).get("/healthz", _healthz), entered, release, finished


async def test_request_sent_while_the_app_runs_is_answered_after(start: Start) -> None:
    router, entered, release, _ = _gate()
    port = _port(await start(router))
    reader, writer = await _open(port)
    try:
        # After a first exchange the connection reads again, and waits for the next request.
        writer.write(GET_HEALTHZ)
        await _read_reply(reader)
        writer.write(_post("/wait", b"{}"))
        await asyncio.wait_for(entered.wait(), WAIT)
        reads = len(READS)
        writer.write(GET_HEALTHZ)  # arrives while the exchange is busy: held, reading paused
        await _until(lambda: len(READS) > reads)
        release.set()
        first, second = await _read_reply(reader), await _read_reply(reader)
    finally:
        await _close(writer)
    assert first.json() == {"waited": True}
    assert second.json() == {"status": "ok"}


async def test_peer_gone_while_the_app_runs(start: Start, caplog: pytest.LogCaptureFixture) -> None:
    router, entered, release, finished = _gate()
    server = await start(router)
    _, writer = await _open(_port(server))
    writer.write(_post("/wait", b"{}"))
    await asyncio.wait_for(entered.wait(), WAIT)
    # Reset the connection (SO_LINGER 0) and let the close finish before the app answers.
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await _close(writer)
    release.set()
    # The app is not cancelled by the peer leaving; the server still closes promptly.
    server.close()
    await asyncio.wait_for(server.wait_closed(), WAIT)
    assert finished == ["/wait"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_chunked_body(port: int) -> None:
    head = (
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/json\r\n\r\n"
    )
    reply = await _request(port, head, b'4\r\n{"a"\r\n', b"3\r\n: 1\r\n1\r\n}\r\n", b"0\r\n\r\n")
    assert reply.status == 200
    assert reply.json()["body"] == {"a": 1}


async def test_expect_100_continue(port: int) -> None:
    reader, writer = await _open(port)
    try:
        writer.write(
            _post("/echo", b"", "Expect: 100-continue").replace(b"Length: 0", b"Length: 2")
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert interim.startswith(b"HTTP/1.1 100 ")
        writer.write(b"[]")
        reply = await _read_reply(reader)
    finally:
        await _close(writer)
    assert reply.status == 200
    assert reply.json()["body"] == []


async def test_head_has_no_body_and_keeps_the_connection(port: int) -> None:
    reader, writer = await _open(port)
    try:
        writer.write(b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        head = await _read_reply(reader, head_only=True)
        writer.write(GET_HEALTHZ)
        after = await _read_reply(reader)
    finally:
        await _close(writer)
    assert head.status == 200
    assert int(head.headers["content-length"]) == len(after.body)
    assert after.json() == {"status": "ok"}


async def test_half_closed_client_still_gets_its_answer(port: int) -> None:
    reader, writer = await _open(port)
    try:
        writer.write(GET_HEALTHZ)
        writer.write_eof()
        reply = await _read_reply(reader)
        assert await _at_eof(reader)
    finally:
        await _close(writer)
    assert reply.json() == {"status": "ok"}


async def test_http_1_0_gets_an_answer_then_close(port: int) -> None:
    reader, writer = await _open(port)
    try:
        writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
        reply = await _read_reply(reader)
        assert await _at_eof(reader)
    finally:
        await _close(writer)
    assert reply.status == 200


async def test_client_address_is_passed(port: int) -> None:
    reply = await _request(port, b"GET /client HTTP/1.1\r\nHost: t\r\n\r\n")
    host, client_port = reply.json()["client"]
    assert host == "127.0.0.1"
    assert client_port > 0


# -- errors ------------------------------------------------------------------------------


async def test_body_over_the_limit_is_413_and_closes(port: int) -> None:
    reader, writer = await _open(port)
    try:
        writer.write(_post("/echo", b"x" * 2000))  # max_body=1024; the body is sent anyway
        reply = await _read_reply(reader)
        assert await _at_eof(reader)
    finally:
        await _close(writer)
    assert reply.status == 413
    assert reply.headers["connection"] == "close"
    assert reply.json() == {"error": "payload_too_large", "message": "request body too large"}


async def test_input_after_413_is_discarded_until_the_peer_closes(port: int) -> None:
    reader, writer = await _open(port)
    try:
        writer.write(_post("/echo", b"").replace(b"Length: 0", b"Length: 100000"))
        reply = await _read_reply(reader)
        assert await _at_eof(reader)  # the server half-closed after its answer
        writer.write(b"x" * 5000)  # the body keeps coming; the server reads and drops it
        await writer.drain()
        writer.write_eof()
    finally:
        await _close(writer)
    assert reply.status == 413


async def test_chunked_body_over_the_limit_is_413(port: int) -> None:
    head = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"200\r\n" + b"x" * 0x200 + b"\r\n"
    reply = await _request(port, head, chunk, chunk, chunk)
    assert reply.status == 413


@pytest.mark.parametrize(
    "head",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40) + b"\r\n\r\n",  # TLS hello
    ],
)
async def test_malformed_head_is_400_and_closes(port: int, head: bytes) -> None:
    reader, writer = await _open(port)
    try:
        writer.write(head)
        reply = await _read_reply(reader)
        assert await _at_eof(reader)
    finally:
        await _close(writer)
    assert reply.status == 400
    assert reply.json() == {"error": "bad_request", "message": "malformed HTTP request"}


async def test_head_over_max_head_is_400(start: Start) -> None:
    port = _port(await start(max_head=1024))
    reply = await _request(port, b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 2000)
    assert reply.status == 400


async def test_malformed_request_after_a_good_one(port: int) -> None:
    reader, writer = await _open(port)
    try:
        writer.write(GET_HEALTHZ)
        first = await _read_reply(reader)
        writer.write(b"NOT HTTP\r\n\r\n")
        second = await _read_reply(reader)
        assert await _at_eof(reader)
    finally:
        await _close(writer)
    assert (first.status, second.status) == (200, 400)


async def test_unknown_path_is_404(port: int) -> None:
    reply = await _request(port, b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n")
    assert reply.status == 404
    assert reply.json() == {"error": "not_found", "message": "no such endpoint"}


async def test_wrong_method_is_405_with_allow(port: int) -> None:
    reply = await _request(port, _post("/healthz", b"{}"))
    assert reply.status == 405
    assert reply.headers["allow"] == "GET, HEAD"
    reply = await _request(port, b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
    assert reply.status == 405
    assert reply.headers["allow"] == "POST"


async def test_app_raising_is_500_without_its_text(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="wirestate.adapters.server.transports.http"):
        reply = await _request(port, b"GET /boom HTTP/1.1\r\nHost: t\r\n\r\n")
    assert reply.status == 500
    assert reply.json() == {"error": "internal_error", "message": "internal server error"}
    assert SECRET.encode() not in reply.body
    assert "RuntimeError" in caplog.text
    assert SECRET not in caplog.text
    assert all(record.exc_info is None for record in caplog.records)


async def test_invalid_response_from_the_app_is_500(port: int) -> None:
    reply = await _request(port, b"GET /bad-header HTTP/1.1\r\nHost: t\r\n\r\n")
    assert reply.status == 500
    assert "x-bad" not in reply.headers


async def test_incomplete_request_times_out_with_408(start: Start) -> None:
    port = _port(await start(request_timeout=0.2))
    reader, writer = await _open(port)
    try:
        writer.write(_post("/echo", b"[1, 2, 3]")[:-3])  # three body bytes never come
        reply = await _read_reply(reader)
        assert await _at_eof(reader)
    finally:
        await _close(writer)
    assert reply.status == 408


async def test_idle_keep_alive_connection_is_closed_silently(start: Start) -> None:
    port = _port(await start(request_timeout=0.2))
    reader, writer = await _open(port)
    try:
        writer.write(GET_HEALTHZ)
        await _read_reply(reader)
        assert await _at_eof(reader)  # nothing more, not even a 408
    finally:
        await _close(writer)


async def test_keep_alive_ends_after_max_age(start: Start) -> None:
    port = _port(await start(max_age=0.0))
    reader, writer = await _open(port)
    try:
        writer.write(GET_HEALTHZ)
        reply = await _read_reply(reader)
        assert await _at_eof(reader)
    finally:
        await _close(writer)
    assert reply.headers["connection"] == "close"


async def test_open_timeout_cancels_a_hung_app_and_drops_the_connection(start: Start) -> None:
    # websockets' open_timeout bounds a connection that never upgrades; the app call is
    # cancelled (not left running) and the cancellation is not swallowed on the way.
    entered, cancelled = asyncio.Event(), asyncio.Event()

    async def hang(request: HttpRequest) -> HttpResponse:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    port = _port(await start(Router().get("/hang", hang), open_timeout=0.2))
    reader, writer = await _open(port)
    try:
        writer.write(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n")
        await asyncio.wait_for(entered.wait(), WAIT)
        await asyncio.wait_for(cancelled.wait(), WAIT)
        # An abort may reset rather than close: either way, no answer.
        with contextlib.suppress(ConnectionResetError):
            assert await _at_eof(reader)
    finally:
        await _close(writer)


# -- the WebSocket side ------------------------------------------------------------------------


async def test_websocket_client_still_connects_and_echoes(port: int) -> None:
    async with asyncio.timeout(WAIT):
        async with connect(f"ws://127.0.0.1:{port}/ws", compression=None) as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
        reply = await _request(port, GET_HEALTHZ)  # and HTTP beside it
    assert reply.status == 200


def _upgrade(path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def _masked_text_frame(text: bytes) -> bytes:
    mask = os.urandom(4)
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(text))
    return bytes([0x81, 0x80 | len(text)]) + mask + payload


async def test_upgrade_head_in_pieces_reaches_websockets(port: int) -> None:
    handshake = _upgrade("/ws")
    reader, writer = await _open(port)
    try:
        await _send_in_pieces(writer, handshake, 7)
        assert len(READS) > len(handshake) // 14  # the head came in many reads
        reply = await _read_reply(reader)
        assert reply.status == 101
        assert reply.headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        writer.write(_masked_text_frame(b"piecewise"))
        frame = await asyncio.wait_for(reader.readexactly(2 + len(b"piecewise")), WAIT)
    finally:
        await _close(writer)
    assert frame == bytes([0x81, 9]) + b"piecewise"


async def test_websocket_paths_limit_the_upgrades(start: Start) -> None:
    port = _port(await start(websocket_paths=["/ws"]))
    async with asyncio.timeout(WAIT):
        async with connect(f"ws://127.0.0.1:{port}/ws", compression=None) as ws:
            await ws.send("ok")
            assert await ws.recv() == "ok"
    elsewhere = await _request(port, _upgrade("/healthz"))
    assert elsewhere.status == 200  # the app answered, no upgrade
    plain = await _request(port, b"GET /ws HTTP/1.1\r\nHost: t\r\n\r\n")
    assert plain.status == 426
    assert plain.headers["upgrade"] == "websocket"


async def test_a_plain_upgrade_skips_h11_and_an_unusual_one_goes_through_it(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wirestate.adapters.server.transports.http as http_module

    made: list[object] = []
    real = http_module.h11.Connection

    def counting(*args: Any, **kwargs: Any) -> Any:
        made.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(http_module.h11, "Connection", counting)
    port = _port(await start(websocket_paths=["/ws"]))
    reader, writer = await _open(port)
    try:
        writer.write(_upgrade("/ws"))
        assert (await _read_reply(reader)).status == 101
    finally:
        await _close(writer)
    assert made == []  # told from the raw head: no parser per connection
    # A head in another (valid) spelling is left to h11, which still finds the upgrade.
    listed = _upgrade("/ws").replace(b"Upgrade: websocket", b"Upgrade:websocket")
    reader, writer = await _open(port)
    try:
        writer.write(listed)
        assert (await _read_reply(reader)).status == 101
    finally:
        await _close(writer)
    assert len(made) == 1


async def test_server_close_ends_idle_keep_alive_connections(start: Start) -> None:
    server = await start()  # request_timeout 5 s: only noticing the close ends it sooner
    reader, writer = await _open(_port(server))
    writer.write(GET_HEALTHZ)
    await _read_reply(reader)

    async def client() -> None:
        assert await _at_eof(reader)
        await _close(writer)

    loop = asyncio.get_running_loop()
    began = loop.time()
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(client())
        server.close()
        await asyncio.wait_for(server.wait_closed(), WAIT)
    assert loop.time() - began < 2.0


# -- helpers ---------------------------------------------------------------------------------


async def test_router_refuses_a_duplicate_route() -> None:
    router = Router().get("/a", _healthz)
    with pytest.raises(ValueError, match="already routed"):
        router.get("/a", _healthz)


def test_error_response_uses_fixed_messages() -> None:
    response = error_response(401, "unauthorized", "missing or invalid token")
    assert response.status == 401
    assert orjson.loads(response.body) == {
        "error": "unauthorized",
        "message": "missing or invalid token",
    }
    assert dict(response.headers)["content-type"] == "application/json"
    assert orjson.loads(error_response(418).body)["error"] == "http_error"


def test_response_headers_are_frozen() -> None:
    headers = [("x-a", "1")]
    response = HttpResponse(200, headers)
    headers.append(("x-b", "2"))
    assert response.headers == (("x-a", "1"),)


def test_error_response_for_a_status_without_a_phrase() -> None:
    assert orjson.loads(error_response(599).body) == {
        "error": "http_error",
        "message": "HTTP error",
    }


def test_request_helpers() -> None:
    request = HttpRequest(
        "GET", "/p?a=1&a=2&b=", "/p", "a=1&a=2&b=", (("x-one", "1"), ("x-one", "2")), b""
    )
    assert request.header("X-One") == "1"
    assert request.header("x-two") is None
    assert request.query_param("a") == "1"
    assert request.query_param("b") == ""
    assert request.query_param("c") is None


def test_the_base_class_needs_an_app() -> None:
    with pytest.raises(TypeError, match="http_connection_factory"):
        HttpServerConnection()
