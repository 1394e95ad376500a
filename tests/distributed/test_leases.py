"""The lease scripts and the fenced publish against a real Redis, and a paused ex-leader."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from wirestate.adapters.server import bus as bus_module
from wirestate.adapters.server import leases
from wirestate.adapters.server.bus import FENCED_PUBLISH, PUBLISH, meta_key, stream_key
from wirestate.adapters.server.service import WirestateServer
from wirestate.models.settings import Settings
from wirestate.testing.net import free_port, until, until_true

from .conftest import Node, events, own_redis, ready, subscriber, topic


@pytest.fixture
async def redis(redis_url: str) -> Any:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


def _publish_args(body: bytes, *extra: Any) -> list[Any]:
    return [100, "epoch", body, "2026-12-05T00:00:00.000Z", 60_000, *extra]


async def test_the_fenced_publish_refuses_a_token_the_lease_no_longer_holds(redis: Any) -> None:
    t = topic()
    keys = [meta_key(t), stream_key(t), leases.lease_key(t)]
    fenced = redis.register_script(FENCED_PUBLISH)
    await redis.set(leases.lease_key(t), "2:b", px=60_000)
    stale = b',"stale":true,"age":1.5}'
    # The ex-leader's token: nothing is numbered, nothing appended.
    assert await fenced(keys=keys, args=_publish_args(b"1", stale, b"{}", "1:a")) == -1
    assert await redis.exists(meta_key(t), stream_key(t)) == 0
    # The holder's token: numbered and appended, with the tail and the state beside the data.
    assert await fenced(keys=keys, args=_publish_args(b"2", stale, b'{"s":1}', "2:b")) == 1
    [(entry_id, fields)] = await redis.xrange(stream_key(t))
    assert entry_id == b"1-0"
    assert (fields[b"d"], fields[b"s"], fields[b"b"]) == (b"2", stale, b'{"s":1}')
    # No lease at all (it expired): refused too.
    await redis.delete(leases.lease_key(t))
    assert await fenced(keys=keys, args=_publish_args(b"3", b"", b"", "2:b")) == -1
    # The plain publish is the same script without the fence, and a fresh event has no tail.
    plain = redis.register_script(PUBLISH)
    assert await plain(keys=keys[:2], args=_publish_args(b"4", b"", b"")) == 2
    last = (await redis.xrevrange(stream_key(t), count=1))[0][1]
    assert set(last) == {b"d", b"t", b"w"}


async def test_acquire_renew_and_release_compare_the_token(redis: Any) -> None:
    t = topic()
    acquire = redis.register_script(leases.ACQUIRE)
    renew = redis.register_script(leases.RENEW)
    release = redis.register_script(leases.RELEASE)
    keys = [leases.lease_key(t), leases.fence_key(t), stream_key(t)]
    fence, token, entries = await acquire(keys=keys, args=["a", 5000, 16])
    assert (fence, token, entries) == (1, b"1:a", [])
    held, pttl = await acquire(keys=keys, args=["b", 5000, 16])
    assert held == 0
    assert 0 < pttl <= 5000
    assert await renew(keys=keys[:1], args=["1:b", 60_000]) == 0
    assert await renew(keys=keys[:1], args=["1:a", 60_000]) == 1
    assert await redis.pttl(keys[0]) > 5000
    assert await release(keys=keys[:1], args=["1:b"]) == 0
    assert await release(keys=keys[:1], args=["1:a"]) == 1
    # The next term has a higher fence, and sees the stream's newest entries.
    await redis.xadd(stream_key(t), {"d": b"1", "t": b"x", "b": b"{}"}, id="1-0")
    fence, token, entries = await acquire(keys=keys, args=["b", 5000, 16])
    assert (fence, token) == (2, b"2:b")
    assert [e[0] for e in entries] == [b"1-0"]


def _server(redis_url: str, ttl: float) -> WirestateServer:
    return WirestateServer(
        Settings.model_validate(
            {
                "server": {"port": 0},
                "bus": {
                    "kind": "redis",
                    "url": redis_url,
                    "lease_ttl": ttl,
                    "breaker": {"failure_threshold": 1, "reset_timeout": 0.05},
                },
            }
        )
    )


async def test_a_paused_ex_leader_cannot_publish_and_steps_down(redis_url: str, redis: Any) -> None:
    """Another node took the lease while this one was not looking (its renewal not due yet):
    its next publish is refused by Redis, and it stops polling."""
    t = topic()
    server = _server(redis_url, ttl=30.0)  # renewals every 10 s: none during the test
    calls = 0

    async def fetch() -> dict[str, int]:
        nonlocal calls
        calls += 1
        return {"n": calls}

    server.add_source(t, fetch, interval=0.01, timeout=1.0)
    async with server:
        shared = server.shared[t]
        await until(lambda: shared.leader)
        async with subscriber(Node(None, server.port), t) as (ws, _):
            await events(ws, 3)
            await redis.set(leases.lease_key(t), "99:other", px=60_000)  # the new leader
            await until(lambda: not shared.leader)
            last = (await redis.hget(meta_key(t), "seq")).decode()
            made = calls
            stream = await redis.xrange(stream_key(t))
            assert all(orjson.loads(f[b"d"])["n"] < made for _, f in stream[-1:])
            assert server.bus.status()["fenced"] >= 1
            text = server.metrics.render().decode()
            assert f'wirestate_source_leader{{source="{t}"}} 0.0' in text
            # Stepped down: no more calls, nothing more in the stream.
            await asyncio.sleep(0.1)  # ten intervals in which a poller would have called
            assert calls == made
            assert (await redis.hget(meta_key(t), "seq")).decode() == last


async def test_a_stopping_leader_hands_the_lease_over_at_once(redis_url: str) -> None:
    t = topic()
    first, second = _server(redis_url, ttl=30.0), _server(redis_url, ttl=30.0)

    async def fetch() -> int:
        return 1

    for server in (first, second):
        server.add_source(t, fetch, interval=0.01, timeout=1.0)
    async with first:
        await until(lambda: first.shared[t].leader)
        async with second:
            await asyncio.sleep(0.05)  # the follower asks and is told the lease is held
            assert not second.shared[t].leader
            await first.stop()  # released: no 30 s wait for the ttl, HANDOVER at most

            async def leads() -> bool:
                return second.shared[t].leader

            await until_true(leads, bound=5.0)
            assert second.shared[t].terms == 1


async def test_a_hole_in_a_reconciliation_takes_its_seq_and_writes_nothing(redis: Any) -> None:
    t = topic()
    reconcile = redis.register_script(bus_module.RECONCILE)
    args = [100, "e", 0, 0, 3, 60_000, b'"a"', "ts", b"", "ts", b'"c"', "ts"]
    status, epoch, start, end = await reconcile(keys=[meta_key(t), stream_key(t)], args=args)
    assert (status, epoch, start, end) == (b"same", b"e", 0, 3)
    assert [entry_id for entry_id, _ in await redis.xrange(stream_key(t))] == [b"1-0", b"3-0"]


async def test_a_leader_cut_off_from_redis_serves_its_clients_but_never_the_bus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its writes cannot be checked against its lease while the link is down: its own
    subscribers get them, the bus gets holes in their place (gaps elsewhere)."""
    monkeypatch.setattr(bus_module, "START_WAIT", 2.0)
    port = free_port()
    t = topic()
    with own_redis(port) as proc:
        server = _server(f"redis://127.0.0.1:{port}/0", ttl=30.0)
        calls = 0

        async def fetch() -> int:
            nonlocal calls
            calls += 1
            return calls

        server.add_source(t, fetch, interval=0.02, timeout=1.0)
        async with server:
            await until(lambda: server.shared[t].leader)
            node = Node(None, server.port)
            async with subscriber(node, t) as (ws, _):
                await events(ws, 2)
                proc.terminate()
                proc.wait()
                await until(lambda: not server.bus.ready)
                down = [m for m in await events(ws, 5) if m["type"] == "event"]
                with own_redis(port):
                    await ready(node)
                    client = Redis(host="127.0.0.1", port=port)
                    try:
                        await until_true(lambda: client.exists(meta_key(t)), bound=5.0)
                        stream = await client.xrange(stream_key(t))
                    finally:
                        await client.aclose()
    written = {int(entry_id.split(b"-")[0]) for entry_id, _ in stream}
    assert down
    assert not written & {m["seq"] for m in down}  # delivered here, never on the bus


async def test_a_lease_request_that_raises_is_logged_and_the_lease_goes_on(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    t = topic()
    server = _server(redis_url, ttl=3.0)

    async def fetch() -> int:
        return 1

    server.add_source(t, fetch, interval=0.01, timeout=1.0)
    original = leases.SharedSource._ask
    raised: list[bool] = []

    async def ask(shared: leases.SharedSource, what: Any, sent: float) -> None:
        if not raised:
            raised.append(True)
            raise KeyError("a reply of an unexpected shape")
        await original(shared, what, sent)

    monkeypatch.setattr(leases.SharedSource, "_ask", ask)
    async with server:
        await until(lambda: server.shared[t].leader, bound=5.0)
        assert server.shared[t].errors == 1
    assert "a lease request raised KeyError" in caplog.text
