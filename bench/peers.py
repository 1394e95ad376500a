"""wirestate against its peers, side by side in one run: fan-out and connection scale.

    python bench/peers.py [--sizes 100,1000,5000] [--runs 3] [--events 200]
                          [--scale 1000,5000,10000,max] [--json bench/results/peers.json]
                          [--markdown bench/results/peers.md] [--loop asyncio|uvloop]
    python bench/peers.py --workload many-topics [-n 10000] [--rate 5000] [--every 100]
                          [--duration 20] [--loops asyncio,uvloop] [--runs 3] [--json ...]

Every server under test runs in its own process pinned to CPU 0 (taskset), the load client
in another pinned to CPU 1, compression off everywhere. The load client is
``wirestate.adapters.tools.leanws``: one asyncio protocol per connection that parses frames and
answers pings, no task or future per message, so it costs less than the servers it loads.

Servers (``--modes``):

* ``wirestate``: ``WirestateServer`` as shipped (bounded outboxes, seq, history, keep-alive
  on); events go through ``publish_now``, as an embedding application's would;
* ``ws_broadcast``: a plain websockets server calling ``broadcast()`` (no backpressure);
* ``ws_send``: a plain websockets server doing ``await ws.send()`` per connection;
* ``socketio``: python-socketio (aiohttp) emitting to a room everyone joined.

Fan-out, per server and subscriber count N, two phases:

* ``flat``: M ~200-byte events published as fast as the server can, ``--burst`` per loop
  iteration (default 1: the worst case for wirestate's per-iteration write coalescing,
  nothing to coalesce; several publishers or a bus batch make bursts);
* ``paced``: 10,000 deliveries/s (10,000/N events per second) for ``--paced-seconds``
  (10 s: at 10,000 subscribers that is 10 fan-outs, so p99 is not simply the slowest of
  three). It runs first, on connections that carried nothing yet, the same state for
  every server; the flat phase follows.

Figures: deliveries/s (first publish to last receive), server CPU microseconds per delivery
(the server process's own CPU time from the first publish until every byte left its
buffers: meaningful even when the client is the bottleneck), publish-to-receive latency
p50/p99/max (CLOCK_MONOTONIC, shared by both processes).

Connection scale, per server (wirestate and ws_broadcast) and K: K idle connections opened
200 at a time; handshakes/s (client side, first connect to last welcome) and the server's RSS
growth per connection once all K are held.

Many topics (``--workload many-topics``): every client subscribes to a topic of its own
(``t.<i>``) and to ``shared``; one publisher connection sends ``--rate`` publishes/s over
WebSocket, round-robin over the own topics and one in ``--every`` to ``shared``, for
``--duration`` seconds. Most publishes reach one client, so there is little to coalesce.
Targets (``--targets``): wirestate, ``ws_plain`` (a websockets hub that parses each publish
and forwards it with ``broadcast()`` to the topic's subscribers) and ``floor`` (one blocking
loopback ``send()`` of the event frame per delivery, round-robin over N TCP connections, on
the same schedule), wirestate and ws_plain once per loop in ``--loops``. Server CPU per
delivery is the server child's user+system time (``/proc/<pid>/stat``) from the first
publish until the last delivery arrived, publish ingestion included; the floor's is the CPU
of its sends alone.

Medians over ``--runs`` runs, the servers interleaved within each run so that drift hits them
alike; the ratios are wirestate / peer from the same run. Then the core's micro-benchmarks
(``bench/core_bench.py``, ``--core-runs``): one lifecycle, one routing to 10,000
subscribers, the explorer's states per second.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
PAD = "x" * 120  # with the other fields, a ~200-byte event frame
TOPIC = "bench"
PACED_DELIVERIES = 10_000
PACED_SECONDS = 10.0


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _raise_nofile() -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


# --------------------------------------------------------------------------- servers


class _Target:
    """The server side of one mode: waits for subscribers, publishes, says when flushed."""

    async def start(self, port: int) -> None: ...
    def subscribers(self) -> int: ...
    def connections(self) -> int:
        return self.subscribers()

    async def publish(self, data: dict[str, Any]) -> None: ...
    def flushed(self) -> bool: ...
    async def stop(self) -> None: ...


class _Wirestate(_Target):
    def __init__(
        self, limits: dict[str, Any] | None = None, server: dict[str, Any] | None = None
    ) -> None:
        self.limits = limits or {}
        self.server_keys = server or {}

    async def start(self, port: int) -> None:
        from wirestate.adapters.server import WirestateServer
        from wirestate.models.settings import Settings

        settings = Settings.model_validate(
            {
                "server": {
                    "port": port,
                    "send_queue_size": 1024,
                    # the latency knob's curve (docs/performance.md): seconds per flush turn
                    "flush_slice": float(os.environ.get("WIRESTATE_BENCH_FLUSH_SLICE", "0")),
                    **self.server_keys,
                },
                "limits": {
                    "max_connections": 100_000,
                    "max_connections_per_ip": 100_000,
                    **self.limits,
                },
            }
        )
        self.server = WirestateServer(settings, epoch="bench")
        await self.server.start()

    def subscribers(self) -> int:
        hub = self.server.hub
        topic = hub.topics.get(TOPIC) if hub is not None else None
        return len(topic.subscribers) if topic is not None else 0

    def connections(self) -> int:
        return len(self.server.sessions)

    async def publish(self, data: dict[str, Any]) -> None:
        self.server.publish_now(TOPIC, data)

    def flushed(self) -> bool:
        hub = self.server.hub
        assert hub is not None
        return not any(c.outbox for c in hub.clients.values()) and not any(
            s.transport.ws.transport.get_write_buffer_size()  # type: ignore[attr-defined]
            for s in self.server.sessions.values()
        )

    async def stop(self) -> None:
        await self.server.stop()


class _Websockets(_Target):
    def __init__(self, broadcast: bool) -> None:
        self.use_broadcast = broadcast
        self.conns: set[Any] = set()

    async def start(self, port: int) -> None:
        from websockets.asyncio.server import serve

        async def handler(ws: Any) -> None:
            self.conns.add(ws)
            try:
                await ws.wait_closed()
            finally:
                self.conns.discard(ws)

        self.ws = await serve(handler, "127.0.0.1", port, compression=None, ping_interval=None)

    def subscribers(self) -> int:
        return len(self.conns)

    async def publish(self, data: dict[str, Any]) -> None:
        import orjson
        from websockets.asyncio.server import broadcast

        self.seq = getattr(self, "seq", 0) + 1
        frame = orjson.dumps({"type": "event", "topic": TOPIC, "seq": self.seq, "data": data})
        text = frame.decode()
        if self.use_broadcast:
            broadcast(self.conns, text)
        else:
            await asyncio.gather(*(ws.send(text) for ws in list(self.conns)))

    def flushed(self) -> bool:
        return not any(ws.transport.get_write_buffer_size() for ws in self.conns)

    async def stop(self) -> None:
        self.ws.close()
        await self.ws.wait_closed()


class _SocketIO(_Target):
    async def start(self, port: int) -> None:
        import socketio
        from aiohttp import web

        self.sio = socketio.AsyncServer(async_mode="aiohttp", cors_allowed_origins="*")
        self.members = 0

        @self.sio.event  # type: ignore[misc]
        async def connect(sid: str, environ: Any) -> None:
            await self.sio.enter_room(sid, TOPIC)
            self.members += 1

        @self.sio.event  # type: ignore[misc]
        async def disconnect(sid: str, *args: Any) -> None:
            self.members -= 1

        app = web.Application()
        self.sio.attach(app)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()

    def subscribers(self) -> int:
        return self.members

    async def publish(self, data: dict[str, Any]) -> None:
        await self.sio.emit("event", data, room=TOPIC)

    def flushed(self) -> bool:
        # Engine.IO queues each packet for a per-socket writer task: flushed when every
        # queue is empty and every transport buffer too.
        eio = self.sio.eio
        for s in eio.sockets.values():
            if not s.queue.empty():
                return False
        return all(t.done() for t in asyncio.all_tasks() if "emit" in repr(t.get_coro()))

    async def stop(self) -> None:
        await self.runner.cleanup()


def _target(mode: str) -> _Target:
    if mode == "wirestate":
        return _Wirestate()
    if mode == "ws_broadcast":
        return _Websockets(broadcast=True)
    if mode == "ws_send":
        return _Websockets(broadcast=False)
    if mode == "socketio":
        return _SocketIO()
    raise SystemExit(f"unknown mode {mode}")


def _collector(mode: str) -> None:
    """BENCH_GC: "shipped" (default): wirestate tunes its collector as `wirestate serve`
    does, the peers run as their users run them; "same": every server gets that tuning;
    "off": every server runs without the cyclic GC; "none": nobody tunes anything."""
    gc_mode = os.environ.get("BENCH_GC", "shipped")
    if gc_mode == "off":
        gc.disable()
    elif gc_mode == "same" or (gc_mode == "shipped" and mode == "wirestate"):
        from wirestate.adapters.tools.cli import tune_gc

        tune_gc()


async def _serve(
    mode: str, port: int, n: int, events: int, scale: bool, burst: int, paced: int
) -> None:
    _raise_nofile()
    target = _target(mode)
    await target.start(port)
    _collector(mode)
    rss0 = _rss_kib()
    _emit({"listening": port})
    joined = target.connections if scale else target.subscribers
    async with asyncio.timeout(600):
        while joined() < n:  # noqa: ASYNC110 - polled every 10 ms
            await asyncio.sleep(0.01)
    report: dict[str, Any] = {"rss_kib_per_conn": (_rss_kib() - rss0) / max(n, 1)}
    if scale:
        _emit(report)
        await asyncio.sleep(1.0)  # the client still holds the sockets
        await target.stop()
        return
    await asyncio.sleep(0.5)  # let the subscriptions settle
    # Paced first, on connections that carried nothing yet: the flat phase leaves them in
    # states (TCP windows, ACK modes, queues) that differ by server and that changed the
    # load client's kernel time per delivery up to threefold.
    rate = PACED_DELIVERIES / n
    start = time.monotonic()
    for i in range(paced):
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        await target.publish({"ph": "paced", "i": i, "t": time.monotonic(), "pad": PAD})
    report["paced_events"] = paced
    await asyncio.sleep(max(1.0, 1 / rate))  # the last paced fan-out arrives
    cpu0 = time.process_time()
    for i in range(events):
        await target.publish({"ph": "flat", "i": i, "t": time.monotonic(), "pad": PAD})
        if (i + 1) % burst == 0:
            await asyncio.sleep(0)
    async with asyncio.timeout(300):
        while not target.flushed():  # noqa: ASYNC110 - polled every ms
            await asyncio.sleep(0.001)
    report["cpu_s"] = time.process_time() - cpu0
    _emit(report)
    await asyncio.sleep(2.0)
    await target.stop()


# --------------------------------------------------------------------------- load client


async def _connect(port: int, path: str, on_text: Any) -> Any:
    """A lean client connection, retried while the server's backlog refuses it."""
    from wirestate.adapters.tools import leanws

    for attempt in range(50):
        try:
            return await leanws.connect("127.0.0.1", port, path, on_text=on_text, timeout=30)
        except OSError:
            await asyncio.sleep(0.05 * (attempt + 1))
    raise SystemExit("could not connect")


async def _load(mode: str, port: int, n: int, events: int, paced: int, scale: bool) -> None:
    import orjson

    _raise_nofile()
    lat: dict[str, list[float]] = {"flat": [], "paced": []}
    last = {"flat": 0.0, "paced": 0.0}
    first_t = {"flat": 0.0, "paced": 0.0}
    want = {"flat": n * events, "paced": n * paced}
    done = {"flat": asyncio.Event(), "paced": asyncio.Event()}
    loads = orjson.loads
    conns: list[Any] = []

    def on_event(data: dict[str, Any]) -> None:
        now = time.monotonic()
        ph = data["ph"]
        got = lat[ph]
        if not got:
            first_t[ph] = data["t"]
        got.append(now - data["t"])
        last[ph] = now
        if len(got) >= want[ph]:
            done[ph].set()

    welcomed = 0
    all_in = asyncio.Event()

    def make_handler(conn_box: list[Any]) -> Any:
        def on_text(payload: bytes) -> None:
            nonlocal welcomed
            if mode == "socketio":
                if payload[:2] == b"42":
                    on_event(loads(payload[2:])[1])
                elif payload[:1] == b"0":
                    conn_box[0].send_text(b"40")
                elif payload[:2] == b"40":
                    welcomed += 1
                    if welcomed == n:
                        all_in.set()
                elif payload == b"2":
                    conn_box[0].send_text(b"3")
                return
            if mode == "wirestate":
                if payload.startswith(b'{"type":"event"'):
                    on_event(loads(payload)["data"])
                elif payload.startswith(b'{"type":"welcome"'):
                    if not scale:
                        conn_box[0].send_text(b'{"type":"subscribe","topics":["bench"]}')
                    else:
                        welcomed += 1
                        if welcomed == n:
                            all_in.set()
                elif payload.startswith(b'{"type":"subscribed"'):
                    welcomed += 1
                    if welcomed == n:
                        all_in.set()
                return
            on_event(loads(payload)["data"])

        return on_text

    path = {
        "wirestate": "/ws",
        "socketio": "/socket.io/?EIO=4&transport=websocket",
    }.get(mode, "/")
    sem = asyncio.Semaphore(200)

    async def one() -> None:
        nonlocal welcomed
        box: list[Any] = [None]
        async with sem:
            conn = await _connect(port, path, make_handler(box))
        box[0] = conn
        conns.append(conn)
        if mode in ("ws_broadcast", "ws_send"):
            welcomed += 1
            if welcomed == n:
                all_in.set()

    t0 = time.monotonic()
    await asyncio.gather(*(one() for _ in range(n)))
    async with asyncio.timeout(300):
        await all_in.wait()
    report: dict[str, Any] = {"handshakes_per_s": n / (time.monotonic() - t0)}
    if scale:
        _emit(report)
        await asyncio.sleep(2.0)  # held while the server measures
        for c in conns:
            c.abort()
        return
    for ph in ("paced", "flat"):
        try:
            async with asyncio.timeout(120):
                await done[ph].wait()
        except TimeoutError:
            pass
        got = sorted(lat[ph])
        span = max(last[ph] - first_t[ph], 1e-9)
        report[ph] = {
            "received": len(got),
            "expected": want[ph],
            "deliveries_per_s": len(got) / span,
            "p50_ms": got[len(got) // 2] * 1e3 if got else None,
            "p99_ms": got[int(len(got) * 0.99)] * 1e3 if got else None,
            "max_ms": got[-1] * 1e3 if got else None,
        }
    _emit(report)
    for c in conns:
        c.abort()


# --------------------------------------------------------------------------- many topics
#
# Every client has a topic of its own (t.<i>) and shares one (shared). A publisher sends
# --rate publishes/s over WebSocket, round-robin over the own topics and one in --every to
# the shared one: most publishes reach one client, so a server cannot batch writes across
# the clients of one event. Three servers take the same load: wirestate, a plain websockets
# hub (`_plain_hub`) and the floor (`_floor`), one loopback send() per delivery.

SHARED = "shared"


def _schedule(n: int, rate: float, every: int, duration: float) -> tuple[int, int, int]:
    """(publishes, of them to the shared topic, deliveries) of one run: publish i goes to
    the shared topic when i % every == every - 1, to the next own topic otherwise (every
    publish to an own topic when every is 0)."""
    publishes = int(rate * duration)
    shared = publishes // every if every else 0
    return publishes, shared, publishes - shared + shared * n


def _topic_of(i: int, every: int, own: int, n: int) -> tuple[str, int]:
    """Publish i's topic and the next own-topic index."""
    if every and i % every == every - 1:
        return SHARED, own
    return f"t.{own}", (own + 1) % n


def _publish_frame(topic: str, i: int) -> str:
    # "t" first in data: the client reads it without parsing the whole event.
    return (
        f'{{"type":"publish","topic":"{topic}",'
        f'"data":{{"t":{time.monotonic():.6f},"i":{i},"pad":"{PAD}"}}}}'
    )


def _floor_frame() -> bytes:
    """What the floor sends per delivery: a text frame as wirestate would send the event."""
    body = (
        f'{{"type":"event","topic":"t.1234","seq":1,"ts":"2026-01-01T00:00:00.000Z",'
        f'"data":{{"t":1234.567890,"i":123456,"pad":"{PAD}"}}}}'
    ).encode()
    return bytes((0x81, 126)) + len(body).to_bytes(2, "big") + body


def _proc_cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process (every thread), from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


async def _stdin_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


async def _until_closed(ws: Any) -> Any:
    """A connection's messages until it closes, however it closes: the load client aborts
    its connections at the end, which is not the plain hub's failure."""
    from websockets.exceptions import ConnectionClosed

    try:
        while True:
            yield await ws.recv()
    except ConnectionClosed:
        return


def _ping_timeout(interval: float) -> float:
    """Both servers' pong timeout for a ping interval: wirestate's default 10 s, or the
    interval itself when shorter."""
    return min(10.0, interval)


async def _plain_hub(port: int, ping_interval: float) -> Any:
    """The plain server: parses each publish, keeps topic -> connections, forwards with
    broadcast(). No backpressure, no history, no seq gap detection: the least a hub does.
    Keep-alive as websockets runs it (its own pings), at wirestate's interval."""
    import orjson
    from websockets.asyncio.server import broadcast, serve

    subscribers: dict[str, set[Any]] = {}
    seqs: dict[str, int] = {}
    loads, dumps = orjson.loads, orjson.dumps

    async def handler(ws: Any) -> None:
        mine: list[str] = []
        try:
            async for text in _until_closed(ws):
                msg = loads(text)
                kind = msg.get("type")
                if kind == "publish":
                    topic = msg["topic"]
                    seq = seqs.get(topic, 0) + 1
                    seqs[topic] = seq
                    conns = subscribers.get(topic)
                    if conns:
                        event = {"type": "event", "topic": topic, "seq": seq, "data": msg["data"]}
                        broadcast(conns, dumps(event).decode())
                elif kind == "subscribe":
                    for topic in msg["topics"]:
                        subscribers.setdefault(topic, set()).add(ws)
                        mine.append(topic)
                    await ws.send(dumps({"type": "subscribed", "topics": msg["topics"]}).decode())
        finally:
            for topic in mine:
                subscribers[topic].discard(ws)

    return await serve(
        handler,
        "127.0.0.1",
        port,
        compression=None,
        ping_interval=ping_interval,
        ping_timeout=_ping_timeout(ping_interval),
    )


async def _mt_serve(mode: str, port: int, ping_interval: float) -> None:
    """wirestate or the plain hub, until the orchestrator closes stdin."""
    _raise_nofile()
    if mode == "wirestate":
        # The publisher sends thousands of messages a second; subscribers one each.
        keepalive = {"ping_interval": ping_interval, "ping_timeout": _ping_timeout(ping_interval)}
        target = _Wirestate(limits={"messages_per_second": 1e6}, server=keepalive)
        await target.start(port)
        stop = target.stop
    else:
        server = await _plain_hub(port, ping_interval)

        async def stop() -> None:
            server.close()
            await server.wait_closed()

    _collector(mode)
    _emit({"listening": port})
    await _stdin_line()
    await stop()


def _floor(port: int, n: int, rate: float, every: int, duration: float) -> None:
    """Accept n TCP connections, then on "go" send the event frame once per delivery of the
    schedule (blocking sockets, round-robin; all n for a shared publish), paced as the
    publisher is."""
    _raise_nofile()
    lsock = socket.create_server(("127.0.0.1", port), backlog=4096)
    _emit({"listening": port})
    socks = [lsock.accept()[0] for _ in range(n)]
    _emit({"ready": n})
    sys.stdin.readline()
    frame = _floor_frame()
    size = len(frame)
    publishes, _, _ = _schedule(n, rate, every, duration)
    sends = 0
    own = 0
    send_cpu = 0.0  # CPU of the sends alone, without the pacing's sleeps and wake-ups
    cpu = time.process_time
    start = time.monotonic()
    i = 0
    while i < publishes:
        due = min(publishes, int((time.monotonic() - start) * rate) + 1)
        cpu0 = cpu()
        while i < due:
            if every and i % every == every - 1:
                targets = socks
            else:
                targets = [socks[own]]
                own = (own + 1) % n
            for s in targets:
                sent = s.send(frame)
                if sent != size:
                    s.sendall(frame[sent:])
            sends += len(targets)
            i += 1
        send_cpu += cpu() - cpu0
        time.sleep(0.001)
    _emit({"sends": sends, "send_cpu_s": send_cpu})
    sys.stdin.readline()
    for s in socks:
        s.close()


def _percentiles(values: Any) -> tuple[float | None, float | None]:
    """p50 and p99 in ms."""
    if not len(values):
        return None, None
    try:
        import numpy as np

        p50, p99 = np.percentile(np.frombuffer(values, dtype="d"), [50, 99])
        return float(p50) * 1e3, float(p99) * 1e3
    except ImportError:
        got = sorted(values)
        return got[len(got) // 2] * 1e3, got[int(len(got) * 0.99)] * 1e3


async def _mt_load(
    mode: str, port: int, n: int, rate: float, every: int, duration: float, drain: float
) -> None:
    """The clients and the publisher: n subscribers (own topic + shared), then, on "go",
    the paced publishes; reports once every delivery arrived (or `drain` seconds after the
    last publish)."""
    from array import array

    from wirestate.adapters.tools import leanws

    _raise_nofile()
    publishes, _, expected = _schedule(n, rate, every, duration)
    now = time.monotonic
    single, shared = array("d"), array("d")
    received = 0
    last = 0.0
    errors = 0
    subscribed = 0
    all_in = asyncio.Event()
    done = asyncio.Event()
    frame_size = len(_floor_frame())

    if mode == "floor":
        got_bytes = 0
        want_bytes = expected * frame_size

        class Sink(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                nonlocal got_bytes, last
                got_bytes += len(data)
                last = now()
                if got_bytes >= want_bytes:
                    done.set()

        sem = asyncio.Semaphore(200)
        loop = asyncio.get_running_loop()

        async def sink() -> Any:
            async with sem:
                transport, _ = await loop.create_connection(Sink, "127.0.0.1", port)
            return transport

        transports = await asyncio.gather(*(sink() for _ in range(n)))
    else:
        # Own topics are numbered in connection order: client i subscribes to t.<i>.
        def handler(box: list[Any], topic: str) -> Any:
            subscribe = f'{{"type":"subscribe","topics":["{topic}","{SHARED}"]}}'.encode()

            def on_text(payload: bytes) -> None:
                nonlocal received, last, subscribed, errors
                if payload.startswith(b'{"type":"event"'):
                    at = payload.find(b'"t":', 40) + 4
                    lat = now() - float(payload[at : payload.find(b",", at)])
                    (shared if payload[25:31] == b"shared" else single).append(lat)
                    received += 1
                    last = now()
                    if received >= expected:
                        done.set()
                elif payload.startswith(b'{"type":"welcome"'):
                    box[0].send_text(subscribe)
                elif payload.startswith(b'{"type":"subscribed"'):
                    subscribed += 1
                    if subscribed == n:
                        all_in.set()
                elif payload.startswith(b'{"type":"error"'):
                    errors += 1

            return on_text

        path = "/ws" if mode == "wirestate" else "/"
        sem = asyncio.Semaphore(200)
        conns: list[Any] = []

        async def one(i: int) -> None:
            box: list[Any] = [None]
            async with sem:
                conn = await _connect(port, path, handler(box, f"t.{i}"))
            box[0] = conn
            conns.append(conn)
            if mode != "wirestate":  # the plain hub sends no welcome
                conn.send_text(f'{{"type":"subscribe","topics":["t.{i}","{SHARED}"]}}')

        await asyncio.gather(*(one(i) for i in range(n)))
        async with asyncio.timeout(300):
            await all_in.wait()
        welcomed = asyncio.Event()

        def on_publisher_text(payload: bytes) -> None:
            nonlocal errors
            if payload.startswith(b'{"type":"welcome"'):
                welcomed.set()
            elif payload.startswith(b'{"type":"error"'):
                errors += 1

        publisher = await leanws.connect("127.0.0.1", port, path, on_text=on_publisher_text)
        if mode == "wirestate":
            async with asyncio.timeout(30):
                await welcomed.wait()
    # Everything set up so far lives until the end: no collection of the load client's
    # needs to walk it again (a pause here would show as latency of the server's).
    gc.collect()
    gc.freeze()
    _emit({"ready": n})
    await _stdin_line()
    cpu0 = time.process_time()
    pings0 = 0 if mode == "floor" else sum(c.pings for c in conns)
    start = now()
    if mode != "floor":
        own = 0
        i = 0
        while i < publishes:
            due = min(publishes, int((now() - start) * rate) + 1)
            while i < due:
                topic, own = _topic_of(i, every, own, n)
                publisher.send_text(_publish_frame(topic, i))
                i += 1
            await asyncio.sleep(0.001)
    published = now()
    try:
        async with asyncio.timeout(drain + (duration if mode == "floor" else 0.0)):
            await done.wait()
    except TimeoutError:
        pass
    cpu = time.process_time() - cpu0
    pings = 0
    if mode == "floor":
        received = got_bytes // frame_size
        for t in transports:
            t.abort()
    else:
        pings = sum(c.pings for c in conns) - pings0
        for c in conns:
            c.abort()
        publisher.abort()
    span = max(last - start, 1e-9)
    p50, p99 = _percentiles(single + shared)
    sp50, sp99 = _percentiles(single)
    _emit(
        {
            "expected": expected,
            "received": received,
            "deliveries_per_s": received / span,
            "publishes_per_s": None
            if mode == "floor"
            else publishes / max(published - start, 1e-9),
            "p50_ms": p50,
            "p99_ms": p99,
            "single_p50_ms": sp50,
            "single_p99_ms": sp99,
            "errors": errors,
            "client_busy": cpu / span,
            "pings": pings,
        }
    )


def mt_run(
    target: str,
    loop: str,
    n: int,
    rate: float,
    every: int,
    duration: float,
    ping_interval: float,
    drain: float,
) -> dict[str, Any]:
    """One measurement of the many-topics workload: the server child's CPU from "go" until
    the client has every delivery (or gave up draining)."""
    port = _free_port()
    flags = ["--mode", target, "--port", str(port), "-n", str(n), "--rate", str(rate)]
    flags += ["--every", str(every), "--duration", str(duration)]
    flags += ["--ping-interval", str(ping_interval), "--drain", str(drain)]
    role = "mt-floor" if target == "floor" else "mt-server"
    server = subprocess.Popen(
        _pinned(0, loop, "--role", role, *flags),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    client = None
    try:
        assert server.stdin is not None
        assert server.stdout is not None
        json.loads(server.stdout.readline())  # listening
        client = subprocess.Popen(
            _pinned(1, loop, "--role", "mt-client", *flags),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert client.stdin is not None
        assert client.stdout is not None
        json.loads(client.stdout.readline())  # every client connected and subscribed
        if target == "floor":
            json.loads(server.stdout.readline())  # every connection accepted
        user0, sys0 = _proc_cpu_split(server.pid)
        client.stdin.write("go\n")
        client.stdin.flush()
        if target == "floor":
            server.stdin.write("go\n")
            server.stdin.flush()
        result: dict[str, Any] = json.loads(client.stdout.readline())
        user1, sys1 = _proc_cpu_split(server.pid)
        result["user_s"], result["sys_s"] = user1 - user0, sys1 - sys0
        result["cpu_s"] = result["user_s"] + result["sys_s"]
        if target == "floor":
            result.update(json.loads(server.stdout.readline()))
        server.stdin.close()
        server.wait(timeout=60)
        client.wait(timeout=60)
    finally:
        for child in (server, client):
            if child is not None and child.poll() is None:
                child.kill()
                child.wait()
    result["us_per_delivery"] = result["cpu_s"] / max(result["received"], 1) * 1e6
    result["sys_us_per_delivery"] = result["sys_s"] / max(result["received"], 1) * 1e6
    result["us_per_ping"] = result["cpu_s"] / max(result["pings"], 1) * 1e6
    if target == "floor":
        # The floor is the send itself: its process CPU also counts the pacing loop.
        result["process_us_per_delivery"] = result["us_per_delivery"]
        result["us_per_delivery"] = result["send_cpu_s"] / max(result["sends"], 1) * 1e6
    return result


# --------------------------------------------------------------------------- orchestration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pinned(cpu: int, loop: str, *args: str) -> list[str]:
    base = [sys.executable, str(HERE), "--loop", loop, *args]
    return ["taskset", "-c", str(cpu), *base] if shutil.which("taskset") else base


def one_run(
    mode: str,
    n: int,
    events: int,
    scale: bool,
    loop: str,
    burst: int = 1,
    seconds: float = PACED_SECONDS,
) -> dict[str, Any]:
    port = _free_port()
    paced = max(1, int(PACED_DELIVERIES / n * seconds))
    flags = ["--mode", mode, "--port", str(port), "-n", str(n), "--events", str(events)]
    flags += ["--paced", str(paced), "--burst", str(burst)] + (["--scale-run"] if scale else [])
    server = subprocess.Popen(
        _pinned(0, loop, "--role", "server", *flags), stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        json.loads(server.stdout.readline())  # listening
        client = subprocess.run(
            _pinned(1, loop, "--role", "client", *flags),
            capture_output=True,
            text=True,
            timeout=900,
            check=True,
        )
        out, _ = server.communicate(timeout=300)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result.update(json.loads(client.stdout.strip().splitlines()[-1]))
    if not scale:
        result["us_per_delivery"] = result["cpu_s"] / (n * events) * 1e6
    return result


def _median(values: list[float | None]) -> float | None:
    real = [v for v in values if v is not None]
    return statistics.median(real) if real else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--role",
        choices=("orchestrate", "server", "client", "mt-server", "mt-floor", "mt-client"),
        default="orchestrate",
    )
    ap.add_argument(
        "--workload",
        choices=("fanout", "many-topics", "keepalive"),
        default="fanout",
        help="fanout: the peers table (default); many-topics: a topic per client;"
        " keepalive: idle connections, server CPU per ping",
    )
    ap.add_argument("--mode", default="wirestate")
    ap.add_argument("--modes", default="wirestate,ws_broadcast,ws_send,socketio")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("-n", type=int, help="clients (many-topics: default 10,000)")
    ap.add_argument("--events", type=int, default=200)
    ap.add_argument("--paced", type=int, default=30, help=argparse.SUPPRESS)
    ap.add_argument(
        "--paced-seconds",
        type=float,
        default=PACED_SECONDS,
        help="fan-out: length of the paced phase (10,000 deliveries/s)",
    )
    ap.add_argument("--sizes", default="100,1000,5000")
    ap.add_argument("--scale", default="1000,5000,10000,max")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--burst", type=int, default=1, help="flat phase: events published per loop iteration"
    )
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    ap.add_argument(
        "--core-runs", type=int, default=3, help="runs of bench/core_bench.py (0 skips it)"
    )
    ap.add_argument("--rate", type=float, default=5000.0, help="many-topics: publishes/s")
    ap.add_argument(
        "--every",
        type=int,
        default=100,
        help="many-topics: one publish in EVERY goes to the shared topic (0: none)",
    )
    ap.add_argument("--duration", type=float, default=20.0, help="many-topics: seconds")
    ap.add_argument(
        "--ping-interval",
        type=float,
        help="many-topics, keepalive: both servers' ping interval (30 s, wirestate's"
        " default; keepalive: 2 s)",
    )
    ap.add_argument(
        "--drain",
        type=float,
        default=120.0,
        help="many-topics: seconds the clients wait for the last deliveries after the last"
        " publish (what has not arrived by then counts as lost)",
    )
    ap.add_argument(
        "--loops", default="asyncio,uvloop", help="many-topics: event loops, one row each"
    )
    ap.add_argument("--targets", default="wirestate,ws_plain,floor", help="many-topics")
    ap.add_argument("--scale-run", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.install()
    if args.n is None:
        args.n = 1000 if args.workload == "fanout" else 10_000
    if args.ping_interval is None:
        args.ping_interval = 2.0 if args.workload == "keepalive" else 30.0
    if args.role == "server":
        asyncio.run(
            _serve(
                args.mode, args.port, args.n, args.events, args.scale_run, args.burst, args.paced
            )
        )
        return 0
    if args.role == "client":
        asyncio.run(_load(args.mode, args.port, args.n, args.events, args.paced, args.scale_run))
        return 0
    if args.role == "mt-server":
        asyncio.run(_mt_serve(args.mode, args.port, args.ping_interval))
        return 0
    if args.role == "mt-floor":
        _floor(args.port, args.n, args.rate, args.every, args.duration)
        return 0
    if args.role == "mt-client":
        asyncio.run(
            _mt_load(args.mode, args.port, args.n, args.rate, args.every, args.duration, args.drain)
        )
        return 0
    if args.workload == "many-topics":
        return many_topics(args)
    if args.workload == "keepalive":
        return keepalive(args)

    hard = _raise_nofile()
    modes = [m for m in args.modes.split(",") if m]
    sizes = [int(s) for s in args.sizes.split(",") if s]
    scale_sizes = [(hard - 1000) if s == "max" else int(s) for s in args.scale.split(",") if s]
    fan: dict[str, dict[int, list[dict[str, Any]]]] = {m: {n: [] for n in sizes} for m in modes}
    scale: dict[str, dict[int, list[dict[str, Any]]]] = {
        m: {k: [] for k in scale_sizes} for m in ("wirestate", "ws_broadcast")
    }
    for r in range(args.runs):
        for n in sizes:
            for mode in modes:
                events = max(20, args.events * 1000 // max(n, 1000))  # ~200k deliveries max
                res = one_run(
                    mode,
                    n,
                    events,
                    scale=False,
                    loop=args.loop,
                    burst=args.burst,
                    seconds=args.paced_seconds,
                )
                fan[mode][n].append(res)
                print(
                    f"run {r + 1} N={n} {mode}: {res['us_per_delivery']:.2f} us/delivery,"
                    f" flat {res['flat']['deliveries_per_s']:,.0f}/s"
                    f" p99 {res['paced']['p99_ms']:.1f} ms paced",
                    file=sys.stderr,
                    flush=True,
                )
        for k in scale_sizes:
            for mode in scale:
                res = one_run(mode, k, 0, scale=True, loop=args.loop)
                scale[mode][k].append(res)
                print(
                    f"run {r + 1} K={k} {mode}: {res['handshakes_per_s']:,.0f} handshakes/s,"
                    f" {res['rss_kib_per_conn']:.2f} KiB/conn",
                    file=sys.stderr,
                    flush=True,
                )
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "loop": args.loop},
        "burst": args.burst,
        "runs": args.runs,
        "fanout": {},
        "scale": {},
    }
    for mode in modes:
        for n in sizes:
            rs = fan[mode][n]
            report["fanout"].setdefault(str(n), {})[mode] = {
                "us_per_delivery": _median([x["us_per_delivery"] for x in rs]),
                "flat_deliveries_per_s": _median([x["flat"]["deliveries_per_s"] for x in rs]),
                "flat_p50_ms": _median([x["flat"]["p50_ms"] for x in rs]),
                "flat_p99_ms": _median([x["flat"]["p99_ms"] for x in rs]),
                "paced_p50_ms": _median([x["paced"]["p50_ms"] for x in rs]),
                "paced_p99_ms": _median([x["paced"]["p99_ms"] for x in rs]),
                "paced_max_ms": _median([x["paced"]["max_ms"] for x in rs]),
                "lost": sum(
                    x[ph]["expected"] - x[ph]["received"] for x in rs for ph in ("flat", "paced")
                ),
            }
    for mode in scale:
        for k in scale_sizes:
            rs = scale[mode][k]
            report["scale"].setdefault(str(k), {})[mode] = {
                "handshakes_per_s": _median([x["handshakes_per_s"] for x in rs]),
                "rss_kib_per_conn": _median([x["rss_kib_per_conn"] for x in rs]),
            }
    for row in report["fanout"].values():
        w = row.get("wirestate")
        if w is None:
            continue
        row["ratios"] = {
            peer: {
                "cpu": w["us_per_delivery"] / row[peer]["us_per_delivery"],
                "paced_p99": w["paced_p99_ms"] / row[peer]["paced_p99_ms"],
            }
            for peer in row
            if peer != "wirestate" and peer != "ratios"
        }
    for row in report["scale"].values():
        row["ratios"] = {
            "handshakes": row["wirestate"]["handshakes_per_s"]
            / row["ws_broadcast"]["handshakes_per_s"],
            "rss": row["wirestate"]["rss_kib_per_conn"] / row["ws_broadcast"]["rss_kib_per_conn"],
        }
    if args.core_runs:
        report["core"] = core(args.core_runs)
    md = markdown(report)
    return _emit_report(args, report, md)


def _emit_report(args: argparse.Namespace, report: dict[str, Any], md: str) -> int:
    """Print the table; write the JSON and the markdown where asked."""
    print(md)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(md)
    return 0


def _mt_runs(
    args: argparse.Namespace,
    rows: list[tuple[str, str]],
    rate: float,
    every: int,
    drain: float,
    line: Callable[[dict[str, Any]], str],
) -> dict[str, list[dict[str, Any]]]:
    """``--runs`` rounds of `mt_run` over ``rows`` (loop, target; loop "-": the floor, which
    has none), interleaved within each round; each result logged with ``line``. Results by
    "loop/target"."""
    raw: dict[str, list[dict[str, Any]]] = {f"{lp}/{t}": [] for lp, t in rows}
    for r in range(args.runs):
        for lp, t in rows:
            loop = "asyncio" if lp == "-" else lp
            res = mt_run(t, loop, args.n, rate, every, args.duration, args.ping_interval, drain)
            raw[f"{lp}/{t}"].append(res)
            print(f"run {r + 1} {lp}/{t}: {line(res)}", file=sys.stderr, flush=True)
    return raw


def many_topics(args: argparse.Namespace) -> int:
    """The many-topics workload: every target in every loop, interleaved, --runs times."""
    _raise_nofile()
    targets = [t for t in args.targets.split(",") if t]
    loops = [lp for lp in args.loops.split(",") if lp]
    rows = [(lp, t) for lp in loops for t in targets if t != "floor"]
    if "floor" in targets:
        rows.append(("-", "floor"))  # no event loop: one row
    raw = _mt_runs(
        args,
        rows,
        args.rate,
        args.every,
        args.drain,
        lambda res: (
            f"{res['us_per_delivery']:.2f} us/delivery ({res['sys_us_per_delivery']:.2f} system),"
            f" {res['deliveries_per_s']:,.0f} deliveries/s,"
            f" {res['received']:,}/{res['expected']:,} received,"
            f" client busy {res['client_busy']:.0%}"
        ),
    )
    publishes, shared, deliveries = _schedule(args.n, args.rate, args.every, args.duration)
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "workload": "many-topics",
        "params": {
            "clients": args.n,
            "rate": args.rate,
            "every": args.every,
            "duration": args.duration,
            "ping_interval": args.ping_interval,
            "publishes": publishes,
            "shared_publishes": shared,
            "deliveries": deliveries,
        },
        "runs": args.runs,
        "results": {},
    }
    keys = ("us_per_delivery", "deliveries_per_s", "publishes_per_s", "p50_ms", "p99_ms")
    keys += ("single_p50_ms", "single_p99_ms", "client_busy", "process_us_per_delivery")
    keys += ("sys_us_per_delivery",)
    for lp, t in rows:
        rs = raw[f"{lp}/{t}"]
        med: dict[str, Any] = {k: _median([x.get(k) for x in rs]) for k in keys}
        med["lost"] = sum(x["expected"] - x["received"] for x in rs)
        med["errors"] = sum(x["errors"] for x in rs)
        report["results"].setdefault(lp, {})[t] = med
    floor = report["results"].get("-", {}).get("floor")
    for row in report["results"].values():
        w = row.get("wirestate")
        if w is None:
            continue
        plain = row.get("ws_plain")
        w["vs_plain"] = w["us_per_delivery"] / plain["us_per_delivery"] if plain else None
        w["vs_floor"] = w["us_per_delivery"] / floor["us_per_delivery"] if floor else None
        if plain and floor:
            plain["vs_floor"] = plain["us_per_delivery"] / floor["us_per_delivery"]
    md = mt_markdown(report)
    return _emit_report(args, report, md)


def keepalive(args: argparse.Namespace) -> int:
    """Idle connections kept alive: the many-topics clients (each subscribed, nothing
    published), both servers pinging every ``--ping-interval`` for ``--duration`` seconds;
    the server's CPU per ping answered, and what that makes at 30 s (wirestate's default)."""
    _raise_nofile()
    targets = [t for t in args.targets.split(",") if t and t != "floor"]
    loops = [lp for lp in args.loops.split(",") if lp]
    raw = _mt_runs(
        args,
        [(lp, t) for lp in loops for t in targets],
        0.0,  # nothing published: the clients sit idle for --duration
        0,
        args.duration,
        lambda res: (
            f"{res['us_per_ping']:.2f} us/ping,"
            f" {res['pings']:,} pings answered in {args.duration:g} s"
        ),
    )
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "workload": "keepalive",
        "params": {
            "clients": args.n,
            "ping_interval": args.ping_interval,
            "duration": args.duration,
        },
        "runs": args.runs,
        "results": {},
    }
    for lp in loops:
        row = report["results"].setdefault(lp, {})
        for t in targets:
            rs = raw[f"{lp}/{t}"]
            us = _median([x["us_per_ping"] for x in rs])
            assert us is not None
            row[t] = {
                "us_per_ping": us,
                "pings": _median([x["pings"] for x in rs]),
                # One ping per connection per 30 s, as a share of one core.
                "idle_core_share_at_30s": us * 1e-6 * args.n / 30.0,
            }
        if "wirestate" in row and "ws_plain" in row:
            row["wirestate"]["vs_plain"] = (
                row["wirestate"]["us_per_ping"] / row["ws_plain"]["us_per_ping"]
            )
    lines = [
        f"{args.n:,} idle connections, a ping every {args.ping_interval:g} s for"
        f" {args.duration:g} s",
        "",
        "| loop | server | CPU us/ping | pings answered | idle CPU at 30 s | vs plain |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for lp, row in report["results"].items():
        for t, m in row.items():
            vs = m.get("vs_plain")
            lines.append(
                f"| {lp} | {t} | {m['us_per_ping']:.1f} | {m['pings']:,.0f} |"
                f" {m['idle_core_share_at_30s']:.1%} | {'' if vs is None else f'{vs:.2f}x'} |"
            )
    return _emit_report(args, report, "\n".join(lines) + "\n")


def mt_markdown(report: dict[str, Any]) -> str:
    def ms(a: float | None, b: float | None) -> str:
        return "" if a is None or b is None else f"{a:.1f} / {b:.1f}"

    def x(v: float | None) -> str:
        return "" if v is None else f"{v:.2f}x"

    p = report["params"]
    lines = [
        f"{p['clients']:,} clients, {p['rate']:,.0f} publishes/s for {p['duration']:g} s,"
        + (f" one in {p['every']} shared" if p["every"] else " none shared")
        + f": {p['deliveries']:,} deliveries"
        + (f"; pings every {p['ping_interval']:g} s" if "ping_interval" in p else ""),
        "",
        "| loop | server | CPU us/delivery | of it system | deliveries/s | p50 / p99 ms |"
        " own-topic p50 / p99 ms | lost | client busy | vs plain | vs floor |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lp, row in report["results"].items():
        for t, m in row.items():
            # The floor's system time is its whole process's (pacing included): not shown.
            system = "" if t == "floor" else f"{m['sys_us_per_delivery']:.2f}"
            lines.append(
                f"| {lp} | {t} | {m['us_per_delivery']:.2f} | {system} |"
                f" {m['deliveries_per_s']:,.0f} |"
                f" {ms(m['p50_ms'], m['p99_ms'])} |"
                f" {ms(m['single_p50_ms'], m['single_p99_ms'])} | {m['lost']} |"
                f" {m['client_busy']:.0%} | {x(m.get('vs_plain'))} | {x(m.get('vs_floor'))} |"
            )
    return "\n".join(lines) + "\n"


def core(runs: int) -> dict[str, Any]:
    """The core's micro-benchmarks (bench/core_bench.py), pinned to CPU 1: one lifecycle,
    one routing to 10,000 subscribers, the explorer's states per second."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "core.json"
        cmd = [sys.executable, str(HERE.with_name("core_bench.py")), "--runs", str(runs)]
        cmd += ["--json", str(out)]
        if shutil.which("taskset"):
            cmd = ["taskset", "-c", "1", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=900)
        median: dict[str, Any] = json.loads(out.read_text())["median"]
    return {
        "life_us": median["life_us"],
        "route_10k_ms": median["route_ms"],
        "check_states": median["check_states"],
        "check_states_per_s": median["check_states"] / median["check_seconds"],
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| N | server | CPU us/delivery | flat deliveries/s | flat p50 / p99 ms |"
        " paced p50 / p99 / max ms | lost | CPU vs wirestate |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n, row in report["fanout"].items():
        w = row.get("wirestate")
        for mode, m in row.items():
            if mode == "ratios":
                continue
            ratio = (
                ""
                if w is None or mode == "wirestate"
                else (f"{w['us_per_delivery'] / m['us_per_delivery']:.2f}x")
            )
            lines.append(
                f"| {int(n):,} | {mode} | {m['us_per_delivery']:.2f} |"
                f" {m['flat_deliveries_per_s']:,.0f} |"
                f" {m['flat_p50_ms']:.1f} / {m['flat_p99_ms']:.1f} |"
                f" {m['paced_p50_ms']:.1f} / {m['paced_p99_ms']:.1f} / {m['paced_max_ms']:.1f} |"
                f" {m['lost']} | {ratio} |"
            )
    lines += [
        "",
        "| K idle connections | server | handshakes/s | RSS KiB/connection |",
        "|---:|---|---:|---:|",
    ]
    for k, row in report["scale"].items():
        for mode, m in row.items():
            if mode == "ratios":
                continue
            lines.append(
                f"| {int(k):,} | {mode} | {m['handshakes_per_s']:,.0f} |"
                f" {m['rss_kib_per_conn']:.2f} |"
            )
    if "core" in report:
        c = report["core"]
        lines += [
            "",
            "| core micro-benchmark | median |",
            "|---|---:|",
            f"| one connection's life | {c['life_us']:.1f} us |",
            f"| one event routed to 10,000 subscribers | {c['route_10k_ms']:.2f} ms |",
            f"| explorer, 3 clients depth 8 | {c['check_states']:,.0f} states,"
            f" {c['check_states_per_s']:,.0f}/s |",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
