"""Structured logging for the service: one line per record, as JSON or as readable text.

Callers log with the standard library and pass facts as ``extra=`` fields, which become
top-level keys (JSON) or ``key=value`` pairs (text)::

    log.info("client closed", extra={"client_id": cid, "cause": "keepalive_timeout",
                                     "code": 1011, "duration": 12.3})

JSON line: ``{"ts": "2026-11-25T16:00:00.123Z", "level": "INFO", "logger": "wirestate.server",
"msg": "client closed", "client_id": "c1", "cause": "keepalive_timeout", "code": 1011,
"duration": 12.3}``.

Text line: ``2026-11-25T16:00:00.123Z INFO wirestate.server client closed client_id=c1
cause=keepalive_timeout code=1011 duration=12.3``.

Rules:

- An exception attached to a record (``log.exception``, ``exc_info=``) is rendered as its type
  name only, as ``exc`` (``"exc": "ConnectionResetError"``), in both formats: no message text
  and no traceback, because exception text can carry a peer's token, a URL with credentials,
  or a payload. ``stack_info`` is dropped for the same reason.
- An ``extra`` key that collides with a line's own key (``ts``, ``level``, ``logger``, ``msg``,
  ``exc``) is kept under ``extra_<key>``; it never overwrites them.
- Values that JSON does not know are written as text (enums by value, datetimes in ISO form,
  exceptions by type name, anything else by ``str``).
- Every line is one line: in text mode a message with newlines or other control characters
  is written with JSON string escapes, and such extra values are quoted.
- Secrets never reach a handler: `install_redaction` scrubs the configured secret and
  anything shaped like a JWT from the records of the loggers that can carry them
  (websockets logs request lines at DEBUG, ``?token=`` included; uvicorn logs paths).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Literal, TextIO

from wirestate.adapters.server.auth import redact

__all__ = ["Redact", "configure_logging", "install_redaction"]

#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
}
_OWN_KEYS = ("ts", "level", "logger", "msg", "exc")


def _timestamp(record: logging.LogRecord) -> str:
    instant = datetime.fromtimestamp(record.created, tz=UTC)
    return instant.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _plain(value: Any) -> Any:
    """`json.dumps` fallback for values JSON has no type for."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, BaseException):
        return type(value).__qualname__
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    return str(value)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The line's keys in order: own keys first, then the caller's extra fields."""
    fields: dict[str, Any] = {
        "ts": _timestamp(record),
        "level": record.levelname,
        "logger": record.name,
        "msg": record.getMessage(),
    }
    if record.exc_info and record.exc_info[0] is not None:
        fields["exc"] = record.exc_info[0].__qualname__
    for key, value in vars(record).items():
        if key in _RECORD_ATTRIBUTES or key.startswith("_"):
            continue
        fields[f"extra_{key}" if key in _OWN_KEYS else key] = value
    return fields


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # ASCII escapes: a valid JSON line whatever the stream's encoding.
        return json.dumps(_fields(record), default=_plain)


def _text_value(value: Any) -> str:
    text = (
        value
        if isinstance(value, str)
        else json.dumps(value, default=_plain, separators=(",", ":"))
    )
    if isinstance(value, str) and (
        not text or any(c.isspace() or c in '="' for c in text) or not text.isprintable()
    ):
        return json.dumps(text)  # quoted, escapes included
    return text


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(record)
        msg = fields.pop("msg")
        if not msg.isprintable():  # newlines, control characters: escape, stay on one line
            msg = json.dumps(msg)[1:-1]
        head = f"{fields.pop('ts')} {fields.pop('level')} {fields.pop('logger')} {msg}"
        pairs = " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
        return f"{head} {pairs}" if pairs else head


class _Handler(logging.StreamHandler[TextIO]):
    """Marks the handler this module installed, so configuring again replaces it."""


def configure_logging(
    fmt: Literal["text", "json"], level: str = "INFO", stream: TextIO | None = None
) -> None:
    """Send every logger's records to `stream` (default: ``sys.stderr`` at call time), one
    line each, in format `fmt`, at `level` and above (a level name, any case).

    Idempotent: calling again replaces the handler installed by the previous call (with the
    new format, level and stream) and leaves other handlers on the root logger alone. The
    ``transitions`` library's logger is set to ERROR: it logs every state change at INFO,
    which the service records itself with causes. Raises ValueError for an unknown `fmt` or
    `level`.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r}: use 'text' or 'json'")
    levels = logging.getLevelNamesMapping()
    name = level.upper()
    if name not in levels:
        raise ValueError(f"unknown log level {level!r}: use DEBUG, INFO, WARNING or ERROR")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()
    handler = _Handler(sys.stderr if stream is None else stream)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root.addHandler(handler)
    root.setLevel(levels[name])
    logging.getLogger("transitions").setLevel(logging.ERROR)
    # websockets logs every connection open and close at INFO, naming the connection
    # object: wirestate's own lines say the same with the client id and the close cause.
    logging.getLogger("websockets").setLevel(max(logging.WARNING, root.level))


class Redact(logging.Filter):
    """Replaces tokens (and the configured secret) in a record's text before any handler
    sees it."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        clean = redact(text, self.secrets)
        if clean != text:
            record.msg, record.args = clean, None
        return True


def install_redaction(loggers: Iterable[str], secrets: list[str]) -> None:
    """Scrub ``secrets`` and JWT-shaped text from every record of ``loggers`` (replacing a
    filter installed by an earlier call, so a second server's secret takes over)."""
    for name in loggers:
        target = logging.getLogger(name)
        for old in [f for f in target.filters if isinstance(f, Redact)]:
            target.removeFilter(old)
        target.addFilter(Redact(secrets))
