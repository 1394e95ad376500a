"""The protocol's JSON Schema: both directions, every message type, resolvable, diffable."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from wirestate.core.causes import ErrorCode, GapReason
from wirestate.models.schema import SCHEMA_DIALECT, protocol_schema
from wirestate.models.wire import MAX_TOPIC_LENGTH, TOPIC_PATTERN

CLIENT_TYPES = {"subscribe", "unsubscribe", "ping", "publish", "auth"}
SERVER_TYPES = {"welcome", "subscribed", "event", "gap", "error", "pong"}


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/")
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def test_document_shape() -> None:
    document = protocol_schema()
    assert document["$schema"] == SCHEMA_DIALECT
    assert "protocol v1" in document["title"]
    assert set(document) == {"$defs", "$id", "$schema", "description", "oneOf", "title"}
    assert document["oneOf"] == [
        {"$ref": "#/$defs/ClientMessage"},
        {"$ref": "#/$defs/ServerMessage"},
    ]


def test_each_direction_is_a_union_told_apart_by_type_in_standard_keywords() -> None:
    document = protocol_schema()
    assert "discriminator" not in json.dumps(document)  # OpenAPI's, not JSON Schema's
    for direction, types in (("ClientMessage", CLIENT_TYPES), ("ServerMessage", SERVER_TYPES)):
        union = document["$defs"][direction]
        consts = set()
        for option in union["oneOf"]:
            model = resolve(document, option["$ref"])
            assert model["additionalProperties"] is False
            assert model["required"][0] == "type"
            assert next(iter(model["properties"])) == "type"
            consts.add(model["properties"]["type"]["const"])
        assert consts == types


def test_every_ref_resolves_inside_the_document() -> None:
    document = protocol_schema()
    found = list(refs(document))
    assert found
    for ref in found:
        assert resolve(document, ref) is not None


def test_output_is_deterministic_and_sorted() -> None:
    first = json.dumps(protocol_schema(), indent=2)
    assert json.dumps(protocol_schema(), indent=2) == first
    document = protocol_schema()
    assert list(document) == sorted(document)
    assert list(document["$defs"]) == sorted(document["$defs"])
    event = document["$defs"]["Event"]
    assert list(event) == sorted(event)
    # Properties keep the wire order instead.
    assert list(event["properties"]) == ["type", "topic", "seq", "ts", "data", "stale", "age"]


def test_fresh_document_each_call() -> None:
    document = protocol_schema()
    document["$defs"].clear()
    assert protocol_schema()["$defs"]


def test_vocabularies_and_limits_are_exported() -> None:
    defs = protocol_schema()["$defs"]
    assert defs["ErrorCode"]["enum"] == [code.value for code in ErrorCode]
    assert defs["GapReason"]["enum"] == [reason.value for reason in GapReason]
    topic = defs["Event"]["properties"]["topic"]
    assert topic["pattern"] == TOPIC_PATTERN
    assert topic["maxLength"] == MAX_TOPIC_LENGTH
    subscribe = defs["Subscribe"]
    assert subscribe["properties"]["topics"]["minItems"] == 1
    assert subscribe["required"] == ["type", "topics"]
    gap = defs["Gap"]
    assert gap["required"] == ["type", "topic", "reason"]


def test_subscribed_carries_each_topics_position_as_an_optional_added_field() -> None:
    subscribed = protocol_schema()["$defs"]["Subscribed"]
    seq = subscribed["properties"]["seq"]
    assert seq["type"] == "object"
    assert seq["patternProperties"][TOPIC_PATTERN]["minimum"] == 0
    assert "seq" not in subscribed.get("required", [])  # protocol 1: older servers omit it
