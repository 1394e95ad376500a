"""The bytes of each server message, built once and shared. Pure.

Rules of this module:

* Every frame is compact JSON of the protocol's server-to-client messages (docs/protocol.md);
  ``tests/core/test_frames.py`` parses what these functions build with the wire models, so a
  frame can never drift from the schema.
* An event's frame is built once per publish and shared by every recipient's outbox and by
  the topic's history: ``event`` returns the whole frame, ``event_head`` the part before the
  data for an event whose data is already JSON (the bus delivers it so).
* A control frame held in an outbox is exact-size bytes (``control``): orjson's own output
  keeps a 4 KiB allocation behind even a small result, once per queued frame.
* Timestamps come from the caller's clock through `WallStamp`: nothing here reads a clock.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

import orjson

from wirestate.core.causes import GapReason

_OPTS: Final = orjson.OPT_NON_STR_KEYS


def dumps(value: Any) -> bytes:
    """Compact JSON, once per event (orjson: the hot path's only serialization). Raises
    ``TypeError`` for a value JSON cannot carry."""
    return orjson.dumps(value, option=_OPTS)


def control(value: dict[str, Any]) -> bytes:
    """A control frame (welcome, subscribed, pong, error, gap) as exact-size bytes."""
    return orjson.dumps(value, option=_OPTS).decode().encode()


def event(topic: str, seq: int, ts: str, data_json: str, stale: bool, age: float | None) -> bytes:
    """An ``event`` frame; ``data_json`` is the event's data, already serialized. A stale
    one carries its ``age`` (`Hub.publish` checks it)."""
    return (
        f'{{"type":"event","topic":{dumps(topic).decode()},"seq":{seq},'
        f'"ts":"{ts}","data":{data_json}'
    ).encode() + event_tail(stale, age)


def event_tail(stale: bool, age: float | None) -> bytes:
    """What follows an event's data: its ``stale`` flag, with its ``age`` when stale, and
    the frame's end. The bus carries it beside the data of an event published stale."""
    if not stale:
        return b',"stale":false}'
    return f',"stale":true,"age":{age!r}}}'.encode()


def event_head(topic: str, seq: int, ts: str) -> bytes:
    """The start of an ``event`` frame up to ``"data":``: the bus appends the data it
    carries as JSON, then its tail (`EVENT_TAIL` for a fresh event, else `event_tail`)."""
    return (
        f'{{"type":"event","topic":{dumps(topic).decode()},"seq":{seq},'
        f'"ts":{dumps(ts).decode()},"data":'
    ).encode()


#: What follows the data of a fresh event (``event_tail(False, None)``).
EVENT_TAIL: Final = b',"stale":false}'


def gap(topic: str, lo: int | None, hi: int | None, reason: GapReason) -> bytes:
    """A ``gap`` frame: events ``lo`` to ``hi`` (inclusive) of ``topic`` will never come;
    both None for ``epoch_changed``."""
    return control(
        {"type": "gap", "topic": topic, "from_seq": lo, "to_seq": hi, "reason": reason.value}
    )


class WallStamp:
    """Formats ``ts`` cheaply: the date-time prefix is rebuilt only when the second changes."""

    __slots__ = ("prefix", "second")

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def __call__(self, wall: float) -> str:
        second = int(wall // 1)
        if second != self.second:
            self.second = second
            self.prefix = datetime.fromtimestamp(second, UTC).isoformat()[:19]
        millis = min(int((wall - second) * 1000), 999)
        return f"{self.prefix}.{millis:03d}Z"


def iso_utc(wall: float) -> str:
    """Wall seconds since the epoch as ``2026-11-25T16:00:00.000Z`` (UTC, milliseconds)."""
    return WallStamp()(wall)
