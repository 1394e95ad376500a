"""A shared source's state as its events carry it, and the takeover that restores it."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from wirestate.adapters.server.leases import restore, state_of
from wirestate.adapters.server.sources import SourcePoller
from wirestate.core.breaker import BreakerConfig, BreakerState, CachedSource, PollReason, PollResult


class _Drop:
    def publish(
        self, topic: str, data: Any, *, stale: bool = False, age: float | None = None
    ) -> int:
        return 0


def poller(now: list[float]) -> SourcePoller:
    async def fetch() -> Any:
        raise AssertionError("not called here")

    return SourcePoller(
        "agents",
        fetch,
        publisher=_Drop(),
        interval=1.0,
        timeout=0.5,
        clock=lambda: now[0],
        config=BreakerConfig(failure_threshold=2, reset_timeout=60.0),
    )


def entry(data: Any, state: bytes | None) -> tuple[bytes, dict[bytes, bytes]]:
    fields = {b"d": orjson.dumps(data), b"t": b"2026-12-05T00:00:00.000Z"}
    if state is not None:
        fields[b"b"] = state
    return b"7-0", fields


def test_an_open_breaker_and_a_stale_value_survive_a_takeover() -> None:
    # The old leader (monotonic clock near 100, wall = clock + 1000): a value fetched at 100,
    # then two failures at 110 open the breaker for 60 s.
    old = [100.0]
    leader = poller(old)
    source = leader.source
    source.complete(source.begin(100.0), 100.0, value={"n": 1})  # type: ignore[arg-type]
    for _ in range(2):
        source.complete(source.begin(110.0), 110.0, error=RuntimeError())  # type: ignore[arg-type]
    assert leader.breaker.state is BreakerState.OPEN
    state = state_of(source, 120.0, wall_offset=1000.0)
    # The new leader's clock is another process's: near 5, wall = clock + 1115 (same instant).
    new = [5.0]
    follower = poller(new)
    taken = restore(follower, [entry({"n": 1}, state)], 5.0, wall_offset=1115.0)
    assert isinstance(taken, CachedSource)
    follower.adopt(taken)
    snap = follower.snapshot(5.0)
    assert snap.state == "open"
    assert snap.retry_after == pytest.approx(50.0)  # opened 10 s ago, 60 s reset: 50 left
    assert snap.consecutive_failures == 2
    assert snap.age == pytest.approx(20.0)  # fetched 20 s ago on the old leader's clock
    result = taken.begin(5.0)  # no call while open: the cached value, stale, with its age
    assert isinstance(result, PollResult)
    assert (result.reason, result.value, result.stale) == (PollReason.CIRCUIT_OPEN, {"n": 1}, True)
    assert result.age == pytest.approx(20.0)
    assert taken.breaker.actions() == []  # restoring announces no transition


def test_no_value_and_a_closed_breaker_restore_as_such() -> None:
    now = [0.0]
    p = poller(now)
    state = state_of(p.source, 0.0, wall_offset=10.0)
    taken = restore(p, [entry({"status": "unavailable"}, state)], 0.0, 10.0)
    assert taken is not None
    assert taken.cached is None
    assert taken.breaker.state is BreakerState.CLOSED


def test_the_newest_entry_with_a_state_counts_and_none_means_a_fresh_start() -> None:
    now = [0.0]
    p = poller(now)
    older = orjson.dumps(
        {
            "breaker": {"state": "open", "failures": 5, "attempt": 1, "opened_at": 0.0},
            "fetched_at": None,
        }
    )
    # newest first: an entry without a state (reconciled after an outage) is passed over
    taken = restore(p, [entry(1, None), entry(2, older)], 0.0, 1.0)
    assert taken is not None
    assert taken.breaker.state is BreakerState.OPEN
    assert restore(p, [entry(1, None)], 0.0, 1.0) is None
    assert restore(p, [], 0.0, 1.0) is None


@pytest.mark.parametrize("state", [b"not json", b"{}", b'{"breaker": {"state": "x"}}'])
def test_an_unreadable_state_means_a_fresh_start(state: bytes) -> None:
    assert restore(poller([0.0]), [entry(1, state)], 0.0, 1.0) is None


def test_adopting_is_refused_while_running() -> None:
    p = poller([0.0])
    p._running = True
    with pytest.raises(RuntimeError, match="adopting"):
        p.adopt(p.source)
