"""What the distributed tests share: a Redis (REDIS_URL, or one of their own), `wirestate
serve` processes on it, a real HTTP upstream, and bounded waits on what a node says.

Redis is REDIS_URL (default redis://127.0.0.1:6379/0); without it these tests skip, except
under CI, where they fail. Tests that stop Redis start their own redis-server (and
redis-sentinel) on free loopback ports, so stopping it disturbs nothing else.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from wirestate.testing.net import free_port, recv

WAIT = 20.0  # the bound on every wait: a failure, never a hang
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def _reachable(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="module")
def redis_url() -> str:
    if not _reachable(REDIS_URL):
        if os.environ.get("CI"):
            pytest.fail(f"Redis is not reachable at {REDIS_URL}; CI must provide it")
        pytest.skip(f"Redis is not reachable at {REDIS_URL}; set REDIS_URL")
    return REDIS_URL


class Node:
    def __init__(self, proc: subprocess.Popen[bytes] | None, port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"ws://127.0.0.1:{port}/ws"
        self.http = f"http://127.0.0.1:{port}"


@contextmanager
def nodes(
    tmp_path: Path, url: str, count: int, *, extra: str = "", **bus: Any
) -> Iterator[list[Node]]:
    """``count`` `wirestate serve` processes on the Redis bus at ``url``; ``extra``: more
    TOML after the ``[bus.breaker]`` table (``[[sources]]`` tables)."""
    breaker = bus.get("breaker", {"failure_threshold": 1, "reset_timeout": 0.2})
    config = tmp_path / "bus.toml"
    config.write_text(
        f'[history]\nsize = 1000\n\n[bus]\nkind = "redis"\nurl = "{url}"\n'
        f"lease_ttl = {bus.get('lease_ttl', 10.0)}\n\n[bus.breaker]\n"
        f"failure_threshold = {breaker['failure_threshold']}\n"
        f"reset_timeout = {breaker['reset_timeout']}\n" + extra
    )
    exe = Path(sys.executable).with_name("wirestate")
    started: list[Node] = []
    try:
        for _ in range(count):
            port = free_port()
            proc = subprocess.Popen(
                [str(exe), "serve", "--config", str(config), "--port", str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            started.append(Node(proc, port))
        yield started
    finally:
        for node in started:
            assert node.proc is not None
            if node.proc.poll() is None:
                node.proc.terminate()
        for node in started:
            assert node.proc is not None
            try:
                node.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()


async def ready(node: Node, want: bool = True) -> dict[str, Any]:
    """Wait until /readyz says ``want``; returns its body."""
    async with httpx.AsyncClient() as http, asyncio.timeout(WAIT):
        while True:
            try:
                r = await http.get(f"{node.http}/readyz")
                if (r.status_code == 200) is want:
                    body: dict[str, Any] = r.json()
                    return body
            except httpx.TransportError:
                pass  # not listening yet
            await asyncio.sleep(0.02)  # another process's state: /readyz is all there is


@asynccontextmanager
async def subscriber(
    node: Node, *topics: str, since: dict[str, Any] | None = None
) -> AsyncIterator[tuple[ClientConnection, dict[str, Any]]]:
    async with connect(node.url, ping_interval=None) as ws:
        assert (await recv(ws, WAIT))["type"] == "welcome"
        msg: dict[str, Any] = {"type": "subscribe", "topics": list(topics)}
        if since:
            msg["since"] = since
        await ws.send(orjson.dumps(msg).decode())
        subscribed = await recv(ws, WAIT)
        assert subscribed["type"] == "subscribed"
        yield ws, subscribed


async def publish(node: Node, topic: str, data: Any) -> int:
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{node.http}/publish", json={"topic": topic, "data": data})
    assert r.status_code == 200, r.text
    seq: int = r.json()["seq"]
    return seq


async def events(ws: ClientConnection, n: int) -> list[dict[str, Any]]:
    """The next ``n`` event or gap messages."""
    out: list[dict[str, Any]] = []
    while len(out) < n:
        msg = await recv(ws, WAIT)
        if msg["type"] in ("event", "gap"):
            out.append(msg)
    return out


def topic() -> str:
    return f"test.bus.{secrets.token_hex(4)}"


@contextmanager
def own_redis(port: int) -> Iterator[subprocess.Popen[bytes]]:
    exe = shutil.which("redis-server")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed; CI must provide it")
        pytest.skip("redis-server is not installed")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait()


class Upstream:
    """A real HTTP upstream on loopback for `wirestate serve` nodes to poll: each request
    gets ``{"n": <request number>}`` while ``up``, else a 500. ``times``: when each request
    arrived (``time.monotonic``), whichever node made it."""

    def __init__(self) -> None:
        self.up = True
        self.times: list[float] = []
        self.url = ""
        self._server: asyncio.Server | None = None

    @property
    def requests(self) -> int:
        return len(self.times)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.times.append(time.monotonic())
            status, body = (200, orjson.dumps({"n": self.requests})) if self.up else (500, b"{}")
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the poller gave up (its timeout, or it was killed)
        finally:
            writer.close()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    server._server = await asyncio.start_server(server._handle, "127.0.0.1", 0)
    server.url = f"http://127.0.0.1:{server._server.sockets[0].getsockname()[1]}/status"
    try:
        yield server
    finally:
        server._server.close()
        await server._server.wait_closed()


async def metric(node: Node, name: str, **labels: str) -> float | None:
    """One sample of the node's /metrics, None when it is not there (or the node is not)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"{node.http}/metrics", timeout=2.0)).text
    except httpx.TransportError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None
