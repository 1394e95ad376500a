"""The ``wirestate`` command line (docs/operations.md, "Command line").

Each subcommand is a thin shell over the core or the models: it parses flags, calls pure
code, prints, and chooses the exit status (0 success, 1 a check failed, 2 bad usage or a
missing tool). Messages say what failed and what to do; no traceback for expected failures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from wirestate.core import diagram
from wirestate.core.breaker.table import ENGINE as BREAKER
from wirestate.core.lifecycle import ENGINE as LIFECYCLE
from wirestate.core.verify.explore import Result, explore
from wirestate.core.verify.explore_breaker import explore_breaker
from wirestate.core.verify.mutants import MUTANTS, mutant


def _write(text: str, out: str | None, stdout: TextIO) -> None:
    if out is None or out == "-":
        stdout.write(text)
    else:
        Path(out).write_text(text, encoding="utf-8")


def _report(name: str, scope: str, r: Result, stdout: TextIO) -> None:
    rate = f"{r.states_per_second:,.0f} states/s"
    reach = "whole space" if r.complete else f"depth {r.depth}"
    head = (
        f"{name}: {scope}: {r.states:,} distinct states, {r.transitions:,} transitions "
        f"({reach}) in {r.seconds:.1f} s, {rate}"
    )
    if r.violation is None:
        stdout.write(f"{head}: every invariant holds\n")
        return
    stdout.write(f"{head}\nVIOLATION {r.violation}\n")
    stdout.write(f"shortest trace ({len(r.trace)} steps):\n")
    for i, step in enumerate(r.trace, 1):
        stdout.write(f"  {i:>2}. {step}\n")


def cmd_check(args: argparse.Namespace, stdout: TextIO) -> int:
    results: list[Result] = []
    engines: dict[str, Any] = {"lifecycle": LIFECYCLE, "breaker": BREAKER}
    if args.plant:
        planted = mutant(args.plant)
        engines[planted.target] = planted.engine()
        stdout.write(f"planted bug {planted.name}: {planted.description}\n")
    life = explore(
        args.clients,
        args.depth,
        max_states=args.max_states,
        clock=time.perf_counter,
        lifecycle=engines["lifecycle"],
    )
    _report("lifecycle", f"{args.clients} clients", life, stdout)
    results.append(life)
    if args.breaker_depth:
        brk = explore_breaker(
            args.breaker_depth, clock=time.perf_counter, engine=engines["breaker"]
        )
        _report("breaker", "1 breaker", brk, stdout)
        results.append(brk)
    return 1 if any(r.violation for r in results) else 0


def cmd_diagram(args: argparse.Namespace, stdout: TextIO) -> int:
    if args.format == "svg":
        dot = shutil.which("dot")
        if dot is None:
            sys.stderr.write(
                "wirestate diagram: --format svg needs Graphviz's `dot`, which is not on PATH;"
                " install it (apt-get install graphviz) or use --format mermaid or dot\n"
            )
            return 2
        source = diagram.render(args.machine, "dot")
        svg = subprocess.run(
            [dot, "-Tsvg"], input=source, capture_output=True, text=True, check=True
        ).stdout
        _write(svg, args.output, stdout)
        return 0
    _write(diagram.render(args.machine, args.format), args.output, stdout)
    return 0


def cmd_schema(args: argparse.Namespace, stdout: TextIO) -> int:
    from wirestate.models.schema import protocol_schema

    _write(json.dumps(protocol_schema(), indent=2) + "\n", args.output, stdout)
    return 0


def _count(minimum: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


UVLOOP_MISSING = "needs uvloop: pip install 'wirestate[fast]'"


def _loop_factory(loop: str | None) -> Callable[[], Any] | None:
    """The event loop a command runs on: None (asyncio's own) or uvloop's, which raises
    ``ImportError`` when uvloop is not installed."""
    if loop != "uvloop":
        return None
    import uvloop

    return uvloop.new_event_loop


#: The young generation's threshold under ``tune_gc`` (CPython's default is 700).
GC_YOUNG = 10_000


def tune_gc() -> None:
    """The collector for many long-lived connections (docs/performance.md has the figures):

    * ``gc.freeze()`` after start-up: everything alive then (modules, settings, the hub)
      lives as long as the process; no collection walks it again;
    * a young generation of 10,000 allocations instead of 700: a handshake allocates a few
      hundred objects that mostly die young, and fewer young collections promote fewer of
      them to the old generations, whose collections walk every live connection.

    At 5,000 connections this took handshakes/s from 0.74x to 0.9x a plain websockets
    server's (which gains as much from the same tuning: it is not wirestate-specific). The
    service only: a library does not reach into its host's collector."""
    import gc

    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG, middle, old)


def raise_fd_limit() -> tuple[int, int, int]:
    """Raise the soft limit on open file descriptors to the hard one (each connection takes
    one): returns (soft before, soft now, hard)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    now = soft
    if hard != soft and (hard == resource.RLIM_INFINITY or hard > soft):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            now = hard
    return soft, now, hard


#: asyncio's message when accept() fails for want of a descriptor (or memory): it pauses
#: accepting for a second and says only this.
_ACCEPT_STARVED = "socket.accept() out of system resource"


def _starved_accepts(log: Any) -> Callable[[Any, dict[str, Any]], None]:
    """A loop exception handler that turns asyncio's accept() starvation into one clear
    warning a second (what to change), and leaves everything else to the default."""
    last = [-1e9]

    def handler(loop: Any, context: dict[str, Any]) -> None:
        if str(context.get("message", "")).startswith(_ACCEPT_STARVED):
            if loop.time() - last[0] >= 1.0:
                last[0] = loop.time()
                log.warning(
                    "new connections are refused: out of file descriptors (each connection"
                    " takes one); raise the hard limit (ulimit -Hn) or lower"
                    " [limits] max_connections and max_handshakes",
                    extra={"error": type(context.get("exception")).__name__},
                )
            return
        loop.default_exception_handler(context)

    return handler


async def run(settings: Any) -> int:
    """Serve until SIGINT or SIGTERM, then shut down gracefully; returns the exit status."""
    import asyncio
    import logging
    import signal

    from wirestate.adapters.server import WirestateServer

    log = logging.getLogger("wirestate.server")
    before, soft, hard = raise_fd_limit()
    log.info("file descriptors", extra={"soft": soft, "hard": hard, "soft_before": before})
    server = WirestateServer(settings)
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_starved_accepts(log))
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        if settings.server.gc_tune:
            tune_gc()
        await stop.wait()
        log.info("signal received, shutting down")
    return 0


def cmd_serve(args: argparse.Namespace, stdout: TextIO) -> int:
    import asyncio

    from wirestate.adapters.server.logs import configure_logging
    from wirestate.models.settings import ConfigError, load_settings

    overrides = {
        "server.host": args.host,
        "server.port": args.port,
        "server.ping_interval": args.ping_interval,
        "server.ping_timeout": args.ping_timeout,
        "server.send_queue_size": args.send_queue_size,
        "server.close_timeout": args.close_timeout,
        "server.certfile": args.certfile,
        "server.keyfile": args.keyfile,
        "server.loop": args.loop,
    }
    try:
        settings = load_settings(args.config, {k: v for k, v in overrides.items() if v is not None})
    except ConfigError as exc:
        sys.stderr.write(f"wirestate serve: invalid configuration:\n{exc}\n")
        return 2
    configure_logging(args.log_format, args.log_level)
    try:
        loop_factory = _loop_factory(settings.server.loop)
    except ImportError:
        sys.stderr.write(f"wirestate serve: loop = uvloop {UVLOOP_MISSING}\n")
        return 2
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            status: int = runner.run(run(settings))
            return status
    except ValueError as exc:  # a refusal to start that says what to change (open mode)
        sys.stderr.write(f"wirestate serve: {exc}\n")
        return 2
    except OSError as exc:
        # Typically the port is taken: say which, not the errno text alone.
        s = settings.server
        why = exc.strerror or type(exc).__name__
        sys.stderr.write(
            f"wirestate serve: cannot listen on {s.host}:{s.port} ({why});"
            " is another server running? choose another --port\n"
        )
        return 1


def cmd_client(args: argparse.Namespace, stdout: TextIO) -> int:
    import asyncio

    from wirestate.adapters.client.probe import run_client

    if args.count is not None and args.count < 1:
        sys.stderr.write("wirestate client: --count must be >= 1\n")
        return 2
    shared: dict[str, Any] = {"count": args.count, "duration": args.duration, "out": stdout}
    if args.reconnect:
        from wirestate.adapters.client.follow import follow

        try:
            return asyncio.run(
                follow(args.url, args.topic, json_lines=args.json, err=sys.stderr, **shared)
            )
        except KeyboardInterrupt:
            return 130
    try:
        return asyncio.run(run_client(args.url, args.topic, json_lines=args.json, **shared))
    except KeyboardInterrupt:
        # run_client printed its summary before the cancellation reached us.
        return 130


HYPOTHESIS_MISSING = "needs Hypothesis: pip install 'wirestate[verify]'"


def cmd_fuzz(args: argparse.Namespace, stdout: TextIO) -> int:
    try:
        from wirestate.adapters.tools.fuzz import run_fuzz
    except ModuleNotFoundError as exc:
        if exc.name != "hypothesis":
            raise
        sys.stderr.write(f"wirestate fuzz {HYPOTHESIS_MISSING}\n")
        return 2

    try:
        return run_fuzz(
            args.url,
            examples=args.examples,
            steps=args.steps,
            seed=args.seed,
            out=stdout,
            max_message_size=args.max_message_size,
        )
    except ValueError as exc:  # a non-loopback URL, said in words
        sys.stderr.write(f"wirestate fuzz: {exc}\n")
        return 2


def _per_second(text: str) -> float:
    """A rate such as ``500`` or ``500/s``."""
    number = text[:-2] if text.endswith("/s") else text
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate (e.g. 500 or 500/s)") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def cmd_loadtest(args: argparse.Namespace, stdout: TextIO) -> int:
    import asyncio

    from wirestate.adapters.tools.loadtest import LoadTestOptions, execute

    options = LoadTestOptions(
        url=args.url,
        clients=args.clients,
        duration=args.duration,
        rate=args.rate,
        topic=args.topic,
        token=args.token,
        ramp=args.ramp,
        publishers=args.publishers,
        concurrency=args.concurrency,
    )
    try:
        loop_factory = _loop_factory(args.loop)
    except ImportError:
        sys.stderr.write(f"wirestate loadtest: --loop uvloop {UVLOOP_MISSING}\n")
        return 2
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(execute(options, json_output=args.json, plot=args.plot, out=stdout))
    except KeyboardInterrupt:
        return 130


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("wirestate")
    except PackageNotFoundError:  # pragma: no cover - run from a tree that was never installed
        return "unknown (not installed)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wirestate",
        description="A real-time event hub over WebSocket with machine-checked state machines.",
    )
    p.add_argument("--version", action="version", version=f"wirestate {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser(
        "check",
        help="explore every interleaving of the lifecycle (and the breaker) and check invariants",
        description=(
            "Run the real core through every interleaving of inputs for N clients up to depth"
            " D, merging equal states; exit 0 when every invariant holds, 1 with the shortest"
            " trace that breaks one."
        ),
    )
    check.add_argument("--clients", type=_count(1), default=3, help="clients (default 3)")
    check.add_argument("--depth", type=_count(1), default=8, help="inputs per trace (default 8)")
    check.add_argument(
        "--breaker-depth",
        type=_count(0),
        default=10,
        help="depth of the breaker exploration, 0 to skip it (default 10)",
    )
    check.add_argument("--max-states", type=_count(1), default=None, help="stop after this many")
    check.add_argument(
        "--plant",
        choices=sorted(MUTANTS),
        help="plant a known bug first, to watch the checker catch it",
    )
    check.set_defaults(func=cmd_check)

    diag = sub.add_parser("diagram", help="draw a state machine from its table")
    diag.add_argument("machine", choices=sorted(diagram.MACHINES))
    diag.add_argument("--format", choices=("mermaid", "dot", "svg"), default="mermaid")
    diag.add_argument("-o", "--output", help="write to FILE instead of standard output")
    diag.set_defaults(func=cmd_diagram)

    srv = sub.add_parser(
        "serve",
        help="run the hub (default ws://127.0.0.1:12080/ws)",
        description=(
            "Run the hub until SIGINT or SIGTERM. Precedence: flags > WIRESTATE_* environment"
            " > --config file > defaults."
        ),
    )
    srv.add_argument("--config", type=Path, help="TOML configuration file")
    srv.add_argument("--host", help="address to bind (default 127.0.0.1)")
    srv.add_argument("--port", type=int, help="port (default 12080)")
    srv.add_argument("--ping-interval", type=float, help="seconds between pings (default 30)")
    srv.add_argument("--ping-timeout", type=float, help="seconds to wait for a pong (default 10)")
    srv.add_argument("--send-queue-size", type=int, help="messages per client outbox (256)")
    srv.add_argument("--close-timeout", type=float, help="seconds to close a client (5)")
    srv.add_argument("--certfile", type=Path, help="PEM certificate: serve wss:// and https://")
    srv.add_argument("--keyfile", type=Path, help="PEM private key of --certfile")
    srv.add_argument("--loop", choices=("asyncio", "uvloop"), help="event loop (default asyncio)")
    srv.add_argument("--log-format", choices=("text", "json"), default="text")
    srv.add_argument("--log-level", default="INFO")
    srv.set_defaults(func=cmd_serve)

    cl = sub.add_parser(
        "client",
        help="connect, subscribe, print events; a summary at exit",
        description="The test client: prints events, and at exit the connection's duration,"
        " messages received, ping round trip, close code and cause.",
    )
    cl.add_argument("url", help="e.g. ws://127.0.0.1:12080/ws")
    cl.add_argument("--topic", action="append", required=True, help="repeat for several")
    cl.add_argument("--count", type=int, help="stop after N events")
    cl.add_argument("--duration", type=float, help="stop after S seconds")
    cl.add_argument("--json", action="store_true", help="one JSON object a line")
    cl.add_argument(
        "--reconnect",
        action="store_true",
        help="follow the topics across reconnects (backoff, resume where each topic stood,"
        " gaps shown) instead of reporting how one connection ended",
    )
    cl.set_defaults(func=cmd_client)

    fz = sub.add_parser(
        "fuzz",
        help="drive a live server with hostile, interleaved input and check every promise",
        description="A stateful fuzzer over real sockets: connects, subscribes, publishes,"
        " pings, malformed and oversized frames, binary frames, abrupt disconnects and slow"
        " readers; checks welcome-first, a pong per ping, consecutive seq or a gap, no event"
        " after unsubscribe, a code and cause for every close, and the server alive at the"
        " end. Exit 0 when every promise held, 1 with the shortest failing script.",
    )
    fz.add_argument("url", help="e.g. ws://127.0.0.1:12080/ws (loopback only)")
    fz.add_argument("--examples", type=_count(1), default=100)
    fz.add_argument("--steps", type=_count(1), default=30)
    fz.add_argument("--seed", type=int, default=None, help="fixed seed (default: random)")
    fz.add_argument("--max-message-size", type=_count(1), default=65536)
    fz.set_defaults(func=cmd_fuzz)

    lt = sub.add_parser(
        "loadtest",
        help="N subscribers and a paced publisher: throughput, latency, losses, disconnects",
        description="Open N lean WebSocket connections (at most --concurrency handshakes in"
        " flight), subscribe each to one topic, publish --rate events/s for --duration"
        " seconds, then print throughput, latency p50/p90/p99/max, lost or duplicated"
        " deliveries, connection failures by kind and disconnects by close code and cause."
        " A progress line on stderr while it runs (a terminal, without --json). Exit 0 when"
        " every delivery arrived and nothing failed, 1 otherwise (with the reason), 2 for bad"
        " arguments. Note the server's [limits] max_connections_per_ip (default 1000),"
        " which applies to loopback too.",
    )
    lt.add_argument("--url", required=True, help="e.g. ws://127.0.0.1:12080/ws")
    lt.add_argument("--clients", type=_count(1), required=True, help="subscriber connections")
    lt.add_argument("--duration", type=float, required=True, help="seconds of publishing")
    lt.add_argument("--rate", type=_per_second, default=10.0, help="events/s (default 10)")
    lt.add_argument("--topic", help="topic to use (default: a fresh loadtest.<hex> per run)")
    lt.add_argument("--token", help="JWT sent as Authorization: Bearer (servers with [auth])")
    lt.add_argument(
        "--ramp", type=_per_second, help="open at most R connections per second (R or R/s)"
    )
    lt.add_argument(
        "--publishers",
        type=_count(1),
        help="publisher connections (default: one per 40 events/s, under the server's"
        " default of 50 inbound messages/s per connection)",
    )
    lt.add_argument("--concurrency", type=_count(1), default=200, help="handshakes in flight (200)")
    lt.add_argument("--json", action="store_true", help="print one JSON object")
    lt.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="draw latency and throughput (pip install 'wirestate[plot]')",
    )
    lt.add_argument("--loop", choices=("asyncio", "uvloop"), help="event loop (default asyncio)")
    lt.set_defaults(func=cmd_loadtest)

    schema = sub.add_parser("schema", help="print the JSON Schema of protocol v1")
    schema.add_argument("-o", "--output", help="write to FILE instead of standard output")
    schema.set_defaults(func=cmd_schema)
    return p


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.func(args, stdout or sys.stdout)
    return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
