"""The ASGI adapter, mounted in Starlette and served by uvicorn on a real loopback socket,
with millisecond intervals set through settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import orjson
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from wirestate.adapters.server.transports.asgi import WirestateASGI, disconnect_cause, route_path
from wirestate.core.causes import CloseCause
from wirestate.core.lifecycle import PUMPS, ConnState
from wirestate.models.settings import Settings
from wirestate.testing.net import WAIT, connected, next_of, server_settings, until

JSON_BODY = {"content-type": "application/json"}

pytestmark = [
    # uvicorn's legacy "websockets" implementation, tested beside its default, says it is
    # deprecated (and websockets' legacy API with it)
    pytest.mark.filterwarnings("ignore:websockets.legacy is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:remove second argument of ws_handler:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The `websockets` implementation is deprecated"),
]

SECRET = "s3cret-" + "x" * 40
#: uvicorn's WebSocket implementations (wsproto is not installed); "auto" picks the first.
IMPLEMENTATIONS = ("websockets-sansio", "websockets")


@contextlib.asynccontextmanager
async def serve(app: Any, **config: Any) -> AsyncIterator[int]:
    """uvicorn serving ``app`` on 127.0.0.1, port chosen by the OS, in this event loop;
    yields the port. Leaving asks uvicorn to shut down (lifespan shutdown included)."""
    options: dict[str, Any] = {"lifespan": "on", "ws": IMPLEMENTATIONS[0], "log_config": None}
    options.update(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, **options))
    task = asyncio.create_task(server.serve())
    try:
        await until(lambda: server.started or task.done())
        assert server.started, "uvicorn did not start"
        yield int(server.servers[0].sockets[0].getsockname()[1])
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, WAIT)


@dataclass
class Served:
    app: WirestateASGI
    port: int
    prefix: str  # the mount point

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}{self.prefix}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.prefix}"

    @property
    def hub(self) -> Any:
        assert self.app.server.hub is not None
        return self.app.server.hub


@pytest.fixture(params=IMPLEMENTATIONS)
async def mounted(request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    """Mounted at /hub in Starlette, started by the parent's lifespan."""
    hub = WirestateASGI(server_settings())
    app = Starlette(routes=[Mount("/hub", app=hub)], lifespan=hub.lifespan)
    async with serve(app, ws=request.param) as port:
        yield Served(hub, port, "/hub")


async def client(url: str, *topics: str, **options: Any) -> tuple[ClientConnection, str]:
    """A connected client (the welcome read, ``topics`` subscribed) and its id."""
    ws, welcome = await connected(url, *topics, **options)
    return ws, str(welcome["client_id"])


async def disconnected(watcher: ClientConnection, client_id: str) -> dict[str, Any]:
    while True:
        msg = await next_of(watcher, "event", topic="clients")
        if msg["data"]["event"] == "disconnected" and msg["data"]["client_id"] == client_id:
            data: dict[str, Any] = msg["data"]
            return data


async def closed_with(ws: ClientConnection) -> tuple[int | None, str | None]:
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(WAIT):
            while True:
                await ws.recv()
    return ws.close_code, ws.close_reason


# -- the protocol through the mount --------------------------------------------------------


async def test_welcome_subscribe_and_events_from_a_client_and_from_post_publish(
    mounted: Served,
) -> None:
    sub, _ = await client(mounted.ws, "orders")
    pub, _ = await client(mounted.ws)
    await pub.send('{"type": "publish", "topic": "orders", "data": {"id": 1}}')
    event = await next_of(sub, "event", topic="orders")
    assert (event["seq"], event["data"], event["stale"]) == (1, {"id": 1}, False)
    async with httpx.AsyncClient(base_url=mounted.http, timeout=WAIT) as http:
        reply = await http.post("/publish", json={"topic": "orders", "data": {"id": 2}})
    assert (reply.status_code, reply.json()) == (200, {"seq": 2})
    event = await next_of(sub, "event", topic="orders")
    assert (event["seq"], event["data"]) == (2, {"id": 2})
    await mounted.app.server.publish("orders", {"id": 3})
    assert (await next_of(sub, "event", topic="orders"))["seq"] == 3
    await pub.send('{"type": "ping", "id": "p1"}')
    assert (await next_of(pub, "pong"))["id"] == "p1"
    await sub.close()
    await pub.close()


async def test_http_endpoints_through_the_mount(mounted: Served) -> None:
    sub, _ = await client(mounted.ws, "t")
    async with httpx.AsyncClient(base_url=mounted.http, timeout=WAIT) as http:
        reply = await http.get("/healthz")
        assert (reply.status_code, reply.json()) == (200, {"status": "ok"})
        reply = await http.get("/readyz")
        assert reply.status_code == 200
        assert reply.json()["status"] == "ready"
        reply = await http.head("/healthz")
        assert (reply.status_code, reply.content) == (200, b"")
        reply = await http.post("/publish", json={"topic": "t", "data": 1})
        assert reply.json() == {"seq": 1}
        assert (await next_of(sub, "event", topic="t"))["seq"] == 1
        reply = await http.get("/metrics")
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/plain")
        for name in ("wirestate_connections", "wirestate_messages_sent_total"):
            assert name in reply.text
        count = next(
            line
            for line in reply.text.splitlines()
            if line.startswith("wirestate_publish_to_write_seconds_count")
        )
        assert float(count.split()[-1]) >= 1  # the event was timed to its send
        reply = await http.post("/publish", content=b"{oops", headers=JSON_BODY)
        assert (reply.status_code, reply.json()["error"]) == (400, "bad_json")
        assert b"oops" not in reply.content
        reply = await http.post("/publish", content=b"x" * 70_000, headers=JSON_BODY)
        assert (reply.status_code, reply.json()["error"]) == (413, "payload_too_large")
        reply = await http.get("/nope")
        assert (reply.status_code, reply.json()["error"]) == (404, "not_found")
        reply = await http.get("/ws")  # no upgrade
        assert reply.status_code == 426
        reply = await http.get("/healthz/")
        assert reply.status_code == 404
    await sub.close()


async def test_a_websocket_elsewhere_under_the_mount_is_404(mounted: Served) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"ws://127.0.0.1:{mounted.port}/hub/other")
    assert refused.value.response.status_code == 404


async def test_a_peer_close_unregisters_the_client_with_cause_peer_close(mounted: Served) -> None:
    watcher, _ = await client(mounted.ws, "clients")
    ws, cid = await client(mounted.ws)
    await ws.close(4000, "bye")
    gone = await disconnected(watcher, cid)
    assert (gone["cause"], gone["code"]) == ("peer_close", 4000)
    assert cid not in mounted.hub.clients
    assert cid not in mounted.app.server.sessions
    await watcher.close()


async def test_a_dropped_connection_is_a_read_error(mounted: Served) -> None:
    watcher, _ = await client(mounted.ws, "clients")
    ws, cid = await client(mounted.ws)
    ws.transport.abort()  # no close frame
    gone = await disconnected(watcher, cid)
    assert gone["cause"] == "read_error"
    assert gone["code"] in (1005, 1006)  # what the ASGI server reports: no close status
    await watcher.close()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "bad_json"),
        ('{"type": "teleport"}', "unknown_type"),
        (b"\x00\x01binary", "invalid_message"),
        ('{"type": "publish", "topic": "clients", "data": {}}', "forbidden"),
    ],
)
async def test_bad_input_gets_an_error_and_the_connection_stays_usable(
    mounted: Served, frame: str | bytes, code: str
) -> None:
    ws, _ = await client(mounted.ws)
    await ws.send(frame)
    error = await next_of(ws, "error")
    assert error["code"] == code
    assert "not json" not in error["message"]
    await ws.send('{"type": "ping", "id": "still-here"}')
    assert (await next_of(ws, "pong"))["id"] == "still-here"
    await ws.close()


async def test_repeated_abuse_closes_with_1008(mounted: Served) -> None:
    ws, _ = await client(mounted.ws)
    for _ in range(5):
        await ws.send("{not json")
    assert await closed_with(ws) == (1008, "policy")


async def test_an_oversized_frame_closes_with_1009() -> None:
    hub = WirestateASGI(server_settings({"limits": {"max_message_size": 1024}}))
    async with serve(hub) as port:
        url = f"ws://127.0.0.1:{port}/ws"
        watcher, _ = await client(url, "clients")
        ws, cid = await client(url)
        await ws.send("é" * 600)  # 600 characters, 1200 bytes
        assert await closed_with(ws) == (1009, "message_too_big")
        gone = await disconnected(watcher, cid)
        assert (gone["cause"], gone["code"]) == ("message_too_big", 1009)
        ok, _ = await client(url, "t")
        near = orjson.dumps({"type": "publish", "topic": "t", "data": "é" * 480})
        assert 960 < len(near) <= 1024  # just under the limit, in bytes
        await ok.send(near.decode())
        assert (await next_of(ok, "event", topic="t"))["data"] == "é" * 480
        await ok.close()
        await watcher.close()


# -- the lifecycle invariant: unregistered only once both pumps have ended ------------------


def held_sends(app: WirestateASGI, gate: asyncio.Event, held: asyncio.Event) -> Any:
    """``app`` behind middleware that holds every ``websocket.send`` of connections made
    with ``?gated`` until ``gate`` is set: a writer stuck in ``send()``, as it is when the
    peer stops reading."""

    async def middleware(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket" or b"gated" not in scope.get("query_string", b""):
            await app(scope, receive, send)
            return

        async def held_send(message: Any) -> None:
            if message["type"] == "websocket.send":
                held.set()
                await gate.wait()
            await send(message)

        await app(scope, receive, held_send)

    return middleware


def endless_receive(app: WirestateASGI) -> Any:
    """``app`` behind middleware that never delivers ``websocket.disconnect``: a reader
    stuck in ``receive()`` (an ASGI server that does not report the end)."""

    async def middleware(scope: Any, receive: Any, send: Any) -> None:
        async def stuck_receive() -> Any:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                await asyncio.Event().wait()
            return message

        await app(scope, stuck_receive if scope["type"] == "websocket" else receive, send)

    return middleware


def watch_unregister(app: WirestateASGI) -> list[tuple[str, CloseCause | None, bool, bool]]:
    """Record, at each unregistration: client id, cause, reader done (the core's state: the
    reader runs in the session's own task, which is the one unregistering), writer done."""
    hub = app.server.hub
    assert hub is not None
    seen: list[tuple[str, CloseCause | None, bool, bool]] = []
    real = hub.unregister

    def checked(conn: Any, now: float) -> None:
        c: Any = app.server.sessions[conn.client_id]
        reader_done = not PUMPS[conn.state][0]
        seen.append((conn.client_id, conn.cause, reader_done, c.writer.done()))
        real(conn, now)

    hub.unregister = checked  # type: ignore[method-assign]
    return seen


async def test_the_reader_ending_does_not_unregister_while_the_writer_runs() -> None:
    hub = WirestateASGI(server_settings(close_timeout=5.0))
    gate, held = asyncio.Event(), asyncio.Event()
    async with hub.running(), serve(held_sends(hub, gate, held), lifespan="off") as port:
        seen = watch_unregister(hub)
        ws = await connect(f"ws://127.0.0.1:{port}/ws?gated", ping_interval=None)
        await asyncio.wait_for(held.wait(), WAIT)  # the welcome is held: writer in send()
        (cid,) = hub.server.sessions
        client: Any = hub.server.sessions[cid]
        await ws.close()  # the peer leaves: the reader sees websocket.disconnect and ends
        await until(lambda: client.conn.state is ConnState.CLOSING_READER_DONE)
        await asyncio.sleep(0.05)  # room for the handler to unregister, were it to do so now
        assert cid in hub.server.sessions
        assert cid in hub.server.hub.clients  # type: ignore[union-attr]
        assert not client.writer.done()
        assert seen == []
        gate.set()  # the held send fails (the peer is gone): the writer ends
        await until(lambda: cid not in hub.server.sessions)
        assert seen == [(cid, CloseCause.PEER_CLOSE, True, True)]
        assert client.conn.state is ConnState.UNREGISTERED


async def test_a_peer_that_stops_reading_is_cut_off_after_the_close_timeout() -> None:
    hub = WirestateASGI(server_settings(close_timeout=0.2, ping_interval=30.0))
    gate, held = asyncio.Event(), asyncio.Event()
    async with hub.running(), serve(held_sends(hub, gate, held), lifespan="off") as port:
        seen = watch_unregister(hub)
        ws = await connect(f"ws://127.0.0.1:{port}/ws?gated", ping_interval=None)
        await asyncio.wait_for(held.wait(), WAIT)
        (cid,) = hub.server.sessions
        # Never released: the writer's send times out, and it ends the reader with it.
        await until(lambda: cid not in hub.server.sessions)
        assert seen == [(cid, CloseCause.SLOW_CONSUMER, True, True)]
        assert hub.server.hub is not None
        assert hub.server.hub.stats.aborts == 0  # the writer ended the reader, no Abort needed
        assert (await closed_with(ws))[0] == 1006  # cut off: no close frame could be sent


async def test_a_writer_blocked_past_ping_timeout_is_a_keepalive_timeout() -> None:
    # ping_timeout (0.1 s) well under the send's bound (close_timeout, 1 s): the blocked
    # writer cannot answer the core's ping in time, as on the websockets transport.
    hub = WirestateASGI(server_settings(close_timeout=1.0))
    gate, held = asyncio.Event(), asyncio.Event()
    async with hub.running(), serve(held_sends(hub, gate, held), lifespan="off") as port:
        seen = watch_unregister(hub)
        ws = await connect(f"ws://127.0.0.1:{port}/ws?gated", ping_interval=None)
        await asyncio.wait_for(held.wait(), WAIT)
        (cid,) = hub.server.sessions
        await until(lambda: cid not in hub.server.sessions)
        assert seen == [(cid, CloseCause.KEEPALIVE_TIMEOUT, True, True)]
        await ws.close()


async def test_a_stuck_reader_is_cancelled_by_the_cores_abort() -> None:
    hub = WirestateASGI(server_settings(close_timeout=0.2, ping_interval=30.0))
    async with hub.running(), serve(endless_receive(hub), lifespan="off") as port:
        seen = watch_unregister(hub)
        ws, cid = await client(f"ws://127.0.0.1:{port}/ws")
        for _ in range(5):  # the server closes (policy); the disconnect never reaches it
            await ws.send("{not json")
        assert await closed_with(ws) == (1008, "policy")
        await until(lambda: cid not in hub.server.sessions)
        assert seen == [(cid, CloseCause.POLICY, True, True)]
        assert hub.server.hub is not None
        assert hub.server.hub.stats.aborts == 1


# -- keep-alive ----------------------------------------------------------------------------


async def test_the_cores_pings_are_answered_so_a_quiet_client_stays_open() -> None:
    hub = WirestateASGI(server_settings())  # the core pings every 50 ms, pong due within 100 ms
    async with serve(hub, ws_ping_interval=None) as port:  # uvicorn's keep-alive off
        ws, _ = await client(f"ws://127.0.0.1:{port}/ws")
        closed = asyncio.create_task(ws.wait_closed())
        core = hub.server.hub
        assert core is not None
        await until(lambda: core.stats.pings >= 20)
        assert not closed.done()
        assert core.stats.disconnects == {}
        assert len(core.clients) == 1
        await ws.close()
        await closed


async def test_a_peer_that_never_answers_pings_is_dropped_by_the_servers_keepalive() -> None:
    hub = WirestateASGI(server_settings())
    async with serve(hub, ws_ping_interval=0.05, ws_ping_timeout=0.05) as port:
        watcher, _ = await client(f"ws://127.0.0.1:{port}/ws", "clients")  # answers pings
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 101")
        core = hub.server.hub
        assert core is not None
        await until(lambda: len(core.clients) == 2)
        silent = next(cid for cid, conn in core.clients.items() if not conn.topics)
        gone = await disconnected(watcher, silent)
        # uvicorn closes it with 1011 but tells the application 1005/1006 (module docstring)
        assert gone["cause"] == "read_error"
        assert len(core.clients) == 1  # the watcher, which answers pings, is still there
        writer.close()
        await watcher.close()


# -- starting and stopping -----------------------------------------------------------------


async def test_leaving_running_closes_every_client_with_1001() -> None:
    hub = WirestateASGI(server_settings())
    app = Starlette(routes=[Mount("/hub", app=hub)])
    async with serve(app) as port:
        url = f"ws://127.0.0.1:{port}/hub/ws"
        async with hub.running():
            clients = [(await client(url, "t"))[0] for _ in range(3)]
        for ws in clients:
            assert await closed_with(ws) == (1001, "shutdown")
        core = hub.server.hub
        assert core is not None
        assert core.clients == {}
        assert core.stats.disconnects["shutdown"] == 3
        with pytest.raises(InvalidStatus) as refused:  # stopped: new clients are refused
            await connect(url)
        assert refused.value.response.status_code == 503
        with pytest.raises(RuntimeError, match="runs once"):
            await hub.start()


async def test_served_alone_the_asgi_lifespan_starts_and_stops_the_hub() -> None:
    hub = WirestateASGI(server_settings())
    async with serve(hub) as port:
        assert hub.server.hub is not None
        ws, _ = await client(f"ws://127.0.0.1:{port}/ws", "t")
    # uvicorn closes its WebSockets itself (1012) before the lifespan shutdown reaches us.
    assert await closed_with(ws) == (1012, "")
    assert hub.server.admission.closing  # stop() ran: the lifespan shutdown
    assert hub.server.hub.clients == {}
    assert hub.server.hub.stats.disconnects["shutdown"] == 1


async def test_before_it_is_started_every_request_is_503_not_started() -> None:
    hub = WirestateASGI(server_settings())
    app = Starlette(routes=[Mount("/hub", app=hub)])  # nobody starts it
    async with serve(app) as port:
        async with httpx.AsyncClient(timeout=WAIT) as http:
            reply = await http.get(f"http://127.0.0.1:{port}/hub/healthz")
        assert (reply.status_code, reply.json()["error"]) == (503, "not_started")
        assert "lifespan" in reply.json()["message"]
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"ws://127.0.0.1:{port}/hub/ws")
        assert refused.value.response.status_code == 503
        assert hub.server.hub is None  # and no request started it


# -- auth, origin, limits ------------------------------------------------------------------


def token(**claims: Any) -> str:
    body = {"sub": "alice", "exp": time.time() + 60, "subscribe": ["orders.*"], "publish": []}
    body.update(claims)
    return jwt.encode(body, SECRET, algorithm="HS256")


@pytest.fixture
async def guarded() -> AsyncIterator[Served]:
    hub = WirestateASGI(
        Settings.model_validate(
            {"auth": {"secret": SECRET, "allowed_origins": ["https://app.example.com"]}}
        )
    )
    async with serve(hub) as port:
        yield Served(hub, port, "")


async def test_auth_no_token_is_401_and_a_token_lets_the_client_in(guarded: Served) -> None:
    for url in (guarded.ws, guarded.ws + "?token=not.a.jwt"):
        with pytest.raises(InvalidStatus) as refused:
            await connect(url)
        assert refused.value.response.status_code == 401
        assert b"not.a.jwt" not in refused.value.response.body
    by_header, _ = await client(
        guarded.ws, additional_headers={"Authorization": f"Bearer {token()}"}
    )
    by_query, _ = await client(f"{guarded.ws}?token={token()}")
    await by_query.send('{"type": "subscribe", "topics": ["payroll"]}')
    assert (await next_of(by_query, "error"))["code"] == "forbidden"  # the token's claims
    for ws in (by_header, by_query):
        await ws.close()
    assert guarded.app.server.metrics.rejections["auth"] == 2
    async with httpx.AsyncClient(base_url=guarded.http, timeout=WAIT) as http:
        body = {"topic": "orders.eu", "data": 1}
        assert (await http.post("/publish", json=body)).status_code == 401
        bearer = {"Authorization": f"Bearer {token(publish=['orders.*'])}"}
        reply = await http.post("/publish", json=body, headers=bearer)
        assert (reply.status_code, reply.json()) == (200, {"seq": 1})
        # A plain GET of /ws tells a page whether its token would be refused at the upgrade.
        assert (await http.get("/ws", params={"token": "not.a.jwt"})).status_code == 401
        assert (await http.get("/ws", params={"token": token()})).status_code == 426


async def test_a_disallowed_origin_is_403(guarded: Served) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"{guarded.ws}?token={token()}", origin="https://evil.example.net")  # type: ignore[arg-type]
    assert refused.value.response.status_code == 403
    ok, _ = await client(f"{guarded.ws}?token={token()}", origin="https://app.example.com")
    await ok.close()


async def test_tokens_never_reach_the_logs(
    guarded: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    good = token()
    ws, _ = await client(f"{guarded.ws}?token={good}")
    await ws.close()
    async with httpx.AsyncClient(base_url=guarded.http, timeout=WAIT) as http:
        await http.post(f"/publish?token={good}", json={"topic": "orders.eu", "data": 1})

    # The server's records (the test's own clients, httpx included, log the URL they use).
    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name.startswith(("uvicorn", "wire"))]

    # uvicorn logs the request after answering it: wait for its line, bounded
    await until(lambda: any("?token=[redacted]" in line for line in lines()))
    assert not any(good in line or good.split(".")[2] in line for line in lines())


async def test_first_message_auth() -> None:
    hub = WirestateASGI(
        Settings.model_validate(
            {"auth": {"secret": SECRET, "first_message": True, "first_message_timeout": 0.3}}
        )
    )
    async with serve(hub) as port:
        url = f"ws://127.0.0.1:{port}/ws"
        ws, _ = await client(url)  # no token on the upgrade: let in, allowed nothing yet
        await ws.send(orjson.dumps({"type": "auth", "token": token()}).decode())
        await ws.send('{"type": "subscribe", "topics": ["orders.eu"]}')
        assert (await next_of(ws, "subscribed"))["topics"] == ["orders.eu"]
        await ws.close()
        late, _ = await client(url)  # nothing within the deadline
        assert await closed_with(late) == (1008, "policy")


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
    hub = WirestateASGI(server_settings({"limits": limits}))
    async with serve(hub) as port:
        url = f"ws://127.0.0.1:{port}/ws"
        first, second = (await client(url))[0], (await client(url))[0]
        with pytest.raises(InvalidStatus) as refused:
            await connect(url)
        assert refused.value.response.status_code == status
        assert hub.server.metrics.rejections[reason] == 1
        await first.close()
        await until(lambda: len(hub.server.sessions) == 1)  # a slot freed is a slot again
        third, _ = await client(url)
        await third.close()
        await second.close()


# -- the ASGI surface without a server -----------------------------------------------------


class Exchange:
    """Calls the app directly with one scope; collects what it sends."""

    def __init__(self, *incoming: dict[str, Any]) -> None:
        self.incoming = list(incoming)
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        return self.incoming.pop(0) if self.incoming else {"type": "http.disconnect"}

    async def send(self, message: Any) -> None:
        self.sent.append(dict(message))


def scope(kind: str, path: str, local: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "asgi": {"version": "3.0"},
        "method": "GET",
        "path": path,
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "server": (local, 8000),
        "client": ("10.9.9.9", 50000),
        **extra,
    }


async def test_a_repeated_origin_is_refused_here_too() -> None:
    hub = WirestateASGI(server_settings())
    async with hub.running():
        twice = [(b"origin", b"http://127.0.0.1"), (b"origin", b"https://evil.example")]
        ext = {"extensions": {"websocket.http.response": {}}, "headers": twice}
        ws = Exchange({"type": "websocket.connect"}, {"type": "websocket.disconnect"})
        await hub(scope("websocket", "/ws", "127.0.0.1", **ext), ws.receive, ws.send)
        assert ws.sent[0]["status"] == 400
        http = Exchange({"type": "http.request", "body": b""})
        await hub(scope("http", "/healthz", "127.0.0.1", headers=twice), http.receive, http.send)
        assert http.sent[0]["status"] == 400


@pytest.mark.parametrize(("local", "status"), [("10.1.2.3", 403), ("127.0.0.1", 200)])
async def test_open_mode_refuses_requests_that_arrived_on_a_non_loopback_address(
    local: str, status: int
) -> None:
    hub = WirestateASGI(server_settings())
    async with hub.running():
        http = Exchange({"type": "http.request", "body": b""})
        await hub(scope("http", "/healthz", local), http.receive, http.send)
        assert http.sent[0]["status"] == status
        ext = {"extensions": {"websocket.http.response": {}}}
        ws = Exchange({"type": "websocket.connect"}, {"type": "websocket.disconnect"})
        await hub(scope("websocket", "/ws", local, **ext), ws.receive, ws.send)
        if status == 403:
            assert ws.sent[0] == {
                "type": "websocket.http.response.start",
                "status": 403,
                "headers": [(b"content-type", b"text/plain; charset=utf-8")],
            }
            assert b"configure [auth]" in ws.sent[1]["body"]
            assert hub.server.metrics.rejections["open_mode"] == 1
            bare = Exchange({"type": "websocket.connect"})  # no response extension
            await hub(scope("websocket", "/ws", local), bare.receive, bare.send)
            assert bare.sent == [{"type": "websocket.close", "code": 1008}]
        else:
            assert ws.sent[0] == {"type": "websocket.accept"}


@pytest.mark.parametrize(
    ("path", "root_path", "expected"),
    [
        ("/hub/ws", "/hub", "/ws"),  # Starlette >= 0.33, uvicorn --root-path: full path
        ("/ws", "/hub", "/ws"),  # older routers: the remainder only
        ("/ws", "", "/ws"),
        ("/hub", "/hub", "/"),
        ("/hubby/ws", "/hub", "/hubby/ws"),  # not at a segment boundary: not the mount
    ],
)
def test_route_path(path: str, root_path: str, expected: str) -> None:
    assert route_path({"path": path, "root_path": root_path}) == expected


@pytest.mark.parametrize(
    ("code", "cause"),
    [
        (1000, CloseCause.PEER_CLOSE),
        (1001, CloseCause.PEER_CLOSE),
        (1011, CloseCause.PEER_CLOSE),
        (4000, CloseCause.PEER_CLOSE),
        (1005, CloseCause.READ_ERROR),
        (1006, CloseCause.READ_ERROR),
        (1009, CloseCause.MESSAGE_TOO_BIG),
        (1012, CloseCause.SHUTDOWN),
    ],
)
def test_disconnect_codes_map_to_close_causes(code: int, cause: CloseCause) -> None:
    assert disconnect_cause(code) == (cause, code)
