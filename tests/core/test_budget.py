"""A client is bounded in bytes as well as in messages, and a burst spares a reader: what
decides is what the client fails to take, not how much arrived at once."""

from __future__ import annotations

from typing import Any

import orjson

from wirestate.core.actions import Close
from wirestate.core.causes import CloseCause, OverflowPolicy
from wirestate.core.hub import Connection, Hub, HubConfig


def open_client(hub: Hub, cid: str = "c1") -> Connection:
    conn = hub.connect(cid, 0.0)
    hub.accept(conn, 0.0)
    hub.start(conn, 0.0)
    hub.drain(conn)
    hub.actions()
    return conn


def subscribed(hub: Hub, topic: str, cid: str = "c1") -> Connection:
    conn = open_client(hub, cid)
    hub.subscribe(conn, [topic], 0.0)
    hub.drain(conn)
    hub.take_ready()
    return conn


def closes(hub: Hub) -> list[CloseCause]:
    return [a.cause for a in hub.actions() if isinstance(a, Close)]


BIG = "x" * 1000  # an event of about 1 KB


def test_a_client_is_cut_when_its_bytes_pass_the_budget_even_below_the_count() -> None:
    hub = Hub(HubConfig(send_queue_size=256, max_pending_bytes=10_000))
    conn = subscribed(hub, "t")
    for i in range(9):
        hub.publish("t", {"i": i, "pad": BIG}, 1.0)
    assert closes(hub) == []
    assert 9_000 < conn.queued_bytes <= 10_000
    hub.publish("t", {"pad": BIG}, 1.0)
    assert closes(hub) == [CloseCause.SLOW_CONSUMER]


def test_bytes_still_in_the_transport_count_against_the_budget() -> None:
    hub = Hub(HubConfig(max_pending_bytes=10_000))
    conn = subscribed(hub, "t")
    hub.written(conn, buffered=9_500, writable=False)
    hub.publish("t", {"pad": BIG}, 1.0)
    assert closes(hub) == [CloseCause.SLOW_CONSUMER]


def test_a_burst_to_a_reading_client_passes_the_count_and_asks_for_a_write_now() -> None:
    hub = Hub(HubConfig(send_queue_size=8))
    reader = subscribed(hub, "t", "reader")
    stuck = subscribed(hub, "t", "stuck")
    hub.written(reader, buffered=0, writable=True)  # its transport takes writes
    hub.written(stuck, buffered=70_000, writable=False)  # over its high-water mark
    for i in range(20):  # all in one loop iteration
        hub.publish("t", i, 1.0)
    assert len(reader.outbox) == 20
    assert set(hub.take_urgent()) == {"reader"}
    assert [a.client_id for a in hub.actions() if isinstance(a, Close)] == ["stuck"]
    assert [orjson.loads(f)["seq"] for f in hub.drain(reader)] == list(range(1, 21))
    assert reader.queued_bytes == 0


def test_a_burst_is_still_bounded_by_the_budget() -> None:
    hub = Hub(HubConfig(send_queue_size=2, max_pending_bytes=5_000))
    conn = subscribed(hub, "t")
    hub.written(conn, buffered=0, writable=True)
    for _ in range(4):
        hub.publish("t", {"pad": BIG}, 1.0)
    assert closes(hub) == []
    hub.publish("t", {"pad": BIG}, 1.0)
    assert closes(hub) == [CloseCause.SLOW_CONSUMER]


def test_drop_oldest_frees_enough_bytes_for_a_large_event_and_owes_the_gap() -> None:
    hub = Hub(
        HubConfig(
            max_pending_bytes=3_500,
            overflow={"t": OverflowPolicy.DROP_OLDEST},
        )
    )
    conn = subscribed(hub, "t")
    for i in range(3):
        hub.publish("t", {"i": i, "pad": BIG}, 1.0)
    hub.publish("t", {"i": 3, "pad": BIG * 2}, 1.0)  # needs two events' room
    got = [orjson.loads(f) for f in hub.drain(conn)]
    assert [(m["type"], m.get("seq"), m.get("from_seq"), m.get("to_seq")) for m in got] == [
        ("gap", None, 1, 2),
        ("event", 3, None, None),
        ("event", 4, None, None),
    ]
    assert closes(hub) == []


def test_an_event_larger_than_the_whole_budget_is_a_gap_under_a_lossy_policy() -> None:
    hub = Hub(HubConfig(max_pending_bytes=500, overflow={"t": OverflowPolicy.KEEP_LATEST}))
    conn = subscribed(hub, "t")
    hub.publish("t", {"pad": BIG}, 1.0)
    got: list[dict[str, Any]] = [orjson.loads(f) for f in hub.drain(conn)]
    assert got == [
        {"type": "gap", "topic": "t", "from_seq": 1, "to_seq": 1, "reason": "slow_consumer"}
    ]


def test_control_frames_use_the_burst_allowance_too() -> None:
    hub = Hub(HubConfig(send_queue_size=2))
    conn = subscribed(hub, "t")
    hub.written(conn, buffered=0, writable=True)
    for i in range(5):
        hub.app_ping(conn, str(i), 1.0)
    assert len(conn.outbox) == 5
    assert closes(hub) == []


def test_unsubscribing_recounts_the_queued_bytes() -> None:
    hub = Hub()
    conn = open_client(hub)
    hub.subscribe(conn, ["a", "b"], 0.0)
    hub.drain(conn)
    hub.publish("a", {"pad": BIG}, 1.0)
    hub.publish("b", 1, 1.0)
    hub.unsubscribe(conn, ["a"], 1.0)
    assert conn.queued_bytes == sum(len(e.frame) for e in conn.outbox)  # type: ignore[union-attr]
