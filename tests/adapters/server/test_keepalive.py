"""The core's keep-alive pings over the websockets transport: written at once when the
writer is parked (no writer wake-up, no websockets ping future), answered only by a pong
that carries the ping's own payload."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import pytest

from wirestate.adapters.server import WirestateServer
from wirestate.adapters.server.transports.websockets import WebsocketsTransport
from wirestate.testing.net import (
    CLOSE,
    PING,
    PONG,
    WAIT,
    connected,
    frame,
    raw_upgrade,
    read_frame,
    server_settings,
    until,
)


async def test_pings_are_written_without_the_writer_and_their_pongs_recorded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    through_writer = 0
    original = WebsocketsTransport.ping

    async def counting(self: WebsocketsTransport) -> Awaitable[object]:
        nonlocal through_writer
        through_writer += 1
        return await original(self)

    monkeypatch.setattr(WebsocketsTransport, "ping", counting)
    async with WirestateServer(server_settings(), epoch="test") as server:
        hub = server.hub
        assert hub is not None
        ws, _ = await connected(server.url)  # websockets answers each ping while it reads
        closed = asyncio.create_task(ws.wait_closed())
        await until(lambda: hub.stats.pings >= 20)
        # 20 pings at 50 ms with a 100 ms pong timeout: every pong was recorded, or the
        # client would have been closed for keepalive; none went through the writer.
        assert not closed.done()
        assert through_writer == 0
        await ws.close()
        await closed


async def test_a_pong_with_another_payload_answers_nothing() -> None:
    async with WirestateServer(server_settings(), epoch="test") as server:
        reader, writer, head = await raw_upgrade(server.port)
        assert head.startswith(b"HTTP/1.1 101")
        answered = 0
        try:
            async with asyncio.timeout(WAIT):
                while True:
                    opcode, payload = await read_frame(reader)
                    if opcode == PING:
                        # An unsolicited-looking pong: same length, other bytes.
                        writer.write(frame(PONG, bytes(b ^ 0xFF for b in payload)))
                        answered += 1
                    elif opcode == CLOSE:
                        break
        finally:
            writer.close()
        assert answered >= 1
        assert int.from_bytes(payload[:2], "big") == 1011
        assert payload[2:] == b"keepalive_timeout"


async def test_a_pong_with_the_ping_payload_keeps_a_raw_peer_open() -> None:
    async with WirestateServer(server_settings(), epoch="test") as server:
        hub = server.hub
        assert hub is not None
        reader, writer, _ = await raw_upgrade(server.port)
        pings = 0
        try:
            while pings < 10:  # 10 intervals: 5x the pong timeout
                opcode, payload = await read_frame(reader)
                assert opcode != CLOSE, payload
                if opcode == PING:
                    writer.write(frame(PONG, payload))
                    pings += 1
            assert len(hub.clients) == 1
        finally:
            writer.close()
