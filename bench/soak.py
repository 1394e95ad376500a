"""Ten minutes of hostile traffic against one server: its memory must stay flat.

    python bench/soak.py [--duration 600] [--readers 100] [--json bench/results/soak.json]
                         [--plot docs/img/soak.png]

A child ``wirestate serve`` (pinned to CPU 0; ``[history] max_age`` 20 s, so that idle
topics come and go within the run) takes, in a 10-second cycle repeated until
``--duration`` ends (the load client pinned to CPU 1):

* churn: one client subscribes to and unsubscribes from 300 topic names never used
  before, and 300 more get one event each over POST /publish and are never read;
* a burst: 400 events of 1 KB pipelined on one HTTP connection, to ``--readers`` clients
  that read everything (each checks it got every seq);
* clients that never read: 10 new ones subscribe to a topic that then gets 60 events of
  60 KB; the server cuts them (``slow_consumer``), and they are closed;
* a ping flood: one connection sends 20,000 protocol pings without reading.

Every second: the child's RSS (``/proc``), its topics and connections (``/metrics``).
Reported: RSS at the end of the first and the last minute, the peak, the slope of a
least-squares line over the second half (KiB per minute), the topic count's range,
disconnects by cause, and what the readers missed (must be 0). Every loop is bounded by
the duration; nothing runs past it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CYCLE = 10.0
CHURN = 300
BURST, BURST_PAD = 400, "b" * 1000
STUCK, BIG_EVENTS, BIG_PAD = 10, 60, "g" * 60_000
PINGS = 20_000
STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) ")
CONFIG = """
[server]
ping_interval = 5.0
ping_timeout = 5.0
close_timeout = 2.0
[history]
max_age = 20.0
[limits]
messages_per_second = 2000
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _samples(text: str, names: tuple[str, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        for name in names:
            if line.startswith(name + " ") or line.startswith(name + "{"):
                out[line.rsplit(" ", 1)[0]] = float(line.rsplit(" ", 1)[1])
    return out


def _slope_kib_per_min(points: list[tuple[float, int]]) -> float:
    xs = [t for t, _ in points]
    ys = [float(r) for _, r in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 60.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den


class Soak:
    def __init__(self, port: int, pid: int, readers: int, duration: float) -> None:
        self.port, self.pid, self.readers, self.duration = port, pid, readers, duration
        self.base = f"http://127.0.0.1:{port}"
        self.samples: list[dict[str, Any]] = []
        self.expected = 0  # burst events each reader should have
        self.got: list[list[int]] = []
        self.flood_closed = 0
        self.burst_failures: list[dict[str, Any]] = []

    async def run(self) -> dict[str, Any]:
        import httpx

        from wirestate.adapters.tools import leanws

        began = time.monotonic()
        end = began + self.duration
        conns = []
        for _ in range(self.readers):
            seqs: list[int] = []
            self.got.append(seqs)
            conn = await leanws.connect("127.0.0.1", self.port, on_text=self._reader(seqs))
            conn.send_text(b'{"type":"subscribe","topics":["soak.burst"]}')
            conns.append(conn)
        churner = await leanws.connect("127.0.0.1", self.port, on_text=lambda raw: None)
        limits = httpx.Limits(keepalive_expiry=1.0)
        async with httpx.AsyncClient(limits=limits, timeout=10.0) as http:
            sampler = asyncio.create_task(self._sample(http, began, end))
            cycle = 0
            while time.monotonic() + CYCLE <= end:
                started = time.monotonic()
                await self._cycle(http, churner, cycle)
                cycle += 1
                rss = _rss_kib(self.pid) // 1024
                print(
                    f"cycle {cycle}: {time.monotonic() - began:.0f} s, RSS {rss} MiB",
                    file=sys.stderr,
                )
                await asyncio.sleep(max(0.0, started + CYCLE - time.monotonic()))
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
            metrics = (await http.get(f"{self.base}/metrics")).text
        for conn in [*conns, churner]:
            conn.close()
        causes = {
            key.split('"')[1]: int(value)
            for key, value in _samples(metrics, ("wirestate_disconnects_total",)).items()
            if value
        }
        missed = sum(self.expected - len(seqs) for seqs in self.got)
        out_of_order = sum(seqs != sorted(seqs) for seqs in self.got)
        return self._report(cycle, causes, missed, out_of_order)

    def _reader(self, seqs: list[int]) -> Any:
        import orjson

        def on_text(raw: bytes) -> None:
            if raw.startswith(b'{"type":"event"'):
                seqs.append(orjson.loads(raw)["seq"])

        return on_text

    async def _cycle(self, http: Any, churner: Any, cycle: int) -> None:
        import orjson

        from wirestate.testing.net import PING, TEXT, frame, raw_upgrade, read_frame

        # churn: topics subscribed and dropped, topics published and never read
        for i in range(CHURN):
            name = f"soak.churn.{cycle}.{i}"
            churner.send_text(orjson.dumps({"type": "subscribe", "topics": [name]}))
            churner.send_text(orjson.dumps({"type": "unsubscribe", "topics": [name]}))
            if i % 50 == 49:
                await asyncio.sleep(0.02)
        await asyncio.gather(
            *(
                http.post(
                    f"{self.base}/publish", json={"topic": f"soak.idle.{cycle}.{i}", "data": i}
                )
                for i in range(CHURN)
            )
        )
        # a burst, pipelined: it arrives in one read
        body = b"".join(
            b"POST /publish HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(b), b)
            for b in (
                orjson.dumps({"topic": "soak.burst", "data": {"i": i, "pad": BURST_PAD}})
                for i in range(BURST)
            )
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(body)
        answered = 0
        statuses: dict[str, int] = {}
        pending = b""
        async with asyncio.timeout(CYCLE):
            while sum(statuses.values()) < BURST:
                chunk = await reader.read(65536)
                if not chunk:  # the server closed: count what it answered (EOF never waits)
                    break
                # Responses follow each other with no line break after a JSON body: find
                # each status line in the stream, not at the start of a line.
                pending += chunk
                while match := STATUS_LINE.search(pending):
                    status = match[1].decode()
                    statuses[status] = statuses.get(status, 0) + 1
                    pending = pending[match.end() :]
                pending = pending[-16:]  # perhaps the start of a status line
        answered = statuses.get("200", 0)
        writer.close()
        if statuses.keys() - {"200"} or answered < BURST:
            self.burst_failures.append({"cycle": cycle, "answered": answered, **statuses})
        self.expected += answered
        # clients that never read, then what they fail to take
        stuck = []
        for _ in range(STUCK):
            r, w, _head = await raw_upgrade(self.port, rcvbuf=4096)
            await read_frame(r)
            w.write(frame(TEXT, b'{"type":"subscribe","topics":["soak.big"]}'))
            stuck.append(w)
        await asyncio.sleep(0.05)
        await asyncio.gather(
            *(
                http.post(f"{self.base}/publish", json={"topic": "soak.big", "data": BIG_PAD})
                for _ in range(BIG_EVENTS)
            )
        )
        # a ping flood on its own connection
        _r, flooder, _head = await raw_upgrade(self.port, rcvbuf=4096)
        ping = frame(PING, b"p" * 125)
        try:
            async with asyncio.timeout(3.0):
                for _ in range(PINGS // 200):
                    flooder.write(ping * 200)
                    await flooder.drain()
        except (ConnectionError, TimeoutError):
            self.flood_closed += 1
        flooder.close()
        for w in stuck:
            w.close()

    async def _sample(self, http: Any, began: float, end: float) -> None:
        names = ("wirestate_topics", "wirestate_connections")
        while time.monotonic() < end:
            t = time.monotonic() - began
            try:
                text = (await http.get(f"{self.base}/metrics")).text
            except Exception:  # a sample lost to a busy server is a gap in the plot, no more
                text = ""
            values = _samples(text, names)
            self.samples.append(
                {
                    "t": round(t, 2),
                    "rss_kib": _rss_kib(self.pid),
                    "topics": values.get("wirestate_topics"),
                    "connections": sum(v for k, v in values.items() if k.startswith(names[1])),
                }
            )
            await asyncio.sleep(1.0)

    def _report(
        self, cycles: int, causes: dict[str, int], missed: int, out_of_order: int
    ) -> dict[str, Any]:
        points = [(s["t"], s["rss_kib"]) for s in self.samples]
        half = [p for p in points if p[0] >= self.duration / 2]
        first = [r for t, r in points if t <= 60]
        last = [r for t, r in points if t >= self.duration - 60]
        topics = [s["topics"] for s in self.samples if s["topics"] is not None]
        return {
            "duration_s": self.duration,
            "cycles": cycles,
            "readers": self.readers,
            "rss_mib": {
                "first_minute_max": round(max(first) / 1024, 1),
                "last_minute_max": round(max(last) / 1024, 1),
                "peak": round(max(r for _, r in points) / 1024, 1),
            },
            "rss_slope_second_half_kib_per_min": round(_slope_kib_per_min(half), 1),
            "topics": {"min": min(topics), "max": max(topics)} if topics else None,
            "disconnects": causes,
            "burst_events_per_reader": self.expected,
            "reader_events_missed": missed,
            "readers_out_of_order": out_of_order,
            "ping_floods_cut": self.flood_closed,
            "bursts_not_fully_answered": self.burst_failures,
            "samples": self.samples,
        }


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    t = [s["t"] / 60 for s in samples]
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
    ax.plot(t, [s["rss_kib"] / 1024 for s in samples], color="#1f6feb", label="RSS (MiB)")
    ax.set_xlabel("minutes")
    ax.set_ylabel("server RSS, MiB")
    ax.set_ylim(bottom=0)
    twin = ax.twinx()
    twin.plot(
        t, [s["topics"] for s in samples], color="#d29922", linewidth=0.8, label="topics held"
    )
    twin.set_ylabel("topics held")
    twin.set_ylim(bottom=0)
    ax.set_title(
        f"soak: churn, bursts, non-readers, ping floods; {result['cycles']} cycles of"
        f" {CYCLE:.0f} s; slope {result['rss_slope_second_half_kib_per_min']} KiB/min",
        fontsize=9,
    )
    fig.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--readers", type=int, default=100)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    if args.duration < 2 * 60:
        parser.error("--duration: at least 120 s (the first and last minute are compared)")
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "soak.toml"
        config.write_text(CONFIG)
        port = _free_port()
        exe = Path(sys.executable).with_name("wirestate")
        cmd = [str(exe), "serve", "--config", str(config), "--port", str(port)]
        if shutil.which("taskset"):
            cmd = ["taskset", "-c", "0", *cmd]
        import subprocess

        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
                os.sched_setaffinity(0, {1})
            result = asyncio.run(_main(port, proc.pid, args.readers, args.duration))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        _plot(result, args.plot)
    return 0


async def _main(port: int, pid: int, readers: int, duration: float) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient() as http, asyncio.timeout(30):
        while True:
            try:
                if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    return await Soak(port, pid, readers, duration).run()


if __name__ == "__main__":
    sys.exit(main())
