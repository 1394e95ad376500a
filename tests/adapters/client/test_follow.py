"""``wirestate client --reconnect`` against the real server: resume across a cut."""

from __future__ import annotations

import asyncio
import io
import threading
from typing import Any

import orjson
import pytest

from wirestate.adapters.client.follow import follow
from wirestate.adapters.client.subscriber import Backoff, Subscription
from wirestate.adapters.server.service import WirestateServer
from wirestate.adapters.tools import cli
from wirestate.models.settings import Settings
from wirestate.testing.net import until

WAIT = 10.0


@pytest.fixture
async def server() -> WirestateServer:  # type: ignore[misc]
    srv = WirestateServer(Settings.model_validate({"server": {"port": 0}}), epoch="follow")
    async with srv:
        yield srv


def following(
    url: str, count: int, out: io.StringIO, err: io.StringIO, *, json_lines: bool = True
) -> asyncio.Task[int]:
    """`follow` of topic ``t`` in a task, retrying fast, until ``count`` events."""
    return asyncio.create_task(
        follow(
            url,
            ["t"],
            count=count,
            json_lines=json_lines,
            out=out,
            err=err,
            backoff=Backoff(base=0.01, cap=0.05, attempts=20),
        )
    )


@pytest.fixture
def took_subscribed(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Set once the client has read a ``subscribed``: not merely once the hub holds the
    subscription, which comes first (a cut in between would leave the client without the
    position it resumes from). A thread's event: the CLI test runs its loop in a thread."""
    seen = threading.Event()
    original = Subscription._on_subscribed

    def noting(self: Subscription, msg: Any) -> None:
        original(self, msg)
        seen.set()

    monkeypatch.setattr(Subscription, "_on_subscribed", noting)
    return seen


async def subscribed(seen: threading.Event) -> None:
    await until(seen.is_set, WAIT)  # another thread may set it: polled


async def test_follow_resumes_across_a_cut_with_no_duplicate(
    server: WirestateServer, took_subscribed: threading.Event
) -> None:
    out, err = io.StringIO(), io.StringIO()
    task = following(server.url, 6, out, err)
    await subscribed(took_subscribed)
    for i in range(3):
        await server.publish("t", {"i": i})
    await until(lambda: out.getvalue().count('"type":"event"') >= 3, WAIT)
    for client in list(server.sessions.values()):
        client.transport.abort()  # cut it server-side
    for i in range(3, 6):
        await server.publish("t", {"i": i})  # published while it is away
    assert await asyncio.wait_for(task, WAIT) == 0
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [m["seq"] for m in lines if m.get("type") == "event"] == [1, 2, 3, 4, 5, 6]
    summary = lines[-1]["summary"]
    assert (summary["events"], summary["gaps"]) == (6, 0)
    assert summary["reconnects"] >= 1


async def test_follow_resumes_a_topic_that_delivered_nothing_before_the_cut(
    server: WirestateServer, took_subscribed: threading.Event
) -> None:
    out, err = io.StringIO(), io.StringIO()
    task = following(server.url, 3, out, err)
    await subscribed(took_subscribed)
    # Cut right after subscribed, then publish before the loop turns: the client cannot be
    # back yet, so the three events reach it only through an exact resume (a resubscribe
    # without since would bring the retained #3 alone).
    for client in list(server.sessions.values()):
        client.transport.abort()
    for i in range(3):
        server.publish_now("t", {"i": i})
    assert await asyncio.wait_for(task, WAIT) == 0
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [m["seq"] for m in lines if m.get("type") == "event"] == [1, 2, 3]
    assert (lines[-1]["summary"]["gaps"], lines[-1]["summary"]["reconnects"]) == (0, 1)


async def test_follow_says_when_the_server_cannot_be_reached() -> None:
    out, err = io.StringIO(), io.StringIO()
    code = await follow(
        "ws://127.0.0.1:9/ws",
        ["t"],
        out=out,
        err=err,
        backoff=Backoff(base=0.001, cap=0.002, attempts=2),
    )
    assert code == 1
    assert "is `wirestate serve` running?" in err.getvalue()


async def test_follow_stops_after_its_duration_and_prints_a_summary(
    server: WirestateServer,
) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = await follow(server.url, ["t"], duration=0.2, out=out, err=err)
    assert code == 0
    assert "followed for" in out.getvalue()
    assert "0 events, 0 gaps, 0 reconnects" in out.getvalue()


async def test_the_cli_flag_selects_follow(
    server: WirestateServer, took_subscribed: threading.Event
) -> None:
    buf = io.StringIO()
    argv = ["client", server.url, "--topic", "t", "--count", "1", "--reconnect"]
    running = asyncio.create_task(asyncio.to_thread(cli.main, argv, buf))
    await subscribed(took_subscribed)
    await server.publish("t", {"hello": 1})
    assert await asyncio.wait_for(running, WAIT) == 0
    text = buf.getvalue()
    assert "t #1 " in text
    assert "1 events, 0 gaps" in text


async def test_follow_prints_a_gap_for_what_history_lost(
    took_subscribed: threading.Event,
) -> None:
    settings = Settings.model_validate({"server": {"port": 0}, "history": {"size": 1}})
    async with WirestateServer(settings, epoch="gaps") as srv:
        out, err = io.StringIO(), io.StringIO()
        task = following(srv.url, 2, out, err, json_lines=False)
        await subscribed(took_subscribed)
        await srv.publish("t", {"i": 0})
        await until(lambda: "t #1 " in out.getvalue(), WAIT)
        for client in list(srv.sessions.values()):
            client.transport.abort()
        for i in range(1, 4):
            await srv.publish("t", {"i": i})  # seq 2..4; history keeps only 4
        assert await asyncio.wait_for(task, WAIT) == 0
        text = out.getvalue()
        assert "!! GAP t: events #2..#3 will not be delivered (history_evicted)" in text
        assert "t #4 " in text
        assert "2 events, 1 gaps" in text


async def test_follow_never_prints_a_token(server: WirestateServer) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = await follow(server.url + "?token=abc.def.ghi", ["t"], duration=0.2, out=out, err=err)
    assert code == 0
    assert "abc.def.ghi" not in out.getvalue()
    assert "token=***" in out.getvalue()
