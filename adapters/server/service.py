"""The service: a running hub with its listener, ticker, sources and bus, and the public API
embedders use (`WirestateServer`: ``add_source``, ``publish``, ``publish_now``, ``url``,
``start``/``stop``/``async with``).

Rules of this module (each part has its own module: ``admission`` decides upgrades,
``session`` runs one connection on any transport, ``endpoints`` answers HTTP,
``transports.websockets`` listens):

* Every input goes to the core with the loop's clock (``now``); after each, ``dispatch``
  performs the actions the core decided (ping, close, abort) through the sessions, schedules
  a flush for the outboxes that filled, and re-arms the ticker. The service decides no
  policy.
* Writes wait for the end of the loop iteration (``_flush``): every event published
  meanwhile leaves in one transport write per connection, and a fan-out to 10,000 clients
  is written in chunks with the loop running between them.
* One hub-wide ticker task serves every connection's timers: the core keeps them in one
  heap, so 10,000 connections cost one sleeping task. It measures the loop's own lag and
  reports stalls to the core before ticking, so a busy hub does not blame its peers.
* Shutdown always ends: admission refuses new upgrades and sessions re-check before
  registering; every client is closed with 1001; handlers still running once the core's
  close timeout (and its aborts) have passed are cancelled; the listener aborts whatever
  is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

from wirestate.adapters.server.admission import Admission, loopback
from wirestate.adapters.server.auth import Authenticator
from wirestate.adapters.server.bus import Extra, MemoryBus, RedisBus
from wirestate.adapters.server.dashboard import snapshot as dashboard_snapshot
from wirestate.adapters.server.endpoints import Endpoints
from wirestate.adapters.server.leases import SharedSource
from wirestate.adapters.server.logs import install_redaction
from wirestate.adapters.server.metrics import Levels, Metrics
from wirestate.adapters.server.routes import HttpApp
from wirestate.adapters.server.session import Session
from wirestate.adapters.server.sources import (
    BREAKER_TOPIC,
    SourcePoller,
    breaker_config,
    breaker_event,
    poller_from_settings,
)
from wirestate.core.actions import Abort, Close, Ping, Reject, Unregistered
from wirestate.core.breaker import Breaker, BreakerConfig, BreakerState, StateChanged
from wirestate.core.hub import BUILTIN_TOPICS, Hub, HubConfig
from wirestate.core.lifecycle import ConnState
from wirestate.models.settings import Settings, SourceSettings

__all__ = ["WirestateServer", "hub_config"]

log = logging.getLogger("wirestate.server")

#: Sessions written per flush before the loop runs again (see ``_flush``).
FLUSH_CHUNK: Final = 64
#: How often the ticker wakes at the least, to measure the loop's lag.
LAG_PROBE: Final = 0.25
#: Loggers whose records may carry a token (websockets' request lines; wirestate's own).
REDACTED_LOGGERS: Final = ("websockets.server", "wirestate.server")
#: How long shutdown waits, past the close timeout, for the core's aborts to end sessions.
ABORT_GRACE: Final = 1.0


def hub_config(settings: Settings, sources: Iterable[str] = ()) -> HubConfig:
    """The core's knobs from the validated settings; ``sources`` names the topics of
    sources added in code (``add_source``), reserved like the configured ones."""
    s = settings.server
    return HubConfig(
        ping_interval=s.ping_interval,
        ping_timeout=s.ping_timeout,
        send_queue_size=s.send_queue_size,
        close_timeout=s.close_timeout,
        history_size=settings.history.size,
        history_max_age=settings.history.max_age,
        max_subscriptions=settings.limits.max_subscriptions,
        max_topics=settings.limits.max_topics,
        max_pending_bytes=s.max_pending_bytes,
        messages_per_second=settings.limits.messages_per_second,
        overflow={topic: t.overflow for topic, t in settings.topics.items()},
        reserved_topics=BUILTIN_TOPICS | {src.topic for src in settings.sources} | set(sources),
    )


class WirestateServer:
    """A running hub: ``/ws``, the HTTP endpoints and the sources on one port.

    ::

        server = WirestateServer(load_settings())
        async with server:                      # listening once entered
            await server.publish("orders", {"id": 1})
            await server.wait_closed()          # until stop() or a signal

    ``add_source`` before entering adds an application source (an async function polled
    through its own breaker). ``stop()`` closes every client with 1001, waits up to the
    close timeout for them to flush, unregisters all, and stops.

    For transports and sessions (not for embedders): ``hub``, ``admission``, ``sessions``
    (client id -> `Session`), ``http_app``, ``now()``, ``dispatch()``.
    """

    def __init__(self, settings: Settings | None = None, *, epoch: str | None = None) -> None:
        self.settings = settings or Settings()
        self.epoch = epoch or secrets.token_hex(4)
        self.hub: Hub | None = None
        self.metrics = Metrics(self._stats, self._connection_counts, levels=self._levels)
        self.auth = Authenticator.from_settings(self.settings.auth)
        self.admission = Admission(self.settings, self.auth, self.metrics.rejections)
        #: The registered connections' sessions, by client id.
        self.sessions: dict[str, Session] = {}
        secret = self.settings.auth.secret if self.settings.auth else None
        # websockets logs request lines at DEBUG, ?token= included: scrub them at the source.
        install_redaction(REDACTED_LOGGERS, [secret.get_secret_value()] if secret else [])
        #: the tasks running a session (each a transport's task for one connection): ``stop``
        #: waits for them, and cancels those that outlive the close timeout
        self.handlers: set[asyncio.Task[Any]] = set()
        self._sources: list[
            tuple[str, Callable[[], Awaitable[Any]], float, float, BreakerConfig | None]
        ] = []
        self._pollers: list[SourcePoller] = []
        #: on a Redis bus, the sources polled by one node at a time (by topic)
        self.shared: dict[str, SharedSource] = {}
        self._ticker_task: asyncio.Task[None] | None = None
        self._source_tasks: list[asyncio.Task[None]] = []
        self._listener: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ticker_wake = asyncio.Event()
        self._flush_scheduled = False
        self._flush_todo: list[str] = []  # ready clients a flush has not reached yet
        self._ticker_at = math.inf
        self._closed = asyncio.Event()
        self._http_client: Any = None
        #: how events reach other nodes: a MemoryBus or a RedisBus, set at start
        self.bus: MemoryBus | RedisBus = MemoryBus(self)
        #: the HTTP endpoints, served by every transport
        self.http_app: HttpApp = Endpoints(self).app

    # -- library API -----------------------------------------------------------------------

    def add_source(
        self,
        topic: str,
        fetch: Callable[[], Awaitable[Any]],
        *,
        interval: float,
        timeout: float = 10.0,
        breaker: BreakerConfig | None = None,
    ) -> None:
        """Poll ``fetch`` every ``interval`` seconds behind its own breaker, publishing on
        ``topic`` (stale while the breaker is open). Call before ``start``."""
        if self._loop is not None:
            raise RuntimeError("add sources before the server starts")
        self._sources.append((topic, fetch, interval, timeout, breaker))

    async def publish(
        self, topic: str, data: Any, *, stale: bool = False, age: float | None = None
    ) -> int:
        """Publish an event; returns its seq. Never waits for a subscriber. With a Redis
        bus, a topic the bus carries is numbered by Redis (this waits for its answer) and
        reaches the subscribers of every node; while the link is down the seq is this
        node's, the event reaches this node's subscribers, and the bus on recovery."""
        if self.bus.carries(topic):
            self._need_hub()
            return await self.bus.publish(topic, data)
        return self.publish_now(topic, data, stale=stale, age=age)

    def publish_now(
        self, topic: str, data: Any, *, stale: bool = False, age: float | None = None
    ) -> int:
        """Synchronous publish on this node only, for code already on the server's event
        loop (sources, node-local topics). A topic a Redis bus carries needs ``publish``."""
        if self.bus.carries(topic):
            raise ValueError(f"{topic!r} is carried by the bus: use `await publish()`")
        hub = self._need_hub()
        seq = hub.publish(topic, data, self.now(), stale=stale, age=age)
        self.dispatch()
        return seq

    @property
    def port(self) -> int:
        """The port actually bound (useful with ``port = 0``)."""
        assert self._listener is not None, "not started"
        return int(self._listener.port)

    @property
    def url(self) -> str:
        s = self.settings.server
        scheme = "wss" if s.certfile is not None else "ws"
        return f"{scheme}://{s.host}:{self.port}/ws"

    async def __aenter__(self) -> WirestateServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # -- start and stop --------------------------------------------------------------------

    async def start(self) -> None:
        """Start the hub (``start_core``) and listen on the configured host and port."""
        from wirestate.adapters.server.transports.websockets import Listener

        host = self.settings.server.host
        beyond = self.settings.server.open_beyond_loopback
        if not self.auth.required and not loopback(host) and not beyond:
            raise ValueError(
                f"refusing to serve {host} without authentication: anyone who reaches it could"
                " subscribe and publish; configure [auth], bind 127.0.0.1, or set [server]"
                " open_beyond_loopback = true if something in front authenticates"
            )
        await self.start_core()
        self._listener = Listener(self)
        await self._listener.start()
        log.info(
            "listening",
            extra={
                "url": self.url,
                "epoch": self.epoch,
                "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
            },
        )
        if not self.auth.required and not loopback(host):
            log.warning(
                "open mode beyond loopback (open_beyond_loopback): no token is checked, so"
                " whoever reaches this address may subscribe and publish"
            )
        elif self.settings.auth is not None and not self.auth.required:
            log.warning(
                "no token is checked ([auth] allowed_origins alone): pages from other origins"
                " are refused, anything else may subscribe and publish; serving loopback only"
            )
        elif not self.auth.required:
            log.warning(
                "open mode: no [auth] configured, so every client may subscribe and publish;"
                " serving loopback only"
            )

    async def start_core(self) -> None:
        """Everything but the listener: the hub, its ticker and the sources. ``start`` calls
        it; an embedding transport (the ASGI app) calls it alone."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        # The core reads no wall clock: event timestamps are loop time plus this offset.
        wall_offset = time.time() - loop.time()
        config = hub_config(self.settings, (topic for topic, *_ in self._sources))
        self.hub = Hub(config, epoch=self.epoch, wall_offset=wall_offset)
        self._ticker_task = loop.create_task(self._ticker(), name="wirestate-ticker")
        if self.settings.bus.kind == "redis":
            bus = self.settings.bus
            self.bus = RedisBus(
                self,
                bus.url,
                local_topics=self._node_topics(),
                breaker=breaker_config(bus.breaker, call_timeout=None),
                on_transition=self._bus_transition,
                node=self.epoch,
                max_age=self.settings.history.max_age,
            )
        if isinstance(self.bus, RedisBus):
            self._breaker_exists(self.bus.breaker)
        await self.bus.start()
        await self._start_sources(wall_offset)

    async def stop(self) -> None:
        """Graceful shutdown: refuse new clients, close every client with 1001, wait for
        their flush and unregistration, and return once every connection is over. The core
        aborts clients still running after the close timeout; a handler still running
        after that (and ``ABORT_GRACE``) is cancelled."""
        if self.admission.closing or self.hub is None:
            return
        self.admission.closing = True
        if self._listener is not None:
            # Upgrades (and HTTP exchanges) still in progress end now, not after open_timeout.
            self._listener.abort_handshakes()
        hub = self.hub
        for task in self._source_tasks:
            task.cancel()
        # Shared sources hand their leases back: another node takes them over at once.
        await asyncio.gather(*(shared.stop() for shared in self.shared.values()))
        hub.shutdown(self.now())
        self.dispatch()
        grace = self.settings.server.close_timeout + ABORT_GRACE
        if self.handlers:
            _, late = await asyncio.wait(set(self.handlers), timeout=grace)
            if late:
                log.warning("cancelling connections still running", extra={"count": len(late)})
                for task in late:
                    task.cancel()
                await asyncio.wait(late, timeout=ABORT_GRACE)
        if self._listener is not None:
            await self._listener.stop(ABORT_GRACE)
        tasks = [*self._source_tasks, *([self._ticker_task] if self._ticker_task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.bus.stop()
        if self._http_client is not None:
            await self._http_client.aclose()
        self._closed.set()
        log.info("stopped", extra={"clients_left": len(hub.clients)})

    def _specs(self) -> list[SourceSettings]:
        specs: list[SourceSettings] = list(self.settings.sources)
        if not any(src.topic == "system_status" for src in specs):
            # The built-in source: host CPU, memory, load and uptime.
            specs.append(SourceSettings(kind="system", topic="system_status", interval=5.0))
        return specs

    def _node_topics(self) -> frozenset[str]:
        """The topics a Redis bus does not carry: each node's own host status (and any
        other ``kind = "system"`` source) and connections. Everything else, the sources'
        topics and ``circuit_breaker`` included, has one numbering across the cluster."""
        hosts = {src.topic for src in self._specs() if src.kind == "system"}
        return frozenset({"clients", *hosts})

    def _share(self, topic: str, wall_offset: float) -> SharedSource | None:
        """On a Redis bus, the lease that decides where ``topic``'s source is polled."""
        if not isinstance(self.bus, RedisBus) or not self.bus.carries(topic):
            return None
        shared = SharedSource(
            topic,
            self.bus,
            self.settings.bus.lease_ttl,
            clock=self.now,
            wall_offset=wall_offset,
            on_leader=self._leader_changed,
        )
        self.shared[topic] = shared
        self.metrics.source_leader(topic, False)
        return shared

    async def _start_sources(self, wall_offset: float) -> None:
        loop = asyncio.get_running_loop()
        specs = self._specs()
        if any(src.kind == "http" for src in specs):
            import httpx

            self._http_client = httpx.AsyncClient()
        publisher = _Publisher(self)
        for src in specs:
            shared = self._share(src.topic, wall_offset)
            poller = poller_from_settings(
                src,
                publisher if shared is None else shared.publisher,
                loop.time,
                wall_offset,
                self._http_client,
                on_transition=self._breaker_transition,
            )
            self._pollers.append(poller)
            if shared is not None:
                shared.poller = poller
        for topic, fetch, interval, timeout, config in self._sources:
            shared = self._share(topic, wall_offset)
            poller = SourcePoller(
                topic,
                fetch,
                publisher=publisher if shared is None else shared.publisher,
                interval=interval,
                timeout=timeout,
                clock=loop.time,
                wall_offset=wall_offset,
                config=config,
                on_transition=self._breaker_transition,
            )
            self._pollers.append(poller)
            if shared is not None:
                shared.poller = poller
        for poller in self._pollers:
            self._breaker_exists(poller.breaker)
            if poller.topic in self.shared:
                self.shared[poller.topic].start()  # polls while this node holds the lease
                continue
            name = f"wirestate-source-{poller.topic}"
            self._source_tasks.append(loop.create_task(poller.run(), name=name))

    def _leader_changed(self, topic: str, leading: bool) -> None:
        self.metrics.source_leader(topic, leading)
        poller = self.shared[topic].poller
        if leading and poller is not None:
            # The breaker taken over, as the cluster last published it.
            self.metrics.breaker_state(
                topic, poller.breaker.state.value, [s.value for s in BreakerState]
            )

    def publish_any(
        self, topic: str, data: Any, *, stale: bool = False, age: float | None = None
    ) -> int:
        """Publish from code on the server's loop without waiting: on this node for a
        node-local topic (returns the seq), through the bus otherwise (returns 0: the bus
        numbers it later)."""
        if self.bus.carries(topic):
            assert isinstance(self.bus, RedisBus)
            self.bus.submit(topic, data, Extra(stale=stale, age=age))
            return 0
        return self.publish_now(topic, data, stale=stale, age=age)

    def _bus_transition(self, change: StateChanged) -> None:
        """The bus link's breaker: metrics, and an event on ``circuit_breaker`` like any
        source's breaker."""
        self._breaker_transition(change)
        if self.hub is not None:
            self.publish_any(BREAKER_TOPIC, breaker_event(change, self.hub.wall_offset))

    def _breaker_exists(self, breaker: Breaker) -> None:
        """A breaker's gauge has samples from its creation: its state 1, the others 0."""
        self.metrics.breaker_state(
            breaker.name, breaker.state.value, [s.value for s in BreakerState]
        )

    def _breaker_transition(self, change: StateChanged) -> None:
        self.metrics.breaker_transition(
            change.breaker, change.from_state.value, change.to_state.value
        )
        self.metrics.breaker_state(
            change.breaker, change.to_state.value, [s.value for s in BreakerState]
        )

    # -- the core's decisions --------------------------------------------------------------

    def dispatch(self) -> None:
        """Perform what the core decided since the last call. Call after every input."""
        hub = self.hub
        if hub is None:
            return
        sessions = self.sessions
        for action in hub.actions():
            session = sessions.get(action.client_id)
            match action:
                case Ping():
                    if session is not None and not session.ping_now():
                        session.ping_due = True
                        session.wake()
                case Close():
                    log.info(
                        "closing",
                        extra={
                            "client_id": action.client_id,
                            "cause": action.cause.value,
                            "code": action.code,
                        },
                    )
                    if session is not None:
                        session.close = action
                        session.wake()
                case Abort():
                    log.warning(
                        "aborting a stuck connection", extra={"client_id": action.client_id}
                    )
                    if session is not None:
                        session.abort()
                case Unregistered():
                    log.info(
                        "disconnected",
                        extra={
                            "client_id": action.client_id,
                            "cause": action.cause.value,
                            "code": action.code,
                            "duration": round(action.duration, 3),
                        },
                    )
                case Reject():
                    log.info(
                        "rejected",
                        extra={"client_id": action.client_id, "cause": action.cause.value},
                    )
        dropped = hub.take_dropped()
        if dropped:
            self.bus.forget(dropped)
        urgent = hub.take_urgent()
        if urgent:
            # A burst took outboxes past send_queue_size: write to the readers now rather
            # than at the end of the loop iteration (their transports take writes).
            self._write_now(hub, urgent)
        if hub.has_ready() and not self._flush_scheduled and self._loop is not None:
            # Writes wait for the end of this loop iteration: every event published meanwhile
            # (a burst from the bus reader, several publishers' messages read in one select)
            # leaves in one transport write per connection, not one per event.
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        deadline = hub.next_deadline()
        if deadline is not None and deadline < self._ticker_at:
            self._ticker_wake.set()

    def _flush(self) -> None:
        """Hand the outboxes that filled to their sockets (or writers), FLUSH_CHUNK sessions
        at a time, for ``[server] flush_slice`` seconds at most (at least one chunk). Then
        the loop runs: readers, the ticker, and publishers, whose events join the outboxes
        of the sessions still waiting, which therefore get them in the same write. Under
        load a fan-out thus coalesces by itself (fewer syscalls per event), and a fan-out to
        10,000 clients does not hold the loop for its whole length. A longer slice lowers
        the latency of a large paced fan-out and coalesces less (docs/performance.md)."""
        self._flush_scheduled = False
        hub = self.hub
        if hub is None:
            return
        todo = self._flush_todo
        todo.extend(hub.take_ready())
        until = time.perf_counter() + self.settings.server.flush_slice
        while todo:
            batch = todo[:FLUSH_CHUNK]
            del todo[:FLUSH_CHUNK]
            self._write_now(hub, batch)
            if time.perf_counter() >= until:
                break
        if (todo or hub.has_ready()) and not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _write_now(self, hub: Hub, batch: list[str]) -> None:
        """Write the outboxes of the sessions of ``batch`` (client ids) on their writers'
        behalf where they may be written at once; wake the writers of the others."""
        sessions = self.sessions
        drain, written = hub.drain, hub.written
        sample = True  # one publish-to-write reading per flush: the histogram is not free
        for cid in batch:
            session = sessions.get(cid)
            if session is None:
                continue
            transport = session.transport
            if not session.idle or session.pending or not transport.ready():
                session.wake()
                continue
            # The writer is parked with nothing in flight, so writing here, now, on its
            # behalf keeps the socket's order and its single writer (no await: nothing can
            # interleave). It saves a task wake-up per delivery; anything that may wait (a
            # full buffer, a ping, a close) still goes through the writer.
            conn = session.conn
            assert conn is not None
            published_at = hub.oldest_queued_at(conn) if sample else None
            frames = drain(conn)
            if not frames:
                continue  # listed twice: already written
            transport.write(frames)
            ready = transport.ready()
            written(conn, transport.buffered(), ready)
            if published_at is not None:
                self.metrics.observe_publish_to_write(self.now() - published_at)
                sample = False
            if not ready:  # over the high-water mark now: the writer waits
                session.wake()

    async def _ticker(self) -> None:
        """The hub's one timer: sleeps until the core's next deadline (or the lag probe),
        reports a stall when it woke late, then ticks."""
        hub = self._need_hub()
        loop = asyncio.get_running_loop()
        threshold = self.settings.server.loop_stall_threshold
        while True:
            deadline = hub.next_deadline()
            now = loop.time()
            target = min(deadline if deadline is not None else math.inf, now + LAG_PROBE)
            self._ticker_at = target
            self._ticker_wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(target):
                    await self._ticker_wake.wait()
            now = loop.time()
            late = now - target
            if late > 0:
                self.metrics.observe_loop_lag(late)
            if late > threshold:
                hub.loop_stalled(now, late)
                log.warning("event loop stalled", extra={"seconds": round(late, 3)})
            hub.tick(now)
            self.dispatch()

    def dashboard_snapshot(
        self, visible: Callable[[str], bool] = lambda topic: True
    ) -> dict[str, Any] | None:
        """What the dashboard shows now (``wirestate.adapters.server.dashboard.snapshot``), limited
        to the topics ``visible`` accepts; None before the hub starts."""
        if self.hub is None:
            return None
        return dashboard_snapshot(
            self.hub,
            self.now(),
            pollers=self._pollers,
            bus=self.bus.status(),
            bus_breaker=self.bus.breaker if isinstance(self.bus, RedisBus) else None,
            refused=self.metrics.rejections,
            visible=visible,
        )

    # -- plumbing --------------------------------------------------------------------------

    def now(self) -> float:
        """The loop's clock, which every core input carries."""
        assert self._loop is not None, "the server has not started"
        return self._loop.time()

    def _need_hub(self) -> Hub:
        assert self.hub is not None, "the server has not started"
        return self.hub

    def _stats(self) -> Any:
        return self.hub.stats if self.hub is not None else None

    def _levels(self) -> Levels:
        hub = self.hub
        handshakes = self._listener.handshakes if self._listener is not None else 0
        if hub is None:
            return Levels(handshakes=handshakes)
        return Levels(
            topics=len(hub.topics), topics_refused=hub.topics.refused, handshakes=handshakes
        )

    def _connection_counts(self) -> dict[str, int]:
        counts = dict.fromkeys((state.value for state in ConnState), 0)
        if self.hub is not None:
            for conn in self.hub.clients.values():
                counts[conn.state.value] = counts.get(conn.state.value, 0) + 1
        return counts


class _Publisher:
    """What node-local sources publish through: the server's publish on its own loop, which
    never waits (their breakers' transitions go on ``circuit_breaker``, which a Redis bus
    carries)."""

    def __init__(self, server: WirestateServer) -> None:
        self.publish = server.publish_any
