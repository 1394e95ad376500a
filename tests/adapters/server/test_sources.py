"""Pollers against a real HTTP upstream on 127.0.0.1, through httpx, with millisecond timings.

The upstream is a minimal HTTP/1.1 responder written here on `asyncio.start_server`, driven
per request (JSON, 500, invalid JSON, hang, close) and counting the requests it receives, so
"no upstream call while open" is checked where the calls would land. Tests wait on events
with bounded timeouts; the only sleeps are inside fakes that play a slow upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from wirestate.adapters.server.sources import (
    BREAKER_TOPIC,
    SourcePoller,
    SystemStatus,
    UpstreamJSONError,
    UpstreamStatusError,
    UpstreamTooLargeError,
    http_fetch,
    poller_from_settings,
    system_status_fetch,
)
from wirestate.core.breaker import (
    Backoff,
    Breaker,
    BreakerConfig,
    BreakerState,
    CachedSource,
    CacheEntry,
    PollReason,
    StateChanged,
)
from wirestate.models.settings import BreakerSettings, SourceSettings

WAIT = 3.0  # bound on every wait for something the poller should do within milliseconds
ISO_MS_Z = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"

# --------------------------------------------------------------------------- the upstream


class Upstream:
    """A tiny HTTP/1.1 server: one response per connection (``Connection: close``).

    Each request takes the next mode from `script`, else `mode`: ``json`` answers
    ``{"n": <request number>}`` (so a value names the request that produced it), ``500``,
    ``invalid`` (200 with a body that is not JSON), ``hang`` (never answers until teardown),
    ``close`` (drops the connection without a response).
    """

    def __init__(self) -> None:
        self.mode = "json"
        self.script: deque[str] = deque()
        self.requests = 0
        self.arrived = asyncio.Event()
        self.url = ""
        self._release = asyncio.Event()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/status"

    async def stop(self) -> None:
        self._release.set()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=WAIT)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._respond(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client gave up (its timeout): nothing left to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._handlers.discard(task)

    async def _respond(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        self.requests += 1
        n = self.requests
        self.arrived.set()
        mode = self.script.popleft() if self.script else self.mode
        if mode == "hang":
            await self._release.wait()
            return
        if mode == "close":
            return
        status, body = {
            "json": (200, orjson.dumps({"n": n})),
            "500": (500, b'{"error": "boom"}'),
            "invalid": (200, b"{not json"),
        }[mode]
        head = (
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as http:
        yield http


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Published:
    topic: str
    data: Any
    stale: bool
    age: float | None
    requests: int  # the upstream's request count at the moment of publication


class Recorder:
    """A Publisher that records every publication and lets a test wait for a condition."""

    def __init__(self, probe: Callable[[], int] = lambda: 0) -> None:
        self.events: list[Published] = []
        self._probe = probe
        self._changed = asyncio.Event()

    def publish(
        self, topic: str, data: Any, *, stale: bool = False, age: float | None = None
    ) -> int:
        self.events.append(Published(topic, data, stale, age, self._probe()))
        self._changed.set()
        return len(self.events)

    def on(self, topic: str) -> list[Published]:
        return [e for e in self.events if e.topic == topic]

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        async def watch() -> None:
            while not condition():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(watch(), WAIT)


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def running(poller: SourcePoller) -> AsyncIterator[asyncio.Task[None]]:
    """Own the poller's task: cancel it on exit and check that the cancellation propagated."""
    task = asyncio.create_task(poller.run())
    try:
        yield task
    finally:
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=WAIT)
        assert task in done
        assert task.cancelled()


def transitions(rec: Recorder) -> list[tuple[str, str]]:
    return [(e.data["from"], e.data["to"]) for e in rec.on(BREAKER_TOPIC)]


async def failing() -> Any:
    raise RuntimeError("upstream down")


def http_poller(
    url: str,
    client: httpx.AsyncClient,
    rec: Recorder,
    *,
    clock: Callable[[], float] | None = None,
    interval: float = 0.02,
    timeout: float = 0.5,
    **breaker: Any,
) -> SourcePoller:
    return SourcePoller(
        "agent_status",
        http_fetch(url, client),
        publisher=rec,
        interval=interval,
        timeout=timeout,
        clock=clock if clock is not None else asyncio.get_running_loop().time,
        config=BreakerConfig(**breaker),
    )


# --------------------------------------------------------------------------- the scenario


async def test_open_serves_stale_without_upstream_calls_then_half_opens_and_recovers(
    upstream: Upstream, client: httpx.AsyncClient
) -> None:
    loop = asyncio.get_running_loop()
    rec = Recorder(probe=lambda: upstream.requests)
    seen: list[StateChanged] = []
    poller = SourcePoller(
        "agent_status",
        http_fetch(upstream.url, client),
        publisher=rec,
        interval=0.02,
        timeout=0.5,
        clock=loop.time,
        wall_offset=time.time() - loop.time(),
        config=BreakerConfig(failure_threshold=5, reset_timeout=0.2),
        on_transition=seen.append,
    )
    async with running(poller):
        await rec.wait_until(lambda: len(rec.on("agent_status")) >= 1)
        # Exactly five failures, then healthy again: the trial after reset_timeout succeeds
        # however late this test task gets to run.
        upstream.script.extend(["500"] * 5)
        await rec.wait_until(lambda: len(rec.on(BREAKER_TOPIC)) >= 3)
        await rec.wait_until(lambda: not rec.on("agent_status")[-1].stale)
    snap = poller.snapshot()

    assert transitions(rec) == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    assert [(c.from_state.value, c.to_state.value) for c in seen] == transitions(rec)
    opened, half_opened, closed = rec.on(BREAKER_TOPIC)
    assert opened.data["failures"] == 5
    assert opened.data["retry_at"] is not None
    assert half_opened.data["retry_at"] is None
    assert closed.data["retry_at"] is None

    # No upstream call between the opening and the trial (the trial is made after the
    # half_open event is published).
    assert half_opened.requests == opened.requests

    topic = rec.on("agent_status")
    i_open, i_half = rec.events.index(opened), rec.events.index(half_opened)
    # The tick whose failure opened the breaker publishes its stale value after the event;
    # every later one until the trial was rejected without a call.
    while_open = [e for e in rec.events[i_open:i_half] if e.topic == "agent_status"]
    # reset_timeout / interval = 10 ticks; a loaded machine may run fewer, never none.
    assert len(while_open) >= 1 + 3
    assert {e.requests for e in while_open} == {opened.requests}

    last_good = [e for e in rec.events[:i_open] if e.topic == "agent_status" and not e.stale][-1]
    stale = [e for e in topic if e.stale]
    assert len(stale) >= 5 + 3  # each failed tick and each open tick served the cached value
    assert all(e.data == last_good.data for e in stale)
    ages = [e.age for e in stale if e.age is not None]
    assert len(ages) == len(stale)
    assert all(a > 0 for a in ages)
    assert ages == sorted(ages)
    assert len(set(ages)) == len(ages)  # strictly growing

    # Fresh again: the value came from the trial request, the one after the opening.
    recovered = next(e for e in rec.events[i_half:] if e.topic == "agent_status")
    assert not recovered.stale
    assert recovered.data == {"n": opened.requests + 1}

    # One publication per tick; every request is accounted for as a success or a failure.
    assert len(topic) == snap.ticks
    assert snap.failures == 5
    assert snap.upstream_calls == snap.successes + snap.failures == upstream.requests
    assert snap.rejections == len(while_open) - 1
    assert snap.state == "closed"


async def test_no_cached_value_publishes_an_unavailable_status(
    upstream: Upstream, client: httpx.AsyncClient
) -> None:
    upstream.mode = "500"
    rec = Recorder()
    poller = http_poller(upstream.url, client, rec, failure_threshold=2, reset_timeout=10.0)
    async with running(poller):
        await rec.wait_until(lambda: len(rec.on("agent_status")) >= 3)
    first, second, third = rec.on("agent_status")[:3]
    assert first.data == {
        "status": "unavailable",
        "reason": "upstream_error",
        "state": "closed",
        "retry_after": 0.0,
        "error": "UpstreamStatusError",
    }
    assert (first.stale, first.age) == (False, None)  # a status, not a value served stale
    assert second.data["state"] == "open"
    assert second.data["retry_after"] == pytest.approx(10.0)
    assert third.data["reason"] == "circuit_open"
    assert third.data["error"] is None
    assert 9.0 < third.data["retry_after"] < 10.0
    assert not any(e.stale or e.age is not None for e in (first, second, third))
    assert upstream.requests == 2  # the third tick made no call


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("mode", "reason", "error"),
    [
        ("500", PollReason.UPSTREAM_ERROR, "UpstreamStatusError"),
        ("invalid", PollReason.UPSTREAM_ERROR, "UpstreamJSONError"),
        ("close", PollReason.UPSTREAM_ERROR, "RemoteProtocolError"),
        ("hang", PollReason.TIMEOUT, "TimeoutError"),
    ],
)
async def test_each_kind_of_upstream_trouble_is_a_counted_failure_served_stale(
    upstream: Upstream, client: httpx.AsyncClient, mode: str, reason: PollReason, error: str
) -> None:
    rec = Recorder()
    poller = http_poller(upstream.url, client, rec, timeout=0.05, failure_threshold=2)
    good = await poller.poll_once()
    assert (good.reason, good.value) == (PollReason.FRESH, {"n": 1})

    upstream.mode = mode
    started = time.monotonic()
    bad = await poller.poll_once()
    assert time.monotonic() - started < 1.0  # bounded by the 50 ms timeout, not by the hang
    assert (bad.reason, bad.error, bad.value, bad.stale) == (reason, error, {"n": 1}, True)
    assert poller.breaker.consecutive_failures == 1
    assert poller.snapshot().failures == 1
    assert rec.on("agent_status")[-1] == Published("agent_status", {"n": 1}, True, bad.age, 0)

    await poller.poll_once()  # the second failure reaches the threshold
    assert transitions(rec) == [("closed", "open")]
    assert rec.on(BREAKER_TOPIC)[0].data["failures"] == 2


async def test_http_fetch_errors_carry_status_and_no_url(
    upstream: Upstream, client: httpx.AsyncClient
) -> None:
    upstream.mode = "500"
    with pytest.raises(UpstreamStatusError) as status:
        await http_fetch(upstream.url, client)()
    assert status.value.status == 500
    assert upstream.url not in str(status.value)

    upstream.mode = "invalid"
    with pytest.raises(UpstreamJSONError):
        await http_fetch(upstream.url, client)()

    upstream.mode = "json"
    with pytest.raises(UpstreamTooLargeError):
        await http_fetch(upstream.url, client, max_bytes=4)()
    assert await http_fetch(upstream.url, client)() == {"n": 4}


# --------------------------------------------------------------------------- cancellation


async def test_cancelling_run_during_a_call_propagates_promptly_and_counts_nothing(
    upstream: Upstream, client: httpx.AsyncClient
) -> None:
    upstream.mode = "hang"
    rec = Recorder()
    poller = http_poller(upstream.url, client, rec, timeout=5.0, failure_threshold=1)
    task = asyncio.create_task(poller.run())
    await asyncio.wait_for(upstream.arrived.wait(), WAIT)
    started = time.monotonic()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=WAIT)
    assert task in done
    assert task.cancelled()
    assert time.monotonic() - started < 0.5  # not the 5 s call timeout

    snap = poller.snapshot()
    assert (snap.upstream_calls, snap.failures, snap.consecutive_failures) == (1, 0, 0)
    assert (snap.state, snap.running) == ("closed", False)
    assert rec.events == []  # the interrupted tick published nothing


async def test_a_cancelled_trial_releases_its_permit_uncounted(
    upstream: Upstream, client: httpx.AsyncClient
) -> None:
    clock = FakeClock()
    rec = Recorder()
    poller = http_poller(
        upstream.url, client, rec, clock=clock, timeout=5.0, failure_threshold=1, reset_timeout=1.0
    )
    upstream.mode = "500"
    await poller.poll_once()
    clock.now += 1.0
    upstream.mode = "hang"
    upstream.arrived.clear()
    trial = asyncio.create_task(poller.poll_once())
    await asyncio.wait_for(upstream.arrived.wait(), WAIT)
    trial.cancel()
    await asyncio.wait({trial}, timeout=WAIT)
    assert trial.cancelled()
    assert poller.breaker.state is BreakerState.HALF_OPEN
    assert poller.breaker.snapshot(clock.now).trials_in_flight == 0

    upstream.mode = "json"
    result = await poller.poll_once()  # the slot is free again: a new trial, which succeeds
    assert result.reason is PollReason.FRESH
    assert transitions(rec) == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


# --------------------------------------------------------------------------- the events


async def test_circuit_breaker_payload_is_exactly_the_design_shape() -> None:
    clock = FakeClock(1000.0)
    rec = Recorder()
    seen: list[StateChanged] = []
    outcome: list[Callable[[], Any]] = [failing]

    async def fetch() -> Any:
        return await outcome[0]()

    poller = SourcePoller(
        "agent_status",
        fetch,
        publisher=rec,
        interval=1.0,
        timeout=1.0,
        clock=clock,
        wall_offset=1_700_000_000.0 - 1000.0,  # monotonic 1000 is 2023-11-14T22:13:20Z
        config=BreakerConfig(failure_threshold=2, reset_timeout=12.5),
        on_transition=seen.append,
    )
    await poller.poll_once()
    clock.now = 1001.0
    await poller.poll_once()
    clock.now = 1013.5

    async def healthy() -> Any:
        return {"ok": True}

    outcome[0] = healthy
    await poller.poll_once()

    assert [e.data for e in rec.on(BREAKER_TOPIC)] == [
        {
            "breaker": "agent_status",
            "from": "closed",
            "to": "open",
            "failures": 2,
            "retry_at": "2023-11-14T22:13:33.500Z",
        },
        {
            "breaker": "agent_status",
            "from": "open",
            "to": "half_open",
            "failures": 2,
            "retry_at": None,
        },
        {
            "breaker": "agent_status",
            "from": "half_open",
            "to": "closed",
            "failures": 0,
            "retry_at": None,
        },
    ]
    assert all(e.stale is False and e.age is None for e in rec.on(BREAKER_TOPIC))
    # The hook sees each transition once, in order, as the core's values.
    assert [(c.from_state, c.to_state, c.at) for c in seen] == [
        (BreakerState.CLOSED, BreakerState.OPEN, 1001.0),
        (BreakerState.OPEN, BreakerState.HALF_OPEN, 1013.5),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED, 1013.5),
    ]


async def test_forced_open_has_no_retry_time_and_serves_unavailable() -> None:
    clock = FakeClock()
    rec = Recorder()
    poller = SourcePoller("jobs", failing, publisher=rec, interval=1.0, timeout=1.0, clock=clock)
    poller.breaker.force_open(clock.now)  # an operator's input: published at the next drain
    result = await poller.poll_once()
    assert result.reason is PollReason.FORCED_OPEN
    assert [e.data for e in rec.on(BREAKER_TOPIC)] == [
        {"breaker": "jobs", "from": "closed", "to": "forced_open", "failures": 0, "retry_at": None}
    ]
    assert rec.on("jobs")[0].data == {
        "status": "unavailable",
        "reason": "forced_open",
        "state": "forced_open",
        "retry_after": None,
        "error": None,
    }
    assert poller.snapshot().upstream_calls == 0


async def test_a_raising_hook_or_publisher_never_stops_polling() -> None:
    class Broken:
        def __init__(self) -> None:
            self.calls = 0
            self.enough = asyncio.Event()

        def publish(
            self, topic: str, data: Any, *, stale: bool = False, age: float | None = None
        ) -> int:
            self.calls += 1
            if self.calls >= 4:
                self.enough.set()
            raise TypeError("not serializable")

    def hook(change: StateChanged) -> None:
        raise RuntimeError("metrics down")

    broken = Broken()
    poller = SourcePoller(
        "jobs",
        failing,
        publisher=broken,
        interval=0.01,
        timeout=1.0,
        clock=asyncio.get_running_loop().time,
        config=BreakerConfig(failure_threshold=1, reset_timeout=10.0),
        on_transition=hook,
    )
    async with running(poller):
        await asyncio.wait_for(broken.enough.wait(), WAIT)
    snap = poller.snapshot()
    # Every publication raised (one per tick, one for the opening) and so did the hook, once.
    assert broken.calls == snap.ticks + 1
    assert snap.internal_errors == broken.calls + 1
    assert snap.state == "open"


# --------------------------------------------------------------------------- scheduling


async def test_an_overrunning_tick_skips_missed_slots_instead_of_bursting() -> None:
    loop = asyncio.get_running_loop()
    starts: list[float] = []
    enough = asyncio.Event()

    async def slow_first() -> Any:
        starts.append(loop.time())
        if len(starts) == 1:
            await asyncio.sleep(0.11)  # plays an upstream slower than two intervals
        if len(starts) >= 4:
            enough.set()
        return {"n": len(starts)}

    poller = SourcePoller(
        "s", slow_first, publisher=Recorder(), interval=0.05, timeout=1.0, clock=loop.time
    )
    async with running(poller):
        await asyncio.wait_for(enough.wait(), WAIT)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    tolerance = 0.01  # the loop may wake a clock resolution early
    assert gaps[0] >= 0.15 - tolerance  # slots at 0.05 and 0.10 were passed over
    assert all(gap >= 0.05 - tolerance for gap in gaps)  # never a burst
    assert poller.snapshot().skipped_ticks >= 2


def test_interval_and_timeout_must_be_positive_and_finite() -> None:
    for bad in (0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="interval"):
            SourcePoller(
                "s", failing, publisher=Recorder(), interval=bad, timeout=1.0, clock=time.monotonic
            )
        with pytest.raises(ValueError, match="timeout"):
            SourcePoller(
                "s", failing, publisher=Recorder(), interval=1.0, timeout=bad, clock=time.monotonic
            )


async def test_a_prebuilt_source_keeps_its_breaker_and_cache() -> None:
    clock = FakeClock()
    breaker = Breaker("named", BreakerConfig(failure_threshold=1))
    primed = CachedSource(breaker, cached=CacheEntry({"n": 0}, fetched_at=990.0))
    rec = Recorder()
    poller = SourcePoller(
        "jobs", failing, publisher=rec, interval=1.0, timeout=1.0, clock=clock, source=primed
    )
    assert poller.source is primed
    result = await poller.poll_once()
    assert (result.value, result.stale, result.age) == ({"n": 0}, True, 10.0)
    assert rec.on(BREAKER_TOPIC)[0].data["breaker"] == "named"
    with pytest.raises(ValueError, match="not both"):
        SourcePoller(
            "jobs",
            failing,
            publisher=rec,
            interval=1.0,
            timeout=1.0,
            clock=clock,
            config=BreakerConfig(),
            source=CachedSource(Breaker("x")),
        )


async def test_run_twice_at_once_is_refused() -> None:
    rec = Recorder()
    poller = SourcePoller(
        "s",
        failing,
        publisher=rec,
        interval=10.0,
        timeout=1.0,
        clock=asyncio.get_running_loop().time,
    )
    async with running(poller):
        await rec.wait_until(lambda: len(rec.events) >= 1)  # run() has started
        with pytest.raises(RuntimeError, match="already running"):
            await poller.run()


# --------------------------------------------------------------------------- system status


async def test_system_status_reports_sane_numbers_for_this_host() -> None:
    status = SystemStatus()
    first, second = await status(), await status()
    for got in (first, second, await system_status_fetch()):
        assert set(got) == {"cpu", "memory", "load", "uptime"}
        assert got["cpu"]["source"] == "proc_stat"
        assert 0.0 <= got["cpu"]["percent"] <= 100.0
        assert got["cpu"]["count"] >= 1
        memory = got["memory"]
        assert 0 < memory["available"] <= memory["total"]
        assert memory["used"] == memory["total"] - memory["available"]
        assert 0.0 <= memory["percent"] <= 100.0
        assert all(got["load"][k] >= 0.0 for k in ("1m", "5m", "15m"))
        assert got["uptime"] > 0
        assert orjson.loads(orjson.dumps(got)) == got  # JSON-able as it is


def test_system_status_measures_cpu_between_calls(tmp_path: Path) -> None:
    (tmp_path / "meminfo").write_text(
        "MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    250 kB\n"
    )
    (tmp_path / "uptime").write_text("123.45 200.00\n")
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n")
    status = SystemStatus(tmp_path)
    assert status.read()["cpu"]["percent"] == 20.0  # since boot: 200 busy of 1000
    stat.write_text("cpu  150 0 150 800 100 0 0 0 50 0\ncpu0 1 2 3 4\n")
    got = status.read()
    assert got["cpu"] == {"percent": 50.0, "count": got["cpu"]["count"], "source": "proc_stat"}
    assert status.read()["cpu"]["percent"] == 50.0  # no time passed: the last figure stands
    assert got["memory"] == {
        "total": 1_024_000,
        "available": 256_000,
        "used": 768_000,
        "percent": 75.0,
    }
    assert got["uptime"] == 123.45


def test_system_status_without_proc_falls_back_to_loadavg(tmp_path: Path) -> None:
    got = SystemStatus(tmp_path / "missing").read()
    assert got["cpu"]["source"] == "loadavg"
    assert 0.0 <= got["cpu"]["percent"] <= 100.0
    assert got["memory"] == {"total": None, "available": None, "used": None, "percent": None}
    assert got["uptime"] is None


# --------------------------------------------------------------------------- settings


async def test_poller_from_settings_maps_kind_and_breaker(
    upstream: Upstream, client: httpx.AsyncClient
) -> None:
    settings = SourceSettings(
        kind="http",
        topic="agents",
        url=upstream.url,
        interval=0.5,
        timeout=0.25,
        breaker=BreakerSettings(
            failure_threshold=3,
            reset_timeout=7.0,
            max_reset_timeout=60.0,
            half_open_max_calls=2,
            success_threshold=2,
        ),
    )
    rec = Recorder()
    poller = poller_from_settings(settings, rec, time.monotonic, 5.0, client)
    assert (poller.topic, poller.interval, poller.timeout, poller.wall_offset) == (
        "agents",
        0.5,
        0.25,
        5.0,
    )
    assert poller.breaker.name == "agents"
    config = poller.breaker.config
    assert (
        config.failure_threshold,
        config.reset_timeout,
        config.half_open_max_calls,
        config.success_threshold,
        config.call_timeout,
    ) == (3, 7.0, 2, 2, 0.25)
    assert config.backoff == Backoff(multiplier=2.0, max=60.0)
    assert (await poller.poll_once()).value == {"n": 1}  # it really polls the url

    plain = poller_from_settings(
        SourceSettings(kind="http", topic="a", url=upstream.url), rec, time.monotonic, 0.0, client
    )
    assert plain.breaker.config.backoff is None
    assert (plain.breaker.config.failure_threshold, plain.breaker.config.reset_timeout) == (
        5,
        300.0,
    )

    system = poller_from_settings(
        SourceSettings(kind="system", topic="system_status", interval=2.0),
        rec,
        time.monotonic,
        0.0,
        None,
    )
    status = (await system.poll_once()).value
    assert status is not None
    assert set(status) == {"cpu", "memory", "load", "uptime"}
    assert rec.events[-1].topic == "system_status"
    assert not rec.events[-1].stale

    with pytest.raises(ValueError, match="httpx client"):
        poller_from_settings(settings, rec, time.monotonic, 0.0, None)
