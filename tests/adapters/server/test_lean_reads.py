"""Frames cut from the socket's reads by the websockets transport itself (``read_frames``):
whole text frames go to the session, every other frame to websockets' parser whole, so
that a read cut anywhere, a mix of frame kinds in one read, and frames websockets must fail
all behave as they do through websockets alone."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from wirestate.adapters.server import WirestateServer
from wirestate.adapters.server.transports.http import HttpServerConnection
from wirestate.adapters.server.transports.websockets import WebsocketsTransport
from wirestate.testing.net import (
    BINARY,
    CLOSE,
    PING,
    PONG,
    TEXT,
    WAIT,
    frame,
    raw_upgrade,
    read_frame,
    server_settings,
    until,
)

CONT = 0x0


def _text(value: Any) -> bytes:
    return frame(TEXT, orjson.dumps(value))


def _publish(topic: str, data: Any) -> bytes:
    return _text({"type": "publish", "topic": topic, "data": data})


async def _raw_client(server: WirestateServer) -> tuple[Any, asyncio.StreamReader, Any]:
    """A raw peer past its welcome, and the server's connection object for it."""
    reader, writer, head = await raw_upgrade(server.port)
    assert head.startswith(b"HTTP/1.1 101")
    opcode, payload = await _frame(reader)
    assert (opcode, orjson.loads(payload)["type"]) == (TEXT, "welcome")
    await until(lambda: len(server.sessions) == 1)
    (session,) = server.sessions.values()
    assert isinstance(session.transport, WebsocketsTransport)
    return session.transport.ws, reader, writer


async def _frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next server frame but the keep-alive pings (every 50 ms here)."""
    while True:
        opcode, payload = await read_frame(reader)
        if opcode != PING:
            return opcode, payload


async def _messages(reader: asyncio.StreamReader, count: int) -> list[tuple[int, Any]]:
    """The next ``count`` frames but pings: (opcode, parsed JSON for text, raw payload
    otherwise)."""
    out: list[tuple[int, Any]] = []
    for _ in range(count):
        opcode, payload = await _frame(reader)
        out.append((opcode, orjson.loads(payload) if opcode == TEXT else payload))
    return out


async def _subscribed(conn: Any, reader: asyncio.StreamReader, topic: str) -> None:
    """Subscribe the raw peer to ``topic`` through the connection, its ``subscribed`` read."""
    conn.data_received(_text({"type": "subscribe", "topics": [topic]}))
    assert (await _messages(reader, 1))[0][1]["type"] == "subscribed"


async def test_a_read_cut_at_every_byte_still_yields_every_message_in_order() -> None:
    async with WirestateServer(server_settings(), epoch="test") as server:
        conn, reader, writer = await _raw_client(server)
        assert conn.lean  # the connection's reads are cut here, not by websockets
        stream = _text({"type": "subscribe", "topics": ["cut"]})
        # Short frames, and ones with a 16-bit length (126: payload over 125 bytes).
        for i in range(6):
            stream += _publish("cut", {"i": i, "pad": "x" * (300 * (i % 2))})
        for byte in stream:
            conn.data_received(bytes((byte,)))  # one read per byte, as TCP may cut it
        got = await _messages(reader, 7)
        assert got[0][1]["type"] == "subscribed"
        assert [m["data"]["i"] for _, m in got[1:]] == list(range(6))
        assert [m["seq"] for _, m in got[1:]] == list(range(1, 7))
        assert conn.partial is None
        writer.close()


async def test_a_large_frame_in_many_reads_grows_one_buffer() -> None:
    # Joining each read to what came before would copy the frame once per read: a 64 KiB
    # frame sent a byte at a time would cost gigabytes of copying.
    async with WirestateServer(server_settings(), epoch="test") as server:
        conn, reader, writer = await _raw_client(server)
        await _subscribed(conn, reader, "big")
        big = _publish("big", "y" * 60_000)
        reads = [big[i : i + 1000] for i in range(0, len(big), 1000)]
        conn.data_received(reads[0])
        buffer = conn.partial
        assert buffer is not None
        for read in reads[1:-1]:
            conn.data_received(read)
            assert conn.partial is buffer  # extended in place, never rebuilt
        conn.data_received(reads[-1])
        ((_, event),) = await _messages(reader, 1)
        assert event["data"] == "y" * 60_000
        assert conn.partial is None
        writer.close()


async def test_control_binary_and_fragmented_frames_in_one_read_keep_their_order() -> None:
    async with WirestateServer(server_settings(), epoch="test") as server:
        conn, reader, writer = await _raw_client(server)
        await _subscribed(conn, reader, "mix")
        second = orjson.dumps({"type": "publish", "topic": "mix", "data": 2})
        conn.data_received(
            _publish("mix", 1)
            + frame(PING, b"hi")
            + frame(BINARY, b"\x00\x01")
            + frame(TEXT, second[:10], fin=False)
            + frame(CONT, second[10:])
            + _publish("mix", 3)
        )
        got = await _messages(reader, 5)
        assert (PONG, b"hi") in got
        errors = [m for op, m in got if op == TEXT and m["type"] == "error"]
        assert [e["code"] for e in errors] == ["invalid_message"]
        events = [m for op, m in got if op == TEXT and m["type"] == "event"]
        assert [(e["seq"], e["data"]) for e in events] == [(1, 1), (2, 2), (3, 3)]
        assert conn.lean  # none of these needed websockets' parser for the rest
        writer.close()


async def test_an_unmasked_frame_still_fails_the_connection_with_1002() -> None:
    async with WirestateServer(server_settings(), epoch="test") as server:
        conn, reader, writer = await _raw_client(server)
        conn.data_received(bytes((0x81, 2)) + b"{}")  # unmasked, and nothing after it
        opcode, payload = await _frame(reader)
        assert opcode == CLOSE
        assert int.from_bytes(payload[:2], "big") == 1002
        assert not conn.lean  # websockets' parser has the connection from there on
        writer.close()


async def test_a_frame_declared_over_max_size_closes_1009_before_its_payload() -> None:
    settings = server_settings({"limits": {"max_message_size": 1024}})
    async with WirestateServer(settings, epoch="test") as server:
        _, reader, writer = await _raw_client(server)
        # Only the head of a 10 MB frame (64-bit length) and its mask: nothing more comes.
        writer.write(bytes((0x81, 0x80 | 127)) + (10 << 20).to_bytes(8, "big") + b"\0" * 4)
        opcode, payload = await _frame(reader)
        assert opcode == CLOSE
        assert int.from_bytes(payload[:2], "big") == 1009
        assert payload[2:] == b"message_too_big"
        writer.close()


async def test_a_frame_begun_with_the_upgrade_request_is_finished_by_websockets() -> None:
    # Bytes past the request reach websockets' parser before the session exists, here a
    # frame and a half: websockets keeps the connection's reads. (Cut there, the rest of
    # the half frame would begin with bytes that read as the head of a masked frame.)
    async with WirestateServer(server_settings(), epoch="test") as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        publish = _publish("early", "\u00e9" * 40)
        cut = publish.index("\u00e9".encode())
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
            + _text({"type": "subscribe", "topics": ["early"]})
            + publish[:cut]
        )
        async with asyncio.timeout(WAIT):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        got = await _messages(reader, 2)
        assert [m["type"] for _, m in got] == ["welcome", "subscribed"]
        writer.write(publish[cut:])
        ((_, event),) = await _messages(reader, 1)
        assert (event["type"], event["data"]) == ("event", "\u00e9" * 40)
        (session,) = server.sessions.values()
        assert isinstance(session.transport, WebsocketsTransport)
        conn: Any = session.transport.ws
        assert not conn.lean
        writer.close()


async def test_a_whole_frame_inside_a_fragmented_message_still_fails_1002() -> None:
    async with WirestateServer(server_settings(), epoch="test") as server:
        conn, reader, writer = await _raw_client(server)
        conn.data_received(frame(TEXT, b'{"type":', fin=False))
        # The reader takes the first fragment and waits for the rest of its message...
        await until(lambda: not conn.recv_messages.frames)
        # ... which a whole frame cannot be: websockets' parser fails it, as without this path.
        conn.data_received(_publish("x", 1))
        opcode, payload = await _frame(reader)
        assert opcode == CLOSE
        assert int.from_bytes(payload[:2], "big") == 1002
        writer.close()


async def test_frames_for_websockets_parser_go_to_it_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A pong flood in one read costs websockets one parse call, not one per frame.
    calls = 0
    original = HttpServerConnection.data_received

    def counting(self: HttpServerConnection, data: bytes) -> None:
        nonlocal calls
        calls += 1
        original(self, data)

    async with WirestateServer(server_settings(), epoch="test") as server:
        conn, reader, writer = await _raw_client(server)
        await _subscribed(conn, reader, "flood")
        monkeypatch.setattr(HttpServerConnection, "data_received", counting)
        conn.data_received(frame(PONG, b"nope") * 100 + _publish("flood", 1))
        ((_, event),) = await _messages(reader, 1)
        assert (event["type"], event["data"]) == ("event", 1)
        assert calls == 1
        writer.close()


async def test_a_head_websockets_must_refuse_is_refused_before_its_payload() -> None:
    # A reserved opcode (0x3): websockets fails it from the head alone, so nothing of the
    # announced payload is waited for.
    async with WirestateServer(server_settings(), epoch="test") as server:
        conn, reader, writer = await _raw_client(server)
        conn.data_received(bytes((0x83, 0x80 | 100)) + b"\0" * 4)
        opcode, payload = await _frame(reader)
        assert opcode == CLOSE
        assert int.from_bytes(payload[:2], "big") == 1002
        assert not conn.lean
        writer.close()
