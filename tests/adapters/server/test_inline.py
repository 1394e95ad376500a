"""Messages handled as the websockets transport parses them (``Session.inline``): the reader
is not woken for them, order is kept when it must take a frame itself, and a failure ends
the session with the type logged and nothing else."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import pytest
from websockets.exceptions import ConnectionClosed

from wirestate.adapters.server import WirestateServer
from wirestate.adapters.server.session import Session
from wirestate.adapters.server.transports.websockets import WebsocketsTransport
from wirestate.testing.net import WAIT, connected, next_of, server_settings


async def _read_until_closed(ws: Any) -> None:
    async with asyncio.timeout(WAIT):
        while True:
            await ws.recv()


def _publish(topic: str, data: Any) -> str:
    return orjson.dumps({"type": "publish", "topic": topic, "data": data}).decode()


async def test_messages_are_handled_without_waking_the_reader(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    receives: dict[int, int] = {}
    original = WebsocketsTransport.receive

    async def counting(self: WebsocketsTransport) -> str | bytes:
        receives[id(self)] = receives.get(id(self), 0) + 1
        return await original(self)

    monkeypatch.setattr(WebsocketsTransport, "receive", counting)
    async with WirestateServer(server_settings(), epoch="test") as server:
        sub, _ = await connected(server.url, "inline")
        pub, _ = await connected(server.url)
        for i in range(20):
            await pub.send(_publish("inline", i))
        got = [(await next_of(sub, "event", topic="inline"))["data"] for _ in range(20)]
        assert got == list(range(20))
        # Each reader still waits in its first receive: the subscribe and the 20
        # publishes never woke it (through the reader, the publisher's alone would be 21).
        assert sorted(receives.values()) == [1, 1]
        await sub.close()
        await pub.close()


async def test_a_fragmented_message_and_the_frames_after_it_keep_their_order() -> None:
    # The fragments go through the reader; a whole frame right behind them must not
    # overtake them, in one TCP write or in several.
    async with WirestateServer(server_settings(), epoch="test") as server:
        sub, _ = await connected(server.url, "order")
        pub, _ = await connected(server.url)
        for round_ in range(10):
            first = _publish("order", {"n": 2 * round_, "pad": "x" * 64})
            await pub.send(iter([first[:20], first[20:50], first[50:]]))
            await pub.send(_publish("order", {"n": 2 * round_ + 1}))
        got = [(await next_of(sub, "event", topic="order"))["data"]["n"] for _ in range(20)]
        assert got == list(range(20))
        await sub.close()
        await pub.close()


async def test_a_failure_while_handling_inline_ends_the_session_and_logs_only_its_type(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: Session, text: str, now: float) -> None:
        raise RuntimeError("internal detail that must not be logged")

    async with WirestateServer(server_settings(), epoch="test") as server:
        ws, _ = await connected(server.url)
        monkeypatch.setattr(Session, "_message", broken)
        caplog.set_level(logging.INFO, logger="wirestate.server")
        await ws.send(_publish("t", 1))
        with pytest.raises(ConnectionClosed):
            await _read_until_closed(ws)
        assert "message handling failed: RuntimeError" in caplog.text
        assert "internal detail" not in caplog.text
