"""The dashboard's HTTP side on a real loopback server: GET /api/snapshot's content, the
page and its assets (allowlist, content types, revalidation), and the token with [auth].

The page itself runs in tests/browser/test_dashboard.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from wirestate.adapters.server import dashboard
from wirestate.adapters.server.dashboard import ASSETS, CLIENT_ASSETS, PAGE, Dashboard
from wirestate.adapters.server.routes import HttpRequest, Router
from wirestate.adapters.server.service import WirestateServer
from wirestate.core import diagram
from wirestate.core.breaker import BreakerConfig
from wirestate.core.breaker import table as breaker_table
from wirestate.core.causes import CloseCause
from wirestate.core.hub import Hub, HubConfig
from wirestate.core.topics import RECENT
from wirestate.models.settings import Settings
from wirestate.testing.net import WAIT, recv, server_settings, until

SECRET = "dashboard-" + "s" * 40
STATIC = Path(dashboard.__file__).parent / "static"


def settings(**sections: Any) -> Settings:
    """A test server with a pong due within 0.5 s, loop stalls reported past the default."""
    return server_settings(sections, ping_timeout=0.5, loop_stall_threshold=0.5)


class Upstream:
    """A source's fetch that fails on command."""

    def __init__(self) -> None:
        self.failing = False

    async def __call__(self) -> Any:
        if self.failing:
            raise ConnectionError("upstream down")
        return {"ok": True}


@pytest.fixture
def upstream() -> Upstream:
    return Upstream()


@pytest.fixture
async def server(upstream: Upstream) -> AsyncIterator[WirestateServer]:
    srv = WirestateServer(settings(), epoch="dash")
    srv.add_source(
        "flaky",
        upstream,
        interval=0.02,
        timeout=1.0,
        breaker=BreakerConfig(failure_threshold=1, reset_timeout=60.0),
    )
    async with srv:
        yield srv


@pytest.fixture
async def http(server: WirestateServer) -> AsyncIterator[httpx.AsyncClient]:
    base = f"http://127.0.0.1:{server.port}"
    async with httpx.AsyncClient(base_url=base, timeout=WAIT) as client:
        yield client


async def welcome(ws: ClientConnection) -> str:
    msg = await recv(ws)
    assert msg["type"] == "welcome"
    return str(msg["client_id"])


def breaker_state(server: WirestateServer, name: str) -> str | None:
    body = server.dashboard_snapshot()
    assert body is not None
    return next((b["state"] for b in body["breakers"] if b["name"] == name), None)


async def snap(http: httpx.AsyncClient, **kwargs: Any) -> dict[str, Any]:
    response = await http.get("/api/snapshot", **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    body: dict[str, Any] = response.json()
    return body


# --------------------------------------------------------------------------- the snapshot


async def test_snapshot_shows_clients_disconnects_breakers_topics_and_events(
    server: WirestateServer, http: httpx.AsyncClient, upstream: Upstream
) -> None:
    # keepalive is the hub's (ping every 50 ms); websockets answers pings while reading.
    stay = await connect(server.url, ping_interval=None)
    stay_id = await welcome(stay)
    await stay.send(orjson.dumps({"type": "subscribe", "topics": ["orders"]}).decode())
    leave = await connect(server.url, ping_interval=None)
    leave_id = await welcome(leave)
    hub = server.hub
    assert hub is not None
    await until(lambda: "orders" in hub.clients[stay_id].topics)
    for i in range(3):
        await server.publish("orders", {"id": i})
    await until(lambda: hub.clients[stay_id].rtt is not None)  # a pong arrived
    await leave.close(1000)
    await until(lambda: leave_id not in hub.clients)
    upstream.failing = True
    await until(lambda: breaker_state(server, "flaky") == "open")

    body = await snap(http)

    assert body["version"] == dashboard.SCHEMA_VERSION
    assert body["epoch"] == "dash"
    assert body["bus"] == {"kind": "memory", "up": True}
    assert body["now"].endswith("Z")
    states = body["connections"]["states"]
    assert list(states) == [s.value for s in dashboard.REGISTERED_STATES]
    assert states["open"] == 1 == body["connections"]["total"]

    rows = body["clients"]["rows"]
    assert [r["id"] for r in rows] == [stay_id]
    (row,) = rows
    assert row["state"] == "open"
    assert row["topics"] == ["orders"]
    assert row["outbox"] == 0
    assert 0 < row["rtt"] < WAIT
    assert 0 < row["age"] < WAIT
    assert body["clients"]["total"] == body["clients"]["shown"] == 1

    disconnects = body["disconnects"]
    assert set(disconnects["totals"]) >= {c.value for c in CloseCause}
    assert disconnects["totals"]["peer_close"] == 1
    (gone,) = disconnects["recent"]
    assert gone["client_id"] == leave_id
    assert gone["cause"] == "peer_close"
    assert gone["code"] == 1000
    assert gone["ts"].endswith("Z")
    timeline = disconnects["timeline"]
    assert len(timeline) == disconnects["window"] // disconnects["bucket"]
    assert timeline[-1] == {"peer_close": 1}  # within the last bucket
    assert all(bucket == {} for bucket in timeline[:-1])

    breakers = {b["name"]: b for b in body["breakers"]}
    assert set(breakers) == {"flaky", "system_status"}
    assert breakers["flaky"]["state"] == "open"
    assert breakers["flaky"]["kind"] == "source"
    assert breakers["flaky"]["failures"] == 1
    assert breakers["flaky"]["last_error"] == "ConnectionError"  # a type name, never text
    assert "upstream down" not in orjson.dumps(body).decode()
    assert 0 < breakers["flaky"]["retry_after"] <= 60
    assert breakers["system_status"]["state"] == "closed"
    assert breakers["flaky"]["diagram"] in body["diagrams"]

    topics = {t["name"]: t for t in body["topics"]["rows"]}
    assert topics["orders"]["seq"] == 3
    assert topics["orders"]["subscribers"] == 1
    assert topics["orders"]["rate"] == pytest.approx(3 / dashboard.RATE_WINDOW)
    assert topics["orders"]["epoch"] == "dash"
    assert topics["clients"]["seq"] >= 3  # 2 connected, 1 disconnected
    assert topics["flaky"]["rate"] > topics["orders"]["rate"]  # busiest first
    names = [t["name"] for t in body["topics"]["rows"]]
    assert names.index("flaky") < names.index("orders")

    events = body["events"]
    assert len(events) <= dashboard.EVENT_TAIL
    assert [e["ts"] for e in events] == sorted((e["ts"] for e in events), reverse=True)
    orders = [e for e in events if e["topic"] == "orders"]
    assert [e["seq"] for e in orders] == [3, 2, 1][: len(orders)]
    stale = [e for e in events if e["topic"] == "flaky" and e["stale"]]
    assert stale, "the open breaker's stale values are in the tail"
    assert orjson.loads(stale[0]["data"]) == {"ok": True}
    await stay.close()


async def test_snapshot_counts_are_exact_and_lists_capped_on_a_busy_hub() -> None:
    """Pure: the builder on the core alone, with more clients and events than it lists."""
    hub = Hub(HubConfig(history_size=50), epoch="e")
    for i in range(dashboard.MAX_CLIENTS + 5):
        conn = hub.connect(f"c{i:04d}", now=float(i))
        hub.accept(conn, now=float(i))
        hub.start(conn, now=float(i))
    for i in range(80):  # more than the history holds, all within the rate window
        hub.publish("burst", {"i": i}, now=300.0 + i / 100)
    now = 301.0
    body = dashboard.snapshot(hub, now)
    clients = body["clients"]
    assert clients["total"] == dashboard.MAX_CLIENTS + 5
    assert clients["shown"] == len(clients["rows"]) == dashboard.MAX_CLIENTS
    assert clients["rows"][0]["id"] == f"c{dashboard.MAX_CLIENTS + 4:04d}"  # newest first
    assert body["connections"]["states"]["open"] == dashboard.MAX_CLIENTS + 5
    (burst,) = [t for t in body["topics"]["rows"] if t["name"] == "burst"]
    # 50 events kept, the oldest (at 300.30) 0.7 s before now: the rate is over that span.
    assert burst["rate"] == pytest.approx(50 / (now - 300.30), rel=1e-3)
    assert [e["seq"] for e in body["events"]] == list(range(80, 80 - dashboard.EVENT_TAIL, -1))
    assert body["breakers"] == []


@pytest.mark.parametrize("held", [100, 100_000])
def test_a_snapshot_reads_the_recent_topics_only_however_many_the_hub_holds(held: int) -> None:
    """A dashboard poll costs the same with 100 or 100,000 topics: it looks at the `RECENT`
    topics published to last (the busiest are among them), and counts the rest."""
    hub = Hub(HubConfig(history_size=1, max_topics=held + 10), epoch="e")
    for i in range(held):
        hub.publish(f"t.{i}", i, now=1.0 + i / held)
    looked: list[str] = []

    def visible(topic: str) -> bool:
        looked.append(topic)
        return True

    body = dashboard.snapshot(hub, 3.0, visible=visible)
    topics = [name for name in looked if name.startswith("t.")]
    assert len(topics) == min(held, RECENT)
    assert topics[0] == f"t.{held - 1}"  # the newest first
    assert body["topics"]["total"] == held
    assert body["topics"]["considered"] == min(held, RECENT)
    assert body["topics"]["shown"] == min(held, dashboard.MAX_TOPICS)
    assert body["events"][0]["topic"] == f"t.{held - 1}"


def test_without_history_a_topic_shows_its_latest_event_and_no_rate() -> None:
    hub = Hub(HubConfig(history_size=0), epoch="e")
    hub.publish("a", {"x": "y" * 1000}, now=1.0)
    hub.publish("a", {"n": 2}, now=2.0)
    body = dashboard.snapshot(hub, 3.0)
    (row,) = body["topics"]["rows"]
    assert row["rate"] is None
    assert row["last_age"] == 1.0
    assert [(e["topic"], e["seq"], e["data"]) for e in body["events"]] == [("a", 2, '{"n":2}')]
    hub.publish("b", {"x": "y" * 1000}, now=2.5)
    (long,) = [e for e in dashboard.snapshot(hub, 3.0)["events"] if e["topic"] == "b"]
    assert len(long["data"]) == dashboard.PREVIEW_CHARS
    assert long["data"].endswith("…")


def test_what_a_token_may_not_subscribe_to_is_left_out() -> None:
    hub = Hub(HubConfig(), epoch="e")
    conn = hub.connect("c1", now=0.0)
    hub.accept(conn, now=0.0)
    hub.publish("orders.eu", {"id": 1}, now=1.0)
    hub.publish("secret", {"pin": 1234}, now=1.0)
    body = dashboard.snapshot(hub, 2.0, visible=lambda topic: topic.startswith("orders."))
    assert body["connections"] is body["clients"] is body["disconnects"] is None
    assert body["breakers"] is None
    assert [t["name"] for t in body["topics"]["rows"]] == ["orders.eu"]
    assert [e["topic"] for e in body["events"]] == ["orders.eu"]
    assert "1234" not in orjson.dumps(body).decode()


def test_the_breaker_diagram_is_the_table_with_every_state_placed() -> None:
    drawn = dashboard.breaker_diagram()
    ids = [s["id"] for s in drawn["states"]]
    assert ids == [s.value for s in breaker_table.BreakerState]
    assert set(dashboard.BREAKER_LAYOUT) == set(ids)
    cells = [(s["col"], s["row"]) for s in drawn["states"]]
    assert len(set(cells)) == len(cells), "two states in one cell"
    table = diagram.edges(breaker_table.MACHINE, breaker_table.BreakerState)
    assert [(e["from"], e["to"], e["label"]) for e in drawn["edges"]] == table
    by_pair = {(e["from"], e["to"]): e for e in drawn["edges"]}
    assert by_pair[("closed", "open")]["manual"] is False
    assert by_pair[("closed", "open")]["short"] == "failure, success"  # guards left out
    assert by_pair[("half_open", "closed")]["short"] == "success"  # reset is the operator's
    assert by_pair[("open", "closed")]["manual"] is True
    assert by_pair[("closed", "forced_open")]["manual"] is True
    assert drawn["initial"] == breaker_table.INITIAL.value


# --------------------------------------------------------------------------- page and assets


def test_every_shipped_file_is_served_and_nothing_else() -> None:
    shipped = {p.name for p in STATIC.iterdir() if p.is_file()}
    assert shipped == {PAGE, *ASSETS, *CLIENT_ASSETS}
    pyproject = (Path(__file__).parents[3] / "pyproject.toml").read_text()
    assert '"wirestate.adapters.server" = ["py.typed", "static/*"]' in pyproject  # in the wheel


async def test_the_page_and_assets_are_served_with_types_and_revalidation(
    http: httpx.AsyncClient,
) -> None:
    page = await http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "connect-src 'self'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert b'src="static/dashboard.js"' in page.content
    assert b"https://" not in page.content
    assert b"http://" not in page.content
    for name, kind in ASSETS.items():
        response = await http.get(f"/static/{name}")
        assert response.status_code == 200
        assert response.headers["content-type"] == kind
        assert response.headers["cache-control"] == "no-cache"
        assert response.content == (STATIC / name).read_bytes()
        assert b"http://" not in response.content.replace(b"http://www.w3.org/2000/svg", b"")
        etag = response.headers["etag"]
        again = await http.get(f"/static/{name}", headers={"If-None-Match": etag})
        assert again.status_code == 304
        assert again.content == b""
        assert again.headers["etag"] == etag
        head = await http.head(f"/static/{name}")
        assert head.status_code == 200
        assert head.content == b""


async def test_the_browser_client_is_served_cacheable_cross_origin_under_the_csp(
    http: httpx.AsyncClient,
) -> None:
    page_csp = (await http.get("/")).headers["content-security-policy"]
    for name, kind in CLIENT_ASSETS.items():
        response = await http.get(f"/static/{name}")
        assert response.status_code == 200
        assert response.headers["content-type"] == kind
        assert response.headers["cache-control"] == "public, max-age=3600"
        assert response.headers["access-control-allow-origin"] == "*"
        assert response.headers["content-security-policy"] == page_csp
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.content == (STATIC / name).read_bytes()
        again = await http.get(
            f"/static/{name}", headers={"If-None-Match": response.headers["etag"]}
        )
        assert again.status_code == 304
    script = (await http.get("/static/wirestate.js")).text
    assert "export function connect(" in script
    assert "import " not in script.split("\n", 1)[1]  # no dependency


def test_the_dashboard_has_no_socket_handling_of_its_own() -> None:
    """One client implementation in the repository: the page goes through wirestate.js."""
    script = (STATIC / "dashboard.js").read_text()
    assert 'import { connect } from "./wirestate.js";' in script
    assert "new WebSocket" not in script
    assert ".onmessage" not in script
    assert b'<script type="module" src="static/dashboard.js">' in (STATIC / PAGE).read_bytes()


async def test_a_plain_get_of_ws_says_426_or_401_for_a_token_the_upgrade_refuses(
    http: httpx.AsyncClient, guarded: httpx.AsyncClient
) -> None:
    open_answer = await http.get("/ws")
    assert open_answer.status_code == 426
    assert open_answer.headers["access-control-allow-origin"] == "*"
    for params in ({}, {"token": "not.a.jwt"}, {"token": token(exp=time.time() - 10)}):
        refused = await guarded.get("/ws", params=params)
        assert refused.status_code == 401
        assert refused.json()["error"] == "unauthorized"
        assert refused.headers["access-control-allow-origin"] == "*"
        assert "not.a.jwt" not in refused.text
    accepted = await guarded.get("/ws", params={"token": token()})
    assert accepted.status_code == 426
    # As the upgrade decides: without a token, [auth] anonymous lets it in (a bad one not).
    public = WirestateServer(settings(auth={"secret": SECRET, "anonymous": ["public.*"]}))
    async with public, httpx.AsyncClient(base_url=f"http://127.0.0.1:{public.port}") as http_:
        assert (await http_.get("/ws")).status_code == 426
        assert (await http_.get("/ws", params={"token": "not.a.jwt"})).status_code == 401
    assert (
        await guarded.get("/ws", headers={"Authorization": f"Bearer {token()}"})
    ).status_code == 426


@pytest.mark.parametrize(
    "path",
    [
        "/static/other.js",
        "/static/",
        "/static/dashboard.html",  # the page is served at / only
        "/static/../adapters/server.py",
        "/static/%2e%2e/dashboard.py",
        "/static/..%2fdashboard.py",
        "/static/dashboard.js/../../pyproject.toml",
        "/static//etc/passwd",
        "/dashboard.js",
    ],
)
async def test_unknown_asset_names_are_404_and_reach_no_file(
    server: WirestateServer, path: str
) -> None:
    # Raw bytes on the socket: no client library normalizes the path on the way.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
        )
        async with asyncio.timeout(WAIT):
            answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 ")
    assert orjson.loads(body)["error"] == "not_found"


async def test_a_snapshot_before_the_hub_starts_is_503() -> None:
    app = Dashboard(lambda visible: None, WirestateServer().auth).mount(Router())
    request = HttpRequest("GET", "/api/snapshot", "/api/snapshot", "", (), b"")
    response = await app(request)
    assert response.status == 503


# --------------------------------------------------------------------------- with [auth]


def token(**claims: Any) -> str:
    body = {"sub": "ops", "exp": time.time() + 60, "subscribe": ["*"], "publish": []}
    body.update(claims)
    return jwt.encode(body, SECRET, algorithm="HS256")


@pytest.fixture
async def guarded() -> AsyncIterator[httpx.AsyncClient]:
    srv = WirestateServer(settings(auth={"secret": SECRET}), epoch="auth")
    async with srv:
        await srv.publish("orders", {"id": 1})
        base = f"http://127.0.0.1:{srv.port}"
        async with httpx.AsyncClient(base_url=base, timeout=WAIT) as client:
            yield client


async def test_with_auth_the_snapshot_needs_a_token_and_the_page_does_not(
    guarded: httpx.AsyncClient,
) -> None:
    for path in ("/", *(f"/static/{name}" for name in ASSETS)):
        assert (await guarded.get(path)).status_code == 200
    bad = "not.a.jwt"
    for kwargs in ({}, {"headers": {"Authorization": f"Bearer {bad}"}}, {"params": {"token": bad}}):
        response = await guarded.get("/api/snapshot", **kwargs)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert bad.encode() not in response.content
        assert response.json()["error"] == "unauthorized"
    expired = token(exp=time.time() - 10)
    refused = await guarded.get("/api/snapshot", headers={"Authorization": f"Bearer {expired}"})
    assert refused.status_code == 401
    assert expired.encode() not in refused.content
    by_header = await snap(guarded, headers={"Authorization": f"Bearer {token()}"})
    by_query = await snap(guarded, params={"token": token()})
    for body in (by_header, by_query):
        assert body["connections"] is not None
        assert body["breakers"] is not None
        assert "orders" in {t["name"] for t in body["topics"]["rows"]}


async def test_with_auth_a_narrow_token_sees_only_its_topics(guarded: httpx.AsyncClient) -> None:
    body = await snap(guarded, params={"token": token(subscribe=["orders"])})
    assert body["clients"] is None
    assert body["breakers"] is None
    assert [t["name"] for t in body["topics"]["rows"]] == ["orders"]
    assert {e["topic"] for e in body["events"]} == {"orders"}
