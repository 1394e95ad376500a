"""The reconnecting subscriber against the real server on loopback (order, resume across a
cut, evicted history, a restarted node, a relay that cuts right after ``subscribed``) and
against small scripted websockets servers (a silent server, duplicates, refusals, the close
code on cancellation). Millisecond intervals; every wait is bounded by asyncio.timeout."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from websockets.asyncio.client import connect as connect_ws
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidURI

from wirestate.adapters.client.subscriber import (
    Backoff,
    ConnectionLost,
    Event,
    Gap,
    Subscription,
    SubscriptionRefused,
    connect,
)
from wirestate.adapters.server.service import WirestateServer
from wirestate.core.causes import GapReason
from wirestate.models.settings import Settings
from wirestate.testing.net import free_port, server_settings

TOPIC = "orders"
TS = "2026-11-25T16:00:00.000Z"
WAIT = 3.0  # upper bound on any single wait
FAST = Backoff(base=0.01, cap=0.05)


def settings(port: int = 0, **sections: Any) -> Settings:
    """A test server on ``port``, loop stalls at the default threshold."""
    return server_settings(sections, port=port, loop_stall_threshold=0.5)


@asynccontextmanager
async def hub(
    settings_: Settings | None = None, epoch: str | None = None
) -> AsyncIterator[WirestateServer]:
    server = WirestateServer(settings_ or settings(), epoch=epoch)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def cut(server: WirestateServer) -> None:
    """Drop every client's TCP connection from the server side, with no close frame."""
    for client in list(server.sessions.values()):
        client.transport.abort()


async def take(sub: Subscription, n: int) -> list[Event | Gap]:
    items: list[Event | Gap] = []
    async with asyncio.timeout(WAIT):
        while len(items) < n:
            items.append(await anext(sub))
    return items


def seqs(items: list[Event | Gap]) -> list[int]:
    return [item.seq for item in items if isinstance(item, Event)]


# --- backoff --------------------------------------------------------------------------------


def test_delay_is_full_jitter_over_a_capped_exponential() -> None:
    backoff = Backoff(base=0.1, cap=1.0)
    assert [backoff.ceiling(n) for n in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert backoff.delay(0, lambda: 0.0) == 0.0
    assert backoff.delay(2, lambda: 0.5) == pytest.approx(0.2)
    assert backoff.delay(3, lambda: 0.999) == pytest.approx(0.8 * 0.999)
    assert backoff.delay(4, lambda: 0.25) == pytest.approx(0.25)
    assert backoff.delay(10_000, lambda: 0.5) == pytest.approx(0.5)  # no overflow
    draws = iter([0.1, 0.9, 0.3])
    assert [backoff.delay(n, lambda: next(draws)) for n in (1, 2, 3)] == pytest.approx(
        [0.02, 0.36, 0.24]
    )


@pytest.mark.parametrize(
    "kwargs",
    [{"base": 0}, {"base": -1}, {"cap": 0.05}, {"cap": float("inf")}, {"attempts": 0}],
)
def test_backoff_rejects_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must"):
        Backoff(**kwargs)
    with pytest.raises(ValueError, match="attempt must be >= 0"):
        Backoff().delay(-1)


async def test_attempts_exhausted_raises_connection_lost() -> None:
    draws: list[float] = []

    def rng() -> float:
        draws.append(0.5)
        return 0.5

    sub = connect(
        f"ws://127.0.0.1:{free_port()}/ws",
        topics=[TOPIC],
        backoff=Backoff(base=0.001, cap=0.004, attempts=3),
        rng=rng,
    )
    async with asyncio.timeout(WAIT):
        with pytest.raises(ConnectionLost) as info:
            async with sub:
                pytest.fail("connected to a closed port")
    assert info.value.attempts == 3
    assert info.value.cause == "refused"
    assert len(draws) == 2  # one wait between each pair of attempts, none after the last


# --- the real server --------------------------------------------------------------------------


async def test_receives_events_in_order() -> None:
    async with hub() as server, connect(server.url, topics=[TOPIC], backoff=FAST) as sub:
        for n in range(1, 6):
            await server.publish(TOPIC, {"n": n})
        items = await take(sub, 5)
        assert all(isinstance(item, Event) and not item.stale for item in items)
        assert seqs(items) == [1, 2, 3, 4, 5]
        assert [item.data for item in items if isinstance(item, Event)] == [
            {"n": n} for n in range(1, 6)
        ]
        assert sub.last_seq == {TOPIC: 5}
        assert sub.epochs == {TOPIC: server.epoch}


async def test_resumes_after_a_cut_with_no_duplicate_and_no_hole() -> None:
    async with (
        hub() as server,
        connect(server.url, topics=[TOPIC], backoff=FAST, rng=lambda: 0.0) as sub,
    ):
        for n in range(1, 4):
            await server.publish(TOPIC, n)
        assert seqs(await take(sub, 3)) == [1, 2, 3]
        # Cut, then publish while the client has not even noticed: 4..6 go nowhere but the
        # history, so they can only reach the client through the resume.
        cut(server)
        for n in range(4, 7):
            await server.publish(TOPIC, n)
        resumed = await take(sub, 3)
        assert seqs(resumed) == [4, 5, 6]
        assert [item.data for item in resumed if isinstance(item, Event)] == [4, 5, 6]
        assert sub.connections == 2
        for n in range(7, 9):
            await server.publish(TOPIC, n)
        assert seqs(await take(sub, 2)) == [7, 8]
        assert sub.duplicates == 0


async def test_a_topic_that_delivered_nothing_resumes_from_where_it_was_subscribed() -> None:
    """The hole ``subscribed.seq`` closes: subscribed to an empty topic, cut before anything
    arrived, events published meanwhile. Resubscribing without ``since`` would bring only
    the retained latest one; resuming from the subscription's position brings them all."""
    async with (
        hub() as server,
        connect(server.url, topics=[TOPIC], backoff=FAST, rng=lambda: 0.0) as sub,
    ):
        assert sub.positions == {TOPIC: 0}
        assert TOPIC not in sub.last_seq
        # The subscriber reconnects only while the application waits for an item, so all
        # three are published while it is cut off: only the resume can bring them.
        cut(server)
        for n in range(1, 4):
            await server.publish(TOPIC, n)
        first = await take(sub, 1)
        assert seqs(first) == [1], first  # not just the retained 3: nothing is missed
        resumed = first + await take(sub, 2)
        assert resumed == [Event(TOPIC, n, resumed[n - 1].ts, n) for n in (1, 2, 3)]
        assert sub.connections == 2
        assert sub.positions == {TOPIC: 0}  # where the resume took effect: the replay followed
        await server.publish(TOPIC, 4)
        assert seqs(await take(sub, 1)) == [4]
        assert sub.duplicates == 0


async def test_a_resume_continues_from_the_newer_of_position_and_last_seq() -> None:
    async with (
        hub() as server,
        connect(server.url, topics=[TOPIC], backoff=FAST, rng=lambda: 0.0) as sub,
    ):
        await server.publish(TOPIC, 1)
        await server.publish(TOPIC, 2)
        assert seqs(await take(sub, 2)) == [1, 2]
        cut(server)
        await server.publish(TOPIC, 3)
        assert seqs(await take(sub, 1)) == [3]  # resumed from 2, not from the position 0
        assert sub.positions == {TOPIC: 2}
        assert sub.duplicates == 0


async def test_evicted_history_is_a_gap_value_covering_exactly_the_missed_range() -> None:
    async with (
        hub(settings(history={"size": 2})) as server,
        connect(server.url, topics=[TOPIC], backoff=FAST, rng=lambda: 0.0) as sub,
    ):
        await server.publish(TOPIC, 1)
        assert seqs(await take(sub, 1)) == [1]
        cut(server)
        for n in range(2, 7):
            await server.publish(TOPIC, n)  # history keeps 5 and 6 only
        items = await take(sub, 3)
        assert items[0] == Gap(TOPIC, 2, 4, GapReason.HISTORY_EVICTED)
        assert items[0].reason == "history_evicted"
        assert seqs(items[1:]) == [5, 6]
        assert sub.last_seq == {TOPIC: 6}


async def test_restarted_server_gives_an_epoch_changed_gap_and_a_fresh_sequence() -> None:
    first = WirestateServer(settings(), epoch="aaaa")
    await first.start()
    port = first.port
    try:
        async with connect(first.url, topics=[TOPIC], backoff=FAST, rng=lambda: 0.5) as sub:
            for n in range(1, 4):
                await first.publish(TOPIC, n)
            assert seqs(await take(sub, 3)) == [1, 2, 3]
            await first.stop()
            async with hub(settings(port), epoch="bbbb") as second:
                gap = await take(sub, 1)
                assert gap == [Gap(TOPIC, None, None, GapReason.EPOCH_CHANGED)]
                assert sub.epochs == {TOPIC: "bbbb"}
                assert TOPIC not in sub.last_seq
                # seq 1 again: a new sequence, not a duplicate of the old 1.
                await second.publish(TOPIC, "new")
                items = await take(sub, 1)
                assert seqs(items) == [1]
                assert isinstance(items[0], Event)
                assert items[0].data == "new"
                assert sub.duplicates == 0
    finally:
        await first.stop()


@asynccontextmanager
async def relay(upstream: Callable[[], str], cut_after: set[int]) -> AsyncIterator[Relay]:
    """A websockets relay to ``upstream()``; on the n-th connection that reaches it (from 1)
    in ``cut_after`` it aborts the client's TCP connection right after passing on
    ``subscribed``. While the upstream is down a connection is closed at once."""
    state = Relay()

    async def handler(ws: ServerConnection) -> None:
        try:
            up = await connect_ws(upstream())
        except OSError:
            return
        state.connections += 1
        n = state.connections
        async with up:

            async def client_to_server() -> None:
                async for raw in ws:
                    msg = json.loads(raw)
                    if msg["type"] == "subscribe":
                        state.subscribes.append(msg)
                    await up.send(raw)

            async def server_to_client() -> None:
                async for raw in up:
                    await ws.send(raw)
                    if n in cut_after and json.loads(raw)["type"] == "subscribed":
                        ws.transport.abort()
                        return

            tasks = [asyncio.create_task(f()) for f in (client_to_server, server_to_client)]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        state.url = f"ws://127.0.0.1:{port}/ws"
        yield state


class Relay:
    def __init__(self) -> None:
        self.url = ""
        self.connections = 0
        self.subscribes: list[dict[str, Any]] = []


async def test_a_cut_between_subscribed_and_the_epoch_changed_gap_still_reports_the_gap() -> None:
    first = WirestateServer(settings(), epoch="aaaa")
    await first.start()
    port = first.port
    url = first.url
    try:
        # The second connection (to the restarted node) is cut right after `subscribed`.
        async with (
            relay(lambda: url, cut_after={2}) as via,
            connect(via.url, topics=[TOPIC], backoff=FAST, rng=lambda: 0.5) as sub,
        ):
            for n in range(1, 4):
                await first.publish(TOPIC, n)
            assert seqs(await take(sub, 3)) == [1, 2, 3]
            await first.stop()
            async with hub(settings(port), epoch="bbbb") as second:
                for n in ("x", "y"):
                    await second.publish(TOPIC, n)
                items = await take(sub, 2)
                # The old numbering ended: said before seq 1 of the new one, never skipped.
                assert items[0] == Gap(TOPIC, None, None, GapReason.EPOCH_CHANGED)
                items += await take(sub, 1)
                assert seqs(items[1:]) == [1, 2]
                assert [i.data for i in items[1:] if isinstance(i, Event)] == ["x", "y"]
                assert via.connections == 3
                resumes = [m["since"][TOPIC] for m in via.subscribes[1:]]
                assert resumes == [{"seq": 3, "epoch": "aaaa"}] * 2  # told again after the cut
                assert (sub.epochs, sub.last_seq) == ({TOPIC: "bbbb"}, {TOPIC: 2})
    finally:
        await first.stop()


# --- scripted servers -----------------------------------------------------------------------

Script = Callable[[ServerConnection, int], Awaitable[None]]


class Fake:
    """A websockets server whose handler runs `script(ws, n)` for the n-th connection (from 1)
    and records what the client sent and the close code it saw."""

    def __init__(self, script: Script, *, ping_interval: float = 0.05, timeout: float = 0.05):
        self.script = script
        self.ping_interval = ping_interval
        self.timeout = timeout
        self.connections = 0
        self.subscribes: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []
        self.close_codes: list[int | None] = []
        self.changed = asyncio.Condition()

    async def handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        n = self.connections
        try:
            await self.script(ws, n)
        finally:
            await ws.wait_closed()
            async with self.changed:
                self.close_codes.append(ws.close_code)
                self.changed.notify_all()

    async def welcome(self, ws: ServerConnection) -> None:
        await ws.send(
            json.dumps(
                {
                    "type": "welcome",
                    "client_id": "c1",
                    "protocol": 1,
                    "ping_interval": self.ping_interval,
                    "ping_timeout": self.timeout,
                }
            )
        )

    async def handshake(self, ws: ServerConnection, epoch: str = "e1") -> None:
        await self.welcome(ws)
        msg = json.loads(await ws.recv())
        self.subscribes.append(msg)
        topics = msg["topics"]
        await ws.send(
            json.dumps(
                {
                    "type": "subscribed",
                    "topics": topics,
                    "recovered": {t: True for t in topics},
                    "epoch": {t: epoch for t in topics},
                }
            )
        )
        async with self.changed:
            self.changed.notify_all()

    async def serve_pings(self, ws: ServerConnection, *, answer: bool = True) -> None:
        """Record what the client sends, answering its pings if `answer`, until it closes."""
        try:
            async for raw in ws:
                msg = json.loads(raw)
                async with self.changed:
                    self.received.append(msg)
                    self.changed.notify_all()
                if answer and msg["type"] == "ping":
                    await ws.send(json.dumps({"type": "pong", "id": msg["id"]}))
        except ConnectionClosed:
            return  # an aborted client: the close code is recorded by the handler

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT), self.changed:
            await self.changed.wait_for(predicate)


@asynccontextmanager
async def fake(fake_: Fake) -> AsyncIterator[str]:
    async with serve(fake_.handler, "127.0.0.1", 0, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws"


def event(seq: int) -> str:
    return json.dumps({"type": "event", "topic": TOPIC, "seq": seq, "ts": TS, "data": seq})


def gap(lo: int, hi: int) -> str:
    msg = {"type": "gap", "topic": TOPIC, "from_seq": lo, "to_seq": hi, "reason": "slow_consumer"}
    return json.dumps(msg)


async def test_duplicates_are_dropped_gaps_trimmed_and_resume_sends_the_cursor() -> None:
    async def script(ws: ServerConnection, n: int) -> None:
        await fake_.handshake(ws)
        if n == 1:
            for frame in (event(1), event(2), event(2), event(1), gap(2, 4), event(5)):
                await ws.send(frame)
            await ws.close()  # the client resumes from 5
            return
        for frame in (event(4), event(5), gap(3, 6), event(7)):
            await ws.send(frame)
        await fake_.serve_pings(ws)

    fake_ = Fake(script)
    async with fake(fake_) as url, connect(url, topics=[TOPIC], backoff=FAST) as sub:
        items = await take(sub, 6)
    assert items[:3] == [
        Event(TOPIC, 1, TS, 1),
        Event(TOPIC, 2, TS, 2),
        Gap(TOPIC, 3, 4, GapReason.SLOW_CONSUMER),
    ]
    assert items[3:] == [
        Event(TOPIC, 5, TS, 5),
        Gap(TOPIC, 6, 6, GapReason.SLOW_CONSUMER),
        Event(TOPIC, 7, TS, 7),
    ]
    assert sub.duplicates == 4  # 2, 1, event 4 and event 5 of the second connection
    assert fake_.subscribes[0] == {"type": "subscribe", "topics": [TOPIC]}
    assert fake_.subscribes[1]["since"] == {TOPIC: {"seq": 5, "epoch": "e1"}}


async def test_attempt_count_restarts_after_a_connection_that_reached_welcome() -> None:
    async def script(ws: ServerConnection, n: int) -> None:
        if n <= 3:  # welcome, then drop: each attempt fails after reaching welcome
            await fake_.welcome(ws)
            await ws.close()
            return
        await fake_.handshake(ws)
        await fake_.serve_pings(ws)

    fake_ = Fake(script)
    backoff = Backoff(base=0.001, cap=0.002, attempts=2)
    async with (
        fake(fake_) as url,
        asyncio.timeout(WAIT),
        connect(url, topics=[TOPIC], backoff=backoff) as sub,
    ):
        assert sub.connections == 4


async def test_a_refused_subscription_raises_and_is_not_retried() -> None:
    async def script(ws: ServerConnection, n: int) -> None:
        await fake_.welcome(ws)
        await ws.recv()
        await ws.send(json.dumps({"type": "error", "code": "forbidden", "message": "no"}))
        await fake_.serve_pings(ws)

    fake_ = Fake(script)
    async with fake(fake_) as url, asyncio.timeout(WAIT):
        with pytest.raises(SubscriptionRefused) as info:
            async with connect(url, topics=[TOPIC], backoff=FAST):
                pytest.fail("subscribed although refused")
        await fake_.until(lambda: len(fake_.close_codes) == 1)
    assert info.value.code == "forbidden"
    assert fake_.connections == 1
    assert fake_.close_codes == [1000]


async def test_a_silent_server_is_dropped_within_interval_plus_timeout() -> None:
    loop = asyncio.get_running_loop()
    subscribed_at: list[float] = []

    async def script(ws: ServerConnection, n: int) -> None:
        await fake_.handshake(ws)
        subscribed_at.append(loop.time())
        if n == 1:
            await fake_.serve_pings(ws, answer=False)  # reads, never answers
        else:
            await fake_.serve_pings(ws)

    fake_ = Fake(script, ping_interval=0.05, timeout=0.1)
    async with (
        fake(fake_) as url,
        connect(url, topics=[TOPIC], backoff=FAST, rng=lambda: 0.0) as sub,
    ):

        async def consume() -> None:
            async for _ in sub:
                pass

        async with asyncio.TaskGroup() as tg:
            consumer = tg.create_task(consume())
            await fake_.until(lambda: fake_.connections >= 2 and len(subscribed_at) >= 2)
            consumer.cancel()
    silent_for = subscribed_at[1] - subscribed_at[0]
    assert 0.15 * 0.9 <= silent_for < 0.15 + 0.5
    assert any(msg["type"] == "ping" for msg in fake_.received)  # it did ask first
    assert fake_.close_codes[0] == 1006  # aborted: a dead peer is not sent a close frame


async def test_cancelling_the_consumer_closes_with_1000_and_leaves_no_task() -> None:
    async def script(ws: ServerConnection, n: int) -> None:
        await fake_.handshake(ws)
        await fake_.serve_pings(ws)

    fake_ = Fake(script, ping_interval=0.02, timeout=0.5)
    async with fake(fake_) as url:
        before = asyncio.all_tasks()

        async def consume() -> None:
            async with connect(url, topics=[TOPIC], backoff=FAST) as sub:
                async for _ in sub:
                    pass

        consumer = asyncio.create_task(consume())
        # Two pings answered: the consumer is parked in recv, in steady state.
        await fake_.until(lambda: sum(m["type"] == "ping" for m in fake_.received) >= 2)
        consumer.cancel()
        async with asyncio.timeout(WAIT):
            with pytest.raises(asyncio.CancelledError):
                await consumer
        await fake_.until(lambda: len(fake_.close_codes) == 1)
        assert fake_.close_codes == [1000]
        left = {t for t in asyncio.all_tasks() - before if t is not asyncio.current_task()}
        if left:  # the fake server's own handler may still be finishing
            await asyncio.wait(left, timeout=WAIT)
        assert all(t.done() for t in left)
        assert fake_.connections == 1


async def test_leaving_the_block_closes_with_1000() -> None:
    async def script(ws: ServerConnection, n: int) -> None:
        await fake_.handshake(ws)
        await ws.send(event(1))
        await fake_.serve_pings(ws)

    fake_ = Fake(script)
    async with fake(fake_) as url:
        async with connect(url, topics=[TOPIC], backoff=FAST) as sub:
            async for item in sub:
                assert item == Event(TOPIC, 1, TS, 1)
                break
        with pytest.raises(StopAsyncIteration):
            await anext(sub)
        await fake_.until(lambda: len(fake_.close_codes) == 1)
    assert fake_.close_codes == [1000]


def test_bad_arguments_are_refused_before_connecting() -> None:
    with pytest.raises(ValueError, match="validation error"):
        connect("ws://127.0.0.1:1/ws", topics=["bad topic"])
    with pytest.raises(TypeError):
        connect("ws://127.0.0.1:1/ws", topics=TOPIC)
    with pytest.raises(ValueError, match="open_timeout must be positive"):
        connect("ws://127.0.0.1:1/ws", topics=[TOPIC], open_timeout=0)
    with pytest.raises(InvalidURI):
        connect("http://127.0.0.1:1/ws", topics=[TOPIC])


async def test_time_spent_by_the_application_is_not_blamed_on_the_server() -> None:
    async def script(ws: ServerConnection, n: int) -> None:
        await fake_.handshake(ws)
        await ws.send(event(1))
        await ws.send(event(2))
        await fake_.serve_pings(ws)

    fake_ = Fake(script, ping_interval=0.02, timeout=0.03)
    async with fake(fake_) as url, connect(url, topics=[TOPIC], backoff=FAST) as sub:
        assert seqs(await take(sub, 1)) == [1]
        # The application works for several windows (0.05 s) before asking for more; the
        # server is fine, so the next item comes from the same connection.
        await asyncio.sleep(0.2)
        assert seqs(await take(sub, 1)) == [2]
        assert sub.connections == 1
    assert fake_.connections == 1


async def test_stale_events_keep_their_flag_and_age() -> None:
    async with hub() as server, connect(server.url, topics=[TOPIC], backoff=FAST) as sub:
        await server.publish(TOPIC, {"cpu": 1}, stale=True, age=12.5)
        [item] = await take(sub, 1)
        assert isinstance(item, Event)
        assert (item.stale, item.age, item.data) == (True, 12.5, {"cpu": 1})
