"""Three `wirestate serve` nodes on one Redis share one HTTP source: one poller, one breaker,
one numbering, and a clean takeover when the leader is killed while the upstream is down.

The figures a run measured are printed (``pytest -s``) as ``figure: name = value``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import signal
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.exceptions import ConnectionClosed

from wirestate.testing.net import recv, until, until_true

from .conftest import Node, Upstream, metric, nodes, ready, subscriber

TTL = 1.5
INTERVAL = 0.05


def figure(name: str, value: float) -> None:
    print(f"figure: {name} = {value:.3f}")


@dataclass
class Feed:
    """Everything one subscriber received, in order, with when it arrived."""

    node: Node
    got: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    closed: bool = False

    def on(self, topic: str) -> list[dict[str, Any]]:
        return [m for _, m in self.got if m.get("topic") == topic and m["type"] in ("event", "gap")]


@asynccontextmanager
async def feeds(ns: list[Node], *topics: str) -> AsyncIterator[list[Feed]]:
    async def read(ws: Any, feed: Feed) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                feed.got.append((time.monotonic(), await recv(ws, 3600)))
        feed.closed = True

    async with AsyncExitStack() as stack:
        out: list[Feed] = []
        tasks = []
        for node in ns:
            ws, _ = await stack.enter_async_context(subscriber(node, *topics))
            feed = Feed(node)
            out.append(feed)
            tasks.append(asyncio.create_task(read(ws, feed)))
        try:
            yield out
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def leaders(ns: list[Node], source: str) -> list[Node]:
    found = []
    for node in ns:
        if await metric(node, "wirestate_source_leader", source=source) == 1:
            found.append(node)
    return found


def check_numbering(msgs: list[dict[str, Any]]) -> None:
    """Every event's seq follows the one before, or a gap said what was skipped; none twice."""
    last = None
    for m in msgs:
        if m["type"] == "gap":
            assert m["reason"] == "bus_outage", m
            assert last is None or m["from_seq"] == last + 1, (last, m)
            last = m["to_seq"]
            continue
        assert last is None or m["seq"] == last + 1, (last, m)
        last = m["seq"]


async def test_one_poller_one_breaker_one_numbering_and_a_clean_takeover(
    tmp_path: Path, redis_url: str, upstream: Upstream
) -> None:
    source = f"test.shared.{secrets.token_hex(4)}"
    extra = (
        f'\n[[sources]]\ntopic = "{source}"\nkind = "http"\nurl = "{upstream.url}"\n'
        f"interval = {INTERVAL}\ntimeout = 0.5\n[sources.breaker]\n"
        "failure_threshold = 3\nreset_timeout = 60.0\n"
    )
    with nodes(tmp_path, redis_url, 3, extra=extra, lease_ttl=TTL) as ns:
        for node in ns:
            await ready(node)
        async with feeds(ns, source, "circuit_breaker") as subs:
            # -- one poller for three nodes ----------------------------------------------
            await until(lambda: upstream.requests >= 10)
            start = upstream.requests
            window = 1.0
            t0 = time.monotonic()
            await asyncio.sleep(window)  # a measurement window, not a wait for a result
            calls = [t for t in upstream.times[start:] if t <= t0 + window]
            intervals = [b - a for a, b in itertools.pairwise(upstream.times[start:])]
            figure("upstream calls per interval, 3 nodes", len(calls) * INTERVAL / window)
            figure("median call interval across nodes (s)", statistics.median(intervals))
            assert len(calls) <= 1.5 * window / INTERVAL  # three pollers would make 3x
            assert statistics.median(intervals) > INTERVAL * 0.6
            assert len(await leaders(ns, source)) == 1
            # One numbering: every node's subscriber saw the same event under each seq.
            await until(lambda: all(len(f.on(source)) >= 5 for f in subs))
            seen = [{m["seq"]: (m["data"], m["stale"]) for m in f.on(source)} for f in subs]
            common = set(seen[0]) & set(seen[1]) & set(seen[2])
            assert len(common) >= 3
            assert all(s[k] == seen[0][k] for s in seen for k in common)

            # -- the upstream goes down: one breaker opens, once ------------------------
            upstream.up = False

            def opened(f: Feed) -> list[dict[str, Any]]:
                return [
                    m
                    for m in f.on("circuit_breaker")
                    if m["type"] == "event" and m["data"].get("breaker") == source
                ]

            await until(lambda: all(opened(f) for f in subs))
            (change,) = {(m["seq"], m["data"]["from"], m["data"]["to"]) for f in subs
                         for m in opened(f)}  # fmt: skip
            assert change[1:] == ("closed", "open")
            calls_when_open = upstream.requests
            await until(lambda: all(f.on(source)[-1].get("age") is not None for f in subs))
            last_good = next(m["data"] for m in reversed(subs[0].on(source)) if not m["stale"])

            # -- the leader dies; another takes over within the ttl ----------------------
            (leader,) = await leaders(ns, source)
            survivors = [f for f in subs if f.node is not leader]
            assert leader.proc is not None
            killed = time.monotonic()
            leader.proc.send_signal(signal.SIGKILL)
            new: list[Node] = []

            async def taken() -> bool:
                new[:] = await leaders([f.node for f in survivors], source)
                return bool(new)

            await until_true(taken, every=0.01)
            took = time.monotonic() - killed
            figure("takeover after SIGKILL (s)", took)
            assert took <= TTL + 0.5
            assert len(new) == 1
            # Subscribers keep getting the stale value, its age growing, from the new leader.
            after = [len(f.on(source)) for f in survivors]
            await until(
                lambda: all(
                    len(f.on(source)) >= n + 10 for f, n in zip(survivors, after, strict=True)
                )
            )
            silence = max(
                b - a
                for f in survivors
                for (a, m1), (b, m2) in itertools.pairwise(
                    [(t, m) for t, m in f.got if m.get("topic") == source]
                )
                if a >= killed - 1.0
            )
            figure("longest silence on the source topic around the takeover (s)", silence)

    for f in survivors:
        msgs = f.on(source)
        check_numbering(msgs)
        stale = [m for m in msgs if m["type"] == "event" and m["stale"] and "age" in m]
        assert stale, msgs[-5:]
        assert all(m["data"] == last_good for m in stale[-10:])
        ages = [m["age"] for m in stale]
        assert ages == sorted(ages)  # the age of one cached value, across both leaders
        # The breaker taken over stayed open: no call, no second transition.
        assert [(m["data"]["from"], m["data"]["to"]) for m in opened(f)] == [("closed", "open")]
    assert upstream.requests == calls_when_open
