"""wirestate.js in real Chromium under injected faults: the delivery promise where it runs.

A page with nothing but ``/static/wirestate.js`` subscribes to one topic through a seeded
`FaultProxy` (random cuts and stalls) while events are published over HTTP ``POST
/publish``; halfway, the hub restarts (a new epoch). For the page, per epoch:

* every event arrives once, in seq order, with the data that was published under its seq;
* every event published while it was subscribed arrived, or lies inside a `gap` it got
  before anything after the hole (an ``epoch_changed`` gap covers what the old epoch still
  published after the page's last word from it, and the new epoch's events before the first
  one delivered in it);
* with a small ``[history] size`` the ranged gaps are ``history_evicted`` (one long stall
  per epoch makes sure there are some); with a history that holds everything there are
  none; the restart is exactly one ``epoch_changed``.

Against ``wirestate serve`` in a child process (its default transport), and once against
the ASGI transport under uvicorn. The figures of each run are printed (``-s``) and written
to ``test-artifacts/client-faults-<run>.json``. More seeds:
``WIRESTATE_CLIENT_FAULT_SEEDS=random:5 python -m pytest tests/browser/test_client_faults.py -s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from wirestate.adapters.server.transports.asgi import WirestateASGI
from wirestate.adapters.tools.faults import FaultProxy
from wirestate.models.settings import Settings
from wirestate.testing.net import free_port, serve_process, until

with contextlib.suppress(ImportError):  # without it the `browser` fixture skips first
    from playwright.async_api import Browser, Page
    from playwright.async_api import TimeoutError as PlaywrightTimeout

#: The ``page_server`` fixture (tests/browser/conftest.py): a page's HTML -> its origin.
PageServer = Callable[[str], contextlib.AbstractAsyncContextManager[str]]
WAIT = 20.0  # seconds: the bound on every wait; a failure, never a hang
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
TOPIC = "t"
EVENTS = int(os.environ.get("WIRESTATE_CLIENT_FAULT_EVENTS", "300"))  # per epoch
# Pings every 50 ms, a pong due within 300 ms: the page's own dead-connection check
# (interval + timeout without a frame) fires within 350 ms.
SERVER = {"ping_interval": 0.05, "ping_timeout": 0.3, "close_timeout": 0.3}
#: One stall of every connection per epoch, past both keep-alives, while 100+ events are
#: published: the page must resume, and a small history cannot hold what it missed.
LONG_STALL = 0.6
CHAOS: dict[str, Any] = {"cut_rate": 0.06, "stall_rate": 0.1, "max_stall": 0.25, "interval": 0.05}


def _seeds() -> list[int]:
    spec = os.environ.get("WIRESTATE_CLIENT_FAULT_SEEDS", "11,12")
    if spec.startswith("random:"):
        return [random.randrange(1 << 30) for _ in range(int(spec.split(":", 1)[1]))]
    return [int(s) for s in spec.split(",")]


# The page: wirestate.js and a log of what it hands over, in order.
PAGE = """<!doctype html>
<meta charset="utf-8">
<title>wirestate.js under faults</title>
<script type="module">
import { connect } from "%(hub)s/static/wirestate.js";
const log = [], states = [], errors = [];
Object.assign(window, { log, states, errors });
const client = connect(%(url)s, { backoff: { base: 0.02, cap: 0.25 }, openTimeout: 1 });
client.on("state", (s) => states.push(s));
client.on("error", (e) => errors.push(e));
client.subscribe(%(topic)s, {
  event: (e) => log.push(["event", e.seq, e.data]),
  gap: (g) => log.push(["gap", g.fromSeq, g.toSeq, g.reason]),
});
window.client = client;
</script>
"""


# --------------------------------------------------------------------------- the hubs


#: Starts a hub on a port, with a history size, letting pages of an origin in (``[auth]
#: allowed_origins``, no tokens); returns the coroutine that stops it.
Start = Callable[[int, int, str], Awaitable[Callable[[], Awaitable[None]]]]


def _config(tmp: Path, history: int, origin: str) -> Path:
    path = tmp / "hub.toml"
    lines = ["[server]", *(f"{k} = {v}" for k, v in SERVER.items())]
    lines += ["[history]", f"size = {history}", "[auth]", f"allowed_origins = [{origin!r}]"]
    path.write_text("\n".join(lines) + "\n")
    return path


def serve_hub(tmp: Path) -> Start:
    """`wirestate serve` in a child process; stopped with SIGTERM (a graceful restart)."""

    async def start(port: int, history: int, origin: str) -> Callable[[], Awaitable[None]]:
        stack = contextlib.AsyncExitStack()
        flags = ("--config", str(_config(tmp, history, origin)), "--port", str(port))
        served = await stack.enter_async_context(serve_process(*flags))

        async def stop() -> None:
            if served.proc.returncode is None:
                served.proc.send_signal(signal.SIGTERM)
                assert await served.exited() == 0
            await stack.aclose()

        return stop

    return start


def asgi_hub() -> Start:
    """The ASGI app under uvicorn, in this event loop."""

    async def start(port: int, history: int, origin: str) -> Callable[[], Awaitable[None]]:
        settings = Settings.model_validate(
            {
                "server": SERVER,
                "history": {"size": history},
                "auth": {"allowed_origins": [origin]},
            }
        )
        app = WirestateASGI(settings)
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        task = asyncio.create_task(server.serve())
        await until(lambda: server.started or task.done(), WAIT)
        assert server.started, "uvicorn did not start"

        async def stop() -> None:
            server.should_exit = True
            await asyncio.wait_for(task, WAIT)

        return stop

    return start


# --------------------------------------------------------------------------- the check


@dataclass
class Epoch:
    published: dict[int, int] = field(default_factory=dict)  # seq -> the "i" published
    delivered: list[int] = field(default_factory=list)
    gaps: list[tuple[int, int, str]] = field(default_factory=list)
    lost_at_restart: int = 0  # covered by the epoch_changed gap that ends this epoch
    before_first: int = 0  # covered by the epoch_changed gap that starts this epoch


@dataclass
class Figures:
    run: str
    seed: int
    history: int
    cuts: int
    stalls: int
    reconnects: int
    epochs: list[dict[str, Any]]


def check(log: list[list[Any]], epochs: list[Epoch]) -> None:
    """Split the page's log by epoch and assert the promise (module docstring)."""
    index = 0
    for entry in log:
        if entry[0] == "gap" and entry[3] == "epoch_changed":
            index += 1
            assert index < len(epochs), "more epoch_changed gaps than restarts"
            continue
        epoch = epochs[index]
        seen = [*epoch.delivered, *(hi for _, hi, _ in epoch.gaps)]
        if entry[0] == "event":
            _, seq, data = entry
            assert not seen or seq > max(seen), f"seq {seq} after {max(seen)}: twice or late"
            assert epoch.published.get(seq) == data["i"], f"seq {seq} is not what was published"
            epoch.delivered.append(seq)
        else:
            _, lo, hi, reason = entry
            assert lo <= hi, entry
            assert not seen or lo > max(seen), f"a gap {entry} over what came before it"
            epoch.gaps.append((lo, hi, reason))
    assert index == len(epochs) - 1, "the restart did not reach the page as epoch_changed"
    for n, epoch in enumerate(epochs):
        covered = set(epoch.delivered)
        for lo, hi, _ in epoch.gaps:
            covered.update(range(lo, hi + 1))
        assert covered, f"epoch {n}: the page got nothing at all"
        first, last = min(covered), max(covered)
        if n > 0:  # the epoch_changed gap stands for everything before the first seq
            epoch.before_first = sum(1 for s in epoch.published if s < first)
        else:
            assert first == 1, "the page's first event is the retained one, seq 1"
        if n < len(epochs) - 1:  # ... and for what the old epoch published after its last
            epoch.lost_at_restart = sum(1 for s in epoch.published if s > last)
        else:
            assert last == max(epoch.published), "the final event did not reach the page"
        missing = sorted(s for s in epoch.published if first <= s <= last and s not in covered)
        assert missing == [], f"epoch {n}: missing without a gap: {missing[:10]}"


# --------------------------------------------------------------------------- the run


async def run_faults(
    browser: Browser,
    start: Start,
    page_server: PageServer,
    *,
    run: str,
    seed: int,
    history: int,
) -> Figures:
    port = free_port()
    proxy = FaultProxy("127.0.0.1", port, seed=seed)
    await proxy.start()
    hub = f"http://127.0.0.1:{port}"
    ws_url = f"ws://127.0.0.1:{proxy.port}/ws"
    body = PAGE % {"hub": hub, "url": json.dumps(ws_url), "topic": json.dumps(TOPIC)}
    epochs = [Epoch()]
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(proxy.aclose)
        origin = await stack.enter_async_context(page_server(body))
        stop = await start(port, history, origin)
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=hub, timeout=WAIT))
        try:

            async def publish(i: int) -> None:
                reply = await http.post("/publish", json={"topic": TOPIC, "data": {"i": i}})
                assert reply.status_code == 200, reply.text
                epochs[-1].published[reply.json()["seq"]] = i

            async def publish_epoch(first: int, last: int) -> None:
                """Publish with chaos on, but for one stall of every connection, longer than
                both keep-alives (chaos is paused meanwhile: a random stall would end it
                early), so that the page resumes at least once in each epoch."""
                loop = asyncio.get_running_loop()
                resume_chaos: float | None = None
                for i in range(first, last):
                    if i == (first + last) // 2:
                        await proxy.stop_chaos()
                        proxy.stall(LONG_STALL)
                        resume_chaos = loop.time() + LONG_STALL
                    if resume_chaos is not None and loop.time() >= resume_chaos:
                        resume_chaos = None
                        proxy.chaos(**CHAOS)
                    await publish(i)
                    await asyncio.sleep(0.003)  # a publishing pace, not a wait for a result

            await publish(0)  # retained: the page's first event says it is subscribed
            page = await open_page(browser, origin)
            await wait_page(page, "log.length >= 1")
            proxy.chaos(**CHAOS)
            await publish_epoch(1, EVENTS)
            # A restart: the hub stops (clients get 1001), a new one takes the port.
            await stop()
            stop = await start(port, history, origin)
            epochs.append(Epoch())
            await publish_epoch(EVENTS, 2 * EVENTS)
            await proxy.stop_chaos()
            final = max(epochs[-1].published)
            # The final event, or a gap over it, after the restart's epoch_changed gap.
            await wait_page(
                page,
                "log.slice(log.findIndex((e) => e[3] === 'epoch_changed') + 1 || log.length)"
                f".some((e) => (e[0] === 'event' && e[1] >= {final}) ||"
                f" (e[0] === 'gap' && e[2] !== null && e[2] >= {final}))",
                lambda: f"proxy {proxy.stats}, last faults {proxy.log[-8:]}",
            )
            log = await page.evaluate("log")
            states = await page.evaluate("states")
            errors = await page.evaluate("errors")
            await page.evaluate("client.close()")
            await page.close()
            faults = [f for f in proxy.log if f.source == "chaos"]
        finally:
            await stop()
    assert errors == [], errors
    assert states[0] == "open", states
    assert "closed" not in states[:-1], states
    check(log, epochs)
    cuts = sum(1 for f in faults if f.kind == "cut")
    stalls = sum(1 for f in faults if f.kind == "stall")
    assert cuts + stalls > 0, "the chaos injected nothing; the run proves nothing"
    figures = Figures(
        run=run,
        seed=seed,
        history=history,
        cuts=cuts,
        stalls=stalls,
        reconnects=states.count("open") - 1,
        epochs=[
            {
                "published": len(e.published),
                "delivered": len(e.delivered),
                "in_gaps": sum(hi - lo + 1 for lo, hi, _ in e.gaps),
                "gap_reasons": sorted({reason for _, _, reason in e.gaps}),
                "before_first_after_epoch_changed": e.before_first,
                "lost_at_restart_in_epoch_changed": e.lost_at_restart,
            }
            for e in epochs
        ],
    )
    for e in epochs:
        reasons = {reason for _, _, reason in e.gaps}
        if history >= 2 * EVENTS:
            assert reasons == set(), "the history held everything: nothing may be reported lost"
        else:
            assert reasons == {"history_evicted"}, reasons
    print(f"\nclient faults: {json.dumps(asdict(figures))}")
    ARTIFACTS.mkdir(exist_ok=True)
    name = f"client-faults-{run}-seed{seed}-history{history}.json"
    (ARTIFACTS / name).write_text(json.dumps(asdict(figures), indent=2) + "\n")
    return figures


async def open_page(browser: Browser, origin: str) -> Page:
    """The page, from its own origin, importing wirestate.js from the hub and talking to the
    hub through the proxy."""
    page = await browser.new_page()
    console: list[str] = []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    page.on("pageerror", lambda exc: console.append(f"pageerror: {exc}"))
    setattr(page, "console_lines", console)  # noqa: B010 - read by wait_page on failure
    await page.goto(origin + "/faults.html")
    return page


async def wait_page(page: Page, condition: str, more: Callable[[], str] = str) -> None:
    """Wait, bounded, for ``condition`` in the page; on timeout, fail with what it has."""
    try:
        await page.wait_for_function(condition, timeout=WAIT * 1000)
    except PlaywrightTimeout:
        seen = await page.evaluate(
            "({states: window.states, errors: window.errors, log: (window.log || []).slice(-5),"
            " n: (window.log || []).length})"
        )
        console = getattr(page, "console_lines", [])[-20:]
        pytest.fail(f"the page never met {condition!r}: {seen}; console: {console}; {more()}")


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("history", [100_000, 8], ids=["history-holds-all", "history-8"])
@pytest.mark.parametrize("seed", _seeds())
async def test_serve_through_cuts_stalls_and_a_restart(
    browser: Browser, page_server: PageServer, tmp_path: Path, seed: int, history: int
) -> None:
    await run_faults(
        browser, serve_hub(tmp_path), page_server, run="serve", seed=seed, history=history
    )


async def test_asgi_under_uvicorn_through_cuts_stalls_and_a_restart(
    browser: Browser, page_server: PageServer
) -> None:
    await run_faults(browser, asgi_hub(), page_server, run="asgi", seed=21, history=8)
