"""Several hub nodes, each a separate `wirestate serve` process, sharing a real Redis.

Redis is REDIS_URL (default redis://127.0.0.1:6379/0); without it these tests skip, except
under CI, where they fail. The outage test starts its own redis-server on a free port, so
stopping it disturbs nothing else. Topics are random per test: the shared Redis may hold
other runs' streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from wirestate.adapters.server import bus as bus_module
from wirestate.adapters.server.service import WirestateServer
from wirestate.models.settings import Settings
from wirestate.testing.net import free_port, recv, until, until_true

from .conftest import WAIT, Node, events, nodes, own_redis, publish, ready, subscriber, topic

# -- publish on one, receive on all --------------------------------------------------------


@pytest.mark.parametrize("count", [2, 3])
async def test_a_publish_on_any_node_reaches_every_node_in_one_order(
    tmp_path: Path, redis_url: str, count: int
) -> None:
    t = topic()
    with nodes(tmp_path, redis_url, count) as ns:
        for node in ns:
            await ready(node)
        async with contextlib_stack(ns, t) as clients:
            epochs = {sub["epoch"][t] for _, sub in clients}
            assert len(epochs) == 1  # one sequence space, whichever node a client is on
            # Every node publishes at once: Redis decides one order, every node follows it.
            per_node = 20
            await asyncio.gather(
                *(
                    publish(node, t, {"node": i, "n": k})
                    for k in range(per_node)
                    for i, node in enumerate(ns)
                )
            )
            total = per_node * count
            seen = [await events(ws, total) for ws, _ in clients]
    first = seen[0]
    assert [m["seq"] for m in first] == list(range(1, total + 1))
    for other in seen[1:]:
        assert other == first  # same seqs, same data, same timestamps, same order
    assert sorted((m["data"]["node"], m["data"]["n"]) for m in first) == sorted(
        (i, k) for i in range(count) for k in range(per_node)
    )


@asynccontextmanager
async def contextlib_stack(
    ns: list[Node], t: str
) -> AsyncIterator[list[tuple[ClientConnection, dict[str, Any]]]]:
    from contextlib import AsyncExitStack

    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(subscriber(node, t)) for node in ns]


async def test_a_websocket_publish_reaches_the_other_node(tmp_path: Path, redis_url: str) -> None:
    t = topic()
    with nodes(tmp_path, redis_url, 2) as (a, b):
        await ready(a)
        await ready(b)
        async with subscriber(a, t) as (wa, _), subscriber(b, t) as (wb, _):
            await wa.send(orjson.dumps({"type": "publish", "topic": t, "data": "hi"}).decode())
            for ws in (wa, wb):
                (msg,) = await events(ws, 1)
                assert (msg["seq"], msg["data"]) == (1, "hi")


# -- a node dies mid-stream ----------------------------------------------------------------


async def test_messages_behind_a_subscription_that_waits_for_the_bus_follow_it(
    tmp_path: Path, redis_url: str
) -> None:
    # The subscribe is taken as its frame is parsed and waits for the bus; the publishes
    # right behind it, in the same write, wait for it and keep their order.
    t = topic()
    with nodes(tmp_path, redis_url, 1) as (node,):
        await ready(node)
        async with connect(node.url, ping_interval=None, compression=None) as ws:
            assert (await recv(ws, WAIT))["type"] == "welcome"
            frames = [orjson.dumps({"type": "subscribe", "topics": [t]}).decode()]
            frames += [
                orjson.dumps({"type": "publish", "topic": t, "data": i}).decode() for i in range(5)
            ]
            for frame in frames:
                await ws.send(frame)
            first = await recv(ws, WAIT)
            assert first["type"] == "subscribed", first
            got = await events(ws, 5)
            assert [e["data"] for e in got] == list(range(5))


async def test_clients_of_a_killed_node_resume_on_another_without_loss(
    tmp_path: Path, redis_url: str
) -> None:
    t = topic()
    total = 200
    with nodes(tmp_path, redis_url, 2) as (a, b):
        await ready(a)
        await ready(b)
        got: list[int] = []
        async with subscriber(a, t) as (ws, sub):
            epoch = sub["epoch"][t]

            async def publisher() -> None:
                for k in range(total):
                    await publish(b, t, {"k": k})

            task = asyncio.create_task(publisher())
            try:
                while len(got) < 50:
                    (msg,) = await events(ws, 1)
                    got.append(msg["seq"])
                assert a.proc is not None
                a.proc.send_signal(signal.SIGKILL)  # no goodbye: the socket just dies
                await read_until_closed(ws, got)
            except BaseException:
                task.cancel()
                raise
        # The client resumes on the surviving node from the last seq it has.
        since = {t: {"seq": got[-1], "epoch": epoch}}
        async with subscriber(b, t, since=since) as (ws, sub):
            assert sub["recovered"] == {t: True}
            assert sub["epoch"] == {t: epoch}
            while got[-1] < total:
                (msg,) = await events(ws, 1)
                assert msg["type"] == "event", msg
                got.append(msg["seq"])
        await asyncio.wait_for(task, WAIT)
    assert got == list(range(1, total + 1))  # nothing lost, nothing twice


async def read_until_closed(ws: ClientConnection, got: list[int]) -> None:
    """Take what the dying connection still delivers, until it ends (whichever way)."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            (msg,) = await events(ws, 1)
            got.append(msg["seq"])


# -- Redis goes away and comes back --------------------------------------------------------


async def test_a_redis_outage_is_visible_survivable_and_heals_without_duplicates(
    tmp_path: Path, redis_url: str
) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    t = topic()
    with own_redis(port) as redis_proc, nodes(tmp_path, url, 2) as (a, b):
        await ready(a)
        await ready(b)
        async with (
            subscriber(a, t) as (wa, _),
            subscriber(b, t) as (wb, _),
            subscriber(a, "circuit_breaker") as (wcb, _),
        ):
            for k in range(3):
                await publish(a, t, {"before": k})
            before_a, before_b = await events(wa, 3), await events(wb, 3)
            assert [m["seq"] for m in before_a] == [m["seq"] for m in before_b] == [1, 2, 3]

            redis_proc.terminate()  # Redis stops; nothing of it is kept (--save "")
            redis_proc.wait()
            down = await ready(a, want=False)
            await ready(b, want=False)
            assert down["status"] == "bus_down"
            # Local delivery goes on: each node's clients get what is published on it.
            assert await publish(a, t, "a1") == 4
            assert await publish(a, t, "a2") == 5
            assert await publish(b, t, "b1") == 4
            assert [m["data"] for m in await events(wa, 2)] == ["a1", "a2"]
            assert [m["data"] for m in await events(wb, 1)] == ["b1"]

            with own_redis(port):
                up = await ready(a)
                await ready(b)
                assert up["bus"]["outages"] == 1
                # Both confirmed: a publish now reaches both, once, in one order.
                last = await publish(a, t, "after")
                tail_a = await until_seq(wa, last)
                tail_b = await until_seq(wb, last)
                changes = await breaker_until_closed(wcb)
                bus_a, bus_b = (await ready(a))["bus"], (await ready(b))["bus"]

    # Redis came back empty; the node that reconciled first re-seeded the topic and kept its
    # seqs. The other node's events went after them, and its clients got a bus_outage gap
    # as long as what the first node published meanwhile. Nothing arrives twice.
    assert last == 7
    gaps = [m for m in tail_a + tail_b if m["type"] == "gap"]
    assert len(gaps) == 1, gaps
    (gap,) = gaps
    assert gap["reason"] == "bus_outage"
    missed = gap["to_seq"] - gap["from_seq"] + 1
    shape_a = [(m["type"], m.get("seq"), m.get("data")) for m in tail_a]
    shape_b = [(m["type"], m.get("seq"), m.get("data")) for m in tail_b]
    assert sorted((bus_a["gapped"], bus_b["gapped"])) == [0, missed]  # reported by the loser
    if gap in tail_a:  # b won: b1 kept seq 4, a1 and a2 became 5 and 6
        assert shape_a == [("gap", None, None), ("event", 7, "after")]
        assert (gap["from_seq"], gap["to_seq"]) == (6, 6)  # one missed: b1
        assert shape_b == [("event", 5, "a1"), ("event", 6, "a2"), ("event", 7, "after")]
    else:  # a won: a1 and a2 kept 4 and 5, b1 became 6
        assert shape_b == [("gap", None, None), ("event", 7, "after")]
        assert (gap["from_seq"], gap["to_seq"]) == (5, 6)  # two missed: a1 and a2
        assert shape_a == [("event", 6, "b1"), ("event", 7, "after")]
    # The breaker guarding the link opened and closed again, in public.
    assert ("closed", "open") in changes
    assert changes[-1] == ("half_open", "closed")


async def until_seq(ws: ClientConnection, seq: int) -> list[dict[str, Any]]:
    """Events and gaps up to the event ``seq``."""
    out: list[dict[str, Any]] = []
    while True:
        (msg,) = await events(ws, 1)
        out.append(msg)
        if msg["type"] == "event" and msg["seq"] == seq:
            return out


async def breaker_until_closed(ws: ClientConnection) -> list[tuple[str, str]]:
    """The bus breaker's transitions on ``circuit_breaker`` until it closes again."""
    changes: list[tuple[str, str]] = []
    while not changes or changes[-1][1] != "closed":
        (msg,) = await events(ws, 1)
        if msg["type"] == "event" and msg["data"]["breaker"] == "bus":
            changes.append((msg["data"]["from"], msg["data"]["to"]))
    return changes


# -- in process: start without Redis, the library API --------------------------------------


def _bus_settings(url: str) -> Settings:
    return Settings.model_validate(
        {
            "server": {"port": 0},
            "bus": {
                "kind": "redis",
                "url": url,
                "breaker": {"failure_threshold": 1, "reset_timeout": 0.05},
            },
        }
    )


async def test_a_node_started_without_redis_serves_locally_then_joins(
    monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    monkeypatch.setattr(bus_module, "START_WAIT", 0.1)
    port = free_port()
    t = topic()
    async with WirestateServer(_bus_settings(f"redis://127.0.0.1:{port}/0")) as server:
        node = Node(None, server.port)
        assert (await ready(node, want=False))["status"] == "bus_down"
        async with subscriber(node, t) as (ws, _):
            assert await server.publish(t, "local") == 1
            assert [m["data"] for m in await events(ws, 1)] == ["local"]
            with own_redis(port):
                body = await ready(node)
                # The link's breaker closing goes on circuit_breaker, through the bus: sent
                # by now, or about to be.
                assert body["bus"].pop("published") in (0, 1)
                assert body["bus"] == {
                    "kind": "redis",
                    "up": True,
                    "breaker": "closed",
                    "outages": 0,
                    "attached": 1,
                    "pending": 0,
                    "read": 0,
                    "gapped": 0,
                    "fenced": 0,
                }
                # The local event entered the bus under the seq the client saw.
                assert await server.publish(t, "bus") == 2
                assert [(m["seq"], m["data"]) for m in await events(ws, 1)] == [(2, "bus")]


async def test_a_publish_made_while_the_node_reconciles_reaches_the_bus(
    monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """Published while the node reconciles: it waits for the outcome and goes to the bus
    (published locally then, it would miss the reconciliation, and the bus would give its
    seq to the next event)."""
    from redis.asyncio import Redis

    monkeypatch.setattr(bus_module, "START_WAIT", 0.1)
    port = free_port()
    t = topic()
    original = bus_module.RedisBus._reconcile

    async def reconcile(bus: bus_module.RedisBus, plans: list[Any]) -> None:
        await original(bus, plans)
        bus.submit(t, "during")  # a client's publish, in the middle of the reconnection

    async with WirestateServer(_bus_settings(f"redis://127.0.0.1:{port}/0")) as server:
        node = Node(None, server.port)
        assert (await ready(node, want=False))["status"] == "bus_down"
        async with subscriber(node, t) as (ws, _):
            assert await server.publish(t, "before") == 1
            monkeypatch.setattr(bus_module.RedisBus, "_reconcile", reconcile)
            with own_redis(port):
                await ready(node)
                assert await server.publish(t, "after") == 3
                client = Redis(host="127.0.0.1", port=port)
                try:
                    stream = await client.xrange(bus_module.stream_key(t))
                finally:
                    await client.aclose()
            assert [orjson.loads(f[b"d"]) for _, f in stream] == ["before", "during", "after"]
            got = [(m["seq"], m["data"]) for m in await events(ws, 3)]
            assert got == [(1, "before"), (2, "during"), (3, "after")]


async def test_publish_now_is_for_node_local_topics_only(redis_url: str) -> None:
    async with WirestateServer(_bus_settings(redis_url)) as server:
        with pytest.raises(ValueError, match="use `await publish"):
            server.publish_now(topic(), 1)
        assert server.publish_now("system_status", {"ok": True}) >= 1
        assert not server.bus.carries("clients")
        assert server.bus.carries(topic())


async def test_node_local_code_publishes_shared_topics_through_the_bus(redis_url: str) -> None:
    """What a node-local source publishes on a shared topic (its breaker's transitions on
    circuit_breaker) goes through the bus; its own topic stays here."""
    # Shaped like a transition: the shared Redis's circuit_breaker topic is other tests' too.
    change = {
        "breaker": f"test.{secrets.token_hex(4)}",
        "from": "closed",
        "to": "open",
        "failures": 1,
        "retry_at": None,
    }
    async with WirestateServer(_bus_settings(redis_url)) as server:
        async with subscriber(Node(None, server.port), "circuit_breaker") as (ws, _):
            assert server.publish_any("circuit_breaker", change) == 0  # the bus numbers it
            while (await events(ws, 1))[0].get("data") != change:
                pass
        assert server.publish_any("system_status", {"ok": True}) >= 1


async def test_the_bus_breaker_takes_every_key_of_its_table(redis_url: str) -> None:
    settings = Settings.model_validate(
        {
            "server": {"port": 0},
            "bus": {
                "kind": "redis",
                "url": redis_url,
                "breaker": {
                    "failure_threshold": 4,
                    "reset_timeout": 2.0,
                    "max_reset_timeout": 8.0,
                    "half_open_max_calls": 2,
                    "success_threshold": 2,
                },
            },
        }
    )
    async with WirestateServer(settings) as server:
        assert isinstance(server.bus, bus_module.RedisBus)
        config = server.bus.breaker.config
        assert (config.failure_threshold, config.reset_timeout) == (4, 2.0)
        assert (config.half_open_max_calls, config.success_threshold) == (2, 2)
        assert config.backoff is not None
        assert config.backoff.max == 8.0


async def test_an_asgi_node_and_a_websockets_node_share_the_bus(redis_url: str) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from wirestate.adapters.server.transports.asgi import WirestateASGI

    t = topic()
    asgi_hub = WirestateASGI(_bus_settings(redis_url))
    app = Starlette(routes=[Mount("/hub", app=asgi_hub)], lifespan=asgi_hub.lifespan)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_config=None)
    served = uvicorn.Server(config)
    task = asyncio.create_task(served.serve())
    try:
        await until(lambda: served.started or task.done(), WAIT)
        assert served.started
        port = served.servers[0].sockets[0].getsockname()[1]
        async with WirestateServer(_bus_settings(redis_url)) as plain:
            asgi_node = Node(None, port)
            asgi_node.url = f"ws://127.0.0.1:{port}/hub/ws"
            async with (
                subscriber(asgi_node, t) as (wa, sa),
                subscriber(Node(None, plain.port), t) as (wp, sp),
            ):
                assert sa["epoch"] == sp["epoch"]
                await plain.publish(t, "from the websockets node")
                await asgi_hub.server.publish(t, "from the ASGI node")
                for ws in (wa, wp):
                    got = [(m["seq"], m["data"]) for m in await events(ws, 2)]
                    assert got == [(1, "from the websockets node"), (2, "from the ASGI node")]
    finally:
        served.should_exit = True
        await asyncio.wait_for(task, WAIT)


async def test_a_source_added_in_code_is_shared_on_a_bus(redis_url: str) -> None:
    import redis

    server = WirestateServer(_bus_settings(redis_url))
    polled = asyncio.Event()

    async def inventory() -> dict[str, int]:
        polled.set()
        return {"widgets": 42}

    t = topic()
    server.add_source(t, inventory, interval=0.01, timeout=1.0)
    async with server:
        assert server.bus.carries(t)  # numbered by the bus, polled by its lease holder
        assert server.bus.carries("circuit_breaker")
        assert not server.bus.carries("system_status")
        node = Node(None, server.port)
        async with subscriber(node, t) as (ws, _):
            (msg,) = await events(ws, 1)
            assert msg["data"] == {"widgets": 42}
            await ws.send(orjson.dumps({"type": "publish", "topic": t, "data": 1}).decode())
            while (reply := await recv(ws, WAIT))["type"] == "event":
                pass
            assert reply["type"] == "error"
            assert reply["code"] == "forbidden"
        assert isinstance(server.bus, bus_module.RedisBus)
        wake = server.bus._wake_key
        lease = redis.Redis.from_url(redis_url).get(f"wirestate:{{{t}}}:lease")
        assert lease is not None
        assert lease.decode().split(":")[1] == server.bus.node
    assert polled.is_set()
    # The node's wake-up stream goes with it, and the lease is handed back.
    assert not redis.Redis.from_url(redis_url).exists(wake, f"wirestate:{{{t}}}:lease")


# -- topics age in Redis too ---------------------------------------------------------------


def _aging_server(redis_url: str, max_age: float) -> WirestateServer:
    return WirestateServer(
        Settings.model_validate(
            {
                "server": {"port": 0},
                "history": {"max_age": max_age},
                "bus": {"kind": "redis", "url": redis_url},
            }
        )
    )


async def _gone(client: Any, key: str) -> None:
    """Until Redis has expired ``key`` (Redis's own clock: nothing here to be told of)."""

    async def expired() -> bool:
        return not await client.exists(key)

    await until_true(expired, WAIT)


async def test_an_idle_topic_expires_in_redis_and_comes_back_in_a_new_epoch(
    redis_url: str,
) -> None:
    import redis.asyncio as aioredis

    t = topic()
    client = aioredis.Redis.from_url(redis_url)
    server = _aging_server(redis_url, 0.5)
    try:
        async with server:
            await until(lambda: server.bus.ready, WAIT)
            for i in range(3):
                assert await server.publish(t, {"n": i}) == i + 1
            meta, stream = bus_module.meta_key(t), bus_module.stream_key(t)
            assert await client.xlen(stream) == 3
            assert 0 < await client.pttl(meta) <= 500  # nobody reads it: it expires
            assert 0 < await client.pttl(stream) <= 500
            first_epoch = (await client.hget(meta, "epoch")).decode()
            await _gone(client, meta)
            await _gone(client, stream)
            assert await server.publish(t, {"n": 3}) == 1  # created again...
            assert (await client.hget(meta, "epoch")).decode() != first_epoch  # ...anew
            # A client that held seq 3 of the first epoch is told, not fed seq 1 as seq 1.
            async with subscriber(
                Node(None, server.port), t, since={t: {"seq": 3, "epoch": first_epoch}}
            ) as (ws, sub):
                assert sub["recovered"] == {t: False}
                (gap,) = await events(ws, 1)
                assert (gap["type"], gap["reason"]) == ("gap", "epoch_changed")
    finally:
        await client.aclose()


async def test_a_topic_read_by_a_node_stays_alive_and_is_trimmed_by_age(redis_url: str) -> None:
    import redis.asyncio as aioredis

    t = topic()
    client = aioredis.Redis.from_url(redis_url)
    server = _aging_server(redis_url, 0.6)
    try:
        async with server:
            await until(lambda: server.bus.ready, WAIT)
            node = Node(None, server.port)
            async with subscriber(node, t) as (ws, sub):
                await server.publish(t, {"n": 1})
                (first,) = await events(ws, 1)
                assert first["seq"] == 1
                meta, stream = bus_module.meta_key(t), bus_module.stream_key(t)

                # Past the max age several times over: the entry has aged out of the
                # stream, but the topic, read here, is kept alive (same epoch, same count).
                async def trimmed() -> bool:
                    return not await client.xlen(stream)

                await until_true(trimmed, WAIT)
                await asyncio.sleep(1.5)  # 2.5 max ages with nothing published: the workload
                assert await client.exists(meta)
                assert await server.publish(t, {"n": 2}) == 2
                (second,) = await events(ws, 1)
                assert (second["seq"], sub["epoch"][t]) == (
                    2,
                    (await client.hget(meta, "epoch")).decode(),
                )
    finally:
        await client.aclose()
