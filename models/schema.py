"""JSON Schema of protocol v1, both directions in one document.

Rules of this module:

- The schema is generated from the wire models (`CLIENT_MESSAGE`, `SERVER_MESSAGE`), never
  written by hand, so the document cannot drift from what the server parses.
- Both directions use the *validation* schema: what the server accepts from a client, and
  what a client may rely on (and validate) in what the server sends.
- Output is deterministic so a generated doc diffs cleanly: every object's keys are sorted,
  except a model's ``properties``, which keep declaration order (the wire order, ``type``
  first). Lists keep their order; it is meaningful (``required``, ``oneOf``, enums).
- Standard JSON Schema 2020-12 only (no OpenAPI ``discriminator``): the root is a
  ``oneOf`` of ``#/$defs/ClientMessage`` (what a client may send) and
  ``#/$defs/ServerMessage`` (what the server sends), each a ``oneOf`` of the messages of
  its direction, told apart by their ``type`` constant; so the root validates any frame of
  either direction and refuses anything else. Every definition lives once in ``$defs``.
"""

from __future__ import annotations

from typing import Any

from .wire import CLIENT_MESSAGE, PROTOCOL_VERSION, SERVER_MESSAGE

__all__ = ["DIRECTIONS", "SCHEMA_DIALECT", "SCHEMA_ID", "protocol_schema"]

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
#: The document's identifier (a name, not a download address: ``wirestate schema`` prints it).
SCHEMA_ID = f"urn:wirestate:protocol:v{PROTOCOL_VERSION}"
#: The two unions under ``$defs``, and what each holds.
DIRECTIONS = {
    "ClientMessage": "What a client may send; the server refuses anything else.",
    "ServerMessage": "What the server sends; a client may rely on it.",
}


def protocol_schema() -> dict[str, Any]:
    """One JSON Schema document for protocol v1 (the module docstring). A fresh dict each
    call; the caller may mutate it.

    Raises RuntimeError if the two directions define the same name differently (a model
    renamed into a clash), since one of the two meanings would silently be lost.
    """
    defs: dict[str, Any] = {}
    for name, adapter in (("ClientMessage", CLIENT_MESSAGE), ("ServerMessage", SERVER_MESSAGE)):
        schema = _standard(adapter.json_schema(mode="validation"))
        for def_name, definition in schema.pop("$defs", {}).items():
            if defs.setdefault(def_name, definition) != definition:
                raise RuntimeError(f"both directions define {def_name!r}, differently")
        if name in defs:
            raise RuntimeError(f"a message model is named {name!r}, like a direction")
        defs[name] = {"description": DIRECTIONS[name], **schema}
    document: dict[str, Any] = {
        "$schema": SCHEMA_DIALECT,
        "$id": SCHEMA_ID,
        "title": f"wirestate protocol v{PROTOCOL_VERSION}",
        "description": (
            "JSON text frames on the /ws endpoint, either direction: a ClientMessage (what a"
            " client may send) or a ServerMessage (what the server sends), each told apart by"
            " its 'type'."
        ),
        "oneOf": [{"$ref": "#/$defs/ClientMessage"}, {"$ref": "#/$defs/ServerMessage"}],
        "$defs": defs,
    }
    result = _stable(document)
    assert isinstance(result, dict)
    return result


def _standard(node: Any) -> Any:
    """``node`` without OpenAPI's ``discriminator`` keyword: each ``oneOf`` branch pins its
    ``type`` with ``const``, which is what standard validators read."""
    if isinstance(node, dict):
        return {k: _standard(v) for k, v in node.items() if k != "discriminator"}
    if isinstance(node, list):
        return [_standard(item) for item in node]
    return node


def _stable(node: Any, *, keep_order: bool = False) -> Any:
    if isinstance(node, dict):
        keys = list(node) if keep_order else sorted(node)
        # A model's `properties` maps field names to schemas: keep the declaration order.
        return {key: _stable(node[key], keep_order=(key == "properties")) for key in keys}
    if isinstance(node, list):
        return [_stable(item) for item in node]
    return node
