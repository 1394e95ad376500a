"""Delivery properties under injected faults, end to end (the delivery promise).

Subscribers connect through a seeded fault proxy that cuts and stalls their connections at
random while events are published; the real server sits behind it. For every subscriber:

* the seqs it receives strictly increase (no event twice, never out of order);
* every seq published while it was subscribed is either received or inside a ``Gap``;
* after the faults stop, it is back and current within a bounded time;

and on the server, no client is unregistered while its writer task still runs (checked
live, on the adapter's tasks, not on the core's own bookkeeping).

CI runs fixed seeds. A longer randomized run:
``WIRESTATE_FAULT_SEEDS=random:20 WIRESTATE_FAULT_EVENTS=2000 python -m pytest
tests/integration/test_delivery_under_faults.py -s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from wirestate.adapters.client.subscriber import Backoff, Event, Gap, connect
from wirestate.adapters.server.service import WirestateServer
from wirestate.adapters.tools.faults import FaultProxy
from wirestate.models.settings import Settings
from wirestate.testing.net import until

WAIT = 20.0


def _seeds() -> list[int]:
    spec = os.environ.get("WIRESTATE_FAULT_SEEDS", "1,2")
    if spec.startswith("random:"):
        return [random.randrange(1 << 30) for _ in range(int(spec.split(":", 1)[1]))]
    return [int(s) for s in spec.split(",")]


EVENTS = int(os.environ.get("WIRESTATE_FAULT_EVENTS", "600"))
SUBSCRIBERS = 5


@dataclass
class Received:
    seqs: list[int] = field(default_factory=list)
    gaps: list[tuple[int, int]] = field(default_factory=list)
    restarts: int = 0


async def consume(url: str, into: Received, final: int, done: asyncio.Event) -> None:
    backoff = Backoff(base=0.01, cap=0.1, attempts=None)
    async with connect(url, topics=["t"], backoff=backoff) as sub:
        async for item in sub:
            match item:
                case Event(seq=seq):
                    into.seqs.append(seq)
                    if seq >= final:
                        break
                case Gap(from_seq=None):
                    into.restarts += 1
                case Gap(from_seq=int(lo), to_seq=int(hi)):
                    into.gaps.append((lo, hi))
                    if hi >= final:
                        break
    done.set()


@pytest.mark.parametrize("history", [100_000, 20], ids=["history-holds-all", "history-20"])
@pytest.mark.parametrize("seed", _seeds())
async def test_every_event_arrives_once_in_order_or_inside_a_gap(seed: int, history: int) -> None:
    settings = Settings.model_validate(
        {
            "server": {
                "port": 0,
                "ping_interval": 0.05,
                "ping_timeout": 0.1,
                "close_timeout": 0.3,
                "loop_stall_threshold": 0.05,
            },
            "history": {"size": history},
        }
    )
    server = WirestateServer(settings, epoch=f"seed{seed}")
    early: list[str] = []
    async with server:
        assert server.hub is not None
        hub = server.hub
        real_unregister = hub.unregister

        def checked_unregister(conn: Any, now: float) -> None:
            client = server.sessions.get(conn.client_id)
            if client is not None and client.writer is not None and not client.writer.done():
                early.append(conn.client_id)
            real_unregister(conn, now)

        hub.unregister = checked_unregister  # type: ignore[method-assign]
        async with FaultProxy("127.0.0.1", server.port, seed=seed) as proxy:
            url = f"ws://127.0.0.1:{proxy.port}/ws"
            final = EVENTS + 1  # the marker published once the faults stop
            received = [Received() for _ in range(SUBSCRIBERS)]
            dones = [asyncio.Event() for _ in range(SUBSCRIBERS)]
            consumers = [
                asyncio.create_task(consume(url, received[i], final, dones[i]))
                for i in range(SUBSCRIBERS)
            ]
            try:

                def all_subscribed() -> bool:
                    topic = hub.topics.get("t")
                    return topic is not None and len(topic.subscribers) >= SUBSCRIBERS

                await until(all_subscribed, WAIT)  # no event for this count
                proxy.chaos(cut_rate=0.15, stall_rate=0.15, max_stall=0.2, interval=0.02)
                for i in range(EVENTS):
                    await server.publish("t", {"i": i})
                    await asyncio.sleep(0.002)
                await proxy.stop_chaos()
                await server.publish("t", {"final": True})
                # Back and current within a bound once the faults stop.
                async with asyncio.timeout(WAIT):
                    await asyncio.gather(*(d.wait() for d in dones))
            finally:
                for task in consumers:
                    task.cancel()
                for task in consumers:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            faults = [f for f in proxy.log if f.source == "chaos"]

    cuts = sum(1 for f in faults if f.kind == "cut")
    stalls = sum(1 for f in faults if f.kind == "stall")
    delivered = sum(len(r.seqs) for r in received)
    gapped = sum(hi - lo + 1 for r in received for lo, hi in r.gaps)
    print(
        f"seed {seed}, history {history}: {cuts} cuts, {stalls} stalls, {final} events published, "
        f"{delivered} delivered to {SUBSCRIBERS} subscribers, {gapped} in gaps"
    )
    assert cuts + stalls > 0, "the chaos injected nothing; the test proves nothing"
    assert early == [], f"unregistered while the writer still ran: {early}"
    if history >= final:
        assert gapped == 0, "the history held everything: nothing may be reported lost"
    for r in received:
        assert r.restarts == 0
        assert r.seqs == sorted(set(r.seqs)), "an event arrived twice or out of order"
        covered = set(r.seqs)
        for lo, hi in r.gaps:
            covered.update(range(lo, hi + 1))
        assert covered >= set(range(1, final + 1)), (
            f"missing without a gap: {sorted(set(range(1, final + 1)) - covered)[:10]}"
        )
