"""The shipped JSON Schema validates with a standard validator: every example of
docs/protocol.md and every frame a live server sends passes; malformed frames do not."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

from wirestate.adapters.server.service import WirestateServer
from wirestate.models.schema import protocol_schema
from wirestate.testing.net import connected, recv, server_settings

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
_FENCE = re.compile(r"^```(json (?:client|server))\n(.*?)^```", re.M | re.S)


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    schema = protocol_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def frames_of_the_docs() -> list[tuple[str, Any]]:
    text = PROTOCOL.read_text(encoding="utf-8")
    out = []
    for match in _FENCE.finditer(text):
        out += [(match[1], json.loads(line)) for line in match[2].splitlines() if line.strip()]
    return out


def test_the_docs_hold_examples_of_both_directions() -> None:
    kinds = {kind for kind, _ in frames_of_the_docs()}
    assert kinds == {"json client", "json server"}


@pytest.mark.parametrize(("kind", "frame"), frames_of_the_docs())
def test_every_example_of_the_protocol_page_is_valid(
    validator: Draft202012Validator, kind: str, frame: Any
) -> None:
    errors = [error.message for error in validator.iter_errors(frame)]
    assert not errors, (kind, frame, errors)


@pytest.mark.parametrize(
    "frame",
    [
        {"foo": 1},
        {},
        [],
        "subscribe",
        {"type": "subscribe"},  # no topics
        {"type": "subscribe", "topics": []},
        {"type": "subscribe", "topics": ["a b"]},  # not a topic name
        {"type": "nope"},
        {"type": "publish", "topic": "t", "data": 1, "extra": True},
        {"type": "event", "topic": "t", "seq": 0, "ts": "2026-11-25T16:00:00.000Z", "data": 1},
        {
            "type": "event",
            "topic": "t",
            "seq": 1,
            "ts": "2026-11-25T16:00:00.000Z",
            "data": 1,
            "stale": True,
        },  # stale without its age
        {
            "type": "event",
            "topic": "t",
            "seq": 1,
            "ts": "2026-11-25T16:00:00.000Z",
            "data": 1,
            "age": 3.0,
        },  # an age without stale
        {"type": "event", "topic": "t", "seq": "1", "ts": "2026-11-25T16:00:00.000Z", "data": 1},
        {"type": "gap", "topic": "t", "reason": "history_evicted"},  # no range
        {"type": "gap", "topic": "t", "from_seq": 1, "to_seq": 2, "reason": "epoch_changed"},
        {"type": "gap", "topic": "t", "from_seq": 0, "to_seq": 2, "reason": "bus_outage"},
        {"type": "error", "code": "not_a_code", "message": "x"},
    ],
)
def test_malformed_frames_are_refused(validator: Draft202012Validator, frame: Any) -> None:
    assert not validator.is_valid(frame)


async def test_what_a_live_server_sends_is_valid(validator: Draft202012Validator) -> None:
    async with WirestateServer(server_settings()) as server:
        ws, welcome = await connected(server.url)
        seen = [welcome]
        sent = [
            {"type": "subscribe", "topics": ["orders", "circuit_breaker"]},
            {"type": "ping", "id": "p1"},
            {"type": "publish", "topic": "orders", "data": {"id": 1}},
            {"type": "subscribe", "topics": ["orders"], "since": {"orders": 0}},
            {"type": "subscribe", "topics": ["bad name"]},
        ]
        for frame in sent:
            assert validator.is_valid(frame) == ("bad name" not in str(frame)), frame
            await ws.send(orjson.dumps(frame).decode())
        await server.publish("orders", {"id": 2})
        while seen[-1].get("data") != {"id": 2}:
            seen.append(await recv(ws))
        await ws.send('{"type": "unsubscribe", "topics": ["orders"]}')
        await ws.send('{"type": "ping", "id": "last"}')
        while seen[-1] != {"type": "pong", "id": "last"}:
            seen.append(await recv(ws))
        await ws.close()
    kinds = {frame["type"] for frame in seen}
    assert kinds >= {"welcome", "subscribed", "event", "pong", "error"}, seen
    for frame in seen:
        errors = [error.message for error in validator.iter_errors(frame)]
        assert not errors, (frame, errors)
