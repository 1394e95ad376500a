"""The ``wirestate`` command line (DESIGN.md, "Command line").

Each subcommand is a thin shell over the core or the models: it parses flags, calls pure
code, prints, and chooses the exit status (0 success, 1 a check failed, 2 bad usage or a
missing tool). Messages say what failed and what to do; no traceback for expected failures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TextIO

from wirestate.core import diagram
from wirestate.core.explore import Result, explore
from wirestate.core.explore_breaker import explore_breaker
from wirestate.core.mutants import MUTANTS, planted


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
    with planted(args.plant) if args.plant else nullcontext():
        if args.plant:
            stdout.write(f"planted bug {args.plant}: {MUTANTS[args.plant][0]}\n")
        life = explore(
            args.clients, args.depth, max_states=args.max_states, clock=time.perf_counter
        )
        _report("lifecycle", f"{args.clients} clients", life, stdout)
        results.append(life)
        if args.breaker_depth:
            brk = explore_breaker(args.breaker_depth, clock=time.perf_counter)
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wirestate",
        description="A real-time event hub over WebSocket with machine-checked state machines.",
    )
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
