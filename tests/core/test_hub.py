"""The hub on a fake clock: actions and frames for each input."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from transitions import MachineError

from wirestate.core.actions import Abort, Close, Ping, Reject, Unregistered
from wirestate.core.causes import CloseCause, ErrorCode, OverflowPolicy
from wirestate.core.frames import iso_utc
from wirestate.core.hub import Connection, Hub, HubConfig
from wirestate.core.lifecycle import ConnState
from wirestate.models.wire import SERVER_MESSAGE

S = ConnState


def frames(hub: Hub, conn: Connection) -> list[dict[str, Any]]:
    """Drain like a writer, check each frame against the protocol model, return dicts."""
    out = []
    for raw in hub.drain(conn):
        SERVER_MESSAGE.validate_json(raw)
        out.append(orjson.loads(raw))
    return out


def open_client(hub: Hub, cid: str = "c1", now: float = 0.0) -> Connection:
    conn = hub.connect(cid, now)
    hub.accept(conn, now)
    hub.start(conn, now)
    hub.drain(conn)  # the welcome
    hub.actions()
    return conn


def events(msgs: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(m["topic"], m["seq"]) for m in msgs if m["type"] == "event"]


# -- handshake and registration --------------------------------------------------------


def test_accept_registers_queues_welcome_and_announces_the_client() -> None:
    hub = Hub(HubConfig(ping_interval=7.0, ping_timeout=2.0), epoch="e")
    watcher = open_client(hub, "w")
    hub.subscribe(watcher, ["clients"], 0.0)
    frames(hub, watcher)
    conn = hub.connect("c1", 1.0)
    assert conn.state is S.HANDSHAKING
    assert "c1" not in hub.clients
    hub.accept(conn, 1.0)
    assert hub.clients["c1"] is conn
    assert conn.state is S.REGISTERING
    assert "c1" in hub.take_ready()
    assert frames(hub, conn) == [
        {
            "type": "welcome",
            "client_id": "c1",
            "protocol": 1,
            "ping_interval": 7.0,
            "ping_timeout": 2.0,
        }
    ]
    announced = [m["data"] for m in frames(hub, watcher)]
    assert announced == [{"event": "connected", "client_id": "c1"}]


def test_a_duplicate_client_id_is_refused() -> None:
    hub = Hub()
    open_client(hub, "c1")
    with pytest.raises(ValueError, match="already registered"):
        hub.accept(hub.connect("c1", 0.0), 0.0)


def test_reject_never_registers() -> None:
    hub = Hub()
    conn = hub.connect("c1", 0.0)
    hub.reject(conn, CloseCause.POLICY, 0.0)
    assert conn.state is S.REJECTED
    assert hub.actions() == [Reject("c1", CloseCause.POLICY)]
    assert hub.clients == {}


def test_a_server_close_during_the_handshake_is_a_reject() -> None:
    hub = Hub()
    conn = hub.connect("c1", 0.0)
    hub.close(conn, CloseCause.SHUTDOWN, 0.0)
    assert conn.state is S.REJECTED
    assert hub.actions() == [Reject("c1", CloseCause.SHUTDOWN)]


# -- the unregister guard -----------------------------------------------------------------


def test_unregister_waits_for_both_pumps_in_either_order() -> None:
    for first, second in (("reader", "writer"), ("writer", "reader")):
        hub = Hub()
        conn = open_client(hub)

        def finish(pump: str, hub: Hub = hub, conn: Connection = conn) -> None:
            if pump == "reader":
                hub.reader_done(conn, 1.0, CloseCause.PEER_CLOSE, 1000)
            else:
                hub.writer_done(conn, 1.0)

        finish(first)
        with pytest.raises(MachineError):
            hub.unregister(conn, 1.5)
        assert "c1" in hub.clients
        finish(second)
        assert conn.state is S.CLOSED
        hub.unregister(conn, 2.0)
        assert conn.state is S.UNREGISTERED
        assert "c1" not in hub.clients
        unregistered = [a for a in hub.actions() if isinstance(a, Unregistered)]
        assert len(unregistered) == 1
        hub.unregister(conn, 3.0)  # the handler's finally may run it again: absorbed
        assert hub.actions() == []


def test_disconnect_is_announced_with_cause_code_and_duration() -> None:
    hub = Hub()
    watcher = open_client(hub, "w")
    hub.subscribe(watcher, ["clients"], 0.0)
    conn = open_client(hub, "c1", now=10.0)
    frames(hub, watcher)
    hub.reader_done(conn, 22.5, CloseCause.PEER_CLOSE, 1001)
    hub.writer_done(conn, 22.5)
    hub.unregister(conn, 22.5)
    assert hub.actions() == [
        Close("c1", 1001, CloseCause.PEER_CLOSE, "peer_close"),
        Unregistered("c1", CloseCause.PEER_CLOSE, 1001, 12.5),
    ]
    assert frames(hub, watcher)[-1]["data"] == {
        "event": "disconnected",
        "client_id": "c1",
        "cause": "peer_close",
        "code": 1001,
        "duration": 12.5,
    }
    assert hub.stats.disconnects == {"peer_close": 1}


def test_a_failed_write_closes_with_write_error() -> None:
    hub = Hub()
    conn = open_client(hub)
    hub.writer_done(conn, 1.0)
    assert conn.state is S.CLOSING_WRITER_DONE
    assert hub.actions() == [Close("c1", 1006, CloseCause.WRITE_ERROR, "write_error")]


def test_close_before_the_pumps_start_goes_straight_to_closed() -> None:
    hub = Hub()
    conn = hub.connect("c1", 0.0)
    hub.accept(conn, 0.0)
    hub.close(conn, CloseCause.SHUTDOWN, 0.0)
    assert conn.state is S.CLOSED
    assert conn.outbox == type(conn.outbox)()  # the welcome will never be written
    assert hub.stats.dropped["closed"] == 1
    hub.unregister(conn, 0.0)
    assert conn.state is S.UNREGISTERED


def test_shutdown_closes_every_client_with_1001() -> None:
    hub = Hub()
    a, b = open_client(hub, "a"), open_client(hub, "b")
    hub.shutdown(5.0)
    assert hub.actions() == [
        Close("a", 1001, CloseCause.SHUTDOWN, "shutdown"),
        Close("b", 1001, CloseCause.SHUTDOWN, "shutdown"),
    ]
    assert a.state is b.state is S.CLOSING


def test_a_stuck_pump_is_aborted_after_the_close_timeout() -> None:
    hub = Hub(HubConfig(close_timeout=5.0))
    conn = open_client(hub)
    hub.close(conn, CloseCause.POLICY, 10.0)
    hub.actions()
    assert hub.next_deadline() is not None
    hub.tick(14.999)
    assert hub.actions() == []
    hub.tick(15.0)
    assert hub.actions() == [Abort("c1")]
    hub.tick(30.0)
    assert hub.actions() == []  # once
    assert hub.stats.aborts == 1


def test_no_abort_once_both_pumps_finished_in_time() -> None:
    hub = Hub(HubConfig(close_timeout=5.0))
    conn = open_client(hub)
    hub.close(conn, CloseCause.POLICY, 10.0)
    hub.reader_done(conn, 11.0, CloseCause.PEER_CLOSE, 1008)
    hub.writer_done(conn, 11.0)
    hub.actions()
    hub.tick(20.0)
    assert hub.actions() == []


# -- keep-alive ---------------------------------------------------------------------------


def test_pings_every_interval_and_a_pong_keeps_the_client_open() -> None:
    hub = Hub(HubConfig(ping_interval=30.0, ping_timeout=10.0))
    conn = open_client(hub)
    assert hub.next_deadline() == 30.0
    hub.tick(29.9)
    assert hub.actions() == []
    hub.tick(30.0)
    assert hub.actions() == [Ping("c1")]
    hub.pong_received(conn, 30.2)
    assert conn.rtt == pytest.approx(0.2)
    hub.tick(45.0)
    assert hub.actions() == []
    hub.tick(60.0)
    assert hub.actions() == [Ping("c1")]
    assert conn.state is S.OPEN


def test_an_unanswered_ping_closes_with_keepalive_timeout_1011() -> None:
    hub = Hub(HubConfig(ping_interval=30.0, ping_timeout=10.0))
    conn = open_client(hub)
    hub.tick(30.0)
    hub.actions()
    hub.tick(39.99)
    assert hub.actions() == []
    hub.tick(40.0)
    assert hub.actions() == [Close("c1", 1011, CloseCause.KEEPALIVE_TIMEOUT, "keepalive_timeout")]
    assert conn.state is S.CLOSING


def test_an_unsolicited_pong_is_ignored() -> None:
    hub = Hub()
    conn = open_client(hub)
    hub.pong_received(conn, 1.0)
    assert conn.rtt is None


def test_a_stalled_loop_extends_pending_pong_deadlines_instead_of_blaming_peers() -> None:
    hub = Hub(HubConfig(ping_interval=30.0, ping_timeout=10.0))
    conn = open_client(hub)
    hub.tick(30.0)
    hub.actions()
    # The loop was blocked from 35 to 43: the pong may be sitting unread in the socket.
    hub.loop_stalled(43.0, 8.0)
    hub.tick(43.0)
    assert hub.actions() == []
    assert hub.stats.stall_extensions == 1
    hub.pong_received(conn, 43.01)
    hub.tick(48.0)
    assert conn.state is S.OPEN
    assert hub.stats.loop_stalls == 1
    assert hub.stats.loop_stall_seconds == 8.0


def test_a_deadline_that_passed_before_the_stall_is_still_the_peers_fault() -> None:
    hub = Hub(HubConfig(ping_interval=30.0, ping_timeout=10.0))
    conn = open_client(hub)
    hub.tick(30.0)
    hub.actions()
    hub.loop_stalled(50.0, 5.0)  # stalled 45..50, the deadline was 40
    hub.tick(50.0)
    assert hub.actions() == [Close("c1", 1011, CloseCause.KEEPALIVE_TIMEOUT, "keepalive_timeout")]
    assert conn.state is S.CLOSING


def test_a_stall_of_no_length_changes_nothing() -> None:
    hub = Hub()
    open_client(hub)
    hub.loop_stalled(1.0, 0.0)
    assert hub.stats.loop_stalls == 0


# -- subscribe, publish, history -----------------------------------------------------------


def test_events_carry_topic_consecutive_seq_ts_data_and_stale() -> None:
    hub = Hub(epoch="k3f9", wall_offset=1_764_086_400.0)
    conn = open_client(hub)
    hub.subscribe(conn, ["system_status"], 0.0)
    assert frames(hub, conn) == [
        {
            "type": "subscribed",
            "topics": ["system_status"],
            "recovered": {"system_status": True},
            "epoch": {"system_status": "k3f9"},
            "seq": {"system_status": 0},
        }
    ]
    assert hub.publish("system_status", {"cpu": 0.5}, 1.25) == 1
    assert hub.publish("system_status", {"cpu": 0.6}, 2.0, stale=True, age=3.5) == 2
    for stale, age in ((True, None), (False, 1.0)):  # the protocol's rule, refused early
        with pytest.raises(ValueError, match="stale event carries its age"):
            hub.publish("system_status", {"cpu": 0.7}, 2.5, stale=stale, age=age)
    assert hub.publish("system_status", {"cpu": 0.7}, 2.5, stale=True, age=0.0) == 3
    got = frames(hub, conn)
    assert got[0] == {
        "type": "event",
        "topic": "system_status",
        "seq": 1,
        "ts": "2025-11-25T16:00:01.250Z",
        "data": {"cpu": 0.5},
        "stale": False,
    }
    assert (got[1]["stale"], got[1]["age"]) == (True, 3.5)
    assert (got[2]["stale"], got[2]["age"]) == (True, 0.0)


def test_a_new_subscriber_first_gets_the_retained_latest_value() -> None:
    hub = Hub()
    hub.publish("t", {"v": 1}, 0.0)
    hub.publish("t", {"v": 2}, 0.0)
    conn = open_client(hub)
    hub.subscribe(conn, ["t"], 1.0)
    hub.publish("t", {"v": 3}, 2.0)
    msgs = frames(hub, conn)
    assert [m["type"] for m in msgs] == ["subscribed", "event", "event"]
    assert msgs[0]["seq"] == {"t": 2}  # the retained event is the current value, not news
    assert [m["data"]["v"] for m in msgs[1:]] == [2, 3]


def test_publish_reaches_only_subscribers_and_unsubscribe_withdraws_queued_events() -> None:
    hub = Hub()
    a, b = open_client(hub, "a"), open_client(hub, "b")
    hub.subscribe(a, ["t", "u"], 0.0)
    hub.subscribe(b, ["u"], 0.0)
    frames(hub, a), frames(hub, b)
    hub.publish("t", 1, 0.0)
    hub.publish("u", 2, 0.0)
    hub.unsubscribe(a, ["t", "never"], 0.0)
    assert events(frames(hub, a)) == [("u", 1)]
    assert events(frames(hub, b)) == [("u", 1)]
    hub.publish("t", 3, 0.0)
    assert frames(hub, a) == []
    assert a.topics == {"u"}
    assert set(hub.topics["t"].subscribers) == set()


def test_resume_replays_after_since_with_no_duplicate_and_no_hole() -> None:
    hub = Hub(epoch="e1")
    for i in range(5):
        hub.publish("t", i, float(i))
    conn = open_client(hub)
    hub.subscribe(conn, ["t"], 5.0, since={"t": 2})
    hub.publish("t", 99, 6.0)
    msgs = frames(hub, conn)
    assert msgs[0]["recovered"] == {"t": True}
    assert msgs[0]["seq"] == {"t": 2}  # the replay follows: a cut during it loses nothing
    assert events(msgs) == [("t", 3), ("t", 4), ("t", 5), ("t", 6)]


def test_resume_when_up_to_date_sends_nothing_more() -> None:
    hub = Hub(epoch="e1")
    hub.publish("t", 0, 0.0)
    conn = open_client(hub)
    hub.subscribe(conn, ["t"], 1.0, since={"t": (1, "e1")})
    msgs = frames(hub, conn)
    assert msgs[0]["recovered"] == {"t": True}
    assert events(msgs) == []


def test_resume_past_the_history_says_not_recovered_and_sends_a_gap() -> None:
    hub = Hub(HubConfig(history_size=3), epoch="e1")
    for i in range(10):
        hub.publish("t", i, 0.0)
    conn = open_client(hub)
    hub.subscribe(conn, ["t"], 1.0, since={"t": 2})
    msgs = frames(hub, conn)
    assert msgs[0]["recovered"] == {"t": False}
    assert msgs[0]["seq"] == {"t": 2}  # a cut before the gap gets the gap again
    assert msgs[1] == {
        "type": "gap",
        "topic": "t",
        "from_seq": 3,
        "to_seq": 7,
        "reason": "history_evicted",
    }
    assert events(msgs) == [("t", 8), ("t", 9), ("t", 10)]


def test_no_history_makes_every_resume_a_gap_but_keeps_the_retained_value() -> None:
    hub = Hub(HubConfig(history_size=0), epoch="e1")
    hub.publish("t", 0, 0.0)
    hub.publish("t", 1, 0.0)
    conn = open_client(hub)
    hub.subscribe(conn, ["t"], 1.0, since={"t": 1})
    msgs = frames(hub, conn)
    assert msgs[0]["recovered"] == {"t": False}
    assert (msgs[1]["from_seq"], msgs[1]["to_seq"]) == (2, 2)
    with pytest.raises(ValueError, match="history_size"):
        HubConfig(history_size=-1)


def test_history_is_bounded_by_age_too() -> None:
    hub = Hub(HubConfig(history_max_age=60.0), epoch="e1")
    hub.publish("t", 0, 0.0)
    hub.publish("t", 1, 50.0)
    conn = open_client(hub, now=100.0)
    hub.subscribe(conn, ["t"], 100.0, since={"t": 0})
    msgs = frames(hub, conn)
    assert msgs[1]["type"] == "gap"
    assert (msgs[1]["from_seq"], msgs[1]["to_seq"]) == (1, 1)  # older than 60 s at t=100
    assert events(msgs) == [("t", 2)]
    hub.publish("t", 2, 200.0)
    assert [e.seq for e in hub.topics["t"].history] == [3]


def test_resume_into_another_epoch_is_refused_with_an_epoch_changed_gap() -> None:
    hub = Hub(HubConfig(history_size=3), epoch="new")
    for i in range(5):
        hub.publish("t", i, 0.0)
    conn = open_client(hub)
    hub.subscribe(conn, ["t"], 1.0, since={"t": (41, "old")})
    msgs = frames(hub, conn)
    assert msgs[0]["recovered"] == {"t": False}
    # The client has nothing of the new numbering: the subscription continues after 0.
    assert (msgs[0]["epoch"], msgs[0]["seq"]) == ({"t": "new"}, {"t": 0})
    assert msgs[1] == {
        "type": "gap",
        "topic": "t",
        "from_seq": None,
        "to_seq": None,
        "reason": "epoch_changed",
    }
    # Then the new numbering from its start, as far as the history holds it.
    assert msgs[2] == {
        "type": "gap",
        "topic": "t",
        "from_seq": 1,
        "to_seq": 2,
        "reason": "history_evicted",
    }
    assert events(msgs) == [("t", 3), ("t", 4), ("t", 5)]
    assert len(msgs) == 6


def test_a_cut_after_an_epoch_change_resumes_in_the_new_epoch_and_misses_nothing() -> None:
    hub = Hub(epoch="new")
    for i in range(3):
        hub.publish("t", i, 0.0)
    conn = open_client(hub)
    hub.subscribe(conn, ["t"], 1.0, since={"t": (41, "old")})
    ack, gap, first, *_ = frames(hub, conn)
    assert (ack["seq"], gap["reason"], first["seq"]) == ({"t": 0}, "epoch_changed", 1)
    # Cut after seq 1: resuming from max(subscribed seq, last received) replays the rest.
    again = open_client(hub, "c2")
    hub.subscribe(again, ["t"], 2.0, since={"t": (max(ack["seq"]["t"], 1), "new")})
    msgs = frames(hub, again)
    assert msgs[0]["recovered"] == {"t": True}
    assert events(msgs) == [("t", 2), ("t", 3)]


def test_a_since_beyond_the_topics_seq_means_another_sequence_space() -> None:
    hub = Hub(epoch="e1")
    conn = open_client(hub)
    hub.subscribe(conn, ["t"], 1.0, since={"t": 41})
    msgs = frames(hub, conn)
    assert msgs[0]["recovered"] == {"t": False}
    assert msgs[0]["seq"] == {"t": 0}
    assert msgs[1]["reason"] == "epoch_changed"
    assert len(msgs) == 2
    hub.publish("t", 0, 2.0)
    hub.publish("t", 1, 2.0)
    later = open_client(hub, "c2")
    hub.subscribe(later, ["t"], 3.0, since={"t": 41})
    msgs = frames(hub, later)
    assert (msgs[0]["seq"], msgs[1]["reason"]) == ({"t": 0}, "epoch_changed")
    assert events(msgs) == [("t", 1), ("t", 2)]  # the numbering it is moved to, from 1


def test_subscribed_says_where_an_empty_topic_stands_so_a_resume_from_it_misses_nothing() -> None:
    hub = Hub(epoch="e1")
    first = open_client(hub, "first")
    hub.subscribe(first, ["t"], 0.0)
    (ack,) = frames(hub, first)
    assert (ack["seq"], ack["epoch"]) == ({"t": 0}, {"t": "e1"})
    # The connection is cut before anything arrives; three events go out meanwhile.
    hub.reader_done(first, 1.0, CloseCause.READ_ERROR)
    hub.writer_done(first, 1.0)
    hub.unregister(first, 1.0)
    for i in range(3):
        hub.publish("t", i, 2.0)
    again = open_client(hub, "again", now=3.0)
    hub.subscribe(again, ["t"], 3.0, since={"t": (ack["seq"]["t"], ack["epoch"]["t"])})
    msgs = frames(hub, again)
    assert msgs[0]["recovered"] == {"t": True}
    assert events(msgs) == [("t", 1), ("t", 2), ("t", 3)]


def test_subscribing_again_to_a_held_topic_is_acknowledged_and_replays_nothing() -> None:
    hub = Hub(epoch="e1")
    hub.publish("t", "retained", 0.0)
    conn = open_client(hub)
    hub.subscribe(conn, ["t"], 0.0)
    assert events(frames(hub, conn)) == [("t", 1)]
    hub.publish("t", "live", 1.0)
    hub.subscribe(conn, ["t", "u"], 2.0)  # the live event is still queued before the ack
    hub.subscribe(conn, ["t"], 2.0, since={"t": 0})  # a since changes nothing for it
    msgs = frames(hub, conn)
    assert [m["type"] for m in msgs] == ["event", "subscribed", "subscribed"]
    assert msgs[1] == {
        "type": "subscribed",
        "topics": ["t", "u"],
        "recovered": {"t": True, "u": True},
        "epoch": {"t": "e1", "u": "e1"},
        "seq": {"t": 2, "u": 0},
    }
    assert (msgs[2]["recovered"], msgs[2]["seq"]) == ({"t": True}, {"t": 2})
    assert events(msgs) == [("t", 2)]  # once: no seq reaches a connection twice
    assert hub.topics["t"].subscribers == {"c1": conn}
    hub.publish("t", "next", 3.0)
    assert events(frames(hub, conn)) == [("t", 3)]


def test_a_held_topic_with_a_gap_owed_stands_before_the_gap() -> None:
    """Under a lossy policy a dropped event is owed as a gap that may be written after the
    acknowledgement: the position must not pass it, or a cut would hide the loss."""
    cfg = HubConfig(send_queue_size=2, overflow={"t": OverflowPolicy.DROP_OLDEST})
    hub = Hub(cfg)
    conn = open_client(hub)
    hub.subscribe(conn, ["t"], 0.0)
    frames(hub, conn)
    for i in range(3):
        hub.publish("t", i, 0.0)  # the outbox holds 2: seq 1 is dropped and owed
    assert conn.owed == {"t": [[1, 1]]}
    hub.written(conn, 0, True)  # the transport takes writes: the ack joins the full outbox
    hub.subscribe(conn, ["t"], 0.0)
    msgs = frames(hub, conn)
    assert [m["type"] for m in msgs] == ["gap", "event", "event", "subscribed"]
    assert msgs[3]["seq"] == {"t": 0}


def test_too_many_topics_is_refused_whole() -> None:
    hub = Hub(HubConfig(max_subscriptions=2))
    conn = open_client(hub)
    hub.subscribe(conn, ["a"], 0.0)
    hub.subscribe(conn, ["b", "c"], 0.0)
    msgs = frames(hub, conn)
    assert msgs[-1] == {
        "type": "error",
        "code": "too_many_topics",
        "message": "at most 2 topics per client",
    }
    assert conn.topics == {"a"}
    assert hub.stats.errors == {"too_many_topics": 1}


def test_oldest_queued_at_is_the_publish_time_of_the_first_queued_event() -> None:
    hub = Hub()
    conn = open_client(hub)
    hub.app_ping(conn, "p", 0.5)
    assert hub.oldest_queued_at(conn) is None  # control frames only
    hub.subscribe(conn, ["t"], 0.0)
    hub.publish("t", 1, 2.0)
    hub.publish("t", 2, 3.0)
    assert hub.oldest_queued_at(conn) == 2.0
    hub.drain(conn)
    assert hub.oldest_queued_at(conn) is None


def test_application_ping_gets_a_pong_with_its_id() -> None:
    hub = Hub()
    conn = open_client(hub)
    hub.app_ping(conn, "abc", 0.0)
    hub.app_ping(conn, None, 0.0)
    assert frames(hub, conn) == [{"type": "pong", "id": "abc"}, {"type": "pong"}]


def test_clients_publish_but_never_on_the_hubs_own_topics() -> None:
    hub = Hub()
    a, b = open_client(hub, "a"), open_client(hub, "b")
    hub.subscribe(b, ["orders"], 0.0)
    frames(hub, b)
    assert hub.client_publish(a, "orders", {"id": 1}, 0.0) == 1
    assert events(frames(hub, b)) == [("orders", 1)]
    assert hub.client_publish(a, "clients", {}, 0.0) is None
    assert frames(hub, a) == [
        {
            "type": "error",
            "code": "forbidden",
            "message": "publishing to this topic is not allowed",
        }
    ]
    closed = Hub(HubConfig(client_publish=False))
    c = open_client(closed)
    assert closed.client_publish(c, "orders", {}, 0.0) is None


def test_publish_rejects_data_that_is_not_json_before_changing_anything() -> None:
    hub = Hub()
    with pytest.raises(TypeError):
        hub.publish("t", {"x": object()}, 0.0)
    assert "t" not in hub.topics


# -- bad input ----------------------------------------------------------------------------


def test_bad_input_is_answered_and_repeated_abuse_closes_with_1008() -> None:
    hub = Hub(HubConfig(bad_input_limit=3))
    conn = open_client(hub)
    hub.bad_input(conn, ErrorCode.BAD_JSON, "invalid JSON", 0.0)
    hub.app_ping(conn, "ok", 0.0)  # a valid message resets the count
    hub.bad_input(conn, ErrorCode.BAD_JSON, "invalid JSON", 0.0)
    hub.bad_input(conn, ErrorCode.UNKNOWN_TYPE, "unknown message type", 0.0)
    assert conn.state is S.OPEN
    assert [m.get("code") for m in frames(hub, conn)] == [
        "bad_json",
        None,
        "bad_json",
        "unknown_type",
    ]
    hub.bad_input(conn, ErrorCode.BAD_JSON, "invalid JSON", 0.0)
    assert hub.actions() == [Close("c1", 1008, CloseCause.POLICY, "policy")]


def test_the_rate_limit_answers_once_then_closes_a_persistent_flood() -> None:
    hub = Hub(HubConfig(messages_per_second=2.0, rate_limit_grace=3))
    conn = open_client(hub)
    assert hub.admit(conn, 0.0)  # the bucket starts full: 2 messages
    assert hub.admit(conn, 0.0)
    assert not hub.admit(conn, 0.0)
    assert frames(hub, conn) == [
        {"type": "error", "code": "rate_limited", "message": "at most 2 messages per second"}
    ]
    assert hub.admit(conn, 0.5)  # half a second refills one token
    assert not hub.admit(conn, 0.5)
    assert not hub.admit(conn, 0.5)
    assert [m["code"] for m in frames(hub, conn)] == ["rate_limited"]  # once per run
    assert not hub.admit(conn, 0.5)  # the third refusal in a row: a flood
    assert hub.actions() == [Close("c1", 1008, CloseCause.POLICY, "policy")]
    assert hub.stats.rate_limited == 4
    assert not hub.admit(conn, 0.5)  # closing: refused quietly
    assert frames(hub, conn) == []


def test_the_bucket_holds_one_seconds_worth() -> None:
    hub = Hub(HubConfig(messages_per_second=3.0))
    conn = open_client(hub)
    assert all(hub.admit(conn, 0.0) for _ in range(3))
    assert not hub.admit(conn, 0.0)
    # an idle minute refills to the cap, not to 180
    assert sum(hub.admit(conn, 60.0) for _ in range(10)) == 3
    with pytest.raises(ValueError, match="messages_per_second"):
        HubConfig(messages_per_second=0)


def test_inputs_after_closing_began_queue_nothing() -> None:
    hub = Hub()
    conn = open_client(hub)
    hub.subscribe(conn, ["t"], 0.0)
    frames(hub, conn)
    hub.close(conn, CloseCause.AUTH_EXPIRED, 0.0)
    hub.subscribe(conn, ["u"], 0.0)
    hub.unsubscribe(conn, ["t"], 0.0)
    hub.app_ping(conn, "x", 0.0)
    hub.bad_input(conn, ErrorCode.BAD_JSON, "invalid JSON", 0.0)
    assert hub.client_publish(conn, "t", 1, 0.0) is None
    hub.publish("t", 1, 0.0)
    assert frames(hub, conn) == []
    assert hub.stats.dropped["closing"] == 1
    assert conn.topics == {"t"}


# -- overflow policies ---------------------------------------------------------------------


def test_overflow_disconnect_closes_with_1013() -> None:
    hub = Hub(HubConfig(send_queue_size=2))
    conn = open_client(hub)
    hub.subscribe(conn, ["t"], 0.0)
    hub.publish("t", 1, 0.0)
    hub.publish("t", 2, 0.0)
    assert hub.actions() == [Close("c1", 1013, CloseCause.SLOW_CONSUMER, "slow_consumer")]
    assert len(conn.outbox) == 2  # never past the bound
    assert hub.stats.dropped["slow_consumer"] == 1


def test_overflow_drop_oldest_owes_a_gap_before_the_next_event() -> None:
    cfg = HubConfig(send_queue_size=3, overflow={"t": OverflowPolicy.DROP_OLDEST})
    hub = Hub(cfg)
    conn = open_client(hub)
    hub.subscribe(conn, ["t"], 0.0)
    frames(hub, conn)
    for i in range(6):
        hub.publish("t", i, 0.0)
    assert len(conn.outbox) == 3
    msgs = frames(hub, conn)
    assert msgs[0] == {
        "type": "gap",
        "topic": "t",
        "from_seq": 1,
        "to_seq": 3,
        "reason": "slow_consumer",
    }
    assert events(msgs) == [("t", 4), ("t", 5), ("t", 6)]
    assert conn.state is S.OPEN


def test_overflow_keep_latest_conflates_per_topic() -> None:
    cfg = HubConfig(send_queue_size=2, overflow={"k": OverflowPolicy.KEEP_LATEST})
    hub = Hub(cfg)
    conn = open_client(hub)
    hub.subscribe(conn, ["k", "u"], 0.0)
    frames(hub, conn)
    hub.publish("u", "u1", 0.0)
    hub.publish("k", "k1", 0.0)
    hub.publish("k", "k2", 0.0)
    hub.publish("k", "k3", 0.0)
    msgs = frames(hub, conn)
    assert [(m["type"], m.get("topic"), m.get("seq")) for m in msgs] == [
        ("event", "u", 1),
        ("gap", "k", None),
        ("event", "k", 3),
    ]
    assert (msgs[1]["from_seq"], msgs[1]["to_seq"]) == (1, 2)


def test_keep_latest_without_a_queued_event_of_the_topic_drops_the_oldest() -> None:
    cfg = HubConfig(send_queue_size=2, overflow={"k": OverflowPolicy.KEEP_LATEST})
    hub = Hub(cfg)
    conn = open_client(hub)
    hub.subscribe(conn, ["k", "u"], 0.0)
    frames(hub, conn)
    hub.publish("u", 1, 0.0)
    hub.publish("u", 2, 0.0)
    hub.publish("k", 1, 0.0)
    msgs = frames(hub, conn)
    assert [(m["type"], m["topic"], m.get("seq")) for m in msgs] == [
        ("gap", "u", None),
        ("event", "u", 2),
        ("event", "k", 1),
    ]
    assert (msgs[0]["from_seq"], msgs[0]["to_seq"]) == (1, 1)


def test_a_lossy_policy_with_only_control_frames_queued_owes_the_event_itself() -> None:
    cfg = HubConfig(send_queue_size=2, overflow={"t": OverflowPolicy.DROP_OLDEST})
    hub = Hub(cfg)
    conn = open_client(hub)
    hub.subscribe(conn, ["t"], 0.0)
    hub.app_ping(conn, "p", 0.0)  # the outbox: subscribed, pong
    hub.publish("t", 1, 0.0)
    msgs = frames(hub, conn)
    assert [m["type"] for m in msgs] == ["subscribed", "pong", "gap"]
    assert (msgs[2]["from_seq"], msgs[2]["to_seq"]) == (1, 1)


def test_adjacent_holes_merge_and_each_gap_precedes_its_topics_next_event() -> None:
    cfg = HubConfig(send_queue_size=2, overflow={"t": OverflowPolicy.DROP_OLDEST})
    hub = Hub(cfg)
    conn = open_client(hub)
    hub.subscribe(conn, ["t", "u"], 0.0)
    frames(hub, conn)
    hub.publish("t", 1, 0.0)
    hub.publish("u", 1, 0.0)
    hub.publish("t", 2, 0.0)  # queue t1 u1: drops t1
    hub.publish("t", 3, 0.0)  # queue u1 t2: drops the oldest event, u1
    hub.publish("t", 4, 0.0)  # queue t2 t3: drops t2, which joins t1's hole
    msgs = frames(hub, conn)
    kinds = [
        (m["type"], m["topic"], m.get("seq"), m.get("from_seq"), m.get("to_seq")) for m in msgs
    ]
    assert kinds == [
        ("gap", "t", None, 1, 2),
        ("event", "t", 3, None, None),
        ("event", "t", 4, None, None),
        ("gap", "u", None, 1, 1),
    ]


def test_a_client_that_never_reads_its_replies_is_a_slow_consumer() -> None:
    hub = Hub(HubConfig(send_queue_size=2))
    conn = open_client(hub)
    hub.app_ping(conn, "1", 0.0)
    hub.app_ping(conn, "2", 0.0)
    hub.app_ping(conn, "3", 0.0)
    assert hub.actions() == [Close("c1", 1013, CloseCause.SLOW_CONSUMER, "slow_consumer")]


def test_a_replay_larger_than_the_outbox_follows_the_topics_policy() -> None:
    hub = Hub(HubConfig(send_queue_size=3))
    for i in range(10):
        hub.publish("t", i, 0.0)
    conn = open_client(hub)
    hub.subscribe(conn, ["t"], 1.0, since={"t": 0})
    assert conn.state is S.CLOSING
    assert conn.cause is CloseCause.SLOW_CONSUMER
    assert len(conn.outbox) == 3


def test_unsubscribe_forgets_gaps_owed_on_the_topic() -> None:
    cfg = HubConfig(send_queue_size=1, overflow={"t": OverflowPolicy.DROP_OLDEST})
    hub = Hub(cfg)
    conn = open_client(hub)
    hub.subscribe(conn, ["t"], 0.0)
    frames(hub, conn)
    hub.publish("t", 1, 0.0)
    hub.publish("t", 2, 0.0)  # drops 1: a gap is owed
    hub.unsubscribe(conn, ["t"], 0.0)
    assert frames(hub, conn) == []


def test_the_writer_gets_nothing_once_it_finished() -> None:
    hub = Hub(HubConfig(overflow={"t": OverflowPolicy.DROP_OLDEST}, send_queue_size=1))
    conn = open_client(hub)
    hub.subscribe(conn, ["t"], 0.0)
    hub.publish("t", 1, 0.0)  # owes a gap for it: the outbox holds `subscribed`
    hub.writer_done(conn, 1.0)
    assert hub.drain(conn) == []
    assert conn.owed is None


# -- the rest -----------------------------------------------------------------------------


def test_config_is_validated_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="ping_timeout"):
        HubConfig(ping_timeout=0)
    with pytest.raises(ValueError, match="close_timeout"):
        HubConfig(close_timeout=float("nan"))
    with pytest.raises(ValueError, match="send_queue_size"):
        HubConfig(send_queue_size=0)


def test_timestamps_are_utc_with_milliseconds() -> None:
    assert iso_utc(0.0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(1_764_086_400.9996) == "2025-11-25T16:00:00.999Z"


def test_connection_repr_names_client_and_state() -> None:
    assert repr(Connection("c9", 0.0)) == "<Connection c9 handshaking>"


def test_next_deadline_is_none_with_nothing_armed() -> None:
    assert Hub().next_deadline() is None


def test_has_ready_says_whether_an_outbox_filled_since_the_last_take() -> None:
    hub = Hub(epoch="e")
    conn = hub.connect("c", 0.0)
    hub.accept(conn, 0.0)
    assert hub.has_ready()  # the welcome
    hub.take_ready()
    assert not hub.has_ready()
