"""The lease decisions on a fake clock: acquire, renew inside the ttl, expire before it."""

import math

import pytest

from wirestate.core.lease import (
    ENGINE,
    REFUSED,
    TRANSITIONS,
    Acquire,
    Follow,
    Lead,
    Lease,
    LeaseState,
    LostCause,
    Renew,
)

TTL = 3.0


def leading(now: float = 0.0) -> Lease:
    lease = Lease("s", TTL)
    assert lease.due(now) == Acquire()
    lease.acquired("1:a", 1, now)
    assert lease.actions() == [Lead("1:a", 1)]
    return lease


def test_a_follower_asks_at_once_and_one_request_at_a_time() -> None:
    lease = Lease("s", TTL)
    assert lease.next_deadline() == -math.inf
    assert lease.due(0.0) == Acquire()
    assert lease.due(0.0) is None  # the answer is still awaited
    assert not lease.leader


def test_a_held_lease_is_asked_for_again_when_it_would_expire_at_most_every_third() -> None:
    lease = Lease("s", TTL)
    lease.due(0.0)
    lease.held(0.0, 0.4)
    assert lease.next_deadline() == 0.4
    assert lease.due(0.3) is None
    assert lease.due(0.4) == Acquire()
    lease.held(0.4, 10.0)
    assert lease.next_deadline() == pytest.approx(0.4 + TTL / 3)
    lease.due(2.0)
    lease.held(2.0, -1.0)  # already expired: at once
    assert lease.next_deadline() == 2.0


def test_a_leader_renews_every_third_of_the_ttl() -> None:
    lease = leading()
    assert lease.leader
    assert lease.token == "1:a"
    assert lease.fence == 1
    assert lease.due(0.5) is None
    assert lease.next_deadline() == pytest.approx(1.0)
    assert lease.due(1.0) == Renew("1:a")
    lease.renewed(1.0)
    assert lease.state is LeaseState.LEADER
    assert lease.next_deadline() == pytest.approx(2.0)
    assert lease.actions() == []


def test_a_lead_ends_before_the_ttl_when_renewals_do_not_land() -> None:
    lease = leading()
    lease.due(1.0)
    lease.failed(1.0, retry=0.1)
    assert lease.leader
    # counted from the last confirmed request: 0.0 + ttl - margin (ttl / 5)
    assert lease.next_deadline() == pytest.approx(1.1)
    lease.due(1.1)
    lease.failed(1.1, retry=0.1)
    assert lease.due(2.39) == Renew("1:a")
    lease.failed(2.39, retry=0.5)
    assert lease.next_deadline() == pytest.approx(TTL - TTL / 5)
    assert lease.due(TTL - TTL / 5) == Acquire()  # lost, so asking as a follower
    assert lease.actions() == [Follow(LostCause.EXPIRED)]
    assert lease.token is None
    assert not lease.leader


def test_a_renewal_confirmed_after_the_lead_expired_here_does_not_revive_it() -> None:
    lease = leading()
    lease.due(1.0)
    assert lease.expire(2.5)
    assert not lease.expire(2.6)
    lease.renewed(1.0)
    assert not lease.leader
    assert lease.actions() == [Follow(LostCause.EXPIRED)]


def test_a_renewal_counts_from_when_it_was_sent() -> None:
    lease = leading()
    lease.due(1.0)
    lease.renewed(1.0)  # confirmed late, at 1.9: still counted from 1.0
    assert lease.expire(1.0 + TTL - TTL / 5)


def test_refused_fenced_and_released_end_the_lead_at_once() -> None:
    for end, cause in (
        (lambda lease: (lease.due(1.0), lease.refused()), LostCause.REFUSED),
        (lambda lease: lease.fenced(), LostCause.FENCED),
        (lambda lease: lease.release(), LostCause.RELEASED),
    ):
        lease = leading()
        end(lease)
        assert lease.actions() == [Follow(cause)]
        assert lease.state is LeaseState.FOLLOWER
        lease.fenced()  # a follower has nothing to lose
        assert lease.actions() == []
        assert lease.due(1.0) == Acquire()


def test_acquiring_while_leading_is_a_bug() -> None:
    lease = leading()
    with pytest.raises(RuntimeError):
        lease.acquired("2:b", 2, 0.1)


@pytest.mark.parametrize(("ttl", "margin"), [(0, None), (math.inf, None), (3.0, 2.0), (3.0, -1)])
def test_bad_durations_are_refused(ttl: float, margin: float | None) -> None:
    with pytest.raises(ValueError, match="must be"):
        Lease("s", ttl, margin=margin)


def test_every_pair_of_the_table_is_a_row_or_a_documented_refusal() -> None:
    pairs = ENGINE.pairs()
    everything = {(state, row["trigger"]) for state in LeaseState for row in TRANSITIONS}
    assert set(pairs) | set(REFUSED) == everything
    assert not set(pairs) & set(REFUSED)
    # every state is reached, and left
    assert {dest for dests in pairs.values() for dest in dests if dest} == set(LeaseState)
    assert {state for state, _ in pairs} == set(LeaseState)
