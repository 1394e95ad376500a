"""Polled upstream sources: one asyncio poller per ``[[sources]]`` entry, each behind its own
circuit breaker (one per upstream: docs/breaker.md), publishing on its topic through a `Publisher`.

The breaker and the cached value are the pure `wirestate.core.breaker.CachedSource`; this
module only supplies time, makes the call and turns results into publications. It decides no
policy: when to call, what counts as a failure and when to half-open are the core's.

Rules:

- One tick = `begin(now)`; with a permit, one `fetch()` bounded by `timeout`, then
  `complete(...)`; then exactly one publication on the topic. After every input to the
  breaker its `actions()` and `call_events()` are drained (undrained queues would grow for the
  life of the process), and each `StateChanged` is published once on ``circuit_breaker`` and
  handed once to `on_transition`.
- What a tick publishes on the source's topic (docs/protocol.md, "Built-in topics"):
  a fresh value as it is (``stale=False``); while calls fail or the breaker rejects them, the
  last good value with ``stale=True`` and its ``age`` (seconds since it was fetched), on every
  tick, as the original service did; with nothing cached, an unavailable status, so that
  subscribers get a clear answer rather than silence (not a stale value: ``stale=False``,
  no ``age``; the status says what is missing)::

      {"status": "unavailable",
       "reason": "circuit_open",   # PollReason: upstream_error, timeout, circuit_open,
                                   # half_open_busy, forced_open
       "state": "open",            # the breaker's state after this tick
       "retry_after": 12.0,        # seconds until a call may be made again (0.0 when
                                   # closed), null when forced open (no automatic retry)
       "error": "UpstreamStatusError"}  # the failed call's exception type name, or null

- The ``circuit_breaker`` payload is the protocol's: ``{"breaker", "from", "to",
  "failures", "retry_at"}``, ``retry_at`` the wall-clock ISO 8601 UTC time (milliseconds,
  ``Z``) at which a trial call is due after entering open, else null.
- Time: `clock` is monotonic seconds that advance with the event loop's own time (the server
  passes ``loop.time``): tick deadlines computed from it are slept with `asyncio.sleep`.
  `wall_offset` (wall minus monotonic seconds) is used for display only.
- Ticks are scheduled at ``start + k * interval``. A tick that overruns skips the slots it
  missed (counted in `snapshot().skipped_ticks`) instead of firing them in a burst: a slow
  upstream is never polled harder because it is slow.
- Failures: a timeout and every `Exception` from `fetch` are results, counted by the breaker;
  cancellation (and any other `BaseException`) releases the permit uncounted and propagates
  (docs/breaker.md: cancellation is not counted). `run()` lets nothing but those escape: a publisher
  or hook that raises is logged and counted, and polling goes on.
- Logs name exception types only: exception text may carry upstream data, and URLs may carry
  credentials.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Protocol, TypeAlias

import httpx
import orjson

from wirestate.core.breaker import (
    Backoff,
    Breaker,
    BreakerConfig,
    BreakerState,
    CachedSource,
    CallFailed,
    CallRejected,
    CallSucceeded,
    Permit,
    PollReason,
    PollResult,
    StateChanged,
    wall_iso,
)
from wirestate.models.settings import BreakerSettings, SourceSettings

__all__ = [
    "BREAKER_TOPIC",
    "Fetch",
    "Publisher",
    "SourcePoller",
    "SourceSnapshot",
    "SystemStatus",
    "UpstreamError",
    "UpstreamJSONError",
    "UpstreamStatusError",
    "UpstreamTooLargeError",
    "breaker_config",
    "breaker_event",
    "http_fetch",
    "poller_from_settings",
    "system_status_fetch",
    "unavailable_status",
]

_log = logging.getLogger(__name__)

#: The topic every breaker transition is published on (docs/protocol.md, built-in topics).
BREAKER_TOPIC: Final = "circuit_breaker"

#: One call to an upstream: returns a JSON-able value or raises.
Fetch: TypeAlias = Callable[[], Awaitable[Any]]


class Publisher(Protocol):
    """Where a poller publishes. Synchronous and non-blocking: the server implements it by
    calling the pure hub with the loop's time; the returned int is the event's seq."""

    def publish(
        self, topic: str, data: Any, *, stale: bool = False, age: float | None = None
    ) -> int: ...


# --------------------------------------------------------------------------- payloads


def _finite_or_none(seconds: float | None) -> float | None:
    # JSON has no infinity: "never by itself" (forced open) is null.
    return seconds if seconds is not None and math.isfinite(seconds) else None


def breaker_event(change: StateChanged, wall_offset: float) -> dict[str, Any]:
    """The ``circuit_breaker`` payload for one transition, exactly as docs/protocol.md gives it."""
    retry_at = None if change.retry_at is None else wall_iso(change.retry_at + wall_offset)
    return {
        "breaker": change.breaker,
        "from": change.from_state.value,
        "to": change.to_state.value,
        "failures": change.failures,
        "retry_at": retry_at,
    }


def unavailable_status(result: PollResult[Any]) -> dict[str, Any]:
    """What a topic carries when there is no value to serve (shape in the module docstring)."""
    return {
        "status": "unavailable",
        "reason": result.reason.value,
        "state": result.state.value,
        "retry_after": _finite_or_none(result.retry_after),
        "error": result.error,
    }


# --------------------------------------------------------------------------- the poller


@dataclass(frozen=True)
class SourceSnapshot:
    """A poller at one moment, for /readyz and logs. Pure read; `as_dict()` is JSON-able.

    - `state`: the breaker's state; `retry_after` seconds until a call may be made (null when
      forced open).
    - `has_value`, `age`, `fetched_at`: the cached value, its age in seconds, and when it was
      fetched (wall clock, ISO 8601), or False/None/None before the first success.
    - `last_reason`, `last_error`: the last tick's `PollReason` and exception type name.
    - counters: ticks run, upstream calls made, calls that succeeded / failed (timeouts
      included) / were rejected by the breaker, ticks skipped after an overrun, and
      publications or hooks that raised (`internal_errors`: each one was logged).
    """

    topic: str
    running: bool
    state: str
    retry_after: float | None
    consecutive_failures: int
    has_value: bool
    age: float | None
    fetched_at: str | None
    last_reason: str | None
    last_error: str | None
    ticks: int
    upstream_calls: int
    successes: int
    failures: int
    rejections: int
    skipped_ticks: int
    internal_errors: int

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def _check_seconds(name: str, value: float) -> None:
    if isinstance(value, bool) or not (isinstance(value, int | float) and 0 < value < math.inf):
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")


class SourcePoller:
    """Polls one source every `interval` seconds through its own breaker and publishes.

    Use: run `run()` as a task owned by the server's task group and cancel it to stop; or call
    `poll_once()` to make one tick now (a manual refresh; it may overlap a running `run()`,
    the breaker settles each permit on its own). `snapshot()` reads without changing anything.

    `config` defaults to the original service's breaker (5 failures, 300 s); when it leaves
    `call_timeout` unset, `timeout` is used, so that the core also classifies an overdue
    settlement as a timeout. The breaker is named after the topic. Alternatively pass a
    prebuilt `source` (a primed cache, a restored breaker: its name and config are used as
    they are); the poller then owns it, and nothing else may feed it.
    """

    def __init__(
        self,
        topic: str,
        fetch: Fetch,
        *,
        publisher: Publisher,
        interval: float,
        timeout: float,
        clock: Callable[[], float],
        wall_offset: float = 0.0,
        config: BreakerConfig | None = None,
        source: CachedSource[Any] | None = None,
        on_transition: Callable[[StateChanged], None] | None = None,
    ) -> None:
        """Raises `ValueError` for a non-positive or infinite `interval` or `timeout`, for both
        `config` and `source`, and for a breaker config whose rate rules could never fire at
        this `interval` (S20)."""
        _check_seconds("interval", interval)
        _check_seconds("timeout", timeout)
        if source is None:
            config = config if config is not None else BreakerConfig()
            if config.call_timeout is None:
                config = replace(config, call_timeout=timeout)
            source = CachedSource(Breaker(topic, config), poll_interval=interval)
        elif config is not None:
            raise ValueError("pass a breaker config or a prebuilt source, not both")
        else:
            source.breaker.config.check_cadence(interval)
        self.topic = topic
        self.interval = float(interval)
        self.timeout = float(timeout)
        self.wall_offset = wall_offset
        #: Called once per `StateChanged` after it was published (the server feeds metrics).
        self.on_transition = on_transition
        self._fetch = fetch
        self._publisher = publisher
        self._clock = clock
        self._source = source
        self._running = False
        self._last: PollResult[Any] | None = None
        self._ticks = 0
        self._upstream_calls = 0
        self._successes = 0
        self._failures = 0
        self._rejections = 0
        self._skipped = 0
        self._internal_errors = 0

    def __repr__(self) -> str:
        return f"<SourcePoller {self.topic!r} {self._source.breaker.state.value}>"

    @property
    def source(self) -> CachedSource[Any]:
        """The pure breaker and cache (read them; feed them only through this poller)."""
        return self._source

    @property
    def breaker(self) -> Breaker:
        return self._source.breaker

    def adopt(self, source: CachedSource[Any]) -> None:
        """Poll from now on with ``source``: the breaker and cache another node left behind
        (a shared source taken over). ``RuntimeError`` while running; ``ValueError`` for a
        breaker whose rate rules could never fire at this interval."""
        if self._running:
            raise RuntimeError(f"poller {self.topic!r} is running: stop it before adopting")
        source.breaker.config.check_cadence(self.interval)
        self._source = source

    # ----------------------------------------------------------------- driving

    async def run(self) -> None:
        """Tick now, then at ``start + k * interval`` until cancelled.

        Never returns; raises only `CancelledError` (or another `BaseException`), with the
        permit of an interrupted call released uncounted. `RuntimeError` if already running.
        """
        if self._running:
            raise RuntimeError(f"poller {self.topic!r} is already running")
        self._running = True
        try:
            interval = self.interval
            start = self._clock()
            slot = 0
            while True:
                await self._guarded_tick()
                now = self._clock()
                slot += 1
                missed = math.floor((now - start) / interval) + 1 - slot
                if missed > 0:
                    # Overran: go to the next slot still ahead, counting the ones passed over.
                    self._skipped += missed
                    slot += missed
                delay = start + slot * interval - now
                if delay > interval:
                    # The clock went backwards: re-anchor rather than stall for the difference.
                    start, slot, delay = now, 1, interval
                await asyncio.sleep(max(0.0, delay))
        finally:
            self._running = False

    async def poll_once(self) -> PollResult[Any]:
        """One tick: ask the breaker, call if permitted, publish. Returns the poll result.

        A failed call is a result, not an exception; cancellation propagates (the permit is
        released uncounted and nothing is published for the tick). A publisher or hook that
        raises is logged and counted, never raised.
        """
        self._ticks += 1
        got = self._source.begin(self._clock())
        self._drain()
        result = await self._call(got) if isinstance(got, Permit) else got
        self._last = result
        self._publish_result(result)
        return result

    async def _guarded_tick(self) -> None:
        try:
            await self.poll_once()
        except Exception as exc:
            # poll_once turns upstream failures into results and isolates the publisher and
            # hook, so this is a bug; keep polling (a dead poller would silently freeze the
            # topic) but leave a trace in the log and in snapshot().internal_errors.
            self._internal_errors += 1
            _log.error(
                "source %s: tick raised %s; polling continues", self.topic, type(exc).__name__
            )

    async def _call(self, permit: Permit) -> PollResult[Any]:
        self._upstream_calls += 1
        try:
            # asyncio.timeout runs the fetch in this task; 3.11's wait_for wraps it in another
            # task and can lose a cancellation that races with completion (gh-86296).
            async with asyncio.timeout(self.timeout):
                value = await self._fetch()
        except Exception as exc:
            # Counted by the breaker (TimeoutError -> TIMEOUT); kept in the result and the
            # snapshot as a type name.
            _log.debug("source %s: fetch failed with %s", self.topic, type(exc).__name__)
            result = self._source.complete(permit, self._clock(), error=exc)
        except BaseException:
            # Cancellation or interpreter exit: never counted, always propagated.
            self._source.cancel(permit, self._clock())
            self._drain()
            raise
        else:
            result = self._source.complete(permit, self._clock(), value=value)
        self._drain()
        return result

    # ----------------------------------------------------------------- outputs

    def _drain(self) -> None:
        breaker = self._source.breaker
        for change in breaker.actions():
            self._announce(change)
        for event in breaker.call_events():
            if isinstance(event, CallSucceeded):
                self._successes += 1
            elif isinstance(event, CallFailed):
                self._failures += 1
            elif isinstance(event, CallRejected):
                self._rejections += 1
            # CallIgnored: no `ignore` matchers are configured by this adapter.

    def _announce(self, change: StateChanged) -> None:
        level = logging.WARNING if change.to_state is BreakerState.OPEN else logging.INFO
        _log.log(
            level,
            "source %s: breaker %s -> %s (%s, %d consecutive failures)",
            self.topic,
            change.from_state.value,
            change.to_state.value,
            change.cause.value,
            change.failures,
        )
        self._publish(BREAKER_TOPIC, breaker_event(change, self.wall_offset))
        hook = self.on_transition
        if hook is None:
            return
        try:
            hook(change)
        except Exception as exc:
            # Metrics must not be able to stop the polling; the failure stays visible.
            self._internal_errors += 1
            _log.error(
                "source %s: on_transition hook raised %s; ignored",
                self.topic,
                type(exc).__name__,
            )

    def _publish_result(self, result: PollResult[Any]) -> None:
        if result.reason is PollReason.FRESH:
            self._publish(self.topic, result.value)
        elif not result.no_data:
            self._publish(self.topic, result.value, stale=True, age=result.age)
        else:
            # No cached value: a status, not a value served stale (so no age to give).
            self._publish(self.topic, unavailable_status(result))

    def _publish(
        self, topic: str, data: Any, *, stale: bool = False, age: float | None = None
    ) -> None:
        try:
            self._publisher.publish(topic, data, stale=stale, age=age)
        except Exception as exc:
            # e.g. a value that cannot be serialized: that tick's event is lost, not the poller.
            self._internal_errors += 1
            _log.error(
                "source %s: publishing on %s raised %s; event dropped",
                self.topic,
                topic,
                type(exc).__name__,
            )

    # ----------------------------------------------------------------- reads

    def snapshot(self, now: float | None = None) -> SourceSnapshot:
        """The poller's status at `now` (the clock when None). Changes nothing."""
        now = self._clock() if now is None else now
        snap = self._source.breaker.snapshot(now)
        cached = self._source.cached
        last = self._last
        return SourceSnapshot(
            topic=self.topic,
            running=self._running,
            state=snap.state.value,
            retry_after=_finite_or_none(snap.retry_after),
            consecutive_failures=snap.consecutive_failures,
            has_value=cached is not None,
            age=None if cached is None else max(0.0, now - cached.fetched_at),
            fetched_at=None if cached is None else wall_iso(cached.fetched_at + self.wall_offset),
            last_reason=None if last is None else last.reason.value,
            last_error=None if last is None else last.error,
            ticks=self._ticks,
            upstream_calls=self._upstream_calls,
            successes=self._successes,
            failures=self._failures,
            rejections=self._rejections,
            skipped_ticks=self._skipped,
            internal_errors=self._internal_errors,
        )


# --------------------------------------------------------------------------- fetches


class UpstreamError(Exception):
    """An HTTP upstream answered, but not with a usable JSON document (a counted failure).
    Messages never include the URL or the body."""


class UpstreamStatusError(UpstreamError):
    """The upstream answered with a status outside 2xx."""

    def __init__(self, status: int) -> None:
        super().__init__(f"upstream answered HTTP {status}")
        self.status = status


class UpstreamJSONError(UpstreamError):
    """The upstream's body is not valid JSON (UTF-8, no NaN or Infinity)."""

    def __init__(self) -> None:
        super().__init__("upstream body is not valid JSON")


class UpstreamTooLargeError(UpstreamError):
    """The upstream's body is longer than the fetch allows."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"upstream body exceeds {limit} bytes")
        self.limit = limit


#: A JSON status document is small; this bounds what a misbehaving upstream can make us hold.
DEFAULT_MAX_BYTES: Final = 1 << 20


def http_fetch(url: str, client: httpx.AsyncClient, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Fetch:
    """A fetch that GETs `url` with `client` and returns the parsed JSON body.

    Raises (each a counted failure for the breaker): `UpstreamStatusError` for a non-2xx
    status (redirects are not followed unless the client does), `UpstreamJSONError` for a body
    that is not JSON, `UpstreamTooLargeError` past `max_bytes` (decoded), and httpx's own
    errors for connection trouble. The overall deadline is the poller's `timeout`.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes!r}")

    async def fetch() -> Any:
        async with client.stream("GET", url, headers={"Accept": "application/json"}) as response:
            if not response.is_success:
                raise UpstreamStatusError(response.status_code)
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    raise UpstreamTooLargeError(max_bytes)
        try:
            # orjson, like the hub: it rejects NaN/Infinity, which could not be re-published.
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise UpstreamJSONError() from None

    return fetch


class SystemStatus:
    """Host status for the ``system_status`` topic, standard library only, cheap enough to run
    every few seconds (a few small reads of in-memory /proc files; not worth a thread).

    CPU busy percent is measured between consecutive calls of the same instance (the first
    call: since boot). Give each poller its own instance. Every call returns these keys, with
    None for a value this host cannot provide::

        {"cpu": {"percent": 12.5,        # busy % of all CPUs, 0..100
                 "count": 2,             # logical CPUs
                 "source": "proc_stat"}, # or "loadavg": 1-minute load / CPUs, capped at 100
         "memory": {"total": 8_000_000_000, "available": 6_000_000_000,   # bytes
                    "used": 2_000_000_000, "percent": 25.0},              # used / total
         "load": {"1m": 0.5, "5m": 0.4, "15m": 0.3},
         "uptime": 12345.6}              # seconds since boot
    """

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self._proc = proc
        self._previous: tuple[int, int] | None = None  # (busy, total) jiffies
        self._percent: float | None = None

    async def __call__(self) -> dict[str, Any]:
        return self.read()

    def read(self) -> dict[str, Any]:
        """The status now (synchronous; the async `__call__` is the `Fetch`). Never raises for
        a missing or unreadable /proc file: its values are None."""
        count = os.cpu_count()
        load = self._load()
        percent, source = self._cpu(), "proc_stat"
        if percent is None:
            percent, source = _load_percent(load, count), "loadavg"
        return {
            "cpu": {
                "percent": percent,
                "count": count,
                "source": source if percent is not None else None,
            },
            "memory": self._memory(),
            "load": {
                "1m": load[0] if load else None,
                "5m": load[1] if load else None,
                "15m": load[2] if load else None,
            },
            "uptime": self._uptime(),
        }

    def _text(self, name: str) -> str | None:
        try:
            return (self._proc / name).read_text(encoding="ascii", errors="replace")
        except OSError:
            return None

    def _cpu(self) -> float | None:
        text = self._text("stat")
        if text is None or not text.startswith("cpu "):
            return None
        try:
            # user nice system idle iowait irq softirq steal [guest guest_nice]; guest time is
            # already inside user and nice, so only the first eight add up to the total.
            fields = [int(part) for part in text.split("\n", 1)[0].split()[1:9]]
        except ValueError:
            return None
        if len(fields) < 4:
            return None
        total = sum(fields)
        busy = total - fields[3] - (fields[4] if len(fields) > 4 else 0)
        previous, self._previous = self._previous, (busy, total)
        if previous is None:
            span, used = total, busy
        else:
            span, used = total - previous[1], busy - previous[0]
        if span > 0:
            self._percent = round(min(100.0, max(0.0, 100.0 * used / span)), 1)
        # Two calls within one clock tick measure nothing new: repeat the last figure.
        return self._percent

    def _memory(self) -> dict[str, Any]:
        values: dict[str, int] = {}
        text = self._text("meminfo")
        for line in (text or "").splitlines():
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                scale = 1024 if parts[1:2] == ["kB"] else 1
                values[name] = int(parts[0]) * scale
        total = values.get("MemTotal")
        available = values.get("MemAvailable")
        if available is None and "MemFree" in values:
            # Kernels before 3.14 have no MemAvailable; this is its usual approximation.
            available = values["MemFree"] + values.get("Buffers", 0) + values.get("Cached", 0)
        if not total or available is None:
            return {"total": None, "available": None, "used": None, "percent": None}
        available = min(available, total)
        used = total - available
        return {
            "total": total,
            "available": available,
            "used": used,
            "percent": round(100.0 * used / total, 1),
        }

    @staticmethod
    def _load() -> tuple[float, float, float] | None:
        try:
            return os.getloadavg()
        except OSError:
            return None

    def _uptime(self) -> float | None:
        text = self._text("uptime")
        try:
            return float(text.split()[0]) if text else None
        except (ValueError, IndexError):
            return None


def _load_percent(load: tuple[float, float, float] | None, count: int | None) -> float | None:
    if load is None or not count:
        return None
    return round(min(100.0, 100.0 * load[0] / count), 1)


_default_status = SystemStatus()


async def system_status_fetch() -> dict[str, Any]:
    """The host status now, from a process-wide `SystemStatus` (shape documented there).

    Its CPU figure covers the time since the previous call by anyone; a poller that wants its
    own interval uses its own `SystemStatus()` (as `poller_from_settings` does)."""
    return await _default_status()


# --------------------------------------------------------------------------- settings


def breaker_config(settings: BreakerSettings, *, call_timeout: float | None) -> BreakerConfig:
    """``[sources.breaker]`` as a core `BreakerConfig`. `max_reset_timeout`, when set, makes
    the open duration double after each failed trial up to that cap (reset on close)."""
    backoff = None
    if settings.max_reset_timeout is not None:
        backoff = Backoff(multiplier=2.0, max=settings.max_reset_timeout)
    return BreakerConfig(
        failure_threshold=settings.failure_threshold,
        reset_timeout=settings.reset_timeout,
        success_threshold=settings.success_threshold,
        half_open_max_calls=settings.half_open_max_calls,
        call_timeout=call_timeout,
        backoff=backoff,
    )


def poller_from_settings(
    source: SourceSettings,
    publish: Publisher,
    clock: Callable[[], float],
    wall_offset: float,
    client: httpx.AsyncClient | None,
    *,
    on_transition: Callable[[StateChanged], None] | None = None,
) -> SourcePoller:
    """A poller for one ``[[sources]]`` entry, publishing through `publish`.

    ``kind = "system"`` polls a fresh `SystemStatus`; ``kind = "http"`` GETs ``source.url``
    with `client` (required then: `ValueError` when None; the caller owns and closes it).
    The breaker's call timeout is ``source.timeout``.
    """
    fetch: Fetch
    if source.kind == "system":
        fetch = SystemStatus()
    else:
        if client is None:
            raise ValueError(f"source {source.topic!r} is kind http and needs an httpx client")
        assert source.url is not None  # SourceSettings requires it for kind http
        fetch = http_fetch(source.url, client)
    return SourcePoller(
        source.topic,
        fetch,
        publisher=publish,
        interval=source.interval,
        timeout=source.timeout,
        clock=clock,
        wall_offset=wall_offset,
        config=breaker_config(source.breaker, call_timeout=source.timeout),
        on_transition=on_transition,
    )
