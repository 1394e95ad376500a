"""The node's view of a shared bus (core/bus.py) and the hub's bus inputs, on a fake clock."""

from __future__ import annotations

from typing import Any

import orjson

from wirestate.core.bus import BusState, Plan, Reconciled
from wirestate.core.causes import CloseCause, OverflowPolicy
from wirestate.core.frames import EVENT_TAIL, event_tail
from wirestate.core.hub import Connection, Hub, HubConfig

T = "orders"


def frames(hub: Hub, conn: Connection) -> list[dict[str, Any]]:
    return [orjson.loads(f) for f in hub.drain(conn)]


def client(hub: Hub, name: str = "c1", *topics: str) -> Connection:
    conn = hub.connect(name, 0.0)
    hub.accept(conn, 0.0)
    hub.start(conn, 0.0)
    if topics:
        hub.subscribe(conn, topics, 0.0)
    frames(hub, conn)  # welcome, subscribed
    return conn


def ev(seq: int, value: Any = None) -> tuple[int, bytes, str, bytes]:
    body = orjson.dumps({"n": seq if value is None else value})
    return seq, body, "2026-11-25T00:00:00.000Z", EVENT_TAIL


def seqs(msgs: list[dict[str, Any]]) -> list[Any]:
    return [
        m["seq"] if m["type"] == "event" else (m["from_seq"], m["to_seq"], m["reason"])
        for m in msgs
    ]


# -- Hub.deliver / rebase / attach ------------------------------------------------------------


def test_a_stale_event_from_the_bus_keeps_its_flag_and_age() -> None:
    hub = Hub(epoch="node")
    conn = client(hub, "c1", T)
    ts = "2026-11-25T00:00:00.000Z"
    assert hub.deliver(T, 1, b'{"a":1}', ts, 1.0, event_tail(True, 4.5))
    hub.attach(T, "node", 2, [(2, b'{"s":"u"}', ts, event_tail(True, 0.5))], 1.0)
    got = frames(hub, conn)
    assert [(m["stale"], m.get("age")) for m in got] == [(True, 4.5), (True, 0.5)]


def test_a_stale_event_published_during_an_outage_keeps_its_flag_here() -> None:
    hub = Hub(epoch="node")
    conn = client(hub, "c1", T)
    BusState(hub, 10).publish_local(T, {"v": 1}, 1.0, stale=True, age=2.0)
    [msg] = frames(hub, conn)
    assert (msg["stale"], msg["age"]) == (True, 2.0)


def test_deliver_takes_the_bus_seq_and_ignores_duplicates() -> None:
    hub = Hub(epoch="node")
    conn = client(hub, "c1", T)
    assert hub.deliver(T, 1, b'{"a":1}', "2026-11-25T00:00:00.000Z", 1.0)
    assert not hub.deliver(T, 1, b'{"a":1}', "2026-11-25T00:00:00.000Z", 1.0)
    assert hub.deliver(T, 2, b"[2]", "2026-11-25T00:00:01.000Z", 1.0)
    got = frames(hub, conn)
    assert got == [
        {
            "type": "event",
            "topic": T,
            "seq": 1,
            "ts": "2026-11-25T00:00:00.000Z",
            "data": {"a": 1},
            "stale": False,
        },
        {
            "type": "event",
            "topic": T,
            "seq": 2,
            "ts": "2026-11-25T00:00:01.000Z",
            "data": [2],
            "stale": False,
        },
    ]
    assert hub.stats.duplicates == 1
    assert hub.topics[T].retained is not None
    assert hub.topics[T].retained.seq == 2


def test_a_jump_in_the_bus_seq_owes_a_bus_outage_gap_before_the_event() -> None:
    hub = Hub(epoch="node")
    conn = client(hub, "c1", T)
    for seq in (1, 2, 6):
        _, body, ts, _ = ev(seq)
        hub.deliver(T, seq, body, ts, 1.0)
    assert seqs(frames(hub, conn)) == [1, 2, (3, 5, "bus_outage"), 6]
    # The history no longer bridges the hole: a resume from 2 is told so.
    late = client(hub, "c2")
    hub.subscribe(late, [T], 2.0, since={T: 2})
    msgs = frames(hub, late)
    assert msgs[0]["recovered"] == {T: False}
    assert seqs(msgs[1:]) == [(3, 5, "history_evicted"), 6]


def test_rebase_to_another_epoch_tells_subscribers_and_restarts_the_count() -> None:
    hub = Hub(epoch="node")
    conn = client(hub, "c1", T)
    hub.publish(T, {"x": 1}, 1.0)
    hub.rebase(T, 0, 2.0, epoch="bus")
    hub.deliver(T, 1, b"1", "2026-11-25T00:00:00.000Z", 2.0)
    msgs = frames(hub, conn)
    assert seqs(msgs) == [1, (None, None, "epoch_changed"), 1]
    assert hub.topics[T].epoch == "bus"
    assert hub.stats.epoch_changes == 1


def test_rebase_backwards_in_the_same_epoch_changes_nothing() -> None:
    hub = Hub(epoch="node")
    conn = client(hub, "c1", T)
    hub.publish(T, 1, 1.0)
    hub.publish(T, 2, 1.0)
    frames(hub, conn)
    hub.rebase(T, 1, 2.0)
    assert hub.topics[T].seq == 2
    assert frames(hub, conn) == []
    assert len(hub.topics[T].history) == 2


def test_a_rebase_gap_replaces_what_the_subscriber_was_owed() -> None:
    config = HubConfig(send_queue_size=2, default_overflow=OverflowPolicy.DROP_OLDEST)
    hub = Hub(config, epoch="node")
    conn = client(hub, "c1", T)
    for i in (1, 2, 3):
        hub.publish(T, i, 1.0)  # the third drops seq 1: owed
    assert conn.owed == {T: [[1, 1]]}
    hub.rebase(T, 5, 1.0)
    assert conn.owed == {}
    assert conn.cause is CloseCause.SLOW_CONSUMER  # the gap did not fit the full outbox


def test_attach_adopts_the_bus_epoch_and_tail_without_duplicates() -> None:
    hub = Hub(epoch="node")
    hub.attach(T, "bus", 10, [ev(8), ev(9), ev(10)], 1.0)
    topic = hub.topics[T]
    assert (topic.epoch, topic.seq) == ("bus", 10)
    assert [e.seq for e in topic.history] == [8, 9, 10]
    conn = client(hub, "c1")
    hub.subscribe(conn, [T], 1.0, since={T: (8, "bus")})
    msgs = frames(hub, conn)
    assert msgs[0]["epoch"] == {T: "bus"}
    assert msgs[0]["recovered"] == {T: True}
    assert seqs(msgs[1:]) == [9, 10]
    # Attaching again (a reader that caught up) delivers only what is new.
    hub.attach(T, "bus", 12, [ev(9), ev(10), ev(11), ev(12)], 2.0)
    assert seqs(frames(hub, conn)) == [11, 12]


def test_attach_past_a_trimmed_tail_gaps_to_the_bus_seq() -> None:
    hub = Hub(epoch="node")
    conn = client(hub, "c1")
    hub.attach(T, "bus", 2, [ev(1), ev(2)], 1.0)
    hub.subscribe(conn, [T], 1.0)
    frames(hub, conn)
    hub.attach(T, "bus", 9, [], 2.0)  # the stream was trimmed or lost past seq 2
    assert seqs(frames(hub, conn)) == [(3, 9, "bus_outage")]


def test_may_publish_refuses_reserved_topics_and_closing_clients() -> None:
    hub = Hub(epoch="node")
    conn = client(hub)
    assert hub.may_publish(conn, T, 0.0)
    assert not hub.may_publish(conn, "clients", 0.0)
    assert frames(hub, conn)[0]["code"] == "forbidden"
    hub.close(conn, CloseCause.PEER_CLOSE, 0.0)
    assert not hub.may_publish(conn, T, 0.0)


# -- BusState -------------------------------------------------------------------------------


def state(cap: int = 100) -> tuple[Hub, BusState]:
    hub = Hub(HubConfig(history_size=cap), epoch="node")
    return hub, BusState(hub, cap)


def test_reading_lists_attached_topics_with_subscribers_and_detaches_the_rest() -> None:
    hub, bus = state()
    bus.attach(T, "bus", 3, [ev(3)], 0.0)
    bus.attach("idle", "bus", 0, [], 0.0)
    client(hub, "c1", T)
    assert bus.reading() == {T: 3}
    assert not bus.links["idle"].attached
    assert bus.reading() == {T: 3}  # a detached topic stays out until attached again
    assert bus.links[T].attached


def test_entries_deliver_in_order_and_count_what_was_new_and_what_was_gapped() -> None:
    hub, bus = state()
    bus.attach(T, "bus", 0, [], 0.0)
    conn = client(hub, "c1", T)
    assert bus.entries(T, [ev(1), ev(2)], 1.0) == 2
    assert bus.entries(T, [ev(2), ev(5)], 1.0) == 1
    assert bus.links[T].cursor == 5
    assert bus.gapped == 2
    assert seqs(frames(hub, conn)) == [1, 2, (3, 4, "bus_outage"), 5]


def test_an_outage_counts_once_and_local_publishes_wait_for_the_bus() -> None:
    hub, bus = state(cap=2)
    bus.restored()
    bus.attach(T, "bus", 4, [ev(4)], 0.0)
    conn = client(hub, "c1", T)
    frames(hub, conn)
    assert bus.lost()
    assert not bus.lost()
    assert bus.outages == 1
    assert [bus.publish_local(T, {"i": i}, 1.0) for i in range(3)] == [5, 6, 7]
    assert seqs(frames(hub, conn)) == [5, 6, 7]  # local delivery goes on
    link = bus.links[T]
    assert len(link.pending) == 2
    assert link.skipped == 1  # the stream holds 2
    (plan,) = bus.plans()
    assert plan == Plan(T, "bus", 4, 1, tuple(link.pending))


def test_reconciled_same_keeps_the_local_seqs() -> None:
    hub, bus = state()
    bus.attach(T, "bus", 4, [], 0.0)
    conn = client(hub, "c1", T)
    bus.lost()
    bus.publish_local(T, 1, 1.0)
    bus.publish_local(T, 2, 1.0)
    frames(hub, conn)
    (plan,) = bus.plans()
    bus.reconciled(plan, Reconciled.SAME, "bus", 4, 6, 2.0)
    bus.restored()
    assert bus.up
    assert bus.links[T].cursor == 6
    assert not bus.links[T].pending
    assert frames(hub, conn) == []  # nothing to correct
    assert bus.entries(T, [ev(5), ev(6), ev(7)], 3.0) == 1  # its own events are not resent


def test_reconciled_moved_gaps_local_clients_by_what_others_wrote() -> None:
    hub, bus = state()
    bus.attach(T, "bus", 4, [], 0.0)
    conn = client(hub, "c1", T)
    bus.lost()
    bus.publish_local(T, "a", 1.0)  # local 5
    bus.publish_local(T, "b", 1.0)  # local 6
    frames(hub, conn)
    (plan,) = bus.plans()
    # Another node wrote 5..7 meanwhile; this node's two went to 8 and 9.
    bus.reconciled(plan, Reconciled.MOVED, "bus", 7, 9, 2.0)
    assert seqs(frames(hub, conn)) == [(7, 9, "bus_outage")]
    assert bus.gapped == 3
    assert bus.links[T].cursor == 9
    assert bus.entries(T, [ev(10)], 3.0) == 1


def test_reconciled_moved_with_nothing_local_reads_the_others_events() -> None:
    hub, bus = state()
    bus.attach(T, "bus", 4, [], 0.0)
    conn = client(hub, "c1", T)
    bus.lost()
    (plan,) = bus.plans()
    bus.reconciled(plan, Reconciled.MOVED, "bus", 6, 6, 2.0)
    assert bus.links[T].cursor == 4
    assert bus.entries(T, [ev(5), ev(6)], 3.0) == 2
    assert seqs(frames(hub, conn)) == [5, 6]


def test_reconciled_epoch_moves_local_clients_to_the_bus_epoch() -> None:
    hub, bus = state()
    conn = client(hub, "c1", T)  # subscribed while down: the node's own epoch
    bus.publish_local(T, "x", 1.0)
    frames(hub, conn)
    (plan,) = bus.plans()
    assert (plan.epoch, plan.base) == ("node", 0)
    bus.reconciled(plan, Reconciled.EPOCH, "bus", 40, 41, 2.0)
    assert seqs(frames(hub, conn)) == [(None, None, "epoch_changed")]
    assert hub.topics[T].epoch == "bus"
    assert hub.topics[T].seq == 41


def test_plans_skip_topics_the_node_only_knows_by_name() -> None:
    hub, bus = state()
    bus.link("known")
    assert bus.plans() == []
    assert bus.cap == 100
    assert BusState(hub, 0).cap == 1


def test_a_dropped_topic_takes_its_bus_state_along_unless_it_owes_the_bus() -> None:
    hub = Hub(HubConfig(history_max_age=1.0), epoch="e")
    state = BusState(hub, 10)
    conn = client(hub, "c1", T)
    state.attach(T, "e", 0, [], 0.0)
    hub.unsubscribe(conn, [T], 0.0)
    state.lost()
    state.publish_local("owing", {"n": 1}, 0.0)  # published while down: owed to the bus
    hub.tick(5.0)  # both topics idle, aged, dropped
    dropped = hub.take_dropped()
    assert sorted(dropped) == sorted([T, "owing"])
    assert state.reading() == {}  # a link whose topic is gone is read no more
    state.forget(dropped)
    assert T not in state.links
    assert "owing" in state.links  # its events still go to the bus on recovery


def test_acknowledged_publishes_never_read_back_are_a_gap_not_reused_seqs() -> None:
    """The bus numbered this node's publishes 5..7, the link failed before the node read
    them back, and a failover may have lost them: the local count goes on at 8, after a
    bus_outage gap for 5..7, and the bus is asked to go on from 7 as well."""
    hub, bus = state()
    bus.attach(T, "bus", 4, [], 0.0)
    conn = client(hub, "c1", T)
    for seq in (5, 7, 6):
        bus.acked(T, seq)
    bus.lost()
    assert bus.publish_local(T, "local", 1.0) == 8
    assert seqs(frames(hub, conn)) == [(5, 7, "bus_outage"), 8]
    assert bus.gapped == 3
    assert bus.publish_local(T, "again", 1.0) == 9  # one gap only
    (plan,) = bus.plans()
    assert plan.base == 7
    bus.reconciled(plan, Reconciled.SAME, "bus", 7, 9, 2.0)
    assert bus.links[T].cursor == 9


def test_with_nothing_to_send_reading_goes_on_from_the_cursor() -> None:
    """Reconciled with nothing of its own to send, a node reads on from where it was: what
    the bus still holds arrives, and a hole the bus lost is a gap."""
    hub, bus = state()
    bus.attach(T, "bus", 4, [], 0.0)
    conn = client(hub, "c1", T)
    bus.acked(T, 6)  # published here, not read back yet
    bus.lost()
    (plan,) = bus.plans()
    assert plan.base == 6
    bus.reconciled(plan, Reconciled.SAME, "bus", 6, 6, 1.0)
    assert bus.links[T].cursor == 4
    assert bus.entries(T, [ev(5), ev(6)], 2.0) == 2
    assert seqs(frames(hub, conn)) == [5, 6]


def test_a_write_the_bus_must_not_get_keeps_its_seq_as_a_hole() -> None:
    hub, bus = state()
    bus.attach(T, "bus", 4, [], 0.0)
    conn = client(hub, "c1", T)
    bus.lost()
    assert bus.publish_local(T, "kept", 1.0) == 5
    assert bus.publish_local(T, "fenced", 1.0, stale=True, age=3.0, keep=False) == 6
    assert bus.publish_local(T, "kept too", 1.0) == 7
    assert [m["data"] for m in frames(hub, conn)] == ["kept", "fenced", "kept too"]
    (plan,) = bus.plans()
    assert [body for body, _ in plan.events] == [b'"kept"', b"", b'"kept too"']
