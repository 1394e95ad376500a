"""Authentication and authorization on the real server: tokens at the upgrade, claims per
topic, expiry while connected, POST /publish, the Origin allowlist, and no secret in logs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from wirestate.adapters.server.service import WirestateServer
from wirestate.models.settings import Settings
from wirestate.testing.net import WAIT, recv

SECRET = "s3cret-" + "x" * 40


def token(**claims: Any) -> str:
    body = {"sub": "alice", "exp": time.time() + 60, "subscribe": ["orders.*"], "publish": []}
    body.update(claims)
    return jwt.encode(body, SECRET, algorithm="HS256")


@pytest.fixture
async def server() -> AsyncIterator[WirestateServer]:
    settings = Settings.model_validate(
        {
            "server": {"port": 0},
            "auth": {"secret": SECRET, "allowed_origins": ["https://app.example.com"]},
        }
    )
    async with WirestateServer(settings) as srv:
        yield srv


async def test_no_or_bad_token_is_401_and_the_body_never_echoes_it(
    server: WirestateServer,
) -> None:
    for url in (server.url, server.url + "?token=not.a.jwt"):
        with pytest.raises(InvalidStatus) as refused:
            await connect(url, ping_interval=None)
        response = refused.value.response
        assert response.status_code == 401
        assert b"not.a.jwt" not in response.body
    wrong = jwt.encode({"sub": "x", "exp": time.time() + 60}, "another-" + "y" * 40, "HS256")
    with pytest.raises(InvalidStatus) as refused:
        await connect(server.url, additional_headers={"Authorization": f"Bearer {wrong}"})
    assert refused.value.response.status_code == 401
    assert wrong.encode() not in refused.value.response.body


async def test_a_token_in_the_header_or_the_query_lets_a_client_in(
    server: WirestateServer,
) -> None:
    by_header = await connect(
        server.url, additional_headers={"Authorization": f"Bearer {token()}"}, ping_interval=None
    )
    by_query = await connect(f"{server.url}?token={token()}", ping_interval=None)
    for ws in (by_header, by_query):
        assert (await recv(ws))["type"] == "welcome"
        await ws.close()


async def test_topics_outside_the_claims_are_forbidden(server: WirestateServer) -> None:
    ws = await connect(f"{server.url}?token={token()}", ping_interval=None)
    await recv(ws)
    await ws.send('{"type": "subscribe", "topics": ["orders.eu", "payroll"]}')
    error = await recv(ws)
    assert (error["type"], error["code"]) == ("error", "forbidden")
    await ws.send('{"type": "subscribe", "topics": ["orders.eu"]}')
    assert (await recv(ws))["type"] == "subscribed"
    await ws.send('{"type": "publish", "topic": "orders.eu", "data": 1}')
    assert (await recv(ws))["code"] == "forbidden"  # no publish claim
    await ws.close()


async def test_a_token_expiring_while_connected_closes_with_1008_auth_expired(
    server: WirestateServer,
) -> None:
    ws = await connect(f"{server.url}?token={token(exp=time.time() + 1.0)}", ping_interval=None)
    await recv(ws)
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(WAIT):
            while True:
                await ws.recv()
    assert (ws.close_code, ws.close_reason) == (1008, "auth_expired")


async def test_a_disallowed_origin_is_403(server: WirestateServer) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"{server.url}?token={token()}", origin="https://evil.example.net")
    assert refused.value.response.status_code == 403
    ok = await connect(f"{server.url}?token={token()}", origin="https://app.example.com")
    assert (await recv(ok))["type"] == "welcome"
    await ok.close()


async def http_publish(port: int, body: bytes, bearer: str | None) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    auth = f"Authorization: Bearer {bearer}\r\n" if bearer else ""
    writer.write(
        f"POST /publish HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Length: {len(body)}\r\n"
        "Content-Type: application/json\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    raw = await asyncio.wait_for(reader.read(), WAIT)
    writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


async def test_post_publish_needs_a_token_with_publish_rights(server: WirestateServer) -> None:
    body = orjson.dumps({"topic": "orders.eu", "data": {"id": 1}})
    assert (await http_publish(server.port, body, None))[0] == 401
    assert (await http_publish(server.port, body, token()))[0] == 403
    status, reply = await http_publish(server.port, body, token(publish=["orders.*"]))
    assert (status, orjson.loads(reply)) == (200, {"seq": 1})


async def test_tokens_and_the_secret_never_reach_the_logs(
    server: WirestateServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # websockets logs each request line at DEBUG: the most likely place for a ?token= leak.
    caplog.set_level(logging.DEBUG, logger="websockets.server")
    good, bad = token(), token()[:-4] + "AAAA"
    ws = await connect(f"{server.url}?token={good}", ping_interval=None)
    await recv(ws)
    await ws.close()
    with pytest.raises(InvalidStatus):
        await connect(f"{server.url}?token={bad}", ping_interval=None)
    await http_publish(server.port, b'{"topic": "orders.eu", "data": 1}', bad)
    _, metrics = await asyncio.wait_for(_get(server.port, "/metrics"), WAIT)
    # The server's own records (the test's client logs its request line itself).
    server_side = [
        r.getMessage() for r in caplog.records if not r.name.startswith("websockets.client")
    ]
    assert any("GET /ws?token=[redacted]" in line for line in server_side)
    text = "\n".join(server_side) + metrics.decode()
    for secret in (SECRET, good, bad, good.split(".")[2]):
        assert secret not in text


async def _get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    raw = await reader.read()
    writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


async def test_open_mode_refuses_a_non_loopback_address() -> None:
    server = WirestateServer(Settings.model_validate({"server": {"host": "0.0.0.0", "port": 0}}))
    wanted = r"configure \[auth\], bind 127.0.0.1, or set \[server\] open_beyond_loopback"
    with pytest.raises(ValueError, match=wanted):
        await server.start()


@pytest.fixture
async def first_message_server() -> AsyncIterator[WirestateServer]:
    settings = Settings.model_validate(
        {
            "server": {"port": 0},
            "auth": {"secret": SECRET, "first_message": True, "first_message_timeout": 0.3},
        }
    )
    async with WirestateServer(settings) as srv:
        yield srv


async def closed_with(ws: ClientConnection) -> tuple[int | None, str | None]:
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(WAIT):
            while True:
                await ws.recv()
    return ws.close_code, ws.close_reason


async def test_first_message_auth_grants_the_tokens_claims(
    first_message_server: WirestateServer,
) -> None:
    ws = await connect(first_message_server.url, ping_interval=None)
    assert (await recv(ws))["type"] == "welcome"
    await ws.send(orjson.dumps({"type": "auth", "token": token()}).decode())
    await ws.send('{"type": "subscribe", "topics": ["orders.eu"]}')
    assert (await recv(ws))["type"] == "subscribed"
    await ws.send('{"type": "subscribe", "topics": ["payroll"]}')
    assert (await recv(ws))["code"] == "forbidden"
    await ws.send(orjson.dumps({"type": "auth", "token": token()}).decode())
    assert (await recv(ws))["code"] == "forbidden"  # only as the first message
    await ws.close()


@pytest.mark.parametrize(
    "first",
    [None, '{"type": "subscribe", "topics": ["orders.eu"]}', '{"type": "auth", "token": "x.y.z"}'],
    ids=["nothing-within-the-deadline", "another-message-first", "a-bad-token"],
)
async def test_first_message_auth_closes_with_1008_otherwise(
    first_message_server: WirestateServer, first: str | None
) -> None:
    ws = await connect(first_message_server.url, ping_interval=None)
    assert (await recv(ws))["type"] == "welcome"
    if first is not None:
        await ws.send(first)
    assert await closed_with(ws) == (1008, "policy")
