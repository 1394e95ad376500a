"""Buses: how events published on one node reach the subscribers of every node.

``MemoryBus`` is the embedded default: one node, the hub numbers its own topics.

``RedisBus`` (``[bus] kind = "redis"``) makes Redis the one sequencer of every topic that
is not node-local (the built-in topics and the sources' topics stay per node):

- A topic is a hash ``wirestate:{topic}:meta`` (its ``epoch`` and last ``seq``) and a
  stream ``wirestate:{topic}:stream`` capped at the history size (``XADD ... MAXLEN``)
  whose entry ids are ``<seq>-0``. A publish is one Lua script (numbering and append are
  atomic), so a seq means the same event on every node and a client resumes on any node.
- Both keys age like a node's history (``[history] max_age``): each entry carries Redis's
  own time (``w``, milliseconds), every script that writes or reads a topic first trims
  the entries that old (a bounded scan of the oldest) and sets both keys to expire after
  ``max_age``. A topic nobody publishes to and nobody reads expires whole; a node keeps
  the topics it reads alive (``TOUCH``, every third of ``max_age``). A topic Redis forgot
  comes back in a new epoch: a resume across it is told ``epoch_changed``.
- Publishes from this node go through one task, in order, pipelined in batches.
- One reader task reads, with a blocking ``XREAD``, the streams of the topics that have a
  subscriber here, from each one's cursor, and hands the entries to the core
  (``BusState.entries``): delivered in stream order on every node, duplicates ignored. A
  node's own publishes reach its clients the same way, so every node sees one order.
- The link is guarded by a breaker (``[bus.breaker]``). On the first failure the node
  keeps delivering locally (``BusState.publish_local``), ``/readyz`` answers 503 and the
  breaker paces the retries; on recovery every topic is reconciled with one atomic script
  (``BusState`` explains the outcomes), the topics with subscribers are re-attached
  (re-subscribed), and the node is ready again once that is confirmed.

Messages: keys braced with the topic, so a topic's keys share a Redis Cluster slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import orjson
from redis.exceptions import RedisError

from wirestate.core.breaker import Breaker, BreakerConfig, Permit, StateChanged
from wirestate.core.bus import BusState, Plan, Reconciled
from wirestate.core.frames import EVENT_TAIL, dumps, event_tail
from wirestate.core.hub import Hub
from wirestate.models.settings import sentinel_address

if TYPE_CHECKING:
    from redis.asyncio import Redis

#: What a broken link raises (anything else is a bug, and is not taken for an outage).
LINK_ERRORS = (RedisError, OSError, TimeoutError)

log = logging.getLogger("wirestate.bus")

#: How long one blocking read waits for new entries before looking again.
BLOCK_MS = 1000
#: Entries taken per stream and read.
READ_COUNT = 500
#: Publishes sent in one pipeline at most.
BATCH = 500
#: The shortest pause between two failed attempts while the breaker is still closed.
RETRY_PAUSE = 0.05
#: How long ``start`` waits for Redis before serving locally (and saying so on /readyz).
START_WAIT = 3.0

_SEED = """
local function clock()
  local now = redis.call('TIME')
  return tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
end

-- Trim the entries at least maxage ms old (a bounded scan of the oldest: each entry is
-- trimmed once, so the cost stays bounded per call) and make both keys expire with age.
local function age(kmeta, kstream, now, maxage)
  local oldest = redis.call('XRANGE', kstream, '-', '+', 'COUNT', 64)
  local keep = nil
  local last = nil
  for _, entry in ipairs(oldest) do
    local w = nil
    for i = 1, #entry[2], 2 do
      if entry[2][i] == 'w' then w = tonumber(entry[2][i + 1]) end
    end
    if w == nil or w > now - maxage then
      keep = entry[1]
      break
    end
    last = entry[1]
  end
  if last then
    if keep then
      redis.call('XTRIM', kstream, 'MINID', keep)
    else
      redis.call('XTRIM', kstream, 'MINID', (tonumber(string.match(last, '^(%d+)')) + 1) .. '-0')
    end
  end
  redis.call('PEXPIRE', kmeta, maxage)
  if redis.call('EXISTS', kstream) == 1 then
    redis.call('PEXPIRE', kstream, maxage)
  end
end

local function meta(kmeta, kstream, candidate)
  local epoch = redis.call('HGET', kmeta, 'epoch')
  local seq = tonumber(redis.call('HGET', kmeta, 'seq') or '0')
  if not epoch then
    epoch = candidate
    local last = redis.call('XREVRANGE', kstream, '+', '-', 'COUNT', 1)
    if last[1] then
      seq = math.max(seq, tonumber(string.match(last[1][1], '^(%d+)')))
    end
    redis.call('HSET', kmeta, 'epoch', epoch, 'seq', seq)
  end
  return epoch, seq
end
"""

_PUBLISH = """
meta(KEYS[1], KEYS[2], ARGV[2])
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local now = clock()
local extra = {}
if ARGV[6] ~= '' then
  extra[#extra + 1] = 's'
  extra[#extra + 1] = ARGV[6]
end
if ARGV[7] ~= '' then
  extra[#extra + 1] = 'b'
  extra[#extra + 1] = ARGV[7]
end
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[1], seq .. '-0', 'd', ARGV[3], 't', ARGV[4],
           'w', now, unpack(extra))
age(KEYS[1], KEYS[2], now, tonumber(ARGV[5]))
return seq
"""

#: The fence in front of a shared source's publish: nothing is written unless the lease
#: key still holds the publisher's token (a paused ex-leader is refused, with -1).
_FENCE = """
if redis.call('GET', KEYS[3]) ~= ARGV[8] then
  return -1
end
"""


def publish_script(*, fenced: bool) -> str:
    """The publish script; ``fenced``: the variant a source's leader publishes with.

    KEYS: meta, stream (fenced: and the lease key). ARGV: cap, candidate epoch, body, ts,
    max age (ms), the frame's tail when it is not a fresh event's (``s``, else empty), the
    source's state (``b``, else empty) (fenced: and the token). Returns the seq, or -1 when
    the fence refused the write."""
    return _SEED + (_FENCE if fenced else "") + _PUBLISH


PUBLISH = publish_script(fenced=False)
FENCED_PUBLISH = publish_script(fenced=True)

# KEYS: meta, stream. ARGV: cap, candidate epoch, max age (ms). Returns {epoch, seq, newest
# entries}: only entries younger than the max age.
ATTACH = (
    _SEED
    + """
local epoch, seq = meta(KEYS[1], KEYS[2], ARGV[2])
age(KEYS[1], KEYS[2], clock(), tonumber(ARGV[3]))
return {epoch, seq, redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', ARGV[1])}
"""
)

# KEYS: meta, stream. ARGV: max age (ms). A topic read here stays alive (and is trimmed).
TOUCH = (
    _SEED
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then
  age(KEYS[1], KEYS[2], clock(), tonumber(ARGV[1]))
end
return 1
"""
)

# KEYS: meta, stream. ARGV: cap, node epoch, base, skipped, n, max age (ms), then n pairs
# body, ts.
# Returns {status, epoch, start, end}: see wirestate.core.bus.
RECONCILE = (
    _SEED
    + """
local epoch, seq = meta(KEYS[1], KEYS[2], ARGV[2])
local base = tonumber(ARGV[3])
local status
if epoch ~= ARGV[2] then
  status = 'epoch'
elseif seq <= base then
  status = 'same'
  seq = base
else
  status = 'moved'
end
local start = seq
local now = clock()
seq = seq + tonumber(ARGV[4])
for i = 0, tonumber(ARGV[5]) - 1 do
  seq = seq + 1
  if ARGV[7 + 2 * i] ~= '' then  -- empty: a hole, the seq taken and nothing written
    redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[1], seq .. '-0', 'd', ARGV[7 + 2 * i],
               't', ARGV[8 + 2 * i], 'w', now)
  end
end
redis.call('HSET', KEYS[1], 'seq', seq)
age(KEYS[1], KEYS[2], now, tonumber(ARGV[6]))
return {status, epoch, start, seq}
"""
)


def meta_key(topic: str) -> str:
    return f"wirestate:{{{topic}}}:meta"


def stream_key(topic: str) -> str:
    return f"wirestate:{{{topic}}}:stream"


def topic_of(key: str) -> str:
    """The topic of a ``stream_key``."""
    return key[len("wirestate:{") : -len("}:stream")]


@dataclass(frozen=True, slots=True)
class Extra:
    """What a shared source's publish carries beside its data: its stale flag and age
    (delivered as they are on every node), its ``state`` (the breaker and the cached
    value's time, JSON, for the node that takes the source over) and, from the source's
    leader, the fence: the ``lease`` key that must still hold ``token``. A write the fence
    refuses is dropped and ``refused`` is called (the lease is someone else's)."""

    stale: bool = False
    age: float | None = None
    state: bytes = b""
    lease: str | None = None
    token: str = ""
    refused: Callable[[], None] | None = None

    @property
    def tail(self) -> bytes:
        return event_tail(self.stale, self.age) if self.stale else b""


PLAIN = Extra()

_Queued = tuple[str, bytes, str, "asyncio.Future[int] | None", Extra]


class BusUnavailable(RuntimeError):
    """The bus link is down and the call cannot fall back to local delivery."""


class Host(Protocol):
    """What a bus needs from the server that runs it."""

    hub: Hub | None

    def dispatch(self) -> None: ...
    def now(self) -> float: ...


class MemoryBus:
    """One node: the hub numbers its own topics. Always ready."""

    kind = "memory"
    ready = True

    def __init__(self, host: Host) -> None:
        self._host = host

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def carries(self, topic: str) -> bool:
        return False

    async def attach(self, topics: list[str]) -> bool:
        return False

    async def wake(self) -> None:
        return None

    async def publish(self, topic: str, data: Any) -> int:
        raise AssertionError("the memory bus carries no topic")  # pragma: no cover

    def submit(self, topic: str, data: Any) -> None:
        raise AssertionError("the memory bus carries no topic")  # pragma: no cover

    def forget(self, topics: list[str]) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return {"kind": "memory", "up": True}


class RedisBus:
    """Redis Streams as the bus of several nodes (module docstring)."""

    kind = "redis"

    def __init__(
        self,
        host: Host,
        url: str,
        *,
        local_topics: frozenset[str],
        breaker: BreakerConfig,
        on_transition: Callable[[StateChanged], None] | None = None,
        node: str | None = None,
        max_age: float = 600.0,
    ) -> None:
        """``max_age``: seconds a topic's entries (and, idle, its keys) live in Redis, the
        history's ``max_age``."""
        self._host = host
        self._max_age_ms = max(1, int(max_age * 1000))
        self._url = url
        self.local_topics = local_topics
        self.node = node or secrets.token_hex(4)
        self.breaker = Breaker("bus", breaker)
        self._on_transition = on_transition
        self.state: BusState | None = None
        self._redis: Redis | None = None
        self._reader_redis: Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._outbox: list[_Queued] = []
        self._outbox_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._up = asyncio.Event()
        #: a reconnection is in progress: publishes wait for its outcome in the outbox
        #: (published locally now, they would miss the reconciliation under way)
        self._reconnecting = False
        self._wake_id = b"0-0"
        self.published = 0
        self.read = 0
        self.fenced = 0  # writes refused by a lease's fence

    # -- life --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state is not None and self.state.up

    @property
    def redis(self) -> Redis:
        """The client of this node's requests (not the blocking reader's)."""
        return self._need_redis()

    async def start(self) -> None:
        hub = self._need_hub()
        self.state = BusState(hub, hub.config.history_size)
        self._redis = connect(self._url, socket_timeout=5.0)
        # The blocking reader's own connection; its wait is bounded by BLOCK_MS, and a read
        # that outlives it by much means a dead link (see _read).
        self._reader_redis = connect(self._url, socket_timeout=None, single=True)
        for name, text in (
            ("publish", PUBLISH),
            ("fenced", FENCED_PUBLISH),
            ("attach", ATTACH),
            ("reconcile", RECONCILE),
            ("touch", TOUCH),
        ):
            self._scripts[name] = self._redis.register_script(text)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._link(), name="wirestate-bus-link"),
            loop.create_task(self._publisher(), name="wirestate-bus-publisher"),
            loop.create_task(self._toucher(), name="wirestate-bus-toucher"),
        ]
        # Ready (and able to attach) once the first connection is confirmed; a node that
        # cannot reach Redis at start keeps serving locally and says so on /readyz.
        try:
            async with asyncio.timeout(START_WAIT):
                await self._up.wait()
        except TimeoutError:
            log.warning("bus: Redis not reachable at start; serving locally until it is")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        state = self._need_state()
        unsent = sum(len(link.pending) + link.skipped for link in state.links.values())
        if unsent:
            # Delivered here, never reached the bus: the other nodes' clients will not get
            # them (nor a gap for them). Said, not hidden.
            log.warning("bus: stopping with %d events published during an outage unsent", unsent)
        if state.up and self._redis is not None:
            with contextlib.suppress(*LINK_ERRORS):
                await self._redis.delete(self._wake_key)
        for fut in (q[3] for q in self._outbox if q[3] is not None and not q[3].done()):
            fut.set_exception(BusUnavailable("the node is stopping"))
        self._outbox.clear()
        for client in (self._redis, self._reader_redis):
            if client is not None:
                with contextlib.suppress(*LINK_ERRORS):  # the link may be gone already
                    await client.aclose()

    def carries(self, topic: str) -> bool:
        return topic not in self.local_topics

    def status(self) -> dict[str, Any]:
        state = self._need_state()
        return {
            "kind": "redis",
            "up": state.up,
            "breaker": self.breaker.state.value,
            "outages": state.outages,
            "attached": sum(1 for link in state.links.values() if link.attached),
            "pending": sum(len(link.pending) for link in state.links.values()),
            "published": self.published,  # events this node wrote to Redis
            "read": self.read,  # events read from the streams and delivered here
            "gapped": state.gapped,  # seqs this node's clients were told they missed
            "fenced": self.fenced,  # a source's writes refused: its lease had moved on
        }

    # -- publish -----------------------------------------------------------------------

    async def publish(self, topic: str, data: Any) -> int:
        """Publish on a bus topic; returns its seq (a local one while the link is down:
        the event reaches this node's subscribers now and the bus on recovery)."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._submit(topic, data, fut)
        return await fut

    def submit(self, topic: str, data: Any, extra: Extra = PLAIN) -> None:
        """``publish`` without waiting for the seq (a client's ``publish`` message, a
        source's tick, with its ``extra``); the order of submissions is kept. ``TypeError``
        for data that is not JSON."""
        self._submit(topic, data, None, extra)

    def _submit(
        self, topic: str, data: Any, fut: asyncio.Future[int] | None, extra: Extra = PLAIN
    ) -> None:
        body = dumps(data)  # TypeError here, before anything is queued
        if not self._need_state().up and not self._outbox and not self._reconnecting:
            seq = self._local(topic, data, extra)
            if fut is not None:
                fut.set_result(seq)
            return
        ts = self._need_hub().stamp(self._host.now())
        self._outbox.append((topic, body, ts, fut, extra))
        self._outbox_ready.set()

    def _local(self, topic: str, data: Any, extra: Extra) -> int:
        # A leader's fenced write cannot be checked against its lease now: this node's
        # clients get it, the bus never does (it holds its seq as a hole).
        seq = self._need_state().publish_local(
            topic,
            data,
            self._host.now(),
            stale=extra.stale,
            age=extra.age,
            keep=extra.lease is None,
        )
        self._host.dispatch()
        return seq

    async def _publisher(self) -> None:
        """The one task that writes this node's publishes to Redis, in order."""
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while self._outbox:
                if not self._need_state().up:
                    if not self._reconnecting:
                        await self._spill()
                    break
                batch, self._outbox = self._outbox[:BATCH], self._outbox[BATCH:]
                await self._send(batch)

    async def _send(self, batch: list[_Queued]) -> None:
        redis = self._need_redis()
        plain, fenced = self._scripts["publish"], self._scripts["fenced"]
        cap = self._need_state().cap
        # The epoch a topic gets if this batch creates it: fresh per batch, so that a topic
        # Redis lost and a node re-creates never reuses an epoch its clients hold.
        epoch = secrets.token_hex(4)
        try:
            async with redis.pipeline(transaction=False) as pipe:
                for topic, body, ts, _, extra in batch:
                    keys = [meta_key(topic), stream_key(topic)]
                    args = [cap, epoch, body, ts, self._max_age_ms, extra.tail, extra.state]
                    if extra.lease is None:
                        await plain(keys=keys, args=args, client=pipe)
                    else:
                        keys.append(extra.lease)
                        await fenced(keys=keys, args=[*args, extra.token], client=pipe)
                seqs = await pipe.execute()
        except LINK_ERRORS as exc:
            # The link failed mid-batch: what Redis did not confirm is published locally
            # (and reconciled later). A batch Redis applied but could not confirm may reach
            # other nodes twice; docs/scaling.md says so.
            self._lost(exc)
            self._outbox[:0] = batch
            await self._spill()
            return
        state = self._need_state()
        for (topic, _, _, fut, extra), seq in zip(batch, seqs, strict=True):
            if int(seq) < 0:
                self.fenced += 1
                if extra.refused is not None:
                    extra.refused()
                continue
            self.published += 1
            state.acked(topic, int(seq))
            if fut is not None and not fut.done():
                fut.set_result(int(seq))

    async def _spill(self) -> None:
        """The link is down: everything queued for it is published locally instead."""
        queued, self._outbox = self._outbox, []
        for topic, body, _, fut, extra in queued:
            seq = self._local(topic, orjson.loads(body), extra)
            if fut is not None and not fut.done():
                fut.set_result(seq)

    # -- attach and read -----------------------------------------------------------------

    async def attach(self, topics: list[str]) -> bool:
        """Read the state of the bus topics among ``topics`` not read here yet, before a
        client subscribes to them (its ``subscribed`` then carries the bus's epoch and its
        resume is served from the stream's tail). While the link is down this does
        nothing: the subscription is local until recovery re-attaches it. True when a
        topic was attached (the reader must then ``wake``)."""
        state = self._need_state()
        wanted = [
            t
            for t in dict.fromkeys(topics)
            if self.carries(t) and not state.link(t).attached and state.up
        ]
        if not wanted:
            return False
        try:
            await self._attach(wanted)
        except LINK_ERRORS as exc:
            self._lost(exc)
            return False
        return True

    async def _attach(self, topics: list[str]) -> None:
        redis = self._need_redis()
        state = self._need_state()
        script = self._scripts["attach"]
        async with redis.pipeline(transaction=False) as pipe:
            for topic in topics:
                await script(
                    keys=[meta_key(topic), stream_key(topic)],
                    args=[state.cap, secrets.token_hex(4), self._max_age_ms],
                    client=pipe,
                )
            replies = await pipe.execute()
        now = self._host.now()
        for topic, (epoch, seq, newest) in zip(topics, replies, strict=True):
            state.attach(topic, epoch.decode(), int(seq), _entries(reversed(newest)), now)
        self._host.dispatch()

    async def wake(self) -> None:
        """Make the blocked reader look at the set of topics again (after a subscription:
        a topic is read while it has a subscriber here)."""
        redis = self._need_redis()
        try:
            await redis.xadd(self._wake_key, {"w": b"1"}, maxlen=1)
        except LINK_ERRORS as exc:
            self._lost(exc)

    async def _toucher(self) -> None:
        """Keep the topics read here alive in Redis, and trimmed by age, while they have a
        subscriber here: every third of ``max_age``, one pipelined TOUCH each."""
        every = self._max_age_ms / 3000
        while True:
            await asyncio.sleep(every)
            state = self._need_state()
            reading = [name for name, link in state.links.items() if link.attached]
            if not state.up or not reading:
                continue
            script = self._scripts["touch"]
            try:
                async with self._need_redis().pipeline(transaction=False) as pipe:
                    for topic in reading:
                        await script(
                            keys=[meta_key(topic), stream_key(topic)],
                            args=[self._max_age_ms],
                            client=pipe,
                        )
                    await pipe.execute()
            except LINK_ERRORS:
                continue  # the link task notices and recovers; nothing to keep alive meanwhile

    def forget(self, topics: list[str]) -> None:
        """The hub dropped these topics (idle and empty): forget what this node knew of
        them on the bus, unless it still owes the bus events published during an outage."""
        if self.state is not None:
            self.state.forget(topics)

    @property
    def _wake_key(self) -> str:
        return f"wirestate:node:{self.node}:wake"

    async def _link(self) -> None:
        """Connect, read while up, recover after a failure: the bus link's one task."""
        while True:
            state = self._need_state()
            if not state.up:
                await self._recover()
                continue
            try:
                await self._read()
            except LINK_ERRORS as exc:
                self._lost(exc)

    async def _read(self) -> None:
        state = self._need_state()
        streams: dict[Any, Any] = {self._wake_key: self._wake_id}
        for topic, cursor in state.reading().items():
            streams[stream_key(topic)] = f"{cursor}-0"
        redis = self._reader_redis
        assert redis is not None
        async with asyncio.timeout(BLOCK_MS / 1000 + 5.0):
            reply = await redis.xread(streams, count=READ_COUNT, block=BLOCK_MS)
        if not reply:
            return
        now = self._host.now()
        entry_lists: list[tuple[bytes, Any]] = list(cast(Any, reply))  # RESP2: a list
        for key, entries in entry_lists:
            name = key.decode()
            if name == self._wake_key:
                self._wake_id = entries[-1][0]
                continue
            self.read += state.entries(topic_of(name), _entries(entries), now)
        self._host.dispatch()

    def _lost(self, exc: BaseException) -> None:
        state = self._need_state()
        self._up.clear()
        if state.lost():
            log.warning(
                "bus: link to Redis lost (%s); delivering locally until it is back",
                type(exc).__name__,
            )

    async def _recover(self) -> None:
        """One attempt, when the breaker allows, to reconnect, reconcile and re-attach."""
        now = self._host.now()
        got = self.breaker.acquire(now)
        self._transitions()
        if not isinstance(got, Permit):
            await asyncio.sleep(min(max(got.retry_after, RETRY_PAUSE), 1.0))
            return
        self._reconnecting = True
        try:
            await self._reconnect()
        except asyncio.CancelledError:
            self._reconnecting = False
            self.breaker.on_cancelled(got, self._host.now())
            raise
        except Exception as exc:
            self._reconnecting = False
            if self._outbox:
                self._outbox_ready.set()  # still down: what waited is delivered locally
            self.breaker.on_failure(got, self._host.now(), exc)
            self._transitions()
            log.debug("bus: reconnect failed (%s)", type(exc).__name__)
            await asyncio.sleep(RETRY_PAUSE)
            return
        self.breaker.on_success(got, self._host.now())
        self._transitions()

    async def _reconnect(self) -> None:
        redis = self._need_redis()
        state = self._need_state()
        await redis.ping()
        plans = state.plans()
        await self._reconcile(plans)
        # Re-subscribe: every bus topic with a subscriber here is read from its cursor.
        hub = self._need_hub()
        again = [
            name
            for name, topic in hub.topics.items()
            if topic.subscribers and self.carries(name) and not state.link(name).attached
        ]
        if again:
            await self._attach(again)
        state.restored()
        self._reconnecting = False
        self._up.set()
        attached = sum(1 for link in state.links.values() if link.attached)
        log.info(
            "bus: link to Redis confirmed; %d topics reconciled, %d read", len(plans), attached
        )
        self._host.dispatch()
        if self._outbox:
            self._outbox_ready.set()

    async def _reconcile(self, plans: list[Plan]) -> None:
        if not plans:
            return
        redis = self._need_redis()
        state = self._need_state()
        script = self._scripts["reconcile"]
        async with redis.pipeline(transaction=False) as pipe:
            for plan in plans:
                args: list[Any] = [state.cap, plan.epoch, plan.base, plan.skipped]
                args += [len(plan.events), self._max_age_ms]
                for body, ts in plan.events:
                    args += [body, ts]
                await script(
                    keys=[meta_key(plan.topic), stream_key(plan.topic)],
                    args=args,
                    client=pipe,
                )
            replies = await pipe.execute()
        now = self._host.now()
        for plan, reply in zip(plans, replies, strict=True):
            self._reconciled(plan, reply, now)

    def _reconciled(self, plan: Plan, reply: list[Any], now: float) -> None:
        status, epoch, start, end = reply
        self._need_state().reconciled(
            plan, Reconciled(status.decode()), epoch.decode(), int(start), int(end), now
        )

    def _transitions(self) -> None:
        for change in self.breaker.actions():
            log.log(
                logging.WARNING if change.to_state.value == "open" else logging.INFO,
                "bus: breaker %s -> %s",
                change.from_state.value,
                change.to_state.value,
            )
            if self._on_transition is not None:
                self._on_transition(change)
        self.breaker.call_events()

    # -- plumbing ----------------------------------------------------------------------

    def _need_hub(self) -> Hub:
        hub = self._host.hub
        assert hub is not None, "the server has not started"
        return hub

    def _need_state(self) -> BusState:
        assert self.state is not None, "the bus has not started"
        return self.state

    def _need_redis(self) -> Redis:
        assert self._redis is not None, "the bus has not started"
        return self._redis


def connect(url: str, *, socket_timeout: float | None, single: bool = False) -> Redis:
    """A client of the Redis a bus URL names: a server (``redis://``, ``rediss://``,
    ``unix://``) or, with ``redis+sentinel://``, the primary the sentinels name now.

    With Sentinel, redis-py's `SentinelConnectionPool` asks the sentinels for the primary
    before each new connection, and drops its connections when the primary moved: after a
    failover the link's next attempt (the breaker paces them) reaches the promoted replica,
    and a write that still reached a demoted one fails (READONLY) like a lost link. The
    sentinels are asked without the primary's credentials. ``single``: one dedicated
    connection (the blocking reader's; with Sentinel, a pool of its own that it alone uses).
    """
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    common: dict[str, Any] = {
        "socket_connect_timeout": 2.0,
        "socket_timeout": socket_timeout,
        # The breaker paces retries; redis-py's own would hide an outage for seconds.
        "retry": Retry(NoBackoff(), 0),
    }
    address = sentinel_address(url)
    if address is None:
        return Redis.from_url(url, single_connection_client=single, **common)
    from redis.asyncio.sentinel import Sentinel

    sentinel = Sentinel(
        address.sentinels,
        sentinel_kwargs={
            "socket_connect_timeout": 1.0,
            "socket_timeout": 1.0,
            "retry": Retry(NoBackoff(), 0),
        },
    )
    return cast(
        "Redis",
        sentinel.master_for(
            address.service,
            db=address.db,
            username=address.username,
            password=address.password,
            **common,
        ),
    )


def _entries(raw: Any) -> list[tuple[int, bytes, str, bytes]]:
    """Stream entries ``(b"<seq>-0", {b"d": body, b"t": ts[, b"s": tail]})`` as (seq,
    body, ts, tail): the frame's tail is a fresh event's unless the entry has its own."""
    out = []
    for entry_id, fields in raw:
        fields = entry_fields(fields)
        seq = int(entry_id.split(b"-", 1)[0])
        tail = bytes(fields.get(b"s") or EVENT_TAIL)
        out.append((seq, bytes(fields[b"d"]), fields[b"t"].decode(), tail))
    return out


def entry_fields(fields: Any) -> dict[bytes, bytes]:
    """A stream entry's fields as a dict (a script returns a flat [field, value, ...])."""
    if isinstance(fields, list):
        return dict(zip(fields[::2], fields[1::2], strict=True))
    return cast(dict[bytes, bytes], fields)
