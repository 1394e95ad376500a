"""The service on real loopback sockets, with millisecond intervals set through settings."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from wirestate.adapters.server.service import WirestateServer
from wirestate.models.settings import Settings
from wirestate.testing.net import (
    WAIT,
    connected,
    next_of,
    recv,
    serve_process,
    server_settings,
    until,
)


@pytest.fixture
async def server() -> AsyncIterator[WirestateServer]:
    srv = WirestateServer(server_settings(), epoch="test")
    async with srv:
        yield srv


IDS: dict[ClientConnection, str] = {}


async def client(server: WirestateServer, *topics: str) -> ClientConnection:
    """A client of ``server`` (welcome read, ``topics`` subscribed); its id kept in IDS."""
    ws, welcome = await connected(server.url, *topics)
    IDS[ws] = welcome["client_id"]
    return ws


async def drain_until_closed(ws: ClientConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        while True:
            await recv(ws)


async def next_connected(watcher: ClientConnection) -> str:
    """The id of the next client that connects (not the watcher's own retained event)."""
    while True:
        msg = await next_of(watcher, "event", topic="clients")
        data = msg["data"]
        if data["event"] == "connected" and data["client_id"] != IDS[watcher]:
            return str(data["client_id"])


async def disconnected(watcher: ClientConnection, client_id: str) -> dict[str, Any]:
    while True:
        msg = await next_of(watcher, "event", topic="clients")
        if msg["data"]["event"] == "disconnected" and msg["data"]["client_id"] == client_id:
            data: dict[str, Any] = msg["data"]
            return data


# -- lifecycle over the wire ---------------------------------------------------------------


async def test_welcome_then_events_in_order_with_consecutive_seq(server: WirestateServer) -> None:
    ws = await client(server, "orders")
    for i in range(20):
        await server.publish("orders", {"i": i})
    got = [await next_of(ws, "event", topic="orders") for _ in range(20)]
    assert [m["seq"] for m in got] == list(range(1, 21))
    assert [m["data"]["i"] for m in got] == list(range(20))
    assert all(m["stale"] is False and m["ts"].endswith("Z") for m in got)
    await ws.close()


async def test_a_hundred_clients_receive_every_event_in_order(server: WirestateServer) -> None:
    clients = await asyncio.gather(*(client(server, "fan") for _ in range(100)))
    for i in range(50):
        await server.publish("fan", {"i": i})

    async def collect(ws: ClientConnection) -> list[int]:
        return [(await next_of(ws, "event", topic="fan"))["seq"] for _ in range(50)]

    results = await asyncio.gather(*(collect(ws) for ws in clients))
    assert all(seqs == list(range(1, 51)) for seqs in results)
    await asyncio.gather(*(ws.close() for ws in clients))


async def test_connections_stay_open_across_many_ping_intervals(server: WirestateServer) -> None:
    ws = await client(server)  # websockets answers protocol pings while it reads
    reader = asyncio.create_task(ws.wait_closed())
    pings = server.hub.stats.pings if server.hub else 0
    await until(lambda: server.hub is not None and server.hub.stats.pings >= pings + 20)
    assert not reader.done()
    assert len(server.hub.clients) == 1 if server.hub else False
    await ws.close()
    await reader


async def test_a_peer_that_never_answers_pings_is_closed_for_keepalive(
    server: WirestateServer,
) -> None:
    watcher = await client(server, "clients")
    # A raw peer: completes the upgrade, then never reads again, so never pongs.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert head.startswith(b"HTTP/1.1 101")
    silent_id = await next_connected(watcher)
    started = time.monotonic()
    gone = await disconnected(watcher, silent_id)
    assert gone["cause"] == "keepalive_timeout"
    assert gone["code"] == 1011
    assert time.monotonic() - started >= 0.1  # at least ping_interval + ping_timeout
    writer.close()
    await watcher.close()


async def test_a_stalled_loop_does_not_reap_healthy_peers(server: WirestateServer) -> None:
    ws = await client(server)
    waiter = asyncio.create_task(ws.wait_closed())
    assert server.hub is not None
    await until(lambda: server.hub is not None and server.hub.stats.pings >= 2)
    for _ in range(3):
        time.sleep(0.4)  # noqa: ASYNC251 - a deliberate stall of the loop: 4x ping_timeout
        await asyncio.sleep(0.1)  # the loop runs between stalls: part of the workload
    await until(lambda: server.hub is not None and server.hub.stats.loop_stalls >= 1)
    assert not waiter.done(), "a healthy peer was reaped during a stall"
    assert len(server.hub.clients) == 1
    await ws.close()
    await waiter


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "bad_json"),
        ('{"type": "teleport"}', "unknown_type"),
        ('{"type": "subscribe", "topics": []}', "invalid_message"),
        ('{"type": "subscribe", "topics": ["ok"], "extra": 1}', "invalid_message"),
        (b"\x00\x01binary", "invalid_message"),
        ('{"type": "publish", "topic": "clients", "data": {}}', "forbidden"),
    ],
)
async def test_bad_input_gets_an_error_and_the_connection_stays_usable(
    server: WirestateServer, frame: str | bytes, code: str
) -> None:
    ws = await client(server)
    other = await client(server, "t")
    await ws.send(frame)
    error = await next_of(ws, "error")
    assert error["code"] == code
    assert "not json" not in error["message"]  # never echoes the input
    await ws.send('{"type": "ping", "id": "still-here"}')
    assert (await next_of(ws, "pong"))["id"] == "still-here"
    await server.publish("t", 1)
    assert (await next_of(other, "event"))["seq"] == 1
    await ws.close()
    await other.close()


async def test_repeated_abuse_closes_with_1008(server: WirestateServer) -> None:
    ws = await client(server)
    for _ in range(5):
        await ws.send("{not json")
    await drain_until_closed(ws)
    assert ws.close_code == 1008
    assert ws.close_reason == "policy"


async def test_an_oversized_frame_closes_with_1009() -> None:
    server = WirestateServer(
        Settings.model_validate({"server": {"port": 0}, "limits": {"max_message_size": 1024}})
    )
    async with server:
        watcher = await client(server, "clients")
        ws = await client(server)
        big_id = await next_connected(watcher)
        await ws.send("x" * 4096)
        await drain_until_closed(ws)
        assert ws.close_code == 1009
        gone = await disconnected(watcher, big_id)
        assert (gone["cause"], gone["code"]) == ("message_too_big", 1009)
        await watcher.close()


# -- slow consumers ------------------------------------------------------------------------


async def test_a_slow_consumer_is_cut_off_without_delaying_the_others() -> None:
    server = WirestateServer(server_settings(send_queue_size=8, ping_interval=5.0), epoch="slow")
    async with server:
        fast = await client(server, "big")
        slow = await client(server, "big")
        slow.transport.pause_reading()  # stops reading; its socket buffers fill up
        payload = os.urandom(48 * 1024).hex()  # incompressible
        bound = 0
        for i in range(200):
            await server.publish("big", {"i": i, "blob": payload})
            assert server.hub is not None
            bound = max(bound, *(len(c.outbox) for c in server.hub.clients.values()))
            got = await next_of(fast, "event", topic="big")
            assert got["data"]["i"] == i
        assert bound <= 8
        assert server.hub is not None
        await until(
            lambda: server.hub is not None and server.hub.stats.disconnects["slow_consumer"] >= 1
        )
        await fast.close()


# -- HTTP on the same port -----------------------------------------------------------------


async def http(
    port: int, method: str, path: str, body: bytes = b"", media_type: str = "application/json"
) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n"
        f"Content-Type: {media_type}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    raw = await asyncio.wait_for(reader.read(), WAIT)
    writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


async def test_http_endpoints_beside_ws(server: WirestateServer) -> None:
    ws = await client(server, "orders")
    status, body = await http(server.port, "GET", "/healthz")
    assert (status, orjson.loads(body)) == (200, {"status": "ok"})
    status, body = await http(server.port, "GET", "/readyz")
    assert status == 200
    status, body = await http(
        server.port, "POST", "/publish", orjson.dumps({"topic": "orders", "data": {"id": 7}})
    )
    assert (status, orjson.loads(body)) == (200, {"seq": 1})
    event = await next_of(ws, "event", topic="orders")
    assert event["data"] == {"id": 7}
    status, body = await http(server.port, "POST", "/publish", b"{oops")
    assert status == 400
    assert orjson.loads(body)["error"] == "bad_json"
    status, body = await http(
        server.port, "POST", "/publish", orjson.dumps({"topic": "clients", "data": 1})
    )
    assert status == 403
    status, body = await http(server.port, "GET", "/metrics")
    assert status == 200
    for name in (
        "wirestate_connections",
        "wirestate_messages_sent_total",
        "wirestate_disconnects_total",
        "wirestate_messages_dropped_total",
        "wirestate_event_loop_lag_seconds",
    ):
        assert name.encode() in body
    written = [
        line
        for line in body.splitlines()
        if line.startswith(b"wirestate_publish_to_write_seconds_count")
    ]
    assert written
    assert float(written[0].split()[-1]) >= 1  # the event above was timed to its write
    await ws.close()


# -- shutdown ------------------------------------------------------------------------------


async def test_stop_closes_every_client_with_1001() -> None:
    server = WirestateServer(server_settings(), epoch="stop")
    await server.start()
    clients = [await client(server, "t") for _ in range(5)]
    await server.stop()
    for ws in clients:
        await asyncio.wait_for(ws.wait_closed(), WAIT)
        assert ws.close_code == 1001
        assert ws.close_reason == "shutdown"
    assert server.hub is not None
    assert server.hub.clients == {}


async def test_sigterm_closes_clients_with_1001_and_exits_0() -> None:
    async with serve_process() as served:
        ws, _ = await connected(served.url)
        served.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(ws.wait_closed(), WAIT)
        assert ws.close_code == 1001
        assert await served.exited() == 0
    assert any(
        line.get("msg") == "disconnected" and line.get("cause") == "shutdown"
        for line in served.logs
    )


# -- sources -------------------------------------------------------------------------------


async def test_the_builtin_system_status_source_is_served(server: WirestateServer) -> None:
    ws = await client(server, "system_status")
    event = await next_of(ws, "event", topic="system_status")
    assert {"cpu", "memory", "load", "uptime"} <= set(event["data"])
    assert event["data"]["memory"]["total"] > 0
    await ws.close()


class Upstream:
    """A real HTTP upstream on loopback: serves JSON until told to fail, counts requests."""

    def __init__(self) -> None:
        self.failing = False
        self.requests = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Upstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/agents"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                status, body = (
                    (b"500 Internal Server Error", b"{}")
                    if self.failing
                    else (b"200 OK", orjson.dumps({"agents": self.requests}))
                )
                writer.write(
                    b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )
                await writer.drain()
        writer.close()


async def test_an_http_source_opens_its_breaker_serves_stale_and_recovers() -> None:
    async with Upstream() as upstream:
        server = WirestateServer(
            Settings.model_validate(
                {
                    "server": {"port": 0},
                    "sources": [
                        {
                            "kind": "http",
                            "topic": "agent_status",
                            "url": upstream.url,
                            "interval": 0.05,
                            "timeout": 1.0,
                            "breaker": {"failure_threshold": 5, "reset_timeout": 0.3},
                        }
                    ],
                }
            )
        )
        async with server:
            ws = await client(server, "agent_status", "circuit_breaker")
            fresh = await next_of(ws, "event", topic="agent_status", stale=False)
            upstream.failing = True
            opened = await next_of(ws, "event", topic="circuit_breaker")
            assert opened["data"]["breaker"] == "agent_status"
            assert (opened["data"]["from"], opened["data"]["to"]) == ("closed", "open")
            assert opened["data"]["failures"] == 5
            calls_when_opened = upstream.requests
            stale = await next_of(ws, "event", topic="agent_status", stale=True)
            assert stale["data"] == fresh["data"] or "agents" in stale["data"]
            assert stale["age"] > 0
            upstream.failing = False
            half = await next_of(ws, "event", topic="circuit_breaker")
            assert (half["data"]["from"], half["data"]["to"]) == ("open", "half_open")
            assert upstream.requests == calls_when_opened  # no call while open
            closed = await next_of(ws, "event", topic="circuit_breaker")
            assert (closed["data"]["from"], closed["data"]["to"]) == ("half_open", "closed")
            recovered = await next_of(ws, "event", topic="agent_status", stale=False)
            assert recovered["data"]["agents"] > fresh["data"]["agents"]
            await ws.close()


async def test_the_client_command_against_the_real_server(server: WirestateServer) -> None:
    import io

    from wirestate.adapters.tools import cli

    out = io.StringIO()
    argv = ["client", server.url, "--topic", "orders", "--count", "2", "--json"]
    running = asyncio.create_task(asyncio.to_thread(cli.main, argv, out))
    await until(
        lambda: (
            server.hub is not None
            and "orders" in server.hub.topics
            and len(server.hub.topics["orders"].subscribers) == 1
        )
    )
    await server.publish("orders", {"id": 1})
    await server.publish("orders", {"id": 2})
    assert await asyncio.wait_for(running, WAIT) == 0
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [m["data"]["id"] for m in lines if m.get("type") == "event"] == [1, 2]
    summary = lines[-1]["summary"]
    assert summary["events"] == 2
    assert summary["close_cause"] == "client_close"


async def test_frames_of_every_length_class_arrive_intact(server: WirestateServer) -> None:
    """The server encodes an event's frame once for all recipients: 7-bit, 16-bit and
    64-bit payload lengths (RFC 6455 section 5.2) must all parse at the client."""
    a, b = await client(server, "sizes"), await client(server, "sizes")
    blobs = ["s", "m" * 1000, "l" * 70_000]
    for blob in blobs:
        await server.publish("sizes", {"blob": blob})
    for ws in (a, b):
        got = [(await next_of(ws, "event", topic="sizes"))["data"]["blob"] for _ in blobs]
        assert got == blobs
        await ws.close()


@pytest.mark.parametrize(("code", "reason"), [(1000, ""), (1001, "bye"), (4000, "app")])
async def test_a_peer_close_is_recorded_with_the_peers_code(
    server: WirestateServer, code: int, reason: str
) -> None:
    watcher = await client(server, "clients")
    ws = await client(server)
    peer_id = await next_connected(watcher)
    await ws.close(code, reason)
    gone = await disconnected(watcher, peer_id)
    assert (gone["cause"], gone["code"]) == ("peer_close", code)
    await watcher.close()


async def test_a_dropped_tcp_connection_is_a_read_error(server: WirestateServer) -> None:
    watcher = await client(server, "clients")
    ws = await client(server)
    peer_id = await next_connected(watcher)
    ws.transport.abort()  # no close frame: the server sees the socket end
    gone = await disconnected(watcher, peer_id)
    assert gone["cause"] == "read_error"
    assert gone["code"] == 1006  # abnormal closure: no close frame
    await watcher.close()


# -- limits --------------------------------------------------------------------------------


async def test_a_flooding_client_is_rate_limited_then_closed_with_1008() -> None:
    server = WirestateServer(
        Settings.model_validate({"server": {"port": 0}, "limits": {"messages_per_second": 5}})
    )
    async with server:
        other = await client(server, "t")
        ws = await client(server)
        for i in range(8):
            await ws.send(f'{{"type": "ping", "id": "{i}"}}')
        error = await next_of(ws, "error")
        assert error == {
            "type": "error",
            "code": "rate_limited",
            "message": "at most 5 messages per second",
        }
        with contextlib.suppress(ConnectionClosed):
            for i in range(200):  # persists: closed once 50 in a row were refused
                await ws.send(f'{{"type": "ping", "id": "x{i}"}}')
        await drain_until_closed(ws)
        assert (ws.close_code, ws.close_reason) == (1008, "policy")
        await server.publish("t", 1)
        assert (await next_of(other, "event"))["seq"] == 1  # others unaffected
        _, body = await http(server.port, "GET", "/metrics")
        assert b"wirestate_messages_rate_limited_total" in body
        assert b'wirestate_errors_sent_total{code="rate_limited"} 1.0' in body
        await other.close()


@pytest.mark.parametrize(
    ("limits", "status", "reason"),
    [
        ({"max_connections": 2}, 503, "max_connections"),
        ({"max_connections_per_ip": 2}, 429, "max_connections_per_ip"),
    ],
)
async def test_connection_limits_refuse_the_upgrade(
    limits: dict[str, int], status: int, reason: str
) -> None:
    from websockets.exceptions import InvalidStatus

    server = WirestateServer(Settings.model_validate({"server": {"port": 0}, "limits": limits}))
    async with server:
        first, second = await client(server), await client(server)
        with pytest.raises(InvalidStatus) as refused:
            await connect(server.url, ping_interval=None)
        assert refused.value.response.status_code == status
        _, body = await http(server.port, "GET", "/metrics")
        assert f'wirestate_connections_rejected_total{{reason="{reason}"}} 1.0'.encode() in body
        await first.close()
        await second.close()
        # a slot freed is a slot again
        await until(lambda: server.hub is not None and len(server.hub.clients) == 0)
        third = await client(server)
        await third.close()


# -- performance-shaped behaviour ----------------------------------------------------------


async def test_events_published_in_one_loop_iteration_leave_in_one_write(
    server: WirestateServer,
) -> None:
    ws = await client(server, "burst")
    (session,) = server.sessions.values()
    transport = session.transport.ws.transport  # type: ignore[attr-defined]
    writes: list[bytes] = []
    real_write = transport.write

    def counting_write(data: Any) -> None:
        writes.append(bytes(data))
        real_write(data)

    transport.write = counting_write  # type: ignore[method-assign]
    for i in range(5):  # no await between them: one loop iteration
        server.publish_now("burst", {"i": i})
    got = [await recv(ws) for _ in range(5)]
    assert [m["seq"] for m in got] == [1, 2, 3, 4, 5]
    assert len(writes) == 1  # five frames, one transport write
    await ws.close()


async def test_serve_runs_on_uvloop_when_asked() -> None:
    pytest.importorskip("uvloop")
    async with serve_process("--loop", "uvloop") as served:
        ws, _ = await connected(served.url)
        await ws.close()
        served.proc.send_signal(signal.SIGTERM)
        assert await served.exited() == 0
    assert any(
        line.get("msg") == "listening" and line.get("loop") == "uvloop" for line in served.logs
    )


async def test_a_fan_out_yields_between_chunks_and_late_clients_get_more_per_write(
    server: WirestateServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wirestate.adapters.server import service as service_module

    monkeypatch.setattr(service_module, "FLUSH_CHUNK", 2)
    socks = [await client(server, "fan") for _ in range(4)]
    writes: dict[str, int] = {}
    for cid, session in server.sessions.items():
        transport = session.transport.ws.transport  # type: ignore[attr-defined]
        real = transport.write

        def counting(data: Any, cid: str = cid, real: Any = real) -> None:
            writes[cid] = writes.get(cid, 0) + 1
            real(data)

        transport.write = counting  # type: ignore[method-assign]
    server.publish_now("fan", 1)
    await asyncio.sleep(0)  # the flush reaches the first two clients, then lets us run
    assert sorted(writes.values()) == [1, 1]
    server.publish_now("fan", 2)
    for ws in socks:
        assert [(await recv(ws))["data"] for _ in range(2)] == [1, 2]
    # The first two got the events in two writes; the last two, reached after the second
    # publish, got both in one.
    assert sorted(writes.values()) == [1, 1, 2, 2]
    for ws in socks:
        await ws.close()


def test_tune_gc_freezes_start_up_and_widens_the_young_generation() -> None:
    # In a child process: the test process's own collector stays as it is.
    code = (
        "import gc; from wirestate.adapters.tools.cli import tune_gc, GC_YOUNG; "
        "before = gc.get_freeze_count(); tune_gc(); "
        "print(before, gc.get_freeze_count() > before, gc.get_threshold()[0] == GC_YOUNG)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=WAIT
    ).stdout.split()
    assert out == ["0", "True", "True"]


async def test_join_cancels_the_writer_when_the_reader_fails_and_logs_a_failed_writer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from wirestate.adapters.server.session import join

    forever = asyncio.Event()

    async def failing_reader() -> None:
        raise OSError("the reader broke")

    writer = asyncio.create_task(forever.wait())
    with pytest.raises(OSError, match="the reader broke"):
        await join(failing_reader(), writer)
    assert writer.cancelled()  # not left running behind the handler

    async def quiet_reader() -> None:
        return None

    async def failing_writer() -> None:
        raise RuntimeError("secret detail")

    with caplog.at_level("ERROR", logger="wirestate.server"):
        await join(quiet_reader(), asyncio.create_task(failing_writer()))
    assert [r.getMessage() for r in caplog.records] == ["writer failed: RuntimeError"]


@pytest.mark.parametrize(("flush_slice", "flushes"), [(0.0, 3), (1.0, 1)])
async def test_flush_slice_decides_how_much_of_a_fan_out_one_turn_writes(
    flush_slice: float, flushes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 130 subscribers: 64 per chunk. With no slice the loop runs after each chunk (three
    # turns); with a long one the whole fan-out leaves in one.
    async with WirestateServer(server_settings(flush_slice=flush_slice)) as server:
        clients = [(await connected(server.url, "fan"))[0] for _ in range(130)]
        calls = 0
        flush = server._flush

        def counted() -> None:
            nonlocal calls
            calls += 1
            flush()

        monkeypatch.setattr(server, "_flush", counted)
        await server.publish("fan", 1)
        for ws in clients:
            assert (await next_of(ws, "event", topic="fan"))["data"] == 1
        assert calls == flushes
        for ws in clients:
            await ws.close()
