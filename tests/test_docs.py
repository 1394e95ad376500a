"""The documentation is true to the code.

- Generated blocks (between ``<!-- BEGIN name … -->`` and ``<!-- END name -->``) equal what
  ``python -m wirestate.adapters.tools.docs`` renders now.
- Runnable blocks run: a fenced block whose info string has the word ``runnable``
  (```` ```python runnable ```` or ```` ```bash runnable ````), in README.md or docs/*.md,
  is executed, each in its own process under a time bound. (README.md's unmarked ``python``
  blocks keep running in tests/test_readme.py, as before.)
- Every JSON example of docs/protocol.md is parsed by the code it documents: its info string
  names its kind (``json client``, ``json server``, ``json clients``, ``json circuit_breaker``,
  ``json unavailable``), and every message type of both directions has an example.
- README.md links every doc, and every ``wirestate_*`` metric the docs name exists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest

from wirestate.adapters.tools import docs
from wirestate.models import wire

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
PROTOCOL = DOCS / "protocol.md"
#: The bound on one runnable block: a failure, never a hang.
BLOCK_TIMEOUT = 60.0

_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```$", re.M | re.S)


def fences(path: Path) -> list[tuple[int, list[str], str]]:
    """(line, info words, body) of every fenced block in a markdown file."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m[1].split(), m[2]) for m in _FENCE.finditer(text)]


def runnable(language: str) -> list[Any]:
    found = []
    for path in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for line, info, body in fences(path):
            if info[:1] == [language] and "runnable" in info[1:]:
                found.append(pytest.param(body, id=f"{path.name}:{line}"))
    return found


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The venv's scripts (`wirestate`) first, whatever PATH the test runner was given.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    return env


def _ran(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )


# -- generated blocks ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(docs.BLOCKS))
def test_generated_blocks_are_current(name: str) -> None:
    file_name = docs.BLOCKS[name][0]
    text = (DOCS / file_name).read_text(encoding="utf-8")
    _, stale = docs.update(text, file_name)
    assert name not in stale, (
        f"docs/{file_name}: the generated block {name!r} differs from the code; "
        f"run `{docs.COMMAND}` from the repository root"
    )


def test_the_command_finds_drift_and_fixes_it(tmp_path: Path, capsys: Any) -> None:
    shutil.copytree(DOCS, tmp_path / "docs")
    ops = tmp_path / "docs" / "operations.md"
    original = ops.read_text(encoding="utf-8")
    ops.write_text(original.replace("| `10000` |", "| `9999` |", 1), encoding="utf-8")
    assert docs.main(["--check", "--root", str(tmp_path)]) == 1
    assert "docs/operations.md: block 'config' is stale" in capsys.readouterr().out
    assert docs.main(["--root", str(tmp_path)]) == 0
    assert ops.read_text(encoding="utf-8") == original
    assert docs.main(["--check", "--root", str(tmp_path)]) == 0


def test_a_marker_for_an_unknown_or_missing_block_is_an_error(tmp_path: Path) -> None:
    shutil.copytree(DOCS, tmp_path / "docs")
    ops = tmp_path / "docs" / "operations.md"
    text = ops.read_text(encoding="utf-8")
    ops.write_text(text + "<!-- BEGIN nonsense -->\n<!-- END nonsense -->\n", encoding="utf-8")
    assert docs.main(["--check", "--root", str(tmp_path)]) == 2
    ops.write_text(text.replace("<!-- END metrics -->", ""), encoding="utf-8")
    with pytest.raises(ValueError, match="BEGIN without a matching END"):
        docs.check(tmp_path)
    ops.write_text(re.sub(r"<!-- BEGIN metrics.*?<!-- END metrics -->", "", text, flags=re.S))
    with pytest.raises(ValueError, match="generated blocks missing"):
        docs.check(tmp_path)


def test_the_schema_block_is_what_wirestate_schema_prints() -> None:
    from wirestate.models.schema import protocol_schema

    text = PROTOCOL.read_text(encoding="utf-8")
    block = re.search(
        r"<!-- BEGIN schema .*?-->\n```json\n(.*?)```\n<!-- END schema -->", text, re.S
    )
    assert block is not None
    assert json.loads(block[1]) == protocol_schema()


def _config_rows() -> list[tuple[str, str, list[str]]]:
    """(section, default, environment names) of each row of the configuration reference."""
    rows = []
    section = ""
    for line in docs.render("config").splitlines():
        if line.startswith("#### "):
            section = line.strip("#` ")
        elif line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            names = re.findall(r"`(WIRESTATE_[A-Z_]+)`", cells[3])
            rows.append((section, cells[2], names))
    return rows


def test_every_environment_name_of_the_reference_is_accepted() -> None:
    from wirestate.models.settings import load_settings

    checked = 0
    for section, default, names in _config_rows():
        if default in ("unset", "required"):
            continue
        value = default.strip("`")
        value = json.loads(value) if value.startswith('"') else value
        base = {"WIRESTATE_AUTH__SECRET": "s" * 32} if section == "[auth]" else {}
        for name in names:
            load_settings(env={**base, name: value})  # an unknown name raises ConfigError
            checked += 1
    assert checked > 30


# -- runnable blocks -------------------------------------------------------------------------


@pytest.mark.parametrize("code", runnable("python"))
def test_runnable_python_blocks_run(code: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
    )
    _ran(result)


@pytest.mark.parametrize("code", runnable("bash"))
def test_runnable_bash_blocks_run(code: str) -> None:
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
    )
    _ran(result)


@pytest.mark.parametrize(
    "name", ["protocol.md", "troubleshooting.md", "operations.md", "architecture.md"]
)
def test_each_new_doc_has_runnable_python(name: str) -> None:
    assert any(info[:1] == ["python"] and "runnable" in info for _, info, _ in fences(DOCS / name))


# -- protocol.md examples --------------------------------------------------------------------


def _examples(kind: str) -> list[Any]:
    text = PROTOCOL.read_text(encoding="utf-8")
    # The generated schema is a ```json block of its own, checked above.
    text = re.sub(r"<!-- BEGIN schema .*?<!-- END schema -->", "", text, flags=re.S)
    out = []
    for m in _FENCE.finditer(text):
        info = m[1].split()
        if info[:1] != ["json"]:
            continue
        assert len(info) == 2, f"protocol.md: a json block without its kind: {m[0][:60]!r}"
        if info[1] == kind:
            out += [line for line in m[2].splitlines() if line.strip()]
    return out


def _types(union: Any) -> set[str]:
    members = get_args(get_args(union)[0])
    return {member.model_fields["type"].default for member in members}


def test_every_client_example_is_a_valid_client_message() -> None:
    seen = set()
    for line in _examples("client"):
        msg = wire.parse_client_message(line)
        assert not isinstance(msg, wire.WireError), f"{line}: {msg}"
        seen.add(msg.type)
    assert seen == _types(wire.ClientMessage), "a client message type has no example"


def test_every_server_example_is_a_valid_server_message() -> None:
    seen = set()
    for line in _examples("server"):
        msg = wire.parse_server_message(line)
        assert not isinstance(msg, wire.WireError), f"{line}: {msg}"
        seen.add(msg.type)
    assert seen == _types(wire.ServerMessage), "a server message type has no example"


def test_json_blocks_of_protocol_md_are_of_known_kinds() -> None:
    kinds = {"client", "server", "clients", "circuit_breaker", "unavailable"}
    text = PROTOCOL.read_text(encoding="utf-8")
    text = re.sub(r"<!-- BEGIN schema .*?<!-- END schema -->", "", text, flags=re.S)
    for m in _FENCE.finditer(text):
        info = m[1].split()
        if info[:1] == ["json"]:
            assert info[1:], f"a json block without its kind: {info}"
            assert info[1] in kinds, f"unknown json block kind {info}"


def _same_shape(example: dict[str, Any], real: dict[str, Any]) -> None:
    assert set(example) == set(real), f"{example} has not the keys of {real}"
    for key, value in real.items():
        if value is None or example[key] is None:
            continue
        number = (int, float)
        if isinstance(value, number) and not isinstance(value, bool):
            assert isinstance(example[key], number), key
        else:
            assert type(example[key]) is type(value), key


def test_clients_examples_have_the_shape_the_hub_publishes() -> None:
    from wirestate.core.causes import CloseCause
    from wirestate.core.hub import Hub

    hub = Hub()
    conn = hub.connect("c1", now=0.0)
    hub.accept(conn, now=0.0)
    hub.start(conn, now=0.0)
    hub.reader_done(conn, now=40.0, cause=CloseCause.KEEPALIVE_TIMEOUT)
    hub.writer_done(conn, now=40.0)
    hub.unregister(conn, now=40.0)
    real = {}
    for event in hub.topics["clients"].history:
        data = json.loads(event.frame)["data"]
        real[data["event"]] = data
    examples = [json.loads(line) for line in _examples("clients")]
    assert {e["event"] for e in examples} == set(real)
    for example in examples:
        _same_shape(example, real[example["event"]])
        if "cause" in example:
            assert CloseCause(example["cause"])


def test_circuit_breaker_examples_have_the_shape_sources_publish() -> None:
    from wirestate.adapters.server.sources import breaker_event
    from wirestate.core.breaker import BreakerState, StateChanged, TransitionCause

    change = StateChanged(
        "agent_status",
        BreakerState.CLOSED,
        BreakerState.OPEN,
        at=10.0,
        failures=5,
        retry_at=310.0,
        cause=TransitionCause.FAILURE_THRESHOLD,
    )
    real = breaker_event(change, wall_offset=1.8e9)
    for line in _examples("circuit_breaker"):
        example = json.loads(line)
        _same_shape(example, real)
        assert BreakerState(example["from"])
        assert BreakerState(example["to"])
        assert re.fullmatch(wire._TS_PATTERN, example["retry_at"])


def test_unavailable_examples_have_the_shape_sources_publish() -> None:
    from wirestate.adapters.server.sources import unavailable_status
    from wirestate.core.breaker import BreakerState, PollReason, PollResult

    real = unavailable_status(
        PollResult(
            value=None,
            stale=False,
            fetched_at=None,
            age=None,
            state=BreakerState.OPEN,
            reason=PollReason.CIRCUIT_OPEN,
            error="UpstreamStatusError",
            retry_after=12.0,
        )
    )
    examples = [json.loads(line) for line in _examples("unavailable")]
    assert examples
    for example in examples:
        _same_shape(example, real)
        assert PollReason(example["reason"])
        assert BreakerState(example["state"])


# -- links and names -------------------------------------------------------------------------


def test_readme_links_every_doc() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for path in sorted(DOCS.glob("*.md")):
        assert f"](docs/{path.name})" in readme, f"README.md does not link docs/{path.name}"


def test_every_metric_the_docs_name_exists() -> None:
    from wirestate.adapters.server.metrics import Metrics

    exported = set()
    for family in Metrics(lambda: None, dict).registry.collect():
        exported.add(family.name + ("_total" if family.type == "counter" else ""))
    for path in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        for name in set(re.findall(r"\bwirestate_[a-z_]+", text)):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert base in exported, f"{path.name} names {name}, which /metrics does not export"
