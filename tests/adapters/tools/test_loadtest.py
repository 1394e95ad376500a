"""``wirestate loadtest`` in-process against a real WirestateServer on port 0: a clean run,
a server that goes away mid-run, refused connections, auth, the plot, the command line."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest

from wirestate.adapters.server.service import WirestateServer
from wirestate.adapters.tools import cli, leanws
from wirestate.adapters.tools.loadtest import LoadTestOptions, execute
from wirestate.adapters.tools.loadtest import run as loadtest_run
from wirestate.adapters.tools.loadtest.client import Client, Shared
from wirestate.models.settings import Settings

WAIT = 20.0  # the bound on every wait: a failure, never a hang
SECRET = "loadtest-" + "s" * 40


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def server_settings(**sections: Any) -> Settings:
    return Settings.model_validate({"server": {"port": 0}, **sections})


@pytest.fixture
async def server() -> AsyncIterator[WirestateServer]:
    async with WirestateServer(server_settings()) as srv:
        yield srv


async def run_json(
    options: LoadTestOptions, *, err: io.StringIO | None = None, **kw: Any
) -> tuple[int, dict[str, Any], str]:
    out = io.StringIO()
    err = io.StringIO() if err is None else err
    async with asyncio.timeout(WAIT):
        code = await execute(options, json_output=True, out=out, err=err, **kw)
    report: dict[str, Any] = json.loads(out.getvalue()) if out.getvalue() else {}
    return code, report, err.getvalue()


async def test_a_clean_run_delivers_everything(
    server: WirestateServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loadtest_run, "PROGRESS_EVERY", 0.05)
    out, err = io.StringIO(), Tty()
    options = LoadTestOptions(url=server.url, clients=20, duration=1.0, rate=20)
    async with asyncio.timeout(WAIT):
        code = await execute(options, out=out, err=err)
    assert code == 0, out.getvalue() + err.getvalue()
    text = out.getvalue()
    assert "clients      20 of 20 connected" in text
    assert "deliveries   400 of 400 expected: none lost, no duplicates" in text
    assert "latency      p50 " in text
    assert "disconnects  none during the run" in text
    assert text.rstrip().endswith("result       OK")
    progress = err.getvalue()
    assert "\r\x1b[K" in progress  # redrawn in place on a terminal
    assert "20/20 clients" in progress
    assert "deliveries/s" in progress
    assert "p99" in progress
    assert progress.endswith("\r\x1b[K")  # and cleared at the end


async def test_the_json_summary(server: WirestateServer) -> None:
    options = LoadTestOptions(url=server.url, clients=20, duration=1.0, rate=20, topic="lt.json")
    code, report, err = await run_json(options, err=Tty())  # --json: no progress line
    assert code == 0
    assert err == ""
    assert report["ok"] is True
    assert report["failure"] is None
    assert report["topic"] == "lt.json"
    assert report["connections"] == {
        "connected": 20,
        "failed": 0,
        "failures": {},
        "seconds": report["connections"]["seconds"],
        "per_second": report["connections"]["per_second"],
    }
    assert report["published"] == report["sequenced"] == 20
    assert report["deliveries"] == {
        "expected": 400,
        "received": 400,
        "lost": 0,
        "missing": 0,
        "gapped": 0,
        "gaps": 0,
        "duplicates": 0,
    }
    lat = report["latency_ms"]
    assert lat["samples"] == 400
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] < 5_000
    assert sum(report["throughput"]["per_second"]) == 400
    assert 300 < report["throughput"]["deliveries_per_second"] <= 500  # 20 clients x 20/s
    assert report["disconnects"] == {"total": 0, "by_cause": []}


async def test_a_server_that_goes_away_shows_disconnects_by_cause() -> None:
    server = WirestateServer(server_settings())
    await server.start()
    try:
        # A watcher on the run's topic: the server stops once events are flowing.
        flowing = asyncio.Event()

        def watch(payload: bytes) -> None:
            if payload.startswith(b'{"type":"event"'):
                flowing.set()

        watcher = await leanws.connect("127.0.0.1", server.port, on_text=watch)
        watcher.send_text(b'{"type":"subscribe","topics":["lt.stop"]}')
        options = LoadTestOptions(
            url=server.url, clients=20, duration=10.0, rate=20, topic="lt.stop"
        )
        run = asyncio.create_task(run_json(options))
        async with asyncio.timeout(WAIT):
            await flowing.wait()
        await server.stop()
        code, report, err = await run
    finally:
        await server.stop()
    assert code == 1
    assert report["ok"] is False
    by_cause = {
        (d["code"], d["cause"], d["role"]): d["count"] for d in report["disconnects"]["by_cause"]
    }
    assert by_cause == {(1001, "shutdown", "client"): 20, (1001, "shutdown", "observer"): 1}
    assert report["disconnects"]["total"] == 21
    assert report["publish_seconds"] < 5.0  # it stopped by itself, early
    assert "21 disconnects during the run (1001 shutdown: 20, 1001 shutdown: 1 (observer))" in err
    assert err.count("\n") == 1  # one line


async def test_refused_connections_are_counted_by_kind() -> None:
    limited = server_settings(limits={"max_connections_per_ip": 10})
    async with WirestateServer(limited) as server:
        options = LoadTestOptions(url=server.url, clients=20, duration=0.3, rate=10)
        code, report, err = await run_json(options)
    assert code == 1
    # The publisher holds one of the 10 slots.
    assert report["connections"]["connected"] == 9
    assert report["connections"]["failures"] == {"http_429": 11}
    assert report["deliveries"]["lost"] == 0  # the connected ones got everything
    assert err == (
        "wirestate loadtest: FAILED: 11 connection failures (11 HTTP 429 — the server's"
        " [limits] max_connections_per_ip is reached)\n"
    )


async def test_no_server_is_a_one_line_error() -> None:
    options = LoadTestOptions(url="ws://127.0.0.1:9/ws", clients=5, duration=0.3)
    code, report, err = await run_json(options)
    assert code == 1
    assert report == {}
    assert err == (
        "wirestate loadtest: the publisher could not connect to ws://127.0.0.1:9/ws: refused"
        " — is `wirestate serve` running?\n"
    )


async def test_a_token_is_sent_as_a_bearer() -> None:
    with_auth = server_settings(auth={"secret": SECRET})
    claims = {"sub": "lt", "exp": time.time() + 60, "subscribe": ["loadtest.*"]}
    token = jwt.encode({**claims, "publish": ["loadtest.*"]}, SECRET, algorithm="HS256")
    async with WirestateServer(with_auth) as server:
        url = server.url
        code, report, _ = await run_json(
            LoadTestOptions(url=url, clients=5, duration=0.3, rate=10, token=token)
        )
        assert code == 0
        assert report["deliveries"]["received"] == report["deliveries"]["expected"] == 15
        code, _, err = await run_json(LoadTestOptions(url=url, clients=5, duration=0.3))
        assert code == 1
        assert "HTTP 401 — the server wants a token: --token" in err
        # Allowed to subscribe but not to publish: refused publishes, not lost deliveries.
        no_publish = jwt.encode(claims, SECRET, algorithm="HS256")
        code, report, err = await run_json(
            LoadTestOptions(url=url, clients=5, duration=0.3, rate=10, token=no_publish),
        )
    assert code == 1
    assert report["sequenced"] == 0
    assert report["deliveries"]["lost"] == 0
    assert "3 publishes not sequenced by the server (forbidden: 3 — the token needs publish" in err


async def test_bad_options_and_the_fd_limit_exit_2() -> None:
    code, _, err = await run_json(LoadTestOptions(url="http://x/ws", clients=1, duration=1))
    assert code == 2
    assert "is not a WebSocket URL" in err
    code, _, err = await run_json(LoadTestOptions(url="ws://x/ws", clients=1, duration=0))
    assert code == 2
    assert "--duration must be a positive number" in err
    code, _, err = await run_json(LoadTestOptions(url="ws://x/ws", clients=10**8, duration=1))
    assert code == 2
    assert "file descriptors" in err
    assert "split the clients over several loadtest processes" in err


def test_sequence_checks_per_client() -> None:
    shared = Shared("run1", "t")
    shared.t0 = time.time()
    client = Client(shared, "client")

    def event(seq: int, run: str = "run1") -> bytes:
        data = {"run": run, "id": seq, "t": time.time()}
        return orjson.dumps({"type": "event", "topic": "t", "seq": seq, "data": data})

    gap = b'{"type":"gap","topic":"t","from_seq":5,"to_seq":6,"reason":"slow_consumer"}'
    for payload in (event(1, "older run"), event(2), event(3), event(3), event(5)):
        client.on_text(payload)
    client.on_text(gap.replace(b'from_seq":5', b'from_seq":6'))
    client.on_text(event(7))
    client.on_text(event(8))
    assert (client.received, client.duplicates, client.missing) == (5, 1, 1)
    assert (client.gaps, client.gapped) == (1, 1)
    assert shared.deliveries == 5
    assert shared.percentile(0.5) is not None


@pytest.mark.skipif(
    not os.environ.get("CI") and importlib.util.find_spec("matplotlib") is None,
    reason="matplotlib is not installed (pip install 'wirestate[plot]'; CI must have it)",
)
async def test_plot_writes_a_png(server: WirestateServer, tmp_path: Path) -> None:
    target = tmp_path / "loadtest.png"
    options = LoadTestOptions(url=server.url, clients=5, duration=0.3, rate=20)
    out = io.StringIO()
    async with asyncio.timeout(WAIT):
        code = await execute(options, plot=target, out=out, err=io.StringIO())
    assert code == 0
    assert target.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert f"plot         {target}" in out.getvalue()


async def test_plot_without_matplotlib_names_the_extra_before_connecting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    options = LoadTestOptions(url="ws://127.0.0.1:9/ws", clients=5, duration=1)
    code, _, err = await run_json(options, plot=Path("never.png"))
    assert code == 2
    assert err == "wirestate loadtest: --plot needs matplotlib: pip install 'wirestate[plot]'\n"


def test_the_subcommand_parses_its_flags() -> None:
    args = cli.parser().parse_args(
        [
            "loadtest",
            "--url",
            "ws://127.0.0.1:12080/ws",
            "--clients",
            "10000",
            "--duration",
            "300",
            "--rate",
            "25",
            "--topic",
            "bench",
            "--json",
            "--plot",
            "out.png",
            "--ramp",
            "500/s",
            "--token",
            "abc",
        ]
    )
    assert (args.url, args.clients, args.duration, args.rate) == (
        "ws://127.0.0.1:12080/ws",
        10000,
        300.0,
        25.0,
    )
    assert (args.topic, args.json, args.plot, args.ramp, args.token) == (
        "bench",
        True,
        Path("out.png"),
        500.0,
        "abc",
    )
    assert args.publishers is None
    assert args.concurrency == 200
    defaults = cli.parser().parse_args(
        ["loadtest", "--url", "ws://h/ws", "--clients", "1", "--duration", "1"]
    )
    assert (defaults.rate, defaults.ramp, defaults.json, defaults.plot) == (10.0, None, False, None)


def test_the_subcommand_refuses_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["loadtest", "--url", "ws://h/ws", "--duration", "1"]
    with pytest.raises(SystemExit) as exc:
        cli.main([*base, "--clients", "0"])
    assert exc.value.code == 2
    assert "--clients: must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*base, "--clients", "1", "--ramp", "fast"])
    assert "'fast' is not a rate" in capsys.readouterr().err


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_command_line_runs_against_a_server_in_another_thread(loop: str) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    ready = threading.Event()
    box: dict[str, Any] = {}

    def serve() -> None:
        async def main() -> None:
            async with WirestateServer(server_settings()) as srv:
                box["url"], box["loop"], box["stop"] = (
                    srv.url,
                    asyncio.get_running_loop(),
                    asyncio.Event(),
                )
                ready.set()
                await box["stop"].wait()

        asyncio.run(main())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(WAIT)
    out = io.StringIO()
    try:
        argv = ["loadtest", "--url", box["url"], "--clients", "5", "--duration", "0.3", "--json"]
        code = cli.main([*argv, "--loop", loop], stdout=out)
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(WAIT)
    assert code == 0
    report = json.loads(out.getvalue())
    assert report["deliveries"]["received"] == 5 * 3
    assert report["ok"] is True
