"""Fan-out and idle-memory benchmark: wirestate against a plain websockets server, same run.

    python bench/fanout.py [--subscribers 1000] [--events 100] [--runs 3]
                           [--idle 10000] [--json bench/results/fanout.json]

Each run starts the server under test in its own process pinned to CPU 0 (taskset) and the
load client in another pinned to CPU 1, compression off everywhere. Servers:

* ``wirestate``: ``WirestateServer`` (bounded outboxes, coalesced writes, keep-alive on);
  events go through ``publish`` as an application would;
* ``ws_broadcast``: websockets' own ``broadcast()`` to every connection (no backpressure);
* ``ws_send``: ``await ws.send()`` per connection, one task per connection.

The server waits for every subscriber, publishes ``--events`` events of ~200 bytes (flat out,
yielding to the loop between events), waits until every byte is written, and reports the
CPU seconds its own process spent from the first publish to the last write
(``time.process_time``): CPU per delivery stays meaningful when the client is the
bottleneck. The client reports publish-to-receive latency (monotonic clock, shared by both
processes). Idle memory: the server's RSS growth per connection for ``--idle`` connections
that only hold their socket open.

Reported: medians over ``--runs``; the ratios are wirestate / baseline from the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
PAYLOAD_PAD = "x" * 120  # with the other fields, a ~200-byte event frame


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# --------------------------------------------------------------------------- server side


async def _serve(mode: str, port: int, subscribers: int, events: int, idle: bool) -> None:
    import orjson
    from websockets.asyncio.server import broadcast, serve

    connected: set[Any] = set()
    ready = asyncio.Event()
    report: dict[str, Any] = {"mode": mode}

    def data(i: int) -> dict[str, Any]:
        return {"i": i, "t": time.monotonic(), "pad": PAYLOAD_PAD}

    if mode == "wirestate":
        from wirestate.adapters.server import WirestateServer
        from wirestate.models.settings import Settings

        settings = Settings.model_validate(
            {"server": {"port": port, "send_queue_size": max(256, events + 16)}}
        )
        server = WirestateServer(settings, epoch="bench")
        await server.start()
        rss0 = _rss_kib()
        hub = server.hub
        assert hub is not None

        def subscribed() -> int:
            topic = hub.topics.get("bench")
            return len(topic.subscribers) if topic is not None else 0

        while subscribed() < subscribers:  # noqa: ASYNC110 - polled once per 10 ms
            await asyncio.sleep(0.01)
        report["rss_kib_per_conn"] = (_rss_kib() - rss0) / subscribers
        if idle:
            print(json.dumps(report), flush=True)
            await server.stop()
            return
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for i in range(events):
            await server.publish("bench", data(i))
            await asyncio.sleep(0)
        # Written means: out of every outbox and out of every transport buffer.
        while any(c.outbox for c in hub.clients.values()) or any(  # noqa: ASYNC110
            c.ws.transport.get_write_buffer_size() for c in server._clients.values()
        ):
            await asyncio.sleep(0.001)
        report["cpu_s"] = time.process_time() - cpu0
        report["wall_s"] = time.perf_counter() - wall0
        print(json.dumps(report), flush=True)
        await server.stop()
        return

    async def handler(ws: Any) -> None:
        connected.add(ws)
        if len(connected) >= subscribers:
            ready.set()
        try:
            await ws.wait_closed()
        finally:
            connected.discard(ws)

    async with serve(handler, "127.0.0.1", port, compression=None, ping_interval=None):
        rss0 = _rss_kib()
        await ready.wait()
        report["rss_kib_per_conn"] = (_rss_kib() - rss0) / subscribers
        if idle:
            print(json.dumps(report), flush=True)
            return
        conns = list(connected)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for i in range(events):
            event = {"type": "event", "topic": "bench", "seq": i + 1, "data": data(i)}
            frame = orjson.dumps(event).decode()
            if mode == "ws_broadcast":
                broadcast(conns, frame)
            else:
                await asyncio.gather(*(ws.send(frame) for ws in conns))
            await asyncio.sleep(0)
        while any(ws.transport.get_write_buffer_size() for ws in conns):  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        report["cpu_s"] = time.process_time() - cpu0
        report["wall_s"] = time.perf_counter() - wall0
        print(json.dumps(report), flush=True)


# --------------------------------------------------------------------------- client side


async def _load(mode: str, port: int, subscribers: int, events: int, idle: bool) -> None:
    import orjson
    from websockets.asyncio.client import connect

    url = f"ws://127.0.0.1:{port}/ws" if mode == "wirestate" else f"ws://127.0.0.1:{port}/"
    latencies: list[float] = []
    sem = asyncio.Semaphore(200)

    async def one() -> Any:
        async with sem:
            ws = await connect(url, compression=None, ping_interval=None, open_timeout=60)
        if mode == "wirestate":
            await ws.recv()  # welcome
            await ws.send('{"type":"subscribe","topics":["bench"]}')
            await ws.recv()  # subscribed
        return ws

    conns = await asyncio.gather(*(one() for _ in range(subscribers)))
    if idle:
        await asyncio.sleep(2.0)  # hold the sockets while the server measures
        await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)
        return

    async def drain(ws: Any) -> None:
        got = 0
        while got < events:
            raw = await ws.recv()
            now = time.monotonic()
            msg = orjson.loads(raw)
            if msg.get("type") == "event" and msg.get("topic") == "bench":
                latencies.append(now - msg["data"]["t"])
                got += 1

    await asyncio.wait_for(asyncio.gather(*(drain(ws) for ws in conns)), 300)
    latencies.sort()
    print(
        json.dumps(
            {
                "received": len(latencies),
                "p50_ms": latencies[len(latencies) // 2] * 1e3,
                "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
                "max_ms": latencies[-1] * 1e3,
            }
        ),
        flush=True,
    )
    await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)


# --------------------------------------------------------------------------- orchestration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pinned(cpu: int, *args: str) -> list[str]:
    base = [sys.executable, str(HERE), *args]
    return ["taskset", "-c", str(cpu), *base] if shutil.which("taskset") else base


def one_run(mode: str, subscribers: int, events: int, idle: bool) -> dict[str, Any]:
    port = _free_port()
    flags = ["--port", str(port), "--subscribers", str(subscribers), "--events", str(events)]
    if idle:
        flags.append("--idle-run")
    server = subprocess.Popen(
        _pinned(0, "--role", "server", "--mode", mode, *flags), stdout=subprocess.PIPE, text=True
    )
    time.sleep(1.0 if mode == "wirestate" else 0.5)
    client = subprocess.run(
        _pinned(1, "--role", "client", "--mode", mode, *flags),
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    out, _ = server.communicate(timeout=120)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    if not idle:
        result.update(json.loads(client.stdout.strip().splitlines()[-1]))
        result["us_per_delivery"] = result["cpu_s"] / (subscribers * events) * 1e6
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description="fan-out benchmark")
    ap.add_argument("--role", choices=("orchestrate", "server", "client"), default="orchestrate")
    ap.add_argument("--mode", default="wirestate")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--subscribers", type=int, default=1000)
    ap.add_argument("--events", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--idle", type=int, default=10000, help="connections for the idle test, 0 skips"
    )
    ap.add_argument("--idle-run", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.role == "server":
        asyncio.run(_serve(args.mode, args.port, args.subscribers, args.events, args.idle_run))
        return 0
    if args.role == "client":
        asyncio.run(_load(args.mode, args.port, args.subscribers, args.events, args.idle_run))
        return 0

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    modes = ("wirestate", "ws_broadcast", "ws_send")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for r in range(args.runs):
        for mode in modes:  # interleaved, so drift hits every mode alike
            res = one_run(mode, args.subscribers, args.events, idle=False)
            runs[mode].append(res)
            print(
                f"run {r + 1} {mode}: {res['us_per_delivery']:.2f} us/delivery, "
                f"p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms",
                flush=True,
            )
    keys = ("us_per_delivery", "p50_ms", "p99_ms", "max_ms", "rss_kib_per_conn")
    median = {m: {k: statistics.median(x[k] for x in runs[m]) for k in keys} for m in modes}
    report: dict[str, Any] = {
        "subscribers": args.subscribers,
        "events": args.events,
        "runs": args.runs,
        "median": median,
        "cpu_ratio_vs_broadcast": median["wirestate"]["us_per_delivery"]
        / median["ws_broadcast"]["us_per_delivery"],
        "cpu_ratio_vs_send": median["wirestate"]["us_per_delivery"]
        / median["ws_send"]["us_per_delivery"],
    }
    if args.idle:
        idle = {
            m: one_run(m, args.idle, 0, idle=True)["rss_kib_per_conn"]
            for m in ("wirestate", "ws_broadcast")
        }
        report["idle_kib_per_conn"] = idle
        report["idle_ratio"] = idle["wirestate"] / idle["ws_broadcast"]
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
