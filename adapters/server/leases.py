"""Shared sources on a Redis bus: each one is polled by the one node that holds its lease.

Every node runs a `SharedSource` per configured source (the built-in host status excepted:
it describes each node's own host). Its task drives the pure `wirestate.core.lease.Lease`
against Redis; while this node leads, the source's `SourcePoller` runs here, and nowhere
else.

- **The lease** is the key ``wirestate:{topic}:lease`` holding a token, with a time to live
  of ``[bus] lease_ttl``. ``ACQUIRE`` (one script) sets it only if nobody holds it
  (``SET NX PX``), with a token ``<fence>:<node>``: the fence (``wirestate:{topic}:fence``,
  ``INCR``) grows with every acquisition, so no two terms share a token. ``RENEW``
  extends it only while it holds this node's token (compare, then ``PEXPIRE``);
  ``RELEASE`` deletes it on shutdown the same way, and the followers, which ask again at
  least every ``HANDOVER`` seconds, take it over without waiting for the ttl.
- **Fencing.** The leader publishes the source's topic and its breaker's transitions
  (``circuit_breaker``) through the bus's fenced publish script: Redis appends an event
  only while the lease key still holds the leader's token. A leader that was paused (a
  stopped process, a long GC, a lost link) past its lease cannot publish once another node
  took it; the refusal ends its lead here too (``Lease.fenced``).
- **The breaker and the cache travel with the events.** Each event the leader publishes on
  the source's topic carries the source's state (``b``: the breaker as `PersistedBreaker`
  fields with wall-clock times, and when the cached value was fetched); its data is the
  cached value when there is one. ``ACQUIRE`` returns the newest entries of the topic's
  stream with the lease, and the new leader restores the breaker and the cache from the
  newest state among them (`restore`): an open breaker stays open until its reset time, a
  stale value keeps its age. A node with no published state starts closed and empty.
- **Transitions once, cluster-wide**: only the leader's breaker runs, and a restored
  breaker emits nothing.
- A node that cannot reach Redis cannot renew: its lead ends by itself before the ttl
  (``Lease.expire``), and another node that can reach Redis takes the source over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import orjson

from wirestate.adapters.server.bus import (
    LINK_ERRORS,
    Extra,
    RedisBus,
    entry_fields,
    stream_key,
)
from wirestate.adapters.server.sources import BREAKER_TOPIC, SourcePoller
from wirestate.core.breaker import (
    Breaker,
    BreakerState,
    CachedSource,
    CacheEntry,
    PersistedBreaker,
)
from wirestate.core.frames import dumps
from wirestate.core.lease import Acquire, Follow, Lead, Lease, Renew

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

__all__ = ["ACQUIRE", "RELEASE", "RENEW", "SharedSource", "lease_key", "restore", "state_of"]

log = logging.getLogger("wirestate.leases")

#: Newest stream entries the new leader looks through for the last published state.
LOOKBACK: Final = 16
#: The shortest pause between two requests to Redis (a lease held with no expiry, a link
#: that fails at once).
MIN_PAUSE: Final = 0.01
#: How long a follower waits at most before asking for a held lease again: a lease handed
#: back on shutdown is taken over within this, not after the rest of its ttl.
HANDOVER: Final = 0.5
#: The retry after a request that got no answer, at most (a third of the ttl if shorter).
RETRY: Final = 0.25

# KEYS: lease, fence, the source's stream. ARGV: node, ttl (ms), entries to return.
# Returns {0, pttl} when the lease is held, else {fence, token, newest entries}.
ACQUIRE = """
local pttl = redis.call('PTTL', KEYS[1])
if pttl ~= -2 then
  return {0, pttl}
end
local fence = redis.call('INCR', KEYS[2])
local token = fence .. ':' .. ARGV[1]
redis.call('SET', KEYS[1], token, 'NX', 'PX', ARGV[2])
return {fence, token, redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', ARGV[3])}
"""

# KEYS: lease. ARGV: token, ttl (ms). Returns 1 when renewed, 0 when another token holds it.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lease. ARGV: token. Deletes the lease if it still holds the token.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def lease_key(topic: str) -> str:
    """Braced with the topic, like its stream: one Redis Cluster slot for the fenced write."""
    return f"wirestate:{{{topic}}}:lease"


def fence_key(topic: str) -> str:
    return f"wirestate:{{{topic}}}:fence"


def state_of(source: CachedSource[Any], now: float, wall_offset: float) -> bytes:
    """The source's state as an event carries it (``b``): the breaker, with wall-clock
    times, and when the cached value (the event's data) was fetched."""
    saved = source.breaker.persist(now, now + wall_offset)
    cached = source.cached
    return dumps(
        {
            "breaker": {
                "state": saved.state.value,
                "failures": saved.consecutive_failures,
                "attempt": saved.attempt,
                "opened_at": saved.opened_at_wall,
            },
            "fetched_at": None if cached is None else cached.fetched_at + wall_offset,
        }
    )


def restore(
    poller: SourcePoller, entries: Any, now: float, wall_offset: float
) -> CachedSource[Any] | None:
    """The breaker and the cache of the newest entry among ``entries`` (newest first, as
    ``XREVRANGE`` gives them) that carries a source's state; None when none does (or it
    cannot be read: the source then starts closed and empty, and says so in the log)."""
    for _, raw in entries:
        fields = entry_fields(raw)
        if b"b" not in fields:
            continue
        try:
            state = orjson.loads(fields[b"b"])
            breaker = state["breaker"]
            saved = PersistedBreaker(
                state=BreakerState(breaker["state"]),
                consecutive_failures=breaker["failures"],
                attempt=breaker["attempt"],
                opened_at_wall=breaker["opened_at"],
            )
            fetched = state["fetched_at"]
            cached = None
            if fetched is not None:
                spent = max(0.0, now + wall_offset - float(fetched))
                cached = CacheEntry(orjson.loads(fields[b"d"]), now - spent)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning(
                "source %s: the published state is unreadable (%s); starting closed",
                poller.topic,
                type(exc).__name__,
            )
            return None
        restored = Breaker.restore(
            poller.topic, poller.breaker.config, saved, now=now, wall_now=now + wall_offset
        )
        return CachedSource(restored, cached=cached, poll_interval=poller.interval)
    return None


class SharedSource:
    """One configured source on a Redis bus (module docstring). ``publisher`` is what its
    poller must publish through; ``start`` runs the lease, ``stop`` ends it (and the
    polling) and hands the lease back. ``on_leader(topic, leading)`` is told each change
    (metrics)."""

    def __init__(
        self,
        topic: str,
        bus: RedisBus,
        ttl: float,
        *,
        clock: Callable[[], float],
        wall_offset: float,
        on_leader: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.topic = topic
        self.lease = Lease(topic, ttl)
        self.bus = bus
        self.poller: SourcePoller | None = None
        self.publisher = _LeaderPublisher(self)
        self.clock = clock
        self.wall_offset = wall_offset
        self._on_leader = on_leader
        self._node = bus.node
        self._ttl_ms = max(1, math.ceil(ttl * 1000))
        self._retry = min(RETRY, self.lease.every)
        self._scripts: dict[str, AsyncScript] = {}
        self._task: asyncio.Task[None] | None = None
        self._polling: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._entries: Any = []
        #: terms led here, publishes dropped because the lead had ended, lease requests that
        #: raised (each logged)
        self.terms = 0
        self.dropped = 0
        self.errors = 0

    @property
    def leader(self) -> bool:
        return self.lease.leader

    def start(self) -> None:
        assert self.poller is not None, "give the SharedSource its poller first"
        redis = self.bus.redis
        for name, text in (("acquire", ACQUIRE), ("renew", RENEW), ("release", RELEASE)):
            self._scripts[name] = redis.register_script(text)
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"wirestate-lease-{self.topic}"
        )

    async def stop(self) -> None:
        """Stop polling and leasing; release the lease if this node holds it (bounded)."""
        token = self.lease.token
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._stop_polling()
        self.lease.release()
        self._apply()
        if token is not None:
            with contextlib.suppress(*LINK_ERRORS):
                async with asyncio.timeout(self.lease.every):
                    await self._scripts["release"](keys=[lease_key(self.topic)], args=[token])

    def fenced(self) -> None:
        """The bus refused a write made with this node's token: another node leads."""
        self.lease.fenced()
        self._wake.set()

    # -- the lease's task ------------------------------------------------------------------

    async def _run(self) -> None:
        lease = self.lease
        try:
            while True:
                now = self.clock()
                ask = lease.due(now)
                if ask is not None:
                    try:
                        await self._ask(ask, now)
                    except Exception as exc:
                        # A bug (the link's failures are handled in _ask): a dead lease task
                        # would leave the source unpolled here for good. Said and counted.
                        self.errors += 1
                        log.error(
                            "source %s: a lease request raised %s; asking again",
                            self.topic,
                            type(exc).__name__,
                        )
                        lease.failed(self.clock(), self._retry)
                await self._settle()
                delay = lease.next_deadline() - self.clock()
                delay = min(max(delay, MIN_PAUSE), lease.every)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
        finally:
            if self._polling is not None:
                self._polling.cancel()

    async def _ask(self, ask: Acquire | Renew, sent: float) -> None:
        lease = self.lease
        try:
            async with asyncio.timeout(lease.every):
                if isinstance(ask, Renew):
                    renewed = await self._scripts["renew"](
                        keys=[lease_key(self.topic)], args=[ask.token, self._ttl_ms]
                    )
                else:
                    reply = await self._scripts["acquire"](
                        keys=[lease_key(self.topic), fence_key(self.topic), stream_key(self.topic)],
                        args=[f"{self._node}:{secrets.token_hex(4)}", self._ttl_ms, LOOKBACK],
                    )
        except LINK_ERRORS as exc:
            log.debug("source %s: lease request failed (%s)", self.topic, type(exc).__name__)
            lease.failed(self.clock(), self._retry)
            return
        if isinstance(ask, Renew):
            if int(renewed):
                lease.renewed(sent)
            else:
                lease.refused()
        elif int(reply[0]) == 0:
            pttl = int(reply[1])
            lease.held(self.clock(), min(pttl / 1000 if pttl >= 0 else lease.every, HANDOVER))
        else:
            self._entries = reply[2]
            lease.acquired(reply[1].decode(), int(reply[0]), sent)

    async def _settle(self) -> None:
        """Act on the lease's decisions: start or stop polling here."""
        for action in self.lease.actions():
            if isinstance(action, Lead):
                await self._stop_polling()  # a term that ended unnoticed (never both)
                self._lead(action)
            else:
                await self._stop_polling()
                self._follow(action)

    def _apply(self) -> None:
        for action in self.lease.actions():
            if isinstance(action, Follow):
                self._follow(action)

    def _lead(self, lead: Lead) -> None:
        poller = self.poller
        assert poller is not None
        now = self.clock()
        source = restore(poller, self._entries, now, self.wall_offset)
        self._entries = []
        if source is not None:
            poller.adopt(source)
        self.terms += 1
        log.info(
            "source %s: leading (fence %d), breaker %s",
            self.topic,
            lead.fence,
            poller.breaker.state.value,
        )
        self._polling = asyncio.get_running_loop().create_task(
            poller.run(), name=f"wirestate-source-{self.topic}"
        )
        if self._on_leader is not None:
            self._on_leader(self.topic, True)

    def _follow(self, follow: Follow) -> None:
        log.info("source %s: no longer leading (%s)", self.topic, follow.cause.value)
        if self._on_leader is not None:
            self._on_leader(self.topic, False)

    async def _stop_polling(self) -> None:
        task, self._polling = self._polling, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class _LeaderPublisher:
    """What a shared source's poller publishes through: the bus's fenced publish, with the
    source's state beside its events, and nothing once the lead ended here."""

    def __init__(self, shared: SharedSource) -> None:
        self._shared = shared

    def publish(
        self, topic: str, data: Any, *, stale: bool = False, age: float | None = None
    ) -> int:
        """Queue the event for the bus; returns 0 (Redis numbers it later)."""
        shared = self._shared
        token = shared.lease.token
        if token is None or shared.poller is None:
            shared.dropped += 1  # the lead ended in the middle of a tick
            return 0
        state = b""
        if topic != BREAKER_TOPIC:
            state = state_of(shared.poller.source, shared.clock(), shared.wall_offset)
        extra = Extra(
            stale=stale,
            age=age,
            state=state,
            lease=lease_key(shared.topic),
            token=token,
            refused=shared.fenced,
        )
        shared.bus.submit(topic, data, extra)
        return 0
