"""Topics have a life cycle: they age without traffic, idle empty ones are dropped, at most
``max_topics`` exist, and a topic created again never reuses a seq in its epoch."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wirestate.core.causes import CloseCause, ErrorCode
from wirestate.core.hub import BUILTIN_TOPICS, Connection, Hub, HubConfig, TopicLimit
from wirestate.core.topics import NO_HISTORY, RECENT


def open_client(hub: Hub, cid: str = "c1", now: float = 0.0) -> Connection:
    conn = hub.connect(cid, now)
    hub.accept(conn, now)
    hub.start(conn, now)
    hub.drain(conn)
    hub.actions()
    return conn


def msgs(hub: Hub, conn: Connection) -> list[dict[str, Any]]:
    return [orjson.loads(f) for f in hub.drain(conn)]


def hub_with(**config: Any) -> Hub:
    return Hub(HubConfig(ping_interval=1000.0, **config), epoch="e")


def test_an_unsubscribed_topic_is_dropped_once_its_history_ages_out_without_traffic() -> None:
    hub = hub_with(history_max_age=10.0)
    hub.publish("orders", {"n": 1}, 0.0)
    assert "orders" in hub.topics
    assert hub.next_deadline() == 10.0  # the event's age, not a publish, decides
    hub.tick(9.9)
    assert "orders" in hub.topics
    hub.tick(10.0)
    assert "orders" not in hub.topics
    assert hub.take_dropped() == ["orders"]
    assert hub.take_dropped() == []


def test_a_subscribed_topic_keeps_existing_but_its_history_and_retained_value_age() -> None:
    hub = hub_with(history_max_age=10.0)
    conn = open_client(hub)
    hub.subscribe(conn, ["t"], 0.0)
    hub.publish("t", 1, 1.0)
    hub.tick(11.0)
    topic = hub.topics["t"]
    assert len(topic.history) == 0
    assert topic.retained is None  # the retained value ages like history
    late = open_client(hub, "c2", 11.0)
    hub.subscribe(late, ["t"], 11.0)
    assert [m["type"] for m in msgs(hub, late)] == ["subscribed"]  # nothing stale replayed


def test_subscribing_to_a_topic_that_holds_nothing_creates_no_history() -> None:
    hub = hub_with()
    conn = open_client(hub)
    hub.subscribe(conn, ["quiet"], 0.0)
    assert hub.topics["quiet"].history is NO_HISTORY
    hub.unsubscribe(conn, ["quiet"], 1.0)
    hub.tick(1.0)
    assert "quiet" not in hub.topics  # nothing held, nobody subscribed: gone at once


def test_subscribe_and_unsubscribe_churn_leaves_no_topics_behind() -> None:
    hub = hub_with()
    conn = open_client(hub)
    for i in range(1000):
        hub.subscribe(conn, [f"churn.{i}"], float(i))
        hub.unsubscribe(conn, [f"churn.{i}"], float(i))
        hub.drain(conn)  # a reader: its replies do not pile up
        hub.tick(float(i))
    assert set(hub.topics) <= BUILTIN_TOPICS


def test_the_last_subscriber_leaving_starts_the_clock_too() -> None:
    hub = hub_with(history_max_age=5.0)
    conn = open_client(hub)
    hub.subscribe(conn, ["t"], 0.0)
    hub.reader_done(conn, 1.0, cause=CloseCause.PEER_CLOSE)
    hub.writer_done(conn, 1.0)
    hub.unregister(conn, 1.0)
    hub.tick(1.0)
    assert "t" not in hub.topics


def test_reserved_topics_are_never_dropped_nor_refused() -> None:
    hub = hub_with(history_max_age=1.0, max_topics=1, reserved_topics=frozenset({"clients", "src"}))
    hub.publish("src", 1, 0.0)
    hub.publish("clients", 1, 0.0)
    hub.tick(5.0)
    assert {"src", "clients"} <= set(hub.topics)


def test_max_topics_refuses_the_one_more_and_disturbs_nothing_else() -> None:
    hub = hub_with(max_topics=2)  # the built-in topics are not counted
    conn = open_client(hub)
    hub.publish("a", 1, 0.0)
    hub.subscribe(conn, ["b"], 0.0)
    msgs(hub, conn)
    with pytest.raises(TopicLimit):
        hub.publish("c", 1, 0.0)
    hub.subscribe(conn, ["a", "d"], 0.0)  # d would be a third: the whole request is refused
    assert msgs(hub, conn) == [
        {"type": "error", "code": "topic_limit", "message": "this hub holds at most 2 topics"}
    ]
    assert hub.client_publish(conn, "e", 1, 0.0) is None
    assert msgs(hub, conn)[0]["code"] == "topic_limit"
    assert sorted(hub.topics) == ["a", "b", "clients"]
    assert conn.topics == {"b"}
    assert hub.publish("a", 2, 0.0) == 2  # existing topics carry on
    assert hub.topics.refused == 3
    assert hub.stats.errors[ErrorCode.TOPIC_LIMIT.value] == 2


def test_a_topic_created_again_counts_in_a_new_epoch() -> None:
    hub = hub_with(history_max_age=1.0)
    hub.publish("t", "first", 0.0)
    first_epoch = hub.topics["t"].epoch
    hub.tick(2.0)
    assert "t" not in hub.topics
    assert hub.publish("t", "again", 3.0) == 1
    assert hub.topics["t"].epoch != first_epoch
    # A client that held seq 1 of the old epoch is told the sequence restarted, not fed
    # the new seq 1 as if it were the one it already has.
    conn = open_client(hub, now=3.0)
    hub.subscribe(conn, ["t"], 3.0, since={"t": (1, first_epoch)})
    got = msgs(hub, conn)
    assert got[0]["recovered"] == {"t": False}
    assert got[1] == {
        "type": "gap",
        "topic": "t",
        "from_seq": None,
        "to_seq": None,
        "reason": "epoch_changed",
    }


def test_an_evicted_history_still_answers_history_evicted() -> None:
    hub = hub_with(history_max_age=10.0)
    conn = open_client(hub)
    hub.subscribe(conn, ["t"], 0.0)
    for i in range(3):
        hub.publish("t", i, float(i))
    hub.tick(20.0)
    late = open_client(hub, "c2", 20.0)
    hub.subscribe(late, ["t"], 20.0, since={"t": (1, hub.topics["t"].epoch)})
    got = msgs(hub, late)
    assert got[1] == {
        "type": "gap",
        "topic": "t",
        "from_seq": 2,
        "to_seq": 3,
        "reason": "history_evicted",
    }


def test_a_topic_that_gained_a_subscriber_is_not_dropped_when_its_entry_comes_due() -> None:
    hub = hub_with(history_max_age=10.0)
    hub.publish("t", 1, 0.0)
    conn = open_client(hub)
    hub.subscribe(conn, ["t"], 0.0)
    hub.tick(10.0)  # the entry for t comes due: it is subscribed, so it stays
    assert "t" in hub.topics
    assert hub.topics.next_deadline() is None  # subscribed and empty: nothing to wait for


def test_a_subscription_cut_short_by_a_close_leaves_no_topic_behind() -> None:
    hub = hub_with(send_queue_size=1)
    conn = open_client(hub)
    hub.app_ping(conn, "fill", 0.0)  # the outbox is full: the next reply closes
    hub.subscribe(conn, ["orphan"], 0.0)
    assert conn.cause is CloseCause.SLOW_CONSUMER
    hub.tick(0.0)
    assert "orphan" not in hub.topics


def test_recent_remembers_the_last_published_topics_newest_last_and_no_more() -> None:
    hub = Hub(HubConfig(history_size=1), epoch="e")
    for i in range(RECENT + 10):
        hub.publish(f"t.{i}", i, now=1.0)
    hub.publish("t.20", "again", now=2.0)  # published again: moves to the end
    recent = list(hub.topics.recent)
    assert len(recent) == RECENT
    assert recent[-1] == "t.20"
    assert recent[:2] == ["t.10", "t.11"]  # the 10 oldest were forgotten
    assert "t.9" not in hub.topics.recent


# -- a resume from another epoch gets this one from its start --------------------------------


def replay(got: list[dict[str, Any]]) -> list[tuple[int, int] | int]:
    """After ``subscribed`` and the ``epoch_changed`` gap: seqs, and gaps as (from, to)."""
    assert got[0]["seq"] == {"t": 0}
    assert got[1]["reason"] == "epoch_changed"
    out: list[tuple[int, int] | int] = []
    for m in got[2:]:
        if m["type"] == "gap":
            assert m["reason"] == "history_evicted"
            out.append((m["from_seq"], m["to_seq"]))
        else:
            out.append(m["seq"])
    return out


RESUMERS = itertools.count()


def resume_from_elsewhere(hub: Hub, now: float) -> list[tuple[int, int] | int]:
    conn = open_client(hub, f"r{next(RESUMERS)}", now)
    hub.subscribe(conn, ["t"], now, since={"t": (1, "elsewhere")})
    return replay(msgs(hub, conn))


def test_after_a_rebase_the_retained_value_is_replayed_between_gaps() -> None:
    hub = hub_with()
    for i in range(3):
        hub.publish("t", i, 0.0)
    hub.rebase("t", 6, 1.0)  # a bus outage: 4..6 happened elsewhere, the history is gone
    assert hub.topics["t"].retained is not None
    assert resume_from_elsewhere(hub, 2.0) == [(1, 2), 3, (4, 6)]
    hub.publish("t", "next", 3.0)
    assert resume_from_elsewhere(hub, 4.0) == [(1, 6), 7]


def test_with_no_history_the_retained_value_is_replayed_after_a_gap() -> None:
    hub = hub_with(history_size=0)
    for i in range(3):
        hub.publish("t", i, 0.0)
    assert resume_from_elsewhere(hub, 1.0) == [(1, 2), 3]


def test_when_nothing_is_held_the_whole_numbering_is_one_gap() -> None:
    hub = hub_with(history_max_age=10.0)
    conn = open_client(hub)
    hub.subscribe(conn, ["t"], 0.0)  # keeps the topic while its events age out
    for i in range(3):
        hub.publish("t", i, 0.0)
    hub.tick(20.0)
    assert resume_from_elsewhere(hub, 20.0) == [(1, 3)]


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.one_of(
            st.just(("publish", 0)),
            st.tuples(st.just("rebase"), st.integers(0, 4)),
            st.tuples(st.just("wait"), st.integers(1, 6)),
        ),
        max_size=20,
    ),
    size=st.integers(0, 4),
)
def test_a_resume_from_elsewhere_accounts_for_every_seq_once_in_order(
    steps: list[tuple[str, int]], size: int
) -> None:
    hub = hub_with(history_size=size, history_max_age=10.0)
    keeper = open_client(hub, "keeper")
    hub.subscribe(keeper, ["t"], 0.0)  # the topic lives on while its history ages
    now = 0.0
    for kind, n in steps:
        if kind == "publish":
            hub.publish("t", None, now)
        elif kind == "rebase":
            hub.rebase("t", hub.topics["t"].seq + n, now)
        else:
            now += n
            hub.tick(now)
    accounted: list[int] = []
    for entry in resume_from_elsewhere(hub, now):
        accounted.extend(range(entry[0], entry[1] + 1) if isinstance(entry, tuple) else [entry])
    assert accounted == list(range(1, hub.topics["t"].seq + 1))
