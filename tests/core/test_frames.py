"""Every frame the core builds is a valid message of the protocol: parsed back with the wire
models, it says what it was built to say."""

from __future__ import annotations

import orjson
import pytest

from wirestate.core import frames
from wirestate.core.causes import GapReason
from wirestate.models import wire


def _parse(frame: bytes) -> wire.ServerMessage:
    msg = wire.parse_server_message(frame)
    assert not isinstance(msg, wire.WireError), msg
    return msg


@pytest.mark.parametrize(("stale", "age"), [(False, None), (True, 0.0), (True, 12.5)])
def test_an_event_frame_is_a_valid_event(stale: bool, age: float | None) -> None:
    data = frames.dumps({"id": 1, "name": "é"}).decode()
    msg = _parse(frames.event("orders", 3, "2026-12-05T10:00:00.000Z", data, stale, age))
    assert isinstance(msg, wire.Event)
    assert (msg.topic, msg.seq, msg.data, msg.stale, msg.age) == (
        "orders",
        3,
        {"id": 1, "name": "é"},
        stale,
        age,
    )


def test_a_bus_event_is_head_data_and_tail() -> None:
    frame = frames.event_head("a/b", 7, "2026-12-05T10:00:00.000Z") + b"[1,2]" + frames.EVENT_TAIL
    msg = _parse(frame)
    assert isinstance(msg, wire.Event)
    assert (msg.topic, msg.seq, msg.data, msg.stale) == ("a/b", 7, [1, 2], False)


def test_gap_frames_are_valid_gaps() -> None:
    msg = _parse(frames.gap("t", 2, 5, GapReason.HISTORY_EVICTED))
    assert isinstance(msg, wire.Gap)
    assert (msg.from_seq, msg.to_seq, msg.reason) == (2, 5, "history_evicted")
    msg = _parse(frames.gap("t", None, None, GapReason.EPOCH_CHANGED))
    assert isinstance(msg, wire.Gap)
    assert (msg.from_seq, msg.to_seq) == (None, None)


def test_a_control_frame_is_exact_size_bytes() -> None:
    frame = frames.control({"type": "pong", "id": "x"})
    assert orjson.loads(frame) == {"type": "pong", "id": "x"}
    assert isinstance(_parse(frame), wire.Pong)


def test_stamps() -> None:
    stamp = frames.WallStamp()
    assert stamp(0.0) == "1970-01-01T00:00:00.000Z"
    assert stamp(0.9999) == "1970-01-01T00:00:00.999Z"
    assert stamp(61.5) == "1970-01-01T00:01:01.500Z"
    assert frames.iso_utc(1_764_086_400.25) == "2025-11-25T16:00:00.250Z"
