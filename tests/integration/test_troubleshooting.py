"""docs/troubleshooting.md, reproduced: every cause of "my clients disconnect immediately"
(or never connect) against a real server on 127.0.0.1, port 0, with millisecond intervals
set through settings. Each test shows what the client sees and how the server records it:
the close code and cause, the ``clients`` topic's ``disconnected`` event, and /metrics.

The ``clients`` history is read the way the guide recommends: a fresh subscriber asks for
``since: {"clients": 0}`` and gets every recent connect and disconnect, causes included.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
import time
from typing import Any

import jwt
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from wirestate.adapters.client.probe import run_client
from wirestate.adapters.server.service import WirestateServer
from wirestate.models.settings import Settings
from wirestate.testing.net import WAIT, connected, recv, server_settings, until

#: Keep-alive out of the way (and loop stalls at the default) unless a test is about it.
QUIET = {"ping_interval": 5.0, "ping_timeout": 5.0, "loop_stall_threshold": 0.5}


def settings(server: dict[str, Any] | None = None, **sections: Any) -> Settings:
    return server_settings(sections, **{**QUIET, **(server or {})})


async def closed(ws: ClientConnection) -> tuple[int | None, str | None]:
    """Read until the connection ends; the close code and reason the client got."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            await recv(ws)
    return ws.close_code, ws.close_reason


async def clients_history(server: WirestateServer) -> list[dict[str, Any]]:
    """The ``clients`` topic from its first event (``since`` 0), as the guide shows."""
    ws, _ = await connected(server.url)
    subscribe = {"type": "subscribe", "topics": ["clients"], "since": {"clients": 0}}
    await ws.send(orjson.dumps(subscribe).decode())
    subscribed = await recv(ws)
    assert subscribed["recovered"] == {"clients": True}
    assert server.hub is not None
    last = server.hub.topics["clients"].seq  # this watcher's own connect is in it already
    events: list[dict[str, Any]] = []
    while not events or events[-1]["seq"] < last:
        msg = await recv(ws)
        if msg["type"] == "event":
            events.append(msg)
    await ws.close()
    return [e["data"] for e in events]


async def departure(server: WirestateServer, client_id: str) -> dict[str, Any]:
    gone = [
        e
        for e in await clients_history(server)
        if e["event"] == "disconnected" and e["client_id"] == client_id
    ]
    assert len(gone) == 1, f"no single disconnected event for {client_id}"
    return gone[0]


async def scrape(port: int) -> str:
    """GET /metrics over a real socket."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    async with asyncio.timeout(WAIT):
        raw = await reader.read()
    writer.close()
    return raw.partition(b"\r\n\r\n")[2].decode()


def sample(metrics: str, name: str) -> float:
    """The value of one series, ``name`` with its labels: ``x_total{cause="policy"}``."""
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not in /metrics")


def disconnects(metrics: str, cause: str) -> float:
    return sample(metrics, f'wirestate_disconnects_total{{cause="{cause}"}}')


# -- a tiny loopback proxy ------------------------------------------------------------------


class Proxy:
    """A loopback TCP proxy in front of a server, misconfigured on purpose.

    ``strip_upgrade``: drop the ``Upgrade`` header from each connection's first request head
    (a proxy that does not pass WebSocket upgrades, as nginx does without
    ``proxy_set_header Upgrade $http_upgrade``). ``idle``: close both sides after that many
    seconds without a byte in either direction (nginx's ``proxy_read_timeout``, an AWS ALB's
    idle timeout), with a FIN and no WebSocket close frame.
    """

    def __init__(self, upstream: int, *, strip_upgrade: bool = False, idle: float | None = None):
        self.upstream = upstream
        self.strip_upgrade = strip_upgrade
        self.idle = idle
        self.idle_closes = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"ws://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/ws"

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if self.strip_upgrade:
                lines = head.split(b"\r\n")
                head = b"\r\n".join(ln for ln in lines if not ln.lower().startswith(b"upgrade:"))
            up_writer.write(head)
            loop = asyncio.get_running_loop()
            last = [loop.time()]

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                while chunk := await src.read(65536):
                    last[0] = loop.time()
                    dst.write(chunk)
                    await dst.drain()

            async with asyncio.TaskGroup() as tg:
                pipes = [
                    tg.create_task(pipe(reader, up_writer)),
                    tg.create_task(pipe(up_reader, writer)),
                ]
                if self.idle is not None:
                    while not all(p.done() for p in pipes):
                        quiet = loop.time() - last[0]
                        if quiet >= self.idle:
                            self.idle_closes += 1
                            for p in pipes:
                                p.cancel()
                            break
                        # The proxy's own idle timer, not a test waiting for a result.
                        await asyncio.wait(pipes, timeout=self.idle - quiet)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, up_writer):
                w.close()
            self._handlers.discard(task)


# -- the causes -----------------------------------------------------------------------------


async def test_1_a_deadline_too_tight_for_the_client_is_a_keepalive_timeout() -> None:
    """The Go service's "read deadline already past": a liveness deadline shorter than the
    client takes to answer. wirestate's only liveness deadline is ping_timeout, armed at the
    first ping, so the earliest such close comes ping_interval + ping_timeout after connect,
    never at 0.5 ms; the client is told the two values in its welcome."""
    tight = settings(server={"ping_interval": 0.1, "ping_timeout": 0.03})
    async with WirestateServer(tight) as server:
        busy, welcome = await connected(server.url)
        assert (welcome["ping_interval"], welcome["ping_timeout"]) == (0.1, 0.03)
        busy.transport.pause_reading()  # busy elsewhere: the ping waits in its socket
        hub = server.hub
        assert hub is not None
        await until(lambda: hub.stats.disconnects["keepalive_timeout"] == 1)
        busy.transport.resume_reading()  # too late: it answers the ping, then reads the close
        assert await closed(busy) == (1011, "keepalive_timeout")
        gone = await departure(server, welcome["client_id"])
        assert (gone["cause"], gone["code"]) == ("keepalive_timeout", 1011)
        assert gone["duration"] >= 0.1 + 0.03
        assert disconnects(await scrape(server.port), "keepalive_timeout") == 1


async def test_1_the_same_client_stays_with_a_ping_timeout_it_can_meet() -> None:
    generous = settings(server={"ping_interval": 0.1, "ping_timeout": 5.0})
    async with WirestateServer(generous) as server:
        busy, welcome = await connected(server.url)
        busy.transport.pause_reading()
        hub = server.hub
        assert hub is not None
        conn = hub.clients[welcome["client_id"]]
        await until(lambda: conn.pong_deadline is not None)  # pinged while busy
        busy.transport.resume_reading()
        await until(lambda: conn.rtt is not None)  # the late pong counted
        assert conn.state.value == "open"
        assert hub.stats.disconnects["keepalive_timeout"] == 0
        await busy.close()


async def test_2_a_read_limit_smaller_than_the_first_message_is_1009_at_once() -> None:
    small = settings(limits={"max_message_size": 64})
    async with WirestateServer(small) as server:
        ws, welcome = await connected(server.url)
        first = {"type": "subscribe", "topics": ["system_status", "orders.eu", "orders.us"]}
        assert len(orjson.dumps(first)) > 64
        await ws.send(orjson.dumps(first).decode())
        assert await closed(ws) == (1009, "message_too_big")
        gone = await departure(server, welcome["client_id"])
        assert (gone["cause"], gone["code"]) == ("message_too_big", 1009)
        # The original symptom: a client gone about a millisecond after its upgrade.
        assert gone["duration"] < 1.0
        assert disconnects(await scrape(server.port), "message_too_big") == 1


async def test_3_a_proxy_that_drops_the_upgrade_header_gets_426_and_registers_nothing() -> None:
    async with (
        WirestateServer(settings()) as server,
        Proxy(server.port, strip_upgrade=True) as proxy,
    ):
        with pytest.raises(InvalidStatus) as refused:
            await connect(proxy.url, ping_interval=None)
        response = refused.value.response
        assert response.status_code == 426
        assert orjson.loads(response.body) == {
            "error": "upgrade_required",
            "message": "this endpoint speaks WebSocket only",
        }
        assert server.hub is not None
        assert server.hub.clients == {}  # nothing was registered, nothing can be unregistered
        metrics = await scrape(server.port)
        counts = re.findall(r'^wirestate_connections\{state="\w+"\} (\S+)$', metrics, re.M)
        assert counts  # every state is exported...
        assert all(float(n) == 0 for n in counts)  # ...and no connection is in any of them
        assert "wirestate_connections_rejected_total{reason=" not in metrics  # not an upgrade
        assert all(disconnects(metrics, c) == 0 for c in ("peer_close", "read_error"))
        # What `wirestate client` says about it.
        out, err = _Lines(), _Lines()
        assert await run_client(proxy.url, ["orders"], count=1, out=out, err=err) == 1
        assert "HTTP 426" in err.text
        assert "Upgrade header" in err.text


async def test_3_a_request_without_upgrade_headers_gets_426() -> None:
    async with WirestateServer(settings()) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(WAIT):
            raw = await reader.read()
        writer.close()
        assert raw.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
        assert b"\r\nupgrade: websocket\r\n" in raw
        assert server.hub is not None
        assert server.hub.clients == {}


SECRET = "troubleshooting-" + "x" * 32


async def test_4_a_browser_origin_not_on_the_allowlist_is_403() -> None:
    guarded = settings(auth={"secret": SECRET, "allowed_origins": ["https://app.example.com"]})
    token = jwt.encode(
        {"sub": "alice", "exp": time.time() + 60, "subscribe": ["*"]}, SECRET, algorithm="HS256"
    )
    async with WirestateServer(guarded) as server:
        url = f"{server.url}?token={token}"
        with pytest.raises(InvalidStatus) as refused:
            await connect(url, origin="https://evil.example.com", ping_interval=None)
        assert refused.value.response.status_code == 403
        assert refused.value.response.body == b"origin not allowed\n"
        assert server.hub is not None
        assert server.hub.clients == {}
        metrics = await scrape(server.port)
        assert sample(metrics, 'wirestate_connections_rejected_total{reason="origin"}') == 1
        # The same token from the allowed origin is welcome.
        ws, _ = await connected(url, origin="https://app.example.com")
        await ws.close()


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each complete unmasked frame a server sent (RFC 6455 5.2)."""
    frames = []
    while len(data) >= 2:
        opcode, n, at = data[0] & 0x0F, data[1] & 0x7F, 2
        if n == 126:
            n, at = struct.unpack("!H", data[2:4])[0], 4
        elif n == 127:
            n, at = struct.unpack("!Q", data[2:10])[0], 10
        if len(data) < at + n:
            break
        frames.append((opcode, data[at : at + n]))
        data = data[at + n :]
    return frames


async def test_5_pings_nobody_answers_end_in_keepalive_timeout() -> None:
    async with WirestateServer(
        settings(server={"ping_interval": 0.05, "ping_timeout": 0.1})
    ) as server:
        # A peer that completes the upgrade and then never reads: nothing answers its pings
        # (a dead host, a NAT that forgot the flow, a client with no pong handler).
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        async with asyncio.timeout(WAIT):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101")
            hub = server.hub
            assert hub is not None
            await until(lambda: hub.stats.disconnects["keepalive_timeout"] == 1)
            received = await reader.read()  # what was waiting in its socket all along
        writer.close()
        frames = _frames(received)
        opcodes = [op for op, _ in frames]
        assert opcodes[0] == 0x1  # the welcome
        welcome = orjson.loads(frames[0][1])
        assert 0x9 in opcodes  # a protocol ping
        close = frames[opcodes.index(0x8)][1]
        assert (struct.unpack("!H", close[:2])[0], close[2:]) == (1011, b"keepalive_timeout")
        gone = await departure(server, welcome["client_id"])
        assert (gone["cause"], gone["code"]) == ("keepalive_timeout", 1011)
        assert gone["duration"] >= 0.05 + 0.1
        metrics = await scrape(server.port)
        assert disconnects(metrics, "keepalive_timeout") == 1
        assert sample(metrics, "wirestate_pings_sent_total") >= 1


@pytest.mark.parametrize(
    ("how", "cause", "code"),
    [
        ("close 1000", "peer_close", 1000),
        ("close 4001", "peer_close", 4001),
        ("drop tcp", "read_error", 1006),
    ],
)
async def test_6_a_client_that_closes_is_recorded_with_its_code(
    how: str, cause: str, code: int
) -> None:
    async with WirestateServer(settings()) as server:
        ws, welcome = await connected(server.url)
        if how == "drop tcp":
            ws.transport.abort()  # no close frame: a crash, a killed tab, a reset
        else:
            await ws.close(int(how.split()[1]), "done")
        hub = server.hub
        assert hub is not None
        await until(lambda: welcome["client_id"] not in hub.clients)
        # Scraped first: the history reader below is itself a client that closes.
        assert disconnects(await scrape(server.port), cause) == 1
        gone = await departure(server, welcome["client_id"])
        assert (gone["cause"], gone["code"]) == (cause, code)
        assert gone["duration"] < 1.0  # right after its welcome: another sub-ms life


async def test_7_a_proxy_idle_timeout_under_the_ping_interval_cuts_idle_clients() -> None:
    async with (
        WirestateServer(settings(server={"ping_interval": 2.0})) as server,
        Proxy(server.port, idle=0.2) as proxy,
    ):
        ws, welcome = await connected(proxy.url)
        assert await closed(ws) == (1006, "")  # no close frame reached the client
        assert ws.protocol.close_rcvd is None
        gone = await departure(server, welcome["client_id"])
        assert (gone["cause"], gone["code"]) == ("read_error", 1006)
        assert 0.2 <= gone["duration"] < 2.0  # the proxy's idle timeout, before any ping
        assert proxy.idle_closes == 1
        assert disconnects(await scrape(server.port), "read_error") == 1


async def test_7_a_ping_interval_under_the_proxy_idle_timeout_keeps_them() -> None:
    async with (
        WirestateServer(settings(server={"ping_interval": 0.05, "ping_timeout": 1.0})) as server,
        Proxy(server.port, idle=0.2) as proxy,
    ):
        ws, welcome = await connected(proxy.url)
        reading = asyncio.create_task(closed(ws))  # websockets answers pings while it reads
        hub = server.hub
        assert hub is not None
        start = hub.stats.pings
        await until(lambda: hub.stats.pings >= start + 10)  # 0.5 s: past the idle timeout
        assert welcome["client_id"] in hub.clients
        assert proxy.idle_closes == 0
        await ws.close()
        await reading


class _Lines:
    """A text stream for `run_client`'s output."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def test_the_guide_names_a_test_for_every_cause() -> None:
    from pathlib import Path

    guide = (Path(__file__).parents[2] / "docs" / "troubleshooting.md").read_text("utf-8")
    named = set(re.findall(r"test_troubleshooting\.py::(test_\w+)", guide))
    here = {name for name in globals() if name.startswith("test_") and name[5].isdigit()}
    assert named == here, "docs/troubleshooting.md and this file name different tests"
