"""JSON Schema of protocol v1, both directions in one document.

Rules of this module:

- The schema is generated from the wire models (`CLIENT_MESSAGE`, `SERVER_MESSAGE`), never
  written by hand, so the document cannot drift from what the server parses.
- Both directions use the *validation* schema: what the server accepts from a client, and
  what a client may rely on (and validate) in what the server sends.
- Output is deterministic so a generated doc diffs cleanly: every object's keys are sorted,
  except a model's ``properties``, which keep declaration order (the wire order, ``type``
  first). Lists keep their order; it is meaningful (``required``, ``oneOf``, enums).
- Shared definitions live once in the top-level ``$defs``; the two unions are at
  ``#/client_to_server`` and ``#/server_to_client`` (each a ``oneOf`` discriminated on
  ``type``), and their ``$ref``s resolve against the document root.
"""

from __future__ import annotations

from typing import Any

from .wire import CLIENT_MESSAGE, PROTOCOL_VERSION, SERVER_MESSAGE

__all__ = ["SCHEMA_DIALECT", "protocol_schema"]

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def protocol_schema() -> dict[str, Any]:
    """One JSON Schema document for protocol v1: ``client_to_server``, ``server_to_client``
    and their shared ``$defs``. A fresh dict each call; the caller may mutate it.

    Raises RuntimeError if the two directions define the same name differently (a model
    renamed into a clash), since one of the two meanings would silently be lost.
    """
    directions: dict[str, dict[str, Any]] = {}
    defs: dict[str, Any] = {}
    for name, adapter in (
        ("client_to_server", CLIENT_MESSAGE),
        ("server_to_client", SERVER_MESSAGE),
    ):
        schema = adapter.json_schema(mode="validation")
        for def_name, definition in schema.pop("$defs", {}).items():
            if defs.setdefault(def_name, definition) != definition:
                raise RuntimeError(f"both directions define {def_name!r}, differently")
        directions[name] = schema
    document: dict[str, Any] = {
        "$schema": SCHEMA_DIALECT,
        "title": f"wirestate protocol v{PROTOCOL_VERSION}",
        "description": (
            "JSON text frames on the /ws endpoint. client_to_server: what a client may send; "
            "server_to_client: what the server sends. Each is a oneOf discriminated on 'type'."
        ),
        **directions,
        "$defs": defs,
    }
    result = _stable(document)
    assert isinstance(result, dict)
    return result


def _stable(node: Any, *, keep_order: bool = False) -> Any:
    if isinstance(node, dict):
        keys = list(node) if keep_order else sorted(node)
        # A model's `properties` maps field names to schemas: keep the declaration order.
        return {key: _stable(node[key], keep_order=(key == "properties")) for key in keys}
    if isinstance(node, list):
        return [_stable(item) for item in node]
    return node
