"""A loopback TCP proxy that injects network faults, for tests of reconnects and delivery.

Put it between a client and a real server (the delivery tests do, tests/integration/)::

    async with FaultProxy("127.0.0.1", server.port, seed=7) as proxy:
        ws = await connect(f"ws://127.0.0.1:{proxy.port}/ws")
        proxy.stall(0.5, direction=Direction.DOWN)   # the server's frames wait half a second
        proxy.cut()                                  # every connection reset at once
        proxy.chaos(cut_rate=0.01, stall_rate=0.05)  # random faults, reproducible by seed
    print(proxy.stats.faults, proxy.log)

Every accepted client connection gets its own upstream connection and two one-way pipes
(``Direction.UP``: client to upstream, ``Direction.DOWN``: upstream to client). A pipe is a
reader task and a writer task joined by a bounded queue; the writer applies the faults:

* ``cut`` aborts both sockets at once with ``SO_LINGER`` 0, so each peer gets a reset (or at
  least an EOF), never a polite close; nothing queued is delivered.
* ``stall`` stops a writer without closing anything: data waits in the queue (and, once the
  queue is full, in the kernel's buffers) and is delivered in order on ``resume`` or when
  the stall's duration ends.
* ``delay`` holds each chunk until ``delay`` seconds after it was read: latency, not a
  throughput cap, and order is kept because one writer sends in arrival order.
* ``throttle`` paces the writer to a byte rate, in slices of about 20 ms of data.

Commands take ``conn`` (a connection index, in accept order from 0) or apply to every live
connection and, for the shaping faults, to connections accepted later (a partition).

Rules of this module:

* Loopback only: both the listening address and the upstream must be loopback addresses;
  this is a test utility, not a network tool.
* No unowned tasks. The proxy owns the accept handlers, each handler owns its pipes in a
  ``TaskGroup``, and the proxy owns the chaos task. Leaving the ``async with`` stops
  accepting, aborts every connection, cancels every task and waits for it, bounded.
* Chaos is reproducible: the faults of one chaos step are a pure function of the seed, the
  step number and the live connection indices (``chaos_plan``), so a test can replay a seed
  without any timing; which connections are live at a step is the only timing input.
* Every fault, commanded or random, is appended to ``log`` and counted in ``stats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import socket
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from wirestate.adapters.server.admission import loopback

__all__ = [
    "ChaosConfig",
    "Direction",
    "Fault",
    "FaultKind",
    "FaultProxy",
    "PlannedFault",
    "ProxyConnection",
    "ProxyStats",
    "chaos_plan",
]

#: Bytes read from a socket at a time.
CHUNK = 65536
#: Chunks a pipe holds while stalled or delayed before it stops reading (backpressure).
QUEUE_CHUNKS = 64
#: A throttled writer sends about this many seconds' worth of bytes at a time.
THROTTLE_SLICE = 0.02
#: The bound on connecting upstream and on every wait while closing.
CONNECT_TIMEOUT = 5.0
CLOSE_TIMEOUT = 2.0


class Direction(enum.StrEnum):
    UP = "up"  # client -> upstream
    DOWN = "down"  # upstream -> client


BOTH: tuple[Direction, Direction] = (Direction.UP, Direction.DOWN)

FaultKind: TypeAlias = Literal["cut", "stall", "resume", "delay", "throttle"]
FaultSource: TypeAlias = Literal["command", "chaos"]


@dataclass(frozen=True)
class Fault:
    """One injected fault. ``conn`` is None for a command applied to every connection;
    ``seconds`` is the stall or delay length (None: a stall until ``resume``), ``rate`` a
    throttle's bytes per second (None: unthrottled)."""

    kind: FaultKind
    conn: int | None
    at: float  # loop time
    source: FaultSource
    seconds: float | None = None
    rate: float | None = None
    direction: Direction | None = None


@dataclass(frozen=True)
class PlannedFault:
    """A chaos decision, before it is applied: comparable with ``==``."""

    kind: Literal["cut", "stall"]
    conn: int
    seconds: float | None = None


@dataclass(frozen=True)
class ChaosConfig:
    """Per live connection and per step: cut with probability ``cut_rate``, else stall
    (both directions) with probability ``stall_rate`` for up to ``max_stall`` seconds."""

    cut_rate: float = 0.0
    stall_rate: float = 0.0
    max_stall: float = 0.5
    interval: float = 0.05

    def __post_init__(self) -> None:
        if self.cut_rate < 0.0 or self.stall_rate < 0.0:
            raise ValueError("rates must be >= 0")
        if self.cut_rate + self.stall_rate > 1.0:
            raise ValueError("cut_rate + stall_rate must be <= 1")
        if self.max_stall < 0 or self.interval <= 0:
            raise ValueError("max_stall must be >= 0 and interval > 0")


def chaos_plan(
    seed: int, step: int, live: Iterable[int], config: ChaosConfig
) -> list[PlannedFault]:
    """The faults of chaos step ``step``: a pure function of its arguments.

    Each (seed, step, connection) pair draws from its own ``random.Random``, so a
    connection's fate at a step does not depend on which other connections happen to be
    live: a replay with the same seed reproduces every fault that can be reproduced.
    """
    plan: list[PlannedFault] = []
    for index in sorted(live):
        rng = random.Random(f"wirestate.faults:{seed}:{step}:{index}")
        u = rng.random()
        if u < config.cut_rate:
            plan.append(PlannedFault("cut", index))
        elif u < config.cut_rate + config.stall_rate:
            plan.append(PlannedFault("stall", index, rng.uniform(0.0, config.max_stall)))
    return plan


@dataclass
class ProxyStats:
    accepted: int = 0  # client connections accepted
    upstream_failures: int = 0  # accepted, but the upstream refused or timed out
    closed: int = 0  # connections ended, for any reason
    bytes_up: int = 0  # forwarded client -> upstream
    bytes_down: int = 0  # forwarded upstream -> client
    #: Faults injected, by kind (cut, stall, delay, throttle); a cut counts per connection.
    faults: Counter[str] = field(default_factory=Counter)
    chaos_steps: int = 0


@dataclass
class _Shaping:
    """What a pipe's writer applies; copied into each new connection from the proxy's."""

    stalled: bool = False
    delay: float = 0.0
    rate: float | None = None


class _Pipe:
    """One direction of one connection: a reader task feeding a writer task."""

    def __init__(
        self,
        conn: ProxyConnection,
        direction: Direction,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        shaping: _Shaping,
    ) -> None:
        self.conn = conn
        self.direction = direction
        self.source = source
        self.sink = sink
        self.queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)
        self.flowing = asyncio.Event()
        #: Held by a stall for all that began before this connection was accepted: that
        #: stall's end (or ``resume``) lets it go, unless a stall of its own came since.
        self.held = shaping.stalled
        if not shaping.stalled:
            self.flowing.set()
        self.delay = shaping.delay
        self.rate = shaping.rate
        self.bytes = 0
        self._next_send = 0.0
        self._resume_at: asyncio.TimerHandle | None = None

    def stall(self, seconds: float | None) -> None:
        """Hold the writer; ``seconds`` None: until ``resume``. A new stall replaces the
        previous one's end."""
        self.cancel_timer()
        self.held = False
        self.flowing.clear()
        if seconds is not None:
            loop = asyncio.get_running_loop()
            self._resume_at = loop.call_later(seconds, self.resume)

    def resume(self) -> None:
        self.cancel_timer()
        self.flowing.set()

    def cancel_timer(self) -> None:
        if self._resume_at is not None:
            self._resume_at.cancel()
            self._resume_at = None

    async def pump_in(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                chunk = await self.source.read(CHUNK)
                await self.queue.put((loop.time(), chunk))
                if not chunk:
                    return
        except OSError:
            # The peer reset its side: pass the reset on, as a real network would.
            self.conn.abort()

    async def pump_out(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                received_at, chunk = await self.queue.get()
                due = received_at + self.delay
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                if not chunk:
                    await self.flowing.wait()
                    if self.sink.can_write_eof():
                        self.sink.write_eof()
                    return
                await self._send(chunk, loop)
        except OSError:
            self.conn.abort()

    async def _send(self, chunk: bytes, loop: asyncio.AbstractEventLoop) -> None:
        view = memoryview(chunk)
        while view:
            rate = self.rate
            if rate is None:
                piece = view
            else:
                piece = view[: max(1, int(rate * THROTTLE_SLICE))]
                now = loop.time()
                if self._next_send > now:
                    await asyncio.sleep(self._next_send - now)
                self._next_send = max(self._next_send, loop.time()) + len(piece) / rate
            await self.flowing.wait()  # a stall that began while pacing holds this piece
            self.sink.write(piece)
            await self.sink.drain()
            n = len(piece)
            self.bytes += n
            self.conn.count(self.direction, n)
            view = view[n:]


class ProxyConnection:
    """One client connection and its upstream connection, as seen by the proxy."""

    def __init__(
        self,
        proxy: FaultProxy,
        index: int,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        shaping: dict[Direction, _Shaping],
    ) -> None:
        self.proxy = proxy
        self.index = index
        self.client_writer = client[1]
        self.upstream_writer = upstream[1]
        self.pipes = {
            Direction.UP: _Pipe(self, Direction.UP, client[0], upstream[1], shaping[Direction.UP]),
            Direction.DOWN: _Pipe(
                self, Direction.DOWN, upstream[0], client[1], shaping[Direction.DOWN]
            ),
        }
        self.aborted = False
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def bytes_up(self) -> int:
        return self.pipes[Direction.UP].bytes

    @property
    def bytes_down(self) -> int:
        return self.pipes[Direction.DOWN].bytes

    def count(self, direction: Direction, n: int) -> None:
        if direction is Direction.UP:
            self.proxy.stats.bytes_up += n
        else:
            self.proxy.stats.bytes_down += n

    async def run(self) -> None:
        """Forward both ways until both directions reached EOF or the connection is
        aborted. The caller closes the sockets afterwards (``close``)."""
        async with asyncio.TaskGroup() as tg:
            for pipe in self.pipes.values():
                name = f"faultproxy-{self.index}-{pipe.direction}"
                self._tasks.append(tg.create_task(pipe.pump_in(), name=f"{name}-in"))
                self._tasks.append(tg.create_task(pipe.pump_out(), name=f"{name}-out"))

    def abort(self) -> None:
        """Reset both sides at once and stop the pipes. Idempotent; the pipes' tasks end
        cancelled, which the task group in ``run`` absorbs."""
        if self.aborted:
            return
        self.aborted = True
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        for pipe in self.pipes.values():
            pipe.cancel_timer()
        for writer in (self.client_writer, self.upstream_writer):
            _reset(writer)

    async def close(self) -> None:
        """After ``run``: close both sockets politely (already aborted: nothing to do)."""
        if self.aborted:
            return
        for pipe in self.pipes.values():
            pipe.cancel_timer()
        for writer in (self.client_writer, self.upstream_writer):
            writer.close()
        for writer in (self.client_writer, self.upstream_writer):
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await writer.wait_closed()

    def _pipes(self, direction: Direction | None) -> list[_Pipe]:
        return [self.pipes[d] for d in ((direction,) if direction else BOTH)]


def _reset(writer: asyncio.StreamWriter) -> None:
    """Abort the socket so that the peer sees a reset (SO_LINGER 0), not a FIN."""
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is not None and not transport.is_closing():
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _require_loopback(host: str, what: str) -> None:
    if not loopback(host):
        raise ValueError(f"{what} must be a loopback address, not {host!r}")


class FaultProxy:
    """An asyncio TCP proxy on loopback that forwards bytes and injects faults on command.

    Use it as ``async with FaultProxy(host, port) as proxy`` (listening once entered, on
    ``proxy.port``); leaving the block aborts every connection and stops every task. The
    fault methods are synchronous and take effect at once; they must be called on the
    proxy's event loop. ``conn`` names a connection by its accept index; an index that is
    no longer live is ignored (the connection ended on its own).
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str = "127.0.0.1",
        seed: int | None = None,
    ) -> None:
        _require_loopback(upstream_host, "upstream_host")
        _require_loopback(listen_host, "listen_host")
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.listen_host = listen_host
        #: The chaos seed; drawn at random when not given, so a failing run can be replayed.
        self.seed = seed if seed is not None else random.SystemRandom().randrange(2**32)
        self.stats = ProxyStats()
        self.log: list[Fault] = []
        #: Live connections by accept index.
        self.connections: dict[int, ProxyConnection] = {}
        self._shaping = {d: _Shaping() for d in BOTH}
        self._stall_timer: asyncio.TimerHandle | None = None
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._chaos: asyncio.Task[None] | None = None
        self._closing = False
        #: Unexpected exceptions of connection handlers (peer errors are not among them).
        self.failures: list[BaseException] = []

    # -- lifetime --------------------------------------------------------------------------

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the proxy is already started")
        self._server = await asyncio.start_server(self._accept, self.listen_host, 0)

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.sockets[0].getsockname()[1])

    async def aclose(self) -> None:
        """Stop accepting, stop chaos, abort every connection, wait for every task
        (bounded). Idempotent; the proxy cannot be started again. Raises an exception group
        if a connection handler failed unexpectedly (a bug, not a network fault)."""
        if self._closing:
            return
        self._closing = True
        await self.stop_chaos()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections.values()):
            conn.abort()
        handlers = set(self._handlers)
        for task in handlers:
            task.cancel()
        if handlers:
            await asyncio.wait(handlers, timeout=CLOSE_TIMEOUT)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await self._server.wait_closed()
        if self.failures:
            raise BaseExceptionGroup("fault proxy connection handlers failed", self.failures)

    # -- faults on command -----------------------------------------------------------------

    def cut(self, conn: int | None = None) -> int:
        """Reset the connection ``conn`` (or every live one) on both sides at once; returns
        how many were cut. Logged and counted once per connection cut."""
        targets = self._targets(conn)
        for target in targets:
            target.abort()
            self._record("cut", target.index, "command")
        return len(targets)

    def stall(
        self,
        seconds: float | None = None,
        *,
        conn: int | None = None,
        direction: Direction | None = None,
    ) -> None:
        """Stop forwarding (in ``direction``, default both) without closing; data waits and
        flows again, in order, on ``resume`` or after ``seconds``. Without ``conn``, also
        holds connections accepted until then."""
        if conn is None:
            for d in self._directions(direction):
                self._shaping[d].stalled = True
            if self._stall_timer is not None:
                self._stall_timer.cancel()
                self._stall_timer = None
            if seconds is not None:
                loop = asyncio.get_running_loop()
                self._stall_timer = loop.call_later(seconds, self._end_stall, direction)
        for target in self._targets(conn):
            for pipe in target._pipes(direction):
                pipe.stall(seconds)
        self._record("stall", conn, "command", seconds=seconds, direction=direction)

    def resume(self, *, conn: int | None = None, direction: Direction | None = None) -> None:
        """End a stall (in ``direction``, default both)."""
        if conn is None:
            for d in self._directions(direction):
                self._shaping[d].stalled = False
            if self._stall_timer is not None:
                self._stall_timer.cancel()
                self._stall_timer = None
        for target in self._targets(conn):
            for pipe in target._pipes(direction):
                pipe.resume()
        self._record("resume", conn, "command", direction=direction, count=False)

    def delay(
        self, seconds: float, *, conn: int | None = None, direction: Direction | None = None
    ) -> None:
        """Deliver each chunk not yet sent ``seconds`` after it was read (0: no delay)."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        if conn is None:
            for d in self._directions(direction):
                self._shaping[d].delay = seconds
        for target in self._targets(conn):
            for pipe in target._pipes(direction):
                pipe.delay = seconds
        self._record(
            "delay", conn, "command", seconds=seconds, direction=direction, count=seconds > 0
        )

    def throttle(
        self,
        bytes_per_second: float | None,
        *,
        conn: int | None = None,
        direction: Direction | None = None,
    ) -> None:
        """Pace forwarding to ``bytes_per_second`` (None: unthrottled)."""
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be > 0 (None removes the limit)")
        if conn is None:
            for d in self._directions(direction):
                self._shaping[d].rate = bytes_per_second
        for target in self._targets(conn):
            for pipe in target._pipes(direction):
                pipe.rate = bytes_per_second
        self._record(
            "throttle",
            conn,
            "command",
            rate=bytes_per_second,
            direction=direction,
            count=bytes_per_second is not None,
        )

    # -- faults at random ------------------------------------------------------------------

    def chaos(
        self,
        *,
        cut_rate: float = 0.0,
        stall_rate: float = 0.0,
        max_stall: float = 0.5,
        interval: float = 0.05,
    ) -> None:
        """Every ``interval`` seconds, apply ``chaos_plan(seed, step, live connections)``
        until ``stop_chaos`` or the proxy closes. One chaos task at a time."""
        config = ChaosConfig(cut_rate, stall_rate, max_stall, interval)
        if self._closing:
            raise RuntimeError("the proxy is closed")
        if self._chaos is not None:
            raise RuntimeError("chaos is already running: await stop_chaos() first")
        self._chaos = asyncio.get_running_loop().create_task(
            self._chaos_loop(config), name="faultproxy-chaos"
        )

    async def stop_chaos(self) -> None:
        """Stop random faults (stalls already applied still end on their own)."""
        task, self._chaos = self._chaos, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task], timeout=CLOSE_TIMEOUT)

    def chaos_step(self, step: int, config: ChaosConfig) -> list[PlannedFault]:
        """Apply one chaos step now (what the chaos task does each interval); returns the
        faults applied. Public so that a test can drive chaos without timing."""
        # A connection cut a moment ago may still be listed until its handler runs: skip
        # it, so the plan does not depend on how quickly the loop got round to that.
        live = [index for index, conn in self.connections.items() if not conn.aborted]
        plan = chaos_plan(self.seed, step, live, config)
        for fault in plan:
            target = self.connections.get(fault.conn)
            if target is None:
                continue
            if fault.kind == "cut":
                target.abort()
            else:
                for pipe in target._pipes(None):
                    pipe.stall(fault.seconds)
            self._record(fault.kind, fault.conn, "chaos", seconds=fault.seconds)
        self.stats.chaos_steps += 1
        return plan

    async def _chaos_loop(self, config: ChaosConfig) -> None:
        step = 0
        while True:
            await asyncio.sleep(config.interval)
            self.chaos_step(step, config)
            step += 1

    # -- plumbing --------------------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback, not a coroutine: asyncio would otherwise run the handler in a task
        # of its own that nobody owns (and Python 3.11's stream callback fails on cancelled
        # ones). The proxy owns the task; aclose cancels and awaits it.
        if self._closing:
            _reset(writer)
            return
        index = self.stats.accepted
        self.stats.accepted += 1
        task = asyncio.get_running_loop().create_task(
            self._serve(index, reader, writer), name=f"faultproxy-conn-{index}"
        )
        self._handlers.add(task)
        task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:  # a bug in the proxy, not a network fault: aclose raises it
            self.failures.append(exc)

    async def _serve(
        self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn: ProxyConnection | None = None
        clean = False
        try:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    upstream = await asyncio.open_connection(self.upstream_host, self.upstream_port)
            except (OSError, TimeoutError):
                self.stats.upstream_failures += 1
                _reset(writer)
                return
            shaping = {d: _Shaping(s.stalled, s.delay, s.rate) for d, s in self._shaping.items()}
            conn = ProxyConnection(self, index, (reader, writer), upstream, shaping)
            self.connections[index] = conn
            await conn.run()
            clean = True
            await conn.close()
        finally:
            if conn is None:  # cancelled while connecting upstream: the proxy is closing
                _reset(writer)
            else:
                if not clean:  # cancelled (the proxy is closing) or failed: reset both sides
                    conn.abort()
                del self.connections[index]
            self.stats.closed += 1

    def _end_stall(self, direction: Direction | None) -> None:
        self._stall_timer = None
        for d in self._directions(direction):
            self._shaping[d].stalled = False
        for conn in self.connections.values():
            for pipe in conn._pipes(direction):
                if pipe.held:
                    pipe.held = False
                    pipe.resume()

    def _targets(self, conn: int | None) -> list[ProxyConnection]:
        if conn is None:
            return list(self.connections.values())
        target = self.connections.get(conn)
        return [target] if target is not None else []

    @staticmethod
    def _directions(direction: Direction | None) -> tuple[Direction, ...]:
        return (direction,) if direction is not None else BOTH

    def _record(
        self,
        kind: FaultKind,
        conn: int | None,
        source: FaultSource,
        *,
        seconds: float | None = None,
        rate: float | None = None,
        direction: Direction | None = None,
        count: bool = True,
    ) -> None:
        """Log every command; count only those that inject a fault (not a resume, a zero
        delay or a throttle removed)."""
        now = asyncio.get_running_loop().time()
        self.log.append(Fault(kind, conn, now, source, seconds, rate, direction))
        if count:
            self.stats.faults[kind] += 1
