"""The generated parts of docs/, and the command that keeps them current.

::

    python -m wirestate.adapters.tools.docs           # rewrite every generated block in docs/
    python -m wirestate.adapters.tools.docs --check   # change nothing; exit 1 naming stale blocks

Run it from the repository root (or pass ``--root``). A generated block is the text between
two marker lines; the generator owns that text and nothing else in the file::

    <!-- BEGIN config (generated: python -m wirestate.adapters.tools.docs) -->
    ...
    <!-- END config -->

Rules of this module:

- Every block is rendered from the code it describes: the JSON Schema from the wire models,
  the configuration reference from the settings models (types and defaults from the fields,
  meanings from their ``#:`` comments, environment names by the rules of `load_settings`,
  flags from ``wirestate serve``'s own parser), the metrics reference from a live `Metrics`
  registry, the diagrams from the state-machine tables. The one-line meanings of the close
  causes, error codes and gap reasons are kept here, keyed by their enums: a member without
  a meaning (or a meaning without a member) fails rendering, so the tables cannot drift.
- Each block of `BLOCKS` appears exactly once, in its own file; a marker naming any other
  block is an error. ``tests/test_docs.py`` fails when a committed block differs from what
  the code renders.
- Output is deterministic: the same code renders the same bytes.
- It lives in adapters/ because it reads the command line and the metrics adapter;
  models/ never imports adapters/.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import re
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from enum import Enum
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

__all__ = ["BLOCKS", "COMMAND", "check", "main", "render", "update", "write"]

COMMAND = "python -m wirestate.adapters.tools.docs"

_MARKER = re.compile(
    r"^<!-- BEGIN (?P<name>[a-z][a-z0-9-]*)(?P<note>[^\n]*?) -->\n(?P<body>.*?)"
    r"^<!-- END (?P=name) -->$",
    re.M | re.S,
)
_ANY_BEGIN = re.compile(r"^<!-- BEGIN (\S+)", re.M)


def _fenced(info: str, text: str) -> str:
    return f"```{info}\n{text if text.endswith(chr(10)) else text + chr(10)}```\n"


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return " ".join(text.split()).replace("``", "`").replace("|", "\\|")


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _keyed(enum: type[Enum], meanings: dict[str, Any]) -> list[tuple[str, Any]]:
    values = [m.value for m in enum]
    if set(values) != set(meanings):
        missing, extra = set(values) - set(meanings), set(meanings) - set(values)
        raise ValueError(
            f"{enum.__name__}: no meaning for {missing or '-'}; unknown {extra or '-'}"
        )
    return [(v, meanings[v]) for v in values]


# -- protocol.md ------------------------------------------------------------------------------


def _schema() -> str:
    from wirestate.models.schema import protocol_schema

    return _fenced("json", json.dumps(protocol_schema(), indent=2))  # = `wirestate schema`


def _close_causes() -> str:
    from wirestate.core.causes import CLOSE_CODE, CloseCause
    from wirestate.core.hub import HubConfig

    hub = HubConfig()
    meanings = {
        "peer_close": (
            "the peer",
            "the peer's own",
            "The peer sent a close frame; its code is recorded as sent (1005 when the frame "
            "had none). A client closing by itself, right after connecting or later.",
        ),
        "read_error": (
            "the network",
            "1006 (never sent)",
            "The connection ended without a close frame: a reset, an EOF, a proxy or NAT "
            "cutting it, a client process that died.",
        ),
        "write_error": (
            "the network",
            "1006 (never sent)",
            "A write failed on a connection already gone, before the reader noticed.",
        ),
        "keepalive_timeout": (
            "the server",
            None,
            "No pong came within `ping_timeout` of a protocol ping (a stall of the server's "
            "own event loop extends the deadline instead).",
        ),
        "slow_consumer": (
            "the server",
            None,
            "The client did not take what it was sent: under the `disconnect` policy its "
            "outbox passed `send_queue_size` messages or `max_pending_bytes` bytes (outbox "
            "plus socket buffer), or a write stayed blocked for `close_timeout` (the socket "
            "is then aborted and the client sees 1006). A burst that arrives at once does "
            "not count against a client that keeps reading.",
        ),
        "message_too_big": (
            "the server",
            None,
            "An inbound frame was larger than `[limits] max_message_size`.",
        ),
        "policy": (
            "the server",
            None,
            f"{hub.bad_input_limit} invalid messages in a row, {hub.rate_limit_grace} messages "
            "(protocol pings included) refused in a row by the rate limit, or with "
            "`[auth] first_message`: a first message that is not a valid `auth`, or none "
            "within `first_message_timeout`.",
        ),
        "auth_expired": (
            "the server",
            None,
            "The token's `exp` passed while the client was connected.",
        ),
        "shutdown": (
            "the server",
            None,
            "The server is stopping (SIGINT, SIGTERM, `stop()`); under uvicorn the ASGI "
            "server closes with 1012 itself.",
        ),
        "protocol_error": (
            "the server's protocol layer",
            None,
            "A frame that breaks RFC 6455: a masked-bit error, a bad opcode, a control frame "
            "too long or fragmented, a continuation out of place.",
        ),
        "invalid_utf8": (
            "the server's protocol layer",
            None,
            "A text frame that is not valid UTF-8. RFC 6455 (section 8.1) requires failing the "
            "connection: it ends; there is no error message to recover from.",
        ),
    }
    rows = []
    for cause, (who, code, text) in _keyed(CloseCause, meanings):
        sent = code or f"{int(CLOSE_CODE[CloseCause(cause)])}, reason `{cause}`"
        rows.append((f"`{cause}`", who, sent, text))
    return _table(("cause", "closed by", "close code", "when"), rows)


def _error_codes() -> str:
    from wirestate.core.causes import ErrorCode

    meanings = {
        "bad_json": "The frame is not valid UTF-8 JSON.",
        "unknown_type": "A JSON object whose `type` is missing or not a client message type.",
        "invalid_message": (
            "Anything else that does not match its type: not an object, a missing, extra or "
            "ill-typed field, a bad topic name, a binary frame."
        ),
        "forbidden": (
            "A topic outside the token's claims, a publish on a topic only the server "
            "publishes on, or an `auth` message that is not the first."
        ),
        "rate_limited": (
            "Over `[limits] messages_per_second`: sent once per run of refused messages."
        ),
        "too_many_topics": "Over `[limits] max_subscriptions`: the whole subscribe is refused.",
        "topic_limit": (
            "The node holds `[limits] max_topics` topics and this subscribe would create "
            "one more: the whole subscribe is refused (POST /publish answers 503). Idle "
            "topics are dropped after `[history] max_age`; retry later."
        ),
    }
    rows = [(f"`{code}`", text) for code, text in _keyed(ErrorCode, meanings)]
    return _table(("code", "sent when"), rows)


def _gap_reasons() -> str:
    from wirestate.core.causes import GapReason

    meanings = {
        "history_evicted": (
            "A resume (`since`) from before the oldest event the topic still keeps "
            "(`[history] size` and `max_age`); after `epoch_changed`, the new numbering's "
            "seqs from 1 that it no longer keeps."
        ),
        "slow_consumer": (
            "Events dropped from a full outbox under the `drop_oldest` or `keep_latest` policy."
        ),
        "bus_outage": (
            "Events numbered on the bus while this node's link to it was down (several nodes)."
        ),
        "epoch_changed": (
            "The topic's numbering restarted (a restarted server, or a node-local topic resumed "
            "on another node): no range, the old and new seqs are unrelated; the new "
            "numbering follows from seq 1."
        ),
    }
    rows = [(f"`{reason}`", text) for reason, text in _keyed(GapReason, meanings)]
    return _table(("reason", "events lost because"), rows)


# -- operations.md: configuration ---------------------------------------------------------------


def _strip_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, UnionType):
        members = [a for a in get_args(annotation) if a is not NoneType]
        if len(members) == 1:
            return members[0]
    return annotation


def _model(annotation: Any) -> type[BaseModel] | None:
    annotation = _strip_optional(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _comments(model: type[BaseModel]) -> dict[str, str]:
    """The ``#:`` comment above each field, from the class and its bases (nearest wins)."""
    found: dict[str, str] = {}
    for cls in model.__mro__:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or cls is BaseModel:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(cls))
        except (OSError, TypeError):
            continue
        lines = source.splitlines()
        for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            above: list[str] = []
            at = node.lineno - 2
            while at >= 0 and lines[at].strip().startswith("#:"):
                above.insert(0, lines[at].strip()[2:].strip())
                at -= 1
            if above and node.target.id not in found:
                found[node.target.id] = " ".join(above)
    return found


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    return {**defs[ref.rsplit("/", 1)[1]], **{k: v for k, v in schema.items() if k != "$ref"}}


def _type(schema: dict[str, Any], defs: dict[str, Any]) -> str:
    from wirestate.models.wire import TOPIC_PATTERN

    schema = _resolve(schema, defs)
    if "anyOf" in schema:
        kinds = [s for s in schema["anyOf"] if s.get("type") != "null"]
        text = " or ".join(_type(s, defs) for s in kinds)
        return text + (", optional" if len(kinds) < len(schema["anyOf"]) else "")
    if "enum" in schema:
        return " or ".join(json.dumps(v) for v in schema["enum"])
    kind = schema.get("type")
    if kind == "string":
        if schema.get("format") == "path":
            return "path"
        if schema.get("format") == "password":
            return "string (secret)"
        if schema.get("pattern") == TOPIC_PATTERN:
            return "topic name"
        return "string"
    if kind in ("integer", "number"):
        low, high = schema.get("minimum"), schema.get("maximum")
        if low is not None and high is not None:
            return f"{kind} {low} to {high}"
        if "exclusiveMinimum" in schema:
            return f"{kind} > {schema['exclusiveMinimum']}"
        return f"{kind} ≥ {low}" if low is not None else kind
    if kind == "array":
        return "list of " + _type(schema.get("items", {}), defs) + "s"
    if kind == "boolean":
        return "boolean"
    raise ValueError(f"no rendering for schema {schema!r}")


def _toml(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, str | Path):
        return f"`{json.dumps(str(value))}`"
    if isinstance(value, tuple | list):
        return "`[" + ", ".join(json.dumps(v) for v in value) + "]`"
    return f"`{value!r}`"


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        return _toml(field.default_factory())  # type: ignore[call-arg]
    return _toml(field.default if field.default is not PydanticUndefined else None)


def _serve_flags() -> dict[str, str]:
    """``wirestate serve`` flag per settings key (a flag whose dest is a ``[server]`` key)."""
    from wirestate.adapters.tools.cli import parser

    for action in parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            serve = action.choices["serve"]
            return {a.dest: a.option_strings[-1] for a in serve._actions if a.option_strings}
    raise RuntimeError("wirestate has no serve command")


def _sections() -> Iterator[tuple[str, type[BaseModel], str | None, str]]:
    """(table header, model, environment prefix or None, where else it may come from)."""
    from wirestate.models.settings import ENV_PREFIX, Settings

    for name, field in Settings.model_fields.items():
        annotation = _strip_optional(field.annotation)
        origin = get_origin(annotation)
        json_env = f"`{ENV_PREFIX}{name.upper()}` (JSON)"
        if origin is tuple:
            model, header, env, note = get_args(annotation)[0], f"[[{name}]]", None, json_env
        elif origin is dict:
            model, header, env = get_args(annotation)[1], f'[{name}."<topic>"]', None
            note = json_env
        else:
            model, header, env = annotation, f"[{name}]", f"{ENV_PREFIX}{name.upper()}__"
            note = f"`{ENV_PREFIX}{name.upper()}` (JSON) or one variable per key"
        assert _model(model) is not None, f"settings field {name} is not a table"
        yield header, model, env, note
        for sub, subfield in model.model_fields.items():
            submodel = _model(subfield.annotation)
            if submodel is not None:
                subheader = header.strip("[]").replace('."<topic>"', "")
                subheader = f"[{subheader}.{sub}]"
                subenv = f"{env}{sub.upper()}__" if env else None
                yield subheader, submodel, subenv, note if env is None else ""


def _config() -> str:
    from wirestate.models.settings import ENV_PREFIX, ServerSettings

    flags = _serve_flags()
    out: list[str] = []
    for header, model, env, note in _sections():
        schema = model.model_json_schema()
        defs = schema.get("$defs", {})
        comments = _comments(model)
        doc = inspect.getdoc(model)
        out.append(f"#### `{header}`\n\n")
        if doc and model.__doc__:  # its own docstring, not an inherited one
            out.append(_cell(doc.split("\n\n")[0]) + "\n\n")
        if env is None:
            out.append(f"From the file, or as a whole from {note}.\n\n")
        rows = []
        for key, field in model.model_fields.items():
            if _model(field.annotation) is not None:
                continue  # a table of its own
            if key not in comments:
                raise ValueError(f"{model.__name__}.{key} has no #: comment to document it")
            where = []
            if env is not None:
                where.append(f"`{env}{key.upper()}`")
                if model is ServerSettings:
                    where.append(f"`{ENV_PREFIX}{key.upper()}`")
                    if key in flags:
                        where.append(f"`{flags[key]}`")
            prop = schema["properties"][key]
            rows.append(
                (f"`{key}`", _type(prop, defs), _default(field), ", ".join(where), comments[key])
            )
        out.append(_table(("key", "type", "default", "environment, flag", "meaning"), rows))
        out.append("\n")
    return "".join(out).rstrip("\n") + "\n"


# -- operations.md: metrics -------------------------------------------------------------------


def _label_values() -> dict[tuple[str, str], list[str]]:
    """Known values of each label, from the enums and the code that sets them."""
    from wirestate.adapters.server.admission import RefusalReason
    from wirestate.core import hub
    from wirestate.core.breaker import BreakerState
    from wirestate.core.causes import CloseCause, ErrorCode
    from wirestate.core.lifecycle import REGISTERED, ConnState

    # The drop and refusal reasons are string literals where they are counted; read there.
    dropped = re.findall(r'dropped\["([a-z_]+)"\]', inspect.getsource(hub))
    states = [s.value for s in BreakerState]
    return {
        ("wirestate_connections", "state"): [s.value for s in ConnState if s in REGISTERED],
        ("wirestate_disconnects", "cause"): [c.value for c in CloseCause],
        ("wirestate_messages_dropped", "reason"): list(dict.fromkeys(dropped)),
        ("wirestate_errors_sent", "code"): [c.value for c in ErrorCode],
        ("wirestate_connections_rejected", "reason"): [r.value for r in RefusalReason],
        ("wirestate_breaker_state", "breaker"): ["a source's topic", "bus"],
        ("wirestate_breaker_state", "state"): states,
        ("wirestate_breaker_transitions", "breaker"): ["a source's topic", "bus"],
        ("wirestate_breaker_transitions", "from_state"): states,
        ("wirestate_breaker_transitions", "to_state"): states,
        ("wirestate_source_leader", "source"): ["a shared source's topic, on a Redis bus"],
    }


def _metrics() -> str:
    from wirestate.adapters.server.metrics import Metrics

    values = _label_values()
    rows = []
    for family in Metrics(lambda: None, dict).registry.collect():
        if not family.name.startswith("wirestate_"):
            continue
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = []
        for label in getattr(family, "_labelnames", ()) or ():
            known = values.get((family.name, label))
            shown = f" ({', '.join(known)})" if known else ""
            labels.append(f"`{label}`{shown}")
        if family.type == "histogram":
            labels.append("`le` (buckets; `_bucket`, `_sum`, `_count`)")
        rows.append((f"`{name}`", family.type, "; ".join(labels), family.documentation))
    return _table(("metric", "type", "labels", "meaning"), rows)


# -- state-machines.md ---------------------------------------------------------------------------


def _diagram(machine: str) -> Callable[[], str]:
    def render() -> str:
        from wirestate.core import diagram

        return _fenced("mermaid", diagram.render(machine, "mermaid"))

    return render


#: name -> (file under docs/, renderer)
def _imports() -> str:
    from wirestate.adapters.tools import layout

    return layout.mermaid()


BLOCKS: dict[str, tuple[str, Callable[[], str]]] = {
    "schema": ("protocol.md", _schema),
    "close-causes": ("protocol.md", _close_causes),
    "error-codes": ("protocol.md", _error_codes),
    "gap-reasons": ("protocol.md", _gap_reasons),
    "config": ("operations.md", _config),
    "metrics": ("operations.md", _metrics),
    "lifecycle": ("state-machines.md", _diagram("lifecycle")),
    "breaker": ("state-machines.md", _diagram("breaker")),
    "imports": ("architecture.md", _imports),
}


def render(name: str) -> str:
    """The current text of block `name` (KeyError for an unknown block)."""
    return BLOCKS[name][1]()


def update(text: str, file_name: str) -> tuple[str, list[str]]:
    """`text` (the document `file_name` under docs/) with every block re-rendered, and the
    names of the blocks whose text changed. Raises ValueError for a marker naming an unknown
    block or another file's block, a block twice, a BEGIN without its END, or a block of
    this file that is missing."""
    stale: list[str] = []
    seen: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in BLOCKS or BLOCKS[name][0] != file_name:
            raise ValueError(f"{file_name}: no generated block {name!r} belongs here")
        if name in seen:
            raise ValueError(f"{file_name}: block {name!r} appears twice")
        seen.append(name)
        fresh = render(name)
        if match["body"] != fresh:
            stale.append(name)
        return f"<!-- BEGIN {name}{match['note']} -->\n{fresh}<!-- END {name} -->"

    result = _MARKER.sub(replace, text)
    unmatched = set(_ANY_BEGIN.findall(text)) - set(seen)
    if unmatched:
        raise ValueError(f"{file_name}: BEGIN without a matching END: {sorted(unmatched)}")
    missing = [n for n, (f, _) in BLOCKS.items() if f == file_name and n not in seen]
    if missing:
        raise ValueError(f"{file_name}: generated blocks missing: {missing}")
    return result, stale


def _documents(root: Path) -> list[Path]:
    files = sorted({f for f, _ in BLOCKS.values()})
    return [root / "docs" / f for f in files]


def check(root: Path) -> list[str]:
    """One line per stale block under `root`/docs; empty when every block is current."""
    problems = []
    for path in _documents(root):
        _, stale = update(path.read_text(encoding="utf-8"), path.name)
        problems += [f"docs/{path.name}: block {name!r} is stale" for name in stale]
    return problems


def write(root: Path) -> list[str]:
    """Re-render every block under `root`/docs; returns the files that changed."""
    changed = []
    for path in _documents(root):
        text = path.read_text(encoding="utf-8")
        fresh, stale = update(text, path.name)
        if stale:
            path.write_text(fresh, encoding="utf-8")
            changed.append(f"docs/{path.name}")
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=COMMAND, description="Regenerate (or --check) the generated blocks of docs/."
    )
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if stale")
    p.add_argument("--root", type=Path, default=Path(), help="the repository (default: .)")
    args = p.parse_args(argv)
    if not (args.root / "docs").is_dir():
        sys.stderr.write(f"{COMMAND}: no docs/ under {args.root.resolve()}; use --root\n")
        return 2
    try:
        if args.check:
            problems = check(args.root)
            for line in problems:
                sys.stdout.write(f"{line}: run `{COMMAND}`\n")
            return 1 if problems else 0
        for name in write(args.root):
            sys.stdout.write(f"rewrote {name}\n")
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"{COMMAND}: {exc}\n")
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
