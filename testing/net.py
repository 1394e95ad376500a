"""Helpers for tests that talk to a real hub over loopback sockets: settings with
millisecond deadlines, bounded waits, reading the next message of a type, a connected
client, and ``wirestate serve`` in a child process. wirestate's own tests use them; so can
yours.

Every wait here is bounded (``WAIT`` seconds unless told otherwise) and waits on an event
where there is one: a test never sleeps its way to a result.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect

from wirestate.models.settings import Settings

__all__ = [
    "BINARY",
    "CLOSE",
    "PING",
    "TEXT",
    "WAIT",
    "Served",
    "connected",
    "frame",
    "free_port",
    "next_of",
    "raw_upgrade",
    "read_frame",
    "recv",
    "serve_process",
    "server_settings",
    "until",
    "until_true",
]

#: The bound on every wait: generous for a loaded CI machine, never reached when passing.
WAIT = 10.0

#: [server] keys of a test server: any free port, keep-alive in milliseconds.
FAST_SERVER: Mapping[str, Any] = {
    "port": 0,
    "ping_interval": 0.05,
    "ping_timeout": 0.1,
    "close_timeout": 0.5,
    "loop_stall_threshold": 0.05,
}


def server_settings(sections: Mapping[str, Any] | None = None, **server: Any) -> Settings:
    """Settings for a test server: `FAST_SERVER` with ``server``'s keys over it, and the
    other tables (``limits``, ``auth``, ``history``...) from ``sections``."""
    values = {**FAST_SERVER, **server}
    return Settings.model_validate({**(sections or {}), "server": values})


async def until(predicate: Callable[[], Any], bound: float = WAIT) -> None:
    """Wait for a condition the test cannot be notified of (a counter, a registry), checking
    it every few milliseconds, for ``bound`` seconds at most."""
    async with asyncio.timeout(bound):
        while not predicate():  # noqa: ASYNC110 - state with no event to wait on
            await asyncio.sleep(0.005)


async def until_true(
    predicate: Callable[[], Awaitable[Any]], bound: float = WAIT, every: float = 0.02
) -> None:
    """`until` for a condition that must be asked for (another process's state: Redis's
    expiry, a child's /readyz), every ``every`` seconds, for ``bound`` seconds at most."""
    async with asyncio.timeout(bound):
        while not await predicate():  # noqa: ASYNC110 - another process: nothing to be told
            await asyncio.sleep(every)


async def recv(ws: ClientConnection, bound: float = WAIT) -> dict[str, Any]:
    """The next message, parsed."""
    async with asyncio.timeout(bound):
        raw = await ws.recv()
    msg: dict[str, Any] = orjson.loads(raw)
    return msg


async def next_of(
    ws: ClientConnection, kind: str, bound: float = WAIT, **match: Any
) -> dict[str, Any]:
    """The next message of type ``kind`` whose fields equal ``match``; others are skipped."""
    async with asyncio.timeout(bound):
        while True:
            msg = await recv(ws, bound)
            if msg.get("type") == kind and all(msg.get(k) == v for k, v in match.items()):
                return msg


async def connected(
    url: str, *topics: str, **options: Any
) -> tuple[ClientConnection, dict[str, Any]]:
    """A client connected to ``url`` with its ``welcome`` read (and, with ``topics``,
    subscribed to them, the ``subscribed`` read); returns it and the welcome. ``options``
    go to websockets' ``connect``."""
    options.setdefault("compression", None)
    options.setdefault("ping_interval", None)
    ws = await connect(url, **options)
    welcome = await recv(ws)
    assert welcome["type"] == "welcome", welcome
    if topics:
        await ws.send(orjson.dumps({"type": "subscribe", "topics": list(topics)}).decode())
        assert (await next_of(ws, "subscribed"))["topics"] == list(topics)
    return ws, welcome


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a child process that cannot report its own)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    """A ``wirestate serve`` child process: its ``url`` once it listens, and its log
    records (JSON lines of stderr), complete once it has exited."""

    proc: asyncio.subprocess.Process
    url: str
    logs: list[dict[str, Any]] = field(default_factory=list)

    async def exited(self, bound: float = WAIT) -> int:
        """Its exit status, waiting for it at most ``bound`` seconds."""
        async with asyncio.timeout(bound):
            return await self.proc.wait()


@contextlib.asynccontextmanager
async def serve_process(
    *flags: str, bound: float = WAIT, soft_nofile: int | None = None
) -> AsyncIterator[Served]:
    """Run ``wirestate serve --port 0 --log-format json`` plus ``flags`` in a child process
    and yield it once its ``listening`` line says where. On exit the child is killed if it
    is still running, and its remaining log lines are read. ``soft_nofile`` starts the
    child with that soft limit on open descriptors."""
    exe = Path(sys.executable).with_name("wirestate")

    def limit() -> None:  # runs in the child, before exec
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft_nofile, hard))

    proc = await asyncio.create_subprocess_exec(
        str(exe),
        "serve",
        "--port",
        "0",
        "--log-format",
        "json",
        *flags,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=limit if soft_nofile is not None else None,
    )
    assert proc.stderr is not None
    logs: list[dict[str, Any]] = []
    reader: asyncio.Task[None] | None = None
    try:
        url = None
        async with asyncio.timeout(bound):
            while url is None:
                line = await proc.stderr.readline()
                if not line:
                    raise RuntimeError(f"wirestate serve exited before listening: {logs}")
                record = orjson.loads(line)
                logs.append(record)
                if record.get("msg") == "listening":
                    url = str(record["url"])

        async def read_rest(stream: asyncio.StreamReader) -> None:
            async for line in stream:
                if line.strip():
                    logs.append(orjson.loads(line))

        reader = asyncio.create_task(read_rest(proc.stderr))
        yield Served(proc, url, logs)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        if reader is not None:
            await asyncio.wait_for(reader, bound)


# -- a raw WebSocket peer, for hostile tests ------------------------------------------------


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0) -> bytes:
    """A masked client frame (RFC 6455 section 5.2), any opcode, reserved bits as given:
    what a well-behaved client library would never let a test send."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    key = b"\x00\x00\x00\x00"  # a zero mask: the payload goes as it is, still masked
    return head + key + payload


TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


async def raw_upgrade(
    port: int, path: str = "/ws", *, rcvbuf: int | None = None, headers: str = ""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A TCP connection to 127.0.0.1:``port`` upgraded to WebSocket by hand; returns the
    streams and the response head. ``rcvbuf`` shrinks the socket's receive buffer (a peer
    that stops reading then stops the server's writes sooner)."""
    sock = None
    if rcvbuf is not None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=rcvbuf)
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\n{headers}\r\n"
        ).encode()
    )
    async with asyncio.timeout(WAIT):
        head = await reader.readuntil(b"\r\n\r\n")
    return reader, writer, head


async def read_frame(reader: asyncio.StreamReader, bound: float = WAIT) -> tuple[int, bytes]:
    """The next server frame (unmasked): (opcode, payload)."""
    async with asyncio.timeout(bound):
        first, second = await reader.readexactly(2)
        n = second & 0x7F
        if n == 126:
            n = int.from_bytes(await reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await reader.readexactly(8), "big")
        return first & 0x0F, await reader.readexactly(n)
