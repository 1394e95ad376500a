"""The command line, run in-process (and once through the installed console script)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from wirestate.adapters.tools import cli
from wirestate.testing.net import serve_process


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = cli.main(list(argv), stdout=out)
    return code, out.getvalue()


def test_check_passes_on_the_clean_core() -> None:
    code, out = run("check", "--clients", "2", "--depth", "4", "--breaker-depth", "4")
    assert code == 0
    assert "lifecycle: 2 clients:" in out
    assert "breaker: 1 breaker:" in out
    assert out.count("every invariant holds") == 2


def test_check_with_a_planted_bug_prints_the_shortest_trace_and_exits_1() -> None:
    code, out = run("check", "--plant", "early_unregister", "--depth", "6", "--breaker-depth", "0")
    assert code == 1
    assert "VIOLATION invariant 1: c0 unregistered while its writer still runs" in out
    assert "shortest trace (4 steps):" in out
    assert out.splitlines()[-4:] == [
        "   1. accept c0",
        "   2. start c0",
        "   3. peer_close c0",
        "   4. unregister c0",
    ]


def test_check_refuses_a_bad_depth(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        run("check", "--depth", "0")
    assert exc.value.code == 2
    assert "--depth: must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run("check", "--clients", "two")
    assert "'two' is not a whole number" in capsys.readouterr().err


def test_check_stops_at_max_states() -> None:
    code, out = run("check", "--max-states", "100", "--breaker-depth", "0")
    assert code == 0
    assert "100 distinct states" in out


def test_diagram_mermaid_and_dot_to_a_file(tmp_path: Path) -> None:
    code, out = run("diagram", "lifecycle")
    assert code == 0
    assert out.startswith("---\ntitle: Connection lifecycle\n---\nstateDiagram-v2")
    target = tmp_path / "breaker.dot"
    assert run("diagram", "breaker", "--format", "dot", "-o", str(target))[0] == 0
    assert target.read_text().startswith('digraph "Circuit breaker"')


def test_diagram_svg_without_graphviz_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    code, out = run("diagram", "lifecycle", "--format", "svg")
    assert code == 2
    assert out == ""
    assert "apt-get install graphviz" in capsys.readouterr().err


@pytest.mark.skipif(
    shutil.which("dot") is None and not os.environ.get("CI"),
    reason="Graphviz's dot is not installed (CI installs it)",
)
def test_diagram_svg_with_graphviz() -> None:
    code, out = run("diagram", "lifecycle", "--format", "svg")
    assert code == 0
    assert "<svg" in out
    assert "unregistered" in out


def test_schema_has_both_directions() -> None:
    code, out = run("schema")
    assert code == 0
    doc = json.loads(out)
    assert {"ClientMessage", "ServerMessage"} <= set(doc["$defs"])
    assert len(doc["oneOf"]) == 2


def test_the_console_script_is_installed() -> None:
    exe = Path(sys.executable).with_name("wirestate")
    done = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    assert "check" in done.stdout
    assert "diagram" in done.stdout


def test_serve_refuses_a_bad_config_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "wirestate.toml"
    config.write_text("[server]\nprot = 12080\n")
    code, out = run("serve", "--config", str(config))
    assert code == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err
    assert "server.prot" in err
    assert out == ""


def test_serve_says_when_the_port_is_taken(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _ = run("serve", "--port", str(port))
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_fuzz_refuses_a_remote_url(capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = run("fuzz", "ws://192.0.2.1:12080/ws", "--examples", "1")
    assert code == 2
    assert "wirestate fuzz:" in capsys.readouterr().err


async def test_fuzz_against_a_running_server() -> None:
    async with serve_process() as served:  # yields once the child logs that it listens
        code, out = await asyncio.to_thread(
            run, "fuzz", served.url, "--examples", "5", "--steps", "10", "--seed", "1"
        )
        assert code == 0, out
        assert "every promise held" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--loop", "uvloop", "--port", "0"],
        [
            "loadtest",
            "--url",
            "ws://127.0.0.1:9/ws",
            "--clients",
            "1",
            "--duration",
            "1",
            "--loop",
            "uvloop",
        ],
    ],
)
def test_uvloop_asked_for_but_missing_says_what_to_install(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    assert cli.main(argv, stdout=io.StringIO()) == 2
    assert "needs uvloop: pip install 'wirestate[fast]'" in capsys.readouterr().err


def test_fuzz_without_hypothesis_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Hypothesis is the `verify` extra: a service install has none.
    monkeypatch.setitem(sys.modules, "hypothesis", None)  # import hypothesis -> error
    monkeypatch.delitem(sys.modules, "wirestate.adapters.tools.fuzz", raising=False)
    assert cli.main(["fuzz", "ws://127.0.0.1:1/ws"]) == 2
    assert "needs Hypothesis: pip install 'wirestate[verify]'" in capsys.readouterr().err


async def test_serve_raises_its_descriptor_limit_and_says_so() -> None:
    """Each connection takes a descriptor: a soft limit below the hard one would refuse
    clients long before `max_connections`. The child starts with a low soft limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip("needs a finite hard descriptor limit above 256")
    async with serve_process(soft_nofile=256) as served:
        (line,) = [r for r in served.logs if r.get("msg") == "file descriptors"]
        assert (line["soft_before"], line["soft"], line["hard"]) == (256, hard, hard)
        limits = Path(f"/proc/{served.proc.pid}/limits").read_text()  # noqa: ASYNC240 - procfs
        (row,) = [r for r in limits.splitlines() if r.startswith("Max open files")]
        assert row.split()[3:5] == [str(hard), str(hard)]


def test_accept_starvation_is_one_warning_a_second_that_says_what_to_change(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Loop:
        now = 100.0
        passed: list[dict[str, object]] = []

        def time(self) -> float:
            return self.now

        def default_exception_handler(self, context: dict[str, object]) -> None:
            self.passed.append(context)

    import logging

    log = logging.getLogger("test.starved")
    handler = cli._starved_accepts(log)
    loop = Loop()
    starved = {"message": "socket.accept() out of system resource", "exception": OSError(24)}
    with caplog.at_level(logging.WARNING, logger="test.starved"):
        for step in range(30):  # 3 s of asyncio's retries, every 0.1 s
            loop.now = 100.0 + step / 10
            handler(loop, starved)
    warnings = [r for r in caplog.records if r.name == "test.starved"]
    assert len(warnings) == 3
    assert "file descriptors" in warnings[0].getMessage()
    assert "ulimit -Hn" in warnings[0].getMessage()
    assert loop.passed == []
    other = {"message": "Task exception was never retrieved"}
    handler(loop, other)
    assert loop.passed == [other]


def test_version_names_the_installed_package(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"wirestate {version('wirestate')}"


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        ((), "close       1000 client_close (closed by this client)"),
        (("--reconnect",), "(interrupted; closed 1000 by this client)"),
    ],
)
async def test_an_interrupted_client_reports_the_close_it_made(
    flags: tuple[str, ...], said: str
) -> None:
    import signal

    from wirestate.adapters.server.service import WirestateServer
    from wirestate.testing.net import WAIT, server_settings, until

    async with WirestateServer(server_settings()) as server:
        exe = Path(sys.executable).with_name("wirestate")
        child = await asyncio.create_subprocess_exec(
            str(exe),
            "client",
            server.url,
            "--topic",
            "t",
            *flags,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # a shell's background job ignores SIGINT; Ctrl-C in a terminal does not
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        assert server.hub is not None
        hub = server.hub
        await until(lambda: any(t == "t" for c in hub.clients.values() for t in c.topics), 20)
        # The hub holds the subscription as soon as the frame is parsed, before the client
        # has read `subscribed`: interrupt it once it has printed an event, not before.
        server.publish_now("t", "marker")
        assert child.stdout is not None
        seen = b""
        async with asyncio.timeout(WAIT * 4):
            while b"marker" not in seen:
                seen += await child.stdout.readline()
        child.send_signal(signal.SIGINT)
        async with asyncio.timeout(WAIT * 4):
            rest, _ = await child.communicate()
        out = seen + rest
        await until(lambda: hub.stats.disconnects.get("peer_close", 0) == 1)
    assert child.returncode == 130
    assert said in out.decode(), out.decode()
