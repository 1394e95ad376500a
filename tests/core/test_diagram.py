"""Diagrams come from the tables, and the ones in docs/ match them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from wirestate.core import diagram
from wirestate.core.verify.mutants import mutant

DOC = Path(__file__).parents[2] / "docs" / "state-machines.md"


@pytest.mark.parametrize("name", sorted(diagram.MACHINES))
def test_docs_hold_the_current_diagram(name: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    block = re.search(
        rf"<!-- BEGIN {name} .*?-->\n```mermaid\n(.*?)```\n<!-- END {name} -->", text, re.S
    )
    assert block, f"no generated {name} block in {DOC.name}"
    assert block.group(1) == diagram.render(name, "mermaid"), (
        f"docs/state-machines.md is stale: paste `wirestate diagram {name}` into it"
    )


def test_lifecycle_diagram_draws_every_state_changing_row() -> None:
    text = diagram.render("lifecycle", "mermaid")
    assert "[*] --> handshaking" in text
    assert "closed --> unregistered: unregister" in text
    assert "open --> closing_reader_done: reader_done" in text
    assert "rejected --> [*]" in text
    assert "unregistered --> [*]" in text
    assert "unregistered --> unregistered" not in text  # absorbing rows are not drawn


def test_breaker_diagram_shows_guards() -> None:
    text = diagram.render("breaker", "mermaid")
    assert "open --> half_open: probe [probe_due]" in text
    assert "closed --> half_open" not in text


def test_a_diagram_draws_the_table_it_is_given() -> None:
    planted = mutant("early_unregister").engine().machine
    text = diagram.render("lifecycle", "mermaid", machine=planted)
    assert "closing_reader_done --> unregistered: unregister" in text
    assert "closing_reader_done --> unregistered" not in diagram.render("lifecycle", "mermaid")


def test_dot_output() -> None:
    text = diagram.render("lifecycle", "dot")
    assert text.startswith('digraph "Connection lifecycle" {')
    assert '    closed -> unregistered [label="unregister"];' in text
    assert "    unregistered [peripheries=2];" in text
    assert text.rstrip().endswith("}")


def test_negated_guards_are_labelled() -> None:
    from transitions import Machine

    m = Machine(
        model=None,
        states=["a", "b"],
        transitions=[{"trigger": "go", "source": "a", "dest": "b", "unless": "_busy"}],
        initial="a",
        auto_transitions=False,
    )
    from enum import Enum

    class St(Enum):
        a = "a"
        b = "b"

    assert diagram.edges(m, St) == [("a", "b", "go [not busy]")]
