"""Benchmarks of the pure core (their speed targets), with baselines from the same run.

    python bench/core_bench.py [--runs 5] [--json bench/results/core.json]

Measures, each as the median of ``--runs`` runs (each run the best of several repeats, so a
noisy neighbour inflates neither):

* ``life``: one connection's whole life in the core, handshake to unregistered (connect,
  accept, start, reader_done, writer_done, unregister, draining actions): CPU microseconds.
  Beside it, the same five lifecycle triggers fired through ``MACHINE.events[...].trigger``
  (transitions itself) and a raw websockets handshake on loopback (server and client in
  this process), so the ratio to the handshake is measured on this machine, not assumed.
* ``route``: publishing one ~200-byte event to 10,000 subscribers: milliseconds, and the
  number of objects allocated per recipient (tracemalloc blocks / subscribers).
* ``check``: ``wirestate check --clients 3`` at depth 8: distinct states and seconds.

Pin it to one core for steadier numbers: ``taskset -c 1 python bench/core_bench.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import statistics
import sys
import time
import timeit
import tracemalloc
from pathlib import Path

from wirestate.core import lifecycle
from wirestate.core.causes import CloseCause
from wirestate.core.hub import Connection, Hub, HubConfig
from wirestate.core.verify.explore import explore

PAYLOAD = {
    "host": "node-17",
    "cpu": 0.4375,
    "memory": {"used": 6_442_450_944, "total": 25_769_803_776},
    "load": [0.52, 0.61, 0.58],
    "uptime": 86_400.5,
    "status": "ok",
    "tags": ["a", "b"],
}


def _best(fn: object, number: int, repeat: int = 5) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number  # type: ignore[arg-type]


def bench_life() -> dict[str, float]:
    hub = Hub(HubConfig(), epoch="bench")
    cause = CloseCause.PEER_CLOSE

    def life() -> None:
        c = hub.connect("x", 0.0)
        hub.accept(c, 0.0)
        hub.start(c, 0.0)
        hub.reader_done(c, 1.0, cause, 1000)
        hub.writer_done(c, 1.0)
        hub.unregister(c, 1.0)
        hub.actions()
        hub.take_ready()
        hub.drain(c)

    machine = lifecycle.MACHINE
    out: list[object] = []

    def five_triggers() -> None:
        c = Connection("x", 0.0)
        machine.events["accept"].trigger(c, now=0.0, out=out)
        machine.events["start"].trigger(c, now=0.0, out=out)
        machine.events["reader_done"].trigger(c, now=1.0, out=out, cause=cause, code=1000)
        machine.events["writer_done"].trigger(c, now=1.0, out=out, cause=cause, code=None)
        machine.events["unregister"].trigger(c, now=1.0, out=out)
        out.clear()

    return {
        "life_us": _best(life, 2000) * 1e6,
        "transitions_5_triggers_us": _best(five_triggers, 2000) * 1e6,
        "handshake_us": bench_handshake() * 1e6,
    }


def bench_handshake(n: int = 200) -> float:
    """Median seconds per raw websockets handshake + close on loopback (baseline)."""
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import serve

    async def handler(ws: object) -> None:
        await ws.wait_closed()  # type: ignore[attr-defined]

    async def main() -> float:
        async with serve(handler, "127.0.0.1", 0, compression=None, ping_interval=None) as srv:
            port = srv.sockets[0].getsockname()[1]
            samples = []
            for _ in range(n):
                t0 = time.perf_counter()
                async with connect(f"ws://127.0.0.1:{port}", compression=None, ping_interval=None):
                    pass
                samples.append(time.perf_counter() - t0)
            return statistics.median(samples)

    return asyncio.run(main())


def bench_route(subscribers: int = 10_000) -> dict[str, float]:
    hub = Hub(HubConfig(send_queue_size=1_000_000), epoch="bench")
    conns = []
    for i in range(subscribers):
        c = hub.connect(f"c{i}", 0.0)
        hub.accept(c, 0.0)
        hub.start(c, 0.0)
        hub.subscribe(c, ["system_status"], 0.0)
        hub.drain(c)
        conns.append(c)
    hub.actions()
    hub.take_ready()
    size = len(json.dumps(PAYLOAD, separators=(",", ":")))

    def route() -> None:
        hub.publish("system_status", PAYLOAD, 1.0)
        hub.take_ready()
        for c in conns:
            c.outbox.clear()

    def clear_only() -> None:
        hub.take_ready()
        for c in conns:
            c.outbox.clear()

    per_publish = _best(route, 20) - _best(clear_only, 20)
    gc.collect()
    objects_before = len(gc.get_objects())
    hub.publish("system_status", PAYLOAD, 2.0)
    objects_after = len(gc.get_objects())
    for c in conns:
        c.outbox.clear()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    hub.publish("system_status", PAYLOAD, 3.0)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    blocks = sum(s.count_diff for s in after.compare_to(before, "filename") if s.count_diff > 0)
    ready = hub.take_ready()
    return {
        "route_ms": per_publish * 1e3,
        "payload_bytes": float(size),
        "allocated_blocks": float(blocks),
        "blocks_per_recipient": blocks / subscribers,
        "gc_objects_per_recipient": (objects_after - objects_before) / subscribers,
        "ready_entries": float(len(ready)),
    }


def bench_check(depth: int = 8) -> dict[str, float]:
    r = explore(3, depth, clock=time.perf_counter)
    assert r.violation is None, r.violation
    return {"check_states": float(r.states), "check_seconds": r.seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--check-depth", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    runs: list[dict[str, float]] = []
    for i in range(args.runs):
        row = {**bench_life(), **bench_route()}
        runs.append(row)
        print(f"run {i + 1}/{args.runs}: " + ", ".join(f"{k}={v:.1f}" for k, v in row.items()))
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    median.update(bench_check(args.check_depth))
    median["life_over_handshake"] = median["life_us"] / median["handshake_us"]
    report = {
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "runs": args.runs,
        "median": median,
        "targets": {"life_us": 50.0, "route_ms": 3.0, "check_states_per_minute": 100_000},
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
