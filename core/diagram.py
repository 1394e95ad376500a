"""State diagrams drawn from the machines themselves (mermaid and Graphviz DOT text).

Pure: it reads the shared ``Machine`` objects (so a diagram is always the table that runs) and
returns text. Rendering DOT to SVG needs Graphviz's ``dot`` and is the CLI's business.
Internal rows (``dest=None``: counting, absorbing, same-state requests) change no state and
are left out; guarded rows show their guard as ``trigger [guard]``.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from transitions import Machine

from wirestate.core import lifecycle
from wirestate.core.breaker import table as breaker_table


def _name(func: Any) -> str:
    return func if isinstance(func, str) else getattr(func, "__name__", repr(func))


def edges(machine: Machine, states: type[Enum]) -> list[tuple[str, str, str]]:
    """(source, dest, label) for every state-changing row, in table order, merged by pair."""
    merged: dict[tuple[str, str], list[str]] = {}
    for trigger, event in machine.events.items():
        for source, rows in event.transitions.items():
            for row in rows:
                if row.dest is None:
                    continue
                guards = [
                    ("" if c.target else "not ") + _name(c.func).lstrip("_") for c in row.conditions
                ]
                label = trigger + (f" [{', '.join(guards)}]" if guards else "")
                pair = (states[source].value, states[row.dest].value)
                labels = merged.setdefault(pair, [])
                if label not in labels:
                    labels.append(label)
    return [(src, dst, ", ".join(labels)) for (src, dst), labels in merged.items()]


def mermaid(machine: Machine, states: type[Enum], initial: Enum, title: str) -> str:
    """A mermaid ``stateDiagram-v2`` (GitHub renders it; no binary needed)."""
    lines = ["---", f"title: {title}", "---", "stateDiagram-v2", "    direction LR"]
    lines.append(f"    [*] --> {initial.value}")
    for src, dst, label in edges(machine, states):
        lines.append(f"    {src} --> {dst}: {label}")
    lines.extend(f"    {s.value} --> [*]" for s in _terminal(machine, states))
    return "\n".join(lines) + "\n"


def dot(machine: Machine, states: type[Enum], initial: Enum, title: str) -> str:
    """Graphviz DOT text (``dot -Tsvg`` renders it)."""
    lines = [
        f'digraph "{title}" {{',
        f'    graph [rankdir=LR, label="{title}", labelloc=t];',
        "    node [shape=box, style=rounded];",
        '    __start [shape=point, label=""];',
        f"    __start -> {initial.value};",
    ]
    for s in _terminal(machine, states):
        lines.append(f"    {s.value} [peripheries=2];")
    for src, dst, label in edges(machine, states):
        lines.append(f'    {src} -> {dst} [label="{label}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _terminal(machine: Machine, states: type[Enum]) -> list[Enum]:
    leaving = {src for src, _dst, _label in edges(machine, states)}
    return [s for s in states if s.value not in leaving]


#: name -> (machine, states, initial, title).
MACHINES: dict[str, tuple[Machine, type[Enum], Enum, str]] = {
    "lifecycle": (
        lifecycle.MACHINE,
        lifecycle.ConnState,
        lifecycle.ConnState.HANDSHAKING,
        "Connection lifecycle",
    ),
    "breaker": (
        breaker_table.MACHINE,
        breaker_table.BreakerState,
        breaker_table.INITIAL,
        "Circuit breaker",
    ),
}


def render(name: str, fmt: str, machine: Machine | None = None) -> str:
    """``render("lifecycle", "mermaid")``; ``fmt`` is ``mermaid`` or ``dot``. ``machine``
    draws another table of the same states (a mutant's, ``Engine.machine``)."""
    default, states, initial, title = MACHINES[name]
    draw = {"mermaid": mermaid, "dot": dot}[fmt]
    return draw(machine or default, states, initial, title)
