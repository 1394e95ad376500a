"""Shutdown always ends: a real ``wirestate serve`` gets SIGTERM in the middle of a storm of
connects, and must exit 0 within the close timeout plus 2 s, every client having been told
1001 (cause ``shutdown``) or refused before its upgrade completed, whatever the moment.
"""

from __future__ import annotations

import asyncio
import random
import signal
from collections import Counter

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from wirestate.testing.net import WAIT, serve_process

CLIENTS = 300
CLOSE_TIMEOUT = 0.5


async def _client(
    url: str, start: asyncio.Event, connected: list[int], enough: int, reached: asyncio.Event
) -> str:
    """One client: connect, then read until the server closes. Returns how it ended."""
    await start.wait()
    try:
        ws = await connect(url, open_timeout=WAIT, ping_interval=None, compression=None)
    except InvalidStatus as exc:
        return f"refused {exc.response.status_code}"
    except (OSError, InvalidHandshake, TimeoutError):
        return "refused"  # the listener had stopped, or cut the handshake short
    connected[0] += 1
    if connected[0] == enough:
        reached.set()
    try:
        async with asyncio.timeout(WAIT):
            async for _ in ws:
                pass
    except ConnectionClosed:
        pass
    return f"closed {ws.close_code} {ws.close_reason}"


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_sigterm_during_a_storm_of_connects_ends_within_the_close_timeout(
    seed: int,
) -> None:
    rng = random.Random(seed)
    async with serve_process("--close-timeout", str(CLOSE_TIMEOUT)) as served:
        connected = [0]
        # Every client starts at once; the signal lands once a seeded number of them is
        # connected, so the others are still in their TCP connect, their upgrade, or about
        # to register when shutdown begins.
        start, reached = asyncio.Event(), asyncio.Event()
        enough = rng.randrange(10, CLIENTS // 2)
        tasks = [
            asyncio.create_task(_client(served.url, start, connected, enough, reached))
            for _ in range(CLIENTS)
        ]
        start.set()
        async with asyncio.timeout(WAIT):
            await reached.wait()
        served.proc.send_signal(signal.SIGTERM)
        signalled = asyncio.get_running_loop().time()
        status = await served.exited(CLOSE_TIMEOUT + 2 + WAIT)
        elapsed = asyncio.get_running_loop().time() - signalled
        outcomes = Counter(await asyncio.gather(*tasks))
    assert status == 0
    assert elapsed <= CLOSE_TIMEOUT + 2, f"exit took {elapsed:.2f} s"
    allowed = {"closed 1001 shutdown", "refused 503", "refused"}
    assert set(outcomes) <= allowed, outcomes
    assert outcomes["closed 1001 shutdown"] == connected[0]
    assert sum(outcomes.values()) == CLIENTS
    assert any(r.get("msg") == "stopped" for r in served.logs)
