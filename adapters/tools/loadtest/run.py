"""A load test's run, phase by phase (setup, publishers, clients, publishing, drain, close), and
the command's entry point."""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TextIO

import orjson

from wirestate.adapters.client.urls import safe_url
from wirestate.adapters.tools import leanws
from wirestate.adapters.tools.loadtest.client import (
    SYNC_PING,
    Client,
    Shared,
    failure_kind,
    kind_text,
)
from wirestate.adapters.tools.loadtest.options import (
    DRAIN_POLL,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    FD_RESERVE,
    GIVE_UP,
    PROGRESS_EVERY,
    SYNC_EVERY,
    LoadTestError,
    LoadTestOptions,
    ensure_fds,
    target,
)
from wirestate.adapters.tools.loadtest.plot import load_matplotlib, plot_report
from wirestate.adapters.tools.loadtest.report import Report, hint, ms


class _Run:
    """One run of `run_loadtest`. Not reusable."""

    def __init__(self, options: LoadTestOptions, progress: TextIO | None) -> None:
        self.options = options
        self.target = target(options.url)
        self.topic = options.topic or f"loadtest.{secrets.token_hex(4)}"
        self.shared = Shared(secrets.token_hex(6), self.topic)
        self.progress = progress
        self.headers: tuple[tuple[str, str], ...] = (
            (("Authorization", f"Bearer {options.token}"),) if options.token else ()
        )
        self.clients: list[Client] = []
        self.publishers: list[Client] = []
        self.failures: Counter[str] = Counter()
        self.attempted = 0
        self.gave_up = False
        self.phase = "connecting"
        self.published = 0
        self.connect_seconds = 0.0
        self.publish_seconds = 0.0
        self.close_timeouts = 0
        self._subscribe = orjson.dumps({"type": "subscribe", "topics": [self.topic]})

    # -- connections -----------------------------------------------------------------------

    async def _open(self, client: Client, subscribe: bool) -> str | None:
        """Connect and set up one connection; None on success, else the failure kind."""
        loop = asyncio.get_running_loop()
        t = self.target
        client.ready = loop.create_future()
        try:
            async with asyncio.timeout(self.options.connect_timeout):
                client.conn = await leanws.connect(
                    t.host,
                    t.port,
                    t.path,
                    headers=self.headers,
                    on_text=client.on_text,
                    on_close=client.on_close,
                    timeout=self.options.connect_timeout,
                    ssl=t.ssl,
                )
                if subscribe:
                    client.conn.send_text(self._subscribe)
                outcome = await client.ready
        except (OSError, TimeoutError, leanws.HandshakeError) as exc:
            outcome = failure_kind(exc)
        except BaseException:  # cancelled mid-setup: not in any list yet, so drop it here
            if client.conn is not None:
                client.conn.abort()
            raise
        client.ready = None
        if outcome is not None and client.conn is not None:
            client.conn.abort()
        return outcome

    async def _connect_publishers(self) -> None:
        for i in range(self.options.publisher_count):
            client = Client(self.shared, "observer" if i == 0 else "publisher")
            self.publishers.append(client)
            outcome = await self._open(client, subscribe=i == 0)
            if outcome is not None:
                raise LoadTestError(
                    f"the publisher could not connect to {safe_url(self.options.url)}:"
                    f" {kind_text(outcome)}{hint(outcome)}",
                    status=EXIT_FAILED,
                )

    async def _connect_clients(self) -> None:
        options = self.options
        loop = asyncio.get_running_loop()
        start = loop.time()
        n = options.clients
        shared = self.shared

        async def worker() -> None:
            while self.attempted < n and not self.gave_up:
                i = self.attempted
                self.attempted += 1
                if options.ramp is not None:
                    delay = start + i / options.ramp - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                client = Client(shared, "client")
                outcome = await self._open(client, subscribe=True)
                if outcome is None:
                    self.clients.append(client)
                    shared.connected += 1
                else:
                    self.failures[outcome] += 1
                    if shared.connected == 0 and sum(self.failures.values()) >= GIVE_UP:
                        self.gave_up = True

        async with asyncio.TaskGroup() as tg:
            for _ in range(min(options.concurrency, n)):
                tg.create_task(worker())
        self.connect_seconds = loop.time() - start

    # -- publishing ------------------------------------------------------------------------

    async def _publish(self) -> None:
        options = self.options
        loop = asyncio.get_running_loop()
        interval = 1.0 / options.rate
        count = math.ceil(options.duration * options.rate - 1e-9)
        topic = self.topic
        run_id = self.shared.run_id
        dumps = orjson.dumps
        start = loop.time()
        self.shared.t0 = time.time()
        k = 0
        while k < count:
            now = loop.time()
            due = start + k * interval
            if due > now:
                await asyncio.sleep(due - now)
                continue
            live = [p.conn for p in self.publishers if p.conn is not None and p.conn.open]
            if not live:
                break  # every publisher is gone (a disconnect, reported as such)
            while k < count and start + k * interval <= now:
                message = {
                    "type": "publish",
                    "topic": topic,
                    "data": {"run": run_id, "id": k, "t": time.time()},
                }
                live[k % len(live)].send_text(dumps(message))
                k += 1
        self.published = k
        if k == count:  # the phase lasts `duration`, the last interval included
            end = start + options.duration
            if end > loop.time():
                await asyncio.sleep(end - loop.time())
        self.publish_seconds = loop.time() - start

    def _expected(self) -> int:
        observer = self.publishers[0] if self.publishers else None
        if observer is not None and not observer.dropped:
            return observer.received
        return self.published

    def _drained(self) -> bool:
        expected = self._expected()
        refused = any(key.startswith("publish:") for key in self.shared.server_errors)
        if expected < self.published and not refused:
            # The pong can overtake events a bus sequences asynchronously (Redis).
            return False
        live = [c.received for c in self.clients if not c.dropped]
        return sum(live) >= expected * len(live)

    async def _sync(self, client: Client) -> None:
        """Until `client` gets a pong: the server has handled every message it sent before
        (and queued, on this connection, every event sequenced before). The ping is resent
        every SYNC_EVERY seconds: a publisher over its rate limit has it dropped too."""
        conn = client.conn
        client.sync = asyncio.Event()
        while conn is not None and conn.open and not client.sync.is_set():
            conn.send_text(SYNC_PING)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SYNC_EVERY):
                    await client.sync.wait()

    async def _drain(self) -> None:
        """Wait, up to drain_timeout, until the observer's count is final (the publishers,
        then the observer, synced by a ping) and every client has that many events."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.options.drain_timeout):
                for publisher in self.publishers[1:]:
                    await self._sync(publisher)
                if self.publishers:
                    await self._sync(self.publishers[0])
                # A sum over every client, re-evaluated a few times a second: cheaper than
                # a check in the per-delivery path.
                while not self._drained():  # noqa: ASYNC110
                    await asyncio.sleep(DRAIN_POLL)

    async def _close_all(self) -> None:
        self.shared.closing = True
        conns = [c.conn for c in (*self.clients, *self.publishers) if c.conn is not None]
        for conn in conns:
            conn.close(1000)
        pending = {conn.closed for conn in conns if not conn.closed.done()}
        if pending:
            _, late = await asyncio.wait(pending, timeout=self.options.close_timeout)
            self.close_timeouts = len(late)
        for conn in conns:
            conn.abort()

    def abort_all(self) -> None:
        self.shared.closing = True
        for c in (*self.clients, *self.publishers):
            if c.conn is not None:
                c.conn.abort()

    # -- progress --------------------------------------------------------------------------

    async def _progress_loop(self, out: TextIO) -> None:
        loop = asyncio.get_running_loop()
        shared = self.shared
        last_count, last_at = shared.deliveries, loop.time()
        while True:
            await asyncio.sleep(PROGRESS_EVERY)
            now = loop.time()
            rate = (shared.deliveries - last_count) / max(now - last_at, 1e-9)
            last_count, last_at = shared.deliveries, now
            width = shutil.get_terminal_size().columns - 1  # a wrapped line is not redrawn
            out.write("\r\033[K" + self._progress_line(rate)[:width])
            out.flush()

    def _progress_line(self, rate: float) -> str:
        """One status line, most important first (a narrow terminal cuts the end)."""
        shared, n = self.shared, self.options.clients
        failed = sum(self.failures.values())
        fails = f", {failed:,} failed" if failed else ""
        drops = f", {len(shared.disconnects):,} dropped" if shared.disconnects else ""
        if self.phase == "connecting":
            return f"connecting {shared.connected:,}/{n:,}{fails}"
        if self.phase == "publishing":
            elapsed = min(time.time() - shared.t0, self.options.duration)
            done = int(10 * elapsed / self.options.duration)
            head = f"[{'#' * done}{'-' * (10 - done)}] {elapsed:.1f}/{self.options.duration:g} s"
        else:
            head = self.phase
        return (
            f"{head}  {shared.connected:,}/{n:,} clients{fails}{drops}"
            f"  p99 {ms(shared.percentile(0.99))}  {rate:,.0f} deliveries/s"
        )

    # -- the run ---------------------------------------------------------------------------

    async def run(self) -> Report:
        out = self.progress
        # The progress line is this method's task: cancelled and awaited on every way out
        # (asyncio.wait: its CancelledError stays its own, ours still propagates).
        ticker = asyncio.create_task(self._progress_loop(out)) if out is not None else None
        try:
            await self._connect_publishers()
            await self._connect_clients()
            if self.clients:
                self.phase = "publishing"
                await self._publish()
                self.phase = "draining"
                await self._drain()
            self.phase = "closing"
            await self._close_all()
        finally:
            if ticker is not None:
                ticker.cancel()
                await asyncio.wait([ticker])
            if out is not None:
                out.write("\r\033[K")
                out.flush()
        return self._report()

    def _report(self) -> Report:
        shared = self.shared
        observer = self.publishers[0] if self.publishers else None
        sequenced = observer.received if observer is not None and not observer.dropped else None
        expected_each = self._expected()
        # Lost deliveries are counted for the clients that stayed until the final close;
        # a client that was disconnected is reported as a disconnect.
        stayed = [c for c in self.clients if not c.dropped]
        lost = sum(max(0, expected_each - c.received) for c in stayed)
        latency: dict[str, float | None] = {
            "min": shared.lat_min if shared.deliveries else None,
            "p50": shared.percentile(0.50),
            "p90": shared.percentile(0.90),
            "p99": shared.percentile(0.99),
            "max": shared.lat_max if shared.deliveries else None,
            "mean": shared.lat_sum / shared.deliveries if shared.deliveries else None,
        }
        span = shared.last_delivery - shared.t0 if shared.deliveries else 0.0
        return Report(
            url=safe_url(self.options.url),
            topic=self.topic,
            clients=self.options.clients,
            duration=self.options.duration,
            rate=self.options.rate,
            publishers=self.options.publisher_count,
            connected=len(self.clients),
            connect_seconds=self.connect_seconds,
            failures=dict(self.failures),
            published=self.published,
            sequenced=sequenced,
            publish_seconds=self.publish_seconds,
            expected=expected_each * len(stayed),
            received=sum(c.received for c in stayed),
            lost=lost,
            missing=sum(c.missing for c in self.clients),
            gapped=sum(c.gapped for c in self.clients),
            gaps=sum(c.gaps for c in self.clients),
            duplicates=sum(c.duplicates for c in self.clients),
            server_errors=dict(shared.server_errors),
            invalid=shared.invalid,
            latency=latency,
            samples=shared.deliveries,
            per_second=list(shared.per_second),
            span=span,
            disconnects=list(shared.disconnects),
            close_timeouts=self.close_timeouts,
            gave_up=self.gave_up,
            histogram=list(shared.hist),
        )


async def run_loadtest(options: LoadTestOptions, *, progress: TextIO | None = None) -> Report:
    """Run the load test `options` describes (module docstring) and return its report.

    Raises `LoadTestError` when the options are invalid, the descriptors do not fit, or no
    publisher can connect. `progress`: where the progress line is redrawn (a terminal), or
    None for none. Cancellation drops every connection and propagates.
    """
    problem = options.check()
    if problem is not None:
        raise LoadTestError(problem)
    ensure_fds(options.clients + options.publisher_count + FD_RESERVE)
    run = _Run(options, progress)
    try:
        return await run.run()
    finally:
        run.abort_all()  # idempotent: only what is still open (an error, a cancellation)


async def execute(
    options: LoadTestOptions,
    *,
    json_output: bool = False,
    plot: Path | None = None,
    out: TextIO,
    err: TextIO | None = None,
) -> int:
    """``wirestate loadtest``: run, print the summary (human or one JSON object) on `out`,
    draw `plot`; return the exit status (0 ok, 1 the run failed, 2 bad usage or setup).

    The progress line goes to `err` when it is a terminal and `json_output` is off. A failed
    run also writes its one-line reason to `err`.
    """
    err = sys.stderr if err is None else err
    try:
        problem = options.check()
        if problem is not None:
            raise LoadTestError(problem)
        if plot is not None:
            load_matplotlib()  # before the run, not after minutes of it
        tty = not json_output and hasattr(err, "isatty") and err.isatty()
        report = await run_loadtest(options, progress=err if tty else None)
    except LoadTestError as exc:
        err.write(f"wirestate loadtest: {exc}\n")
        return exc.status
    if json_output:
        out.write(orjson.dumps(report.to_dict()).decode() + "\n")
    else:
        out.write(report.render())
    out.flush()
    failure = report.failure
    status = EXIT_OK if failure is None else EXIT_FAILED
    if plot is not None:
        try:
            plot_report(report, plot)
        except OSError as exc:
            err.write(f"wirestate loadtest: cannot write {plot}: {exc.strerror or exc}\n")
            status = status or EXIT_USAGE
        else:
            if not json_output:
                out.write(f"plot         {plot}\n")
    if failure is not None:
        err.write(f"wirestate loadtest: FAILED: {failure}\n")
    return status
