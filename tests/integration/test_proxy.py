"""Behind a real nginx on loopback: with ``[server] trusted_proxies``, each client is counted
and logged as itself, not as the proxy. Clients come from distinct loopback addresses
(127.0.0.2, 127.0.0.3), which nginx forwards in X-Forwarded-For."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus

from wirestate.adapters.server.service import WirestateServer
from wirestate.testing.net import WAIT, connected, free_port, server_settings, until_true

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (Debian: apt-get install nginx)"
)

CONFIG = """
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 60s;
        }}
    }}
}}
"""


@pytest.fixture
async def hub() -> AsyncIterator[WirestateServer]:
    settings = server_settings(
        {"limits": {"max_connections_per_ip": 2}}, trusted_proxies=["127.0.0.1"]
    )
    async with WirestateServer(settings) as server:
        yield server


@pytest.fixture
def nginx(hub: WirestateServer, tmp_path: Path) -> Iterator[int]:
    assert NGINX is not None
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(CONFIG.format(tmp=tmp_path, port=port, upstream=hub.port))
    child = subprocess.Popen(
        [NGINX, "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # its error log is a file of its own
    )
    try:
        yield port
    finally:
        child.terminate()
        try:
            child.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


async def through(port: int, source: str, **options: object) -> ClientConnection:
    """A client connected through the proxy from the loopback address ``source``."""
    ws, _ = await connected(f"ws://127.0.0.1:{port}/ws", local_addr=(source, 0), **options)
    return ws


async def listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


async def test_each_client_behind_the_proxy_is_counted_and_logged_as_itself(
    hub: WirestateServer, nginx: int, caplog: pytest.LogCaptureFixture
) -> None:
    await until_true(lambda: listening(nginx))
    caplog.set_level(logging.INFO, logger="wirestate.server")
    first = await through(nginx, "127.0.0.2")
    # a forged X-Forwarded-For is kept left of what nginx appends, and never read; a forged
    # Forwarded is passed through by nginx, and never read either
    forged = {"X-Forwarded-For": "203.0.113.66", "Forwarded": "for=198.51.100.1"}
    second = await through(nginx, "127.0.0.2", additional_headers=forged)
    with pytest.raises(InvalidStatus) as refused:
        await through(nginx, "127.0.0.2")
    assert refused.value.response.status_code == 429  # its own limit, not the proxy's
    other = await through(nginx, "127.0.0.3")
    assert hub.admission.per_ip == {"127.0.0.2": 2, "127.0.0.3": 1}
    peers = [r.__dict__.get("peer") for r in caplog.records if r.getMessage() == "connected"]
    assert peers == ["127.0.0.2", "127.0.0.2", "127.0.0.3"]
    for ws in (first, second, other):
        await ws.close()


async def test_without_trust_the_forwarded_header_is_ignored() -> None:
    async with WirestateServer(server_settings()) as server:
        ws, _ = await connected(server.url, additional_headers={"X-Forwarded-For": "203.0.113.66"})
        assert server.admission.per_ip == {"127.0.0.1": 1}
        await ws.close()
