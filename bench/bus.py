"""Cross-node delivery through Redis beside one node, same run.

    python bench/bus.py [--subscribers 1000] [--events 200] [--rate 10] [--runs 3]
                        [--redis redis://127.0.0.1:6379/0] [--json bench/results/bus.json]

Setups, each `wirestate serve` processes pinned to CPU 0 (taskset), the load client pinned
to CPU 1, compression off:

* ``single``: one node, the in-memory bus; every subscriber on it.
* ``redis``: two nodes on the Redis bus, half the subscribers on each; events are published
  on node A, so half the deliveries cross Redis to node B (and A's own go through Redis too:
  with a bus, every node delivers in the stream's order).

Per setup and run, two phases: ``flat`` publishes ``--events`` events as fast as a
WebSocket publisher can send them; ``paced`` publishes ``--rate`` events per second for
``--events`` events (at 1,000 subscribers and 10/s: 10,000 deliveries/s). Each event carries
its publish time (the wall clock, shared by the processes); the client records
publish-to-receive latency per delivery and the deliveries per second from the first publish
to the last receive. Reported: medians over ``--runs``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

PAD = "x" * 120  # a ~200-byte event frame


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pinned(cpu: int, args: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *args] if shutil.which("taskset") else args


def _node(stack: ExitStack, config: Path) -> int:
    port = _free_port()
    exe = Path(sys.executable).with_name("wirestate")
    cmd = [str(exe), "serve", "--config", str(config), "--port", str(port)]
    proc = subprocess.Popen(_pinned(0, cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.callback(proc.wait)
    stack.callback(proc.terminate)
    return port


async def _wait_ready(port: int) -> None:
    import httpx

    async with httpx.AsyncClient() as http, asyncio.timeout(30):
        while True:
            try:
                if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)


async def _load(ports: list[int], subscribers: int, events: int, rate: float) -> dict[str, Any]:
    """The client side: subscribers spread over ``ports``, a publisher on the first."""
    import orjson

    from wirestate.adapters.tools import leanws

    await asyncio.gather(*(_wait_ready(p) for p in ports))
    topic = f"bench.{time.time_ns()}"
    latencies: dict[str, list[float]] = {"flat": [], "paced": []}
    last_rx = {"flat": 0.0, "paced": 0.0}
    expected = {"flat": events * subscribers, "paced": events * subscribers}
    got = {"flat": 0, "paced": 0}
    done = {"flat": asyncio.Event(), "paced": asyncio.Event()}
    joined = asyncio.Event()
    count = {"subscribed": 0}
    loads = orjson.loads

    def on_text(raw: bytes) -> None:
        if raw.startswith(b'{"type":"event"'):
            now = time.time()
            data = loads(raw)["data"]
            phase = data["phase"]
            latencies[phase].append(now - data["t"])
            last_rx[phase] = now
            got[phase] += 1
            if got[phase] == expected[phase]:
                done[phase].set()
        elif raw.startswith(b'{"type":"subscribed"'):
            count["subscribed"] += 1
            if count["subscribed"] == subscribers:
                joined.set()

    subscribe = orjson.dumps({"type": "subscribe", "topics": [topic]})
    subs = []
    for i in range(subscribers):
        conn = await leanws.connect("127.0.0.1", ports[i % len(ports)], on_text=on_text)
        conn.send_text(subscribe)
        subs.append(conn)
    async with asyncio.timeout(60):
        await joined.wait()
    pub = await leanws.connect("127.0.0.1", ports[0], on_text=lambda raw: None)

    out: dict[str, Any] = {}
    for phase in ("flat", "paced"):
        start = time.time()
        for i in range(events):
            data = {"phase": phase, "i": i, "t": time.time(), "pad": PAD}
            pub.send_text(orjson.dumps({"type": "publish", "topic": topic, "data": data}))
            if phase == "flat" and i % 20 == 19:
                await asyncio.sleep(0)  # let the socket drain now and then
            if phase == "paced":
                await asyncio.sleep(max(0.0, start + (i + 1) / rate - time.time()))
        try:
            async with asyncio.timeout(120):
                await done[phase].wait()
        except TimeoutError:
            pass
        lat = sorted(latencies[phase])
        span = max(last_rx[phase] - start, 1e-9)
        out[phase] = {
            "deliveries": got[phase],
            "expected": expected[phase],
            "deliveries_per_s": round(got[phase] / span),
            "p50_ms": round(lat[len(lat) // 2] * 1000, 2) if lat else None,
            "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 2) if lat else None,
            "max_ms": round(lat[-1] * 1000, 2) if lat else None,
        }
    pub.abort()
    for conn in subs:
        conn.abort()
    return out


def one_run(setup: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        config = Path(tmp) / "bench.toml"
        text = "[history]\nsize = 1000\n[server]\nsend_queue_size = 1024\n"
        text += "[limits]\nmessages_per_second = 100000.0\nmax_connections_per_ip = 100000\n"
        if setup == "redis":
            text += f'[bus]\nkind = "redis"\nurl = "{args.redis}"\n'
        config.write_text(text)
        ports = [_node(stack, config) for _ in range(2 if setup == "redis" else 1)]
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--client",
            json.dumps(
                {
                    "ports": ports,
                    "subscribers": args.subscribers,
                    "events": args.events,
                    "rate": args.rate,
                }
            ),
        ]
        raw = subprocess.run(_pinned(1, cmd), capture_output=True, text=True, check=True).stdout
        result: dict[str, Any] = json.loads(raw.strip().splitlines()[-1])
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        spec = json.loads(args.client)
        result = asyncio.run(
            _load(spec["ports"], spec["subscribers"], spec["events"], spec["rate"])
        )
        print(json.dumps(result))
        return 0
    runs: dict[str, list[dict[str, Any]]] = {"single": [], "redis": []}
    for r in range(args.runs):
        for setup in ("single", "redis"):  # interleaved: drift hits both alike
            runs[setup].append(one_run(setup, args))
            print(f"run {r + 1} {setup}: {json.dumps(runs[setup][-1])}", file=sys.stderr)
    summary: dict[str, Any] = {
        "subscribers": args.subscribers,
        "events": args.events,
        "rate": args.rate,
        "runs": args.runs,
    }
    for setup, results in runs.items():
        summary[setup] = {
            phase: {
                key: statistics.median(r[phase][key] for r in results)
                for key in ("deliveries_per_s", "p50_ms", "p99_ms", "max_ms")
            }
            | {"lost": sum(r[phase]["expected"] - r[phase]["deliveries"] for r in results)}
            for phase in ("flat", "paced")
        }
    print("| setup | phase | deliveries/s | p50 ms | p99 ms | max ms | lost |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for setup in ("single", "redis"):
        for phase in ("flat", "paced"):
            m = summary[setup][phase]
            print(
                f"| {setup} | {phase} | {m['deliveries_per_s']:,} | {m['p50_ms']} |"
                f" {m['p99_ms']} | {m['max_ms']} | {m['lost']} |"
            )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
