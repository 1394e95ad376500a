"""The wire fuzzer: it passes against the real server, and bites on planted bugs.

`run_fuzz` is synchronous (it owns an event loop per test case), so it runs in a worker
thread while the server under test runs on the test's loop.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from wirestate.adapters.server.service import WirestateServer
from wirestate.adapters.tools.fuzz import check_url, run_fuzz
from wirestate.models.settings import Settings
from wirestate.models.wire import portable

SETTINGS = {"server": {"port": 0, "ping_interval": 0.2, "ping_timeout": 0.5, "close_timeout": 0.5}}
TS = "2026-01-01T00:00:00.000Z"
#: websockets' own 1009 close reason (see test_oversized_frame_closes_with_the_cause).
TOLERATE = frozenset({"close_reason_1009"})


@asynccontextmanager
async def real_server() -> AsyncIterator[WirestateServer]:
    async with WirestateServer(Settings.model_validate(SETTINGS)) as server:
        yield server


async def fuzz(url: str, *, examples: int, steps: int, **kwargs: object) -> tuple[int, str]:
    out = io.StringIO()
    rc = await asyncio.to_thread(
        run_fuzz,
        url,
        examples=examples,
        steps=steps,
        seed=0,
        out=out,
        **kwargs,  # type: ignore[arg-type]
    )
    return rc, out.getvalue()


async def test_every_promise_holds_against_the_real_server() -> None:
    async with real_server() as server:
        rc, out = await fuzz(server.url, examples=15, steps=15)
        assert rc == 0, out
        assert "every promise held" in out
        # ... and the server is still serving afterwards.
        async with connect(server.url, compression=None, ping_interval=None) as ws:
            assert json.loads(await ws.recv())["type"] == "welcome"


async def test_oversized_frame_closes_with_the_cause() -> None:
    """Regression, found by the fuzzer: websockets used to close an oversized frame with its
    own reason ('frame with N bytes exceeds limit of M bytes'), not the cause."""
    async with (
        real_server() as server,
        connect(server.url, compression=None, ping_interval=None) as ws,
    ):
        await ws.recv()
        await ws.send("x" * 65537)
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(2):
                await ws.recv()
        assert ws.close_code == 1009
        assert ws.close_reason == "message_too_big"


# -- planted bugs: a tiny fake server that breaks one promise --------------------------------


def _refused(msg: dict[str, object]) -> bool:
    """The server's rule for ``data``, plus text that cannot be UTF-8 (a lone surrogate)."""
    try:
        json.dumps(msg, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    return not portable(msg.get("data"))


def fake_server(
    *,
    skip_seq: bool = False,
    bad_pong: bool = False,
    any_data: bool = False,
    stale_position: bool = False,
    replay_held: bool = False,
) -> Callable[..., object]:
    """A minimal protocol v1 server (welcome, subscribe with the retained latest event,
    unsubscribe, publish, ping). With no connection left it forgets its topics and counts
    in a new epoch, as a restarted server would: each of the fuzzer's test cases then meets
    the same server, so a failing script fails the same way when Hypothesis replays it."""
    subscribers: dict[str, set[ServerConnection]] = {}
    seqs: dict[str, int] = {}
    retained: dict[str, dict[str, object]] = {}
    live: set[ServerConnection] = set()
    epoch = [0]
    # A publish reaches every subscriber before a subscribe is answered, and the other way
    # round: the fuzzer checks `subscribed.seq` against the order frames arrive in.
    order = asyncio.Lock()

    async def handler(ws: ServerConnection) -> None:
        if not live:
            seqs.clear()
            retained.clear()
            epoch[0] += 1
        live.add(ws)
        await ws.send(json.dumps({"type": "welcome", "client_id": "x", "protocol": 1,
                                  "ping_interval": 30.0, "ping_timeout": 10.0}))  # fmt: skip
        try:
            async for raw in ws:
                if isinstance(raw, bytes):
                    error = {"type": "error", "code": "invalid_message", "message": "x"}
                    await ws.send(json.dumps(error))
                    continue
                try:
                    msg = json.loads(raw)
                    kind = msg["type"]
                except (ValueError, KeyError, TypeError):
                    await ws.send(json.dumps({"type": "error", "code": "bad_json", "message": "x"}))
                    continue
                if kind == "subscribe" and "since" in msg:  # the fuzzer sends none valid
                    error = {"type": "error", "code": "invalid_message", "message": "x"}
                    await ws.send(json.dumps(error))
                elif kind == "subscribe" and isinstance(msg.get("topics"), list):
                    topics = list(dict.fromkeys(map(str, msg["topics"])))
                    async with order:
                        position = {t: 0 if stale_position else seqs.get(t, 0) for t in topics}
                        held = [t for t in topics if ws in subscribers.get(t, ())]
                        replay = [
                            retained[t]
                            for t in topics
                            if t in retained and (replay_held or t not in held)
                        ]
                        for t in topics:
                            subscribers.setdefault(t, set()).add(ws)
                        ack = {"type": "subscribed", "topics": topics, "seq": position,
                               "epoch": dict.fromkeys(topics, f"e{epoch[0]}")}  # fmt: skip
                        for frame in [ack, *replay]:
                            await ws.send(json.dumps(frame))
                elif kind == "unsubscribe" and isinstance(msg.get("topics"), list):
                    for t in msg["topics"]:
                        subscribers.get(str(t), set()).discard(ws)
                elif kind == "ping" and isinstance(msg.get("id"), str):
                    ping_id = msg.get("id")
                    pong_id = f"{ping_id}x" if bad_pong else ping_id
                    await ws.send(json.dumps({"type": "pong", "id": pong_id}))
                elif kind == "publish" and not any_data and _refused(msg):
                    error = {"type": "error", "code": "invalid_message", "message": "x"}
                    await ws.send(json.dumps(error))
                elif kind == "publish" and isinstance(msg.get("topic"), str):
                    topic = msg["topic"]
                    async with order:
                        step = 2 if skip_seq and seqs.get(topic) else 1
                        seqs[topic] = seqs.get(topic, 0) + step
                        event = {"type": "event", "topic": topic, "seq": seqs[topic],
                                 "ts": TS, "data": msg.get("data")}  # fmt: skip
                        retained[topic] = event
                        for sub in list(subscribers.get(topic, ())):
                            try:
                                await sub.send(json.dumps(event))
                            except ConnectionClosed:
                                subscribers[topic].discard(sub)
                else:
                    error = {"type": "error", "code": "unknown_type", "message": "x"}
                    await ws.send(json.dumps(error))
        except ConnectionClosed:
            pass
        finally:
            live.discard(ws)
            for subs in subscribers.values():
                subs.discard(ws)

    return handler


@pytest.mark.parametrize(
    ("bug", "symptom", "examples"),
    [
        ({"skip_seq": True}, "with no gap", 30),
        ({"bad_pong": True}, "pong", 30),
        ({"any_data": True}, "fz.odd", 30),
        ({"stale_position": True}, "subscribed said seq 0", 30),
        # Needs a publish on a topic between two subscribes to it: a longer search.
        ({"replay_held": True}, "came twice", 100),
    ],
)
async def test_a_planted_bug_fails_with_a_short_script(
    bug: dict[str, bool], symptom: str, examples: int
) -> None:
    async with serve(fake_server(**bug), "127.0.0.1", 0, compression=None, max_size=65536) as srv:
        port = next(iter(srv.sockets)).getsockname()[1]
        url = f"ws://127.0.0.1:{port}/ws"
        rc, out = await fuzz(url, examples=examples, steps=15, tolerate=TOLERATE)
    assert rc == 1, out
    assert "state = WireFuzzer()" in out
    assert "peers_0 = state.connect()" in out
    assert symptom in out
    script = [
        line
        for line in out.splitlines()
        if line.startswith(("state.", "peers_")) and "promises_held" not in line
    ]
    assert len(script) <= 12, out  # shrunk: a handful of steps (invariant checks aside)


def test_refuses_non_loopback_hosts() -> None:
    with pytest.raises(ValueError, match="non-loopback"):
        run_fuzz("ws://example.com/ws", examples=1, steps=1, seed=0, out=io.StringIO())
    with pytest.raises(ValueError, match="not a WebSocket URL"):
        check_url("http://127.0.0.1/ws")
    check_url("ws://example.com/ws", allow_remote=True)
    check_url("ws://localhost:1/ws")
    check_url("ws://[::1]:1/ws")
