"""Who may reach the hub before any token: Host and Origin in open mode, an Origin
allowlist without tokens, anonymous topics beside private ones, and the client's address
behind trusted proxies. The rules as functions first, then on a real server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from wirestate.adapters.server.access import Access, loopback_name, split_host
from wirestate.adapters.server.service import WirestateServer
from wirestate.models.settings import ConfigError, Settings, load_settings
from wirestate.testing.net import WAIT, connected, next_of, server_settings

SECRET = "access-" + "k" * 40


def token(**claims: Any) -> str:
    body = {"sub": "bob", "exp": time.time() + 60, "subscribe": ["private.*"], "publish": []}
    return jwt.encode({**body, **claims}, SECRET, algorithm="HS256")


def access(**sections: Any) -> Access:
    return Access(Settings.model_validate(sections))


# -- the rules -----------------------------------------------------------------------------


def test_a_proxy_that_writes_forwarded_is_read_from_that_header_only() -> None:
    rules = access(server={"trusted_proxies": ["127.0.0.1"], "forwarded_header": "forwarded"})
    forwarded = ("Forwarded", 'for=192.0.2.60;proto=http, for="[2001:db8::1]:4711"')
    assert rules.client_ip("127.0.0.1", [forwarded]) == "2001:db8::1"
    assert rules.client_ip("127.0.0.1", [("Forwarded", "for=192.0.2.60:1234")]) == "192.0.2.60"
    assert rules.client_ip("127.0.0.1", [("X-Forwarded-For", "9.9.9.9")]) == "127.0.0.1"
    assert rules.client_ip("127.0.0.1", [("Forwarded", "proto=https")]) == "127.0.0.1"


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("127.0.0.1:12080", ("127.0.0.1", 12080)),
        ("LocalHost.", ("localhost", None)),
        ("[::1]:80", ("::1", 80)),
        ("hub.example.com", ("hub.example.com", None)),
        ("a:b:c", None),
        ("[::1", None),
        ("host:99999", None),
        ("host:", None),
        ("", None),
        ("evil.example/x", None),
        ("localhost:\u00b2", None),  # a digit to str.isdigit, not to int()
    ],
)
def test_host_headers_are_split_into_name_and_port(
    value: str, parsed: tuple[str, int | None] | None
) -> None:
    assert split_host(value) == parsed


def test_loopback_names_are_the_ones_a_browser_resolves_to_loopback_itself() -> None:
    for name in ("localhost", "app.localhost", "127.0.0.1", "127.9.9.9", "::1"):
        assert loopback_name(name)
    for name in ("evil.example", "localhost.evil.example", "10.0.0.1", "0.0.0.0"):
        assert not loopback_name(name)


def test_open_mode_answers_loopback_host_names_only() -> None:
    rules = access()
    assert not rules.host_refused("127.0.0.1:12080")
    assert not rules.host_refused("localhost:12080")
    assert not rules.host_refused(None)  # HTTP/1.0 tools: not a browser
    assert rules.host_refused("evil.example:12080")  # a rebound name
    assert rules.host_refused("not a host")


def test_allowed_hosts_pin_the_names_with_or_without_auth() -> None:
    pinned = access(auth={"secret": SECRET}, server={"allowed_hosts": ["hub.example.com"]})
    assert not pinned.host_refused("HUB.example.com.:443")
    assert pinned.host_refused("localhost:12080")
    assert not access(auth={"secret": SECRET}).host_refused("anything.example")
    assert not access(server={"allowed_hosts": ["[::1]"]}).host_refused("[::1]:80")


def test_an_origin_list_without_tokens_still_answers_loopback_host_names_only() -> None:
    # no token is checked, so a rebound page's same-origin GET (no Origin) must meet the Host
    rules = access(auth={"allowed_origins": ["https://app.example.com"]})
    assert rules.host_refused("evil.example:12080")
    assert not rules.host_refused("localhost:12080")
    named = access(
        auth={"allowed_origins": ["https://app.example.com"]},
        server={"allowed_hosts": ["hub.intranet"]},
    )
    assert not named.host_refused("hub.intranet")


def test_with_allowed_hosts_only_those_names_are_the_hubs_own_origins() -> None:
    rules = access(server={"allowed_hosts": ["hub.example.com"]})
    assert not rules.origin_refused("https://hub.example.com", "hub.example.com")
    assert rules.origin_refused("http://localhost", "hub.example.com")
    assert not access().origin_refused("http://localhost.:12080", "localhost.:12080")


def test_open_mode_takes_only_its_own_pages_origin() -> None:
    rules = access()
    own = "127.0.0.1:12080"
    assert not rules.origin_refused(None, own)  # curl, the CLI
    assert not rules.origin_refused("http://localhost:12080", own)
    assert not rules.origin_refused("http://127.0.0.1:12080", "localhost:12080")
    assert rules.origin_refused("http://localhost:3000", own)  # another local app
    assert rules.origin_refused("https://evil.example", own)
    assert rules.origin_refused("null", own)  # sandboxed frames, file: pages
    assert rules.origin_refused("http://localhost", own)
    assert not rules.origin_refused("http://localhost", "localhost")
    assert rules.origin_refused("http://localhost:12080", "bad host")


def test_an_origin_allowlist_replaces_the_own_origin_rule() -> None:
    rules = access(auth={"allowed_origins": ["https://app.example.com"]})
    assert not rules.origin_refused("https://app.example.com", "hub.example.com")
    assert rules.origin_refused("http://localhost:12080", "localhost:12080")
    assert rules.origin_refused("null", "hub.example.com")
    # with tokens and no list, the token is the check
    assert not access(auth={"secret": SECRET}).origin_refused("https://x.example", "h")


@pytest.mark.parametrize(
    ("peer", "headers", "client"),
    [
        # from a trusted proxy: the right-most hop that is not itself trusted
        ("127.0.0.1", [("X-Forwarded-For", "203.0.113.9")], "203.0.113.9"),
        ("127.0.0.1", [("x-forwarded-for", "6.6.6.6, 203.0.113.9, 10.0.0.2")], "203.0.113.9"),
        ("127.0.0.1", [("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "7.7.7.7")], "7.7.7.7"),
        # the header the proxy does not write is the client's own: never read
        ("127.0.0.1", [("Forwarded", "for=192.0.2.60")], "127.0.0.1"),
        ("127.0.0.1", [("X-Forwarded-For", "10.0.0.3, 10.0.0.2")], "10.0.0.3"),  # all trusted
        ("127.0.0.1", [("X-Forwarded-For", "203.0.113.9, unknown")], "127.0.0.1"),
        ("127.0.0.1", [], "127.0.0.1"),
        ("::ffff:127.0.0.1", [("X-Forwarded-For", "203.0.113.9")], "203.0.113.9"),
        ("127.0.0.1", [("X-Forwarded-For", "1.2.3.4:80"), ("x-forwarded-for", " ")], "1.2.3.4"),
        # from anyone else the headers are the client's own words: ignored
        ("198.51.100.4", [("X-Forwarded-For", "203.0.113.9")], "198.51.100.4"),
        ("?", [("X-Forwarded-For", "203.0.113.9")], "?"),
    ],
)
def test_the_client_address_is_believed_from_trusted_proxies_only(
    peer: str, headers: list[tuple[str, str]], client: str
) -> None:
    rules = access(server={"trusted_proxies": ["127.0.0.1", "10.0.0.0/8"]})
    assert rules.client_ip(peer, headers) == client
    assert access().client_ip(peer, headers) == peer  # no proxies trusted


@pytest.mark.parametrize(
    ("table", "wanted"),
    [
        ({"server": {"trusted_proxies": ["nginx"]}}, "addresses or CIDR ranges"),
        ({"server": {"allowed_hosts": ["hub.example.com:443"]}}, "without a port"),
        ({"auth": {"first_message_timeout": 3}}, "or allowed_origins alone"),
        ({"auth": {"allowed_origins": ["https://a.example"], "anonymous": ["p.*"]}}, "need tokens"),
        ({"auth": {"secret": SECRET, "anonymous": [""]}}, "topic patterns"),
    ],
)
def test_access_settings_that_cannot_work_are_refused_with_what_to_change(
    table: dict[str, Any], wanted: str
) -> None:
    with pytest.raises(ConfigError, match=wanted):
        load_settings(overrides=table, env={})


# -- on a real server ----------------------------------------------------------------------


@pytest.fixture
async def open_hub() -> AsyncIterator[WirestateServer]:
    async with WirestateServer(server_settings()) as server:
        yield server


async def http_raw(port: int, head: str, body: bytes = b"") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode() + body)
    async with asyncio.timeout(WAIT):
        raw = await reader.read()
    writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


async def test_open_mode_refuses_other_origins_at_the_upgrade(open_hub: WirestateServer) -> None:
    port = open_hub.port
    for origin in ("https://evil.example", "http://localhost:1", "null"):
        with pytest.raises(InvalidStatus) as refused:
            await connect(open_hub.url, origin=origin, ping_interval=None)  # type: ignore[arg-type]
        assert refused.value.response.status_code == 403
    assert open_hub.metrics.rejections["origin"] == 3
    ws, _ = await connected(open_hub.url, "t", origin=f"http://localhost:{port}")
    await ws.close()
    ws, _ = await connected(open_hub.url, "t")  # no Origin: the CLI, scripts
    await ws.close()


async def test_a_rebound_host_name_reaches_nothing_in_open_mode(open_hub: WirestateServer) -> None:
    port = open_hub.port
    for path in ("/api/snapshot", "/", "/healthz", "/metrics"):
        status, body = await http_raw(
            port, f"GET {path} HTTP/1.1\r\nHost: evil.example:{port}\r\nConnection: close\r\n\r\n"
        )
        assert status == 421, path
        assert orjson.loads(body)["error"] == "misdirected_request"
        assert b"evil" not in body
    upgrade = (
        f"GET /ws HTTP/1.1\r\nHost: evil.example:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    )
    status, body = await http_raw(port, upgrade)
    assert status == 421
    assert b"allowed_hosts" in body
    assert open_hub.metrics.rejections["host"] == 5
    status, _ = await http_raw(
        port, f"GET /api/snapshot HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n"
    )
    assert status == 200


async def test_a_repeated_host_or_origin_is_refused_at_the_upgrade(
    open_hub: WirestateServer,
) -> None:
    port = open_hub.port
    for extra in (f"Host: evil.example:{port}\r\n", f"Origin: http://localhost:{port}\r\n" * 2):
        upgrade = (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}Upgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        )
        status, _ = await http_raw(port, upgrade)
        assert status == 400, extra
    # and on plain HTTP, which shares the check (h11 itself refuses a repeated Host)
    status, body = await http_raw(
        port,
        f"GET /api/snapshot HTTP/1.1\r\nHost: localhost:{port}\r\n"
        f"Origin: http://localhost:{port}\r\nOrigin: https://evil.example\r\n"
        "Connection: close\r\n\r\n",
    )
    assert (status, orjson.loads(body)["error"]) == (400, "bad_request")


async def test_a_rebound_host_reads_nothing_from_an_origin_list_without_tokens() -> None:
    settings = server_settings({"auth": {"allowed_origins": ["https://app.example.com"]}})
    async with WirestateServer(settings) as server:
        port = server.port
        for host, status in ((f"evil.example:{port}", 421), (f"localhost:{port}", 200)):
            got, _ = await http_raw(
                port, f"GET /api/snapshot HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            )
            assert got == status, host


async def test_no_simple_cross_site_request_can_publish(open_hub: WirestateServer) -> None:
    base = f"http://127.0.0.1:{open_hub.port}"
    body = orjson.dumps({"topic": "t", "data": 1})
    async with httpx.AsyncClient(base_url=base) as http:
        for media_type in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"content-type": media_type} if media_type else {}
            reply = await http.post("/publish", content=body, headers=headers)
            assert (reply.status_code, reply.json()["error"]) == (415, "unsupported_media_type")
        # a page on another site that sends JSON after a preflight is still refused
        reply = await http.post(
            "/publish", json={"topic": "t", "data": 1}, headers={"origin": "https://evil.example"}
        )
        assert (reply.status_code, reply.json()["error"]) == (403, "origin_not_allowed")
        assert open_hub.hub is not None
        assert open_hub.hub.topics.get("t") is None
        reply = await http.post(
            "/publish", content=body, headers={"content-type": "application/json; charset=utf-8"}
        )
        assert reply.json() == {"seq": 1}


async def test_an_origin_allowlist_works_without_tokens() -> None:
    settings = server_settings({"auth": {"allowed_origins": ["https://app.example.com"]}})
    async with WirestateServer(settings) as server:
        ws, _ = await connected(server.url, "t", origin="https://app.example.com")
        await ws.close()
        for origin in ("https://evil.example", "null"):
            with pytest.raises(InvalidStatus) as refused:
                await connect(server.url, origin=origin, ping_interval=None)  # type: ignore[arg-type]
            assert refused.value.response.status_code == 403
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
            reply = await http.post("/publish", json={"topic": "t", "data": 1})
            assert reply.json() == {"seq": 1}  # no token asked for


@pytest.fixture
async def public_hub() -> AsyncIterator[WirestateServer]:
    auth = {"secret": SECRET, "anonymous": ["public.*"], "first_message": True}
    async with WirestateServer(server_settings({"auth": auth})) as server:
        yield server


async def test_anonymous_clients_read_public_topics_only(public_hub: WirestateServer) -> None:
    ws, _ = await connected(public_hub.url, "public.prices")
    await ws.send('{"type": "subscribe", "topics": ["private.orders"]}')
    assert (await next_of(ws, "error"))["code"] == "forbidden"
    await ws.send('{"type": "publish", "topic": "public.prices", "data": 1}')
    assert (await next_of(ws, "error"))["code"] == "forbidden"
    assert public_hub.hub is not None
    await public_hub.publish("public.prices", {"p": 1})
    assert (await next_of(ws, "event"))["data"] == {"p": 1}
    # a token's claims replace the anonymous ones
    await ws.send(orjson.dumps({"type": "auth", "token": token()}).decode())
    await ws.send('{"type": "subscribe", "topics": ["private.orders"]}')
    assert (await next_of(ws, "subscribed"))["topics"] == ["private.orders"]
    await ws.close()


async def test_a_bad_token_is_still_refused_beside_anonymous_access(
    public_hub: WirestateServer,
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await connect(public_hub.url + "?token=not.a.jwt", ping_interval=None)
    assert refused.value.response.status_code == 401
    expired = token(exp=time.time() - 1)
    with pytest.raises(InvalidStatus) as refused:
        await connect(public_hub.url + f"?token={expired}", ping_interval=None)
    assert refused.value.response.status_code == 401
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{public_hub.port}") as http:
        reply = await http.post("/publish", json={"topic": "public.prices", "data": 1})
        assert reply.status_code == 401  # publishing always needs a token


async def test_a_bad_token_in_an_auth_message_closes_an_anonymous_connection(
    public_hub: WirestateServer,
) -> None:
    ws, _ = await connected(public_hub.url)
    await ws.send('{"type": "auth", "token": "not.a.jwt"}')
    async with asyncio.timeout(WAIT):
        await ws.wait_closed()
    assert ws.close_code == 1008
