"""Hostile traffic against a real server on loopback: every resource a peer can grow has a
bound, and a client is cut only for a cause of its own.

Each test pushes past one bound and measures what it says it measures (peak RSS of a child
``wirestate serve`` from /proc, counts, times); with ``-s`` it prints the figures. Every
load stops by itself: counts are fixed and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path

import httpx
import jwt
import orjson
import pytest
from websockets.asyncio.client import ClientConnection

from wirestate.adapters.server import WirestateServer
from wirestate.models.wire import DATA_RULE
from wirestate.testing.net import (
    CLOSE,
    PING,
    TEXT,
    WAIT,
    connected,
    frame,
    next_of,
    raw_upgrade,
    read_frame,
    recv,
    serve_process,
    server_settings,
    until,
    until_true,
)

MIB = 1024 * 1024


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in KiB: its resident memory now, and its peak."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def subscribe_frame(*topics: str) -> bytes:
    return frame(TEXT, orjson.dumps({"type": "subscribe", "topics": list(topics)}))


async def non_reader(port: int, *topics: str) -> asyncio.StreamWriter:
    """A client that subscribes to ``topics`` and never reads again (a tiny receive buffer,
    so the server's writes stop soon)."""
    reader, writer, head = await raw_upgrade(port, rcvbuf=4096)
    assert b" 101 " in head
    await read_frame(reader)  # the welcome
    writer.write(subscribe_frame(*topics))
    await writer.drain()
    await read_frame(reader)  # subscribed: from now on, nothing is read
    return writer


def client() -> httpx.AsyncClient:
    """An HTTP client that drops a pooled connection after 1 s idle. The server closes an
    idle keep-alive connection after 5 s, httpx's default expiry is also 5 s: reusing a
    connection at that instant races the server's close (the reason HTTP clients should
    expire idle connections before the server does, or retry)."""
    return httpx.AsyncClient(limits=httpx.Limits(keepalive_expiry=1.0))


async def metric(http: httpx.AsyncClient, base: str, line_start: str) -> float:
    text = (await http.get(f"{base}/metrics")).text
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {line_start!r}")


# -- topics ---------------------------------------------------------------------------------


async def test_topic_churn_is_freed_and_the_topic_cap_refuses_only_the_one_more() -> None:
    server = WirestateServer(
        server_settings(
            {
                "limits": {"max_topics": 50, "messages_per_second": 100_000},
                # long enough that the 49 topics below are all still held when the 50th is
                # refused, even on a loaded machine; short enough to wait for their expiry
                "history": {"max_age": 2.0},
            }
        )
    )
    async with server:
        hub = server.hub
        assert hub is not None
        ws, _ = await connected(server.url)
        for i in range(500):  # subscribe/unsubscribe churn, as fast as the client can
            await ws.send(orjson.dumps({"type": "subscribe", "topics": [f"c.{i}"]}).decode())
            await next_of(ws, "subscribed")
            await ws.send(orjson.dumps({"type": "unsubscribe", "topics": [f"c.{i}"]}).decode())
        await until(lambda: hub.topics.counted() == 0)
        watcher, _ = await connected(server.url, "kept")
        base = server.url.replace("ws://", "http://").removesuffix("/ws")
        async with client() as http:
            for i in range(49):
                r = await http.post(f"{base}/publish", json={"topic": f"p.{i}", "data": i})
                assert r.status_code == 200
            refused = await http.post(f"{base}/publish", json={"topic": "one.more", "data": 0})
            assert refused.status_code == 503
            assert refused.json()["error"] == "topic_limit"
            await ws.send(orjson.dumps({"type": "subscribe", "topics": ["one.more"]}).decode())
            assert (await next_of(ws, "error"))["code"] == "topic_limit"
            # nothing else disturbed: the existing topic still delivers
            ok = await http.post(f"{base}/publish", json={"topic": "kept", "data": 1})
            assert ok.json() == {"seq": 1}
            assert (await next_of(watcher, "event"))["data"] == 1
            # the 49 published topics have no subscriber: once their events age out they
            # are dropped, and there is room again
            await until(lambda: hub.topics.counted() == 1)
            again = await http.post(f"{base}/publish", json={"topic": "one.more", "data": 2})
            assert again.status_code == 200
            assert await metric(http, base, "wirestate_topics_refused_total") == 2
        drops = hub.topics.drops
        print(f"\nchurn: 500 topics subscribed and dropped; cap 50: 2 refused, {drops} dropped")
        await ws.close()
        await watcher.close()


# -- bursts and slow readers ------------------------------------------------------------------


async def test_a_burst_reaches_every_reading_subscriber_and_the_stuck_ones_are_cut() -> None:
    # send_queue_size 256 and 1 MiB per client (the defaults); a slow keep-alive, so that the
    # stuck clients are cut for what they fail to take, not for their missing pongs.
    server = WirestateServer(server_settings(ping_interval=30.0, ping_timeout=10.0))
    async with server:
        hub = server.hub
        assert hub is not None
        readers = [(await connected(server.url, "burst"))[0] for _ in range(20)]
        stuck = [await non_reader(server.port, "burst", "flood") for _ in range(2)]
        pad = "x" * 1000
        # 400 POST /publish pipelined on one connection: they arrive in one read.
        body = [orjson.dumps({"topic": "burst", "data": {"i": i, "pad": pad}}) for i in range(400)]
        requests = b"".join(
            b"POST /publish HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(b), b)
            for b in body
        )
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(requests)

        async def take_all(ws: ClientConnection) -> list[int]:
            seqs: list[int] = []
            while len(seqs) < 400:
                msg = await recv(ws)
                assert msg["type"] == "event", msg  # no gap, no close
                seqs.append(msg["seq"])
            return seqs

        got = await asyncio.gather(*(take_all(ws) for ws in readers))
        assert all(seqs == list(range(1, 401)) for seqs in got)
        # The burst fitted in the stuck clients' socket buffers; what they fail to take
        # beyond their budget gets them cut, and only them.
        flood = {"pad": "f" * 60_000}
        for _ in range(60):
            await server.publish("flood", flood)
            if hub.stats.disconnects["slow_consumer"] == 2:
                break
            await asyncio.sleep(0)  # a loop turn per event: the writes happen
        await until(lambda: hub.stats.disconnects["slow_consumer"] == 2)
        assert sum(hub.stats.disconnects.values()) == 2  # the stuck ones, and only them
        print(f"\nburst: 400 events x 1 KB reached 20 readers; {len(stuck)} stuck clients cut")
        writer.close()
        for w in stuck:
            w.close()
        for ws in readers:
            await ws.close()


async def test_clients_that_never_read_cost_at_most_their_budget() -> None:
    clients, events, size = 50, 100, 60_000
    async with serve_process() as served:
        port = int(served.url.rsplit(":", 1)[1].split("/")[0])
        base = f"http://127.0.0.1:{port}"
        stuck = [await non_reader(port, "big") for _ in range(clients)]
        rss0, _ = memory_kib(served.proc.pid)
        pad = "y" * size
        async with client() as http:
            await asyncio.gather(
                *(
                    http.post(
                        f"{base}/publish", json={"topic": "big", "data": {"i": i, "pad": pad}}
                    )
                    for i in range(events)
                )
            )

            async def cut() -> bool:
                return (
                    await metric(http, base, 'wirestate_disconnects_total{cause="slow_consumer"}')
                    == clients
                )

            async with asyncio.timeout(WAIT * 2):
                while not await cut():  # noqa: ASYNC110 - a child's counter
                    await asyncio.sleep(0.05)
        rss1, peak = memory_kib(served.proc.pid)
        growth = peak - rss0
        budget = clients * MIB // 1024  # KiB
        print(
            f"\nnon-readers: {clients} clients, {events} x {size // 1000} KB events:"
            f" RSS {rss0 // 1024} MiB -> peak {peak // 1024} MiB (growth {growth // 1024} MiB,"
            f" budget {budget // 1024} MiB), {rss1 // 1024} MiB after"
        )
        assert growth <= budget + 48 * 1024  # clients x budget, plus a small constant
        for w in stuck:
            w.close()
        served.proc.send_signal(signal.SIGTERM)
        assert await served.exited() == 0


# -- protocol pings ---------------------------------------------------------------------------


@pytest.mark.parametrize("auth", [False, True], ids=["open", "first_message_without_token"])
async def test_a_ping_flood_ends_in_a_close_with_a_cause_not_in_memory(
    tmp_path: Path, auth: bool
) -> None:
    flags = ["--close-timeout", "1"]
    if auth:
        config = tmp_path / "auth.toml"
        config.write_text(
            f'[auth]\nsecret = "{"s" * 40}"\nfirst_message = true\nfirst_message_timeout = 60\n'
        )
        flags += ["--config", str(config)]
    async with serve_process(*flags) as served:
        port = int(served.url.rsplit(":", 1)[1].split("/")[0])
        base = f"http://127.0.0.1:{port}"
        _, writer, head = await raw_upgrade(port, rcvbuf=4096)
        assert b" 101 " in head
        rss0, _ = memory_kib(served.proc.pid)
        ping = frame(PING, b"p" * 125)
        began = time.monotonic()
        sent = 0
        # Pings as fast as the socket takes them, never reading: bounded in time; the
        # server ends it far sooner (its reads stop once the close began, and the
        # connection is dropped when the close frame cannot be written).
        with contextlib.suppress(ConnectionError, TimeoutError):
            while time.monotonic() - began < 5.0:
                writer.write(ping * 200)
                sent += 200
                async with asyncio.timeout(1.0):
                    await writer.drain()
        _, peak = memory_kib(served.proc.pid)
        async with client() as http:

            async def closed_for_policy() -> bool:
                sample = 'wirestate_disconnects_total{cause="policy"}'
                return await metric(http, base, sample) == 1

            await until_true(closed_for_policy)
            limited = await metric(http, base, "wirestate_messages_rate_limited_total")
        elapsed = time.monotonic() - began
        print(
            f"\nping flood ({'first_message, no token' if auth else 'open'}): {sent:,} pings"
            f" written, {limited:,.0f} refused by the rate limit, closed for policy within"
            f" {elapsed:.2f} s, RSS growth {(peak - rss0) // 1024} MiB"
        )
        assert limited >= 50
        assert peak - rss0 < 32 * 1024  # not hundreds of MiB of queued pongs
        writer.close()


# -- odd but valid input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    ["18446744073709551616", "-9223372036854775809", "1e400", "[" * 150 + "]" * 150],
    ids=["int_over_64_bits", "int_under_64_bits", "1e400", "nested_150"],
)
async def test_odd_json_is_refused_the_same_way_on_both_paths_and_the_connection_stays(
    data: str,
) -> None:
    server = WirestateServer(server_settings())
    async with server:
        ws, _ = await connected(server.url)
        await ws.send('{"type":"publish","topic":"odd","data":' + data + "}")
        error = await next_of(ws, "error")
        assert (error["code"], error["message"]) == ("invalid_message", DATA_RULE)
        await ws.send('{"type":"ping","id":"still"}')
        assert (await next_of(ws, "pong"))["id"] == "still"  # the connection is kept
        base = server.url.replace("ws://", "http://").removesuffix("/ws")
        async with client() as http:
            r = await http.post(
                f"{base}/publish",
                content=b'{"topic":"odd","data":%s}' % data.encode(),
                headers={"content-type": "application/json"},
            )
        assert r.status_code == 400
        assert r.json()["error"] == "bad_json"
        await ws.close()


async def test_json_nested_past_the_parser_is_a_400_not_a_500() -> None:
    server = WirestateServer(server_settings())
    async with server:
        base = server.url.replace("ws://", "http://").removesuffix("/ws")
        async with client() as http:
            for depth in (255, 600, 1023):
                nested = "[" * depth + "]" * depth
                r = await http.post(
                    f"{base}/publish",
                    content=b'{"topic":"t","data":%s}' % nested.encode(),
                    headers={"content-type": "application/json"},
                )
                assert (r.status_code, r.json()["error"]) == (400, "bad_json"), depth


async def test_a_token_with_an_absurd_expiry_is_a_401() -> None:
    secret = "k" * 40
    server = WirestateServer(server_settings({"auth": {"secret": secret}}))
    async with server:
        token = jwt.encode({"sub": "a", "exp": 10**400, "subscribe": ["*"]}, secret)
        base = server.url.replace("ws://", "http://").removesuffix("/ws")
        async with client() as http:
            r = await http.get(f"{base}/api/snapshot", headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 401
        assert "bad_claims" in r.text


# -- closes the protocol layer decides ---------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "code", "cause"),
    [
        (frame(TEXT, b"\xff\xfe not utf-8"), 1007, "invalid_utf8"),
        (frame(TEXT, b"{}", rsv=1), 1002, "protocol_error"),
    ],
    ids=["invalid_utf8", "reserved_bits"],
)
async def test_a_close_the_protocol_layer_decides_carries_its_cause(
    bad: bytes, code: int, cause: str
) -> None:
    # A slow keep-alive: the close is the protocol layer's, not a missed pong's.
    server = WirestateServer(server_settings(ping_interval=30.0, ping_timeout=10.0))
    async with server:
        hub = server.hub
        assert hub is not None
        reader, writer, _ = await raw_upgrade(server.port)
        await read_frame(reader)  # welcome
        writer.write(bad)
        opcode, payload = await read_frame(reader)
        assert opcode == CLOSE
        assert (int.from_bytes(payload[:2], "big"), payload[2:].decode()) == (code, cause)
        # Recorded at once, whether or not the peer echoes the close or ever closes TCP.
        await until(lambda: hub.stats.disconnects[cause] == 1)
        writer.close()


# -- upgrades in flight ------------------------------------------------------------------------


async def test_half_open_upgrades_are_counted_capped_and_timed_out() -> None:
    server = WirestateServer(server_settings({"limits": {"max_handshakes": 5}}, open_timeout=0.5))
    async with server:
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(5)]
        await until(lambda: b"wirestate_handshakes_in_flight 5.0" in server.metrics.render())
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        async with asyncio.timeout(WAIT):
            assert await reader.read() == b""  # the sixth is closed at once
        assert server.metrics.rejections["max_handshakes"] == 1
        began = time.monotonic()
        for r, _ in idle:  # the five are dropped by open_timeout
            async with asyncio.timeout(WAIT):
                assert await r.read() == b""
        took = time.monotonic() - began
        print(f"\nhalf-open: 5 counted, the 6th refused, the 5 dropped after {took:.2f} s")
        await until(lambda: b"wirestate_handshakes_in_flight 0.0" in server.metrics.render())
        for _, w in [*idle, (reader, writer)]:
            w.close()


async def test_sigterm_with_half_open_upgrades_ends_within_the_close_timeout() -> None:
    async with serve_process("--close-timeout", "1") as served:
        port = int(served.url.rsplit(":", 1)[1].split("/")[0])
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(50)]
        for _, w in idle[:25]:
            w.write(b"GET /ws HTTP/1.1\r\nHost: localhost\r\n")  # half a head
        began = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        assert await served.exited(10.0) == 0
        took = time.monotonic() - began
        print(f"\nSIGTERM with 50 half-open upgrades: exit after {took:.2f} s")
        assert took < 1 + 2
        for _, w in idle:
            w.close()


# -- HTTP as RFC 9112 says ---------------------------------------------------------------------


async def _exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    async with asyncio.timeout(WAIT):
        answer = await reader.read()  # until the server closes
    writer.close()
    return answer


async def test_http_edges_are_answered_and_closed() -> None:
    server = WirestateServer(server_settings())
    async with server:
        both = await _exchange(
            server.port,
            b"POST /publish HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n",
        )
        assert both.startswith(b"HTTP/1.1 400 ")
        assert b'"status":"ok"' not in both  # the pipelined request behind it is not served
        big = await _exchange(
            server.port,
            b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
        )
        assert big.startswith(b"HTTP/1.1 431 ")
        body = await _exchange(
            server.port,
            b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"Content-Length: 3\r\n\r\nabc",
        )
        assert body.startswith(b"HTTP/1.1 400 ")
        assert b"carries no body" in body
