"""The test client against a real loopback websockets server: a scripted fake hub speaking
protocol v1 (welcome, subscribed, the script's frames, pong, then the script's close)."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from wirestate.adapters.client.probe import parse_close, run_client
from wirestate.testing.net import free_port

TOPIC = "system_status"
TS = "2026-11-25T16:00:00.000Z"
WAIT = 2.0  # upper bound on waiting for the fake hub to observe something


def event(seq: int, **extra: Any) -> dict[str, Any]:
    return {"type": "event", "topic": TOPIC, "seq": seq, "ts": TS, "data": {"cpu": seq}, **extra}


GAP = {"type": "gap", "topic": TOPIC, "from_seq": 3, "to_seq": 5, "reason": "history_evicted"}
ERROR = {"type": "error", "code": "rate_limited", "message": "too many messages"}
# Two events, a stale one, a gap, an error: what a subscriber of a flapping source sees.
MIXED = [event(1), event(2, stale=True, age=12.3), GAP, event(6), ERROR]


@dataclass
class Script:
    frames: list[dict[str, Any]] = field(default_factory=list)  # sent after `subscribed`
    close: tuple[int, str] | None = None  # after answering the first ping, close so
    drop: bool = False  # after answering the first ping, drop TCP with no close frame
    first: str | None = None  # the first frame, instead of the welcome ("" sends nothing)


class FakeHub:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.received: list[dict[str, Any]] = []
        self.pinged = asyncio.Event()  # the client answered its first ping: steady state
        self.done = asyncio.Event()
        self.close_code: int | None = None  # as the hub saw it

    async def handler(self, ws: ServerConnection) -> None:
        script = self.script
        try:
            if script.first is None:
                welcome = {
                    "type": "welcome",
                    "client_id": "c1",
                    "protocol": 1,
                    "ping_interval": 30.0,
                    "ping_timeout": 10.0,
                }
                await ws.send(json.dumps(welcome))
            elif script.first:
                await ws.send(script.first)
            async for raw in ws:
                msg = json.loads(raw)
                self.received.append(msg)
                if msg["type"] == "subscribe":
                    await ws.send(json.dumps({"type": "subscribed", "topics": msg["topics"]}))
                    for frame in script.frames:
                        await ws.send(json.dumps(frame))
                elif msg["type"] == "ping":
                    await ws.send(json.dumps({"type": "pong", "id": msg["id"]}))
                    self.pinged.set()
                    if script.close is not None:
                        await ws.close(*script.close)
                        return
                    if script.drop:
                        ws.transport.abort()
                        return
        finally:
            self.close_code = ws.close_code
            self.done.set()


@asynccontextmanager
async def fake_hub(script: Script) -> AsyncIterator[tuple[FakeHub, str]]:
    hub = FakeHub(script)
    async with serve(hub.handler, "127.0.0.1", 0, compression=None, ping_interval=None) as srv:
        port = srv.sockets[0].getsockname()[1]
        yield hub, f"ws://127.0.0.1:{port}/ws"


async def client(url: str, **kwargs: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    kwargs.setdefault("ping_every", 0.05)
    kwargs.setdefault("open_timeout", WAIT)
    code = await run_client(url, kwargs.pop("topics", [TOPIC]), out=out, err=err, **kwargs)
    return code, out.getvalue(), err.getvalue()


def summary(out: str) -> dict[str, Any]:
    last = json.loads(out.splitlines()[-1])
    assert set(last) == {"summary"}
    result: dict[str, Any] = last["summary"]
    return result


# --- output -----------------------------------------------------------------------------


async def test_human_output_shows_events_staleness_gaps_errors_and_a_summary() -> None:
    async with fake_hub(Script(MIXED, close=(1001, "shutdown"))) as (hub, url):
        code, out, err = await client(url)
    assert (code, err) == (0, "")
    assert hub.received[0] == {"type": "subscribe", "topics": [TOPIC]}
    lines = out.splitlines()
    assert lines[0].startswith(f"connected to {url} as client c1 (protocol 1;")
    assert lines[1:7] == [
        f"subscribed to {TOPIC}",
        f'{TOPIC} #1 {TS} {{"cpu": 1}}',
        f'{TOPIC} #2 {TS} {{"cpu": 2}} (stale, age 12.3 s)',
        f"!! GAP {TOPIC}: 3 events #3..#5 will not be delivered (history_evicted)",
        f'{TOPIC} #6 {TS} {{"cpu": 6}}',
        "!! ERROR from server: rate_limited: too many messages",
    ]
    assert lines[7] == f"--- {url} summary (the server closed the connection) ---"
    assert lines[8].startswith("duration    ")
    assert lines[9] == ("messages    8 received: 3 events, 1 gap, 1 error (3 control, 0 invalid)")
    assert lines[10].startswith("ping rtt    min ")
    assert lines[10].endswith("(1 pong)")
    assert lines[11] == "close       1001 shutdown (closed by the server)"
    assert len(lines) == 12


async def test_json_lines_are_the_server_objects_then_one_summary_object() -> None:
    async with fake_hub(Script(MIXED, close=(1001, "shutdown"))) as (_, url):
        code, out, _ = await client(url, json_lines=True)
    assert code == 0
    objects = [json.loads(line) for line in out.splitlines()]
    assert [o["type"] for o in objects[:2]] == ["welcome", "subscribed"]
    assert objects[2:-1] == MIXED  # pongs feed the round trip and are not printed
    s = summary(out)
    assert (s["events"], s["gaps"], s["errors"], s["invalid"]) == (3, 1, 1, 0)
    assert s["messages"] == 2 + len(MIXED) + 1
    assert (s["close_code"], s["close_cause"], s["closed_by"]) == (1001, "shutdown", "server")
    assert (s["ended"], s["client_id"]) == ("server_close", "c1")
    rtt = s["ping_rtt_ms"]
    assert rtt["samples"] == 1
    assert 0 <= rtt["min"] <= rtt["median"] <= rtt["max"] < WAIT * 1000


async def test_a_sequence_jump_without_a_gap_is_flagged() -> None:
    async with fake_hub(Script([event(1), event(4)], close=(1000, ""))) as (_, url):
        code, out, _ = await client(url)
    assert code == 0
    assert f"!! SEQ {TOPIC}: expected #2, got #4 with no gap announced (protocol violation)" in out
    assert "1 sequence jumps with no gap" in out
    assert "close       1000 peer_close (closed by the server)" in out


# --- how a run ends ---------------------------------------------------------------------


async def test_count_stops_after_that_many_events_and_closes_normally() -> None:
    async with fake_hub(Script([event(n) for n in range(1, 6)])) as (hub, url):
        code, out, _ = await client(url, count=3, json_lines=True)
        await asyncio.wait_for(hub.done.wait(), WAIT)
    assert code == 0
    printed = [json.loads(line) for line in out.splitlines()[:-1]]
    assert [o["seq"] for o in printed if o["type"] == "event"] == [1, 2, 3]
    s = summary(out)
    assert (s["ended"], s["events"]) == ("count", 3)
    assert (s["close_code"], s["close_cause"], s["closed_by"]) == (1000, "client_close", "client")
    assert hub.close_code == 1000


async def test_duration_stops_the_run_and_the_round_trip_is_measured() -> None:
    async with fake_hub(Script([event(1), event(2)])) as (hub, url):
        code, out, _ = await client(url, duration=0.2, json_lines=True)
        await asyncio.wait_for(hub.done.wait(), WAIT)
    assert code == 0
    s = summary(out)
    assert (s["ended"], s["events"]) == ("duration", 2)
    assert 0.2 <= s["duration"] < WAIT
    assert s["ping_rtt_ms"]["samples"] >= 2  # one at once, then every 0.05 s
    assert (s["close_code"], s["close_cause"]) == (1000, "client_close")
    assert hub.close_code == 1000
    assert sum(1 for m in hub.received if m["type"] == "ping") >= s["ping_rtt_ms"]["samples"]


@pytest.mark.parametrize(
    ("code", "reason", "status"),
    [
        (1001, "shutdown", 0),
        (1000, "", 0),
        (1011, "keepalive_timeout", 1),
        (1013, "slow_consumer", 1),
    ],
)
async def test_a_server_close_reports_its_code_and_cause(
    code: int, reason: str, status: int
) -> None:
    async with fake_hub(Script([event(1)], close=(code, reason))) as (_, url):
        exit_status, out, _ = await client(url, json_lines=True)
    assert exit_status == status
    s = summary(out)
    assert (s["close_code"], s["close_cause"], s["closed_by"]) == (
        code,
        reason or "peer_close",
        "server",
    )
    assert s["ping_rtt_ms"] is not None


async def test_a_dropped_connection_is_1006_read_error() -> None:
    async with fake_hub(Script([event(1)], drop=True)) as (_, url):
        code, out, _ = await client(url)
    assert code == 1
    assert (
        out.splitlines()[-1]
        == "close       1006 read_error (no close frame: the connection dropped)"
    )


async def test_cancellation_closes_with_1000_prints_the_summary_and_propagates() -> None:
    out = io.StringIO()
    async with fake_hub(Script([event(1)])) as (hub, url):
        task = asyncio.create_task(run_client(url, [TOPIC], out=out, json_lines=True))
        await asyncio.wait_for(hub.pinged.wait(), WAIT)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(hub.done.wait(), WAIT)
    assert hub.close_code == 1000
    s = summary(out.getvalue())
    assert (s["ended"], s["events"]) == ("cancelled", 1)
    assert (s["close_code"], s["close_cause"]) == (1000, "client_close")


# --- failures ---------------------------------------------------------------------------


async def test_connection_refused_exits_1_with_a_helpful_line() -> None:
    port = free_port()
    code, out, err = await client(f"ws://127.0.0.1:{port}/ws?token=s3cr3t")
    assert (code, out) == (1, "")
    assert err == (
        f"wirestate client: could not connect to ws://127.0.0.1:{port}/ws?token=***: "
        "connection refused — is `wirestate serve` running?\n"
    )


async def test_a_server_that_never_welcomes_fails_after_the_open_timeout() -> None:
    async with fake_hub(Script(first="")) as (hub, url):
        code, out, err = await client(url, open_timeout=0.2)
        await asyncio.wait_for(hub.done.wait(), WAIT)
    assert code == 1
    assert "no welcome within 0.2 s" in err
    assert out.splitlines()[-1] == "close       1000 client_close (closed by this client)"
    assert hub.received == []


async def test_a_first_frame_that_is_not_a_welcome_is_a_protocol_error() -> None:
    async with fake_hub(Script(first=json.dumps(event(1)))) as (hub, url):
        code, out, err = await client(url, json_lines=True)
        await asyncio.wait_for(hub.done.wait(), WAIT)
    assert code == 1
    assert "did not start with a protocol 1 welcome" in err
    assert summary(out)["ended"] == "protocol_error"
    assert hub.close_code == 1002


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"topics": []}, "no topic given"),
        ({"topics": ["bad topic"]}, "bad topic name 'bad topic'"),
        ({"count": 0}, "--count must be at least 1"),
        ({"duration": 0.0}, "--duration must be a positive number"),
        ({"ping_every": -1.0}, "the ping interval must be positive"),
    ],
)
async def test_bad_arguments_exit_2_before_connecting(kwargs: dict[str, Any], message: str) -> None:
    code, out, err = await client(f"ws://127.0.0.1:{free_port()}/ws", **kwargs)
    assert (code, out) == (2, "")
    assert err.startswith(f"wirestate client: {message}")


async def test_a_url_that_is_not_websocket_exits_2() -> None:
    code, _, err = await client("http://127.0.0.1:12080/ws")
    assert code == 2
    assert "is not a WebSocket URL" in err


@pytest.mark.parametrize(
    ("code", "reason", "expected"),
    [
        (None, None, (1006, "read_error")),
        (1006, "", (1006, "read_error")),
        (1011, "keepalive_timeout", (1011, "keepalive_timeout")),
        (1013, "slow_consumer", (1013, "slow_consumer")),
        (1001, "shutdown", (1001, "shutdown")),
        (1008, "auth_expired", (1008, "auth_expired")),
        (1001, "", (1001, "shutdown")),
        (1013, "", (1013, "slow_consumer")),
        (1000, "", (1000, "peer_close")),
        (1011, "internal error", (1011, "peer_close")),
        (4000, "client_close", (4000, "peer_close")),
    ],
)
def test_parse_close(code: int | None, reason: str | None, expected: tuple[int, str]) -> None:
    assert parse_close(code, reason) == expected
